"""One decode step per program call (how a served or exported model decodes: `neox-jax export`'s
`decode` signature, a server's step loop), with the weights stored as trained (float32) against
stored as the forward reads them (`model.inference_params`: matmul weights and embedding in the
compute dtype, LayerNorms float32).

In `neox-jax generate` the whole decode loop is one program, so XLA hoists the weights' cast out of
the loop; a program called once per token casts every float32 weight on every call instead: 4 bytes
read and 2 written per parameter before the step reads its 2.  The two weight sets give the same
logits: bit for bit on CPU; on an H200 up to 4.7e-3 apart at batch 1 (XLA fuses the float32 weights'
cast into another GEMV kernel).  The script prints the largest difference and stops above 5e-2.

    python bench/per_call_decode.py                   # CPU: pythia-70m shapes, bf16 compute, batch 1 and 8
    python bench/per_call_decode.py --gpu             # GPU: pythia-1.4b shapes
    python bench/per_call_decode.py --preset pythia-410m --batches 1 --steps 10 --json out.json

Prints ms per decode step (median of --steps calls, synchronised, after a warm-up call) for both
weight sets and their ratio, as a table and as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax import model as M
from neox_jax.config import load_config
from neox_jax.generate import extend, init_cache


def step_ms(step, params, cache, token, steps: int) -> tuple[float, np.ndarray]:
    logits, _ = step(params, cache, token)  # compile and warm up
    jax.block_until_ready(logits)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, _ = step(params, cache, token)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), np.asarray(logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="pythia-1.4b shapes (default: pythia-70m)")
    ap.add_argument("--preset", help="model shape preset (overrides --gpu's)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="compute dtype")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--cache", type=int, default=256, help="KV-cache slots (half of them filled)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    if args.gpu and jax.default_backend() != "gpu":
        sys.exit(f"--gpu: JAX runs on {jax.default_backend()!r}, not a GPU")
    preset = args.preset or ("pythia-1.4b" if args.gpu else "pythia-70m")
    cfg = load_config(preset).replace(compute_dtype=args.dtype, param_dtype="float32", attention="xla")
    params = M.init_params(cfg, seed=0)
    lean = M.inference_params(cfg, params)
    step = jax.jit(lambda p, c, t: extend(cfg, p, c, t, jnp.ones_like(t, bool)))
    rows = []
    print(f"{preset} ({cfg.num_params() / 1e6:.0f}M params), compute {args.dtype}, cache {args.cache} slots, "
          f"{jax.devices()[0].device_kind}")
    print(f"{'batch':>5} | {'float32 weights ms/step':>23} | {'inference_params ms/step':>24} | {'ratio':>5}")
    for b in map(int, args.batches.split(",")):
        cache = dataclasses.replace(init_cache(cfg, b, args.cache), index=jnp.int32(args.cache // 2),
                                    lengths=jnp.full((b,), args.cache // 2, jnp.int32))
        token = jnp.ones((b, 1), jnp.int32)
        t32, l32 = step_ms(step, params, cache, token, args.steps)
        tlean, llean = step_ms(step, lean, cache, token, args.steps)
        diff = float(np.max(np.abs(np.asarray(llean) - np.asarray(l32))))  # bit-equal on CPU; GPU GEMMs may differ
        assert diff < 5e-2, f"logits differ by {diff}"
        rows.append({"batch": b, "float32_ms": round(t32, 3), "inference_params_ms": round(tlean, 3),
                     "ratio": round(t32 / tlean, 3), "max_abs_logit_diff": diff})
        print(f"{b:>5} | {t32:>23.2f} | {tlean:>24.2f} | {t32 / tlean:>5.2f} (max |logit diff| {diff:.1e})")
    out = {"preset": preset, "compute_dtype": args.dtype, "cache": args.cache, "device": jax.devices()[0].device_kind,
           "rows": rows}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
