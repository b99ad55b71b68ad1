"""The training loop and `neox-jax train` on real text (tinyshakespeare, the GPT-NeoX tokenizer):
determinism, falling loss, the run directory's contents read by independent readers, clean stops
on SIGTERM, a non-finite loss naming its step, and one-line errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from neox_jax.data.indexed import IndexedDataset
from neox_jax.data.preprocess import preprocess
from neox_jax.train.config import from_sections, load_resolved

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared, neox_tokenizer_path):
    """The first ~300 kB of tinyshakespeare, one document per speech, EOD appended (as the demo)."""
    d = tmp_path_factory.mktemp("corpus")
    text = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000]
    (d / "shakes.txt").write_text(text, encoding="utf-8")
    res = preprocess([d / "shakes.txt"], str(d / "shakes"), neox_tokenizer_path, append_eod=True,
                     txt_mode="blank-lines")
    return res.prefix


def raw_config(prefix, **train):
    return {
        "model": {"preset": "tiny", "hidden_size": 32, "num_heads": 2, "intermediate_size": 128,
                  "max_position_embeddings": 64},
        "data": {"path": prefix, "split": "949,50,1", "seq_length": 64},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1},
        "train": {"steps": 30, "batch_size": 8, "log_every": 10, "eval_every": 15, "eval_steps": 2, **train},
    }


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_thirty_steps_twice_are_identical_and_the_loss_falls(corpus, tmp_path, record_property):
    from neox_jax.train.loop import train

    run = from_sections(raw_config(corpus))
    a = train(run, tmp_path / "a")
    b = train(run, tmp_path / "b")
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == 30 and la == lb  # bit-identical loss sequences
    assert np.mean(la[-5:]) < np.mean(la[:5]) - 1.0, la
    assert a["valid_loss"] == b["valid_loss"] and a["valid_loss"] < la[0] - 1.0
    record_property("measured", f"tiny on shakespeare: loss {la[0]:.3f} -> {la[-1]:.3f}, "
                                f"valid {a['valid_loss']:.3f}, {a['tokens_per_s']:.0f} tokens/s (CPU)")


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "neox_jax", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


def test_cli_run_directory(corpus, tmp_path):
    """config.yaml round-trips, metrics.jsonl has one line per step plus validations, TensorBoard's own
    reader sees the scalars, and the final parameters are a checkpoint `score` reads."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(corpus, steps=6, eval_every=3, log_every=3)))
    r = _cli("train", cfg, "--run-dir", tmp_path / "run", "--set", "optimizer.lr=2e-3")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    run_dir = tmp_path / "run"
    resolved = load_resolved(run_dir / "config.yaml")
    assert resolved.optimizer.lr == 2e-3 and resolved.train.steps == 6
    assert resolved.model.hidden_size == 32 and resolved.model.num_layers == 2  # from the preset
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == list(range(6))
    for key in ("lr", "grad_norm", "loss_scale", "skipped", "tokens_per_s", "tflops_per_device", "step_time",
                "data_step"):
        assert key in steps[0], key
    assert steps[0]["lr"] == 0.0 and steps[-1]["data_step"] == 6
    valid = [x for x in recs if "valid_loss" in x]
    assert [x["step"] for x in valid] == [3, 6] and valid[-1]["valid_loss"] == summary["valid_loss"]

    import tensorflow as tf  # TensorFlow's own event-file reader

    scalars = {}
    for f in (run_dir / "tensorboard").iterdir():
        for ev in tf.compat.v1.train.summary_iterator(str(f)):
            for v in ev.summary.value:
                scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
    assert [s for s, _ in scalars["train/loss"]] == [2, 5]
    assert scalars["train/loss"][-1][1] == pytest.approx(steps[5]["loss"], rel=1e-6)
    assert scalars["valid/valid_loss"][-1][1] == pytest.approx(summary["valid_loss"], rel=1e-6)

    ck = run_dir / "checkpoints" / "6"
    assert summary["checkpoint"] == str(ck)
    # the run's own data, scored from the checkpoint: perplexity near exp(validation loss)
    toks = IndexedDataset(corpus)[5].tolist()
    (tmp_path / "doc.jsonl").write_text(json.dumps({"tokens": toks}) + "\n")
    s = _cli("score", ck, "--input", tmp_path / "doc.jsonl")
    assert s.returncode == 0, s.stderr
    assert json.loads(s.stdout)["summary"]["tokens_scored"] == len(toks) - 1


def test_sigterm_stops_cleanly(corpus, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(corpus, steps=3000, eval_every=0, eval_steps=0)))
    proc = subprocess.Popen([sys.executable, "-m", "neox_jax", "train", str(cfg), "--run-dir", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    # a second train of the same run directory meanwhile (submitted twice): refused, naming the first
    second = _cli("train", cfg, "--run-dir", tmp_path / "r")
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f"neox-jax: error: {tmp_path / 'r'}: another neox-jax train (pid {proc.pid} on {socket.gethostname()}) "
        f"is using this run directory (lock {tmp_path / '.r.neox-jax-train.lock'})"), second.stderr
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err  # not finished: never 0
    assert "stopped by SIGTERM after step" in err and "the same command resumes" in err, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["stopped_by"] == "SIGTERM" and 2 <= summary["steps"] < 3000
    assert len(losses(tmp_path / "r")) == summary["steps"]
    from neox_jax.checkpoint import is_checkpoint

    assert is_checkpoint(tmp_path / "r" / "checkpoints" / str(summary["steps"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "run.yaml"]  # the lock is gone with the run


def nan_init_run(corpus, tmp_path: Path, steps: int) -> None:
    """tmp_path/run.yaml (the tiny run of `steps` steps) and tmp_path/nan: its model's weights with
    one NaN in the output head, for --init-from (the first step's loss is NaN)."""
    import jax
    import jax.numpy as jnp

    from neox_jax import model as M
    from neox_jax.checkpoint import save_params
    from neox_jax.config import from_dict

    raw = raw_config(corpus, steps=steps)
    cfg = from_dict({**yaml.safe_load(open(ROOT / "configs" / "tiny.yaml"))["model"], **{
        k: v for k, v in raw["model"].items() if k != "preset"}})
    params = M.init_params(cfg, 0)
    params["embed_out"]["kernel"] = params["embed_out"]["kernel"].at[0, 0].set(jnp.nan)
    save_params(tmp_path / "nan", cfg, jax.device_get(params))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))


def test_non_finite_loss_stops_naming_the_step(corpus, tmp_path):
    """Start from a checkpoint whose head is NaN: the first step's loss is NaN; without loss scaling
    the run stops at step 0 with one line, exit 2."""
    nan_init_run(corpus, tmp_path, steps=5)
    r = _cli("train", tmp_path / "run.yaml", "--run-dir", tmp_path / "r", "--init-from", tmp_path / "nan")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("neox-jax: error: step 0: loss nan"), lines[-1]
    # nothing was logged, so no TensorBoard writer was opened: tensorboardX's exit handler for a writer
    # that never wrote starts a thread at interpreter exit, a traceback after this line on Python 3.12
    assert not (tmp_path / "r" / "tensorboard").exists()


def test_a_run_that_failed_before_its_first_step_is_started_over(corpus, tmp_path, capsys):
    """A fresh run that fails at its first step (NaN weights from --init-from) leaves its run directory
    with config.yaml, an empty metrics.jsonl and no checkpoint; the same command without the bad
    weights then trains there without --overwrite.  A directory with anything else in it (here a
    notes file) is still refused."""
    nan_init_run(corpus, tmp_path, steps=2)
    run = tmp_path / "r"
    r = _cli("train", tmp_path / "run.yaml", "--run-dir", run, "--init-from", tmp_path / "nan")
    assert r.returncode == 2 and "loss nan" in r.stderr.strip().splitlines()[-1], r.stderr
    assert (run / "config.yaml").is_file() and not (run / "metrics.jsonl").read_text()
    (run / "notes.txt").write_text("mine\n")
    from neox_jax.cli import main  # in this process: the refusal comes before any compilation

    assert main(["-q", "train", str(tmp_path / "run.yaml"), "--run-dir", str(run)]) == 2
    assert "run directory exists and is not empty" in capsys.readouterr().err
    (run / "notes.txt").unlink()
    r = _cli("train", tmp_path / "run.yaml", "--run-dir", run)
    assert r.returncode == 0, r.stderr
    assert "stopped before its first step" in r.stderr and "starting it over" in r.stderr, r.stderr
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)] == [0, 1]
    assert not list(tmp_path.glob("*aside*")) and sorted(p.name for p in tmp_path.iterdir()) == ["nan", "r", "run.yaml"]


@pytest.mark.parametrize("case", ["exists", "cudnn", "arch", "bad-set", "unknown-key", "no-data", "batch",
                                  "valid-too-small", "train-too-small", "vocab"])
def test_errors_are_one_line(case, corpus, tmp_path):
    raw = raw_config(corpus, steps=2)
    args = []
    expect = also = ""
    if case == "exists":
        (tmp_path / "r").mkdir()  # a run that took a step (its metrics are kept: not started over)
        (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump(raw))
        (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 0, "loss": 10.8}\n')
        expect = "run directory exists and is not empty"
    elif case == "cudnn":
        raw["model"]["attention"] = "cudnn"
        expect = "cudnn, which needs an NVIDIA GPU"
    elif case == "arch":
        from neox_jax.checkpoint import save_params
        from neox_jax.config import load_config
        from neox_jax.model import init_params

        other = load_config("tiny")
        save_params(tmp_path / "other", other, init_params(other, 0))
        args = ["--init-from", tmp_path / "other"]
        expect = "architecture differs from the run's model: hidden_size is 64"
    elif case == "bad-set":
        args = ["--set", "train.nosuch=1"]
        expect = "train.nosuch"
    elif case == "unknown-key":
        raw["optimizer"]["learning_rate"] = 1.0
        expect = "optimizer.learning_rate"
    elif case == "no-data":
        raw["data"]["path"] = str(tmp_path / "missing")
        expect = "missing"
    elif case == "batch":
        raw["train"]["batch_size"] = 6
        raw["train"]["grad_accum"] = 4
        expect = "not divisible by train.grad_accum"
    elif case == "valid-too-small":  # the validation split of "2000,1,0" holds 15 samples of 65 tokens
        raw["data"]["split"] = "2000,1,0"
        expect = (f"{corpus}: the validation split (data.split '2000,1,0': documents [")
        also = "has 15 samples of 65 tokens; train.eval_steps 2 x train.batch_size 8 need 16"
    elif case == "train-too-small":  # and the training split of "1,2000,0" 15
        raw["data"]["split"] = "1,2000,0"
        expect = f"{corpus}: the training split (data.split '1,2000,0': documents [0, "
        also = "has 15 samples of 65 tokens; train.steps 2 x train.batch_size 8 need 16"
    elif case == "vocab":  # GPT-NeoX-20B token ids in a model of 512: refused before anything runs
        raw["model"]["vocab_size"] = 512
        raw["model"]["tokenizer_vocab_size"] = 0
        data = IndexedDataset(corpus)  # an independent reader: the corpus does hold such ids
        assert max(int(data[i].max()) for i in range(len(data))) >= 512
        expect = f"{corpus}: token id "
        also = " outside model.vocab_size 512"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _cli("train", tmp_path / "run.yaml", "--run-dir", tmp_path / "r", *args)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("neox-jax: error:")]
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert expect in err[0] and also in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new written
    if case in ("valid-too-small", "train-too-small", "vocab"):  # refused before compiling
        assert "train step compiled" not in r.stderr, r.stderr
    if case == "vocab":
        assert int(err[0].split("token id ")[1].split()[0]) >= 512, err[0]


def test_loader_checks_every_batch_for_token_ids_outside_the_vocabulary():
    """A token id past the vocabulary in a later batch (or a negative one) is refused when the
    loader produces that batch, naming the source; without vocab_size nothing is checked."""
    from neox_jax.data.loader import Loader
    from neox_jax.errors import UserError

    rows = np.zeros((6, 5), np.int32)
    rows[3, 2] = 10  # global batch 1 (rows 2, 3) of batch size 2
    rows[5, 0] = -1  # global batch 2
    with Loader(rows, 2, process_index=0, process_count=1, vocab_size=10, source="data/x") as ld:
        assert next(ld)["tokens"].max() == 0
        with pytest.raises(UserError, match=r"^data/x: token id 10 outside model.vocab_size 10$"):
            next(ld)
    with Loader(rows, 2, start_step=2, process_index=0, process_count=1, vocab_size=10, source="data/x") as ld:
        with pytest.raises(UserError, match=r"^data/x: token id -1 outside model.vocab_size 10$"):
            next(ld)
    with Loader(rows, 2, process_index=0, process_count=1) as ld:
        assert [int(b["tokens"].max()) for b in ld] == [0, 10, 0]


def test_gpt_neox_yaml_trains(corpus, tmp_path):
    """A GPT-NeoX config in its own JSON-style YAML (dashed keys, comments, True, trailing commas),
    split over two files as GPT-NeoX users keep them, trains with `neox-jax train` on the
    train-data-paths route; the resolved config says what it mapped."""
    (tmp_path / "model.yml").write_text("""{
  # a tiny GPT-NeoX
  "pipe-parallel-size": 1, "model-parallel-size": 1,
  "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": 64,
  "max-position-embeddings": 64, "pos-emb": "rotary", "rotary-pct": 0.25, "no-weight-tying": true,
  "gpt-j-residual": true, "output-layer-parallelism": "column", "attention-config": [[["flash"], 2]],
  "scaled-upper-triang-masked-softmax-fusion": true, "bias-gelu-fusion": true,
  "init_method": "small_init", "output_layer_init_method": "wang_init",
  "optimizer": {"type": "Adam", "params": {"lr": 0.003, "betas": [0.9, 0.95], "eps": 1.0e-8,}},
  "min_lr": 0.0003,
  "zero_optimization": {"stage": 1, "overlap_comm": True,},
  "train_micro_batch_size_per_gpu": 2, "gas": 2,
  "checkpoint-activations": true, "checkpoint-num-layers": 1, "partition-activations": true,
  "gradient_clipping": 1.0, "weight-decay": 0.1, "hidden-dropout": 0, "attention-dropout": 0,
  "train-iters": 4, "lr-decay-iters": 4, "lr-decay-style": "cosine", "warmup": 0.25,
  "eval-interval": 2, "eval-iters": 1, "log-interval": 2, "distributed-backend": "nccl",
}""")
    (tmp_path / "local_setup.yml").write_text(f"""{{
  "train-data-paths": ["{corpus}"], "valid-data-paths": ["{corpus}"],
  "tokenizer-type": "HFTokenizer", "vocab-file": "20B_tokenizer.json",
}}""")
    r = _cli("train", tmp_path / "model.yml", tmp_path / "local_setup.yml", "--run-dir", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert "not applicable" in r.stderr and "zero_optimization" in r.stderr
    run = load_resolved(tmp_path / "r" / "config.yaml")
    # batch = micro 2 x gas 2 x the data-parallel devices (the child sees the same devices as we do)
    import jax

    assert run.train.batch_size == 2 * 2 * jax.device_count()
    assert run.train.grad_accum == 2 and run.model.remat == "full" and run.data.train_paths == (corpus,)
    assert run.optimizer.lr == 0.003 and run.optimizer.schedule == "neox_2022"
    assert len(losses(tmp_path / "r")) == 4
