"""seqio integration: a `seqio.Vocabulary` for the GPT-NeoX tokenizer, text-file Tasks, and two ways for
a Task or Mixture to feed training.

* `NeoXVocabulary(path)`: wraps an HF tokenizers JSON (default the 20B tokenizer) or a sentencepiece
  model loaded through `load_tokenizer`.  eos = EOD (`<|endoftext|>` = 0), pad = `<|padding|>` (1)
  when present, no unk.  `encode_tf` works on a scalar string and `decode_tf` on rank-1 or rank-2 id
  tensors (pad ids dropped), through `tf.numpy_function` (the Rust / C++ tokenizers are not TF ops).
  `seqio.SentencePieceVocabulary` works unchanged for sentencepiece models (`train-tokenizer`
  writes one with eos = `<|endoftext|>` = 0).
* `text_line_task(name, files, vocabulary)`: a Task over local text files, one example per non-empty
  line (`{"targets": line}` tokenised, EOS appended, as NeoX's `--append-eod`).
* Feeding training:
  - `write_indexed(task, prefix)`: materialise a split into a NeoX `.bin/.idx` dataset (one document
    per example).  `GPT2Dataset.build` + `Loader` then give the exact NeoX sample order with an O(1)
    resumable state.  This is the route for real training runs.
  - `packed_rows(task, seq_length)`: stream the examples and pack them NeoX-style (rows of
    seq_length + 1 tokens sharing one boundary token) for quick experiments; a stream can only be
    resumed by replaying it, so use `write_indexed` where resumption matters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf

from ..errors import UserError
from .indexed import IndexedDatasetWriter, best_fitting_dtype
from .loader import pack_documents
from .tokenizer import default_tokenizer_path, load_tokenizer


class NeoXVocabulary(seqio.Vocabulary):
    """seqio vocabulary over the GPT-NeoX tokenizer (or any file `load_tokenizer` reads)."""

    def __init__(self, path: str | os.PathLike | None = None, extra_ids: int = 0):
        self.path = str(path if path is not None else default_tokenizer_path())
        self._tok = load_tokenizer(self.path)
        pad = self._tok._tok.token_to_id("<|padding|>") if self._tok.kind == "hf" else None
        self._pad = 0 if pad is None else pad
        super().__init__(extra_ids=extra_ids)

    @property
    def eos_id(self) -> int:
        return self._tok.eod_id

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def unk_id(self) -> None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self._tok.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self._tok.encode(s)

    def _decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def enc(x) -> np.ndarray:  # bytes, or a 0-d object array when called eagerly
            x = x.item() if isinstance(x, np.ndarray) else x
            return np.asarray(self._tok.encode(x.decode("utf-8")), dtype=np.int32)

        ids = tf.numpy_function(enc, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def dec(a: np.ndarray) -> np.ndarray:
            # seqio replaces everything after the first EOS with pad_id; those ids are dropped here
            rows = a.reshape(-1, a.shape[-1])
            out = np.array([self._tok.decode(r[r != self._pad].tolist()).encode("utf-8") for r in rows],
                           dtype=object)
            return out.reshape(a.shape[:-1])

        text = tf.numpy_function(dec, [ids], tf.string, stateful=False)
        text.set_shape(ids.shape[:-1])
        return text

    def __eq__(self, other) -> bool:
        return isinstance(other, NeoXVocabulary) and other.path == self.path \
            and other.extra_ids == self.extra_ids

    def __hash__(self) -> int:
        return hash((self.path, self.extra_ids))


def _lines_to_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    dataset = dataset.filter(lambda line: tf.strings.length(line) > 0)  # NeoX skips empty documents
    return dataset.map(lambda line: {"targets": line}, num_parallel_calls=tf.data.AUTOTUNE)


def text_line_task(name: str, files: str | os.PathLike | Sequence[str | os.PathLike],
                   vocabulary: seqio.Vocabulary, split: str = "train") -> seqio.Task:
    """A Task (not registered) whose `split` examples are the lines of `files` (glob patterns allowed)."""
    patterns = [str(files)] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]
    source = seqio.TextLineDataSource({split: patterns})
    return seqio.Task(
        name, source,
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
        preprocessors=[_lines_to_targets, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        shuffle_buffer_size=None)


def task_documents(task: seqio.Task | seqio.Mixture, split: str = "train", *, feature: str = "targets",
                   shuffle: bool = False, seed: int | None = None,
                   num_epochs: int | None = 1) -> Iterator[np.ndarray]:
    """The token ids of `feature` for each example of a Task or Mixture, in dataset order."""
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=seed,
                          num_epochs=num_epochs, use_cached=False)
    for ex in ds.as_numpy_iterator():
        yield ex[feature]


def write_indexed(task: seqio.Task | seqio.Mixture, output_prefix: str | os.PathLike,
                  split: str = "train", *, feature: str = "targets", max_examples: int | None = None,
                  overwrite: bool = False) -> str:
    """Write a split's examples (each one document, EOS as produced by the task) to a NeoX indexed
    dataset at `output_prefix`; uint16 when the feature's vocabulary has < 65500 ids, else int32.
    A Mixture repeats forever by default, so give it `max_examples`."""
    vocab = task.output_features[feature].vocabulary
    writer = IndexedDatasetWriter(output_prefix, best_fitting_dtype(vocab.vocab_size), overwrite=overwrite)
    epochs = 1 if isinstance(task, seqio.Task) else None
    if epochs is None and max_examples is None:
        raise UserError("a Mixture is an endless stream: give max_examples")
    with writer:
        for k, ids in enumerate(task_documents(task, split, feature=feature, num_epochs=epochs)):
            if max_examples is not None and k >= max_examples:
                break
            writer.add_document(ids)
    return str(Path(writer.prefix))


def packed_rows(task: seqio.Task | seqio.Mixture, seq_length: int, split: str = "train", *,
                feature: str = "targets", num_epochs: int | None = 1) -> Iterator[np.ndarray]:
    """NeoX-style packed rows [seq_length + 1] from the examples (which already end in EOS)."""
    docs = task_documents(task, split, feature=feature, num_epochs=num_epochs)
    eos = task.output_features[feature].vocabulary.eos_id
    return pack_documents(docs, seq_length, eos, append_eod=False)

