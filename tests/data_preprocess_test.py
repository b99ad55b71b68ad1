"""Preprocessing: text -> preprocess -> read -> decode round trip with the real GPT-NeoX tokenizer, the
exact .idx/.bin bytes GPT-NeoX's preprocess_data.py would write (rebuilt here from the tokenizer and the
published layout), input formats, parallel workers, bad input."""

import json
import os
import struct

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer as HFTokenizer

from neox_jax.data.indexed import IndexedDataset
from neox_jax.data.preprocess import ReadStats, iter_documents, preprocess
from neox_jax.errors import UserError


def published_bytes(token_lists, dtype="<u2", code=8):
    """(.bin, .idx) for one item per document, from the documented layout."""
    itemsize = np.dtype(dtype).itemsize
    sizes = [len(t) for t in token_lists]
    pointers = [sum(sizes[:k]) * itemsize for k in range(len(sizes))]
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(sizes), len(sizes) + 1)
           + b"".join(struct.pack("<i", s) for s in sizes) + b"".join(struct.pack("<q", q) for q in pointers)
           + b"".join(struct.pack("<q", d) for d in range(len(sizes) + 1)))
    binary = b"".join(np.asarray(t, dtype).tobytes() for t in token_lists)
    return binary, idx


@pytest.fixture(scope="module")
def documents(shakespeare):
    # blank-line-separated speeches; a few documents keep leading/trailing whitespace (never stripped)
    docs = [d for d in shakespeare.split("\n\n") if d][:600]
    docs[3] = "  " + docs[3] + "\n"
    docs[10] = "unicode: é ü 日本語 🙂"
    return docs


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "meta": {}}) + "\n")


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_and_neox_bytes(tmp_path, documents, neox_tokenizer_path, workers):
    write_jsonl(tmp_path / "in.jsonl", documents)
    res = preprocess([tmp_path / "in.jsonl"], str(tmp_path / "out"), neox_tokenizer_path, append_eod=True,
                     workers=workers, chunk_docs=37)
    assert res.prefix == str(tmp_path / "out_text_document") and res.dtype == "uint16"
    assert res.documents == len(documents) and res.tokens_per_second > 0
    hf = HFTokenizer.from_file(str(neox_tokenizer_path))
    expected = [hf.encode(d).ids + [0] for d in documents]  # what NeoX's HFTokenizer.tokenize + eod give
    binary, idx = published_bytes(expected)
    assert (tmp_path / "out_text_document.bin").read_bytes() == binary
    assert (tmp_path / "out_text_document.idx").read_bytes() == idx
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert ds.doc_idx.tolist() == list(range(len(documents) + 1))
    for i, d in enumerate(documents):
        item = ds[i]
        assert item[-1] == 0
        assert hf.decode(item[:-1].tolist(), skip_special_tokens=False) == d


def test_zst_and_plain_jsonl_give_the_same_dataset(tmp_path, documents, neox_tokenizer_path):
    write_jsonl(tmp_path / "a.jsonl", documents[:50])
    raw = (tmp_path / "a.jsonl").read_bytes()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    preprocess([tmp_path / "a.jsonl"], str(tmp_path / "p"), neox_tokenizer_path)
    preprocess([tmp_path / "a.jsonl.zst"], str(tmp_path / "z"), neox_tokenizer_path)
    for ext in ("bin", "idx"):
        plain, zst = (tmp_path / f"{p}_text_document.{ext}" for p in "pz")
        assert plain.read_bytes() == zst.read_bytes()


def test_lm_dataformat_rules(tmp_path, neox_tokenizer_path):
    lines = [json.dumps("a bare JSON string is a document"),
             json.dumps({"text": ""}),  # empty: skipped
             "",  # blank line: ignored
             json.dumps({"text": ["para one", "para two"]}),  # list: joined with a blank line
             json.dumps({"body": "other key", "text": " spaces kept "})]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = [t for t, _ in iter_documents([tmp_path / "r.jsonl"])]
    assert docs == ["a bare JSON string is a document", "para one\n\npara two", " spaces kept "]
    assert [t for t, _ in iter_documents([tmp_path / "r.jsonl"], key="body")][-1] == "other key"
    res = preprocess([tmp_path / "r.jsonl"], str(tmp_path / "r"), neox_tokenizer_path)
    assert res.documents == 3 and res.stats.empty == 1


def test_workers_leave_ctrl_c_to_the_parent(neox_tokenizer_path, monkeypatch):
    """A terminal's Ctrl-C reaches the tokenising workers too; each printed a KeyboardInterrupt
    traceback from its task queue (the parent already cleans up and exits 130): they ignore SIGINT."""
    import signal

    import neox_jax.data.preprocess as P

    monkeypatch.setattr(P, "_WORKER_TOK", None)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setattr(P, "_die_with_parent", lambda parent: None)  # not this test process (tests/atomic_test.py kills a real one)
    old = signal.getsignal(signal.SIGINT)
    try:
        P._init_worker(str(neox_tokenizer_path), os.getppid())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_utf8_bom_at_the_start_of_a_jsonl(tmp_path):
    """A file saved as "UTF-8 with BOM": its first document was skipped as a bad line."""
    stats = ReadStats()
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert [t for t, _ in iter_documents([tmp_path / "b.jsonl"], stats=stats)] == ["first", "second"]
    assert stats.bad_lines == 0


def test_txt_inputs(tmp_path, shakespeare, neox_tokenizer_path):
    text = "First block line 1\nline 2\n\n\n  \nSecond block\r\nstill second\n\nthird"
    (tmp_path / "t.txt").write_bytes(text.encode("utf-8"))
    whole = [t for t, _ in iter_documents([tmp_path / "t.txt"])]
    assert whole == [text.replace("\r\n", "\n")]
    blocks = [t for t, _ in iter_documents([tmp_path / "t.txt"], txt_mode="blank-lines")]
    assert blocks == ["First block line 1\nline 2", "Second block\nstill second", "third"]
    # the whole tiny-shakespeare file as one document, decoded back exactly
    (tmp_path / "shakespeare.txt").write_text(shakespeare, encoding="utf-8")
    preprocess([tmp_path / "shakespeare.txt"], str(tmp_path / "s"), neox_tokenizer_path, append_eod=True)
    ds = IndexedDataset(tmp_path / "s_text_document")
    assert len(ds) == 1
    hf = HFTokenizer.from_file(str(neox_tokenizer_path))
    assert hf.decode(ds[0][:-1].tolist()) == shakespeare


def test_sentencepiece_tokenizer(tmp_path, documents):
    import sentencepiece as spm

    from neox_jax.data.train_tokenizer import train_sentencepiece

    model = train_sentencepiece([_txt(tmp_path, documents)], tmp_path / "sp.model", 500)
    write_jsonl(tmp_path / "in.jsonl", documents[:40])
    preprocess([tmp_path / "in.jsonl"], str(tmp_path / "sp"), model, append_eod=True, workers=2)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.piece_to_id("<|endoftext|>") == 0
    expected = [sp.encode(d) + [0] for d in documents[:40]]
    binary, idx = published_bytes(expected)
    assert (tmp_path / "sp_text_document.bin").read_bytes() == binary
    assert (tmp_path / "sp_text_document.idx").read_bytes() == idx
    ds = IndexedDataset(tmp_path / "sp_text_document")
    assert [sp.decode(ds[i][:-1].tolist()) for i in range(40)] == documents[:40]


def _txt(tmp_path, documents):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(documents), encoding="utf-8")
    return p


def test_bad_lines_are_skipped_and_counted_or_fatal_with_strict(tmp_path, neox_tokenizer_path):
    good = json.dumps({"text": "fine"}).encode() + b"\n"
    bad_utf8 = b'{"text": "caf\xe9"}\n'
    raw = good + bad_utf8 + b"{not json}\n" + json.dumps({"x": 1}).encode() + b"\n" + good
    (tmp_path / "b.jsonl").write_bytes(raw)
    res = preprocess([tmp_path / "b.jsonl"], str(tmp_path / "b"), neox_tokenizer_path)
    assert res.documents == 2 and res.stats.bad_lines == 3
    first = res.stats.examples[0]
    assert "b.jsonl: line 2 (offset 17): not UTF-8" in first and f"at offset {len(good) + 13})" in first
    assert "line 3" in res.stats.examples[1] and "not valid JSON" in res.stats.examples[1]
    assert "no 'text' key" in res.stats.examples[2]
    with pytest.raises(UserError, match=r"b\.jsonl: line 2 \(offset 17\): not UTF-8"):
        preprocess([tmp_path / "b.jsonl"], str(tmp_path / "c"), neox_tokenizer_path, strict=True)
    assert not list(tmp_path.glob("c_*")) and not list(tmp_path.glob(".c_*"))  # nothing half-written
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(UserError, match=r"bad\.txt: offset 3: not UTF-8"):
        preprocess([tmp_path / "bad.txt"], str(tmp_path / "d"), neox_tokenizer_path)


def test_vocabulary_must_fit_the_dtype(tmp_path):
    from tokenizers import models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "w1 w69999 w65536"}) + "\n")
    with pytest.raises(UserError, match=r"big\.json: vocabulary of 70000 ids does not fit uint16"):
        preprocess([tmp_path / "in.jsonl"], str(tmp_path / "o"), tmp_path / "big.json", dtype="uint16")
    with pytest.raises(UserError, match=r"big\.json: --append-eod needs an <\|endoftext\|>"):
        preprocess([tmp_path / "in.jsonl"], str(tmp_path / "o"), tmp_path / "big.json", append_eod=True)
    res = preprocess([tmp_path / "in.jsonl"], str(tmp_path / "o"), tmp_path / "big.json")
    assert res.dtype == "int32"  # NeoX's rule: vocab >= 65500 -> int32
    assert IndexedDataset(tmp_path / "o_text_document")[0].tolist() == [1, 69999, 65536]


def test_refuses_existing_output_and_unknown_inputs(tmp_path, neox_tokenizer_path):
    write_jsonl(tmp_path / "in.jsonl", ["x"])
    preprocess([tmp_path / "in.jsonl"], str(tmp_path / "o"), neox_tokenizer_path)
    with pytest.raises(UserError, match="exists"):
        preprocess([tmp_path / "in.jsonl"], str(tmp_path / "o"), neox_tokenizer_path)
    preprocess([tmp_path / "in.jsonl"], str(tmp_path / "o"), neox_tokenizer_path, overwrite=True)
    with pytest.raises(UserError, match=r"in\.csv: unsupported input"):
        preprocess([tmp_path / "in.csv"], str(tmp_path / "o2"), neox_tokenizer_path)
    with pytest.raises(UserError, match=r"missing\.jsonl: input file not found"):
        preprocess([tmp_path / "missing.jsonl"], str(tmp_path / "o2"), neox_tokenizer_path)


def published_bytes_doc_idx(items, doc_idx, dtype="<u2", code=8):
    """(.bin, .idx) with an explicit doc_idx (MMapIndexedDatasetBuilder: add_item appends a size,
    end_document appends the current item count, so a document without items repeats the last value)."""
    itemsize = np.dtype(dtype).itemsize
    sizes = [len(t) for t in items]
    pointers = [sum(sizes[:k]) * itemsize for k in range(len(sizes))]
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(sizes), len(doc_idx))
           + b"".join(struct.pack("<i", s) for s in sizes) + b"".join(struct.pack("<q", q) for q in pointers)
           + b"".join(struct.pack("<q", d) for d in doc_idx))
    return b"".join(np.asarray(t, dtype).tobytes() for t in items), idx


def test_document_that_tokenises_to_nothing(tmp_path):
    """Whitespace-only text under a whitespace-splitting tokenizer encodes to no ids.  Without EOD GPT-NeoX's
    preprocess_data.py adds no item but still ends the document (doc_idx repeats); with EOD it would crash
    (doc_ids[-1] of an empty list) and we write the item [EOD]."""
    from tokenizers import models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel(vocab={"<|endoftext|>": 0, "w1": 1, "w2": 2, "w3": 3}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "ws.json"))
    docs = ["w1 w2", "  \n ", "w3"]
    assert [tok.encode(d).ids for d in docs] == [[1, 2], [], [3]]
    write_jsonl(tmp_path / "in.jsonl", docs)
    res = preprocess([tmp_path / "in.jsonl"], str(tmp_path / "plain"), tmp_path / "ws.json")
    assert res.documents == 3 and res.tokens == 3 and res.stats.empty == 0
    binary, idx = published_bytes_doc_idx([[1, 2], [3]], [0, 1, 1, 2])
    assert (tmp_path / "plain_text_document.bin").read_bytes() == binary
    assert (tmp_path / "plain_text_document.idx").read_bytes() == idx
    ds = IndexedDataset(tmp_path / "plain_text_document")
    assert len(ds) == 2 and [d.tolist() for d in ds.documents()] == [[1, 2], [], [3]]
    preprocess([tmp_path / "in.jsonl"], str(tmp_path / "eod"), tmp_path / "ws.json", append_eod=True)
    binary, idx = published_bytes_doc_idx([[1, 2, 0], [0], [3, 0]], [0, 1, 2, 3])
    assert (tmp_path / "eod_text_document.bin").read_bytes() == binary
    assert (tmp_path / "eod_text_document.idx").read_bytes() == idx


def test_unpaired_surrogate_escapes(tmp_path, neox_tokenizer_path):
    """JSON may escape a lone UTF-16 surrogate (\\ud800), which no UTF-8 text holds: that line is a bad line
    (counted, or fatal with strict); a paired escape is the character it spells."""
    lines = ['{"text": "fine"}', '{"text": "lone \\ud800 high"}', '{"text": "pair \\ud83d\\ude42 ok"}',
             '{"text": "lone \\udc00 low"}', '"bare \\udfff string"']
    raw = ("\n".join(lines) + "\n").encode("ascii")
    (tmp_path / "s.jsonl").write_bytes(raw)
    res = preprocess([tmp_path / "s.jsonl"], str(tmp_path / "s"), neox_tokenizer_path, append_eod=True)
    assert res.documents == 2 and res.stats.bad_lines == 3
    offset2 = len(lines[0]) + 1
    assert res.stats.examples[0] == (f"{tmp_path / 's.jsonl'}: line 2 (offset {offset2}): text holds an unpaired "
                                     "surrogate escape (not encodable as UTF-8)")
    assert [e.split(": line ")[1].split(" ")[0] for e in res.stats.examples] == ["2", "4", "5"]
    hf = HFTokenizer.from_file(str(neox_tokenizer_path))
    binary, idx = published_bytes([hf.encode("fine").ids + [0], hf.encode("pair \U0001F642 ok").ids + [0]])
    assert (tmp_path / "s_text_document.bin").read_bytes() == binary
    assert (tmp_path / "s_text_document.idx").read_bytes() == idx
    with pytest.raises(UserError, match=r"s\.jsonl: line 2 \(offset \d+\): text holds an unpaired surrogate"):
        preprocess([tmp_path / "s.jsonl"], str(tmp_path / "t"), neox_tokenizer_path, strict=True)
    assert not list(tmp_path.glob("t_*"))


def test_zst_input_bytes_and_bad_line_offsets(tmp_path, documents, neox_tokenizer_path):
    """A .jsonl.zst input (several zstd frames, as streaming writers produce) gives GPT-NeoX's bytes for its
    documents, and a bad line inside it is reported at its offset in the uncompressed stream."""
    docs = documents[:30]
    good = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8")
    bad = b'{"text": "caf\xe9"}\n'
    half = len(docs) // 2
    first = "".join(json.dumps({"text": d}) + "\n" for d in docs[:half]).encode("utf-8")
    raw = first + bad + good[len(first):]
    z = zstandard.ZstdCompressor()
    (tmp_path / "c.jsonl.zst").write_bytes(z.compress(raw[:1000]) + z.compress(raw[1000:]))  # two frames
    assert main_preprocess(tmp_path / "c.jsonl.zst", tmp_path / "z", neox_tokenizer_path) == 0
    hf = HFTokenizer.from_file(str(neox_tokenizer_path))
    binary, idx = published_bytes([hf.encode(d).ids + [0] for d in docs])
    assert (tmp_path / "z_text_document.bin").read_bytes() == binary
    assert (tmp_path / "z_text_document.idx").read_bytes() == idx
    with pytest.raises(UserError, match=rf"c\.jsonl\.zst: line {half + 1} \(offset {len(first)}\): not UTF-8 "
                                        rf"\(invalid continuation byte at offset {len(first) + 13}\)"):
        preprocess([tmp_path / "c.jsonl.zst"], str(tmp_path / "y"), neox_tokenizer_path, strict=True)


def main_preprocess(src, prefix, tokenizer) -> int:
    """`neox-jax data preprocess` from the command line (the .zst path through the CLI)."""
    from neox_jax.cli import main

    return main(["data", "preprocess", str(src), "--output-prefix", str(prefix), "--tokenizer", str(tokenizer),
                 "--append-eod"])


def test_utf8_bom_at_the_start_of_a_txt(tmp_path, neox_tokenizer_path):
    """A .txt saved as "UTF-8 with BOM": the mark is not text (it stayed as U+FEFF, a token of its own).  The
    dataset holds the ids the tokenizers library gives the text without it, in the published layout; the
    tokenizer trainer and the blank-lines mode read the same text."""
    from neox_jax.cli import main

    text = "First speech.\n\nSecond speech."
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    hf = HFTokenizer.from_file(str(neox_tokenizer_path))
    assert hf.encode("\ufeff" + text).ids != hf.encode(text).ids  # the mark would be a token
    assert main(["-q", "data", "preprocess", str(tmp_path / "bom.txt"), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", str(neox_tokenizer_path)]) == 0
    binary, idx = published_bytes([hf.encode(text).ids])
    assert (tmp_path / "o_text_document.bin").read_bytes() == binary
    assert (tmp_path / "o_text_document.idx").read_bytes() == idx
    blocks = [t for t, _ in iter_documents([tmp_path / "bom.txt"], txt_mode="blank-lines")]
    assert blocks == ["First speech.", "Second speech."]
    # an undecodable byte is named by its offset in the file, the mark counted
    (tmp_path / "bad.txt").write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(UserError, match=r"bad.txt: offset 5: not UTF-8"):
        list(iter_documents([tmp_path / "bad.txt"]))
