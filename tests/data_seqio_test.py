"""seqio: the NeoX vocabulary, a Task over a local text file, a Mixture, SentencePieceVocabulary, and both
routes into training (indexed dataset + Loader, and streamed NeoX-style packing)."""

import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf
from tokenizers import Tokenizer as HFTokenizer

from neox_jax.data.indexed import IndexedDataset
from neox_jax.data.loader import Loader
from neox_jax.data.order import GPT2Dataset
from neox_jax.data.seqio_tasks import (NeoXVocabulary, packed_rows, task_documents, text_line_task,
                                       write_indexed)
from neox_jax.data.train_tokenizer import train_sentencepiece


@pytest.fixture(scope="module")
def lines(shakespeare):
    return shakespeare.split("\n")[:400]


@pytest.fixture()
def text_file(tmp_path, lines):
    p = tmp_path / "lines.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_neox_vocabulary(neox_tokenizer_path):
    vocab = NeoXVocabulary(neox_tokenizer_path)
    hf = HFTokenizer.from_file(str(neox_tokenizer_path))
    text = "Before we proceed any further, hear me speak.  é 日本"
    ids = hf.encode(text).ids
    assert vocab.encode(text) == ids
    assert vocab.eos_id == 0 and vocab.pad_id == 1 and vocab.unk_id is None and vocab.vocab_size == 50277
    assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
    assert vocab.decode(ids + [0, 500, 600]) == text + "<|endoftext|>"  # seqio decodes through the first EOS
    assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode() == text
    batch = tf.constant([ids[:3], ids[3:6]], tf.int32)
    assert [t.decode() for t in vocab.decode_tf(batch).numpy()] == [hf.decode(ids[:3]), hf.decode(ids[3:6])]
    assert vocab == NeoXVocabulary(neox_tokenizer_path)


def test_text_task_feeds_the_loader(tmp_path, text_file, lines, neox_tokenizer_path):
    vocab = NeoXVocabulary(neox_tokenizer_path)
    task = text_line_task("neox_test_lines", text_file, vocab)
    hf = HFTokenizer.from_file(str(neox_tokenizer_path))
    expected = [hf.encode(line).ids + [0] for line in lines if line]  # empty lines skipped, EOD appended
    docs = [d.tolist() for d in task_documents(task)]
    assert docs == expected
    # route 1: task -> indexed dataset -> NeoX order -> checkpointable loader
    prefix = write_indexed(task, tmp_path / "lines_text_document")
    ds_items = IndexedDataset(prefix)
    assert [ds_items[i].tolist() for i in range(len(ds_items))] == expected
    seq = 16
    ds = GPT2Dataset.build(prefix, 40, seq, 1234)
    stream = np.concatenate([expected[d] for d in ds.maps.doc_idx])
    loader = Loader(ds, 4, process_index=0, process_count=1, segment_ids=True)
    for step, batch in zip(range(3), loader):
        for r, row in enumerate(batch["tokens"]):
            j = ds.sample_index(step * 4 + r)
            np.testing.assert_array_equal(row, stream[j * seq: j * seq + seq + 1])
    assert loader.state()["step"] == 3
    loader.close()
    # route 2: streamed NeoX-style packing
    flat = np.concatenate(expected)
    rows = list(packed_rows(task, seq))
    assert len(rows) == (len(flat) - 1) // seq
    for j in (0, 1, len(rows) - 1):
        np.testing.assert_array_equal(rows[j], flat[j * seq: j * seq + seq + 1])


def test_mixture_and_sentencepiece_vocabulary(tmp_path, text_file, lines, neox_tokenizer_path):
    model = train_sentencepiece([text_file], tmp_path / "sp.model", 400)
    sp_vocab = seqio.SentencePieceVocabulary(str(model))
    sp_task = text_line_task("sp_test_lines", text_file, sp_vocab)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp_vocab.eos_id == 0
    sp_docs = [d.tolist() for d in task_documents(sp_task)]
    assert sp_docs == [sp.encode(line) + [0] for line in lines if line]
    assert sp_vocab.decode(sp_docs[0]) == next(line for line in lines if line)

    neox_task = text_line_task("neox_mix_lines", text_file, NeoXVocabulary(neox_tokenizer_path))
    mix = seqio.Mixture("neox_test_mix", [(neox_task, 1.0), (neox_task, 3.0)])
    prefix = write_indexed(mix, tmp_path / "mix", max_examples=50)
    ds = IndexedDataset(prefix)
    assert len(ds) == 50 and all(ds[i][-1] == 0 for i in range(50))
    rows = packed_rows(mix, 8, num_epochs=None)  # an endless mixture stream
    first = [next(rows) for _ in range(5)]
    assert all(r.shape == (9,) for r in first)


def test_mixture_rates_and_content(tmp_path, lines, neox_tokenizer_path):
    """Two different Tasks mixed 1:3: every example is one task's line tokenised with EOS (the tokenizers
    library is the reference), each task's examples come in its file order (cycling when repeated), and
    the share of the second task is 3/4 within 5 binomial standard deviations."""
    a_lines = [x for x in lines[:200] if x]
    b_lines = [f"B> {x}" for x in lines[200:400] if x]
    (tmp_path / "a.txt").write_text("\n".join(a_lines) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(b_lines) + "\n", encoding="utf-8")
    vocab = NeoXVocabulary(neox_tokenizer_path)
    mix = seqio.Mixture("neox_rates_mix", [(text_line_task("mix_a", tmp_path / "a.txt", vocab), 1.0),
                                           (text_line_task("mix_b", tmp_path / "b.txt", vocab), 3.0)])
    hf = HFTokenizer.from_file(str(neox_tokenizer_path))
    enc = {"a": [tuple(hf.encode(x).ids + [0]) for x in a_lines], "b": [tuple(hf.encode(x).ids + [0]) for x in b_lines]}
    assert not set(enc["a"]) & set(enc["b"])
    N = 600
    docs = []
    for ids in task_documents(mix, num_epochs=None):
        docs.append(tuple(ids.tolist()))
        if len(docs) == N:
            break
    source = ["a" if d in set(enc["a"]) else "b" if d in set(enc["b"]) else None for d in docs]
    assert None not in source  # every example is a whole line of one task, EOS appended
    for t in ("a", "b"):
        mine = [d for d, s in zip(docs, source) if s == t]
        n = len(enc[t])
        assert mine == [enc[t][i % n] for i in range(len(mine))], t  # in order, cycling
    share = source.count("b") / N
    sigma = (0.75 * 0.25 / N) ** 0.5
    assert abs(share - 0.75) < 5 * sigma, share
    # the indexed dataset written from the mixture holds the same stream of documents
    prefix = write_indexed(mix, tmp_path / "mixed", max_examples=120)
    ds = IndexedDataset(prefix)
    assert [tuple(ds[i].tolist()) for i in range(len(ds))] == docs[:120]
