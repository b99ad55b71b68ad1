"""GPT-NeoX's index maps and sample order against a plain re-derivation of the published algorithm
(gpt2_dataset.py `_build_index_mappings` + helpers.cpp `build_sample_idx` / `build_blending_indices`),
written below as loops, on corpora that force 1 and 2 epochs, tiny and empty documents, and documents
longer than a sample."""

import math

import numpy as np
import pytest

from neox_jax.data.indexed import IndexedDatasetWriter
from neox_jax.data import order
from neox_jax.data.order import (BlendedDataset, GPT2Dataset, PreshuffledDataset, build_index_maps,
                                 build_shuffle_idx, build_train_dataset, index_map_paths, shuffle_idx_dtype,
                                 train_valid_test_split, weighted_num_samples)
from neox_jax.errors import UserError

# ----------------------------------------------------------------------------- reference (plain loops)


def ref_index_maps(sizes, documents, num_samples, seq_length, seed):
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_length >= num_samples:
            break
    rng = np.random.RandomState(seed=seed)
    doc_idx = np.mgrid[0:epochs, 0:len(documents)][1]
    doc_idx[:] = documents
    doc_idx = doc_idx.reshape(-1).astype(np.int32)
    rng.shuffle(doc_idx)

    n = (epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros([n + 1, 2], dtype=np.int32)
    d, off = 0, 0
    for j in range(1, n + 1):
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[d]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - 1
                remaining = 0
            else:
                d += 1
                off = 0
        sample_idx[j] = (d, off)

    shuffle_idx = np.arange(n, dtype=np.uint32)
    rng.shuffle(shuffle_idx)
    return epochs, doc_idx, sample_idx, shuffle_idx


def ref_sample(docs, doc_idx, sample_idx, shuffle_idx, i):
    j = shuffle_idx[i]
    (df, of), (dl, ol) = sample_idx[j], sample_idx[j + 1]
    if df == dl:
        return docs[doc_idx[df]][of:ol + 1]
    parts = [docs[doc_idx[df]][of:]] + [docs[doc_idx[k]] for k in range(df + 1, dl)]
    parts.append(docs[doc_idx[dl]][:ol + 1])
    return np.concatenate(parts)


def ref_blending(weights, size):
    counts = [0] * len(weights)
    index, sample = [], []
    for t in range(size):
        errors = [w * max(t, 1.0) - c for w, c in zip(weights, counts)]
        k = errors.index(max(errors))
        index.append(k)
        sample.append(counts[k])
        counts[k] += 1
    return index, sample


# ----------------------------------------------------------------------------- corpora


def write_corpus(path, sizes, seed=0, vocab=50000):
    rng = np.random.RandomState(seed)
    docs = [rng.randint(1, vocab, size=int(s)).astype(np.uint16) for s in sizes]
    with IndexedDatasetWriter(path, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return docs


S = 64
CORPORA = {
    # name: (document sizes, num_samples)
    "one_epoch": (np.random.RandomState(1).randint(1, 300, size=400), 100),
    "two_epochs": (np.random.RandomState(2).randint(1, 300, size=150), 400),
    "many_epochs_tiny_docs": (np.random.RandomState(3).randint(0, 4, size=120), 30),
    "long_docs": (np.random.RandomState(4).randint(3 * S, 20 * S, size=12), 150),
    "exact_multiple": ([S] * 10 + [1], 10),
}


@pytest.mark.parametrize("name", sorted(CORPORA))
@pytest.mark.parametrize("seed", [1234, 7])
def test_index_maps_and_samples_match_reference(tmp_path, name, seed):
    sizes, num_samples = CORPORA[name]
    sizes = np.asarray(sizes, dtype=np.int32)
    docs = write_corpus(tmp_path / name, sizes)
    epochs, doc_idx, sample_idx, shuffle_idx = ref_index_maps(sizes, np.arange(len(sizes), dtype=np.int32),
                                                              num_samples, S, seed)
    ds = GPT2Dataset.build(str(tmp_path / name), num_samples, S, seed)
    assert ds.maps.num_epochs == epochs and not ds.maps.from_cache
    for got, ref in ((ds.maps.doc_idx, doc_idx), (ds.maps.sample_idx, sample_idx),
                     (ds.maps.shuffle_idx, shuffle_idx)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)
    assert len(ds) == len(shuffle_idx) - 1  # NeoX's off-by-one drops one sample
    assert len(ds) >= num_samples - 1
    for i in range(len(ds)):
        ref = ref_sample(docs, doc_idx, sample_idx, shuffle_idx, i)
        got = ds[i]
        assert got.shape == (S + 1,) and got.dtype == np.int32
        np.testing.assert_array_equal(got, ref)
        # the replay description names the documents and token ranges the sample was cut from
        d = ds.describe(i)
        assert d["sample"] == shuffle_idx[i]
        cut = [docs[doc][a:b] for doc, (a, b) in zip(d["doc_ids"], d["offsets"])]
        np.testing.assert_array_equal(np.concatenate(cut), ref)


def test_epoch_counts_of_the_corpora():
    assert ref_index_maps(np.asarray(CORPORA["one_epoch"][0], np.int32), np.arange(400), 100, S, 1)[0] == 1
    assert ref_index_maps(np.asarray(CORPORA["two_epochs"][0], np.int32), np.arange(150), 400, S, 1)[0] == 2


def test_document_subset_and_token_sums_beyond_int32():
    # three documents of 2**30 tokens: tokens per epoch 3 * 2**30 > 2**31 (int64 sums needed)
    sizes = np.full(3, 2 ** 30, dtype=np.int32)
    seq = 2 ** 20
    epochs, _, sample_idx, shuffle_idx = ref_index_maps(sizes, np.arange(3, dtype=np.int32), 5000, seq, 3)
    maps = build_index_maps("unused", "train", np.arange(3, dtype=np.int32), sizes, 5000, seq, 3,
                            use_cache=False)
    assert epochs == maps.num_epochs == 2
    np.testing.assert_array_equal(maps.sample_idx, sample_idx)
    np.testing.assert_array_equal(maps.shuffle_idx, shuffle_idx)
    # the 20B route uses only the train split's documents
    sizes = np.random.RandomState(5).randint(1, 200, size=50).astype(np.int32)
    documents = np.arange(10, 40, dtype=np.int32)
    ref = ref_index_maps(sizes, documents, 60, S, 1234)
    maps = build_index_maps("unused", "train", documents, sizes, 60, S, 1234, use_cache=False)
    for got, want in zip((maps.doc_idx, maps.sample_idx, maps.shuffle_idx), ref[1:]):
        np.testing.assert_array_equal(got, want)
    assert set(maps.doc_idx.tolist()) == set(range(10, 40))


def test_reads_neox_cached_index_maps(tmp_path):
    sizes = np.random.RandomState(6).randint(1, 200, size=60).astype(np.int32)
    docs = write_corpus(tmp_path / "c", sizes)
    _, doc_idx, sample_idx, shuffle_idx = ref_index_maps(sizes, np.arange(60, dtype=np.int32), 50, S, 1234)
    # NeoX's file names, spelled out from gpt2_dataset.py
    base = f"{tmp_path}/c_train_0_indexmap_50ns_{S}sl_1234s"
    assert [str(p) for p in index_map_paths(str(tmp_path / "c"), "train_0", 50, S, 1234)] == \
        [f"{base}_doc_idx.npy", f"{base}_sample_idx.npy", f"{base}_shuffle_idx.npy"]
    # a cache holding a different (reversed) shuffle proves the files are read, not rebuilt
    cached_shuffle = shuffle_idx[::-1].copy()
    for kind, arr in (("doc", doc_idx), ("sample", sample_idx), ("shuffle", cached_shuffle)):
        np.save(f"{base}_{kind}_idx.npy", arr, allow_pickle=True)
    ds = GPT2Dataset.build(str(tmp_path / "c"), 50, S, 1234)
    assert ds.maps.from_cache
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i], ref_sample(docs, doc_idx, sample_idx, cached_shuffle, i))
    assert not GPT2Dataset.build(str(tmp_path / "c"), 50, S, 1234, use_cache=False).maps.from_cache
    # a stale cache (wrong shape for this dataset) is refused, naming the file
    np.save(f"{base}_sample_idx.npy", sample_idx[:-1])
    with pytest.raises(UserError, match=r"c_train_0_indexmap_50ns_64sl_1234s_sample_idx\.npy: shape"):
        GPT2Dataset.build(str(tmp_path / "c"), 50, S, 1234)


def test_save_cache_writes_neox_files_that_load_back(tmp_path):
    sizes = np.random.RandomState(8).randint(1, 100, size=40).astype(np.int32)
    write_corpus(tmp_path / "s", sizes)
    built = GPT2Dataset.build(str(tmp_path / "s"), 30, S, 99, name="train", save_cache=True)
    _, doc_idx, sample_idx, shuffle_idx = ref_index_maps(sizes, np.arange(40, dtype=np.int32), 30, S, 99)
    for p, ref in zip(index_map_paths(str(tmp_path / "s"), "train", 30, S, 99),
                      (doc_idx, sample_idx, shuffle_idx)):
        arr = np.load(p)
        assert arr.dtype == ref.dtype
        np.testing.assert_array_equal(arr, ref)
    again = GPT2Dataset.build(str(tmp_path / "s"), 30, S, 99, name="train")
    assert again.maps.from_cache
    np.testing.assert_array_equal(again[3], built[3])


@pytest.mark.parametrize("weights", [[1.0], [0.3, 0.7], [1.0, 1.0, 1.0], [0.5, 0.25, 0.125, 0.125]])
def test_blending_matches_reference(tmp_path, weights):
    docs, datasets = [], []
    for k in range(len(weights)):
        sizes = np.random.RandomState(20 + k).randint(1, 150, size=40)
        docs.append(write_corpus(tmp_path / f"b{k}", sizes, seed=k))
        datasets.append(GPT2Dataset.build(str(tmp_path / f"b{k}"), 30, S, 1234, name=f"train_{k}"))
    norm = np.array(weights) / np.sum(weights)
    blend = BlendedDataset(datasets, weights)
    assert len(blend) == sum(len(d) for d in datasets)
    ref_index, ref_sample_index = ref_blending(list(norm), len(blend))
    assert blend.dataset_index.tolist() == ref_index
    assert blend.dataset_sample_index.tolist() == ref_sample_index
    for i in range(0, len(blend), 7):
        k, s = ref_index[i], ref_sample_index[i]
        s = s if s < len(datasets[k].maps.shuffle_idx) else s % len(datasets[k])  # NeoX's IndexError fallback
        np.testing.assert_array_equal(blend[i], datasets[k][s])
        assert blend.describe(i)["dataset"] == k
    # the first blending entries do not depend on the total size
    part = BlendedDataset(datasets, weights, limit=11)
    assert part.dataset_index.tolist() == ref_index[:11]
    with pytest.raises(IndexError):
        part[11]


def test_train_dataset_routes(tmp_path):
    # Pythia's train-data-paths route: num_samples = ceil(iters * batch * w * 1.005)
    assert weighted_num_samples([1.0], 143000 * 1024)[1] == [147164160]
    assert weighted_num_samples([1.0, 3.0], 1000)[1] == [math.ceil(250 * 1.005), math.ceil(750 * 1.005)]
    sizes = np.random.RandomState(9).randint(1, 200, size=80)
    docs = write_corpus(tmp_path / "t", sizes)
    ds = build_train_dataset([str(tmp_path / "t")], S, 1234, train_iters=10, batch=4)
    sizes = np.asarray(sizes, np.int32)
    _, doc_idx, sample_idx, shuffle_idx = ref_index_maps(sizes, np.arange(80), 41, S, 1234)
    assert len(ds) == len(shuffle_idx) - 1
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i], ref_sample(docs, doc_idx, sample_idx, shuffle_idx, i))
    # GPT-NeoX-20B's data-path route: train split documents, iters * batch samples, name "train"
    assert train_valid_test_split("995,4,1", 1000) == [0, 995, 999, 1000]
    assert train_valid_test_split("969, 30, 1", 80) == [0, 78, 80, 80]
    bounds = train_valid_test_split("90,5,5", 80)
    assert bounds == [0, 72, 76, 80]
    ds = build_train_dataset([str(tmp_path / "t")], S, 1234, train_iters=10, batch=4, split="90,5,5")
    _, doc_idx, sample_idx, shuffle_idx = ref_index_maps(sizes, np.arange(0, 72, dtype=np.int32), 40, S, 1234)
    assert len(ds) == len(shuffle_idx) - 1
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i], ref_sample(docs, doc_idx, sample_idx, shuffle_idx, i))
    with pytest.raises(UserError, match="exactly one"):
        build_train_dataset([str(tmp_path / "t")], S)


@pytest.mark.parametrize("split", ["nan,1,1", "inf,1,1", "1,nan", "-1,2,3", "0,0,0", "1,1,1,-1", "1e308,1e308,1"])
def test_split_weights_must_be_finite_non_negative_and_not_all_zero(split):
    with pytest.raises(UserError) as e:
        train_valid_test_split(split, 80)
    assert str(e.value) == f"--split {split!r}: weights must be finite numbers >= 0, not all zero"


@pytest.mark.parametrize("weights", [[float("nan"), 1.0], [float("inf"), 1.0], [-1.0, 2.0], [0.0, 0.0]])
def test_blend_weights_must_be_finite_non_negative_and_not_all_zero(tmp_path, weights):
    with pytest.raises(UserError, match=r"weights must be finite numbers >= 0, not all zero"):
        weighted_num_samples(weights, 1000)
    write_corpus(tmp_path / "a", [30] * 10)
    with pytest.raises(UserError, match=r"weights must be finite numbers >= 0, not all zero"):
        build_train_dataset([str(tmp_path / "a")] * 2, S, train_iters=2, batch=2, weights=weights)


def test_preshuffled_dataset(tmp_path):
    rows = np.random.RandomState(0).randint(0, 50000, size=(12, S + 1)).astype(np.uint16)
    with IndexedDatasetWriter(tmp_path / "document", np.uint16) as w:
        for r in rows:
            w.add_document(r)
    ds = PreshuffledDataset(str(tmp_path / "document"), seq_length=S)
    assert len(ds) == 12
    batch = 4
    step = 2  # step s uses items [batch*s, batch*(s+1))
    np.testing.assert_array_equal(np.stack([ds[i] for i in range(batch * step, batch * (step + 1))]),
                                  rows[8:12])
    with pytest.raises(UserError, match="item 0 has 65 tokens"):
        PreshuffledDataset(str(tmp_path / "document"), seq_length=S + 1)


def neox_shuffle_dtype(size):
    """gpt2_dataset.py `_build_shuffle_idx`'s dtype rule, as written there."""
    dtype_ = np.uint32
    if size >= (np.iinfo(np.uint32).max - 1):
        dtype_ = np.int64
    return dtype_


@pytest.mark.parametrize("size", [0, 1, 2 ** 31, 2 ** 32 - 3, 2 ** 32 - 2, 2 ** 32 - 1, 2 ** 32, 147164160 * 40])
def test_shuffle_idx_dtype_switches_to_int64_where_neox_does(size):
    """The uint32 -> int64 switch at 2**32 - 2 samples, decided without allocating 16 GB."""
    assert shuffle_idx_dtype(size) is neox_shuffle_dtype(size)


def test_build_shuffle_idx_takes_the_dtype_decision(monkeypatch):
    assert build_shuffle_idx(10, np.random.RandomState(0)).dtype == np.uint32
    seen = []
    monkeypatch.setattr(order, "shuffle_idx_dtype", lambda n: seen.append(n) or np.int64)
    a = build_shuffle_idx(10, np.random.RandomState(0))
    assert seen == [10] and a.dtype == np.int64
    b = np.arange(10, dtype=np.int64)
    np.random.RandomState(0).shuffle(b)  # the same permutation in either dtype
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", ["truncated", "empty", "header", "values"])
def test_damaged_cache_file_is_refused_naming_it(tmp_path, damage):
    """A cache written with save_cache (through atomic.Replacement: no temporaries left, the three
    files published together), then damaged on disk: the read refuses it naming the file and how to
    have it rebuilt; with the damaged files deleted the maps are rebuilt equal to the reference."""
    sizes = np.random.RandomState(9).randint(1, 100, size=40).astype(np.int32)
    write_corpus(tmp_path / "s", sizes)
    GPT2Dataset.build(str(tmp_path / "s"), 30, S, 99, name="train", save_cache=True)
    paths = index_map_paths(str(tmp_path / "s"), "train", 30, S, 99)
    assert not [p.name for p in tmp_path.iterdir() if "neox-jax" in p.name]
    victim = paths[2]  # shuffle_idx
    raw = victim.read_bytes()
    if damage == "truncated":  # a writer killed mid-write without the atomic rename
        victim.write_bytes(raw[: len(raw) - 9])
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "header":
        victim.write_bytes(b"\x00" * len(raw))
    else:  # a flipped high byte: an index past the samples
        arr = np.load(victim).copy()
        arr[5] = len(arr) + 1000
        np.save(victim, arr)
    with pytest.raises(UserError) as e:
        GPT2Dataset.build(str(tmp_path / "s"), 30, S, 99, name="train")
    msg = str(e.value)
    assert msg.startswith(str(victim)) and "\n" not in msg and "delete" in msg and "rebuilt" in msg, msg
    victim.unlink()
    again = GPT2Dataset.build(str(tmp_path / "s"), 30, S, 99, name="train", save_cache=True)
    assert not again.maps.from_cache
    _, doc_idx, sample_idx, shuffle_idx = ref_index_maps(sizes, np.arange(40, dtype=np.int32), 30, S, 99)
    np.testing.assert_array_equal(np.load(victim), shuffle_idx)
    assert GPT2Dataset.build(str(tmp_path / "s"), 30, S, 99, name="train").maps.from_cache


def test_killed_cache_publish_is_refused_until_finished(tmp_path):
    """A writer killed between publishing two of the three maps (its journal in state
    "committing", held there by NEOX_JAX_TEST_PAUSE) leaves a mixed set: the reader refuses it, the
    next neox-jax write into the directory (`atomic.recover`) finishes publishing it."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time
    from pathlib import Path

    from neox_jax import atomic

    sizes = np.random.RandomState(10).randint(1, 100, size=40).astype(np.int32)
    write_corpus(tmp_path / "s", sizes)
    paths = index_map_paths(str(tmp_path / "s"), "train", 30, S, 99)
    script = textwrap.dedent(f"""
        from neox_jax.data.order import GPT2Dataset
        GPT2Dataset.build({str(tmp_path / "s")!r}, 30, {S}, 99, name="train", save_cache=True)
    """)
    env = {**os.environ, "NEOX_JAX_TEST_PAUSE": "publish:60",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not paths[0].exists():
        assert proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert paths[0].exists() and not paths[2].exists()
    with pytest.raises(UserError, match="interrupted replacement is pending"):
        GPT2Dataset.build(str(tmp_path / "s"), 30, S, 99, name="train")
    assert atomic.recover(tmp_path)  # what the next neox-jax write into the directory does first
    ds = GPT2Dataset.build(str(tmp_path / "s"), 30, S, 99, name="train")
    assert ds.maps.from_cache
    _, doc_idx, sample_idx, shuffle_idx = ref_index_maps(sizes, np.arange(40, dtype=np.int32), 30, S, 99)
    np.testing.assert_array_equal(ds.maps.shuffle_idx, shuffle_idx)
