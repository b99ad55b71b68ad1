"""The command line: init, score, errors as one line without traceback."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from neox_jax import checkpoint as C
from neox_jax.cli import build_parser, main


def run_cli(*args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "neox_jax", *args], capture_output=True, text=True, env=env, **kw)


def test_help_for_every_command():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"init", "score"} <= set(commands)
    r = run_cli("--help")
    assert r.returncode == 0 and "init" in r.stdout
    for name, sub in commands.items():
        assert sub.format_help(), name


def test_init_then_score_shakespeare(tmp_path, neox_tokenizer_path, shared, capsys):
    ck = tmp_path / "tiny"
    assert main(["init", "tiny", str(ck), "--seed", "1", "--set", "model.num_layers=1"]) == 0
    cfg = C.read_config(ck)
    assert cfg.num_layers == 1
    text = (shared / "data" / "tinyshakespeare.txt").read_text()[:3000]
    inp = tmp_path / "s.txt"
    inp.write_text(text)
    assert main(["score", str(ck), "--input", str(inp), "--tokenizer", str(neox_tokenizer_path), "--batch-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    # an untrained model with small init predicts almost uniformly over the padded vocabulary
    assert 0.5 * cfg.vocab_size < summary["perplexity"] < 2 * cfg.vocab_size
    assert summary["documents"] == 1 and summary["bits_per_byte"] > 0


def test_errors_are_one_line_without_traceback(tmp_path):
    ck = tmp_path / "ck"
    assert main(["init", "tiny", str(ck), "--set", "model.num_layers=1"]) == 0
    cases = [
        (["init", "tiny", str(ck)], "exists and is not empty"),
        (["init", str(tmp_path / "nope.yaml"), str(tmp_path / "x")], "nope.yaml: no such config file"),
        (["init", "tiny", str(tmp_path / "y"), "--set", "model.hidden_size=65"], "not divisible"),
        (["score", str(tmp_path), "--input", "x.jsonl"], "x.jsonl: input file not found"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1, 2]}\n{"tokens": [1, "a"]}\n')
    cases.append((["score", str(ck), "--input", str(bad)], "bad.jsonl:2: 'tokens' must be a list of integers"))
    notck = tmp_path / "notck"
    notck.mkdir()
    good = tmp_path / "good.jsonl"
    good.write_text('{"tokens": [1, 2, 3]}\n')
    cases.append((["score", str(notck), "--input", str(good)], "not a neox-jax checkpoint"))
    for args, msg in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("neox-jax: error:")]
        assert len(lines) == 1 and msg in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert C.is_checkpoint(ck)  # untouched
    assert not (tmp_path / "y").exists() and not (tmp_path / "x").exists()
