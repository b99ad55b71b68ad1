"""What every checkpoint format shares: tensor entries, reader and writer bases, dtype and torch I/O.

A *reader* opens one checkpoint (HF, native GPT-NeoX, or ours), checks every tensor's name and shape
against its config before any data is read, and then hands out tensors one at a time, already in
OUR layout (mapping.py's transforms, tensor-parallel shards merged):

    reader.config                 ModelConfig (architecture fields from the source's own config)
    reader.entries()              [Entry(name, layer, shape, dtype), ...] in the order that reads
                                  the source fastest; `name` is our flat name ("layers/attn/qkv/kernel"),
                                  `layer` the index into the stacked leading axis (None for globals),
                                  `shape` the shape of that one slice
    reader.read(entry)            numpy array, source dtype, our layout
    reader.read_torch(entry)      the same tensor in torch layout (HF / merged NeoX)
    reader.native_tensors()       (native name, shape, dtype, loader) for `inspect`

A *writer* receives the same stream in any order and writes its format into a temporary directory:
`writer.write(entry, array)` then `writer.finish()`.  HF and NeoX writers take torch layout
(`writer.layout == "torch"`, fed by `reader.read_torch`), so HF <-> NeoX never transposes.  Neither
side ever holds more than one tensor (one layer for the native NeoX writer, whose files are per
layer) plus I/O buffers.

Imports run one way: formats (this module) <- mapping (names, layouts, our entries) <- hf, neox,
orbax_io (one module per format) <- dispatch (detect_format, open_reader, make_writer) <- stream,
inspect, verify.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError, one_line

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the stream: our flat name, layer index (None: not stacked), slice shape, dtype."""

    name: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def label(self) -> str:
        return self.name if self.layer is None else f"{self.name}[{self.layer}]"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def with_dtype(self, dtype) -> "Entry":
        return dataclasses.replace(self, dtype=np.dtype(dtype))


def np_dtype(name: str | np.dtype) -> np.dtype:
    """'bfloat16' -> ml_dtypes bfloat16; other names through numpy."""
    if isinstance(name, np.dtype):
        return name
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_name(dt) -> str:
    return np.dtype(dt).name


def cast(array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None or array.dtype == dtype:
        return array
    if array.dtype.kind != "f" and array.dtype != np.dtype(ml_dtypes.bfloat16):
        raise CheckpointError(f"cannot cast a {array.dtype} tensor to {dtype}")
    return array.astype(dtype)


# ----------------------------------------------------------------------------- torch helpers

_TORCH_TO_NP = {
    "torch.float32": np.dtype(np.float32), "torch.float16": np.dtype(np.float16),
    "torch.bfloat16": np.dtype(ml_dtypes.bfloat16), "torch.float64": np.dtype(np.float64),
    "torch.int64": np.dtype(np.int64), "torch.int32": np.dtype(np.int32), "torch.uint8": np.dtype(np.uint8),
    "torch.bool": np.dtype(np.bool_), "torch.int8": np.dtype(np.int8), "torch.int16": np.dtype(np.int16),
}


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor -> a numpy array that owns its memory, same dtype (bf16 via ml_dtypes)."""
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.contiguous().numpy().copy()


def numpy_to_torch(a: np.ndarray):
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def torch_dtype_np(t) -> np.dtype:
    try:
        return _TORCH_TO_NP[str(t.dtype)]
    except KeyError:
        raise CheckpointError(f"unsupported tensor dtype {t.dtype}") from None


def _numpy_safe_globals() -> list:
    """numpy arrays inside pickles (GPT-NeoX's `np_rng_state`): plain data, no code.  Allow-listed
    for torch's weights_only unpickler; nothing else is."""
    out: list = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct
    out.append(_reconstruct)
    out.append((_reconstruct, "numpy.core.multiarray._reconstruct"))  # pickles written by numpy 1
    out.extend(type(np.dtype(t)) for t in ("uint32", "int64", "float32", "float64", "uint8", "int32"))
    return out


def torch_load(path: Path, *, mmap: bool = True, extra_globals: list | None = None) -> Any:
    """`torch.load(..., weights_only=True)`, memory-mapped where the file allows it.  `extra_globals`:
    more (object, "module.Name") pairs to allow (stand-ins for a caller's known classes).

    A file that needs arbitrary unpickling (classes or functions outside torch's weights-only set
    and numpy arrays) is refused with a CheckpointError naming the file and the global."""
    import pickle

    import torch

    def load(globals_list, use_mmap):
        with torch.serialization.safe_globals(globals_list):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)

    globals_list = _numpy_safe_globals() + list(extra_globals or [])
    try:
        try:
            return load(globals_list, mmap)
        except (TypeError, AttributeError):  # a (func, name) pair not understood by this torch version
            globals_list = [g for g in globals_list if not isinstance(g, tuple)]
            return load(globals_list, mmap)
    except pickle.UnpicklingError as e:
        m = (re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
             or re.search(r"unsupported GLOBAL ([\w.]+)", str(e)))
        what = f"it needs the blocked global {m.group(1)}" if m else one_line(e)
        raise CheckpointError(
            f"{path}: refusing to unpickle: only torch.load(weights_only=True) is allowed and {what}"
        ) from None
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # legacy (non-zip) torch.save format cannot be memory-mapped
            log.warning("%s: legacy torch format, reading it whole (no mmap)", path)
            return torch_load(path, mmap=False, extra_globals=extra_globals)
        raise CheckpointError(f"{path}: unreadable torch file ({str(e).strip().splitlines()[0][:200]})") from None
    except Exception as e:  # text or random bytes: the unpickler fails in many ways (KeyError, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch file ({one_line(e)})") from None


# ----------------------------------------------------------------------------- readers / writers


NativeTensor = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


class Reader:
    """Base class; see the module docstring."""

    fmt: str = "?"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config: ModelConfig
        self.extras: dict[str, Any] = {}  # tokenizer files, HF token ids, global step, ...

    def entries(self) -> list[Entry]:
        raise NotImplementedError

    def read(self, entry: Entry) -> np.ndarray:
        raise NotImplementedError

    def read_torch(self, entry: Entry) -> np.ndarray:
        """The same tensor in torch layout (HF / merged NeoX), for writers of those formats."""
        raise NotImplementedError

    def native_tensors(self) -> Iterator[NativeTensor]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.fmt} checkpoint {self.path}"

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Writer:
    fmt: str = "?"
    layout: str = "ours"  # or "torch": write() takes torch-layout arrays (Reader.read_torch)

    def write(self, entry: Entry, array: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Called on failure before the temporary directory is removed (release files, end writes)."""


def check_slice(entry: Entry, array: np.ndarray, where: str) -> None:
    if tuple(array.shape) != tuple(entry.shape):
        raise CheckpointError(f"{where}: tensor {entry.label} has shape {tuple(array.shape)}, expected {entry.shape}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", s, re.I)
    if not m:
        raise CheckpointError(f"size {s!r} is not like 5GB, 500MB or 1000000")
    num, unit = float(m.group(1)), m.group(2).upper()
    mult = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if unit not in mult:
        raise CheckpointError(f"size {s!r}: unknown unit {unit!r}")
    return int(num * mult[unit])
