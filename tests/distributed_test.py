"""When `neox-jax train` starts jax.distributed, and with what (neox_jax/distributed.py), from the
command line, the run config, the launchers' environment variables, SLURM's srun variables and
JAX's own cluster detection; incomplete or inconsistent settings are one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neox_jax.distributed import DistributedError, Plan, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_alone_without_any_setting():
    assert resolve(env={}) is None
    assert resolve(env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}) is None
    # one process given explicitly is still alone: nothing to initialise
    assert resolve("h:1", 1, 0, env={}) is None


def test_explicit_wins_over_environment_and_slurm():
    env = {"NEOX_JAX_COORDINATOR": "a:1", "NEOX_JAX_NUM_PROCESSES": "4", "NEOX_JAX_PROCESS_ID": "3",
           "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}
    assert resolve("node7:1234", 2, 1, env=env) == Plan("explicit", "node7:1234", 2, 1)
    assert resolve(env=env) == Plan("environment", "a:1", 4, 3)
    slurm = {k: v for k, v in env.items() if k.startswith("SLURM")}
    assert resolve(env=slurm) == Plan("slurm")
    # srun sets SLURM_STEP_NUM_TASKS for the step (SLURM_NTASKS may be the allocation's)
    assert resolve(env={**slurm, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert resolve(env={"NEOX_JAX_DISTRIBUTED": "auto"}) == Plan("auto")


@pytest.mark.parametrize("args, env, words", [
    (("h:1", None, None), {}, ["--num-processes", "--process-id", "not given"]),
    ((None, 2, 0), {}, ["--coordinator", "not given"]),
    (("h:1", 2, 2), {}, ["--process-id", "2 outside [0, 2)"]),
    (("h:1", 0, 0), {}, ["--num-processes", ">= 1"]),
    (("nohost", 2, 0), {}, ["--coordinator", "HOST:PORT", "nohost"]),
    (("h:99999", 2, 0), {}, ["HOST:PORT"]),
    ((None, None, None), {"NEOX_JAX_COORDINATOR": "h:1", "NEOX_JAX_NUM_PROCESSES": "two",
                          "NEOX_JAX_PROCESS_ID": "0"}, ["NEOX_JAX_NUM_PROCESSES", "integer", "two"]),
    ((None, None, None), {"NEOX_JAX_PROCESS_ID": "0"}, ["NEOX_JAX_COORDINATOR", "not given"]),
    ((None, None, None), {"NEOX_JAX_DISTRIBUTED": "yes"}, ["NEOX_JAX_DISTRIBUTED", "'auto'"]),
])
def test_refused(args, env, words):
    with pytest.raises(DistributedError) as e:
        resolve(*args, env=env)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def _cli(*args, env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEOX_JAX_"))} | (env or {})
    return subprocess.run([sys.executable, "-m", "neox_jax", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})


def test_cli_errors_name_the_flag_or_key_before_jax_starts(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": "tiny", "data": {"path": "x"},
                                   "mesh": {"coordinator": "h:1", "num_processes": 2}}))
    r = _cli("train", cfg, "--run-dir", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("neox-jax: error: ") and "mesh.process_id" in r.stderr
    r = _cli("train", cfg, "--run-dir", tmp_path / "run", "--process-id", "5")
    assert r.returncode == 2 and "5 outside [0, 2)" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()



def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator_is_one_line_not_a_jax_abort(tmp_path):
    """Process 1 of 2 with nobody listening on the coordinator's port: after NEOX_JAX_INIT_TIMEOUT it
    exits 2 with one line naming the address (JAX alone aborts in C++ with a stack dump)."""
    port = _free_port()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": "tiny", "data": {"path": "x"}}))
    r = _cli("train", cfg, "--run-dir", tmp_path / "run", "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", 2, "--process-id", 1, env={"NEOX_JAX_INIT_TIMEOUT": "2"})
    assert r.returncode == 2 and r.stderr.count("neox-jax: error:") == 1, r.stderr
    assert f"coordinator 127.0.0.1:{port} unreachable for 2 s from process 1 of 2" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_coordinator_port_in_use_is_one_line(tmp_path):
    import socket
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": "tiny", "data": {"path": "x"}}))
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _cli("train", cfg, "--run-dir", tmp_path / "run", "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", 2, "--process-id", 0, env={"NEOX_JAX_INIT_TIMEOUT": "2"})
    assert r.returncode == 2 and r.stderr.count("neox-jax: error:") == 1, r.stderr
    assert f"port {port} is already in use" in r.stderr and "Traceback" not in r.stderr
