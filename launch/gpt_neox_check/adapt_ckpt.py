"""Helpers for check_gpt_neox.sh that touch checkpoint files (run in the GPT-NeoX venv).

  fixyaml SRC_DIR DST_DIR [--save-freqs]
                   copy GPT-NeoX YAML files, writing a float rotary-emb-base that is a whole number as
                   an int (GPT-NeoX's NeoXArgs.validate_types declares it int and crashes on a float);
                   --save-freqs adds rotary-save-freqs-buffer: true (inv_freq then a persistent buffer).
  yamltypes YML... list values whose type GPT-NeoX's NeoXArgs would refuse (exit 1 if any)
  keys DIR         print the keys of every layer_*/mp_rank_* file (for the log)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml


def fixyaml(src: str, dst: str, save_freqs: bool = False) -> None:
    Path(dst).mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).glob("*.yml")):
        d = yaml.safe_load(f.read_text())
        for k in ("rotary-emb-base", "rotary_emb_base"):
            if isinstance(d.get(k), float) and d[k].is_integer():
                d[k] = int(d[k])
        if save_freqs:  # GPT-NeoX's switch that makes attention.rotary_emb.inv_freq a persistent buffer
            d["rotary-save-freqs-buffer"] = True
        (Path(dst) / f.name).write_text(yaml.safe_dump(d, sort_keys=False))


def yamltypes(paths: list[str]) -> int:
    from typing import Literal, Union, get_args, get_origin

    from megatron.neox_arguments import NeoXArgs

    fields = NeoXArgs.__dataclass_fields__
    bad = 0
    for p in paths:
        for k, v in yaml.safe_load(Path(p).read_text()).items():
            k2 = k.replace("-", "_")
            if k2 not in fields:
                print(f"{p}: {k}: not a GPT-NeoX argument")
                bad += 1
                continue
            t = fields[k2].type
            if v is None or type(v) == t or (type(v) == int and t == float):
                continue
            if get_origin(t) == Literal and (v in get_args(t) or (isinstance(v, str) and v.lower() in
                                                                  [a.lower() for a in get_args(t) if isinstance(a, str)])):
                continue
            if get_origin(t) == Union and type(v) in get_args(t):
                continue
            print(f"{p}: {k}: {v!r} ({type(v).__name__}) where GPT-NeoX declares {t}")
            bad += 1
    return 1 if bad else 0


def keys(d: str) -> None:
    for f in sorted(Path(d).glob("global_step*/*.pt")):
        sd = torch.load(f, weights_only=False)
        if f.name.startswith("layer_"):
            print(f.name, {k: tuple(v.shape) for k, v in sd.items()})
        else:
            print(f.name, sorted(sd.keys()))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "fixyaml":
        fixyaml(args[0], args[1], "--save-freqs" in args[2:])
    elif cmd == "yamltypes":
        sys.exit(yamltypes(args))
    elif cmd == "keys":
        keys(*args)
    else:
        sys.exit(f"unknown command {cmd}")
