"""`neox-jax generate`: JSONL in/out, --prompt, interactive streaming, one-line errors."""

import io
import json
import os
import subprocess
import sys

import pytest

from neox_jax import checkpoint as C
from neox_jax.cli import main
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax import generate as G
from neox_jax.generate import Generator, Sampling


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen") / "tiny"
    assert main(["-q", "init", "tiny", str(d), "--seed", "3", "--set", "model.num_layers=1"]) == 0
    return d


def test_input_output_jsonl_equals_library(ckpt, tmp_path, neox_tokenizer_path, capsys, monkeypatch):
    tok = load_tokenizer(neox_tokenizer_path)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "To be, or not to be"}) + "\n\n"
                   + json.dumps({"prompt_tokens": [510, 3158, 8516]}) + "\n"
                   + json.dumps({"prompt": "ROMEO:"}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["-q", "generate", str(ckpt), "--input", str(inp), "--output", str(out), "--max-new-tokens", "9",
            "--temperature", "0.9", "--top-k", "40", "--seed", "5", "--batch-size", "2", "--tokenizer",
            str(neox_tokenizer_path)]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["To be, or not to be", None, "ROMEO:"]
    cfg, params = C.load_params(ckpt)
    prompts = [tok.encode("To be, or not to be"), [510, 3158, 8516], tok.encode("ROMEO:")]
    ref = Generator(cfg, params, tokenizer=tok).generate(
        prompts, max_new_tokens=9, sampling=Sampling(0.9, 40), seed=5, stop_tokens=[tok.eod_id])
    for r, c, p in zip(rows, ref, prompts):
        assert set(r) == {"prompt", "completion", "prompt_tokens", "completion_tokens", "stop_reason"}
        assert r["prompt_tokens"] == p
        assert r["completion_tokens"] == c.completion_tokens and len(c.completion_tokens) == 9
        assert r["completion"] == tok.decode(c.completion_tokens)
    # never touches an existing output without --overwrite
    before = out.read_text()
    assert main(args) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == before
    assert main(args + ["--overwrite"]) == 0 and out.read_text() == before  # same seed, same text
    calls = []
    unstack = G.unstack_layers
    monkeypatch.setattr(G, "unstack_layers", lambda p, **kw: calls.append(kw) or unstack(p, **kw))
    assert main(args + ["--overwrite", "--layers", "unrolled"]) == 0 and out.read_text() == before  # same tokens
    assert calls == [{"delete_stacked": True}]  # weights held per layer (split once, on load), steps unrolled


def test_prompt_and_interactive_streaming(ckpt, neox_tokenizer_path, monkeypatch, capsys):
    base = ["-q", "generate", str(ckpt), "--max-new-tokens", "6", "--tokenizer", str(neox_tokenizer_path)]
    expected = []
    for prompt in ("Hello there", "The cat"):
        assert main(base + ["--prompt", prompt]) == 0
        expected.append(capsys.readouterr().out)
    assert all(e.strip() for e in expected)
    streamed = []
    tok = load_tokenizer(neox_tokenizer_path)
    import neox_jax.generate_cli as G

    orig = G._Streamer.__call__

    def spy(self, i, t):  # record that tokens arrive one at a time from inside the decode loop
        streamed.append(t)
        return orig(self, i, t)

    monkeypatch.setattr(G._Streamer, "__call__", spy)
    # a prompt too long for the context is refused on its own line; the session goes on
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n\n" + "word " * 300 + "\nThe cat\n"))
    assert main(base + ["--interactive"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out == "".join(expected)  # greedy: the same completions, streamed
    skipped = [ln for ln in captured.err.splitlines() if ln.strip()]
    n = len(tok.encode("word " * 300))
    assert len(skipped) == 1 and f"skipped input line 3: {n} tokens" in skipped[0], skipped
    assert "context of 256" in skipped[0], skipped
    assert tok.decode(streamed) == "".join(e.rstrip("\n") for e in expected)


def test_errors_are_one_line(ckpt, tmp_path, neox_tokenizer_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    cases = [
        (["--input", str(bad)], "bad.jsonl:2: 'prompt' must be a non-empty string"),
        (["--input", str(tmp_path / "none.jsonl")], "none.jsonl: input file not found"),
        (["--prompt", "x", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature -1.0: must be a finite number >= 0"),
        (["--prompt", "x", "--max-new-tokens", "1000"], "exceed the model's context of 256"),
        (["--prompt", "x", "--tensor", "3"], "--tensor 3 does not divide"),
        (["--prompt", "x", "--tokenizer", str(tmp_path / "tok.json")], "tok.json: tokenizer file not found"),
    ]
    for extra, msg in cases:
        assert main(["generate", str(ckpt), *extra]) == 2, extra
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("neox-jax: error:")]
        assert len(err) == 1 and msg in err[0], (extra, err)
    r = subprocess.run([sys.executable, "-m", "neox_jax", "generate", str(tmp_path), "--prompt", "x"],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "not a neox-jax checkpoint" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_output_is_replaced_atomically(command, ckpt, tmp_path, neox_tokenizer_path, capsys, monkeypatch):
    """--output goes through the atomic helper: the new file is fsynced under a per-operation hidden
    name before it replaces the old one; a failure while writing it (here ENOSPC from the fsync)
    leaves the existing output byte-identical and no temporary behind."""
    import errno

    from neox_jax import atomic

    inp = tmp_path / "in.jsonl"
    key = {"generate": "prompt_tokens", "eval": "tokens"}[command]
    inp.write_text(json.dumps({key: [510, 3158, 8516, 12, 77]}) + "\n")
    out = tmp_path / "out.json"
    out.write_text("precious\n")
    args = {"generate": ["generate", str(ckpt), "--input", str(inp), "--max-new-tokens", "3"],
            "eval": ["eval", str(ckpt), "--perplexity", str(inp)]}[command]
    args = ["-q", *args, "--tokenizer", str(neox_tokenizer_path), "--output", str(out), "--overwrite"]
    real, synced = atomic.sync_tree, []

    def full(path):
        synced.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "sync_tree", full)
    capsys.readouterr()
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("neox-jax: error:")]
    assert len(err) == 1 and "No space left on device" in err[0] and "old output is untouched" in err[0], err
    assert out.read_bytes() == b"precious\n" and sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.json"]
    assert [p.parent for p in synced] == [tmp_path] and atomic._NAME.match(synced[0].name), synced
    monkeypatch.setattr(atomic, "sync_tree", lambda path: (synced.append(path), real(path)))
    assert main(args) == 0
    assert out.read_bytes() != b"precious\n" and sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.json"]
    assert synced[1].name.endswith(".tmp") and synced[1] != synced[0]  # a new name per operation
    first = json.loads(out.read_text()) if command == "eval" else json.loads(out.read_text().splitlines()[0])
    assert ("results" if command == "eval" else "completion") in first


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])  # Python's stdin in a C/POSIX locale, others
def test_interactive_line_not_utf8_is_skipped(errors, ckpt, neox_tokenizer_path, monkeypatch, capsys):
    """A line of standard input that is not UTF-8 is refused on one line naming its first bad byte, whatever
    the locale's error handler; the session goes on with the next line, completed as --prompt completes it."""
    base = ["-q", "generate", str(ckpt), "--max-new-tokens", "4", "--tokenizer", str(neox_tokenizer_path)]
    assert main(base + ["--prompt", "Hello there"]) == 0
    expected = capsys.readouterr().out
    stdin = io.TextIOWrapper(io.BytesIO(b"hi\xff\xfe\nHello there\n"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(base + ["--interactive"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert err == ["neox-jax: skipped input line 1: not UTF-8 (byte 0xff at offset 2)"], err
