"""`neox-jax data ...`: help, preprocess, order (JSONL replay of steps), train-tokenizer, one-line errors."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from neox_jax.cli import main
from neox_jax.data.indexed import IndexedDatasetWriter


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare, neox_tokenizer_path):
    """Shakespeare speeches as JSONL, preprocessed once through the CLI."""
    d = tmp_path_factory.mktemp("cli")
    docs = [x for x in shakespeare.split("\n\n") if x][:800]
    with open(d / "speeches.jsonl", "w", encoding="utf-8") as f:
        for x in docs:
            f.write(json.dumps({"text": x}) + "\n")
    rc = main(["data", "preprocess", str(d / "speeches.jsonl"), "--output-prefix", str(d / "shk"),
               "--tokenizer", str(neox_tokenizer_path), "--append-eod", "--workers", "2"])
    assert rc == 0
    hf = HFTokenizer.from_file(str(neox_tokenizer_path))
    tokens = [hf.encode(x).ids + [0] for x in docs]
    return d, docs, tokens


@pytest.mark.parametrize("cmd", [[], ["preprocess"], ["order"], ["train-tokenizer"]])
def test_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main(["data", *cmd, "--help"])
    assert e.value.code == 0
    assert "usage: neox-jax data" in capsys.readouterr().out


def test_preprocess_output_and_refusal(corpus, capsys, neox_tokenizer_path):
    d, docs, _ = corpus
    assert (d / "shk_text_document.bin").exists() and (d / "shk_text_document.idx").exists()
    rc = main(["data", "preprocess", str(d / "speeches.jsonl"), "--output-prefix", str(d / "shk"),
               "--tokenizer", str(neox_tokenizer_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("neox-jax: error: ") and "shk_text_document" in err and "--overwrite" in err
    assert err.count("\n") == 1


def test_order_into_a_pipe_closed_early_is_quiet(corpus):
    """`neox-jax data order ... | head -c 100`: the reader leaves early; the command said
    "neox-jax: error: Broken pipe".  Now nothing on stderr and exit status 141, as `yes | head`."""
    d, _, _ = corpus
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m neox_jax data order --data-prefix "
                        f"{d / 'shk_text_document'} --seq-length 8 --num-samples 40000 --batch 8 --steps 0:5000 "
                        f"| head -c 100 > /dev/null; echo \"${{PIPESTATUS[0]}}\""],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "141" and "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr[-2000:]


def test_order_replays_steps(corpus, capsys, tmp_path, neox_tokenizer_path):
    d, docs, tokens = corpus
    seq, batch, n_samples = 128, 4, 500
    out = tmp_path / "order.jsonl"
    rc = main(["data", "order", "--data-prefix", str(d / "shk_text_document"), "--seq-length", str(seq),
               "--num-samples", str(n_samples), "--seed", "1234", "--batch", str(batch), "--steps", "2:5",
               "--output", str(out), "--decode", "--tokenizer", str(neox_tokenizer_path)])
    assert rc == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == list(range(2 * batch, 5 * batch))
    assert [r["step"] for r in recs] == [i // batch for i in range(2 * batch, 5 * batch)]
    # the published order: one RandomState(1234) shuffles doc_idx (all epochs), then arange(n)
    total = sum(len(t) for t in tokens)
    epochs = 1
    while (epochs * total - 1) // seq < n_samples:
        epochs += 1
    rng = np.random.RandomState(1234)
    rng.shuffle(np.tile(np.arange(len(docs), dtype=np.int32), epochs))
    shuffle = np.arange((epochs * total - 1) // seq, dtype=np.uint32)
    rng.shuffle(shuffle)
    hf = HFTokenizer.from_file(str(neox_tokenizer_path))
    for r in recs:
        assert r["sample"] == shuffle[r["index"]]
        assert len(r["tokens"]) == seq + 1
        cut = [t for doc, (a, b) in zip(r["doc_ids"], r["offsets"]) for t in tokens[doc][a:b]]
        assert cut == r["tokens"]  # the named documents and offsets are exactly the sample's tokens
        assert r["text"] == hf.decode(r["tokens"], skip_special_tokens=False)
        assert set(r) == {"step", "index", "dataset", "dataset_index", "sample", "doc_ids", "offsets",
                          "tokens", "text"}
    # without --output: one line per sample on stdout
    capsys.readouterr()
    assert main(["data", "order", "--data-prefix", str(d / "shk_text_document"), "--seq-length", str(seq),
                 "--num-samples", str(n_samples), "--batch", str(batch), "--steps", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == batch and lines[0].startswith(f"step 3 index {3 * batch} dataset 0 sample ")
    first = recs[batch]  # the same sample (index 12) in the JSONL
    assert f"{first['doc_ids'][0]}[{first['offsets'][0][0]}:{first['offsets'][0][1]}]" in lines[0]
    # asking past the end of the dataset is a clear error
    assert main(["data", "order", "--data-prefix", str(d / "shk_text_document"), "--seq-length", str(seq),
                 "--num-samples", str(n_samples), "--batch", str(batch), "--steps", "0:100000"]) == 2
    assert "full steps" in capsys.readouterr().err


def test_order_preshuffled(tmp_path, capsys):
    seq = 16
    rows = np.random.RandomState(0).randint(0, 50000, size=(10, seq + 1)).astype(np.uint16)
    with IndexedDatasetWriter(tmp_path / "document", np.uint16) as w:
        for r in rows:
            w.add_document(r)
    out = tmp_path / "o.jsonl"
    assert main(["data", "order", "--preshuffled", "--data-prefix", str(tmp_path / "document"),
                 "--seq-length", str(seq), "--batch", "3", "--steps", "1:3", "--output", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["sample"] for r in recs] == list(range(3, 9))
    assert [r["tokens"] for r in recs] == rows[3:9].tolist()
    assert main(["data", "order", "--preshuffled", "--data-prefix", str(tmp_path / "document"),
                 "--seq-length", str(seq), "--batch", "3", "--steps", "1:3", "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_train_tokenizer(tmp_path, shakespeare, capsys):
    (tmp_path / "c.txt").write_text(shakespeare[:200000], encoding="utf-8")
    assert main(["data", "train-tokenizer", str(tmp_path / "c.txt"), "--output", str(tmp_path / "t.json"),
                 "--vocab-size", "600", "--txt-mode", "blank-lines"]) == 0
    assert main(["data", "train-tokenizer", str(tmp_path / "c.txt"), "--output", str(tmp_path / "t.model"),
                 "--vocab-size", "600", "--model-type", "unigram"]) == 0
    out = capsys.readouterr().out
    assert "t.json (600 tokens)" in out and "t.model (600 tokens)" in out
    bpe = HFTokenizer.from_file(str(tmp_path / "t.json"))
    assert bpe.token_to_id("<|endoftext|>") == 0 and bpe.token_to_id("<|padding|>") == 1
    text = "KING RICHARD III:\nNow is the winter  of our discontent. é"
    assert bpe.decode(bpe.encode(text).ids) == text
    assert main(["data", "train-tokenizer", str(tmp_path / "c.txt"), "--output", str(tmp_path / "t.json"),
                 "--vocab-size", "600"]) == 2
    assert main(["data", "train-tokenizer", str(tmp_path / "c.txt"), "--output", str(tmp_path / "t.vocab"),
                 "--vocab-size", "600"]) == 2


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"NOTMAGIC!" + bytes(40))
    (tmp_path / "bad.bin").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "neox_jax", "data", "order", "--data-prefix",
                        str(tmp_path / "bad"), "--num-samples", "10", "--steps", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("neox-jax: error: ") and "bad.idx: offset 0: bad magic" in last


# ----------------------------------------------------------------------------- `data order` options
# References: the plain-loop re-derivations of GPT-NeoX's index maps and blending in data_order_test.py.

from data_order_test import ref_blending, ref_index_maps, ref_sample, write_corpus  # noqa: E402

OS = 32  # sequence length for these tests


def order_records(capsys, tmp_path, *args):
    out = tmp_path / "o.jsonl"
    rc = main(["data", "order", "--seq-length", str(OS), *args, "--output", str(out), "--overwrite"])
    assert rc == 0, capsys.readouterr().err
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_order_train_iters_and_weights(tmp_path, capsys):
    """Pythia's train-data-paths route from the command line: --train-iters gives num_samples
    ceil(iters * batch * w_k * 1.005) per prefix, --weights the blend."""
    sizes = [np.random.RandomState(30).randint(1, 120, size=60), np.random.RandomState(31).randint(1, 120, size=90)]
    docs = [write_corpus(tmp_path / f"c{k}", s, seed=k) for k, s in enumerate(sizes)]
    iters, batch = 6, 4
    recs = order_records(capsys, tmp_path, "--data-prefix", str(tmp_path / "c0"), str(tmp_path / "c1"),
                         "--weights", "1", "3", "--train-iters", str(iters), "--batch", str(batch), "--steps", f"0:{iters}")
    assert [r["index"] for r in recs] == list(range(iters * batch))
    w = [0.25, 0.75]
    maps = [ref_index_maps(np.asarray(s, np.int32), np.arange(len(s), dtype=np.int32),
                           math.ceil(iters * batch * wk * 1.005), OS, 1234) for s, wk in zip(sizes, w)]
    lens = [len(m[3]) - 1 for m in maps]
    index, sample = ref_blending(w, sum(lens))
    assert {index[i] for i in range(iters * batch)} == {0, 1}
    for r in recs:
        k, s = index[r["index"]], sample[r["index"]]
        assert (r["dataset"], r["dataset_index"]) == (k, s)
        _, doc_idx, sample_idx, shuffle_idx = maps[k]
        s = s if s < len(shuffle_idx) else s % lens[k]  # NeoX's IndexError fallback
        assert r["sample"] == shuffle_idx[s]
        assert r["tokens"] == ref_sample(docs[k], doc_idx, sample_idx, shuffle_idx, s).tolist()


def test_order_split_save_index_maps_and_no_cache(tmp_path, capsys):
    """GPT-NeoX-20B's data-path route (--split: train documents only, iters * batch samples, cache name
    "train"), --save-index-maps writing NeoX's files, and --no-cache ignoring a cache that is present."""
    sizes = np.random.RandomState(32).randint(1, 200, size=80).astype(np.int32)
    docs = write_corpus(tmp_path / "t", sizes)
    iters, batch = 10, 4
    args = ["--data-prefix", str(tmp_path / "t"), "--train-iters", str(iters), "--batch", str(batch), "--seed", "7",
            "--split", "90,5,5", "--steps", "0:3"]
    # 90,5,5 of 80 documents: the train split is documents [0, 72) (NeoX's get_train_valid_test_split_)
    _, doc_idx, sample_idx, shuffle_idx = ref_index_maps(sizes, np.arange(72, dtype=np.int32), iters * batch, OS, 7)
    base = f"{tmp_path}/t_train_indexmap_{iters * batch}ns_{OS}sl_7s"
    recs = order_records(capsys, tmp_path, *args, "--save-index-maps")
    for r in recs:
        assert "dataset" not in r and r["sample"] == shuffle_idx[r["index"]]
        assert r["tokens"] == ref_sample(docs, doc_idx, sample_idx, shuffle_idx, r["index"]).tolist()
        assert all(d < 72 for d in r["doc_ids"])
    for kind, ref in (("doc", doc_idx), ("sample", sample_idx), ("shuffle", shuffle_idx)):
        arr = np.load(f"{base}_{kind}_idx.npy")
        assert arr.dtype == ref.dtype
        np.testing.assert_array_equal(arr, ref)
    # a cache holding another shuffle is read by default, ignored with --no-cache
    np.save(f"{base}_shuffle_idx.npy", shuffle_idx[::-1].copy())
    cached = order_records(capsys, tmp_path, *args)
    assert [r["sample"] for r in cached] == shuffle_idx[::-1][:3 * batch].tolist()
    fresh = order_records(capsys, tmp_path, *args, "--no-cache")
    assert [r["sample"] for r in fresh] == shuffle_idx[:3 * batch].tolist()
    assert [r["tokens"] for r in fresh] == [r["tokens"] for r in recs]
    # the blend route names its cache train_0, train_1, ...
    order_records(capsys, tmp_path, "--data-prefix", str(tmp_path / "t"), "--num-samples", "50", "--batch", "4",
                  "--steps", "0", "--save-index-maps")
    _, d0, s0, sh0 = ref_index_maps(sizes, np.arange(80, dtype=np.int32), 50, OS, 1234)
    for kind, ref in (("doc", d0), ("sample", s0), ("shuffle", sh0)):
        np.testing.assert_array_equal(np.load(f"{tmp_path}/t_train_0_indexmap_50ns_{OS}sl_1234s_{kind}_idx.npy"), ref)
