"""Attention backends side by side: logits agreement and forward time, xla vs cudnn.

On a GPU: pythia-1.4b shapes in bf16 (default batch 4, seq 2048), both backends; prints max
|Δlogit| between them and the median forward time of each.  On CPU only `xla` exists, and asking
for cudnn is an error by design, so the script runs the xla backend alone on a small shape.

    python bench/attention_backends.py [--preset pythia-1.4b] [--batch 4] [--seq 2048] [--iters 10]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax import model as M
from neox_jax.config import load_config


def timed_forward(cfg, params, tokens, iters):
    fn = jax.jit(lambda p, t: M.forward(cfg, p, t))
    out = fn(params, tokens).block_until_ready()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(params, tokens).block_until_ready()
        times.append(time.perf_counter() - t0)
    return np.asarray(out, np.float32), statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pythia-1.4b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    cfg = load_config(args.preset).replace(compute_dtype="bfloat16", remat="none")
    if not on_gpu:
        cfg = cfg.replace(num_layers=2, hidden_size=256, num_heads=4, intermediate_size=1024)
        args.seq, args.batch = min(args.seq, 256), min(args.batch, 2)
    params = M.init_params(cfg, 0)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50277, (args.batch, args.seq)), jnp.int32)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.preset} "
          f"(L={cfg.num_layers}), batch {args.batch}, seq {args.seq}, bf16")
    results = {}
    for backend in (["xla", "cudnn"] if on_gpu else ["xla"]):
        out, t = timed_forward(cfg.replace(attention=backend), params, tokens, args.iters)
        results[backend] = out
        toks = args.batch * args.seq
        print(f"  {backend:>5}: forward {t * 1e3:8.2f} ms  ({toks / t:,.0f} tokens/s)")
    if "cudnn" in results:
        diff = np.max(np.abs(results["cudnn"] - results["xla"]))
        print(f"  max |logit(cudnn) - logit(xla)| = {diff:.3e} (max |logit| {np.max(np.abs(results['xla'])):.2f})")


if __name__ == "__main__":
    main()
