"""Compile time of the forward (and forward+backward) for pythia-1.4b shapes at several depths.

With `scan_layers` the compiled program holds one layer body, so compile time should barely move
from 4 to 24 layers; the unrolled variant is shown for contrast.  Nothing is allocated: parameters
are abstract (ShapeDtypeStruct), only lowering and XLA compilation are timed.

    python bench/compile_time.py [--preset pythia-1.4b] [--layers 4 24] [--seq 2048] [--batch 1]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from neox_jax import model as M
from neox_jax.config import load_config


def compile_seconds(cfg, batch, seq, grad):
    params = M.abstract_params(cfg)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    if grad:
        fn = jax.jit(jax.grad(lambda p, t: -jnp.mean(M.token_logprobs(cfg, p, t))))
    else:
        fn = jax.jit(lambda p, t: M.forward(cfg, p, t))
    t0 = time.perf_counter()
    fn.lower(params, tokens).compile()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pythia-1.4b")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 24])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-unrolled", action="store_true")
    args = ap.parse_args()
    base = load_config(args.preset)
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, {args.preset} shapes, batch {args.batch}, seq {args.seq}")
    print(f"{'layers':>6} {'mode':>9} {'forward s':>10} {'fwd+bwd s':>10}")
    for L in args.layers:
        for scan in ([True] if args.no_unrolled else [True, False]):
            cfg = base.replace(num_layers=L, scan_layers=scan)
            f = compile_seconds(cfg, args.batch, args.seq, grad=False)
            g = compile_seconds(cfg, args.batch, args.seq, grad=True)
            print(f"{L:>6} {'scan' if scan else 'unrolled':>9} {f:>10.2f} {g:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
