"""A deterministic, checkpointable, per-host data loader with background prefetch.

Batch layout (GPT-NeoX's `SequentialSampler` + non-interleaved `DistributedBatchSampler`): global step
s consumes dataset items `[s*B, (s+1)*B)` in order; process h of H takes the contiguous rows
`[h*B/H, (h+1)*B/H)` of that global batch.  A batch is therefore a pure function of (step, process),
the global batch does not depend on how many processes read it, and the loader state is one integer
(`step`, plus `global_batch` and `dataset_len` to refuse a resume against a different setup).
Resuming is O(1): the next batch is computed from the step, nothing is replayed.  The last partial
global batch is dropped (drop_last, as NeoX does); iteration stops after `len(dataset) // B` steps.

Why not grain: the order is GPT-NeoX's precomputed permutation (shuffle_idx + blending), so grain's
`IndexSampler` shuffle cannot be used, and its `ShardOptions` split records across processes rather
than splitting each global batch into contiguous per-host slices.  With those removed, grain would only
provide the prefetch threads, at the cost of a version-dependent iterator state; a few dozen lines of
`ThreadPoolExecutor` do the same with a state we define.  (Any of our datasets has `__len__` and
`__getitem__`, so it can still be a grain `MapDataset.source` for users who want grain.)

Prefetch: `prefetch` future batches are computed ahead by `num_threads` threads (a batch is a few
NumPy slices and copies per row from the memory-mapped `.bin`, far faster than training consumes
them: see bench/loader_throughput.py), so `next()` normally returns a finished batch.

Batches are dicts of NumPy arrays: `tokens` int32 [B/H, S+1] (inputs `tokens[:, :-1]`, labels
`tokens[:, 1:]`), and with `segment_ids=True` also `segment_ids` int32 [B/H, S+1]: 1 + the number of
EOD tokens before each position in the row, so every document (ending with its EOD) is one segment,
for per-document attention.  NeoX itself trains without segments (no per-document reset).

Token range: with `vocab_size`, every batch is checked on the host as it is produced (a min and a
max over the batch, negligible next to reading it): a token id outside [0, vocab_size) is a
UserError naming `source` and the id (`check_token_range`), where it would otherwise index past
the embedding and turn the loss into NaN.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np

from ..errors import UserError


def segment_ids_from_eod(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """seg[..., t] = 1 + count(tokens[..., :t] == eod_id): the EOD closes its own document."""
    is_eod = (tokens == eod_id).astype(np.int32)
    seg = np.ones_like(is_eod)
    np.cumsum(is_eod[..., :-1], axis=-1, out=seg[..., 1:])
    seg[..., 1:] += 1
    return seg


def pack_documents(documents: Iterable[Iterable[int]], seq_length: int, eod_id: int,
                   append_eod: bool = True) -> Iterator[np.ndarray]:
    """Pack documents into rows the NeoX way: concatenate them (each followed by EOD when
    `append_eod`), cut rows of seq_length + 1 tokens at stream positions [j*S, j*S + S] (consecutive
    rows share one boundary token, like GPT2Dataset samples), drop the final partial row."""
    row = seq_length + 1
    buf = np.zeros(0, dtype=np.int32)
    for doc in documents:
        parts = [buf, np.asarray(doc, dtype=np.int32).reshape(-1)]
        if append_eod:
            parts.append(np.array([eod_id], dtype=np.int32))
        buf = np.concatenate(parts)
        start = 0
        while len(buf) - start >= row:
            yield buf[start:start + row].copy()
            start += seq_length
        buf = buf[start:]


def check_token_range(tokens: np.ndarray, vocab_size: int, source: str, limit: str | None = None) -> None:
    """Refuse token ids outside [0, vocab_size): `SOURCE: token id N outside LIMIT` (N the largest id
    that is too large, else the smallest negative one; LIMIT by default `model.vocab_size V`)."""
    if not tokens.size:
        return
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi >= vocab_size or lo < 0:
        raise UserError(f"{source}: token id {hi if hi >= vocab_size else lo} outside "
                        f"{limit or f'model.vocab_size {vocab_size}'}")


class Loader:
    """Iterate this process's share of global batches `start_step, start_step + 1, ...` of `dataset`.

    `dataset`: anything with `__len__` and `__getitem__(i) -> int array [S+1]` (GPT2Dataset,
    BlendedDataset, PreshuffledDataset, a NumPy array of rows).  `process_index`/`process_count`
    default to `jax.process_index()` / `jax.process_count()`.  `vocab_size`: check every batch's
    token ids against it (`check_token_range`; `source` names the data in the error)."""

    def __init__(self, dataset, global_batch: int, *, start_step: int = 0, num_steps: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 segment_ids: bool = False, eod_id: int = 0, prefetch: int = 4, num_threads: int = 2,
                 vocab_size: int | None = None, source: str = "dataset"):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch <= 0 or global_batch % process_count:
            raise UserError(f"global batch {global_batch} must be a positive multiple of the "
                            f"{process_count} processes")
        if not 0 <= process_index < process_count:
            raise UserError(f"process index {process_index} outside [0, {process_count})")
        self.dataset = dataset
        self.global_batch = global_batch
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = global_batch // process_count
        self.segment_ids, self.eod_id = segment_ids, eod_id
        self.vocab_size, self.source = vocab_size, source
        available = len(dataset) // global_batch
        self.num_steps = available if num_steps is None else num_steps
        if self.num_steps > available:
            raise UserError(f"{num_steps} steps of {global_batch} need {num_steps * global_batch} samples; "
                            f"the dataset has {len(dataset)}")
        if not 0 <= start_step <= self.num_steps:
            raise UserError(f"start step {start_step} outside [0, {self.num_steps}]")
        self.step = start_step
        self.prefetch = max(0, prefetch)
        self._pool = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="neox-loader")
        self._pending: deque[tuple[int, Future]] = deque()

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step` (no side effects)."""
        first = step * self.global_batch + self.process_index * self.local_batch
        tokens = np.stack([np.asarray(self.dataset[i], dtype=np.int32)
                           for i in range(first, first + self.local_batch)])
        if self.vocab_size is not None:
            check_token_range(tokens, self.vocab_size, self.source)
        out = {"tokens": tokens}
        if self.segment_ids:
            out["segment_ids"] = segment_ids_from_eod(tokens, self.eod_id)
        return out

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step >= self.num_steps:
            raise StopIteration
        last = self._pending[-1][0] if self._pending else self.step - 1
        for s in range(last + 1, min(self.step + 1 + self.prefetch, self.num_steps)):
            self._pending.append((s, self._pool.submit(self.batch, s)))
        s, fut = self._pending.popleft()
        assert s == self.step
        self.step += 1
        return fut.result()

    def state(self) -> dict[str, int]:
        """The checkpointable state: the next step this loader returns, plus two consistency checks."""
        return {"step": self.step, "global_batch": self.global_batch, "dataset_len": len(self.dataset)}

    def set_state(self, state: dict) -> None:
        """Continue from `state` (from `state()`); O(1): only the step changes."""
        for key in ("global_batch", "dataset_len"):
            mine = self.state()[key]
            if int(state.get(key, mine)) != mine:
                raise UserError(f"loader state has {key}={state[key]}, this loader has {mine}")
        step = int(state["step"])
        if not 0 <= step <= self.num_steps:
            raise UserError(f"loader state step {step} outside [0, {self.num_steps}]")
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self.step = step

    def close(self) -> None:
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def global_batch_arrays(local: dict[str, np.ndarray], sharding, global_batch: int) -> dict:
    """Assemble each process's rows into global `jax.Array`s of leading dimension `global_batch`
    (`jax.make_array_from_process_local_data`; `sharding` splits the batch axis over processes in
    process order, e.g. `NamedSharding(mesh, P("data"))` on a mesh built from `jax.devices()`)."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
            for k, v in local.items()}
