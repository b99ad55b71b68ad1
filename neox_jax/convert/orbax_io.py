"""Streaming into and out of our Orbax checkpoint (`neox_jax.json` + `config.json` + `params/`).

Why not `StandardCheckpointer.save`: it needs every array whole in memory, and our layers are
stacked (`layers/mlp/fc_in/kernel` is [L, D, F], 13 GB in bf16 at 20B).  What is written instead:

1. Orbax itself saves a *placeholder* tree: the real tree structure, every leaf a numpy array of
   the right dtype and rank but size 1.  This produces everything Orbax owns (`_METADATA`,
   `_CHECKPOINT_METADATA`, the OCDBT manifest, `commit_success.txt`) with the version of Orbax
   that is installed, and records each leaf as an `np.ndarray` leaf, whose metadata carries no
   shape (shapes live in each array's zarr `.zarray`).
2. Each leaf's array is then re-created, in place, inside the same OCDBT key-value store with
   tensorstore: the placeholder's own `.zarray` (compressor, dtype spelling, fill value) is reused
   with the real shape and a chunk grid of one layer per chunk along the stacked axis, split
   further so that a chunk stays under 16 MiB (which also lets tensorstore compress one slice on
   several cores).  The data are written slice by slice as they stream in: `store[layer] = slice`,
   at most MAX_IN_FLIGHT slices being compressed while the next is read.  Writes skip per-write
   fsync; the converter fsyncs the whole directory once before publishing it.
3. `checksums.json` (CRC-32 of each slice, computed while tensorstore compresses the slice in its
   own threads; checksums.py),
   `neox_jax.json` and `config.json` are written last, then the temporary directory is published.

The result is exactly what Orbax would have written for numpy leaves apart from the chunk grid, so
`checkpoint.load_params` (plain `StandardCheckpointer().restore`, any sharding) and
`checkpoint.saved_tree` read it unchanged; tests restore it through them and compare bit for bit.
Checked with orbax-checkpoint 0.12.8 (here) and 0.12.4 (the GPU machine's version), both ways:
written by one version, restored by the other, and the whole convert test suite run under 0.12.4.

Reading is per slice too: `store[layer].read()`, each slice checked against `checksums.json`.  `checkpoint.save_params` (used by `init` and
meant for the trainer) asks Orbax for the same one-layer chunks.  An Orbax checkpoint written
otherwise may have one chunk per array shard, often the whole stacked tensor; a slice of such a
chunk cannot be decoded alone, so the reader then reads the whole leaf once and hands out its
slices (peak memory: the largest stacked tensor, documented in docs/convert.md).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import checksums
from ..atomic import HeldSignals
from ..checkpoint import CHUNK_BYTES, check_tree, orbax_save, read_config, read_marker, resolve, saved_tree, write_marker
from ..config import FLOAT_DTYPES, ModelConfig
from ..errors import CheckpointError, reading
from ..tree import flatten, unflatten
from .formats import Entry, NativeTensor, Reader, Writer, check_slice
from .mapping import leaf_shapes, our_entries, to_torch


# CHUNK_BYTES (from checkpoint.py): several chunks per big slice, compressed in parallel
MAX_IN_FLIGHT = 2  # slices being compressed/written while the next one is read


def _ts():
    import tensorstore as ts

    return ts


def chunk_shape(shape: tuple[int, ...], stacked: bool, itemsize: int) -> list[int]:
    """One layer per chunk along a stacked axis; halve the next axes until a chunk <= CHUNK_BYTES."""
    chunk = list(shape)
    if stacked:
        chunk[0] = 1
    first = 1 if stacked else 0
    ax = first
    while math.prod(chunk) * itemsize > CHUNK_BYTES and ax < len(chunk):
        if chunk[ax] > 1:
            chunk[ax] = -(-chunk[ax] // 2)
        else:
            ax += 1
    return chunk


class _Store:
    """The tensorstore key-value store of one `params/` directory and how its arrays are named."""

    def __init__(self, params_dir: Path):
        self.dir = params_dir
        try:
            meta = json.loads((params_dir / "_METADATA").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{params_dir / '_METADATA'}: unreadable ({e.__class__.__name__})") from None
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        self.driver = "zarr3" if self.use_zarr3 else "zarr"
        self.meta_file = "zarr.json" if self.use_zarr3 else ".zarray"
        self.context = _ts().Context({"file_io_sync": False})  # one sync at the end (atomic.sync_tree)
        base = params_dir.resolve().as_posix()
        if self.use_ocdbt:
            self.kv = {"driver": "ocdbt", "base": f"file://{base}/"}
        else:
            self.kv = {"driver": "file", "path": f"{base}/"}

    def key(self, name: str) -> str:
        return ".".join(name.split("/"))  # orbax's param name: the key path joined with '.'

    def spec(self, name: str) -> dict:
        return {"driver": self.driver, "kvstore": dict(self.kv, path=self.key(name) + "/")}

    def read_meta(self, name: str) -> dict:
        kv = _ts().KvStore.open(self.kv, context=self.context).result()
        r = kv.read(f"{self.key(name)}/{self.meta_file}").result()
        if r.state != "value":
            raise CheckpointError(f"{self.dir}: no array {self.key(name)} (unexpected Orbax layout)")
        return json.loads(r.value)

    def open(self, name: str):
        try:
            return _ts().open(self.spec(name), open=True, context=self.context).result()
        except Exception as e:  # tensorstore raises ValueError with long messages
            raise CheckpointError(f"{self.dir}: cannot open tensor {name} ({str(e).splitlines()[0][:200]})") from None


# ----------------------------------------------------------------------------- writer


class OrbaxWriter(Writer):
    fmt = "orbax"

    def __init__(self, tmp: Path, cfg: ModelConfig, entries: list[Entry], *, extras: dict | None = None,
                 source: dict | None = None):
        import orbax.checkpoint as ocp

        self.tmp, self.cfg = tmp, cfg
        self.extras = extras or {}
        self.source = source or {}
        self.leaves = leaf_shapes(entries, cfg)
        placeholder = unflatten({n: np.zeros((1,) * len(s), dt) for n, (s, dt) in self.leaves.items()})
        params_dir = (tmp / "params").resolve()
        ckptr = ocp.StandardCheckpointer()
        orbax_save(ckptr, params_dir, placeholder)
        ckptr.close()
        self.store = _Store(params_dir)
        if self.store.use_zarr3:
            raise CheckpointError("this Orbax version writes zarr3 arrays; streaming writes support zarr v2 only")
        self.arrays: dict[str, Any] = {}
        stacked = {e.name for e in entries if e.layer is not None}
        for name, (shape, dt) in self.leaves.items():
            meta = self.store.read_meta(name)
            meta["shape"] = list(shape)
            meta["chunks"] = chunk_shape(shape, name in stacked, dt.itemsize)
            spec = dict(self.store.spec(name), metadata=meta)
            self.arrays[name] = _ts().open(spec, create=True, delete_existing=True,
                                           context=self.store.context).result()
            if self.arrays[name].dtype.numpy_dtype != dt:
                raise CheckpointError(f"orbax writer: {name} opened as {self.arrays[name].dtype}, expected {dt}")
        self.pending = {(e.name, e.layer) for e in entries}
        self.inflight: list = []
        self.digests: dict[tuple[str, int | None], str] = {}

    def write(self, entry: Entry, array: np.ndarray) -> None:
        shape, dt = self.leaves[entry.name]
        array = np.ascontiguousarray(array.astype(dt, copy=False))
        t = self.arrays[entry.name]
        target = t if entry.layer is None else t[entry.layer]
        self.inflight.append((target.write(array, can_reference_source_data_indefinitely=True), array))
        self.digests[(entry.name, entry.layer)] = checksums.digest(array)  # zlib: GIL released
        while len(self.inflight) > MAX_IN_FLIGHT:
            self.inflight[0][0].result()  # then dropped: an interrupt while waiting keeps it for abort()
            self.inflight.pop(0)
        self.pending.discard((entry.name, entry.layer))

    def abort(self) -> None:
        """Let in-flight slice writes end before the caller deletes the temporary directory
        (a write still running would recreate files inside it)."""
        with HeldSignals():  # a second Ctrl-C waits too: deleting under a running write leaves debris
            while self.inflight:
                try:
                    self.inflight[0][0].result()
                except Exception:  # the conversion is failing anyway; its own error is reported
                    pass
                self.inflight.pop(0)
        self.arrays.clear()

    def finish(self) -> None:
        while self.inflight:
            self.inflight.pop(0)[0].result()
        if self.pending:
            first = sorted(self.pending, key=str)[0]
            raise CheckpointError(f"orbax writer: {len(self.pending)} tensors never arrived (first: {first})")
        self.arrays.clear()
        digests: checksums.Digests = {}
        for (name, layer), d in sorted(self.digests.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            if layer is None:
                digests[name] = d
            else:
                digests.setdefault(name, []).append(d)
        checksums.write(self.tmp, digests)
        dts = {dt.name for _, dt in self.leaves.values()}
        cfg = self.cfg
        if len(dts) == 1 and next(iter(dts)) in FLOAT_DTYPES:
            cfg = cfg.replace(param_dtype=next(iter(dts)))
        tok = self.extras.get("tokenizer_files") or {}
        if tok:
            (self.tmp / "tokenizer").mkdir()
            for name, f in tok.items():
                shutil.copy2(f, self.tmp / "tokenizer" / name)
        extra: dict[str, Any] = {"converted_from": self.source}
        if self.extras.get("hf_token_ids"):
            extra["hf_token_ids"] = self.extras["hf_token_ids"]
        if self.extras.get("step"):  # a GPT-NeoX global_stepN or a training step: back to NeoX as that step
            extra["step"] = int(self.extras["step"])
        write_marker(self.tmp, cfg, **extra)


# ----------------------------------------------------------------------------- reader


class OrbaxReader(Reader):
    fmt = "orbax"

    def __init__(self, path: Path):
        root = resolve(path)
        super().__init__(root)
        self.config = read_config(root)
        saved = saved_tree(root)
        check_tree(self.config, saved, str(root))
        self.saved = flatten(saved)
        self.store = _Store(root / "params")
        self.arrays = {name: self.store.open(name) for name in self.saved}
        for name, t in self.arrays.items():
            if tuple(t.shape) != tuple(self.saved[name].shape):
                raise CheckpointError(f"{root}: tensor {name} has shape {tuple(t.shape)}, metadata says "
                                      f"{tuple(self.saved[name].shape)}")
        # stacked leaves chunked one layer at a time can be read per layer; others are read whole once
        self.per_layer = {}
        for name, t in self.arrays.items():
            chunks = t.chunk_layout.read_chunk.shape
            self.per_layer[name] = chunks is not None and chunks[0] == 1
        self._cache: tuple[str, np.ndarray] | None = None
        self.digests = checksums.read(root)  # None: written before checksums existed, nothing to check
        marker = read_marker(root)  # a training step keeps it as neox_jax/neox_jax.json
        self.extras["hf_token_ids"] = marker.get("hf_token_ids") or {}
        if isinstance(marker.get("step"), int) and not isinstance(marker["step"], bool):
            self.extras["step"] = marker["step"]  # `convert --to neox` writes global_stepN of it
        tok_dir = root / "tokenizer"
        self.extras["tokenizer_files"] = {f.name: str(f) for f in sorted(tok_dir.iterdir())} if tok_dir.is_dir() else {}
        self.marker = marker

    def entries(self) -> list[Entry]:
        base = our_entries(self.config)
        out = []
        for e in base:
            dt = self.arrays[e.name].dtype.numpy_dtype
            out.append(e.with_dtype(dt))
        if all(self.per_layer[e.name] for e in out if e.layer is not None):
            return out  # layer-major, one slice in memory
        # tensor-major for leaves that must be read whole: all slices of one leaf together
        order = {name: i for i, name in enumerate(dict.fromkeys(e.name for e in out))}
        return sorted(out, key=lambda e: (order[e.name], e.layer if e.layer is not None else -1))

    def read(self, entry: Entry) -> np.ndarray:
        with reading(self.path / "params", f"cannot read tensor {entry.label}"):
            return self._read(entry)

    def _read(self, entry: Entry) -> np.ndarray:
        t = self.arrays[entry.name]
        if entry.layer is None:
            out = self._fetch(t, entry.label)
        elif self.per_layer[entry.name]:
            out = self._fetch(t[entry.layer], entry.label)
        else:
            if self._cache is None or self._cache[0] != entry.name:
                self._cache = None
                self._cache = (entry.name, self._fetch(t, entry.name))
            out = self._cache[1][entry.layer]
            if entry.layer == t.shape[0] - 1:
                out = out.copy()
                self._cache = None
        out = np.asarray(out)
        check_slice(entry, out, str(self.path))
        return self._checked(entry.name, entry.layer, out)

    def read_torch(self, entry: Entry) -> np.ndarray:
        return to_torch(entry.name, self.read(entry), self.config)

    def native_tensors(self) -> Iterator[NativeTensor]:
        for name in sorted(self.arrays):
            t = self.arrays[name]

            def load(t=t, name=name):
                if self.per_layer[name] and t.ndim > 0:
                    return (self._checked(name, i, self._fetch(t[i], f"{name}[{i}]")) for i in range(t.shape[0]))
                whole = self._fetch(t, name)
                if checksums.stacked(name):
                    for i in range(whole.shape[0]):
                        self._checked(name, i, whole[i])
                    return whole
                return self._checked(name, None, whole)

            yield name, tuple(t.shape), t.dtype.numpy_dtype, load

    def _fetch(self, t, label: str) -> np.ndarray:
        """Read a tensorstore array (or slice); a damaged or missing file is a CheckpointError."""
        try:
            return np.asarray(t.read().result())
        except Exception as e:  # tensorstore raises ValueError with the whole spec in the message
            raise CheckpointError(f"{self.path}: tensor {label} is unreadable "
                                  f"({str(e).splitlines()[0][:200]})") from None

    def _checked(self, name: str, layer: int | None, a: np.ndarray) -> np.ndarray:
        if self.digests is not None:
            checksums.check(self.digests, name, layer, a, str(self.path))
        return a

    def close(self) -> None:
        self.arrays.clear()
        self._cache = None
