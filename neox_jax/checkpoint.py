"""The neox-jax checkpoint format: one directory, read by every command.

    CKPT/
      neox_jax.json   {"format": "neox-jax", "version": 1, "kind": "params", ...}
      config.json     the ModelConfig (neox_jax.config), as JSON
      params/         an Orbax PyTree checkpoint of the nested parameter dict (docs/params.md)

Training checkpoints (a later issue) are the same directory with more Orbax items beside
`params/` (optimizer state, data-loader state); a run directory holds numbered step directories,
and `resolve()` picks the newest complete one.  Writes go to a temporary sibling that is renamed
into place at the end, so an interrupted or failed write never leaves a half checkpoint at DST.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import ConfigError, ModelConfig, from_dict
from .errors import UserError
from .model import DTYPES, abstract_params, flatten, unflatten

log = logging.getLogger("neox_jax")

# Arrays are stored in chunks of at most this many bytes, one layer per chunk along the stacked
# `layers` axis, so one layer can be read or written alone (converters stream layer by layer).
CHUNK_BYTES = 16 * 2**20

FORMAT = "neox-jax"
VERSION = 1
MARKER = "neox_jax.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be read or written (the message names the file or tensor)."""


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

    return ocp


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A params checkpoint, or a training step directory (`neox_jax.train.checkpoints`), whose
    marker and config are Orbax JSON items: `neox_jax/neox_jax.json`, `config/config.json`."""
    return (Path(path) / MARKER).exists() or (Path(path) / "neox_jax" / MARKER).exists()


def _config_file(p: Path) -> Path:
    return p / "config.json" if (p / "config.json").exists() or not (p / "config").is_dir() \
        else p / "config" / "config.json"


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory (params or training step), or a directory whose newest complete
    numbered step is one (a training run directory keeps its steps under `checkpoints/`; an
    unfinished save is only a temporary `STEP.orbax-checkpoint-tmp-*` there)."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    for d in (p, p / "checkpoints"):
        if d.is_dir():
            steps = sorted((int(c.name), c) for c in d.iterdir() if c.name.isdigit() and is_checkpoint(c))
            if steps:
                return steps[-1][1]
    raise CheckpointError(f"{p}: not a neox-jax checkpoint (no {MARKER})")


def read_config(path: str | os.PathLike) -> ModelConfig:
    p = resolve(path)
    f = _config_file(p)
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({e.__class__.__name__})") from None
    return from_dict(raw, where=str(f))


def prepare_destination(dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty DST unless overwrite; return the temporary path to write into."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise CheckpointError(f"{dst}: exists and is not empty (pass --overwrite to replace it)")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_destination(tmp: Path, dst: str | os.PathLike) -> Path:
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(tmp, dst)
    return dst


def write_marker(directory: Path, cfg: ModelConfig, kind: str = "params", **extra) -> None:
    (directory / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "num_params": cfg.num_params(), **extra}
    (directory / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def save_params(dst: str | os.PathLike, cfg: ModelConfig, params: Any, *, overwrite: bool = False, **extra) -> Path:
    """Write a params checkpoint atomically.  `params` must match `abstract_params(cfg)` in shapes."""
    check_tree(cfg, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params), str(dst))
    tmp = prepare_destination(dst, overwrite)
    try:
        ckptr = _ocp().StandardCheckpointer()
        ckptr.save(tmp.resolve() / "params", params, save_args=save_args(params))
        ckptr.wait_until_finished()
        write_marker(tmp, cfg, **extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_destination(tmp, dst)


def save_args(params: Any) -> Any:
    """Orbax SaveArgs per tensor: CHUNK_BYTES chunks, split along the stacked layer axis first."""
    ocp = _ocp()
    return unflatten({
        name: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if name.startswith("layers/") else ())
        for name in flatten(params)
    })


def saved_tree(path: str | os.PathLike) -> dict[str, Any]:
    """Shapes and dtypes of the saved parameters as a nested dict of ShapeDtypeStruct."""
    p = resolve(path) / "params"
    try:
        md = _ocp().StandardCheckpointer().metadata(p.resolve())
    except Exception as e:  # orbax raises many types for a broken directory
        raise CheckpointError(f"{p}: unreadable Orbax metadata ({e.__class__.__name__}: {e})") from None
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), dict(tree),
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def check_tree(cfg: ModelConfig, tree: Any, where: str) -> None:
    """Raise CheckpointError naming the first tensor whose name or shape disagrees with cfg."""
    want = flatten(abstract_params(cfg))
    have = flatten(tree)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        raise CheckpointError(f"{where}: config expects tensor {missing[0]} {tuple(want[missing[0]].shape)}, not present")
    if extra:
        raise CheckpointError(f"{where}: tensor {extra[0]} is not part of the configured model")
    for name in want:
        if tuple(want[name].shape) != tuple(have[name].shape):
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(have[name].shape)}, config implies {tuple(want[name].shape)}"
            )


def load_params(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    shardings: Any | None = None,
) -> tuple[ModelConfig, dict]:
    """Restore (config, params).  dtype casts on restore; shardings (tree of NamedSharding) places
    each tensor directly on a mesh, which may differ from the one that saved it."""
    p = resolve(path)
    cfg = read_config(p)
    saved = saved_tree(p)
    check_tree(cfg, saved, str(p))
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)

    def target(sds, sharding=None):
        dt = DTYPES[dtype] if dtype else sds.dtype
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(sds.shape, dt, sharding=sharding)

    abstract = jax.tree.map(target, saved) if shardings is None else jax.tree.map(target, saved, shardings)
    try:
        params = _ocp().StandardCheckpointer().restore((p / "params").resolve(), abstract)
    except Exception as e:
        raise CheckpointError(f"{p / 'params'}: restore failed ({e.__class__.__name__}: {e})") from None
    return cfg, params


def cast_params(params: Any, dtype: str) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, DTYPES[dtype]), params)


__all__ = [
    "CheckpointError", "ConfigError", "resolve", "read_config", "save_params", "load_params",
    "saved_tree", "check_tree", "prepare_destination", "commit_destination", "write_marker",
    "is_checkpoint", "cast_params",
]
