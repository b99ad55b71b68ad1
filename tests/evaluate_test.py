"""`score`: per-token log-probs equal HF's, including rolling windows beyond the context."""

import json

import numpy as np
import pytest
import torch

from hf_reference import hf_model, ours_from_hf
from neox_jax import checkpoint as C
from neox_jax.cli import main
from neox_jax.evaluate import rolling_windows, score_documents

W = 32  # context of the test model


def hf_logprobs(model, tokens, window):
    """Reference: score token i>=1 with HF; tokens are cut into consecutive chunks of `window`
    targets (the first chunk starts at token 1) and each chunk's input is the `window` tokens that
    precede its last target, as lm-eval's loglikelihood_rolling does."""
    n = len(tokens)
    out = []
    first = 1
    while first < n:
        last = min(first + window, n) - 1  # inclusive index of the chunk's last target
        start = max(0, last - window)  # input tokens[start : last]
        inp = torch.tensor([tokens[start:last]])
        with torch.no_grad():
            lp = torch.log_softmax(model(inp).logits.double(), -1)[0].numpy()
        for i in range(first, last + 1):
            out.append(lp[i - 1 - start, tokens[i]])
        first = last + 1
    return np.array(out)


@pytest.fixture(scope="module")
def model_and_params():
    model = hf_model(seed=11, vocab=300, hidden=64, heads=4, max_pos=W)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    assert cfg.max_position_embeddings == W
    return model, cfg, params


@pytest.mark.parametrize("n", [1, 2, 17, W, W + 1, W + 2, 3 * W + 5, 100])
def test_rolling_windows_cover_every_token_once(n):
    toks = list(range(1000, 1000 + n))
    scored = []
    for w in rolling_windows(0, toks, W):
        assert len(w.inputs) == len(w.targets) <= W
        assert w.targets == [toks[toks.index(t)] for t in w.targets]
        assert all(toks.index(t) == toks.index(i) + 1 for i, t in zip(w.inputs, w.targets))
        scored += w.targets[len(w.targets) - w.keep:]
    assert scored == toks[1:]


def test_scores_equal_hf_including_long_inputs(model_and_params, record_property):
    model, cfg, params = model_and_params
    rs = np.random.RandomState(0)
    docs = [list(rs.randint(0, 300, n)) for n in (2, 5, W, W + 1, 3 * W + 7, 150)]
    ours = score_documents(cfg, params, docs, batch_size=4)
    worst = 0.0
    for d, lp in zip(docs, ours):
        ref = hf_logprobs(model, d, W)
        assert len(lp) == len(d) - 1 == len(ref)
        worst = max(worst, float(np.max(np.abs(lp - ref))))
    record_property("measured", f"score vs HF max|dlogprob| {worst:.2e} (tolerance 1e-4)")
    assert worst <= 1e-4


EOT = 0  # GPT-NeoX's <|endoftext|>, lm-eval's prefix token for the 20B tokenizer


def lm_eval_windows(tokens, max_length):
    """(model input, scored targets) of lm-eval's HFLM.loglikelihood_rolling, from lm-eval's own code:
    utils.get_rolling_token_windows(prefix_token=EOT, context_len=1) + utils.make_disjoint_window, then
    _loglikelihood_tokens' input rule, (context + continuation)[-(max_length + 1):][:-1], scoring the
    last len(continuation) positions."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    out = []
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
            token_list=list(tokens), prefix_token=EOT, max_seq_len=max_length, context_len=1)):
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        out.append((inp, cont))
    return out


def lm_eval_logprobs(model, tokens, max_length):
    out = []
    for inp, cont in lm_eval_windows(tokens, max_length):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([inp])).logits.double(), -1)[0].numpy()
        n = len(inp)
        out += [lp[n - len(cont) + j, t] for j, t in enumerate(cont)]
    return np.array(out)


@pytest.mark.parametrize("n", [1, 2, W - 1, W, W + 1, 2 * W, 3 * W + 5])
def test_windows_are_lm_evals_rolling_windows(n):
    """A document scored as [EOT] + tokens is cut into exactly lm-eval's windows: same inputs, same scored
    targets, in the same order (token 0 is scored after the EOT prefix, every token once)."""
    toks = list(range(1000, 1000 + n))
    ours = [(w.inputs, w.targets[len(w.targets) - w.keep:]) for w in rolling_windows(0, [EOT] + toks, W)]
    assert ours == lm_eval_windows(toks, W)


def test_scores_equal_lm_eval_rolling_loglikelihood(model_and_params, record_property):
    """Per-token log-probs of [EOT] + document equal lm-eval's loglikelihood_rolling of the document, with
    transformers running lm-eval's windows."""
    model, cfg, params = model_and_params
    rs = np.random.RandomState(5)
    docs = [list(map(int, rs.randint(1, 300, n))) for n in (1, 7, W, W + 1, 2 * W + 3, 100)]
    ours = score_documents(cfg, params, [[EOT] + d for d in docs], batch_size=4)
    worst = 0.0
    for d, lp in zip(docs, ours):
        ref = lm_eval_logprobs(model, d, W)
        assert len(lp) == len(d) == len(ref)
        worst = max(worst, float(np.max(np.abs(lp - ref))))
    record_property("measured", f"score vs lm-eval rolling windows on HF: max|dlogprob| {worst:.2e} (tolerance 1e-4)")
    assert worst <= 1e-4


def test_score_cli_jsonl_tokens_and_text(tmp_path, model_and_params, neox_tokenizer_path):
    model, cfg, params = model_and_params
    C.save_params(tmp_path / "ck", cfg, params)
    rs = np.random.RandomState(1)
    docs = [list(map(int, rs.randint(0, 300, n))) for n in (40, 3, 90)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"tokens": d}) + "\n" for d in docs))
    out = tmp_path / "out.jsonl"
    assert main(["score", str(tmp_path / "ck"), "--input", str(inp), "--output", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tokens"] for r in rows] == docs
    for d, r in zip(docs, rows):
        ref = hf_logprobs(model, d, W)
        assert r["count"] == len(d) - 1 == len(r["logprobs"])
        assert np.max(np.abs(np.array(r["logprobs"]) - ref)) <= 1e-4
        assert r["sum"] == pytest.approx(sum(r["logprobs"]), abs=1e-6)
    # refuses to overwrite, exits 2
    assert main(["score", str(tmp_path / "ck"), "--input", str(inp), "--output", str(out)]) == 2


def test_score_text_needs_in_vocabulary_model(tmp_path, model_and_params, neox_tokenizer_path, capsys):
    _, cfg, params = model_and_params  # vocab 300 < tokenizer ids
    C.save_params(tmp_path / "ck", cfg, params)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "Hello world, this is Shakespeare."}) + "\n")
    assert main(["score", str(tmp_path / "ck"), "--input", str(inp), "--tokenizer", str(neox_tokenizer_path)]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err


def test_score_txt_input_skips_a_utf8_bom(tmp_path, neox_tokenizer_path):
    """score's (and eval --perplexity's) .txt document: a BOM opening the file is not text; the ids are the
    tokenizers library's for the text without it, and bits per byte count the text's bytes only."""
    from tokenizers import Tokenizer

    from neox_jax.cli import _read_documents

    text = "Before we proceed any further, hear me speak.\n"
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    tokens, n_bytes = _read_documents(str(tmp_path / "bom.txt"), str(neox_tokenizer_path))
    ids = Tokenizer.from_file(str(neox_tokenizer_path)).encode(text).ids
    assert tokens == [ids] and n_bytes == len(text.encode("utf-8"))


def test_score_text_surrogate_escapes(tmp_path, model_and_params, neox_tokenizer_path, capsys):
    """JSON's surrogate escapes: a pair ("\\ud83d\\ude00", json.dumps' spelling of U+1F600) is the character
    and scores as the tokenizers library encodes it; a lone one (valid JSON, but no text any tokenizer takes)
    is one error line naming the file, line and key, before any work."""
    from tokenizers import Tokenizer

    from neox_jax.cli import _read_documents

    _, cfg, params = model_and_params
    pair = tmp_path / "pair.jsonl"
    pair.write_text(json.dumps({"text": "smile \U0001F600 please"}) + "\n")
    assert "\\ud83d\\ude00" in pair.read_text()
    tokens, n_bytes = _read_documents(str(pair), str(neox_tokenizer_path))
    assert tokens == [Tokenizer.from_file(str(neox_tokenizer_path)).encode("smile \U0001F600 please").ids]
    assert n_bytes == len("smile \U0001F600 please".encode("utf-8"))
    C.save_params(tmp_path / "ck", cfg, params)
    lone = tmp_path / "lone.jsonl"
    lone.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "a\ud800b"}) + "\n")
    capsys.readouterr()
    assert main(["score", str(tmp_path / "ck"), "--input", str(lone), "--tokenizer", str(neox_tokenizer_path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"neox-jax: error: {lone}:2: 'text' holds an unpaired surrogate escape (not encodable as UTF-8)"]


def test_batches_hold_no_more_rows_than_the_work(model_and_params, monkeypatch):
    """A --batch-size above the number of windows (or requests) scores them in batches of that number, one
    compiled shape per run, not padded to --batch-size (2048 rows for one short document took 11 GB): the
    log-probs equal HF's and are the same numbers as a batch size of exactly that number gives."""
    import neox_jax.evaluate as E

    model, cfg, params = model_and_params
    shapes = []

    def spy(make):
        def wrapped(cfg):
            f = make(cfg)
            return lambda p, inputs, targets: (shapes.append(inputs.shape), f(p, inputs, targets))[1]
        return wrapped

    monkeypatch.setattr(E, "make_scorer", spy(E.make_scorer))
    monkeypatch.setattr(E, "make_greedy_scorer", spy(E.make_greedy_scorer))
    rs = np.random.RandomState(3)
    docs = [list(map(int, rs.randint(0, 300, n))) for n in (5, 2 * W + 3)]  # 1 + 3 windows
    big = score_documents(cfg, params, docs, batch_size=4096)
    assert {s[0] for s in shapes} == {4} and len(shapes) == 1, shapes
    for d, lp in zip(docs, big):
        assert np.max(np.abs(lp - hf_logprobs(model, d, W))) <= 1e-4
    exact = score_documents(cfg, params, docs, batch_size=4)
    assert all(np.array_equal(a, b) for a, b in zip(big, exact))
    shapes.clear()
    reqs = [(d[:-2], d[-2:]) for d in docs]
    big = E.score_continuations(cfg, params, reqs, batch_size=4096)
    assert [s[0] for s in shapes] == [2], shapes
    assert big == E.score_continuations(cfg, params, reqs, batch_size=2)


@pytest.mark.parametrize("command", ["score", "eval"])
def test_out_of_memory_is_one_line(command, tmp_path, model_and_params, monkeypatch, capsys):
    """XLA running out of memory for a batch (RESOURCE_EXHAUSTED, a multi-line JaxRuntimeError) is one error
    line asking for a smaller --batch-size, and nothing is written."""
    import jax

    import neox_jax.evaluate as E

    _, cfg, params = model_and_params
    C.save_params(tmp_path / "ck", cfg, params)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"tokens": list(range(1, 40))}) + "\n")

    def exhausted(cfg):
        def score(params, inputs, targets):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                             "68719476736 bytes.\nBufferAssignment OOM Debugging.\n...")
        return score

    monkeypatch.setattr(E, "make_scorer", exhausted)
    out = tmp_path / "out.json"
    argv = {"score": ["score", str(tmp_path / "ck"), "--input", str(inp)],
            "eval": ["eval", str(tmp_path / "ck"), "--perplexity", str(inp)]}[command]
    capsys.readouterr()
    assert main(["-q", *argv, "--output", str(out), "--batch-size", "64"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("neox-jax: error: --batch-size 64: out of memory"), err
    assert "RESOURCE_EXHAUSTED" in err[0] and "smaller --batch-size" in err[0], err
    assert not out.exists()
