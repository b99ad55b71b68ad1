"""The command line: init, score, errors as one line without traceback."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neox_jax import checkpoint as C
from neox_jax.cli import build_parser, main


def run_cli(*args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "neox_jax", *args], capture_output=True, text=True, env=env, **kw)


# Every command and the options README.md, docs/convert.md and docs/data.md document for it.
DOCUMENTED = {
    ("init",): ["--seed", "--set", "--overwrite"],
    ("score",): ["--input", "--output", "--dtype", "--batch-size", "--tokenizer", "--context", "--overwrite"],
    ("convert",): ["--to", "--dtype", "--tp", "--verify", "--overwrite", "--max-shard-size", "--neox-config",
                   "--step", "--neox-names", "--json"],
    ("inspect",): ["--json", "--no-hash", "--neox-config"],
    ("diff",): ["--rtol", "--per-layer", "--json", "--neox-config-a", "--neox-config-b"],
    ("data", "preprocess"): ["--output-prefix", "--tokenizer", "--append-eod", "--workers", "--dtype", "--strict",
                             "--overwrite", "--jsonl-key", "--txt-mode"],
    ("data", "order"): ["--data-prefix", "--seq-length", "--num-samples", "--train-iters", "--seed", "--batch",
                        "--steps", "--weights", "--split", "--preshuffled", "--output", "--decode", "--tokenizer",
                        "--no-cache", "--save-index-maps", "--overwrite"],
    ("data", "train-tokenizer"): ["--output", "--vocab-size", "--model-type", "--min-frequency", "--overwrite",
                                  "--jsonl-key", "--txt-mode"],
    ("train",): ["--set", "--run-dir", "--init-from", "--overwrite", "--print-config", "--coordinator",
                 "--num-processes", "--process-id"],
    ("plan",): ["--devices", "--mesh", "--nodes", "--device-memory", "--set", "--json"],
    ("export",): ["--dtype", "--overwrite"],
    ("generate",): ["--prompt", "--input", "--interactive", "--max-new-tokens", "--int8", "--temperature", "--top-k",
                    "--top-p", "--seed", "--stop", "--ignore-eod", "--batch-size", "--dtype", "--rotary-dtype",
                    "--tensor", "--tokenizer", "--output", "--overwrite"],
    ("eval",): ["--tasks", "--include-path", "--num-fewshot", "--limit", "--log-samples", "--lambada",
                "--perplexity", "--data-prefix", "--split", "--split-part", "--seq-length", "--max-samples",
                "--context", "--batch-size", "--dtype", "--tensor", "--int8", "--seed", "--tokenizer", "--output",
                "--overwrite"],
}


def test_help_for_every_command(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {c[0] for c in DOCUMENTED}  # no undocumented command, none missing
    r = run_cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in commands)
    for cmd, options in DOCUMENTED.items():
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0, cmd
        out = capsys.readouterr().out
        assert out.startswith(f"usage: neox-jax {' '.join(cmd)} "), (cmd, out[:80])
        for opt in options + ["--help"]:
            assert re.search(rf"(?<![\w-]){opt}(?![\w-])", out), (cmd, opt)
    # every option and argument of every command is explained in its --help
    subs = dict(commands)
    subs.update({("data", k): v for k, v in commands["data"]._subparsers._group_actions[0].choices.items()})
    for name, sub in subs.items():
        for action in sub._actions:
            if action.dest not in ("help", "command", "data_command"):
                assert action.help, (name, action.option_strings or action.dest)


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


def test_score_summary_is_the_hand_computed_perplexity_and_bits_per_byte(tmp_path, neox_tokenizer_path, capsys):
    """perplexity = exp(-sum log p / tokens scored) and bits per byte = -sum log p / ln 2 / UTF-8 bytes, computed
    here from transformers' log-probabilities of the same checkpoint and the tokenizers library's ids."""
    import math

    import torch
    from tokenizers import Tokenizer

    from hf_reference import hf_model, ours_from_hf

    model = hf_model(seed=21, vocab=50304, hidden=32, heads=2, layers=1)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    C.save_params(tmp_path / "ck", cfg, params)
    texts = ["Before we proceed any further, hear me speak.", "Caf\u00e9 \u65e5\u672c \u2014 all: Speak, speak."]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["score", str(tmp_path / "ck"), "--input", str(inp), "--tokenizer", str(neox_tokenizer_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]

    tok = Tokenizer.from_file(str(neox_tokenizer_path))
    total, count = 0.0, 0
    for t in texts:
        ids = tok.encode(t).ids
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits.double(), -1)[0]
        total += float(sum(lp[i - 1, ids[i]] for i in range(1, len(ids))))
        count += len(ids) - 1
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert n_bytes > sum(len(t) for t in texts)  # multi-byte characters: bytes, not characters
    assert summary["documents"] == 2 and summary["tokens_scored"] == count
    assert summary["sum_logprob"] == pytest.approx(total, rel=1e-5)
    assert summary["mean_nll"] == pytest.approx(-total / count, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-5)
    assert summary["bits_per_byte"] == pytest.approx(-total / math.log(2) / n_bytes, rel=1e-5)
    # --dtype bfloat16 (the float32 weights then held in bf16, LayerNorms float32: model.inference_params)
    assert main(["score", str(tmp_path / "ck"), "--input", str(inp), "--tokenizer", str(neox_tokenizer_path),
                 "--dtype", "bfloat16"]) == 0
    bf16 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    assert bf16["tokens_scored"] == count and bf16["sum_logprob"] == pytest.approx(total, rel=1e-2)


def test_interrupt_inside_a_gc_callback_is_not_lost():
    """A Ctrl-C that lands while a garbage-collector callback runs (JAX registers one) was raised there,
    printed by Python as 'Exception ignored in: <function _xla_gc_callback>' and dropped: the command
    went on (seen: a `train` run to its last step, exit 0).  It is delivered again after the callback."""
    import gc
    import signal
    import time

    from neox_jax import cli

    inside = []

    def callback(phase, info):
        if phase == "start" and not inside:
            inside.append(phase)
            signal.raise_signal(signal.SIGINT)  # lands here, in the callback
            for _ in range(1000):  # bytecode runs here: Python's handler is called inside the callback
                pass

    old_hook = sys.unraisablehook
    sys.unraisablehook = cli._redeliver(old_hook)
    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt):
            gc.collect()
            time.sleep(5)  # the signal sent again after the callback
    finally:
        gc.callbacks.remove(callback)
        sys.unraisablehook = old_hook
    assert inside == ["start"]


def test_unwritable_output_directory_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """An output in a directory this process cannot write (a read-only file system; os.access says so
    even for root, as here by a stand-in) is one line naming the directory, before the checkpoint is
    even looked at (it does not exist); it failed at the very end, naming an internal temporary."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == ro else real(p, mode, *a, **k))
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"text": "hello"}\n')
    none = str(tmp_path / "no-ckpt")
    for argv in (["score", none, "--input", str(docs), "--output", str(ro / "s.jsonl")],
                 ["generate", none, "--prompt", "a", "--output", str(ro / "g.jsonl")],
                 ["eval", none, "--perplexity", str(docs), "--output", str(ro / "e.json")],
                 ["data", "order", "--data-prefix", none, "--seq-length", "8", "--steps", "0", "--batch", "1",
                  "--output", str(ro / "o.jsonl")],
                 ["init", "tiny", str(ro / "ck")],
                 ["convert", none, str(ro / "hf"), "--to", "hf"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"neox-jax: error: {ro}: not writable (cannot write {ro}/"), (argv, err)
    assert list(ro.iterdir()) == []


def test_interrupt_while_xla_works_exits_130_without_a_crash(tmp_path):
    """Ctrl-C while a decode runs on XLA's threads: exit 130 after the one line, not SIGSEGV during
    interpreter shutdown (which `python -c "...sys.exit(main())"`, the old entry point, did in about
    half of such tries here).  Three interrupts at different moments of the generation."""
    ck = tmp_path / "ck"
    assert main(["-q", "init", "tiny", str(ck)]) == 0
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    for delay in (0.3, 0.8, 1.5):
        p = subprocess.Popen([sys.executable, "-m", "neox_jax", "generate", str(ck), "--prompt", "hello",
                              "--max-new-tokens", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=env)
        seen = []
        for line in p.stderr:  # the decode program's log line: loading and compiling are under way
            seen.append(line)
            if "decode:" in line:
                break
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        err = "".join(seen) + p.stderr.read()
        p.wait(timeout=60)
        assert p.returncode == 130 and err.strip().splitlines()[-1] == "neox-jax: interrupted", (delay, err)
        assert "Segmentation" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, line", [
    (["train", "run.yaml", "--nope"], "train: unrecognized arguments: --nope (see neox-jax train --help)"),
    (["train", "--nope"], "train: the following arguments are required: config"),
    (["convert"], "convert: the following arguments are required: src, dst (see neox-jax convert --help)"),
    (["data", "order", "--seed", "x"], "data order: argument --seed: invalid int value: 'x' "
                                       "(see neox-jax data order --help)"),
    # seeds: numpy's RandomState takes [0, 2**32 - 1]; a JAX key keeps only the low 32 bits
    (["data", "order", "--seed", "-1"], "data order: argument --seed: -1 is outside [0, 2**32 - 1] "
                                        "(see neox-jax data order --help)"),
    (["data", "order", "--seed", "4294967296"], "data order: argument --seed: 4294967296 is outside [0, 2**32 - 1]"),
    (["init", "tiny", "ck", "--seed", "99999999999999999999999"],
     "init: argument --seed: 99999999999999999999999 is outside [0, 2**32 - 1] (see neox-jax init --help)"),
    (["generate", "ck", "--prompt", "a", "--temperature", "1", "--seed", "99999999999999999999999"],
     "generate: argument --seed: 99999999999999999999999 is outside [0, 2**32 - 1]"),
    (["data", "order", "--data-prefix", "p", "--steps", "0", "--bogus", "1"],
     "data order: unrecognized arguments: --bogus 1"),
    (["data"], "data: the following arguments are required: DATA_COMMAND"),
    (["generate", "ck", "--prompt", "a", "--input", "b"], "generate: argument --input: not allowed with "
                                                          "argument --prompt"),
    (["score", "ck", "--input", "x", "--dtype", "float8"], "score: argument --dtype: invalid choice: 'float8'"),
    (["nope"], "argument COMMAND: invalid choice: 'nope'"),
    ([], "the following arguments are required: COMMAND (see neox-jax --help)"),
])
def test_usage_errors_are_one_line_naming_the_command(argv, line, capsys):
    """argparse's own errors (unknown option, missing or malformed argument) follow the CLI contract too:
    exactly one stderr line `neox-jax: error: COMMAND: ...`, exit status 2, no usage block, nothing on stdout."""
    capsys.readouterr()
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("neox-jax: error: ") and line in lines[0], out.err
    assert "usage:" not in out.err


def test_seed_bounds_are_accepted():
    for seed in ("0", "4294967295"):
        args = build_parser().parse_args(["data", "order", "--data-prefix", "p", "--steps", "0", "--seed", seed])
        assert args.seed == int(seed)


def test_usage_error_in_a_fresh_process_is_one_line():
    r = run_cli("data", "order", "--seed", "x")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["neox-jax: error: data order: argument --seed: invalid int value: 'x' "
                                     "(see neox-jax data order --help)"]


def _parsers():
    parser = build_parser()
    yield parser
    for name, p in parser.commands.choices.items():
        yield p
        if p.commands:
            yield from p.commands.choices.values()


def test_ignored_option_rules_name_options_of_their_command():
    """Every ignored_with/ignored_without rule names options its command has (a misspelt one would never fire)."""
    rules = 0
    for p in _parsers():
        options = {o for a in p._actions for o in a.option_strings}
        for option, others, _ in p._ignored:
            assert {option, *others} <= options, (p.prog, option, others)
            rules += 1
    assert rules >= 15


def test_typed_options_are_told_from_defaults():
    """An option typed at its default value counts as typed; an untyped one does not, whatever its default."""
    from neox_jax.cli import typed_options

    argv = ["data", "order", "--data-prefix", "p", "--steps", "0", "--seed", "1234"]
    args = build_parser().parse_args(argv)
    assert args.seed == 1234
    assert typed_options(argv, args) == {"--data-prefix", "--steps", "--seed"}
    argv = ["train", "c.yaml", "--no-resume", "--set", "a.b=1"]
    assert typed_options(argv, build_parser().parse_args(argv)) == {"--no-resume", "--set"}
    argv = ["-q", "train", "c.yaml", "--resume"]
    assert typed_options(argv, build_parser().parse_args(argv)) == {"--quiet", "--resume"}
