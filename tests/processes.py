"""Launching two jax.distributed processes on this host for the multi-process tests: through the
project's own launcher (`launch/local.sh`) or directly (a free coordinator port, NEOX_JAX_* set
per process).  Both start from this environment without any SLURM_* or NEOX_JAX_* variable, so
an outer job's settings never leak in."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEOX_JAX_"))}
    return {**env, "PYTHONPATH": str(ROOT), "NEOX_JAX_INIT_TIMEOUT": "120", **extra}


def local_sh(config: Path, run_dir: Path, *, neox_jax: str = f"{sys.executable} -m neox_jax",
             cwd: Path) -> tuple[subprocess.CompletedProcess, str]:
    """`launch/local.sh CONFIG RUN_DIR` with 2 processes x 4 CPU devices, NEOX_JAX the command each
    runs: (the launcher's result, every process's log concatenated)."""
    env = clean_env(NPROC="2", DEVICES_PER_PROCESS="4", PLATFORM="cpu", NEOX_JAX=neox_jax)
    r = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), str(config), str(run_dir)],
                       capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    logs = "".join(p.read_text() for p in sorted(Path(f"{run_dir}.logs").glob("*.log")))
    return r, logs


def two_processes(args: list[str], *, pause: float, cache: Path | None = None) -> list[subprocess.Popen]:
    """`python ARGS` as processes 0 and 1 of a jax.distributed run (4 CPU devices each), each train
    step held `pause` seconds (NEOX_JAX_TEST_PAUSE); stdout and stderr piped.  `cache`: JAX's
    persistent compilation cache there (every program kept), so that runs of the same step share
    its compilation."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = clean_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                    NEOX_JAX_COORDINATOR=f"127.0.0.1:{port}", NEOX_JAX_NUM_PROCESSES="2",
                    NEOX_JAX_TEST_PAUSE=f"train-step:{pause}", PYTHONUNBUFFERED="1")
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**env, "NEOX_JAX_PROCESS_ID": str(i)}) for i in range(2)]


def outputs(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
    """(stdout, stderr) of each of `procs` once it has ended; all are killed if one does not end in time."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
