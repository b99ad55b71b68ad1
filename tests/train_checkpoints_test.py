"""Training checkpoints (neox_jax/train/checkpoints.py) with real files and real subprocesses:
resume equality (bit-for-bit, data position included) after a SIGTERM, restore onto other meshes,
SIGKILL in the middle of a save, a truncated array file (error naming it, then --resume-fallback),
--start-step against `neox-jax data order` (an independent path to the data), the readers of a
step directory, and the one-line refusals."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import yaml

from neox_jax import checkpoint as ckpt
from neox_jax.cli import main
from neox_jax.train import checkpoints as tc
from neox_jax.train.config import from_sections
from train_loop_test import corpus, losses  # noqa: F401  (corpus is a fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def raw_config(prefix, mesh=(2, 2, 2), **checkpoint):
    return {
        "model": {"preset": "tiny", "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                  "max_position_embeddings": 32},
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh)),
        "data": {"path": prefix, "split": "949,50,1", "seq_length": 32, "prefetch": 1},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup": 0.2},
        "train": {"steps": STEPS, "batch_size": 8, "log_every": 4, "eval_every": 0, "eval_steps": 0,
                  "tensorboard": False},
        "checkpoint": {"every_steps": 4, **checkpoint},
    }


_CACHE = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
ENV = {"PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this module: the runs on mesh (2, 2, 2), in this
    process and in the subprocesses, compile the same step once (about 3x faster on 2 cores)."""
    d = tmp_path_factory.mktemp("jax-cache")
    old = {name: getattr(jax.config, name) for name in _CACHE}
    for name, value in zip(_CACHE, (str(d), 0, 0)):
        jax.config.update(name, value)
        ENV[name.upper()] = str(value)
    yield d
    for name, value in old.items():
        jax.config.update(name, value)
        ENV.pop(name.upper())


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory, compile_cache):  # noqa: F811
    """An uninterrupted 8-step run on mesh (2, 2, 2) with checkpoints after steps 4 and 8."""
    from neox_jax.train.loop import train

    d = tmp_path_factory.mktemp("reference")
    raw = raw_config(corpus)
    (d / "run.yaml").write_text(yaml.safe_dump(raw))
    train(from_sections(raw), d / "run")
    return d / "run", d / "run.yaml"


def _cli(*args, **kw):
    env = {**os.environ, **ENV}
    return subprocess.run([sys.executable, "-m", "neox_jax", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


def _copy_run(src, dst, keep_steps):
    shutil.copytree(src, dst)
    for c in (dst / "checkpoints").iterdir():
        if int(c.name) not in keep_steps:
            shutil.rmtree(c)
    return dst


def test_layout_and_readers(reference, capsys, caplog, tmp_path):
    """A step directory is read by the params readers (`resolve` of the run directory = its newest
    complete step), the loader item holds the data position, the run item the resolved config.
    Reading the params item alone logs no Orbax warning about the step-level metadata file."""
    run_dir, _ = reference
    steps = tc.TrainCheckpoints(run_dir / "checkpoints", read_only=True).steps()
    assert steps == [4, 8]
    assert ckpt.resolve(run_dir) == run_dir / "checkpoints" / "8"
    with caplog.at_level("WARNING"):
        cfg, params = ckpt.load_params(run_dir / "checkpoints" / "4")
    assert not [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()]
    assert cfg.hidden_size == 32 and params["embed_in"]["embedding"].shape == (cfg.vocab_size, 32)
    s4 = run_dir / "checkpoints" / "4"
    assert json.loads((s4 / "loader" / "loader.json").read_text())["step"] == 4
    assert json.loads((s4 / "run" / "run.json").read_text())["train"]["steps"] == STEPS
    assert json.loads((s4 / "neox_jax" / "neox_jax.json").read_text())["kind"] == "train"
    # `inspect` (the converters' reader) takes the run directory: its newest step, every tensor
    capsys.readouterr()
    assert main(["inspect", str(run_dir), "--json", "--no-hash"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(run_dir / "checkpoints" / "8")
    _, p8 = ckpt.load_params(run_dir)
    flat = {"/".join(str(k.key) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(p8)[0]}
    assert len(info["tensors"]) >= len(flat)
    emb = next(t for t in info["tensors"] if "embed_in" in t["name"])
    assert emb["norm"] == pytest.approx(float(np.linalg.norm(flat["embed_in/embedding"].astype(np.float64))),
                                        rel=1e-6)
    # training steps carry no checksums.json: --verify says so (it said "written before checksums existed")
    with pytest.raises(ckpt.CheckpointError, match=r"no checksums.json \(a training checkpoint "):
        ckpt.load_params(s4, verify=True)
    # `convert --to neox` of step 4 writes GPT-NeoX's global_step4 (iteration 4), not global_step0
    assert main(["-q", "convert", str(s4), str(tmp_path / "nx"), "--to", "neox"]) == 0
    assert (tmp_path / "nx" / "latest").read_text().strip() == "global_step4"
    assert torch.load(tmp_path / "nx" / "global_step4" / "mp_rank_00_model_states.pt",
                      weights_only=True)["iteration"] == 4


def test_sigterm_then_resume_is_bit_identical(reference, tmp_path):
    """SIGTERM a training subprocess: it finishes the step, writes a checkpoint, waits for the
    commit and exits 143; `--resume` then gives losses bit-identical to the uninterrupted run."""
    run_dir, cfg = reference
    raw = yaml.safe_load(cfg.read_text())
    raw["checkpoint"] = {"every_steps": 0}
    raw["train"]["steps"] = STEPS
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "neox_jax", "train", str(tmp_path / "run.yaml"), "--run-dir",
                             str(tmp_path / "r")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, **ENV})
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    summary = json.loads(out.splitlines()[-1])
    stop = summary["steps"]
    assert summary["stopped_by"] == "SIGTERM" and 2 <= stop < STEPS, summary
    assert tc.TrainCheckpoints(tmp_path / "r" / "checkpoints", read_only=True).steps() == [stop]
    r = _cli("train", tmp_path / "run.yaml", "--run-dir", tmp_path / "r", "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {tmp_path / 'r' / 'checkpoints' / str(stop)}: step {stop}" in r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["started_at"] == stop
    assert losses(tmp_path / "r") == losses(run_dir)  # bit-identical, all 8 steps


def test_restore_onto_other_meshes(reference):
    """Saved on (2, 2, 2), restored on (8, 1, 1) and on one device: identical values, every leaf
    (params, Adam count/mu/nu, loss scale, step counters) placed with the new mesh's shardings."""
    from neox_jax.sharding import make_mesh
    from neox_jax.train.state import abstract_state, make_optimizer, state_shardings

    run_dir, cfg = reference
    raw = yaml.safe_load(cfg.read_text())
    ckpts = tc.TrainCheckpoints(run_dir / "checkpoints", read_only=True)
    values = {}
    for shape in ((2, 2, 2), (8, 1, 1), (1, 1, 1)):
        run = from_sections({**raw, "mesh": dict(zip(("data", "fsdp", "tensor"), shape))})
        mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        opt = make_optimizer(run)
        sh = state_shardings(run, mesh, opt)
        abstract = abstract_state(run, opt, sh)
        state, loader = ckpts.restore(8, abstract)
        assert loader["step"] == 8
        for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(sh)):
            assert leaf.sharding == s
        values[shape] = jax.device_get(state)
    ref = jax.tree.leaves(values[(2, 2, 2)])
    assert int(values[(2, 2, 2)].step) == 8 and int(values[(2, 2, 2)].opt_state[0].count) == 8
    for shape in ((8, 1, 1), (1, 1, 1)):
        for a, b in zip(ref, jax.tree.leaves(values[shape])):
            np.testing.assert_array_equal(a, b)


def test_truncated_array_file_then_fallback_on_another_mesh(reference, tmp_path, caplog):
    """A truncated array file in the newest step: one line naming it, exit 2, nothing changed;
    --resume-fallback takes step 4 and training continues, here on mesh (8, 1, 1); the damaged
    step 8 is moved aside (kept, logged) and the retrained step 8 saved in its place, readable."""
    run_dir, cfg = reference
    r = _copy_run(run_dir, tmp_path / "r", keep_steps={4, 8})
    files = sorted((r / "checkpoints" / "8" / "params").rglob("d/*"), key=lambda p: -p.stat().st_size)
    victim = files[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = (r / "metrics.jsonl").read_text()
    assert main(["train", str(cfg), "--run-dir", str(r)]) == 2
    # (main prints the one line; the message is checked through the exception text below)
    from neox_jax.train.loop import train

    raw = yaml.safe_load(cfg.read_text())
    with pytest.raises(ckpt.CheckpointError) as e:
        train(from_sections(raw), r)
    msg = str(e.value)
    assert "checkpoint of step 8 cannot be restored" in msg and "--resume-fallback" in msg, msg
    assert msg.startswith(f"{victim}: ") and "unreadable (OUT_OF_RANGE" in msg, msg  # the truncated file
    assert (r / "metrics.jsonl").read_text() == before
    raw["mesh"] = {"data": 8, "fsdp": 1, "tensor": 1}
    truncated = victim.read_bytes()
    with caplog.at_level("INFO", logger="neox_jax"):
        out = train(from_sections(raw), r, resume_fallback=True)
    assert out["started_at"] == 4 and out["steps"] == STEPS
    # another mesh reduces in another order: equal to float32 rounding, not bit-for-bit
    np.testing.assert_allclose(losses(r), losses(run_dir), rtol=2e-5)
    assert losses(r)[:4] == losses(run_dir)[:4]
    # the damaged step 8 was moved aside, untouched, and said so; step 8 was written anew
    aside = r / "checkpoints" / "8.damaged"
    assert (aside / victim.relative_to(r / "checkpoints" / "8")).read_bytes() == truncated
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert f"moved aside to {aside.absolute()}" in logged and "not written again" not in logged, logged
    assert out["checkpoint"] == str((r / "checkpoints" / "8").absolute())
    assert tc.TrainCheckpoints(r / "checkpoints", read_only=True).steps() == [4, 8]
    assert ckpt.resolve(r) == r / "checkpoints" / "8"
    # the new step 8 reads, and holds the retrained parameters: next to the uninterrupted run's step 8
    # (Adam on another mesh moves near-zero weights by rounding-sized amounts), far from its step 4
    flat = lambda path: np.concatenate([np.ravel(x) for x in jax.tree.leaves(ckpt.load_params(path)[1])])  # noqa: E731
    p8, ref8, ref4 = flat(r), flat(run_dir / "checkpoints" / "8"), flat(run_dir / "checkpoints" / "4")
    assert np.linalg.norm(p8 - ref8) < 0.01 * np.linalg.norm(ref4 - ref8)
    # and the run continues from it without --resume-fallback (nothing left to train)
    assert train(from_sections(raw), r)["started_at"] == STEPS


@pytest.mark.parametrize("damage", ["empty-marker", "marker-of-step-4", "run-json-a-list"])
def test_a_damaged_marker_or_run_config_is_a_damaged_step(reference, tmp_path, damage, caplog):
    """The newest step's neox_jax.json emptied (the resume used to go on from it; `generate` refused
    it), or saying another step, or its run.json not a run config: one error naming that file, with
    the --resume-fallback hint; with fallback the resume takes step 4 and moves step 8 aside."""
    from neox_jax.sharding import make_mesh
    from neox_jax.train.state import abstract_state, make_optimizer, state_shardings

    run_dir, cfg = reference
    r = _copy_run(run_dir, tmp_path / "r", keep_steps={4, 8})
    s8 = r / "checkpoints" / "8"
    if damage == "empty-marker":
        victim, want = s8 / "neox_jax" / "neox_jax.json", "unreadable (JSONDecodeError"
        victim.write_text("")
    elif damage == "marker-of-step-4":
        victim, want = s8 / "neox_jax" / "neox_jax.json", "kind 'train' and step 4; a training checkpoint of step 8"
        victim.write_text((r / "checkpoints" / "4" / "neox_jax" / "neox_jax.json").read_text())
    else:
        victim, want = s8 / "run" / "run.json", "top level must be a mapping of sections, got list"
        victim.write_text("[1, 2]")
    if damage == "empty-marker":  # what generate / convert say of it (the reference for "damaged")
        with pytest.raises(ckpt.CheckpointError, match="neox_jax.json: unreadable"):
            ckpt.load_params(s8)
    run = from_sections(yaml.safe_load(cfg.read_text()))
    opt = make_optimizer(run)
    abstract = abstract_state(run, opt, state_shardings(run, make_mesh(2, 2, 2), opt))
    with pytest.raises(ckpt.CheckpointError) as e:
        tc.restore_latest(tc.TrainCheckpoints(r / "checkpoints", run), run, abstract)
    msg = str(e.value)
    assert msg.startswith(f"{victim}: ") and want in msg and msg.endswith(
        "(pass --resume-fallback to resume from the previous step)"), msg
    with caplog.at_level("WARNING", logger="neox_jax"):
        step, state, loader = tc.restore_latest(tc.TrainCheckpoints(r / "checkpoints", run), run, abstract,
                                                fallback=True)
    assert step == 4 and int(state.step) == 4 and loader["step"] == 4
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == ["4", "8.damaged"]


def test_sigkill_during_a_save(reference, tmp_path, caplog):
    """The save of step 8 stalls (tests/failing_save.py --hang: the loader item's commit future
    sleeps after the tmp directory is written); SIGKILL then: step 4 stays complete, the half-written step is no
    checkpoint to any reader, and the next resume reports and removes it and restores step 4."""
    run_dir, cfg = reference
    r = _copy_run(run_dir, tmp_path / "r", keep_steps={4})
    sentinel = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "failing_save.py"), "--hang", str(sentinel),
                             str(STEPS), "-1", "-", "train", str(cfg), "--run-dir", str(r)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **ENV})
    deadline = time.time() + 300
    while time.time() < deadline and not sentinel.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    names = sorted(p.name for p in (r / "checkpoints").iterdir())
    assert names[0] == "4" and len(names) == 2 and names[1].startswith("8.orbax-checkpoint-tmp"), names
    assert ckpt.resolve(r) == r / "checkpoints" / "4"
    ckpts = tc.TrainCheckpoints(r / "checkpoints", read_only=True)
    assert ckpts.steps() == [4] and ckpts.incomplete == [names[1]]
    # the next run reports the half-written step, removes it and resumes from 4
    from neox_jax.sharding import make_mesh
    from neox_jax.train.state import abstract_state, make_optimizer, state_shardings

    run = from_sections(yaml.safe_load(cfg.read_text()))
    opt = make_optimizer(run)
    sh = state_shardings(run, make_mesh(2, 2, 2), opt)
    abstract = abstract_state(run, opt, sh)
    with caplog.at_level("WARNING", logger="neox_jax"):
        step, state, loader = tc.restore_latest(tc.TrainCheckpoints(r / "checkpoints", run), run, abstract)
    assert step == 4 and loader["step"] == 4 and int(state.step) == 4
    assert f"ignoring incomplete checkpoint(s) {names[1]}" in caplog.text
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == ["4"]


def test_start_step_continues_with_the_data_of_step_n(reference, tmp_path, monkeypatch, capsys, corpus):  # noqa: F811
    """--init-from a step directory --start-step 5: the batches trained on are exactly what
    `neox-jax data order` lists for steps 5, 6, 7; the learning rate is the schedule's at step 5;
    Adam starts fresh (count 0 at the start, 3 at the end)."""
    from neox_jax.train import loop
    from neox_jax.train.optimizer import lr_at

    run_dir, cfg = reference
    seen = []
    real = loop.global_batch_arrays

    def record(local, sharding, global_batch):
        seen.append(local["tokens"].copy())
        return real(local, sharding, global_batch)

    monkeypatch.setattr(loop, "global_batch_arrays", record)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"].update(init_from=str(run_dir / "checkpoints" / "4"), start_step=5)
    out = loop.train(from_sections(raw), tmp_path / "r")
    assert out["started_at"] == 5 and out["steps"] == STEPS and len(seen) == STEPS - 5
    order = tmp_path / "order.jsonl"
    assert main(["data", "order", "--data-prefix", corpus, "--seq-length", "32", "--split", "949,50,1",
                 "--train-iters", str(STEPS), "--batch", "8", "--steps", f"5:{STEPS}", "--output", str(order)]) == 0
    rows = [json.loads(x)["tokens"] for x in order.read_text().splitlines()]
    np.testing.assert_array_equal(np.concatenate(seen), np.array(rows, dtype=np.int32))
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    run = from_sections(raw)
    assert [x["step"] for x in recs] == [5, 6, 7]
    assert recs[0]["lr"] == pytest.approx(float(lr_at(5, run.optimizer, STEPS)), rel=1e-6)
    st = tc.TrainCheckpoints(tmp_path / "r" / "checkpoints", read_only=True)
    assert st.steps() == [STEPS]
    ts = json.loads((tmp_path / "r" / "checkpoints" / str(STEPS) / "loader" / "loader.json").read_text())
    assert ts["step"] == STEPS


@pytest.mark.parametrize("case", ["no-resume", "resume-nothing", "changed", "unwritable", "start-and-resume"])
def test_refusals_are_one_line(case, reference, tmp_path, capsys):
    run_dir, cfg = reference
    r = _copy_run(run_dir, tmp_path / "r", keep_steps={4, 8})
    args, expect = [], ""
    if case == "no-resume":
        args, expect = ["--no-resume"], "--no-resume refuses"
    elif case == "resume-nothing":
        r = tmp_path / "empty"
        args, expect = ["--resume"], "--resume needs a complete checkpoint"
    elif case == "changed":
        args, expect = ["--set", "optimizer.lr=1e-3"], "optimizer.lr is 0.003, the config now says 0.001"
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        r = tmp_path / "file" / "run"
        expect = "cannot create the run directory"
    elif case == "start-and-resume":
        args, expect = ["--start-step", "2"], "train.start_step 2 with a run directory to resume"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["train", str(cfg), "--run-dir", str(r), *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("neox-jax: error:")]
    assert len(err) == 1 and expect in err[0], err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# ----------------------------------------------------------------------------- --overwrite


def _tree(path):
    """Every file, directory and link under path -> its bytes (or a tag): byte-identical means equal."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "link:" + os.readlink(p) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def _leftovers(parent):
    from neox_jax import atomic

    return sorted(n for n in os.listdir(parent) if atomic._NAME.match(n))


def _old_run(reference, tmp_path):
    r = _copy_run(reference[0], tmp_path / "r", keep_steps={4, 8})
    (r / "notes.txt").write_text("the old run's own file\n")
    return r, _tree(r)


def test_overwrite_that_fails_keeps_the_old_run(reference, tmp_path, capsys, caplog):
    """--overwrite, then an input error found after the run directory was prepared (the --init-from
    checkpoint's array file is truncated: only restoring it tells): exit 2, one line naming the
    file, the old run directory byte-identical, nothing left beside it."""
    run_dir, cfg = reference
    r, before = _old_run(reference, tmp_path)
    init = _copy_run(run_dir, tmp_path / "init", keep_steps={4}) / "checkpoints" / "4"
    victim = max((init / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    caplog.set_level("INFO", logger="neox_jax")
    assert main(["train", str(cfg), "--run-dir", str(r), "--overwrite", "--init-from", str(init)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("neox-jax: error:")]
    assert len(err) == 1 and str(init) in err[0], err
    assert _tree(r) == before and _leftovers(tmp_path) == []
    assert "moved aside" in caplog.text  # the old directory was out of the way when the error came
    assert "previous run directory is back" in caplog.text


def test_overwrite_killed_before_its_first_checkpoint(reference, tmp_path, caplog):
    """SIGKILL an --overwrite run (paused after its first step, before its first checkpoint): the old
    run waits aside under the journal and readers of the run directory are told so; the next
    `train` with that run directory puts it back, byte-identical, before doing anything else (here:
    refusing --no-resume, which looks at the restored checkpoints)."""
    _, cfg = reference
    r, before = _old_run(reference, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "neox_jax", "train", str(cfg), "--run-dir", str(r),
                             "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, **ENV, "NEOX_JAX_TEST_PAUSE": "train-step:120"})
    deadline = time.time() + 300
    journals = []
    while time.time() < deadline and not (journals and (r / "config.yaml").exists()):
        assert proc.poll() is None, proc.communicate()
        journals = list(tmp_path.glob(".r.neox-jax-*.journal"))
        time.sleep(0.05)
    assert json.loads(journals[0].read_text())["state"] == "aside"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    (old,) = tmp_path.glob(".r.neox-jax-*.old")
    assert _tree(old) == before and not tc.has_checkpoints(r)
    with pytest.raises(ckpt.CheckpointError, match="moved aside to .*neox-jax train --run-dir"):
        ckpt.resolve(r)
    caplog.set_level("WARNING", logger="neox_jax")
    assert main(["train", str(cfg), "--run-dir", str(r), "--no-resume"]) == 2
    assert "put back the previous content, which an interrupted run" in caplog.text
    assert _tree(r) == before and _leftovers(tmp_path) == []


def test_overwrite_replaces_the_run(reference, tmp_path, caplog):
    """A successful --overwrite: the new run alone (its losses those of the reference run, 8 of
    them, not 16), the old run's files gone, no aside copy, journal or temporary left."""
    run_dir, cfg = reference
    r, _ = _old_run(reference, tmp_path)
    from neox_jax.train.loop import train

    caplog.set_level("INFO", logger="neox_jax")
    out = train(from_sections(yaml.safe_load(cfg.read_text())), r, overwrite=True)
    assert out["steps"] == STEPS and losses(r) == losses(run_dir)
    assert not (r / "notes.txt").exists()
    assert tc.TrainCheckpoints(r / "checkpoints", read_only=True).steps() == [4, 8]
    # deleted once a checkpoint committed in the loop, or at the end when the write was slower
    assert re.search(r"the new run (has a complete checkpoint|finished); deleted the previous run", caplog.text)
    assert _leftovers(tmp_path) == []


def test_save_log_line_splits_what_held_the_loop(reference, tmp_path, caplog, monkeypatch):
    """The save's log line says what it measured: the wait for the steps in flight (here made
    0.3 s longer by a patched jax.block_until_ready) is reported apart and not counted as held; the
    wait for the previous save (a patched wait_until_finished sleeping 0.5 s) and the copy are."""
    import re

    import orbax.checkpoint as ocp

    from neox_jax.train.loop import train

    real_ready, real_wait = jax.block_until_ready, ocp.CheckpointManager.wait_until_finished

    def slow_ready(x):
        time.sleep(0.3)
        return real_ready(x)

    def slow_wait(self):
        time.sleep(0.5)
        return real_wait(self)

    monkeypatch.setattr(tc.jax, "block_until_ready", slow_ready)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", slow_wait)
    caplog.set_level("INFO", logger="neox_jax")
    train(from_sections(yaml.safe_load(reference[1].read_text())), tmp_path / "r")
    lines = re.findall(r"checkpoint of step (\d+): saving to \S+ \(training held ([\d.]+) s: ([\d.]+) s "
                       r"waiting for the previous save, ([\d.]+) s copying the state to host memory; before that "
                       r"([\d.]+) s waiting for the steps in flight to finish computing\)", caplog.text)
    assert [int(x[0]) for x in lines] == [4, 8], caplog.text
    for _, held, previous, copy, in_flight in (tuple(map(float, x)) for x in lines):
        assert previous >= 0.5 and in_flight >= 0.3
        assert held == pytest.approx(previous + copy, abs=0.02)  # the steps in flight are not in it


def test_schedule_rules():
    """every N steps, listed steps, the Pythia preset (0, 1, 2, 4, ..., 512, then every 1000)."""
    from neox_jax.train.config import CheckpointConfig

    pythia = CheckpointConfig(preset="pythia")
    want = {0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512} | set(range(1000, 143001, 1000))
    assert {s for s in range(143001) if pythia.due(s)} == want and len(want) == 154  # Pythia's 154
    c = CheckpointConfig(every_steps=10, steps=(3, 7))
    assert [s for s in range(25) if c.due(s)] == [3, 7, 10, 20]


def test_retention_keeps_the_last_k_plus_every_mth(tmp_path):
    """keep_last 2, keep_every 4 over saves after steps 1..9: 4, 8 (multiples) and 8, 9 (newest)
    remain; a step that exists is not written again."""
    import jax.numpy as jnp

    from neox_jax.train.optimizer import LossScale
    from neox_jax.train.state import TrainState

    run = from_sections(raw_config("unused", keep_last=2, keep_every=4, async_save=False))
    ckpts = tc.TrainCheckpoints(tmp_path / "c", run)
    for s in range(1, 10):
        state = TrainState(step=jnp.int32(s), updates=jnp.int32(s), params={"w": jnp.full((2, 3), s, jnp.float32)},
                           opt_state=(), loss_scale=LossScale(jnp.float32(1), jnp.int32(0), jnp.int32(-1), jnp.int32(2)))
        assert ckpts.save(s, state, {"step": s, "global_batch": 8, "dataset_len": 100})
    assert not ckpts.save(9, state, {"step": 9, "global_batch": 8, "dataset_len": 100})
    ckpts.close()
    assert tc.TrainCheckpoints(tmp_path / "c", read_only=True).steps() == [4, 8, 9]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["4", "8", "9"]



@pytest.mark.parametrize("when", ["in-loop", "end"])
def test_failed_background_save(when, reference, corpus, tmp_path):  # noqa: F811
    """A background checkpoint write that fails while training goes on stops the run before its
    next step, not at the next save: saves after steps 2 and 3 (then only at the end, step 8), the
    write of 3 failing, with each step held 0.3 s (NEOX_JAX_TEST_PAUSE) so the failure has surely
    happened by the loop's next check: the run starts no step after step 3.  The failure of the
    last save (step 8, after a resume from 4) surfaces at the end.  Either is one line naming the
    step directory and the cause, exit status 2, no traceback; the earlier checkpoints stay and the
    next `train` resumes from the newest good one, the half-written step taken for no checkpoint."""
    from neox_jax.train.loop import train

    run_dir, cfg = reference
    env = {**os.environ, **ENV}
    if when == "in-loop":
        raw = raw_config(corpus, every_steps=0, steps=[2, 3])
        cfg = tmp_path / "run.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        r, fail, good = tmp_path / "r", 3, [2]
        env["NEOX_JAX_TEST_PAUSE"] = "train-step:0.3"
    else:  # resumed from 4, the save of 8 at the end fails
        raw = yaml.safe_load(cfg.read_text())
        r, fail, good = _copy_run(run_dir, tmp_path / "r", keep_steps={4}), STEPS, [4]
    dispatched = tmp_path / "dispatched"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "failing_save.py"), str(fail), "-1", str(dispatched),
                           "train", str(cfg), "--run-dir", str(r)], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert err[-1].startswith("neox-jax: error: ") and err[-1].count("neox-jax: error:") == 1, proc.stderr
    assert str(r / "checkpoints" / str(fail)) in err[-1] and "No space left on device" in err[-1], err[-1]
    assert tc.TrainCheckpoints(r / "checkpoints", read_only=True).steps() == good
    steps_run = len(dispatched.read_text().splitlines()) + (good[-1] if when == "end" else 0)
    assert steps_run == fail, proc.stderr  # in the loop: no step started after the failed save's
    out = train(from_sections(raw), r)
    assert out["started_at"] == good[-1] and out["steps"] == STEPS
    assert losses(r) == losses(run_dir)
    assert tc.TrainCheckpoints(r / "checkpoints", read_only=True).steps() == ([2, 3, 8] if when == "in-loop"
                                                                             else [4, 8])


def test_step_time_leaves_out_saving_and_validating(corpus, tmp_path, monkeypatch, compile_cache, caplog):  # noqa: F811
    """A checkpoint every 2 steps, each save held 3 s longer (a patched Orbax save, inside what the
    loop is held for) and the validation after step 4 3 s longer (a patched metrics write of its
    line): the records those seconds fell into carry them as checkpoint_time and eval_time, their
    step_time is shorter than the delay (a step time that held a save would be at least the delay,
    whatever the load; a plain step under CI load has taken 1.6 s), and the logged interval
    tokens/s leaves them out too."""
    import re

    import orbax.checkpoint as ocp

    from neox_jax.train import metrics as metrics_mod
    from neox_jax.train.loop import train

    delay = 3.0  # a step time that held a save or a validation would be >= delay
    real_save, real_write = ocp.CheckpointManager.save, metrics_mod.Metrics.write

    def slow_save(self, *a, **k):
        time.sleep(delay)
        return real_save(self, *a, **k)

    def slow_write(self, rec, *a, **k):
        if "valid_loss" in rec:
            time.sleep(delay)
        return real_write(self, rec, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", slow_save)
    monkeypatch.setattr(metrics_mod.Metrics, "write", slow_write)
    raw = raw_config(corpus, every_steps=2)
    raw["train"].update(eval_every=4, eval_steps=1, log_every=STEPS)
    caplog.set_level("INFO", logger="neox_jax")
    t0 = time.perf_counter()
    train(from_sections(raw), tmp_path / "r")
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == STEPS
    ck = [r["checkpoint_time"] for r in steps if "checkpoint_time" in r]
    ev = [r for r in steps if "eval_time" in r]
    # the saves of steps 2, 4, 6 happen inside the loop (8, at the end, after the last record)
    assert len(ck) == 3 and all(c >= delay for c in ck), steps
    assert [r["step"] for r in ev] == [4] and ev[0]["eval_time"] >= delay  # validation after step 4's record
    plain = sorted(r["step_time"] for r in steps if "checkpoint_time" not in r and "eval_time" not in r)
    for r in steps:
        assert r["step_time"] < delay, (r, plain)
        assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_time"], rel=1e-6)
    assert sum(r["step_time"] for r in steps) + sum(ck) + ev[0]["eval_time"] < wall
    m = re.search(r"step 8/8: .* (\d+) tokens/s \(not counting ([\d.]+) s saving/validating\)", caplog.text)
    assert m, caplog.text
    assert float(m.group(2)) == pytest.approx(sum(ck) + ev[0]["eval_time"], abs=0.02)
    assert int(m.group(1)) > 8 * 32 * STEPS / (2 * sum(r["step_time"] for r in steps))  # not diluted by them


def test_background_save_failing_inside_orbax_is_one_line(corpus, tmp_path):  # noqa: F811
    """A checkpoint write that fails inside Orbax and tensorstore (no file may grow past 1 MB, and
    every array file of the tiny model is larger): exit status 2, stderr holds no traceback and
    besides the INFO lines at most Orbax's first error, as one line, and ours, last, naming the step
    directory and the cause.  The save's threads re-raised their error from the join that waits for
    them (a traceback, exit status 1), and each of Orbax's threads logged its traceback, tensorstore's
    callbacks into Orbax's closed event loop and the writer tasks never collected one each: about
    1200 lines for one full disk."""
    from atomic_test import fsize_limited

    raw = raw_config(corpus, mesh=(1, 1, 1), every_steps=2)
    raw["train"]["steps"] = 2
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    r = tmp_path / "r"
    proc = fsize_limited(2**20, "train", cfg, "--run-dir", r,
                         env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    others = [x for x in err if " INFO " not in x]
    assert len(others) <= 2 and len([x for x in err if " ERROR " in x]) <= 1, proc.stderr
    assert err[-1].startswith(f"neox-jax: error: {r / 'checkpoints' / '2'}: writing the checkpoint of step 2 "
                              f"failed ({os.strerror(errno.EFBIG)}: {r / 'checkpoints'}/2.orbax-checkpoint-tmp/"), err[-1]
    assert tc.TrainCheckpoints(r / "checkpoints", read_only=True).steps() == []
