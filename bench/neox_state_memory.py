"""Host memory of continuing a GPT-NeoX run (`train.init_from_neox`): does the loader hold the whole
optimizer state on the host, or about one tensor at a time?

    python bench/neox_state_memory.py [--layers 12 --hidden 768 --vocab 50304] [--dir /tmp/neox-jax-zero-mem]
                                      [--code DIR]   # measure the neox_jax package under DIR (an older commit)
                                      [--processes 2]  # the load by 2 jax.distributed processes x 4 devices

Two phases, each a fresh CPU process:

  write   a random GPTNeoXForCausalLM of the given shape (default pythia-160m's) saved as a GPT-NeoX
          v1.0 checkpoint: fp16 layer files at TP 2 and DeeperSpeed 0.3 elastic ZeRO-1 optimizer files
          (float32 masters and Adam moments) for 2 data-parallel x 2 tensor-parallel ranks, written
          by the test suite's writers (tests/zero_test.py, tests/convert_fixtures.py)
  load    8 CPU devices, mesh data 1 x fsdp 4 x tensor 2: `neox_state.load` places the state; with
          --processes N, N jax.distributed processes (gloo) of 8/N devices each share the reading

Each load process reports its RSS before the load, its peak during it (VmHWM, reset just before;
ru_maxrss where that is refused), the bytes of its share of the placed state and what it read of
the files (process 0's log line, gathered over the processes).  On CPU the placed arrays live in
host memory too, so the host's own share of the peak is  peak - before - state.  Prints a JSON line
per phase and process, then one summary line.  A benchmark, not a test; nothing gates on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from restore_memory import _peak_kb, _reset_peak, _status_kb  # noqa: E402


def role_write(args) -> None:
    import shutil

    import numpy as np
    from convert_fixtures import hf_state_numpy, write_neox
    from hf_reference import hf_model
    from zero_test import K, _write_zero

    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    model = hf_model(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.hidden // 64)
    write_neox(model, d, tp=2, step=K)
    master = hf_state_numpy(model)
    rng = np.random.default_rng(0)
    mu = {k: rng.standard_normal(v.shape, np.float32) * 1e-3 for k, v in master.items()}
    nu = {k: np.abs(v) * 1e-3 for k, v in mu.items()}
    _write_zero(d / f"global_step{K}", args.layers, master, mu, nu, parallel=True)
    size = sum(f.stat().st_size for f in d.rglob("*optim_states.pt"))
    print(json.dumps({"role": "write", "params": int(sum(v.size for v in master.values())),
                      "optimizer_file_bytes": size}), flush=True)


def role_load(args) -> None:
    import gc
    import logging

    import jax

    if args.processes > 1:
        jax.distributed.initialize(os.environ["BENCH_COORDINATOR"], args.processes, int(os.environ["BENCH_PID"]))
    from zero_test import _run

    from neox_jax.sharding import make_mesh
    from neox_jax.train import neox_state
    from neox_jax.train import state as S

    cfg = neox_state.read_config(args.dir)
    run = _run(cfg, args.dir)
    mesh = make_mesh(1, 4, 2)
    opt = S.make_optimizer(run)
    sh = S.state_shardings(run, mesh, opt)
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("neox_jax").addHandler(handler)
    logging.getLogger("neox_jax").setLevel(logging.INFO)
    gc.collect()
    before = _status_kb("VmRSS")
    how = _reset_peak()
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        state = neox_state.load(run, args.dir, opt, sh)
        jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    peak = _peak_kb(how)
    mine = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards)
    read = [m for m in said if "parts, one per process" in m]
    print(json.dumps({"role": "load", "process": jax.process_index(), "processes": jax.process_count(),
                      "code": str(Path(neox_state.__file__).parents[2]), "seconds": round(seconds, 2),
                      "state_bytes_here": int(mine), "rss_before_kb": before, "peak_kb": peak,
                      "host_extra_mib": round((peak - before) / 1024 - mine / 2**20, 1), "peak_from": how,
                      "read": read[0] if read else "every tensor, by this one process"}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["write", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--dir", default="/tmp/neox-jax-zero-mem")
    ap.add_argument("--code", default=str(ROOT), help="the directory whose neox_jax package is measured")
    ap.add_argument("--skip-write", action="store_true", help="reuse the checkpoint already in --dir")
    ap.add_argument("--processes", type=int, default=1, choices=[1, 2, 4, 8],
                    help="load with this many jax.distributed processes (8 CPU devices in all)")
    args = ap.parse_args()
    if args.role:
        return {"write": role_write, "load": role_load}[args.role](args)
    import socket

    outs = {}
    for role in (["load"] if args.skip_write else ["write", "load"]):
        code = Path(args.code if role == "load" else ROOT).resolve()
        n = args.processes if role == "load" else 1
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEOX_JAX_")}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}",
                   PYTHONPATH=os.pathsep.join([str(code), str(ROOT / "tests")]),
                   BENCH_COORDINATOR=f"127.0.0.1:{port}")
        cmd = [sys.executable, __file__, "--role", role, "--layers", str(args.layers), "--hidden", str(args.hidden),
               "--vocab", str(args.vocab), "--dir", args.dir, "--processes", str(n)]
        procs = [subprocess.Popen(cmd, env={**env, "BENCH_PID": str(i)}, stdout=subprocess.PIPE, text=True)
                 for i in range(n)]
        for i, proc in enumerate(procs):
            out = proc.communicate()[0]
            if proc.returncode:
                sys.exit(f"{role} process {i} exited {proc.returncode}")
            print(out.strip(), flush=True)
            outs[role, i] = json.loads(out.strip().splitlines()[-1])
    for i in range(args.processes):
        r = outs["load", i]
        print(f"load, process {i} of {args.processes}: {r['seconds']} s; its state {r['state_bytes_here'] / 2**30:.2f} "
              f"GiB; RSS before {r['rss_before_kb'] / 2**20:.2f} GiB, peak {r['peak_kb'] / 2**20:.2f} GiB: the host's "
              f"own share of the peak {r['host_extra_mib']:.0f} MiB; read: {r['read']}")


if __name__ == "__main__":
    main()
