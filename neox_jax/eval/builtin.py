"""Evaluations without the harness: LAMBADA last-word accuracy, perplexity of documents, and
perplexity of an indexed dataset split (what a study of 154 Pythia checkpoints needs, fast).

* `lambada(...)`: lm-eval's `lambada_openai` definition on a local JSONL of {"text": ...}: the
  context is the text up to its last space, the target is " " + the last word, tokenised as
  lm-eval does (encode context + target, the target is what follows the context's tokens);
  accuracy = every target token is the argmax, perplexity = exp(-mean over documents of the
  target's log-likelihood).  Equal to lm-eval's numbers (tests/eval_test.py).
* `document_perplexity(...)`: `neox-jax score`'s per-token perplexity (rolling windows, first
  token of each document unscored) over a JSONL or text file.
* `indexed_perplexity(...)`: a `.bin/.idx` dataset, optionally one part of a GPT-NeoX
  `--split` (e.g. 969,30,1: `valid` = the documents the trainer holds out for validation); the
  part's documents, in order, are one token stream cut into samples of seq_length + 1 tokens that
  share a boundary token (GPT2Dataset without the shuffle; the trailing partial sample is dropped),
  and the loss is the mean next-token NLL over every sample's seq_length targets, no reset at EOD:
  the trainer's validation loss.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import UserError
from ..jsonl import read_jsonl


def lambada_requests(texts: Sequence[str], tok) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids) per document, as lm-eval's TemplateLM._encode_pair on
    doc_to_text = words[:-1] joined by spaces, doc_to_target = " " + words[-1]."""
    out = []
    for text in texts:
        words = text.split(" ")
        context, target = " ".join(words[:-1]), " " + words[-1]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, target = context[:-n_spaces], context[-n_spaces:] + target
        whole = tok.encode(context + target)
        ctx = tok.encode(context)
        out.append((ctx, whole[len(ctx):]))
    return out


def read_texts(path: str | Path, key: str = "text") -> list[str]:
    p = Path(path)
    texts = []
    for lineno, rec in read_jsonl(p):
        if not isinstance(rec, dict) or not isinstance(rec.get(key), str) or not rec[key].strip():
            raise UserError(f"{p}:{lineno}: expected an object with a non-empty string {key!r}")
        texts.append(rec[key])
    if not texts:
        raise UserError(f"{p}: no documents")
    return texts


def lambada(cfg: ModelConfig, params, tok, path: str | Path, *, batch_size: int = 8, window: int | None = None,
            progress: bool = False) -> dict:
    from ..evaluate import score_continuations

    texts = read_texts(path)
    for i, t in enumerate(texts):
        if " " not in t.strip():
            raise UserError(f"{path}: document {i + 1} has a single word (LAMBADA needs a context and a last word)")
    reqs = lambada_requests(texts, tok)
    scores = score_continuations(cfg, params, reqs, batch_size=batch_size, window=window, progress=progress)
    lls = np.array([s for s, _ in scores], np.float64)
    return {
        "file": str(path),
        "documents": len(texts),
        "accuracy": float(np.mean([g for _, g in scores])),
        "perplexity": float(math.exp(-lls.mean())),
        "mean_target_logprob": float(lls.mean()),
        "target_tokens": int(sum(len(c) for _, c in reqs)),
    }


def perplexity_documents(path: str | Path, tokenizer_path: str | None) -> tuple[list[list[int]], int | None]:
    """`--perplexity FILE`'s documents as token ids and, when every one came as text, their UTF-8 bytes
    (as `score --input`'s); refused, as `score` refuses it, when no document has a token to score."""
    from ..cli import _read_documents
    from ..evaluate import check_scorable

    docs, n_bytes = _read_documents(str(path), tokenizer_path)
    check_scorable(docs, str(path))
    return docs, n_bytes


def document_perplexity(cfg: ModelConfig, params, path: str | Path, tokenizer_path: str | None, *,
                        batch_size: int = 8, window: int | None = None, progress: bool = False,
                        documents: tuple[list[list[int]], int | None] | None = None) -> dict:
    """Perplexity of `path`'s documents (`documents`: what `perplexity_documents` read from it already)."""
    from ..evaluate import score_documents, summarize

    docs, n_bytes = documents if documents is not None else perplexity_documents(path, tokenizer_path)
    lps = score_documents(cfg, params, docs, batch_size=batch_size, window=window, progress=progress,
                          source=str(path))
    return {"file": str(path), **summarize(lps, n_bytes)}


SPLIT_NAMES = ("train", "valid", "test")


def split_documents(n_docs: int, split: str | None, part: str) -> tuple[int, int]:
    """[start, stop) document range of `part` of GPT-NeoX's `split` string (all documents if None)."""
    from ..data.order import train_valid_test_split

    if split is None:
        return 0, n_docs
    if part not in SPLIT_NAMES:
        raise UserError(f"--split-part must be one of {SPLIT_NAMES}, got {part!r}")
    bounds = train_valid_test_split(split, n_docs)
    k = SPLIT_NAMES.index(part)
    return bounds[k], bounds[k + 1]


def stream_samples(indexed, start: int, stop: int, seq_length: int, max_samples: int | None = None) -> np.ndarray:
    """int32 [n, seq_length + 1]: documents [start, stop) concatenated, sample j = tokens
    [j*S, j*S + S] (inclusive), only whole samples."""
    sizes = indexed.sizes[start:stop].astype(np.int64)
    total = int(sizes.sum())
    n = max(0, (total - 1) // seq_length)
    if max_samples is not None:
        n = min(n, max_samples)
    need = n * seq_length + 1 if n else 0
    parts, have = [], 0
    for d in range(start, stop):
        if have >= need:
            break
        t = np.asarray(indexed[d], np.int64)[: need - have]
        parts.append(t)
        have += len(t)
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    idx = np.arange(n)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    return stream[idx].astype(np.int32) if n else np.zeros((0, seq_length + 1), np.int32)


def indexed_perplexity(cfg: ModelConfig, params, prefix: str, *, split: str | None = None, part: str = "valid",
                       seq_length: int | None = None, max_samples: int | None = None, batch_size: int = 8,
                       progress: bool = False) -> dict:
    import jax.numpy as jnp
    from tqdm import tqdm

    from ..data.indexed import IndexedDataset
    from ..data.loader import check_token_range
    from ..evaluate import batch_rows, make_scorer, out_of_memory

    S = seq_length or cfg.max_position_embeddings
    if S < 1 or S > cfg.max_position_embeddings:
        raise UserError(f"--seq-length {S} must be in [1, {cfg.max_position_embeddings}] (the model's context)")
    indexed = IndexedDataset(prefix)
    start, stop = split_documents(len(indexed), split, part)
    samples = stream_samples(indexed, start, stop, S, max_samples)
    if len(samples) == 0:
        raise UserError(f"{prefix}: documents [{start}, {stop}) hold fewer than {S + 1} tokens: no sample")
    check_token_range(samples, cfg.vocab_size, prefix, f"the vocabulary [0, {cfg.vocab_size})")
    scorer = make_scorer(cfg)
    total, count = 0.0, 0
    B = batch_rows(batch_size, len(samples))  # never more rows than samples
    for s in tqdm(range(0, len(samples), B), disable=not progress, desc="perplexity", unit="batch"):
        chunk = samples[s : s + B]
        rows = len(chunk)
        if rows < B:  # one compiled shape: pad the last batch with copies, not counted
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], B - rows, axis=0)])
        with out_of_memory(batch_size, B, S, "samples"):
            lp = scorer(params, jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:]))
            lp = np.asarray(lp, np.float64)[:rows]
        total += float(lp.sum())
        count += lp.size
    return {
        "data_prefix": str(prefix), "split": split, "part": part if split else None,
        "documents": [int(start), int(stop)], "seq_length": S, "samples": len(samples), "tokens_scored": count,
        "mean_nll": -total / count, "perplexity": math.exp(-total / count),
    }
