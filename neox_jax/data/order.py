"""GPT-NeoX's training-sample order, rebuilt exactly (Pythia-era `gpt2_dataset.py`, `helpers.cpp`,
`blendable_dataset.py`, `data_utils.py`; GPT-NeoX v1.0 = 71df4d5, identical in these parts to the
`Pythia` branch e15d923).

Inputs: the indexed dataset's item `sizes` (int32; one item per document), `documents` (item ids in
use, normally `arange(len)`), sequence length S, `num_samples`, `seed`.

1. `tokens_per_epoch = sum(sizes[documents])` (int64).
2. `num_epochs` = smallest E >= 1 with `(E * tokens_per_epoch - 1) // S >= num_samples`.
3. One `np.random.RandomState(seed)` is used twice, in this order:
   `doc_idx` = `documents` repeated `num_epochs` times, as int32, then `rng.shuffle(doc_idx)` (all
   epochs shuffled together, so repeated documents interleave through the run);
   `shuffle_idx` = `arange(n)` (uint32, int64 when n >= 2**32 - 2), then `rng.shuffle(shuffle_idx)`.
4. `sample_idx` (int32 [n+1, 2], n = `(num_epochs * tokens_per_epoch - 1) // S`): concatenate the
   documents in `doc_idx` order into one stream; sample j (0-based) is stream positions
   `[j*S, j*S + S]` inclusive, S+1 tokens, so consecutive samples share one boundary token.
   `sample_idx[j] = (d, off)` locates position `j*S`: d is the first entry of doc_idx whose
   document ends after that position, `off` the position inside it.  helpers.cpp walks the stream
   document by document; here `d = searchsorted(ends, j*S, side="right")` over the inclusive cumsum
   `ends` of `sizes[doc_idx]`, which picks the same d (empty documents are skipped the same way) in
   O(n log D) vectorised NumPy.  `sample_idx[0]` is (0, 0) as in the C++ code.
5. `len(dataset) = min(len(shuffle_idx) - 1, len(sample_idx) - 1) = n - 1` (NeoX's off-by-one).
   Item i: `j = shuffle_idx[i]`, tokens from `sample_idx[j]` through `sample_idx[j+1]` inclusive.

Index maps are cached by NeoX as `{prefix}_{name}_indexmap_{num_samples}ns_{S}sl_{seed}s_
{doc,sample,shuffle}_idx.npy` (name "train_0" for Pythia's train-data-paths route, "train" for the
data-path + split route of GPT-NeoX-20B).  When all three exist they are read (memory-mapped, checked
against the dataset; a damaged one is refused naming the file) and no random numbers are drawn.  With
`save_cache` the three are written as one `atomic.Replacement`.  Later GPT-NeoX versions append more to the name;
those caches are not Pythia-era and are not looked for.

Blending (`BlendableDataset`): weights normalised, dataset k and its sample index for global index t
chosen greedily by the largest `w_k * max(t, 1) - count_k` (first k on ties).  With one dataset this is
the identity.  Pre-shuffled Pythia datasets (`PreshuffledDataset`): item i is training sample i.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import atomic
from ..errors import UserError, one_line
from ..values import check_split, check_weights
from .indexed import IndexedDataset, strip_prefix

_INT32_MAX = np.iinfo(np.int32).max


def tokens_per_epoch(documents: np.ndarray, sizes: np.ndarray) -> int:
    return int(np.sum(sizes[documents], dtype=np.int64))


def num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest E >= 1 with (E*T - 1) // S >= num_samples, i.e. E*T >= num_samples*S + 1."""
    if tokens_per_epoch <= 0:
        raise UserError("the dataset has no tokens: cannot build training samples")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, epochs: int, rng: np.random.RandomState) -> np.ndarray:
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, epochs: int,
                     tokens: int, chunk: int = 1 << 22) -> np.ndarray:
    """(index into doc_idx, token offset) of stream position j*S for j = 0..n (see module doc)."""
    if len(doc_idx) > _INT32_MAX:
        raise UserError(f"{len(doc_idx)} documents x epochs do not fit NeoX's int32 sample_idx")
    n = (epochs * tokens - 1) // seq_length
    doc_sizes = sizes[doc_idx]
    ends = np.cumsum(doc_sizes, dtype=np.int64)
    sample_idx = np.zeros((n + 1, 2), dtype=np.int32)
    for a in range(1, n + 1, chunk):
        pos = np.arange(a, min(a + chunk, n + 1), dtype=np.int64) * seq_length
        d = np.searchsorted(ends, pos, side="right")
        sample_idx[a:a + len(pos), 0] = d
        sample_idx[a:a + len(pos), 1] = pos - (ends[d] - doc_sizes[d])
    return sample_idx


def shuffle_idx_dtype(size: int) -> type:
    """NeoX's `_build_shuffle_idx` dtype: uint32, or int64 once size >= uint32 max - 1 (2**32 - 2)."""
    return np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    shuffle_idx = np.arange(size, dtype=shuffle_idx_dtype(size))
    rng.shuffle(shuffle_idx)
    return shuffle_idx


def index_map_paths(prefix: str, name: str, num_samples: int, seq_length: int,
                    seed: int) -> tuple[Path, Path, Path]:
    """NeoX's cache names: doc, sample, shuffle."""
    base = f"{strip_prefix(prefix)}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s"
    return tuple(Path(f"{base}_{k}_idx.npy") for k in ("doc", "sample", "shuffle"))  # type: ignore


@dataclass
class IndexMaps:
    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray
    num_epochs: int
    from_cache: bool


def build_index_maps(prefix: str, name: str, documents: np.ndarray, sizes: np.ndarray,
                     num_samples: int, seq_length: int, seed: int, use_cache: bool = True,
                     save_cache: bool = False) -> IndexMaps:
    """doc_idx, sample_idx, shuffle_idx as GPT-NeoX builds them (reading NeoX's cache when present)."""
    if seq_length < 2:
        raise UserError(f"seq_length must be at least 2, got {seq_length}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise UserError(f"{prefix}: num_samples {num_samples} (--num-samples / --train-iters): must be >= 1")
    tokens = tokens_per_epoch(documents, sizes)
    epochs = num_epochs(tokens, seq_length, num_samples)
    n = (epochs * tokens - 1) // seq_length
    _check_memory(prefix, num_samples, seq_length, n, epochs * len(documents))
    paths = index_map_paths(prefix, name, num_samples, seq_length, seed)
    if use_cache:
        for p in paths:  # a replacement of the three that was interrupted half-published
            note = atomic.pending(p)
            if note:
                raise UserError(note)
    if use_cache and all(p.exists() for p in paths):
        maps = [_load_npy(p, paths) for p in paths]
        _check_cached(paths, maps, n, epochs * len(documents), len(sizes), sizes)
        return IndexMaps(*maps, num_epochs=epochs, from_cache=True)
    rng = np.random.RandomState(seed=seed)
    doc_idx = build_doc_idx(documents, epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, epochs, tokens)
    shuffle_idx = build_shuffle_idx(n, rng)
    if save_cache:
        # every process of a multi-host run may write the same maps: one `atomic.Replacement` of the
        # three (temporaries unique per write, fsynced, published together under a journal), so a
        # killed or concurrent writer never leaves a partial file under a cache name
        with atomic.Replacement(paths, overwrite=True) as rep:
            for p, arr in zip(paths, (doc_idx, sample_idx, shuffle_idx)):
                with open(rep.tmp(p), "wb") as f:
                    np.save(f, arr, allow_pickle=True)
            rep.commit()
    return IndexMaps(doc_idx, sample_idx, shuffle_idx, num_epochs=epochs, from_cache=False)


def _load_npy(path: Path, paths: Sequence[Path]) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        raise UserError(f"{path}: not a readable .npy index map ({one_line(e)}); a damaged cache: delete "
                        f"{', '.join(p.name for p in paths)} to have them rebuilt") from None


def _check_memory(prefix: str, num_samples: int, seq_length: int, n: int, n_doc_idx: int) -> None:
    """Refuse index maps larger than this machine's memory before allocating them (doc_idx int32,
    per-document sizes and ends int64 while building, sample_idx 2 x int32, shuffle_idx up to int64)."""
    need = n_doc_idx * (4 + 8 + 8) + (n + 1) * 8 + n * np.dtype(shuffle_idx_dtype(n)).itemsize
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        have = 2**40
    if need > have:
        raise UserError(f"{prefix}: num_samples {num_samples} (--num-samples / --train-iters) x seq_length "
                        f"{seq_length} needs index maps of {need / 2**30:,.1f} GiB; this machine has "
                        f"{have / 2**30:,.1f} GiB")


def _check_cached(paths, maps, n: int, n_doc_idx: int, n_items: int, sizes: np.ndarray) -> None:
    """Shapes, then values: every index a cached map holds must point inside what it indexes."""
    doc_idx, sample_idx, shuffle_idx = maps
    expect = ((doc_idx, (n_doc_idx,)), (sample_idx, (n + 1, 2)), (shuffle_idx, (n,)))
    for p, (arr, shape) in zip(paths, expect):
        if arr.shape != shape:
            raise UserError(f"{p}: shape {arr.shape}, but this dataset and these settings give {shape} "
                            f"(stale cache for a different dataset, or a damaged one: delete "
                            f"{', '.join(q.name for q in paths)} to have them rebuilt)")

    def first_bad(p: Path, arr: np.ndarray, ok: np.ndarray, what: str) -> None:
        bad = np.flatnonzero(~ok)
        if bad.size:
            i = int(bad[0])
            raise UserError(f"{p}: entry {i} is {arr.reshape(-1)[i] if arr.ndim == 1 else arr[i].tolist()}, "
                            f"outside {what} (corrupt or stale cache: delete {', '.join(q.name for q in paths)} "
                            "to have them rebuilt)")

    first_bad(paths[0], doc_idx, (doc_idx >= 0) & (doc_idx < n_items), f"the dataset's {n_items} documents")
    rows = np.asarray(sample_idx, dtype=np.int64)
    first_bad(paths[1], rows, (rows[:, 0] >= 0) & (rows[:, 0] < n_doc_idx), f"doc_idx's {n_doc_idx} entries")
    docs = np.asarray(doc_idx, dtype=np.int64)[rows[:, 0]]
    first_bad(paths[1], rows, (rows[:, 1] >= 0) & (rows[:, 1] <= np.asarray(sizes, np.int64)[docs]),
              "its document's tokens")
    first_bad(paths[1], rows, np.concatenate([[True], np.diff(rows[:, 0]) >= 0]), "non-decreasing order")
    first_bad(paths[2], shuffle_idx, (shuffle_idx >= 0) & (shuffle_idx < n), f"the {n} samples")


def train_valid_test_split(splits_string: str, size: int) -> list[int]:
    """NeoX's `get_train_valid_test_split_`: document boundaries [0, a, b, size] from e.g. "995,4,1"."""
    splits = check_split(splits_string, "--split")
    total = sum(splits)
    index = [0]
    for s in (x / total for x in splits):
        index.append(index[-1] + int(round(s * float(size))))
    diff = index[-1] - size
    return [index[0]] + [i - diff for i in index[1:]]


def weighted_num_samples(weights: Sequence[float], num_samples: int) -> tuple[list[float], list[int]]:
    """NeoX's `get_normalized_weights_and_num_samples`: w/sum(w), ceil(num_samples * w * 1.005)."""
    weights = check_weights(weights, "dataset weights")
    total = sum(weights)
    norm = [w / total for w in weights]
    return norm, [int(math.ceil(num_samples * w * 1.005)) for w in norm]


class GPT2Dataset:
    """GPT-NeoX's GPT2Dataset over one indexed dataset: item i is a [seq_length + 1] int32 sample."""

    def __init__(self, indexed: IndexedDataset, maps: IndexMaps, seq_length: int):
        self.indexed, self.maps, self.seq_length = indexed, maps, seq_length
        self._len = min(len(maps.shuffle_idx) - 1, len(maps.sample_idx) - 1)

    @classmethod
    def build(cls, prefix: str, num_samples: int, seq_length: int, seed: int = 1234,
              name: str = "train_0", documents: np.ndarray | None = None, use_cache: bool = True,
              save_cache: bool = False) -> "GPT2Dataset":
        indexed = IndexedDataset(prefix)
        if documents is None:
            documents = np.arange(len(indexed), dtype=np.int32)
        maps = build_index_maps(indexed.prefix, name, documents, indexed.sizes, num_samples, seq_length,
                                seed, use_cache=use_cache, save_cache=save_cache)
        return cls(indexed, maps, seq_length)

    def __len__(self) -> int:
        return self._len

    def sample_index(self, i: int) -> int:
        """shuffle_idx[i], with NeoX's fallback: an index past shuffle_idx wraps modulo len(self)."""
        if i < 0:
            raise IndexError(f"negative sample index {i}")
        if i >= len(self.maps.shuffle_idx):
            i %= len(self)
        return int(self.maps.shuffle_idx[i])

    def spans(self, i: int) -> list[tuple[int, int, int]]:
        """(document id, start, stop) token ranges, in order, that make up item i (stop exclusive)."""
        j = self.sample_index(i)
        (df, of), (dl, ol) = self.maps.sample_idx[j], self.maps.sample_idx[j + 1]
        doc_idx, sizes = self.maps.doc_idx, self.indexed.sizes
        if df == dl:
            return [(int(doc_idx[df]), int(of), int(ol) + 1)]
        out = [(int(doc_idx[df]), int(of), int(sizes[doc_idx[df]]))]
        out += [(int(doc_idx[k]), 0, int(sizes[doc_idx[k]])) for k in range(df + 1, dl)]
        out.append((int(doc_idx[dl]), 0, int(ol) + 1))
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        parts = [self.indexed.get(d, a, b - a) for d, a, b in self.spans(i)]
        return np.concatenate(parts).astype(np.int32, copy=False)

    def describe(self, i: int) -> dict:
        spans = self.spans(i)
        return {"sample": self.sample_index(i), "doc_ids": [d for d, _, _ in spans],
                "offsets": [[a, b] for _, a, b in spans]}


class PreshuffledDataset:
    """A pre-shuffled Pythia dataset (e.g. pile-deduped-pythia-preshuffled `document`): item i is the
    (seq_length + 1)-token training sample i; step s used items [B*s, B*(s+1)), B = 1024."""

    def __init__(self, prefix: str, seq_length: int = 2048):
        self.indexed = IndexedDataset(prefix)
        self.seq_length = seq_length
        bad = np.flatnonzero(self.indexed.sizes != seq_length + 1)
        if bad.size:
            i = int(bad[0])
            raise UserError(f"{self.indexed.index_path}: item {i} has {int(self.indexed.sizes[i])} tokens; "
                            f"a pre-shuffled dataset holds {seq_length + 1}-token samples")

    def __len__(self) -> int:
        return len(self.indexed)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.indexed[i].astype(np.int32)

    def describe(self, i: int) -> dict:
        return {"sample": i, "doc_ids": None, "offsets": None}


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """helpers.cpp `build_blending_indices`: (dataset_index uint8, dataset_sample_index int64)."""
    w = [float(x) for x in weights]
    if len(w) == 1:
        return np.zeros(size, dtype=np.uint8), np.arange(size, dtype=np.int64)
    ds_index = np.zeros(size, dtype=np.uint8)
    ds_sample = np.zeros(size, dtype=np.int64)
    counts = [0] * len(w)
    ks = range(1, len(w))
    for t in range(size):
        td = max(float(t), 1.0)
        best, best_err = 0, w[0] * td - counts[0]
        for k in ks:
            err = w[k] * td - counts[k]
            if err > best_err:
                best, best_err = k, err
        ds_index[t] = best
        ds_sample[t] = counts[best]
        counts[best] += 1
    return ds_index, ds_sample


class BlendedDataset:
    """GPT-NeoX's BlendableDataset: len = sum of the datasets' lengths, order from the blending indices.

    `limit` builds only the first `limit` blending entries (they do not depend on later ones): enough to
    replay early steps without the O(len * datasets) Python loop over the whole run."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], limit: int | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise UserError(f"{len(datasets)} datasets but {len(weights)} weights")
        if len(datasets) >= 255:
            raise UserError("at most 254 datasets can be blended (uint8 dataset index)")
        self.datasets = list(datasets)
        self.size = sum(len(d) for d in datasets)
        w = np.array(weights, dtype=np.float64)
        if not np.sum(w) > 0:
            raise UserError("dataset weights must sum to a positive number")
        w /= np.sum(w)
        self.weights = w
        self.built = self.size if limit is None else min(limit, self.size)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(w, self.built)

    def __len__(self) -> int:
        return self.size

    def _locate(self, i: int) -> tuple[int, int]:
        if i >= self.size:
            i %= self.size
        if i >= self.built:
            raise IndexError(f"blending indices were built for the first {self.built} samples only; "
                             f"asked for {i}")
        return int(self.dataset_index[i]), int(self.dataset_sample_index[i])

    def __getitem__(self, i: int) -> np.ndarray:
        k, s = self._locate(i)
        return self.datasets[k][s]

    def describe(self, i: int) -> dict:
        k, s = self._locate(i)
        return {"dataset": k, "dataset_index": s, **self.datasets[k].describe(s)}


def build_train_dataset(prefixes: Sequence[str], seq_length: int, seed: int = 1234, *,
                        num_samples: Sequence[int] | None = None, train_iters: int | None = None,
                        batch: int | None = None, weights: Sequence[float] | None = None,
                        split: str | None = None, use_cache: bool = True, save_cache: bool = False,
                        limit: int | None = None):
    """The training dataset as GPT-NeoX (Pythia era) builds it.

    * `split` given (data-path route, GPT-NeoX-20B): one prefix, documents = the train split
      `[0, boundary[1])`, name "train", num_samples = `num_samples[0]` or `train_iters * batch`.
    * otherwise (train-data-paths route, Pythia): dataset k is `GPT2Dataset("train_k")` with
      `num_samples[k]`, or `ceil(train_iters * batch * w_k * 1.005)`, wrapped in `BlendedDataset`.
    """
    if (num_samples is None) == (train_iters is None):
        raise UserError("give exactly one of num_samples and train_iters")
    if train_iters is not None and batch is None:
        raise UserError("train_iters needs the global batch size")
    if split is not None:
        if len(prefixes) != 1:
            raise UserError("--split works with exactly one --data-prefix (GPT-NeoX's data-path route)")
        indexed = IndexedDataset(prefixes[0])
        bounds = train_valid_test_split(split, len(indexed))
        documents = np.arange(bounds[0], bounds[1], dtype=np.int32)
        if num_samples is not None and len(num_samples) != 1:
            raise UserError("--split takes one num_samples value")
        n = num_samples[0] if num_samples is not None else train_iters * batch
        maps = build_index_maps(indexed.prefix, "train", documents, indexed.sizes, n, seq_length, seed,
                                use_cache, save_cache)
        return GPT2Dataset(indexed, maps, seq_length)
    weights = list(weights) if weights is not None else [1.0] * len(prefixes)
    if len(weights) != len(prefixes):
        raise UserError(f"{len(prefixes)} data prefixes but {len(weights)} weights")
    if num_samples is not None:
        if len(num_samples) != len(prefixes):
            raise UserError(f"{len(prefixes)} data prefixes but {len(num_samples)} sample counts")
        norm, counts = weighted_num_samples(weights, 0)[0], list(num_samples)
    else:
        norm, counts = weighted_num_samples(weights, train_iters * batch)
    datasets = [GPT2Dataset.build(p, c, seq_length, seed, name=f"train_{k}", use_cache=use_cache,
                                  save_cache=save_cache)
                for k, (p, c) in enumerate(zip(prefixes, counts))]
    return BlendedDataset(datasets, norm, limit=limit)
