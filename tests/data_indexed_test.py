"""The Megatron/GPT-NeoX mmap indexed format: our writer against the published byte layout written by hand
here (struct.pack), our reader on hand-made files, and clear errors on damaged files."""

import struct

import numpy as np
import pytest

from neox_jax.data.indexed import IndexedDataset, IndexedDatasetWriter
from neox_jax.errors import UserError

# the published dtype codes (GPT-NeoX indexed_dataset.py `dtypes`, v1.0)
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64,
         8: np.uint16}


def hand_idx(code: int, itemsize: int, sizes: list[int], doc_idx: list[int]) -> bytes:
    """The .idx bytes as documented: header, int32 sizes, int64 pointers, int64 doc_idx."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    ptr = 0
    for s in sizes:
        out += struct.pack("<q", ptr)
        ptr += s * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


@pytest.mark.parametrize("code", sorted(CODES))
def test_writer_matches_published_layout(tmp_path, code):
    dtype = np.dtype(CODES[code])
    rng = np.random.RandomState(code)
    docs = [rng.randint(0, 100, size=n).astype(dtype) for n in (5, 0, 1, 17, 3)]
    with IndexedDatasetWriter(tmp_path / "ds", dtype) as w:
        for d in docs:
            w.add_document(d)
    sizes = [len(d) for d in docs]
    expected_idx = hand_idx(code, dtype.itemsize, sizes, list(range(len(docs) + 1)))
    assert (tmp_path / "ds.idx").read_bytes() == expected_idx
    assert (tmp_path / "ds.bin").read_bytes() == b"".join(d.astype(dtype.newbyteorder("<")).tobytes()
                                                        for d in docs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no temp files left
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.dtype == dtype and len(ds) == len(docs)
    for d, got in zip(docs, (ds[i] for i in range(len(ds)))):
        np.testing.assert_array_equal(got, d)


def test_reader_reads_multi_item_documents_made_by_hand(tmp_path):
    # three items; documents = [item 0, item 1 + item 2] (NeoX's add_item/end_document pattern)
    items = [np.array([5, 6, 7], np.uint16), np.array([1], np.uint16), np.array([9, 9], np.uint16)]
    (tmp_path / "x.idx").write_bytes(hand_idx(8, 2, [3, 1, 2], [0, 1, 3]))
    (tmp_path / "x.bin").write_bytes(b"".join(struct.pack("<H", t) for it in items for t in it))
    ds = IndexedDataset(str(tmp_path / "x.bin"))  # a .bin/.idx path is accepted as the prefix
    assert ds.sizes.tolist() == [3, 1, 2] and ds.pointers.tolist() == [0, 6, 8]
    assert ds.doc_idx.tolist() == [0, 1, 3] and ds.num_tokens == 6
    assert ds.get(0, offset=1, length=2).tolist() == [6, 7]
    assert [d.tolist() for d in ds.documents()] == [[5, 6, 7], [1, 9, 9]]
    with pytest.raises(IndexError):
        ds.get(2, offset=1, length=5)

    w = IndexedDatasetWriter(tmp_path / "y", np.uint16)
    for it in items[:1]:
        w.add_item(it)
    w.end_document()
    for it in items[1:]:
        w.add_item(it)
    w.end_document()
    w.finalize()
    assert (tmp_path / "y.idx").read_bytes() == (tmp_path / "x.idx").read_bytes()
    assert (tmp_path / "y.bin").read_bytes() == (tmp_path / "x.bin").read_bytes()


def _good(tmp_path, name="d"):
    (tmp_path / f"{name}.idx").write_bytes(hand_idx(8, 2, [4, 2], [0, 1, 2]))
    (tmp_path / f"{name}.bin").write_bytes(np.arange(6, dtype="<u2").tobytes())
    return tmp_path / name


def _error(prefix) -> str:
    with pytest.raises(UserError) as e:
        IndexedDataset(prefix)
    return str(e.value)


def test_bad_magic(tmp_path):
    p = _good(tmp_path)
    raw = bytearray((tmp_path / "d.idx").read_bytes())
    raw[:9] = b"TNTIDX\x00\x00\x00"
    (tmp_path / "d.idx").write_bytes(bytes(raw))
    msg = _error(p)
    assert "d.idx" in msg and "offset 0" in msg and "magic" in msg


def test_bad_version_and_dtype_code(tmp_path):
    p = _good(tmp_path)
    raw = bytearray((tmp_path / "d.idx").read_bytes())
    bad = raw.copy()
    bad[9:17] = struct.pack("<Q", 2)
    (tmp_path / "d.idx").write_bytes(bytes(bad))
    assert "offset 9" in _error(p)
    bad = raw.copy()
    bad[17] = 9
    (tmp_path / "d.idx").write_bytes(bytes(bad))
    msg = _error(p)
    assert "offset 17" in msg and "dtype code 9" in msg


@pytest.mark.parametrize("cut,array,offset", [(20, "header", 20), (38, "sizes", 34), (50, "pointers", 42),
                                              (70, "doc_idx", 58)])
def test_truncated_index(tmp_path, cut, array, offset):
    p = _good(tmp_path)
    raw = (tmp_path / "d.idx").read_bytes()
    assert len(raw) == 34 + 2 * 4 + 2 * 8 + 3 * 8
    (tmp_path / "d.idx").write_bytes(raw[:cut])
    msg = _error(p)
    assert "d.idx" in msg and f"offset {offset}" in msg and array in msg


def test_trailing_bytes_and_bin_too_short(tmp_path):
    p = _good(tmp_path)
    raw = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(raw + b"\x00")
    assert "offset 82" in _error(p)
    (tmp_path / "d.idx").write_bytes(raw)
    (tmp_path / "d.bin").write_bytes(np.arange(5, dtype="<u2").tobytes())  # 10 of 12 bytes
    msg = _error(p)
    assert "d.bin" in msg and "offset 8" in msg and "item 1" in msg and "shorter" in msg
    (tmp_path / "d.bin").unlink()
    assert "not found" in _error(p)


def test_writer_checks_ids_and_refuses_existing_outputs(tmp_path):
    with pytest.raises(UserError, match=r"e\.bin: item 1: token id 70000 does not fit uint16"):
        with IndexedDatasetWriter(tmp_path / "e", np.uint16) as w:
            w.add_document([1, 2])
            w.add_document([3, 70000])
    assert list(tmp_path.iterdir()) == []  # the failed write left nothing behind
    with pytest.raises(UserError, match="token id -1"):
        IndexedDatasetWriter(tmp_path / "e", np.uint16).add_item(np.array([-1]))
    for p in tmp_path.iterdir():
        p.unlink()
    with IndexedDatasetWriter(tmp_path / "e", np.int32) as w:
        w.add_document(np.array([70000]))
    with pytest.raises(UserError, match="exists"):
        IndexedDatasetWriter(tmp_path / "e", np.int32)
    with IndexedDatasetWriter(tmp_path / "e", np.int32, overwrite=True) as w:
        w.add_document([1])
    assert IndexedDataset(tmp_path / "e")[0].tolist() == [1]
    with pytest.raises(UserError, match="no code"):
        IndexedDatasetWriter(tmp_path / "f", np.uint32)


def test_empty_dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "z", np.uint16):
        pass
    assert (tmp_path / "z.idx").read_bytes() == hand_idx(8, 2, [], [0])
    assert (tmp_path / "z.bin").read_bytes() == b""
    ds = IndexedDataset(tmp_path / "z")
    assert len(ds) == 0 and ds.num_tokens == 0 and list(ds.documents()) == []
