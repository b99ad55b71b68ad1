"""`convert`, `inspect` and `diff` commands (weight conversion issue; docs/convert.md)."""

from __future__ import annotations

import sys

from ..config import FLOAT_DTYPES
from ..errors import UserError
from .dispatch import FORMATS


def register(sub) -> None:
    """Add the conversion commands to the `neox-jax` parser."""
    p = sub.add_parser(
        "convert", help="convert weights between HF, native GPT-NeoX and neox-jax (Orbax) checkpoints",
        description="Convert a checkpoint, one tensor at a time. SRC's format is detected: an HF directory "
                    "(config.json + safetensors or pytorch_model*.bin), a GPT-NeoX save directory ('latest' + "
                    "global_stepN/, pipeline or sequential layout, any tensor-parallel degree; config from "
                    "global_stepN/configs/*.yml), or a neox-jax checkpoint. DST must not exist or be empty "
                    "(or pass --overwrite); it is written atomically.")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="directory to create")
    p.add_argument("--to", choices=FORMATS, default="orbax", help="target format (default: orbax)")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, help="cast every tensor (default: keep the source dtypes)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks for --to neox (default 1)")
    p.add_argument("--verify", action="store_true",
                   help="run transformers (PyTorch) and our JAX model on a fixed batch; fail (DST not written) "
                        "if max |dlogit| exceeds the tolerance")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    p.add_argument("--max-shard-size", help="--to hf: split safetensors above this size (default 5GB)")
    p.add_argument("--neox-config", action="append", metavar="YML",
                   help="GPT-NeoX YAML for a native SRC without global_stepN/configs/ (repeatable, merged in order)")
    p.add_argument("--step", type=int, help="--to neox: the global_stepN tag (default: the source's step, or 0)")
    p.add_argument("--neox-names", choices=("current", "legacy"), default="current",
                   help="--to neox: layer files for GPT-NeoX since Sep 2024 (current: mlp.linear1/linear2, no "
                        "rotary inv_freq) or for v1.0/v2.0, which trained Pythia and 20B (legacy: "
                        "mlp.dense_h_to_4h/dense_4h_to_h, inv_freq kept); default current"),
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_run_convert)

    p = sub.add_parser(
        "inspect", help="config, parameter count and per-tensor shape/dtype/norm/sha256 of a checkpoint",
        description="Describe a checkpoint of any of the three formats: config summary, parameter count, and "
                    "for every stored tensor its name, shape, dtype, L2 norm and the sha256 of its bytes.")
    p.add_argument("ckpt", help="checkpoint directory (HF, GPT-NeoX or neox-jax)")
    p.add_argument("--json", action="store_true", help="machine-readable output (full sha256)")
    p.add_argument("--no-hash", action="store_true", help="skip sha256 (faster on big checkpoints)")
    p.add_argument("--neox-config", action="append", metavar="YML", help="GPT-NeoX YAML (native checkpoints)")
    p.set_defaults(run=_run_inspect)

    p = sub.add_parser(
        "diff", help="compare two checkpoints tensor by tensor (any formats)",
        description="Map both checkpoints to neox-jax names and layout and print, per tensor, the relative L2 "
                    "difference, max |A-B| and whether they are identical. Exit status 0 if every tensor is "
                    "identical/equal or within --rtol, 1 if not, 2 on unreadable input.")
    p.add_argument("a", help="first checkpoint directory (HF, GPT-NeoX or neox-jax)")
    p.add_argument("b", help="second checkpoint directory (any of the three formats)")
    p.add_argument("--rtol", type=float, default=0.0,
                   help="relative L2 difference ||A-B||/||A|| counted as a match (default 0: exact values)")
    p.add_argument("--per-layer", action="store_true", help="also one row per layer of stacked tensors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--neox-config-a", action="append", metavar="YML", help="GPT-NeoX YAML for a native A (repeatable)")
    p.add_argument("--neox-config-b", action="append", metavar="YML", help="GPT-NeoX YAML for a native B (repeatable)")
    p.set_defaults(run=_run_diff)


def _run_convert(args):
    from .inspect import to_json
    from .stream import convert, summary_table

    if args.max_shard_size is not None and args.to != "hf":  # it would be ignored
        raise UserError(f"--max-shard-size applies to --to hf only (not --to {args.to})")
    if "--tp" in args.typed and args.to != "neox":  # even --tp 1: HF and Orbax checkpoints have no TP degree
        raise UserError(f"--tp {args.tp}: applies to --to neox only (not --to {args.to})")
    if "--neox-names" in args.typed and args.to != "neox":
        raise UserError(f"--neox-names {args.neox_names}: applies to --to neox only (not --to {args.to})")
    res = convert(args.src, args.dst, to=args.to, dtype=args.dtype, tp=args.tp, verify=args.verify,
                  overwrite=args.overwrite, max_shard_size=args.max_shard_size or "5GB",
                  neox_config=args.neox_config, step=args.step, neox_names=args.neox_names)
    if args.json:
        print(to_json({"dst": str(res.dst), "from": res.src_format, "to": res.dst_format, "rows": res.rows,
                       "seconds": res.seconds, "verify": res.verify}))
    else:
        print(summary_table(res))


def _run_inspect(args):
    from .inspect import format_inspect, inspect_checkpoint, to_json

    info = inspect_checkpoint(args.ckpt, hashes=not args.no_hash, neox_config=args.neox_config)
    print(to_json(info) if args.json else format_inspect(info))


def _run_diff(args):
    from .inspect import diff_checkpoints, format_diff, to_json

    res = diff_checkpoints(args.a, args.b, rtol=args.rtol, per_layer=args.per_layer,
                           neox_config_a=args.neox_config_a, neox_config_b=args.neox_config_b)
    print(to_json(res) if args.json else format_diff(res))
    sys.stdout.flush()
    if not res["match"]:
        raise SystemExit(1)
