"""Host memory of a training-checkpoint restore: does each process hold (and read) only its share?

    python bench/restore_memory.py [--model pythia-160m] [--seq 128] [--dir /tmp/neox-jax-restore-mem]

CPU only (the processes it starts set JAX_PLATFORMS=cpu), three phases, each a fresh process:

  save     1 process x 8 devices, mesh fsdp 8: builds the full train state (float32 params + AdamW
           mu/nu + counters) and writes one checkpoint with `TrainCheckpoints.save` (step 0)
  1x8      1 process x 8 devices restores it with `restore_latest`, abstract state and shardings
           built as the trainer builds them (mesh fsdp 8)
  2x4      2 processes x 4 devices (jax.distributed, gloo) do the same on one fsdp-8 mesh spanning
           both, so each process holds half of every sharded leaf

Each restoring process reports its RSS just before the restore, its peak RSS during it (VmHWM,
reset with `echo 5 > /proc/self/clear_refs` just before; ru_maxrss where that is refused), the bytes
of the state it holds addressably (sum of its shards' nbytes) and the whole state's bytes.  On CPU
the restored arrays live in host memory, so growth / share is >= 1: about 1 means the process read
only its own shards; about N (processes) means it materialised the whole state on the way.

Prints the per-process JSON lines, then a table.  A benchmark, not a test; nothing gates on it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _raw(model: str, seq: int) -> dict:
    return {"model": {"preset": model, "max_position_embeddings": max(seq, 64)},
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
            "data": {"path": "unused", "seq_length": seq},
            "train": {"steps": 1000, "batch_size": 8}}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> str:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def _peak_kb(how: str) -> int:
    return _status_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _setup(args):

    from neox_jax.sharding import make_mesh
    from neox_jax.train.config import from_sections
    from neox_jax.train.state import abstract_state, make_optimizer, state_shardings

    run = from_sections(_raw(args.model, args.seq))
    mesh = make_mesh(1, -1, 1)
    opt = make_optimizer(run)
    sh = state_shardings(run, mesh, opt)
    abstract = abstract_state(run, opt, sh)
    return run, mesh, opt, sh, abstract


def role_save(args) -> None:
    import jax

    from neox_jax.train import checkpoints as tc
    from neox_jax.train.state import init_state

    run, mesh, opt, sh, _ = _setup(args)
    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    with jax.set_mesh(mesh):
        state = init_state(run, mesh, opt, shardings=sh)
        ckpts = tc.TrainCheckpoints(d / "checkpoints", run)
        ckpts.save(0, state, {"step": 0, "global_batch": run.train.batch_size, "dataset_len": 0})
        ckpts.close()
    print(json.dumps({"role": "save", "state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state))),
                      "params": run.model.num_params()}), flush=True)


def role_restore(args) -> None:
    import gc

    from neox_jax import distributed

    distributed.initialize(distributed.resolve())
    import jax

    from neox_jax.train import checkpoints as tc

    run, mesh, opt, sh, abstract = _setup(args)
    with jax.set_mesh(mesh):
        ckpts = tc.TrainCheckpoints(Path(args.dir) / "checkpoints", run)
        ckpts.steps()
        gc.collect()
        before = _status_kb("VmRSS")
        how = _reset_peak()
        step, state, _ = tc.restore_latest(ckpts, run, abstract)
        jax.block_until_ready(state)
        peak = _peak_kb(how)
        after = _status_kb("VmRSS")
    leaves = jax.tree.leaves(state)
    held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    whole = sum(x.nbytes for x in leaves)
    print(json.dumps({"role": "restore", "process": jax.process_index(), "processes": jax.process_count(),
                      "local_devices": jax.local_device_count(), "mesh": dict(mesh.shape), "step": step,
                      "state_bytes": int(whole), "held_bytes": int(held), "rss_before_kb": before,
                      "peak_kb": peak, "rss_after_kb": after, "peak_from": how}), flush=True)
    distributed.barrier("bench.restore_memory.done")


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEOX_JAX_"))}
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
               PYTHONPATH=f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT),
               **extra)
    return env


def _child(args, role: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--role", role, "--model", args.model, "--seq", str(args.seq),
           "--dir", args.dir]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def _collect(procs: list[subprocess.Popen], timeout: float) -> list[dict]:
    rows = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            for q in procs:
                q.kill()
            sys.exit(f"restore_memory: a child exited with status {p.returncode}")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pythia-160m", help="model preset")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dir", default="/tmp/neox-jax-restore-mem")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per phase")
    ap.add_argument("--role", choices=("save", "restore"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "save":
        return role_save(args)
    if args.role == "restore":
        return role_restore(args)

    rows = _collect([_child(args, "save", _env(8))], args.timeout)
    print(json.dumps(rows[-1]), flush=True)
    rows = _collect([_child(args, "restore", _env(8))], args.timeout)
    port = 12000 + os.getpid() % 20000
    procs = [_child(args, "restore", _env(4, NEOX_JAX_COORDINATOR=f"127.0.0.1:{port}",
                                          NEOX_JAX_NUM_PROCESSES="2", NEOX_JAX_PROCESS_ID=str(i),
                                          NEOX_JAX_INIT_TIMEOUT="120"))
             for i in range(2)]
    rows += _collect(procs, args.timeout)
    for r in rows:
        print(json.dumps(r), flush=True)
    mib = 1 / 2**20
    print(f"\n{'setup':<8}{'process':>8}{'state MiB':>11}{'held MiB':>10}{'RSS before':>12}"
          f"{'peak growth':>13}{'growth/held':>13}")
    for r in rows:
        growth = (r["peak_kb"] - r["rss_before_kb"]) * 1024
        print(f"{'%dx%d' % (r['processes'], r['local_devices']):<8}{r['process']:>8}"
              f"{r['state_bytes'] * mib:>11.0f}{r['held_bytes'] * mib:>10.0f}"
              f"{r['rss_before_kb'] / 1024:>12.0f}"
              f"{growth * mib:>13.0f}{growth / r['held_bytes']:>13.2f}")
    print(f"(MiB; peak from {rows[0]['peak_from']}; growth = peak RSS during restore - RSS before)")


if __name__ == "__main__":
    main()
