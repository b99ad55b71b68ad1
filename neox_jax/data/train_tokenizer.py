"""Train a tokenizer on a corpus (the same `.jsonl`, `.jsonl.zst`, `.txt` inputs as preprocessing).

* `kind="bpe"`: an HF `tokenizers` JSON built like GPT-NeoX's 20B tokenizer: byte-level BPE, NFC
  normaliser, ByteLevel pre-tokenizer / post-processor / decoder with `add_prefix_space=False`, no
  unk token, ids 0 and 1 = `<|endoftext|>` (EOD) and `<|padding|>`, all 256 byte symbols in the
  initial alphabet (so every text encodes and decodes losslessly up to NFC normalisation).
* `kind="sentencepiece"` (`model_type` "bpe" or "unigram"): a `.model` with id 0 = `<|endoftext|>`
  (as eos: GPT-NeoX's SentencePieceTokenizer takes that piece as EOD), 1 = `<|padding|>` (pad),
  2 = `<unk>`, no bos, identity normalisation, whitespace kept, byte fallback (lossless decode).
  SentencePiece trains on sentences: each document's lines are fed as separate sentences.

Outputs are written under a temporary name and published by `atomic.Replacement` (fsynced, then
renamed over the old file); an existing output is refused unless `overwrite`.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

from ..atomic import Replacement, check_destination
from ..errors import Terminated, UserError
from .preprocess import ReadStats, iter_documents

log = logging.getLogger(__name__)

SPECIALS = ("<|endoftext|>", "<|padding|>")


def _texts(inputs: Sequence[str | os.PathLike], key: str, txt_mode: str, stats: ReadStats) -> Iterator[str]:
    for text, _ in iter_documents(inputs, key=key, txt_mode=txt_mode, stats=stats):
        yield text


def _check_read(inputs: Sequence[str | os.PathLike], stats: ReadStats) -> None:
    """Once the trainer has read the inputs: report skipped lines (as preprocessing does), refuse a
    corpus without a document (a tokenizer trained on nothing holds only the byte symbols)."""
    if stats.bad_lines:
        log.warning("skipped %d bad lines (first: %s)", stats.bad_lines, "; ".join(stats.examples))
    if stats.documents == 0:
        raise UserError(f"{', '.join(map(str, inputs))}: no document to train on: {stats.bad_lines} bad line(s) "
                        f"skipped, {stats.empty} empty document(s)")


MAX_VOCAB = 2**22  # far above any real tokenizer; larger requests make the Rust trainer abort


def _check_output(path: Path, overwrite: bool) -> None:
    check_destination(path, overwrite, directory=False)  # which refuses an unwritable directory too


def check_vocab_size(vocab_size: int) -> None:
    if not 256 + len(SPECIALS) <= vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab-size {vocab_size}: must lie in [{256 + len(SPECIALS)}, {MAX_VOCAB}] "
                        f"(256 byte symbols + {len(SPECIALS)} specials at least)")


def _trainer_error(output: Path, e: BaseException) -> UserError:
    """A tokenizer library failure (a Python exception or a Rust panic) as one line naming OUTPUT."""
    if isinstance(e, UserError):
        return e
    first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
    return UserError(f"{output}: tokenizer training failed ({e.__class__.__name__}: {first})")


def train_bpe(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, vocab_size: int, *,
              min_frequency: int = 2, key: str = "text", txt_mode: str = "file",
              overwrite: bool = False, progress: bool = False) -> Path:
    """Train a byte-level BPE and save it as an HF tokenizers JSON at `output`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    out = Path(output)
    check_vocab_size(vocab_size)
    if min_frequency < 0:
        raise UserError(f"--min-frequency {min_frequency}: must be >= 0")
    _check_output(out, overwrite)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIALS), show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stats = ReadStats()
    texts = _texts(inputs, key, txt_mode, stats)
    for p in map(Path, inputs):  # a missing input fails before training starts
        if not p.is_file():
            raise UserError(f"{p}: input file not found")
    failure: list[BaseException] = []

    def guarded():  # an exception raised inside the Rust trainer's iteration comes back as a panic
        try:
            yield from texts
        except BaseException as e:
            failure.append(e)
            raise

    try:
        tok.train_from_iterator(guarded(), trainer=trainer)
    except (KeyboardInterrupt, Terminated, SystemExit):
        raise
    except BaseException as e:  # pyo3's PanicException derives from BaseException
        if failure and isinstance(failure[0], (KeyboardInterrupt, Terminated)):  # came back as a panic
            raise failure[0] from None
        raise _trainer_error(out, failure[0] if failure else e) from None
    _check_read(inputs, stats)
    with Replacement([out], overwrite=overwrite) as rep:
        tok.save(str(rep.tmp()))
        rep.commit()
    return out


def train_sentencepiece(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, vocab_size: int, *,
                        model_type: str = "bpe", key: str = "text", txt_mode: str = "file",
                        overwrite: bool = False, max_sentences: int = 10_000_000) -> Path:
    """Train a sentencepiece model and save it at `output` (a path ending in `.model`)."""
    import sentencepiece as spm

    out = Path(output)
    if out.suffix != ".model":
        raise UserError(f"{out}: a sentencepiece output must end in .model")
    check_vocab_size(vocab_size)
    _check_output(out, overwrite)
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"sentencepiece model type {model_type!r}: expected bpe or unigram")

    stats = ReadStats()

    def sentences() -> Iterator[str]:
        for text in _texts(inputs, key, txt_mode, stats):
            yield from (line for line in text.split("\n") if line.strip())

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, eos_id=0, eos_piece=SPECIALS[0], pad_id=1, pad_piece=SPECIALS[1],
            unk_id=2, bos_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
            byte_fallback=True, input_sentence_size=max_sentences, shuffle_input_sentence=True,
            allow_whitespace_only_pieces=True, minloglevel=2)
    except RuntimeError as e:
        _check_read(inputs, stats)  # no document: say so, not the trainer's assertion
        raise UserError(f"{out}: sentencepiece training failed: {str(e).strip().splitlines()[0][:200]}") from None
    _check_read(inputs, stats)
    with Replacement([out], overwrite=overwrite) as rep:
        rep.tmp().write_bytes(model.getvalue())
        rep.commit()
    return out
