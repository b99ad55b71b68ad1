"""Per-tensor checksums of a neox-jax checkpoint: `CKPT/checksums.json`.

    {"algorithm": "crc32", "tensors": {"embed_in/embedding": "1c291ca3",
                                       "layers/attn/qkv/kernel": ["0b9f...", ...one per layer], ...}}

Each digest is the CRC-32 (zlib's, as in gzip and PNG) of the tensor's bytes as stored: C order,
little-endian, the stored dtype.  Stacked leaves (`layers/...`, leading axis = layer) get one
digest per layer, so a reader that streams one layer at a time can check each slice, and an error
names the layer.  Orbax guards only its own index (zarr3's crc32c covers the shard index, not the
data, and Orbax offers no setting for data checksums), so a flipped bit inside an array file
otherwise decodes to wrong numbers without any error.

Written by `checkpoint.save_params` and the streaming converter (convert/orbax_io.py).  Checked by
the converter's reader on every slice it reads (`convert`, `inspect`, `diff`), and by
`checkpoint.load_params(verify=True)` (`score --verify`).  A checkpoint without the file (written
before it existed) reads as before; asking to verify it is an error.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import CheckpointError

FILE = "checksums.json"
ALGORITHM = "crc32"

Digests = dict[str, Any]  # flat name -> hex digest, or a list of them (one per layer)


def digest(a: np.ndarray) -> str:
    """CRC-32 of the array's bytes (C order, little-endian) as 8 hex digits."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return f"{zlib.crc32(a.reshape(-1).view(np.uint8)):08x}"  # zlib releases the GIL: threads help


def stacked(name: str) -> bool:
    return name.startswith("layers/")


def _workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def tree_digests(flat: Mapping[str, np.ndarray]) -> Digests:
    """Digests of a flat {name: host array} tree (one per layer for stacked leaves), hashed in threads."""
    jobs = []
    for name, a in flat.items():
        a = np.asarray(a)
        jobs += [(name, i, a[i]) for i in range(a.shape[0])] if stacked(name) else [(name, None, a)]
    with ThreadPoolExecutor(_workers()) as ex:
        sums = list(ex.map(lambda job: digest(job[2]), jobs))
    out: Digests = {}
    for (name, layer, _), s in zip(jobs, sums):
        if layer is None:
            out[name] = s
        else:
            out.setdefault(name, []).append(s)
    return out


def _on_host(x) -> bool:
    devices = getattr(x, "devices", None)
    return devices is None or all(d.platform == "cpu" for d in devices())


def write(directory: Path, digests: Digests) -> None:
    (Path(directory) / FILE).write_text(
        json.dumps({"algorithm": ALGORITHM, "tensors": dict(sorted(digests.items()))}, indent=1) + "\n")


def read(directory: Path) -> Digests | None:
    """The stored digests, or None when the checkpoint has no checksums file."""
    path = Path(directory) / FILE
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(obj, dict) or obj.get("algorithm") != ALGORITHM or not isinstance(obj.get("tensors"), dict):
        raise CheckpointError(f"{path}: expected {{\"algorithm\": \"{ALGORITHM}\", \"tensors\": {{...}}}}")
    return obj["tensors"]


def expected(digests: Digests, name: str, layer: int | None, where: str) -> str:
    want = digests.get(name)
    if want is None:
        raise CheckpointError(f"{where}: {FILE} has no checksum for tensor {name}")
    if layer is not None:
        if not isinstance(want, list) or layer >= len(want):
            raise CheckpointError(f"{where}: {FILE} has no checksum for tensor {name}[{layer}]")
        want = want[layer]
    return want


def check(digests: Digests, name: str, layer: int | None, array: np.ndarray, where: str) -> None:
    """Raise CheckpointError naming the tensor (and layer) whose bytes do not match."""
    want = expected(digests, name, layer, where)
    got = digest(array)
    if got != want:
        label = name if layer is None else f"{name}[{layer}]"
        raise CheckpointError(f"{where}: tensor {label} is damaged: its bytes have {ALGORITHM} {got}, "
                              f"{FILE} says {want}")


def check_tree(digests: Digests, flat: Mapping[str, Any], where: str) -> None:
    """Check every tensor of a flat tree of numpy or (fully addressable) jax arrays, in threads, one
    layer slice at a time (a device array is copied to the host slice by slice, never whole); the
    first mismatch in name order is raised."""
    jobs = []
    for name in sorted(flat):
        x = flat[name]
        if _on_host(x):
            x = np.asarray(x)  # no copy for numpy or CPU-backed jax arrays; slices are views
        jobs += [(name, i, x) for i in range(x.shape[0])] if stacked(name) else [(name, None, x)]

    def run(job) -> CheckpointError | None:
        name, layer, x = job
        try:
            check(digests, name, layer, np.asarray(x if layer is None else x[layer]), where)
        except CheckpointError as e:
            return e
        return None

    with ThreadPoolExecutor(_workers()) as ex:
        errors = list(ex.map(run, jobs))
    for e in errors:
        if e is not None:
            raise e
