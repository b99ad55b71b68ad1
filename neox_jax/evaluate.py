"""Scoring: per-token log-probabilities of documents, rolling windows beyond the context.

A document of n tokens gets n-1 log-probabilities, log p(t_i | t_<i) for i = 1..n-1 (the first
token has no prefix and is not scored).  A document longer than the context W is cut into windows
the way lm-eval-harness's `loglikelihood_rolling` does: the first window predicts tokens 1..W from
tokens 0..W-1; every later window predicts the next (up to W) unscored tokens, each with as much
preceding context as fits (the W tokens just before it).  Every token is scored exactly once.

Windows are right-padded to a few bucket lengths and batched; with a causal mask the padding never
influences real positions, so no padding mask is needed.  A batch holds `batch_size` rows, or as many
as there are windows when they are fewer (chosen once per run: each shape compiles once); XLA or NumPy
running out of memory for one is a one-line error asking for a smaller --batch-size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import UserError
from .model import hidden_states, logits_from_hidden, target_logprobs


@dataclasses.dataclass
class Window:
    doc: int
    inputs: list[int]  # model input ids
    targets: list[int]  # inputs shifted by one: targets[j] follows inputs[:j+1]
    keep: int  # score only the last `keep` targets


def check_window(window: int | None, cfg: ModelConfig, option: str = "--context") -> int:
    """The scoring window: `window`, or the model's context when None; 1 <= W <= max_position_embeddings."""
    if window is None:
        return cfg.max_position_embeddings
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"{option} {window}: must be a positive number of tokens")
    if window > cfg.max_position_embeddings:
        raise UserError(f"{option} {window}: exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}")
    return window


def check_batch_size(batch_size: int, option: str = "--batch-size") -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"{option} {batch_size}: must be at least 1")
    return batch_size


def check_scorable(docs: Sequence[Sequence[int]], source: str) -> None:
    """Refuse documents with no token to score (each has fewer than 2 tokens, or there are none)."""
    if not docs:
        raise UserError(f"{source}: nothing to score (no documents)")
    if all(len(d) < 2 for d in docs):
        raise UserError(f"{source}: nothing to score (every document has fewer than 2 tokens)")


def batch_rows(batch_size: int, n: int) -> int:
    """Rows of every batch of a run of `n` rows: `batch_size`, or `n` when fewer (never padding beyond the
    work: a short input at --batch-size 2048 would allocate and score 2048 rows)."""
    return max(1, min(batch_size, n))


@contextlib.contextmanager
def out_of_memory(batch_size: int, rows: int, length: int, what: str = "windows"):
    """A batch too big for the device (XLA's RESOURCE_EXHAUSTED) or the host (MemoryError) as one
    UserError line asking for a smaller --batch-size; any other error passes unchanged."""
    try:
        yield
    except MemoryError:
        kind = "MemoryError"
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        kind = "RESOURCE_EXHAUSTED"
    else:
        return
    raise UserError(f"--batch-size {batch_size}: out of memory scoring {rows} {what} of {length} tokens "
                    f"at once ({kind}); try a smaller --batch-size")


def rolling_windows(doc: int, tokens: Sequence[int], W: int) -> Iterator[Window]:
    if W < 1:
        raise UserError(f"window {W}: must be at least 1 token")
    n = len(tokens)
    if n < 2:
        return
    first = min(W, n - 1)
    yield Window(doc, list(tokens[:first]), list(tokens[1 : first + 1]), first)
    done = first + 1  # tokens[0..done) are scored (token 0 never is)
    while done < n:
        end = min(n, done + W)
        start = end - W  # inputs tokens[start-1 : end-1] predict tokens[start : end]
        inp = tokens[max(start - 1, 0) : end - 1]
        tgt = tokens[max(start, 1) : end]
        yield Window(doc, list(inp), list(tgt), end - done)
        done = end


def _bucket(n: int, W: int) -> int:
    b = 16
    while b < n:
        b *= 2
    return min(b, W)


def make_scorer(cfg: ModelConfig):
    @jax.jit
    def score(params, inputs, targets):
        return target_logprobs(cfg, params, hidden_states(cfg, params, inputs), targets)

    return score


def make_greedy_scorer(cfg: ModelConfig, chunk: int = 256):
    """(log p(target), target == argmax) per position, `chunk` positions of logits at a time."""

    def one(params, h, t):
        logits = logits_from_hidden(cfg, params, h)
        lp = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
        return lp, jnp.argmax(logits, axis=-1) == t

    @jax.jit
    def score(params, inputs, targets):
        h = hidden_states(cfg, params, inputs)
        B, S, D = h.shape
        if S <= chunk or S % chunk:
            return one(params, h, targets)
        hc = h.reshape(B, S // chunk, chunk, D).swapaxes(0, 1)
        tc = targets.reshape(B, S // chunk, chunk).swapaxes(0, 1)
        lp, g = jax.lax.map(lambda a: one(params, *a), (hc, tc))
        return lp.swapaxes(0, 1).reshape(B, S), g.swapaxes(0, 1).reshape(B, S)

    return score


def score_continuations(
    cfg: ModelConfig,
    params,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    window: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """lm-eval `loglikelihood` on token ids: for each (context, continuation), the summed
    log-probability of the continuation and whether every continuation token is the argmax.

    As lm-eval's HF backend: the input is `(context + continuation)[-(W+1):][:-1]` (left-truncated
    to the window W), the last len(continuation) positions are scored, requests run longest first
    in batches of `batch_size` (right-padded to a bucket length; padding is causal-masked away)."""
    W = check_window(window, cfg, "window")
    check_batch_size(batch_size, "batch size")
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise UserError(f"request {i}: context and continuation must both be non-empty token lists")
        if len(cont) > W:
            raise UserError(f"request {i}: continuation of {len(cont)} tokens is longer than the window {W}")
        whole = [int(t) for t in ctx] + [int(t) for t in cont]
        bad = [t for t in whole if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserError(f"request {i}: token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        whole = whole[-(W + 1):]
        rows.append((whole[:-1], whole[1:], len(cont)))
    order = sorted(range(len(rows)), key=lambda j: -len(rows[j][0]))
    scorer = make_greedy_scorer(cfg)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    bar = _progress(len(rows), progress, "loglikelihood")
    B = batch_rows(batch_size, len(rows))
    for s in range(0, len(order), B):
        idx = order[s : s + B]
        L = _bucket(len(rows[idx[0]][0]), W)
        with out_of_memory(batch_size, B, L, "requests"):
            inp = np.zeros((B, L), np.int32)
            tgt = np.zeros((B, L), np.int32)
            for r, j in enumerate(idx):
                inp[r, : len(rows[j][0])] = rows[j][0]
                tgt[r, : len(rows[j][1])] = rows[j][1]
            lp, greedy = (np.asarray(x) for x in scorer(params, jnp.asarray(inp), jnp.asarray(tgt)))
        for r, j in enumerate(idx):
            n, k = len(rows[j][0]), rows[j][2]
            out[j] = (float(np.sum(lp[r, n - k : n], dtype=np.float64)), bool(np.all(greedy[r, n - k : n])))
        bar.update(len(idx))
    bar.close()
    return out


def score_documents(
    cfg: ModelConfig,
    params,
    docs: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    window: int | None = None,
    progress: bool = False,
    source: str | None = None,
) -> list[np.ndarray]:
    """Log-probabilities (float32 numpy, length len(doc)-1) for each document (`source`, the file
    the documents came from, is named in errors)."""
    W = check_window(window, cfg, "window")
    check_batch_size(batch_size, "batch size")
    for i, d in enumerate(docs):
        bad = [t for t in d if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise UserError(f"{source + ': ' if source else ''}document {i}: token id {bad[0]} outside the "
                            f"vocabulary [0, {cfg.vocab_size})")
    windows = [w for i, d in enumerate(docs) for w in rolling_windows(i, d, W)]
    out = [np.zeros(max(len(d) - 1, 0), np.float32) for d in docs]
    filled = [0] * len(docs)
    scorer = make_scorer(cfg)
    # group by bucket length so each compiled shape is reused
    order = sorted(range(len(windows)), key=lambda j: _bucket(len(windows[j].inputs), W))
    bar = _progress(len(windows), progress, "score")
    results: dict[int, np.ndarray] = {}
    B = batch_rows(batch_size, len(windows))
    for s in range(0, len(order), B):
        idx = order[s : s + B]
        L = max(_bucket(len(windows[j].inputs), W) for j in idx)
        with out_of_memory(batch_size, B, L):
            inp = np.zeros((B, L), np.int32)
            tgt = np.zeros((B, L), np.int32)
            for r, j in enumerate(idx):
                w = windows[j]
                inp[r, : len(w.inputs)] = w.inputs
                tgt[r, : len(w.targets)] = w.targets
            lp = np.asarray(scorer(params, jnp.asarray(inp), jnp.asarray(tgt)))
        for r, j in enumerate(idx):
            w = windows[j]
            results[j] = lp[r, len(w.targets) - w.keep : len(w.targets)]
        bar.update(len(idx))
    bar.close()
    for j, w in enumerate(windows):  # windows of a document are in order
        vals = results[j]
        out[w.doc][filled[w.doc] : filled[w.doc] + len(vals)] = vals
        filled[w.doc] += len(vals)
    return out


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="win", dynamic_ncols=True)


def summarize(logprobs: Iterable[np.ndarray], n_bytes: int | None = None) -> dict:
    lps = list(logprobs)
    total = float(sum(float(np.sum(x, dtype=np.float64)) for x in lps))
    count = int(sum(len(x) for x in lps))
    summary = {
        "documents": len(lps),
        "tokens_scored": count,
        "sum_logprob": total,
        "mean_nll": -total / count if count else None,  # None (JSON null), never NaN, when nothing was scored
        "perplexity": math.exp(-total / count) if count else None,
    }
    if n_bytes:
        summary["bits_per_byte"] = -total / math.log(2) / n_bytes
    return summary


def write_scores(path, docs: Sequence[Sequence[int]], logprobs: Sequence[np.ndarray]) -> None:
    with open(path, "w") as f:
        for toks, lp in zip(docs, logprobs):
            rec = {
                "tokens": [int(t) for t in toks],
                "logprobs": [float(x) for x in lp],
                "sum": float(np.sum(lp, dtype=np.float64)),
                "count": int(len(lp)),
            }
            f.write(json.dumps(rec) + "\n")
