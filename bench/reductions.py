"""The LayerNorm backward of one GPT-NeoX layer, alone, in a few formulations: which one XLA runs fastest.

Written when session two's largest non-GEMM kernel, `input_convert_multiply_reduce_fusion` (24 calls,
13 ms of a 304 ms step), was taken for the LayerNorm's parameter gradients.  Reading the compiled
GPU program (bench/gpu_aot.py, bench/throughput_notes.md) showed it is the MLP's GELU backward with
the fc_in bias gradient folded in (`model.bias_grad` is that lever); the LayerNorms' own column
reductions are standalone kernels that ran near bandwidth (0.05 ms each).  This script still measures
the LayerNorm backward's formulations, at the end of the GPU session's list.

Times, at pythia-1.4b's shapes (R = 8 x 2048 rows, D = 2048, bf16 activations, float32 statistics),
the backward of the two LayerNorms of a parallel block (they share their input x), each formulation
jitted alone:

    fused      `ops._layer_norm_bwd` twice (what the train step runs)
    two_stage  the parameter gradients summed over blocks of 128 rows first, then over the blocks
               (a [R/128, 128, D] reshape; XLA may merge the two reductions back into one)
    gemv       the parameter gradients as matrix-vector products: ones[R] @ (g * y) and ones[R] @ g in
               bf16 operands with float32 accumulation (cuBLAS instead of a reduction kernel; g * y is
               rounded to bf16 first, so these gradients carry bf16 rounding)
    gemv_f32   the same products with float32 operands (no extra rounding; twice the bytes of g * y)

Each is checked against a float64 NumPy re-derivation (relative error printed), then timed (median
of --iters calls after warm-up, each synchronised).  The floor is the bytes read and written once at
the device's bandwidth (for the reader: H200 about 4.8 TB/s).

    PYTHONPATH=. python3 bench/reductions.py --json out.json           # GPU: pythia-1.4b shapes
    JAX_PLATFORMS=cpu PYTHONPATH=. python bench/reductions.py --rows 1024 --dim 256 --iters 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.model import target_backend
from neox_jax.ops import _layer_norm_bwd

EPS = 1e-5


def fused(x, mean, rstd, p1, p2, g1, g2):
    keep = target_backend() == "gpu"  # the keep_stats `model.layer_norm` passes
    dx1, d1 = _layer_norm_bwd(EPS, jnp.bfloat16, keep, (x, mean, rstd, p1), g1)
    dx2, d2 = _layer_norm_bwd(EPS, jnp.bfloat16, keep, (x, mean, rstd, p2), g2)
    return dx1 + dx2, d1, d2


def _dx(x, mean, rstd, p, g):
    y = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    dy = g * p["scale"]
    dx = rstd * (dy - jnp.mean(dy, axis=-1, keepdims=True) - y * jnp.mean(dy * y, axis=-1, keepdims=True))
    return dx.astype(x.dtype), y, g


def two_stage(x, mean, rstd, p1, p2, g1, g2, block=128):
    out, grads = 0, []
    for p, g in ((p1, g1), (p2, g2)):
        dx, y, g32 = _dx(x, mean, rstd, p, g)
        R, D = y.shape
        part = lambda a: jnp.sum(a.reshape(R // block, block, D), axis=1)  # noqa: E731
        grads.append({"scale": jnp.sum(part(g32 * y), axis=0), "bias": jnp.sum(part(g32), axis=0)})
        out = out + dx
    return out, grads[0], grads[1]


def gemv(x, mean, rstd, p1, p2, g1, g2, dtype=jnp.bfloat16):
    out, grads = 0, []
    for p, g in ((p1, g1), (p2, g2)):
        dx, y, g32 = _dx(x, mean, rstd, p, g)
        ones = jnp.ones((y.shape[0],), dtype)
        dot = lambda a: jnp.dot(ones, a.astype(dtype), preferred_element_type=jnp.float32,  # noqa: E731
                                precision=jax.lax.Precision.HIGHEST)
        grads.append({"scale": dot(g32 * y), "bias": dot(g)})
        out = out + dx
    return out, grads[0], grads[1]


VARIANTS = {"fused": fused, "two_stage": two_stage, "gemv": gemv,
            "gemv_f32": lambda *a: gemv(*a, dtype=jnp.float32)}


def reference(x, mean, rstd, p1, p2, g1, g2):
    """float64 NumPy: the same gradients from the LayerNorm formula."""
    x, mean, rstd = (np.asarray(a, np.float64) for a in (x.astype(jnp.float32), mean, rstd))
    y = (x - mean) * rstd
    dx, grads = 0, []
    for p, g in ((p1, g1), (p2, g2)):
        g = np.asarray(g.astype(jnp.float32), np.float64)
        dy = g * np.asarray(p["scale"], np.float64)
        dx = dx + rstd * (dy - dy.mean(-1, keepdims=True) - y * (dy * y).mean(-1, keepdims=True))
        grads.append({"scale": (g * y).sum(0), "bias": g.sum(0)})
    return dx, grads[0], grads[1]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8 * 2048, help="batch x sequence (default 16384)")
    ap.add_argument("--dim", type=int, default=2048, help="hidden size (default 2048, pythia-1.4b)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    R, D = args.rows, args.dim
    ks = jax.random.split(jax.random.key(0), 6)
    x = (jax.random.normal(ks[0], (R, D)) * 2 + 0.5).astype(jnp.bfloat16)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), -1, keepdims=True) + EPS)
    p1, p2 = ({"scale": 1 + 0.1 * jax.random.normal(k, (D,)), "bias": jnp.zeros((D,))} for k in ks[1:3])
    g1, g2 = (jax.random.normal(k, (R, D)).astype(jnp.bfloat16) for k in ks[3:5])
    inputs = (x, mean, rstd, p1, p2, g1, g2)
    ref = reference(*inputs)
    moved = 4 * R * D * 2 + R * 8  # read x, g1, g2 and write dx (bf16); read mean and rstd (float32)
    print(f"LayerNorm backward x2 (shared input), R {R}, D {D}, on {jax.devices()[0].device_kind}; "
          f"bytes moved at least {moved / 1e6:.0f} MB")
    print(f"{'variant':>10} {'ms':>8} {'GB/s':>7}  rel err dx / d_scale / d_bias (vs float64)")
    rows = []
    for name, fn in VARIANTS.items():
        f = jax.jit(fn)
        out = jax.block_until_ready(f(*inputs))
        errs = [rel(out[0].astype(jnp.float32), ref[0])]
        errs += [max(rel(out[i][k], ref[i][k]) for i in (1, 2)) for k in ("scale", "bias")]
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*inputs))
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        rows.append({"variant": name, "ms": ms, "gb_s": moved / ms / 1e6, "rel_err": errs})
        print(f"{name:>10} {ms:8.3f} {moved / ms / 1e6:7.0f}  " + " / ".join(f"{e:.1e}" for e in errs), flush=True)
        assert all(e < 2e-2 for e in errs), (name, errs)  # bf16 operands: ~4e-3
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": R, "dim": D, "device": jax.devices()[0].device_kind, "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
