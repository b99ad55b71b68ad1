"""Megatron / GPT-NeoX memory-mapped indexed datasets (`PREFIX.bin` + `PREFIX.idx`).

`PREFIX.bin` holds every item's tokens back to back in one dtype.  `PREFIX.idx` (little-endian):

    offset 0   9 bytes     magic b"MMIDIDX\\x00\\x00"
    offset 9   uint64      version = 1
    offset 17  uint8       dtype code (DTYPES below)
    offset 18  uint64      len: number of items
    offset 26  uint64      doc_count: length of doc_idx
    offset 34  int32[len]      sizes: tokens per item
               int64[len]      pointers: byte offset of each item in .bin (exclusive cumsum(sizes) * itemsize)
               int64[doc_count] doc_idx: item index where each document starts; [0, ..., len] when every
                               document is one item (what GPT-NeoX's preprocess_data.py writes)

This is the layout GPT-NeoX's `MMapIndexedDataset.Index.writer` produces (v1.0, 2023-03, and the Pythia
utilities).  Dtype code 6 is float32 there; the 2022 Pythia-branch code mapped it to Python `float`, with
which that code could neither write nor read such a file, so float32 is the only meaning in use.

`IndexedDataset` validates a file pair before use and names the file and byte offset of any problem
(wrong magic, version, dtype code, truncated arrays, items that point past the end of `.bin`, a `.bin`
longer than the index says, a pair whose replacement was interrupted).
`IndexedDatasetWriter` writes both files under hidden temporary names and publishes them together
through `atomic.Replacement` at `finalize`: a failed or killed run never leaves a half-written
dataset, and the pair is never seen as a mixed old/new pair (neox_jax/atomic.py).
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from typing import Iterable

import numpy as np

from .. import atomic
from ..errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # magic 9 + version 8 + dtype 1 + len 8 + doc_count 8

DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float32),
    7: np.dtype(np.float64),
    8: np.dtype(np.uint16),
}
CODES: dict[np.dtype, int] = {dt: code for code, dt in DTYPES.items()}


def dtype_code(dtype) -> int:
    """The `.idx` dtype code of `dtype` (raises UserError for dtypes the format cannot hold)."""
    dt = np.dtype(dtype)
    if dt not in CODES:
        raise UserError(f"dtype {dt} has no code in the MMIDIDX format (allowed: "
                        f"{', '.join(str(d) for d in CODES)})")
    return CODES[dt]


def best_fitting_dtype(vocab_size: int) -> np.dtype:
    """GPT-NeoX's rule: uint16 when `vocab_size < 65500`, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def strip_prefix(prefix: str | os.PathLike) -> str:
    """Accept `P`, `P.bin` or `P.idx` and return `P`."""
    p = str(prefix)
    return p[:-4] if p.endswith((".bin", ".idx")) else p


def index_file(prefix: str | os.PathLike) -> Path:
    return Path(strip_prefix(prefix) + ".idx")


def data_file(prefix: str | os.PathLike) -> Path:
    return Path(strip_prefix(prefix) + ".bin")


def prefix_inputs(prefix: str | os.PathLike, label: str = "--data-prefix") -> list[tuple[str, str | Path]]:
    """The files a dataset prefix (`P`, `P.bin` or `P.idx`) stands for, as the `(label, path)` inputs of
    `atomic.check_not_input`: the prefix as given, `P.bin` and `P.idx`."""
    return [(label, prefix), (label, data_file(prefix)), (label, index_file(prefix))]


def encode_index(sizes: np.ndarray, doc_idx: np.ndarray, dtype) -> bytes:
    """The complete `.idx` bytes for items of `sizes` tokens (pointers derived from sizes)."""
    itemsize = np.dtype(dtype).itemsize
    sizes64 = np.asarray(sizes, dtype=np.int64)
    if sizes64.size and (sizes64.min() < 0 or sizes64.max() > np.iinfo(np.int32).max):
        raise UserError("item sizes must lie in [0, 2**31): the .idx stores them as int32")
    pointers = np.zeros(len(sizes64), dtype=np.int64)
    np.cumsum(sizes64[:-1], out=pointers[1:])
    pointers *= itemsize
    header = MAGIC + struct.pack("<QBQQ", VERSION, dtype_code(dtype), len(sizes64), len(doc_idx))
    return (header + sizes64.astype("<i4").tobytes() + pointers.astype("<i8").tobytes()
            + np.asarray(doc_idx, dtype="<i8").tobytes())


class IndexedDataset:
    """Read-only view of `PREFIX.bin`/`PREFIX.idx`; `ds[i]` is item i's tokens (a read-only array view).

    All arrays are memory-mapped: opening a multi-GB dataset costs one pass of checks over the index
    (sizes non-negative, every item inside `.bin`), never a read of `.bin`."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = strip_prefix(prefix)
        idx_path, bin_path = index_file(self.prefix), data_file(self.prefix)
        for p in (idx_path, bin_path):
            note = atomic.pending(p)
            if note:
                raise UserError(note)
        for p in (idx_path, bin_path):
            if not p.exists():
                raise UserError(f"{p}: not found (expected {self.prefix}.idx and {self.prefix}.bin)")
        self.index_path, self.data_path = idx_path, bin_path
        idx_size = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if head[:9] != MAGIC[: len(head)]:
            raise UserError(f"{idx_path}: offset 0: bad magic {head[:9]!r}, expected {MAGIC!r} "
                            "(not a Megatron/GPT-NeoX mmap .idx file)")
        if len(head) < HEADER_SIZE:
            raise UserError(f"{idx_path}: offset {len(head)}: truncated header "
                            f"({len(head)} of {HEADER_SIZE} bytes)")
        version, code, n, doc_count = struct.unpack("<QBQQ", head[9:])
        if version != VERSION:
            raise UserError(f"{idx_path}: offset 9: unsupported version {version} (expected {VERSION})")
        if code not in DTYPES:
            raise UserError(f"{idx_path}: offset 17: unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = DTYPES[code]
        sizes_off = HEADER_SIZE
        ptr_off = sizes_off + 4 * n
        doc_off = ptr_off + 8 * n
        end = doc_off + 8 * doc_count
        for name, off, nbytes in (("sizes", sizes_off, 4 * n), ("pointers", ptr_off, 8 * n),
                                  ("doc_idx", doc_off, 8 * doc_count)):
            if off + nbytes > idx_size:
                raise UserError(f"{idx_path}: offset {off}: truncated {name} array: needs {nbytes} bytes "
                                f"for len={n}, doc_count={doc_count}, but the file ends at {idx_size}")
        if idx_size != end:
            raise UserError(f"{idx_path}: offset {end}: {idx_size - end} unexpected trailing bytes "
                            f"after the doc_idx array")
        idx_map = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.sizes: np.ndarray = np.frombuffer(idx_map, dtype="<i4", count=n, offset=sizes_off)
        self.pointers: np.ndarray = np.frombuffer(idx_map, dtype="<i8", count=n, offset=ptr_off)
        self.doc_idx: np.ndarray = np.frombuffer(idx_map, dtype="<i8", count=doc_count, offset=doc_off)
        bin_size = bin_path.stat().st_size
        self._bin = (np.memmap(bin_path, dtype=np.uint8, mode="r") if bin_size
                     else np.zeros(0, dtype=np.uint8))
        self._check_items(bin_size)  # also: .bin exactly as long as the index says

    def _check_items(self, bin_size: int, chunk: int = 1 << 24) -> None:
        """What GPT-NeoX's writer guarantees: sizes >= 0, pointers = exclusive cumsum(sizes) x itemsize,
        `.bin` exactly as long as the items, doc_idx from 0 to len, non-decreasing (checked in chunks)."""
        n = len(self.sizes)
        ptr_off = HEADER_SIZE + 4 * n
        doc_off = ptr_off + 8 * n
        expect = 0  # the next item's pointer
        for a in range(0, n, chunk):
            sizes = self.sizes[a:a + chunk].astype(np.int64)
            bad = np.flatnonzero(sizes < 0)
            if bad.size:
                i = a + int(bad[0])
                raise UserError(f"{self.index_path}: offset {HEADER_SIZE + 4 * i}: item {i} has negative "
                                f"size {int(self.sizes[i])}")
            want = expect + np.concatenate([[0], np.cumsum(sizes[:-1])]) * self.dtype.itemsize
            bad = np.flatnonzero(self.pointers[a:a + chunk] != want)
            if bad.size:
                i = a + int(bad[0])
                raise UserError(f"{self.index_path}: offset {ptr_off + 8 * i}: item {i} pointer "
                                f"{int(self.pointers[i])}, but the sizes before it put it at {int(want[i - a])} "
                                "(inconsistent index)")
            expect = int(want[-1]) + int(sizes[-1]) * self.dtype.itemsize
        if expect > bin_size:
            ends = self.pointers + self.sizes.astype(np.int64) * self.dtype.itemsize
            i = int(np.flatnonzero(ends > bin_size)[0])
            raise UserError(f"{self.data_path}: offset {int(self.pointers[i])}: file is shorter than the "
                            f"index says: item {i} needs bytes [{int(self.pointers[i])}, {int(ends[i])}) "
                            f"but the file has {bin_size} bytes")
        if expect < bin_size:
            raise UserError(f"{self.data_path}: offset {expect}: file is longer than the index says: "
                            f"{bin_size} bytes, {self.index_path.name} describes {expect} (a .bin and .idx "
                            "from different runs?)")
        d = self.doc_idx
        if len(d) == 0 or d[0] != 0 or d[-1] != n:
            got = "empty" if len(d) == 0 else f"runs from {int(d[0])} to {int(d[-1])}"
            raise UserError(f"{self.index_path}: offset {doc_off}: doc_idx {got}; it must run from 0 to the "
                            f"item count {n}")
        for a in range(0, len(d), chunk):
            part = d[a:a + chunk + 1]
            bad = np.flatnonzero(np.diff(part) < 0)
            if bad.size:
                i = a + int(bad[0]) + 1
                raise UserError(f"{self.index_path}: offset {doc_off + 8 * i}: doc_idx[{i}] = {int(d[i])} is below "
                                f"doc_idx[{i - 1}] = {int(d[i - 1])} (must not decrease)")

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of item i (to its end when length is None)."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: item {i} has {size} tokens; asked for [{offset}, "
                             f"{offset + length})")
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.prefix}: item {i} out of range (len {len(self)})")
        return self.get(i % len(self))

    def documents(self) -> Iterable[np.ndarray]:
        """Each document's tokens, joining its items (doc_idx[k] .. doc_idx[k+1])."""
        for k in range(len(self.doc_idx) - 1):
            a, b = int(self.doc_idx[k]), int(self.doc_idx[k + 1])
            if b - a == 1:
                yield self.get(a)
            else:
                yield np.concatenate([self.get(i) for i in range(a, b)] or [np.zeros(0, self.dtype)])


class IndexedDatasetWriter:
    """Write `PREFIX.bin`/`PREFIX.idx` byte-identical to GPT-NeoX's `MMapIndexedDatasetBuilder`.

    `add_document(tokens)` = NeoX's `add_item(tokens); end_document()` (one item per document, the
    preprocess_data.py pattern, giving doc_idx = [0, 1, ..., N]).  Tokens are checked against the
    dtype's range.  Use as a context manager: on an exception the temporary files are removed; on
    success `finalize()` renames them into place."""

    def __init__(self, prefix: str | os.PathLike, dtype, overwrite: bool = False):
        self.prefix = strip_prefix(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        self.index_path, self.data_path = index_file(self.prefix), data_file(self.prefix)
        self._out = atomic.Replacement([self.data_path, self.index_path], overwrite=overwrite)
        self._tmp_bin, self._tmp_idx = self._out.tmp(self.data_path), self._out.tmp(self.index_path)
        self._bin = open(self._tmp_bin, "wb")
        self._sizes = array("q")
        self._doc_idx = array("q", [0])
        self._done = False
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            self._range = (int(info.min), int(info.max))
        else:
            self._range = None

    def add_item(self, tokens) -> None:
        arr = np.asarray(tokens)
        if self._range is not None and arr.size and arr.dtype != self.dtype:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._range[0] or hi > self._range[1]:
                bad = lo if lo < self._range[0] else hi
                raise UserError(f"{self.data_path}: item {len(self._sizes)}: token id {bad} does not fit "
                                f"{self.dtype} (range {self._range[0]}..{self._range[1]})")
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype.newbyteorder("<")).tobytes())
        self._sizes.append(arr.size)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        self.add_item(tokens)
        self.end_document()

    def finalize(self) -> None:
        """Write the index and move both files into place (once; later calls do nothing)."""
        if self._done:
            return
        self._done = True
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int64)
        self._tmp_idx.write_bytes(encode_index(sizes, np.frombuffer(self._doc_idx, np.int64), self.dtype))
        self._out.commit()

    def abort(self) -> None:
        """Close and delete the temporary files."""
        self._done = True
        self._bin.close()
        self._out.abort()

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with self._out:  # turns an OSError (a full disk) into one line naming the dataset
            if exc_type is None:
                self.finalize()
            else:
                self.abort()
                if exc is not None:
                    raise exc
