"""Training-checkpoint cost: save time, async overlap, size on disk, restore time (same and other mesh).

    python bench/checkpoint_io.py [--model pythia-160m] [--seq 512] [--batch 8] [--dir /tmp/ckpt-bench]

Builds the full train state (float32 params + AdamW mu/nu + counters) of `--model` on all devices
(mesh fsdp = every device), compiles the train step on a random batch, then:

  step_s          median step time without checkpointing (each step waited for)
  save_block_s    how long `TrainCheckpoints.save` blocks the loop (device -> host copy, setup)
  overlap_steps   step times of the steps run while the write proceeds in the background
  commit_s        from the end of `save` until the checkpoint is committed (the background write)
  size_bytes      the step directory on disk (params + train_state + JSON items)
  restore_s       restoring the whole state onto the same mesh, and onto a one-device mesh

Prints one JSON line; nothing here gates tests.  Uses the public API only, so it doubles as the
check that the checkpoint code runs on the GPU machine's Orbax / JAX versions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import jax
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pythia-160m", help="model preset")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps without a save")
    ap.add_argument("--dir", default="/tmp/neox-jax-ckpt-bench")
    args = ap.parse_args()

    from neox_jax.sharding import make_mesh
    from neox_jax.train import checkpoints as tc
    from neox_jax.train.config import from_sections
    from neox_jax.train.state import abstract_state, init_state, make_optimizer, state_shardings
    from neox_jax.train.step import batch_sharding, make_train_step

    raw = {"model": {"preset": args.model, "max_position_embeddings": max(args.seq, 64)},
           "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
           "data": {"path": "unused", "seq_length": args.seq},
           "train": {"steps": 1000, "batch_size": args.batch}}
    run = from_sections(raw)
    mesh = make_mesh(1, -1, 1)
    opt = make_optimizer(run)
    sh = state_shardings(run, mesh, opt)
    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    out = {"model": args.model, "params": run.model.num_params(), "devices": jax.device_count(),
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}
    with jax.set_mesh(mesh):
        state = init_state(run, mesh, opt, shardings=sh)
        out["state_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(state)))
        step = make_train_step(run, mesh, opt, sh)
        rng = np.random.default_rng(0)
        batch = {"tokens": jax.device_put(rng.integers(0, run.model.vocab_size, (args.batch, args.seq + 1),
                                                       dtype=np.int32), batch_sharding(mesh))}
        state, m = step(state, batch)
        jax.block_until_ready(m)

        def timed(n):
            nonlocal state
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                state, m = step(state, batch)
                jax.block_until_ready(m)
                ts.append(time.perf_counter() - t0)
            return ts

        out["step_s"] = statistics.median(timed(args.steps))
        ckpts = tc.TrainCheckpoints(d, run)
        loader = {"step": 0, "global_batch": args.batch, "dataset_len": 0}
        s = int(jax.device_get(state.step))
        ckpts.save(s, state, {**loader, "step": s})
        ckpts.wait()  # the first save pays one-time setup; measure the second
        s = int(jax.device_get(state.step)) + 1
        state, m = step(state, batch)
        jax.block_until_ready(m)
        expect = np.array(jax.device_get(state.params["embed_in"]["embedding"]))
        t0 = time.perf_counter()
        ckpts.save(s, state, {**loader, "step": s})
        t1 = time.perf_counter()
        out["save_block_s"] = t1 - t0
        overlap = []
        while ckpts.manager.is_saving_in_progress() and len(overlap) < 50:
            overlap += timed(1)
        ckpts.wait()
        out["commit_s"] = time.perf_counter() - t1
        out["overlap_steps"] = len(overlap)
        out["overlap_step_s"] = statistics.median(overlap) if overlap else None
        step_dir = ckpts.step_dir(s)
        out["size_bytes"] = int(sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file()))
        ckpts.close()

    reader = tc.TrainCheckpoints(d, read_only=True)
    for name, m in (("restore_s", mesh), ("restore_one_device_s", make_mesh(1, 1, 1, devices=jax.devices()[:1]))):
        t0 = time.perf_counter()
        restored, _ = reader.restore(s, abstract_state(run, opt, state_shardings(run, m, opt)))
        jax.block_until_ready(restored)
        out[name] = time.perf_counter() - t0
        assert np.array_equal(jax.device_get(restored.params["embed_in"]["embedding"]), expect)
        del restored
    print(json.dumps(out))


if __name__ == "__main__":
    main()
