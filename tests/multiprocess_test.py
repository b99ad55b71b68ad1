"""Two processes x 4 CPU devices (launch/local.sh, jax.distributed, gloo collectives) train exactly
as one process x 8 devices: same per-step losses and final parameters, and each process fed its
own contiguous half of every global batch, checked by content against GPT-NeoX's data order."""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from neox_jax.checkpoint import load_params
from neox_jax.config import load_config
from neox_jax.model import init_params
from neox_jax.data.preprocess import preprocess
from neox_jax.train.config import from_sections
from neox_jax.train.loop import build_datasets, train
from processes import ROOT, local_sh, outputs, two_processes

STEPS, BATCH = 3, 8
LONG = 90  # steps of the runs that a signal or a failed write stops


def _config(prefix: str, steps: int = STEPS) -> dict:
    """The tiny run; with `steps` other than STEPS, the longer two-process run of the tests that
    stop it (data across the two processes as nodes)."""
    return {
        "model": {"preset": "tiny", "hidden_size": 32, "num_heads": 2, "intermediate_size": 128,
                  "max_position_embeddings": 64},
        "data": {"path": prefix, "split": "949,50,1", "seq_length": 32},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1},
        "train": {"steps": steps, "batch_size": BATCH, "log_every": 1, "eval_steps": 0, "tensorboard": False},
        **({"mesh": {"dcn_data": 2}} if steps != STEPS else {}),
    }


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory, shared, neox_tokenizer_path) -> str:
    d = tmp_path_factory.mktemp("shakes")
    text = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    (d / "shakes.txt").write_text(text, encoding="utf-8")
    return preprocess([d / "shakes.txt"], str(d / "shakes"), neox_tokenizer_path,
                      append_eod=True, txt_mode="blank-lines").prefix


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One persistent compilation cache for the runs below that compile the same two-process step
    (the same config but for the checkpoint schedule): the second one does not compile it again."""
    return tmp_path_factory.mktemp("jax-cache")


def test_two_processes_train_as_one(tmp_path, prefix, record_property):
    raw = _config(prefix)
    # the two processes play two nodes: CPU devices all report slice_index 0 (one host), so the node
    # count is given (nodes = blocks of consecutive processes); data across them, fsdp within
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**raw, "mesh": {"dcn_data": 2}}))

    r, logs = local_sh(tmp_path / "run.yaml", tmp_path / "two", cwd=tmp_path,
                       neox_jax=f"{sys.executable} {ROOT / 'tests' / 'record_rows.py'} {tmp_path / 'rows'}")
    assert r.returncode == 0, r.stderr[-3000:] + logs[-3000:]
    assert "2 processes, 4 local / 8 global devices" in r.stderr, r.stderr[-2000:]
    assert "hybrid mesh: 2 nodes/slices (blocks of consecutive processes)" in r.stderr, r.stderr[-2000:]
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1} over 8 cpu device(s)" in r.stderr
    # only process 0 logs at INFO and prints the summary
    assert "step 1/3" not in logs and "INFO" not in logs, logs
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == STEPS

    run = from_sections(raw)
    train(run, tmp_path / "one")  # 1 process x 8 devices (tests/conftest.py)
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    # the same program on the same devices; only the collectives' implementation differs (gloo
    # across processes, in-process within one), so summation order may differ in the last bits
    np.testing.assert_allclose(two, one, rtol=1e-5)
    _, p2 = load_params(tmp_path / "two" / "checkpoints" / str(STEPS))
    _, p1 = load_params(tmp_path / "one" / "checkpoints" / str(STEPS))
    # AdamW normalises each update (m / sqrt(v)), so an element whose gradient is ~0 turns a last-bit
    # difference into a step of up to ~lr (3e-3): parameters agree to 1e-4 absolute, not to the bit
    # (measured: 1.9e-5 at most)
    for a, b in zip(*(sorted(jax_leaves(p), key=lambda kv: kv[0]) for p in (p2, p1))):
        np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-4, err_msg=a[0])

    # rows by content: process k fed rows [s*B + k*B/2, s*B + (k+1)*B/2) of the data order
    train_ds, _ = build_datasets(run)
    for k in range(2):
        fed = np.load(tmp_path / f"rows-process-{k}.npy")
        assert fed.shape == (STEPS, BATCH // 2, 33)
        for s in range(STEPS):
            want = np.stack([train_ds[s * BATCH + k * BATCH // 2 + j] for j in range(BATCH // 2)])
            np.testing.assert_array_equal(fed[s], want, err_msg=f"process {k} step {s}")
    record_property("measured", f"2 processes x 4 CPU devices vs 1 x 8: losses {two} vs {one}")


def test_params_sharded_over_two_processes_are_saved_whole(tmp_path):
    """`checkpoint.save_params` when each of two processes holds half of every sharded tensor: both
    write their shards into one temporary directory, process 0 commits, and the checkpoint read back
    in one process is the model initialised in one process, bit for bit; nothing else is left."""
    procs = two_processes([str(ROOT / "tests" / "save_params_processes.py"), str(tmp_path / "ck"), "3"], pause=0)
    outs = outputs(procs)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "parameters span several processes; no checksums written" in outs[0][1], outs[0][1][-2000:]
    cfg, got = load_params(tmp_path / "ck")
    assert cfg == load_config("tiny")
    got, want = dict(jax_leaves(got)), dict(jax_leaves(init_params(cfg, 3)))  # want: one process, one device
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert os.listdir(tmp_path) == ["ck"]  # no temporary or journal beside it


def jax_leaves(params):
    from neox_jax.tree import flatten

    return [(k, np.asarray(v)) for k, v in flatten(params).items()]


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path, prefix, cache):
    """SIGTERM reaches one process only (as when a scheduler signals one task first): every process
    stops after the same step and they write one checkpoint of it together, instead of the signalled
    process leaving the train step's collectives while the others wait in them.  Saves every 3 steps
    run meanwhile: each is collected by all processes at the same step once every process's write has
    ended (the same per-step vote)."""
    steps = LONG
    raw = _config(prefix, steps)
    raw["checkpoint"] = {"every_steps": 3, "keep_last": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    procs = two_processes(["-m", "neox_jax", "train", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "run")],
                           pause=0.2, cache=cache)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 8):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 143, err[-3000:]  # the unsignalled process too: its run stopped short
    summary = json.loads(outs[0][0].splitlines()[-1])  # process 0 prints the summary
    stop = summary["steps"]
    assert 8 <= stop < steps and summary["stopped_by"] == "SIGTERM", summary
    for _, err in outs:
        assert f"stopped by SIGTERM after step {stop}" in err, err[-2000:]
    assert re.search(r"checkpoint of step \d+ committed\n", outs[0][1]), outs[0][1][-3000:]  # collected in the loop
    assert sorted(int(d.name) for d in (tmp_path / "run" / "checkpoints").iterdir() if d.name.isdigit()) == [stop]


def test_a_run_directory_in_use_is_refused_by_every_process(tmp_path, prefix):
    """Process 0 takes the run directory's lock; when another train holds it (here: this test), both
    processes refuse with process 0's one line (process 1 cannot see the lock's holder itself) and
    neither waits for the other in a collective."""
    from neox_jax.train.run_dir import RunLock

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_config(prefix)))
    with RunLock(tmp_path / "run"):
        procs = two_processes(["-m", "neox_jax", "train", str(tmp_path / "run.yaml"), "--run-dir",
                               str(tmp_path / "run")], pause=0)
        outs = outputs(procs, timeout=120)
    want = f"neox-jax: error: {tmp_path / 'run'}: another neox-jax train (pid {os.getpid()} on "
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1].startswith(want), err[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["run.yaml"]


def test_sigterm_during_setup_stops_every_process(tmp_path, prefix):
    """SIGTERM to both processes after jax.distributed has started and before the first step (the run
    directory's config.yaml is written; the steps are still compiling, with no compilation cache):
    each exits 143 with `neox-jax: terminated`, as one process does.  JAX's preemption service
    took SIGTERM from then on and only noted it: the run trained all its steps and exited 0."""
    raw = _config(prefix, LONG)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    procs = two_processes(["-m", "neox_jax", "train", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "run")],
                           pause=0.5)
    try:
        cfg, metrics = tmp_path / "run" / "config.yaml", tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not cfg.exists():
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert not metrics.exists() or not metrics.read_text(), "the signal came after the first step: no test"
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 143, err[-3000:]
        assert err.strip().splitlines()[-1] == "neox-jax: terminated", err[-3000:]


def test_a_write_failing_in_one_process_stops_every_process(tmp_path, prefix, cache):
    """The background write of step 3 fails in process 1 only (a full local disk): Orbax's barriers
    then wait for each other until `checkpoint.write_timeout_s` (6 s here).  Both processes stop in
    the loop, at most twice that timeout after the save (each step held 0.3 s: 40 steps), long
    before the next save (step 75) or the end (step 90) would have waited for it: exit status 2,
    one error line each, process 1 naming its cause, process 0 the timeout; no checkpoint."""
    timeout = 6
    raw = _config(prefix, LONG)
    raw["checkpoint"] = {"steps": [3, 75], "at_end": False, "write_timeout_s": timeout}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    procs = two_processes([str(ROOT / "tests" / "failing_save.py"), "3", "1", "-", "train", str(tmp_path / "run.yaml"),
                            "--run-dir", str(run)], pause=0.3, cache=cache)
    outs = outputs(procs)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(f"neox-jax: error: {run / 'checkpoints' / '3'}: writing the "
                                                       "checkpoint of step 3 failed ("), err[-2000:]
        assert err.count("neox-jax: error:") == 1, err[-3000:]
    last = [err.strip().splitlines()[-1] for _, err in outs]
    assert f"checkpoint.write_timeout_s = {timeout} s" in last[0], last[0]
    assert "No space left on device" in outs[1][1], outs[1][1][-3000:]  # process 1's own cause, logged or raised
    steps = len((run / "metrics.jsonl").read_text().splitlines())
    assert 3 < steps < 3 + 2 * timeout / 0.3 + 2, steps
    assert not [d for d in (run / "checkpoints").iterdir() if d.name.isdigit()]
