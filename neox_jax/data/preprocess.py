"""Tokenise text corpora into a GPT-NeoX indexed dataset, in parallel processes.

Output: `{output_prefix}_{key}_document.bin/.idx` (key = the JSONL text key, "text" by default), the
names and bytes GPT-NeoX's `tools/preprocess_data.py` (v1.0, with lm_dataformat 0.0.20) writes for the
same input and tokenizer:

* Documents, in input order (files in the order given):
  - `.jsonl` / `.jsonl.zst`: one document per line.  A line holding a JSON string is the document;
    an object gives `obj[key]`, a list of strings being joined with "\\n\\n" (lm_dataformat's
    autojoin).  Text is used as is (no strip).  Blank lines are ignored.  A line that is not UTF-8,
    not JSON, lacks the key or holds a non-string is a bad line: skipped and counted (reported with
    file, line number and byte offset, uncompressed for .zst), or fatal with `strict`.
  - `.txt`: `txt_mode="file"` (NeoX's rule): the whole file is one document, read as UTF-8 with
    universal newlines ("\\r\\n" and "\\r" become "\\n").  `txt_mode="blank-lines"`: documents are the
    blocks of consecutive lines separated by one or more blank (empty or whitespace-only) lines, each
    block being its lines joined with "\\n" (no trailing newline).  Undecodable .txt is always fatal.
    A UTF-8 byte order mark opening a file (.txt or JSONL) is skipped (NeoX would keep it as U+FEFF).
  - Empty documents ("") are skipped, as NeoX's reader filter does.
* Tokens: HF tokenizer `encode(text)` with its post-processor (NeoX's `HFTokenizer.tokenize`; the 20B
  tokenizer adds nothing) or sentencepiece `encode(text)`; with `append_eod` the EOD id
  (`<|endoftext|>`, 0 for GPT-NeoX) is appended.  One item per document, doc_idx = [0, 1, ..., N].
  A document that tokenises to nothing: without EOD NeoX records an empty document (doc_idx repeats,
  no item), which we reproduce; with EOD NeoX crashes, we write the item [EOD].
* dtype: uint16 when the vocabulary size is below 65500, else int32 (NeoX's rule), or as forced.

Workers: `workers > 1` spawns that many processes, each loading the tokenizer once; chunks of
documents go out in order with a bounded number in flight (so memory stays flat) and come back in
order.  A tqdm bar over input bytes shows documents and tokens/s.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..atomic import test_pause
from ..errors import UserError
from ..jsonl import BOM, SURROGATE, read_text, zst_lines
from .indexed import IndexedDatasetWriter, best_fitting_dtype, strip_prefix
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
_BLANK_LINES = re.compile(r"\n(?:[ \t\f\v]*\n)+")


@dataclass
class ReadStats:
    documents: int = 0
    empty: int = 0
    bad_lines: int = 0
    examples: list[str] = field(default_factory=list)  # the first few bad-line messages


def input_kind(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl.zst", ".jsonl", ".txt"):
        if name.endswith(suffix):
            return suffix
    raise UserError(f"{path}: unsupported input (expected one of {', '.join(SUFFIXES)})")


def _bad(stats: ReadStats, msg: str, strict: bool) -> None:
    if strict:
        raise UserError(msg)
    stats.bad_lines += 1
    if len(stats.examples) < 5:
        stats.examples.append(msg)


def _jsonl_text(line: bytes, key: str) -> str:
    """The document of one JSONL line (raises ValueError with the reason)."""
    text = line.decode("utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):
        if key not in obj:
            raise ValueError(f"no {key!r} key")
        obj = obj[key]
        if isinstance(obj, list) and all(isinstance(x, str) for x in obj):
            obj = "\n\n".join(obj)
    if not isinstance(obj, str):
        raise ValueError(f"{key!r} is a {type(obj).__name__}, not a string")
    obj.encode("utf-8")  # lone surrogates from \\ud800 escapes cannot be tokenised
    return obj


def _read_jsonl(path: Path, raw, stream, key: str, strict: bool,
                stats: ReadStats) -> Iterator[tuple[str, int]]:
    offset = 0
    for lineno, line in enumerate(stream, 1):
        start, offset = offset, offset + len(line)
        if lineno == 1:
            line = line.removeprefix(BOM)  # "UTF-8 with BOM"
        if not line.strip():
            continue
        try:
            text = _jsonl_text(line, key)
        except UnicodeDecodeError as e:
            _bad(stats, f"{path}: line {lineno} (offset {start}): not UTF-8 ({e.reason} at offset "
                        f"{start + e.start})", strict)
            continue
        except UnicodeEncodeError:
            _bad(stats, f"{path}: line {lineno} (offset {start}): text {SURROGATE}", strict)
            continue
        except ValueError as e:
            _bad(stats, f"{path}: line {lineno} (offset {start}): {e}", strict)
            continue
        yield text, raw.tell()


def _read_txt(path: Path, mode: str) -> list[str]:
    text = read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    if mode == "file":
        return [text]
    blocks = _BLANK_LINES.split(text)
    return [b.strip("\n") for b in blocks if b.strip()]


def iter_documents(paths: Sequence[str | os.PathLike], key: str = "text", txt_mode: str = "file",
                   strict: bool = False, stats: ReadStats | None = None) -> Iterator[tuple[str, int]]:
    """(document text, input bytes consumed so far across all files), skipping empty documents."""
    stats = stats if stats is not None else ReadStats()
    if txt_mode not in ("file", "blank-lines"):
        raise UserError(f"txt mode {txt_mode!r}: expected 'file' or 'blank-lines'")
    done = 0
    for p in map(Path, paths):
        kind = input_kind(p)
        if not p.is_file():
            raise UserError(f"{p}: input file not found")
        size = p.stat().st_size
        if kind == ".txt":
            docs = ((t, size) for t in _read_txt(p, txt_mode))
        else:
            raw = open(p, "rb")
            stream = zst_lines(p, raw) if kind == ".jsonl.zst" else raw
            docs = _read_jsonl(p, raw, stream, key, strict, stats)
        try:
            for text, pos in docs:
                if not text:
                    stats.empty += 1
                    continue
                stats.documents += 1
                yield text, done + pos
        finally:
            if kind != ".txt":
                raw.close()
        done += size


# ----------------------------------------------------------------------------- tokenising workers

_WORKER_TOK: Tokenizer | None = None


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel sends this worker SIGKILL when its parent dies (PR_SET_PDEATHSIG).  A parent
    killed outright (SIGKILL, the OOM killer) runs no cleanup; its workers waited on a queue nobody
    fed, lived on, and printed tracebacks from it.  Elsewhere (not Linux) they still do (a debug log line says so)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = sys.platform.startswith("linux") and libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.debug("tokenising worker %d: no parent-death signal on %s", os.getpid(), sys.platform)
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(1)


def _init_worker(tokenizer_path: str, parent: int) -> None:
    global _WORKER_TOK
    _die_with_parent(parent)
    # a terminal's Ctrl-C reaches every process of the group: the parent handles it (and terminates
    # the pool); a worker interrupted in its task queue would print a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOK = load_tokenizer(tokenizer_path)


def _encode_chunk(texts: list[str], eod: int | None, tok: Tokenizer | None = None) -> list[np.ndarray]:
    tok = tok or _WORKER_TOK
    out = []
    for ids in tok.encode_batch(texts, add_special_tokens=True):
        if eod is not None:
            ids.append(eod)
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def _chunks(docs: Iterator[tuple[str, int]], max_docs: int, max_chars: int):
    texts: list[str] = []
    chars = 0
    pos = 0
    for text, pos in docs:
        texts.append(text)
        chars += len(text)
        if len(texts) >= max_docs or chars >= max_chars:
            yield texts, pos
            texts, chars = [], 0
    if texts:
        yield texts, pos


@dataclass
class PreprocessResult:
    prefix: str
    dtype: str
    documents: int
    tokens: int
    seconds: float
    stats: ReadStats

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def choose_dtype(tok: Tokenizer, dtype: str = "auto") -> np.dtype:
    """NeoX's rule for "auto"; a forced dtype must hold every id of the vocabulary."""
    if dtype == "auto":
        return best_fitting_dtype(tok.vocab_size)
    dt = np.dtype(dtype)
    if dt.kind not in "iu" or tok.vocab_size - 1 > np.iinfo(dt).max:
        raise UserError(f"{tok.path}: vocabulary of {tok.vocab_size} ids does not fit {dt} "
                        f"(max id {np.iinfo(dt).max if dt.kind in 'iu' else 'n/a'})")
    return dt


def preprocess(inputs: Sequence[str | os.PathLike], output_prefix: str, tokenizer: str | os.PathLike,
               *, append_eod: bool = False, workers: int = 1, key: str = "text", txt_mode: str = "file",
               strict: bool = False, dtype: str = "auto", overwrite: bool = False,
               progress: bool | None = None, chunk_docs: int = 256,
               chunk_chars: int = 1 << 20) -> PreprocessResult:
    """Tokenise `inputs` into `{output_prefix}_{key}_document.{bin,idx}` (see the module doc)."""
    if not Path(strip_prefix(output_prefix)).name or str(output_prefix).endswith(("/", os.sep)):
        raise UserError(f"--output-prefix {output_prefix!r}: needs a file name part (e.g. data/shakespeare), "
                        f"not a directory alone")
    tok = load_tokenizer(tokenizer)
    dt = choose_dtype(tok, dtype)
    if append_eod and not tok.has_eod:
        raise UserError(f"{tok.path}: --append-eod needs an <|endoftext|> (or eos) token; this "
                        "tokenizer has none")
    eod = tok.eod_id if append_eod else None
    prefix = f"{strip_prefix(output_prefix)}_{key}_document"
    for p in map(Path, inputs):
        input_kind(p)
        if not p.is_file():
            raise UserError(f"{p}: input file not found")
    total = sum(Path(p).stat().st_size for p in inputs)
    stats = ReadStats()
    chunks = _chunks(iter_documents(inputs, key, txt_mode, strict, stats), chunk_docs, chunk_chars)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenising", dynamic_ncols=True,
               disable=not (sys.stderr.isatty() if progress is None else progress))
    start = time.perf_counter()
    n_tokens = n_docs = 0
    pool = None
    try:
        with IndexedDatasetWriter(prefix, dt, overwrite=overwrite) as writer:
            if workers > 1:
                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=(str(tok.path), os.getpid()))
                results = _ordered(pool, chunks, eod, window=2 * workers)
            else:
                results = ((_encode_chunk(texts, eod, tok), pos) for texts, pos in chunks)
            for encoded, pos in results:
                for ids in encoded:
                    if ids.size:
                        writer.add_item(ids)
                    writer.end_document()
                    n_tokens += int(ids.size)
                n_docs += len(encoded)
                test_pause("preprocess-chunk")
                bar.update(pos - bar.n)
                bar.set_postfix(docs=n_docs, tok_s=f"{n_tokens / (time.perf_counter() - start):,.0f}")
            if n_docs == 0:  # raised inside the writer: nothing is written
                if stats.examples:
                    log.warning("bad lines: %s", "; ".join(stats.examples))
                raise UserError(f"{', '.join(map(str, inputs))}: no document to write: {stats.bad_lines} bad "
                                f"line(s) skipped, {stats.empty} empty document(s)")
    finally:
        if pool is not None:
            _stop(pool)
        bar.close()
    seconds = time.perf_counter() - start
    if stats.bad_lines:
        log.warning("skipped %d bad lines (first: %s)", stats.bad_lines, "; ".join(stats.examples))
    return PreprocessResult(prefix, str(dt), n_docs, n_tokens, seconds, stats)


def _ordered(pool: ProcessPoolExecutor, chunks, eod, window: int):
    """Run chunks on the pool with at most `window` in flight; yield results in input order."""
    pending: deque = deque()
    for texts, pos in chunks:
        pending.append((pool.submit(_encode_chunk, texts, eod), pos))
        if len(pending) >= window:
            res, p = pending.popleft()
            yield res.result(), p
    while pending:
        res, p = pending.popleft()
        yield res.result(), p


def _stop(pool: ProcessPoolExecutor) -> None:
    """End the workers, whatever state they are in.  A scheduler's SIGTERM reaches the whole process
    group, workers included: `multiprocessing.Pool.terminate` then waited forever for a queue lock
    that a killed worker held (every group SIGTERM during tokenising hung the command).  The
    executor's workers are killed (SIGKILL: they hold nothing of ours; the output's temporaries are
    the parent's) and the executor shut down without waiting for the work it had queued."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)
