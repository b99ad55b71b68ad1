"""Which format a directory holds, and the reader or writer for a format: the one place that knows
every format (a new format adds a module and a branch here).

Detection (`detect_format`): a directory with `neox_jax.json` (or a run directory of numbered steps)
is ours ("orbax"); `config.json` + `*.safetensors` / `pytorch_model*.bin` is Hugging Face ("hf");
`latest` + `global_stepN/`, or a `global_stepN/` directory itself, with
`layer_XX-model_YY-model_states.pt` or `mp_rank_XX_model_states.pt` files is native GPT-NeoX ("neox").

The format modules are imported when a format is used (orbax and torch are slow to import), never
the other way round: no format module imports this one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import atomic
from ..errors import CheckpointError, UserError

FORMATS = ("orbax", "hf", "neox")

_STEP_DIR = re.compile(r"global_step(\d+)$")


def detect_format(path: str | os.PathLike) -> str:
    from ..checkpoint import PathNotUTF8, resolve

    p = Path(path)
    try:
        resolve(p)
        return "orbax"
    except PathNotUTF8:
        raise
    except CheckpointError:
        pass
    note = atomic.pending(p)  # a run directory moved aside by an interrupted `train --overwrite`, say
    if note:
        raise CheckpointError(note)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise CheckpointError(f"{p}: expected a checkpoint directory")
    if (p / "config.json").exists() and (
        any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")) or any(p.glob("*.index.json"))
    ):
        return "hf"
    if (p / "latest").exists() or _STEP_DIR.match(p.name) or any(_STEP_DIR.match(c.name) for c in p.iterdir()):
        return "neox"
    if (p / "config.json").exists():
        raise CheckpointError(f"{p}: has config.json but no model.safetensors / pytorch_model*.bin weights")
    raise CheckpointError(
        f"{p}: not a recognised checkpoint (expected neox_jax.json, an HF config.json + weights, "
        f"or a GPT-NeoX 'latest' + global_stepN/ directory)"
    )


def open_reader(path: str | os.PathLike, fmt: str | None = None, *, neox_config: list[str] | None = None):
    """The Reader (convert/formats.py) for the checkpoint at path; fmt None: detect it."""
    for f in neox_config or []:  # given for any format: a missing file is an error, never ignored
        if not Path(f).is_file():
            raise CheckpointError(f"{f}: --neox-config file not found")
    fmt = fmt or detect_format(path)
    if neox_config and fmt != "neox":  # it would be ignored
        raise CheckpointError(f"{path}: --neox-config is for GPT-NeoX checkpoints; this one is {fmt}")
    if fmt == "orbax":
        from .orbax_io import OrbaxReader

        return OrbaxReader(Path(path))
    if fmt == "hf":
        from .hf import HFReader

        return HFReader(Path(path))
    if fmt == "neox":
        from .neox import NeoxReader

        return NeoxReader(Path(path), config_files=neox_config)
    raise CheckpointError(f"unknown format {fmt!r}")


def make_writer(fmt: str, tmp: Path, reader, entries: list, *, dst: Path, tp: int, max_shard_size: int,
                step: int | None, neox_names: str = "current"):
    """The Writer for fmt, writing `entries` (from `reader`) into the temporary directory tmp."""
    cfg = reader.config
    if fmt == "orbax":
        from .orbax_io import OrbaxWriter

        return OrbaxWriter(tmp, cfg, entries, extras=reader.extras,
                           source={"format": reader.fmt, "path": str(Path(reader.path).resolve())})
    if fmt == "hf":
        from .hf import HFWriter

        return HFWriter(tmp, cfg, entries, max_shard_size=max_shard_size, extras=reader.extras)
    if fmt == "neox":
        from .neox import NeoxWriter

        st = step if step is not None else int(reader.extras.get("step", 0))
        return NeoxWriter(tmp, cfg, entries, tp=tp, step=st, final_dst=dst, extras=reader.extras, names=neox_names)
    raise UserError(f"--to {fmt!r}: expected one of {FORMATS}")
