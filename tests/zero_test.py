"""Continuing a GPT-NeoX run from its DeepSpeed ZeRO-1 optimizer files (neox_jax/convert/zero.py,
neox_jax/train/neox_state.py), against PyTorch: a torch AdamW run (GPT-NeoX's two parameter groups)
is stopped after K steps and its parameters, moments and update count are written as GPT-NeoX v1.0
(DeeperSpeed 0.3.15, elastic ZeRO-1) saves them: per data-parallel rank and model rank, each
parameter group flattened in `param_shapes` order, cut into sub-partitions handed out round robin
over two communication intervals with the tail padding removed, and the loss scaler as DeepSpeed's
pickled class.  Our train step continues from those files and must follow torch's own continuation
step for step; with fresh moments instead it must not (the check has teeth)."""

import collections
import re
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from convert_fixtures import hf_state_numpy, neox_rank_tensors, write_neox
from hf_reference import hf_model, ours_from_hf
from neox_jax.convert.mapping import params_from_hf, to_torch
from neox_jax.convert.formats import torch_load
from neox_jax.convert.zero import _DS_GLOBALS, read_zero
from neox_jax.errors import CheckpointError
from neox_jax.sharding import make_mesh
from neox_jax.train import neox_state
from neox_jax.train import state as S
from neox_jax.train import step as T
from neox_jax.train.config import from_sections
from train_parity_test import BETAS, CLIP, EPS, LR, MIN_LR, STEPS, WARMUP, WD, torch_steps
from train_step_test import assert_params_close

K, M, B, SEQ, DP, TP = 4, 3, 4, 32, 2, 2
LAYER_ORDER = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
               "post_attention_layernorm.bias", "attention.query_key_value.weight", "attention.query_key_value.bias",
               "attention.dense.weight", "attention.dense.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
               "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")
SCALER = {"cur_scale": 2048.0, "cur_iter": K, "last_overflow_iter": 1, "scale_factor": 2.0, "scale_window": 1000,
          "min_scale": 1.0, "delayed_shift": 2, "cur_hysteresis": 1, "consecutive_hysteresis": False}


def _fake_deepspeed_scaler():
    """A class pickled as deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler (the modules exist only
    while the files are written)."""
    names = ["deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", "deepspeed.runtime.fp16.loss_scaler"]
    mods = {n: types.ModuleType(n) for n in names}
    cls = type("DynamicLossScaler", (), {"__module__": names[-1]})
    mods[names[-1]].DynamicLossScaler = cls
    obj = cls()
    obj.__dict__.update(SCALER)
    return mods, obj


def _write_zero(step_dir, L, master, exp_avg, exp_avg_sq, *, parallel, pp=1):
    """GPT-NeoX v1.0's optimizer files for DP data-parallel x (pp x TP) model ranks: model rank
    stage x TP + tensor rank, each stage's files naming only its own parameters (pp 2: the embedding
    and the first layer, then the rest)."""
    ranks = [neox_rank_tensors(master, L, TP, seed=1, parallel=parallel),
             neox_rank_tensors(exp_avg, L, TP, parallel=False),  # bias copies see identical gradients
             neox_rank_tensors(exp_avg_sq, L, TP, parallel=False)]
    order = [(0, "word_embeddings.weight")] + [(ll, p) for ll in range(2, L + 2) for p in LAYER_ORDER] + \
        [(L + 3, "norm.weight"), (L + 3, "norm.bias"), (L + 4, "final_linear.weight")]
    mods, scaler = _fake_deepspeed_scaler()
    sys.modules.update(mods)
    try:
        for mp in range(pp * TP):
            stage, tp = divmod(mp, TP)
            mine = [(ll, p) for ll, p in order if (ll <= 2) == (stage == 0)] if pp == 2 else order
            shapes = collections.OrderedDict((f"{ll}.{p}", torch.Size(ranks[0][ll][tp][p].shape)) for ll, p in mine)
            groups = [[(ll, p) for ll, p in mine if not (p.endswith("bias") or "norm" in p)],
                      [(ll, p) for ll, p in mine if p.endswith("bias") or "norm" in p]]
            subs = [[[] for _ in groups] for _ in range(DP)]  # [rank][group] -> pieces per interval
            moms = [[[] for _ in groups] for _ in range(DP)]
            intervals = []
            for g, group in enumerate(groups):
                flat = [np.concatenate([ranks[i][ll][tp][p].reshape(-1) for ll, p in group]) for i in range(3)]
                n = flat[0].size
                size = -(-n // (2 * DP))  # two communication intervals; the tail padding is dropped
                count = -(-(-(-n // DP)) // size)
                intervals.append(count)
                for i in range(count * DP):
                    lo, hi = min(i * size, n), min((i + 1) * size, n)
                    piece = [torch.from_numpy(np.ascontiguousarray(f[lo:hi], np.float32)) for f in flat]
                    subs[i % DP][g].append(piece[0])
                    moms[i % DP][g].append({"exp_avg": piece[1], "exp_avg_sq": piece[2]})
            for dp in range(DP):
                osd = {"loss_scaler": scaler, "dynamic_loss_scale": True, "overflow": False, "zero_stage": 1,
                       "partition_count": DP, "num_comm_intervals_per_group": intervals,
                       "local_sub_partitions_of_fp32_groups": subs[dp], "base_optimizer_state": moms[dp]}
                torch.save({"optimizer_state_dict": osd, "param_shapes": shapes},
                           step_dir / f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt")
    finally:
        for n in mods:
            sys.modules.pop(n, None)
    for mp in range(TP):  # the client state GPT-NeoX and DeepSpeed add
        f = step_dir / f"mp_rank_{mp:02d}_model_states.pt"
        sd = torch.load(f, weights_only=False)
        sd.update(iteration=K, global_steps=K, skipped_steps=0,
                  lr_scheduler={"start_lr": LR, "warmup_iter": WARMUP * STEPS, "num_iters": K,
                                "decay_style": "cosine", "end_iter": STEPS, "min_lr": MIN_LR})
        torch.save(sd, f)


def _fake_deepspeed_v06():
    """Modules with the classes newer DeepSpeed pickles: ZeroStageEnum (an int enum) and
    fragment_address (a dataclass), under their real names."""
    import dataclasses
    import enum

    mods, scaler = _fake_deepspeed_scaler()
    for n in ["deepspeed.runtime.zero", "deepspeed.runtime.zero.config", "deepspeed.utils",
              "deepspeed.utils.tensor_fragment"]:
        mods[n] = types.ModuleType(n)
    stage = enum.IntEnum("ZeroStageEnum", {"disabled": 0, "optimizer_states": 1, "gradients": 2},
                         module="deepspeed.runtime.zero.config")
    mods["deepspeed.runtime.zero.config"].ZeroStageEnum = stage
    frag = dataclasses.make_dataclass("fragment_address", [("numel", int), ("start", int)])
    frag.__module__ = "deepspeed.utils.tensor_fragment"
    mods["deepspeed.utils.tensor_fragment"].fragment_address = frag
    return mods, scaler, stage, frag


def _write_zero_v06(step_dir, L, master, exp_avg, exp_avg_sq, *, parallel, dp, bf16):
    """DeepSpeed >= 0.6 (`stage_1_and_2.py`) / BF16_Optimizer files: each group aligned to 2 x dp
    elements and cut into dp equal contiguous partitions; the masters without the tail padding
    (BF16_Optimizer files: with it, and group_paddings, and no zero_stage), the moments padded,
    Adam's step in the state dict; param_shapes per group in mp_rank_XX_model_states.pt."""
    ranks = [neox_rank_tensors(master, L, TP, seed=1, parallel=parallel),
             neox_rank_tensors(exp_avg, L, TP, parallel=False), neox_rank_tensors(exp_avg_sq, L, TP, parallel=False)]
    order = [(0, "word_embeddings.weight")] + [(ll, p) for ll in range(2, L + 2) for p in LAYER_ORDER] + \
        [(L + 3, "norm.weight"), (L + 3, "norm.bias"), (L + 4, "final_linear.weight")]
    groups = [[(ll, p) for ll, p in order if not (p.endswith("bias") or "norm" in p)],
              [(ll, p) for ll, p in order if p.endswith("bias") or "norm" in p]]
    mods, scaler, stage, frag = _fake_deepspeed_v06()
    sys.modules.update(mods)
    paddings = []
    try:
        for tp in range(TP):
            per_rank = [{"single": [], "state": {}, "pad": [], "maps": []} for _ in range(dp)]
            for g, group in enumerate(groups):
                flat = [np.concatenate([ranks[i][ll][tp][p].reshape(-1) for ll, p in group]) for i in range(3)]
                n = flat[0].size
                size = 2 * -(-n // (2 * dp))  # partition: the length aligned to 2 x dp, / dp
                flat = [np.concatenate([f, np.zeros(size * dp - n, np.float32)]) for f in flat]
                paddings.append(size * dp - n)
                for r in range(dp):
                    part = [torch.from_numpy(np.ascontiguousarray(f[r * size:(r + 1) * size], np.float32)) for f in flat]
                    real = max(0, min(size, n - r * size))
                    per_rank[r]["single"].append(part[0] if bf16 else part[0][:real].clone())
                    per_rank[r]["pad"].append(size - real)
                    per_rank[r]["state"][g] = {"step": torch.tensor(float(K)), "exp_avg": part[1], "exp_avg_sq": part[2]}
                    per_rank[r]["maps"].append(collections.OrderedDict([(f"{group[0][0]}.{group[0][1]}", frag(1, 0))]))
            for r in range(dp):
                osd = {"dynamic_loss_scale": not bf16, "overflow": False, "clip_grad": CLIP,
                       "base_optimizer_state": {"state": per_rank[r]["state"],
                                                "param_groups": [{"lr": LR, "params": [g]} for g in range(2)]},
                       "single_partition_of_fp32_groups": per_rank[r]["single"],
                       "group_paddings": per_rank[r]["pad"], "partition_count": [dp, dp], "ds_version": "0.16.5",
                       "param_slice_mappings": per_rank[r]["maps"]}
                if not bf16:  # BF16_Optimizer saves neither a scaler nor the ZeRO stage
                    osd.update(loss_scaler=scaler, zero_stage=stage(1))
                torch.save({"optimizer_state_dict": osd, "ds_config": {}, "ds_version": "0.16.5"},
                           step_dir / f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_mp_rank_{tp:02d}_optim_states.pt")
    finally:
        for n in mods:
            sys.modules.pop(n, None)
    for tp in range(TP):
        f = step_dir / f"mp_rank_{tp:02d}_model_states.pt"
        sd = torch.load(f, weights_only=False)
        sd["param_shapes"] = [collections.OrderedDict((f"{ll}.{p}", torch.Size(ranks[0][ll][tp][p].shape))
                                                      for ll, p in group) for group in groups]
        torch.save(sd, f)
    return paddings


def _hf_named(model, values):
    out = {}
    for name, p in model.named_parameters():
        out["embed_out.weight" if name == "lm_head.weight" else name] = values(p)
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """(model config, torch reference continuation, checkpoint path): torch trained K steps, saved,
    then M more."""
    torch.manual_seed(0)
    model = hf_model(seed=3, vocab=256, hidden=64, layers=2, heads=4, parallel=True, act="gelu")
    cfg, _ = ours_from_hf(model, compute_dtype="float32")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "layernorm" in name or "layer_norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    rs = np.random.RandomState(0)
    batches = [rs.randint(0, cfg.vocab_size, (B, SEQ + 1)).astype(np.int32) for _ in range(K + M)]
    model.train()
    torch_steps(model, opt, batches[:K], 0)
    root = tmp_path_factory.mktemp("neox")
    write_neox(model, root, tp=TP, step=K)
    step_dir = root / f"global_step{K}"
    L = model.config.num_hidden_layers
    master = hf_state_numpy(model)
    moments = [_hf_named(model, lambda p, k=k: opt.state[p][k].detach().numpy().copy()) for k in ("exp_avg", "exp_avg_sq")]
    assert all(int(opt.state[p]["step"]) == K for p in model.parameters())
    _write_zero(step_dir, L, master, *moments, parallel=True)
    snapshot = {"params": params_from_hf(cfg, master), "mu": params_from_hf(cfg, moments[0]),
                "nu": params_from_hf(cfg, moments[1]), "torch": (master, *moments)}
    losses = torch_steps(model, opt, batches[K:], K)
    final = params_from_hf(cfg, hf_state_numpy(model))
    return cfg, batches, snapshot, losses, final, root


def _run(cfg, path):
    return from_sections({
        "model": cfg.to_dict(),
        "data": {"path": "unused", "seq_length": SEQ},
        "optimizer": {"lr": LR, "min_lr": MIN_LR, "schedule": "neox_2022", "decay_style": "cosine", "warmup": WARMUP,
                      "b1": BETAS[0], "b2": BETAS[1], "eps": EPS, "weight_decay": WD, "clip": CLIP,
                      "loss_scale": "dynamic"},
        "train": {"steps": STEPS, "batch_size": B, "init_from_neox": str(path)},
    })


@pytest.mark.parametrize("layout", ["v03", "v03-pp2", "v06", "v06-bf16"])
def test_reader_rebuilds_torch_state(stopped_run, tmp_path, layout, monkeypatch):
    """v03: DeeperSpeed 0.3 ZeRO-1 (Pythia, 20B), one or two pipeline stages; v06: DeepSpeed >= 0.6
    with 3 data-parallel ranks (so groups need tail padding), fp16 or bf16 files.  The mappings are
    dropped every 4 KiB copied here (512 MiB by default), so tensors are read across re-opened files."""
    import shutil

    from neox_jax.convert import zero

    opened = []

    def counting_load(path, **kw):
        opened.append(path)
        return torch_load(path, **kw)

    monkeypatch.setattr(zero, "REMAP_BYTES", 4096)
    monkeypatch.setattr(zero, "torch_load", counting_load)

    cfg, _, snap, _, _, root = stopped_run
    dp, pp = DP, 1
    if layout != "v03":
        shutil.copytree(root, tmp_path / "copy")
        root = tmp_path / "copy"
        for f in root.glob("global_step*/zero_pp_rank_*"):
            f.unlink()
        step_dir = root / f"global_step{K}"
        if layout == "v03-pp2":
            pp = 2
            _write_zero(step_dir, cfg.num_layers, *snap["torch"], parallel=True, pp=2)
        else:
            dp = 3
            pads = _write_zero_v06(step_dir, cfg.num_layers, *snap["torch"], parallel=True, dp=3,
                                   bf16=layout == "v06-bf16")
            assert any(pads), pads  # the tail padding is exercised
    zs = read_zero(root)
    assert (zs.iteration, zs.updates, zs.dp, zs.tp, zs.pp) == (K, K, dp, TP, pp)
    assert zs.adam_step == (None if layout.startswith("v03") else K)
    if layout == "v06-bf16":
        assert zs.loss_scale is None  # bf16: no loss scaler
    else:
        assert zs.loss_scale == {k: float(SCALER[k]) for k in ("cur_scale", "cur_iter", "last_overflow_iter",
                                                               "cur_hysteresis")}
    from neox_jax.tree import flatten
    want = [flatten(snap[k]) for k in ("params", "mu", "nu")]
    scanned = len(opened)  # read_zero: each optimizer file once (plus the client state)
    seen = 0
    for e, *got in zs.arrays():
        seen += 1
        for w, g in zip(want, got):
            ref = w[e.name] if e.layer is None else w[e.name][e.layer]
            # masters: row-parallel biases were split into random parts that sum back (float64 merge)
            np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-7, err_msg=e.label)
    files = dp * TP * pp
    assert scanned == files + 1 + (layout.startswith("v06")) * TP, opened
    assert seen == len(zs.reader.entries()) and len(opened) - scanned > 2 * files, (seen, len(opened) - scanned)
    assert not zs._files._open  # every mapping dropped at the end


def test_continued_run_follows_torch(stopped_run, record_property):
    cfg, batches, snap, theirs, final, root = stopped_run
    run = _run(cfg, root)
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    opt = S.make_optimizer(run)
    sh = S.state_shardings(run, mesh, opt)

    def continue_from(state):
        losses = []
        with jax.set_mesh(mesh):
            step = T.make_train_step(run, mesh, opt, sh)
            for b in batches[K:]:
                state, m = step(state, {"tokens": jax.device_put(b, T.batch_sharding(mesh))})
                losses.append(float(m["loss"]))
        return state, losses

    with jax.set_mesh(mesh):
        state = neox_state.load(run, str(root), opt, sh)
    assert int(state.step) == K and int(state.updates) == K and int(state.opt_state[0].count) == K
    assert float(state.loss_scale.scale) == SCALER["cur_scale"] and int(state.loss_scale.hysteresis) == 1
    state, ours = continue_from(state)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    worst = assert_params_close(jax.device_get(state.params), final, lr=LR, steps=M, rtol=1e-4, atol=2e-5)

    # the same weights with fresh moments and count: a different run (so the check above can fail)
    with jax.set_mesh(mesh):
        fresh = S.init_state(run, mesh, opt, params=jax.device_put(snap["params"], sh.params), shardings=sh)
    fresh, _ = continue_from(fresh)
    gap = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(jax.device_get(fresh.params)), jax.tree.leaves(final)))
    assert gap > 50 * max(worst, 2e-5), (gap, worst)
    record_property("measured", f"continued {M} steps from ZeRO files (DP {DP} x TP {TP}): losses {ours} vs torch "
                                f"{theirs}; max |dparam| {worst:.1e}; with fresh moments {gap:.1e}")


def test_broken_files_are_named(stopped_run, tmp_path):
    import shutil

    *_, root = stopped_run
    bad = tmp_path / "neox"
    shutil.copytree(root, bad)
    step_dir = bad / f"global_step{K}"
    (step_dir / "zero_pp_rank_1_mp_rank_01_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_1_mp_rank_01_optim_states\.pt: missing"):
        read_zero(bad)

    shutil.rmtree(bad)
    shutil.copytree(root, bad)
    for dp in range(DP):  # a parameter short in param_shapes: group 1's sizes disagree with its pieces
        f = step_dir / f"zero_pp_rank_{dp}_mp_rank_00_optim_states.pt"
        sd = torch_load(f, mmap=False, extra_globals=_DS_GLOBALS)
        del sd["param_shapes"]["2.attention.dense.bias"]
        sd["optimizer_state_dict"]["loss_scaler"] = None
        torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: parameter group 1 "
                                              r"holds \d+ values over 2 rank\(s\), its \d+ parameters"):
        read_zero(bad)


def _train_yaml(cfg, tmp_path, name="run.yaml", *, init_from_neox=None, mesh=None):
    """A run of 2 steps past the checkpoint on random tokens, as a YAML file."""
    import yaml

    from neox_jax.data.indexed import IndexedDatasetWriter

    if not (tmp_path / "tok.bin").exists():
        with IndexedDatasetWriter(tmp_path / "tok", np.uint16) as w:
            for doc in np.random.RandomState(1).randint(0, cfg.vocab_size, size=(64, 3 * SEQ)):
                w.add_document(doc)
    raw = {"model": cfg.to_dict(), "data": {"path": str(tmp_path / "tok"), "seq_length": SEQ, "split": "100,0,0"},
           "optimizer": {"lr": LR, "min_lr": MIN_LR, "warmup": WARMUP},
           "train": {"steps": K + 2, "batch_size": 8, "eval_steps": 0, "tensorboard": False, "log_every": 1}}
    if init_from_neox:
        raw["train"]["init_from_neox"] = str(init_from_neox)
    if mesh:
        raw["mesh"] = mesh
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _metrics(run_dir) -> list[dict]:
    import json

    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_train_command_continues_at_the_checkpoint_iteration(stopped_run, tmp_path, capsys, caplog):
    """`neox-jax train --set train.init_from_neox=...`: the run starts at the checkpoint's iteration
    (metrics from step K on), and two processes x 4 devices (jax.distributed, each process reading
    half of the tensors and sending them to the other's devices) continue exactly as one process x 8
    devices; an
    architecture that differs is one error line before anything is written."""
    from neox_jax.cli import main
    from processes import local_sh

    cfg, *_, root = stopped_run
    yaml_path = _train_yaml(cfg, tmp_path)
    args = ["train", str(yaml_path), "--run-dir", str(tmp_path / "run"), "--set",
            f"train.init_from_neox={root}"]
    with caplog.at_level("INFO", logger="neox_jax"):
        assert main(args) == 0
    assert f"iteration {K} (data position), {K} updates applied" in caplog.text, caplog.text[-2000:]
    capsys.readouterr()
    one = _metrics(tmp_path / "run")
    assert [r["step"] for r in one] == [K, K + 1]

    # CPU processes all report slice_index 0 (one host), so the node count is given
    two_yaml = _train_yaml(cfg, tmp_path, "two.yaml", init_from_neox=root, mesh={"dcn_data": 2})
    r, logs = local_sh(two_yaml, tmp_path / "two", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:] + logs[-3000:]
    assert "2 processes, 4 local / 8 global devices" in r.stderr and f"iteration {K} (data position)" in r.stderr
    # each process read its own half of the tensors (and sent them to the other's devices)
    m = re.search(r"read in 2 parts, one per process: (\d+), (\d+) tensors", r.stderr)
    assert m and int(m.group(1)) + int(m.group(2)) == 12 * cfg.num_layers + 4 and min(map(int, m.groups())) > 0, \
        r.stderr[-3000:]
    two = _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [K, K + 1]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    assert main(args[:3] + [str(tmp_path / "other"), "--set", f"train.init_from_neox={root}",
                            "--set", "model.num_layers=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_layers is 2 in the checkpoint, 3 in the config" in err, err
    assert not (tmp_path / "other").exists()


def test_a_parameter_this_model_lacks_is_refused(stopped_run, tmp_path):
    import shutil

    *_, root = stopped_run
    bad = tmp_path / "neox"
    shutil.copytree(root, bad)
    for dp in range(DP):  # same size and group, a name our model has no place for
        f = bad / f"global_step{K}" / f"zero_pp_rank_{dp}_mp_rank_00_optim_states.pt"
        sd = torch_load(f, mmap=False, extra_globals=_DS_GLOBALS)
        sd["param_shapes"] = collections.OrderedDict(
            ("0.position_embeddings.bias" if k == "2.attention.dense.bias" else k, v) for k, v in sd["param_shapes"].items())
        sd["optimizer_state_dict"]["loss_scaler"] = None  # (read through our stand-in, it would pickle as that)
        torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"hold 0\.position_embeddings\.bias, not a parameter of this model"):
        read_zero(bad)


def test_inspect_reports_the_optimizer_files(stopped_run, capsys):
    from neox_jax.cli import main

    *_, root = stopped_run
    assert main(["inspect", str(root), "--no-hash"]) == 0
    assert f"optimizer state: {DP * TP} ZeRO files (data-parallel {DP} x model ranks {TP})" in capsys.readouterr().out


DS_FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed_zero1"
DS03_FIXTURE = Path(__file__).parent / "fixtures" / "deeperspeed_0315"


def _ds_reference(variant):
    """DeepSpeed's report for a fixture: (arrays, step directory, {scaler key: value} or None);
    variant "deeperspeed_0315/V" is tests/fixtures/deeperspeed_0315/V, the others deepspeed_zero1/'s."""
    folder = DS03_FIXTURE.parent / variant if variant.startswith("deeperspeed_0315/") else DS_FIXTURES / variant
    ref = np.load(folder / "reference.npz")
    scaler = {k[len("scaler/"):]: float(ref[k]) for k in ref.files if k.startswith("scaler/")} or None
    return ref, folder / "save" / f"global_step{int(ref['iteration'])}", scaler


def _ds03_files(step_dir, mp, intervals, first, last):
    """DeeperSpeed 0.3.15's two optimizer files of model rank mp: elastic ZeRO-1 over 2 data-parallel
    ranks, `intervals` communication intervals per group, the stage's parameters from `first` on; rank
    1's last sub-partition of the no-decay group holding `last` values (0: all padding, saved empty);
    Adam state as apex keeps it."""
    sds = [torch_load(step_dir / f"zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt", extra_globals=_DS_GLOBALS)
           for d in range(2)]
    osds = [sd["optimizer_state_dict"] for sd in sds]
    assert all(o["zero_stage"] == 1 and o["partition_count"] == 2 and o["num_comm_intervals_per_group"] == intervals
               for o in osds), [o["num_comm_intervals_per_group"] for o in osds]
    assert all(next(iter(sd["param_shapes"])) == first for sd in sds)
    assert osds[1]["local_sub_partitions_of_fp32_groups"][1][-1].numel() == last
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} for o in osds for g in o["base_optimizer_state"] for s in g)


def _assert_equals_reference(zs, ref, pipe: bool, low) -> None:
    """Every tensor `read_zero` gives (master, exp_avg, exp_avg_sq; HF layout) equals the reference
    file's bit for bit, the weights GPT-NeoX's reader takes from the weight files equal the masters
    rounded to `low` (a torch dtype), and the reference has no tensor the reader missed.  Names as
    param_shapes has them: `LL.<param>` (pipe) or `sequential.LL.<param>`."""
    names = {k.split("/", 1)[1] for k in ref.files if k.startswith("master/")}
    seen = set()
    for e, *got in zs.arrays():
        ll, param, _ = zs.reader._where(e.name, e.layer)
        name = f"{ll}.{param}" if pipe else f"sequential.{ll}.{param}"
        for kind, ours in zip(("master", "exp_avg", "exp_avg_sq"), got):
            np.testing.assert_array_equal(to_torch(e.name, ours, zs.reader.config), ref[f"{kind}/{name}"],
                                          err_msg=f"{kind} {name}")
        weight = torch.from_numpy(ref[f"master/{name}"]).to(low).float().numpy()
        np.testing.assert_array_equal(zs.reader.read_torch(e).astype(np.float32), weight, err_msg=name)
        seen.add(name)
    assert seen == names, names ^ seen


def _ds03_counters(zs, ref, scaler, skipped):
    """Iteration, applied updates and loss scaler as DeeperSpeed's engine kept them; no Adam step in the
    files (DeeperSpeed's, in the param group, is its warm-up step plus the updates: checked)."""
    updates = int(ref["global_steps"]) - int(ref["skipped_steps"])
    assert (int(ref["iteration"]), int(ref["skipped_steps"])) == (12, skipped)
    assert {int(ref[k]) for k in ref.files if k.startswith("step/")} == {updates + 1}
    assert (zs.iteration, zs.updates, zs.adam_step, zs.loss_scale) == (12, updates, None, scaler)


@pytest.mark.parametrize("variant", ["sequential", "pipe1"])
def test_reader_matches_deeperspeed_0315_on_its_own_files(variant):
    """Files DeeperSpeed 0.3.15 (tag v1.0, GPT-NeoX v1.0's pin, which saved Pythia and 20B) wrote
    itself: its engine and FP16_DeepSpeedZeroOptimizer_Stage1, fp16 with the dynamic loss scaler (4
    of 12 steps overflowed), elastic checkpoint, data-parallel 2, GPT-NeoX's two parameter groups
    (tests/fixtures/deeperspeed_0315/make.py).  sequential/: its DeepSpeedEngine, GPT-NeoX's sequential
    names (`sequential.LL.<param>`, pipe-parallel-size 0), 1 layer, groups cut into 23 and 2
    communication intervals.  pipe1/: Pythia's layout, its PipelineEngine over a one-stage
    PipelineModule (pipe-parallel-size 1, model-parallel-size 1), `LL.<param>` names, 2 layers in
    `layer_LL-model_00` weight files, 42 and 3 intervals.  Per parameter, our float32 master and Adam
    moments equal, bit for bit, what the live optimizer held (its fp32 sub-partitions and their Adam
    state, placed by its own element map); the weights are the masters rounded to float16.  (The
    reader put the LayerNorm weights of sequential names into the decayed group and refused the
    sequential files.)"""
    ref, step_dir, scaler = _ds_reference(f"deeperspeed_0315/{variant}")
    pipe = variant == "pipe1"
    _ds03_files(step_dir, 0, [42, 3] if pipe else [23, 2],
                f"{'' if pipe else 'sequential.'}0.word_embeddings.weight", 35 if pipe else 0)
    if pipe:
        assert sorted(f.name for f in step_dir.glob("layer_*")) == [
            f"layer_{ll:02d}-model_00-model_states.pt" for ll in (0, 2, 3, 5, 6)]
    zs = read_zero(step_dir.parent)
    _ds03_counters(zs, ref, scaler, 4)
    assert (zs.dp, zs.tp, zs.pp, zs.reader.layout) == (2, 1, 1, "pipeline" if pipe else "sequential")
    _assert_equals_reference(zs, ref, pipe, torch.float16)


def test_deeperspeed_0315_pipeline_and_tensor_parallel_pieces():
    """20B's layout from DeeperSpeed 0.3.15 itself (make.py, pipe_tp/): its PipelineEngine over a
    PipelineModule with GPT-NeoX's topology, 2 stages x 2 tensor-parallel x 2 data-parallel ranks
    (8 processes), `LL.<param>` names, `layer_LL-model_TT` weight files, optimizer files under model
    rank = stage x 2 + tensor rank, each stage's own parameters; fp16, 4 of 12 steps skipped.  Each
    tensor-parallel rank's piece of every parameter (the ranks' slices differ) equals, bit for bit,
    what that rank's optimizer held; its weight file holds the masters rounded to float16.  The merge
    across ranks is not checked here (the model does not all-reduce, so replicated copies differ)."""
    ref, step_dir, scaler = _ds_reference("deeperspeed_0315/pipe_tp")
    for mp in range(4):
        _ds03_files(step_dir, mp, [26, 2] if mp < 2 else [26, 3],
                    "0.word_embeddings.weight" if mp < 2 else "3.input_layernorm.weight", 0 if mp < 2 else 24)
    zs = read_zero(step_dir.parent)
    _ds03_counters(zs, ref, scaler, 4)
    assert (zs.dp, zs.tp, zs.pp, zs.reader.layout) == (2, 2, 2, "pipeline")
    seen = set()
    for (ll, param), parts in zs._tensors.items():
        assert len(parts) == 2
        for t, piece in enumerate(parts):
            key = f"{ll}.{param}/tp{t}"
            for i, kind in enumerate(("master", "exp_avg", "exp_avg_sq")):
                np.testing.assert_array_equal(piece.read(zs._files, i), ref[f"{kind}/{key}"], err_msg=f"{kind} {key}")
            np.testing.assert_array_equal(zs.reader._rank_tensors(ll, param)[t].numpy(),
                                          ref[f"master/{key}"].astype(np.float16), err_msg=key)
            seen.add(key)
    assert seen == {k.split("/", 1)[1] for k in ref.files if k.startswith("master/")}
    assert not any(np.array_equal(ref[k], ref[k[:-1] + "1"]) for k in ref.files if k.endswith("/tp0"))
    assert len(list(zs.arrays())) == len(zs.reader.entries())


@pytest.mark.parametrize("variant", ["fp32", "bf16", "aligned", "fp16", "pipe", "zero2", "bf16_zero2"])
def test_reader_matches_deepspeed_on_its_own_files(variant):
    """Files DeepSpeed 0.19.8 wrote itself (ZeRO-1, and ZeRO-2 in float32 and bf16 with GPT-NeoX's
    overlap_comm / contiguous_gradients settings; data-parallel 2; tests/fixtures/deepspeed_zero1/
    make.py): per parameter, our float32 master and Adam moments equal, bit for bit, what DeepSpeed's
    safe_get_full_fp32_param / safe_get_full_optimizer_state reported for the live engine; the
    iteration, applied updates and Adam step equal its global_steps, global_steps - skipped_steps
    (fp16: 18 of 40 overflowed) and its AdamW's `step`; the loss scaler state its live
    DynamicLossScaler's (fp16; the others save none or a static one); the weights GPT-NeoX's reader
    takes from the model-states file (pipe: the layer files of a PipelineModule, parameters named
    `LL.<param>`, two stages each with its own mp_rank_XX files) are the masters (bf16/fp16:
    rounded, as DeepSpeed copies them)."""
    ref, step_dir, scaler = _ds_reference(variant)
    osds = {f.name: torch_load(f, extra_globals=_DS_GLOBALS)["optimizer_state_dict"]
            for f in sorted(step_dir.glob("*optim_states.pt"))}
    if variant != "fp32":  # one layer a stage: the no-decay group padded by 2 on data-parallel rank 1
        assert all(o["group_paddings"] == [0, 0] if "_rank_0_" in f else o["group_paddings"][1] == 2
                   for f, o in osds.items()), {f: o["group_paddings"] for f, o in osds.items()}
    # ZeRO-2: stage_1_and_2.py's ZeroStageEnum.gradients, in `bf16_` files for bf16 (BF16_Optimizer, bf16/,
    # saves no stage)
    stage = 2 if variant.endswith("zero2") else None if variant == "bf16" else 1
    assert {o.get("zero_stage") for o in osds.values()} == {stage}
    assert all(f.startswith("bf16_") == variant.startswith("bf16") for f in osds)
    aligned = any(any(map(any, o.get("param_alignment_paddings", []))) for o in osds.values())
    assert aligned == (variant == "aligned")
    zs = read_zero(step_dir.parent)
    steps = {int(s) for k in ref.files if k.startswith("step/") for s in ref[k]}
    updates = int(ref["global_steps"]) - int(ref["skipped_steps"])
    assert (int(ref["skipped_steps"]) > 0) == (variant == "fp16") and steps == {updates}
    assert (zs.iteration, zs.updates, zs.adam_step) == (int(ref["iteration"]), updates, updates)
    assert (zs.dp, zs.tp, zs.pp, zs.loss_scale) == (2, 1, 2 if variant == "pipe" else 1, scaler)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16_zero2": torch.bfloat16}.get(variant, torch.float32)
    pipe = variant.startswith("pipe")
    assert zs.reader.layout == ("pipeline" if pipe else "sequential")
    _assert_equals_reference(zs, ref, pipe, low)


def test_tensor_parallel_pieces_match_deepspeed():
    """tp/: DeepSpeed 0.19.8's PipelineModule over GPT-NeoX's topology with 2 tensor-parallel x 2
    data-parallel ranks (column-parallel QKV / h_to_4h / embedding / output rows, row-parallel dense
    and 4h_to_h columns, as GPT-NeoX slices them).  Before any merge, each tensor-parallel rank's
    piece of every parameter (from the optimizer files of model rank = that rank, and from its
    layer_LL-model_TT weight file) is bit for bit what DeepSpeed reported on that rank; the merge
    across ranks is GPT-NeoX's rule (convert/neox.py), checked against the published layout."""
    ref, step_dir, _ = _ds_reference("tp")
    zs = read_zero(step_dir.parent)
    assert (zs.dp, zs.tp, zs.pp, zs.iteration, zs.updates, zs.adam_step) == (2, 2, 1, 3, 3, 3)
    seen = set()
    for (ll, param), parts in zs._tensors.items():
        assert len(parts) == 2
        for t, piece in enumerate(parts):
            key = f"{ll}.{param}/tp{t}"
            for i, kind in enumerate(("master", "exp_avg", "exp_avg_sq")):
                np.testing.assert_array_equal(piece.read(zs._files, i), ref[f"{kind}/{key}"],
                                              err_msg=f"{kind} {key}")
            np.testing.assert_array_equal(zs.reader._rank_tensors(ll, param)[t].numpy(), ref[f"master/{key}"],
                                          err_msg=key)
            seen.add(key)
    assert seen == {k.split("/", 1)[1] for k in ref.files if k.startswith("master/")}
    assert len(list(zs.arrays())) == len(zs.reader.entries())


@pytest.mark.parametrize("variant,readers", [("fp32", 1), ("fp16", 1), ("bf16_zero2", 1), ("fp32", 2),
                                             ("bf16_zero2", 4), ("deeperspeed_0315/sequential", 2),
                                             ("deeperspeed_0315/pipe1", 2)])
def test_init_from_neox_on_deepspeed_files(variant, readers, caplog):
    """`train.init_from_neox` on runs DeepSpeed 0.19.8 saved, and DeeperSpeed 0.3.15 (sequential names;
    pipe1: Pythia's layout, a one-stage PipelineModule): the train state's params, Adam moments and
    count, iteration and update count are DeepSpeed's (bit for bit); with dynamic loss scaling,
    the fp16 run's scaler state is DeepSpeed's and the float32 and bf16 ZeRO-2 runs' static scalers
    are not taken.  readers > 1: the devices of a data 1 x fsdp 2 x tensor 2 (or 1 x 4 x 2) mesh split
    into that many readers in an order unlike the mesh's, as processes would be: each tensor read
    once, by one reader, and sent to the others' devices (4 readers: more than the layers, so some
    rounds leave readers idle)."""
    from neox_jax.convert.neox import NeoxReader
    from neox_jax.train.optimizer import init_loss_scale
    from neox_jax.tree import flatten

    ref, step_dir, scaler = _ds_reference(variant)
    save = step_dir.parent
    cfg = neox_state.read_config(str(save))
    run = from_sections({"model": cfg.to_dict(), "data": {"path": "unused", "seq_length": 8},
                         "optimizer": {"lr": 1e-2, "loss_scale": "dynamic"},
                         "train": {"steps": 100, "batch_size": 2, "init_from_neox": str(save)}})
    groups = None
    if readers == 1:
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    else:
        mesh = make_mesh(1, readers, 2, devices=jax.devices()[:2 * readers])
        devices = list(mesh.devices.flat)[::-1]  # readers' devices in another order than the mesh's
        groups = [devices[i::readers] for i in range(readers)]
    opt = S.make_optimizer(run)
    with jax.set_mesh(mesh), caplog.at_level("INFO", logger="neox_jax"):
        state = jax.device_get(neox_state.load(run, str(save), opt, S.state_shardings(run, mesh, opt),
                                               groups=groups))
    if readers > 1:
        with NeoxReader(save) as r:
            count = len(r.entries())
        m = re.search(r"read in (\d+) parts, one per process: ([\d, ]+) tensors", caplog.text)
        got = [int(c) for c in m.group(2).split(", ")]
        assert int(m.group(1)) == readers and sum(got) == count and max(got) - min(got) <= 1, (got, count)
    updates = int(ref["global_steps"]) - int(ref["skipped_steps"])
    assert (int(state.step), int(state.updates), int(state.opt_state[0].count)) == (int(ref["iteration"]),
                                                                                      updates, updates)
    ls = state.loss_scale
    if scaler:
        assert (float(ls.scale), int(ls.iter), int(ls.last_overflow), int(ls.hysteresis)) == \
            (scaler["cur_scale"], scaler["cur_iter"], scaler["last_overflow_iter"], scaler["cur_hysteresis"])
    else:
        assert "the checkpoint's scaler state not used" in caplog.text
        assert float(ls.scale) == float(init_loss_scale(run.optimizer).scale) != 1.0
    trees = [flatten(t) for t in (state.params, state.opt_state[0].mu, state.opt_state[0].nu)]
    with NeoxReader(save) as r:
        for e in r.entries():
            ll, param, _ = r._where(e.name, e.layer)
            for kind, tree in zip(("master", "exp_avg", "exp_avg_sq"), trees):
                ours = tree[e.name] if e.layer is None else tree[e.name][e.layer]
                prefix = "" if r.layout == "pipeline" else "sequential."
                want = ref[f"{kind}/{prefix}{ll}.{param}"]
                np.testing.assert_array_equal(to_torch(e.name, np.asarray(ours), cfg), want, err_msg=f"{kind} {e.label}")
