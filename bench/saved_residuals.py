"""What each remat policy keeps for the backward pass, counted from the traced program (no compile,
no allocation, no GPU): the residuals `jax.ad_checkpoint.print_saved_residuals` lists for the layer
stack of a model, summed in bytes.

cuDNN attention cannot be traced on a machine without a GPU (JAX asks the driver for its cuDNN
version first), so by default the version checks are answered here, for tracing only: the program is
never lowered or run.  That makes the cuDNN path's residuals (attention output and softmax
statistics, instead of XLA attention's float32 [B, N, S, S] scores) countable on a CPU.

    PYTHONPATH=. python bench/saved_residuals.py --model pythia-1.4b --micro-batch 8 --seq 2048 \
        --remat none dots dots_attn save_proj full

Limits: the LM head's cross-entropy chunks are rematerialised separately and not counted; XLA may
keep fewer bytes (it can drop a residual it can recompute cheaply) or more (scheduling); the number
is what autodiff asks to keep, the part of a step's peak memory that the remat policy controls.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import numpy as np

_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "bool": 1}


def trace_cudnn_without_gpu() -> None:
    import jax
    import jax._src.cudnn.fused_attention_stablehlo as fa

    fa.check_cudnn_version = lambda *a, **k: 91000
    fa.check_is_flash_attention = lambda *a, **k: None
    fa.check_compute_capability = lambda *a, **k: True
    jax.default_backend = lambda: "gpu"


def saved_bytes(model: str, remat: str, attention: str, micro_batch: int, seq: int) -> tuple[int, list[str]]:
    import jax
    import jax.numpy as jnp
    from jax.ad_checkpoint import print_saved_residuals

    from neox_jax import model as M
    from neox_jax.config import load_config

    cfg = load_config(model, [f"remat={remat}", f"attention={attention}", "compute_dtype=bfloat16",
                              f"max_position_embeddings={max(seq, 2048)}"])
    params = jax.eval_shape(lambda: M.init_params(cfg))
    tokens = jnp.zeros((micro_batch, seq), jnp.int32)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda p: M.hidden_states(cfg, p, tokens).astype(jnp.float32).sum(), params)
    total, lines = 0, []
    for line in out.getvalue().splitlines():
        if "from the argument" in line:  # the parameters themselves: held anyway
            continue
        m = re.match(r"(\w+)\[([\d,]*)\]", line)
        total += _BYTES[m.group(1)] * int(np.prod([int(x) for x in m.group(2).split(",") if x]))
        lines.append(line)
    return total, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pythia-1.4b")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--attention", choices=("cudnn", "xla"), default="cudnn")
    ap.add_argument("--remat", nargs="+", default=["none", "dots", "dots_attn", "save_proj", "full"])
    ap.add_argument("--verbose", action="store_true", help="list every residual")
    args = ap.parse_args()
    import jax

    if args.attention == "cudnn" and jax.default_backend() != "gpu":
        trace_cudnn_without_gpu()
    print(f"{args.model}, micro-batch {args.micro_batch} x seq {args.seq}, bf16 compute, {args.attention} attention")
    for remat in args.remat:
        if remat == "dots_attn" and args.attention != "cudnn":
            print(f"  {remat:<10} (needs cudnn attention)")
            continue
        total, lines = saved_bytes(args.model, remat, args.attention, args.micro_batch, args.seq)
        print(f"  {remat:<10} {total / 2**30:8.2f} GiB saved for the backward pass ({len(lines)} residual arrays)")
        if args.verbose:
            print("\n".join("      " + ln for ln in lines))


if __name__ == "__main__":
    main()
