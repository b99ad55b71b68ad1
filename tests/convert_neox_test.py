"""Native GPT-NeoX checkpoints: TP 1/2/4 and the sequential layout -> Orbax; Orbax -> NeoX (TP 2) -> Orbax.

The NeoX fixtures are written by tests/convert_fixtures.py from an HF model following the published
layout (fp16, random per-rank row-parallel biases whose sum is the HF bias, inv_freq buffers,
rng states in mp_rank files); the references are transformers logits and an independent merge."""

from __future__ import annotations

import math
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import yaml

from convert_fixtures import hf_state_numpy, logits, read_neox_independent, save_hf, tiny_hf, write_neox
from neox_jax.checkpoint import load_params
from neox_jax.cli import main
from neox_jax.config import ModelConfig, from_neox_yaml
from neox_jax.convert.neox import vocab_divisor
from neox_jax.model import flatten, forward

IDS = np.random.default_rng(1).integers(0, 256, size=(2, 40))


def jax_logits(ckpt) -> np.ndarray:
    cfg, params = load_params(ckpt, dtype="float32")
    return np.asarray(forward(cfg.replace(compute_dtype="float32"), params, jnp.asarray(IDS)))


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


@pytest.fixture(scope="module")
def model():
    return tiny_hf(3, fp16_values=True, layers=3)


@pytest.mark.parametrize("tp,layout,padded,new_names", [(1, "pipeline", True, True), (2, "pipeline", False, False),
                                                        (4, "pipeline", True, False), (2, "sequential", True, True)])
def test_native_to_orbax_matches_hf(tmp_path, model, tp, layout, padded, new_names):
    root = write_neox(model, tmp_path / "neox", tp=tp, layout=layout, padded_vocab_in_yaml=padded,
                      new_names=new_names)
    assert main(["convert", str(root), str(tmp_path / "orb")]) == 0
    ref = logits(model, IDS)
    got = jax_logits(tmp_path / "orb")
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # the merged fp16 tensors are exactly the HF model's (biases summed in float64, rounded once)
    save_hf(model, tmp_path / "hf", dtype=torch.float16)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orb_from_hf")]) == 0
    _, a = load_params(tmp_path / "orb")
    _, b = load_params(tmp_path / "orb_from_hf")
    fa, fb = flatten(a), flatten(b)
    for k in fb:
        assert np.array_equal(bits(fa[k]), bits(fb[k])), k


def test_sequential_residual_tp2(tmp_path):
    """gpt-j-residual false: the row-parallel bias is added once, copies are averaged (not summed)."""
    m = tiny_hf(4, fp16_values=True, parallel=False, act="gelu_fast")
    root = write_neox(m, tmp_path / "neox", tp=2)
    assert main(["convert", str(root), str(tmp_path / "orb")]) == 0
    ref = logits(m, IDS)
    assert np.abs(jax_logits(tmp_path / "orb") - ref).max() <= 1e-4 * np.abs(ref).max()
    cfg, _ = load_params(tmp_path / "orb")
    assert cfg.hidden_act == "gelu_tanh" and not cfg.use_parallel_residual


def test_orbax_neox_tp2_orbax_bit_identical(tmp_path, model):
    save_hf(model, tmp_path / "hf", dtype=torch.float16)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orb")]) == 0
    assert main(["convert", str(tmp_path / "orb"), str(tmp_path / "nx"), "--to", "neox", "--tp", "2",
                 "--step", "143000"]) == 0
    assert main(["convert", str(tmp_path / "nx"), str(tmp_path / "orb2")]) == 0
    _, a = load_params(tmp_path / "orb")
    _, b = load_params(tmp_path / "orb2")
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(bits(fa[k]), bits(fb[k])), k

    # the files follow the published layout: read them back with the independent merge
    nx = tmp_path / "nx"
    L = model.config.num_hidden_layers
    step = nx / "global_step143000"
    assert (nx / "latest").read_text().strip() == "global_step143000"
    names = sorted(p.name for p in step.iterdir())
    for ll in [0] + [i + 2 for i in range(L)] + [L + 3, L + 4]:
        for r in range(2):
            assert f"layer_{ll:02d}-model_{r:02d}-model_states.pt" in names
    assert "layer_01-model_00-model_states.pt" not in names
    merged = read_neox_independent(nx, tp=2, L=L)
    ref = hf_state_numpy(model)
    assert set(merged) == set(ref)
    for k in ref:
        assert np.array_equal(merged[k], ref[k]), k
    layer = torch.load(step / "layer_02-model_01-model_states.pt", weights_only=True)
    assert layer["attention.query_key_value.weight"].shape == (3 * 64 // 2, 64)
    assert layer["attention.dense.weight"].shape == (64, 32)
    assert layer["mlp.linear1.weight"].shape == (4 * 64 // 2, 64)  # GPT-NeoX's current names (the default)
    assert all(v.dtype == torch.float16 for v in layer.values())
    # row-parallel biases: identical copies of b / TP on every rank, as real checkpoints hold them
    layer0 = torch.load(step / "layer_02-model_00-model_states.pt", weights_only=True)
    for key, hf in (("attention.dense.bias",) * 2, ("mlp.linear2.bias", "mlp.dense_4h_to_h.bias")):
        assert torch.equal(layer[key], layer0[key]), key
        assert torch.equal(layer[key].double() * 2, torch.tensor(ref[f"gpt_neox.layers.0.{hf}"]).double()), key

    # what GPT-NeoX's tools/ckpts/convert_neox_to_hf.py reads: the YAML keys and mp_rank args
    y = yaml.safe_load((step / "configs" / "neox_jax.yml").read_text())
    # GPT-NeoX declares rotary_emb_base an int: its NeoXArgs type check refuses 10000.0
    assert type(y["rotary-emb-base"]) is int and y["rotary-emb-base"] == load_params(tmp_path / "orb")[0].rotary_emb_base
    for key in ("hidden-size", "num-layers", "num-attention-heads", "max-position-embeddings", "rotary-pct",
                "rotary-emb-base", "gpt-j-residual", "layernorm-epsilon", "no-weight-tying", "model-parallel-size",
                "pipe-parallel-size", "make-vocab-size-divisible-by", "vocab-file", "tokenizer-type"):
        assert key in y, key
    assert y["model-parallel-size"] == 2 and y["pipe-parallel-size"] == 1 and y["fp16"]["enabled"] is True
    assert y["vocab-file"] == str((nx / "tokenizer.json").resolve()) and (nx / "tokenizer.json").exists()
    # NeoX's padding rule with that divisor reproduces the embedding rows for any tokenizer <= V
    m = y["make-vocab-size-divisible-by"] * 2
    assert math.ceil(256 / m) * m == 256
    assert from_neox_yaml(str(step / "configs" / "neox_jax.yml")).arch_dict() == load_params(tmp_path / "orb")[0].arch_dict()
    mp = torch.load(step / "mp_rank_01_model_states.pt", weights_only=True)
    assert mp["args"]["model_parallel_size"] == 2 and mp["args"]["padded_vocab_size"] == 256
    assert mp["iteration"] == 143000 and mp["mp_world_size"] == 2
    # the step rides through our checkpoint: NeoX -> orbax -> NeoX without --step is global_step143000 again
    assert main(["-q", "convert", str(tmp_path / "orb2"), str(tmp_path / "nx3"), "--to", "neox"]) == 0
    assert (tmp_path / "nx3" / "latest").read_text().strip() == "global_step143000"


def test_neox_to_neox_retp_and_bf16(tmp_path, model):
    """TP 4 -> TP 2 re-sharding (and a dtype cast) keeps the model: logits checked by --verify; the
    legacy (v1.0/v2.0) names once, then the current ones, each read back by the independent merge."""
    root = write_neox(model, tmp_path / "neox", tp=4)
    assert main(["convert", str(root), str(tmp_path / "nx2"), "--to", "neox", "--tp", "2", "--verify",
                 "--neox-names", "legacy"]) == 0
    merged = read_neox_independent(tmp_path / "nx2", tp=2, L=model.config.num_hidden_layers, names="legacy")
    ref = hf_state_numpy(model)
    for k in ref:
        assert np.array_equal(merged[k], ref[k]), k
    assert main(["convert", str(tmp_path / "nx2"), str(tmp_path / "nxb"), "--to", "neox", "--dtype", "bfloat16",
                 "--verify"]) == 0
    layer = torch.load(tmp_path / "nxb" / "global_step1000" / "layer_03-model_00-model_states.pt", weights_only=True)
    assert layer["mlp.linear1.weight"].dtype == torch.bfloat16
    merged = read_neox_independent(tmp_path / "nxb", tp=1, L=model.config.num_hidden_layers)
    for k in ref:
        np.testing.assert_array_equal(merged[k], ref[k].astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)


def test_vocab_divisor_reproduces_the_padded_vocabulary():
    def cfg(v):
        return ModelConfig(vocab_size=v, hidden_size=64, num_layers=1, num_heads=4)

    assert vocab_divisor(cfg(50304), 1, 50277) == 128  # Pythia at TP 1: the usual value
    assert vocab_divisor(cfg(50304), 2, 50277) == 64  # re-sharded to TP 2: 128 x 2 would give 50432
    assert vocab_divisor(cfg(50432), 1, 50277) == 50432  # 20B merged to TP 1 (what merge20b.py does)
    assert vocab_divisor(cfg(50432), 2, None) == 25216  # tokenizer unknown: V/TP works for any tokenizer
    for v, tp, tok in ((50304, 2, 50277), (50432, 1, 50277), (50688, 2, 50277), (50432, 4, None)):
        m = vocab_divisor(cfg(v), tp, tok) * tp
        assert math.ceil((tok or 50277) / m) * m == v


def test_layer_norm_eps_through_neox(tmp_path):
    """layernorm-epsilon 1e-3 in the run's YAML (not the 1e-5 default): read by the NeoX reader, used by
    the forward pass (transformers with eps 1e-3 is the reference), written back by --to neox."""
    m = tiny_hf(6, fp16_values=True, eps=1e-3)
    root = write_neox(m, tmp_path / "neox", tp=2)
    assert yaml.safe_load((root / "global_step1000" / "configs" / "model.yml").read_text())["layernorm-epsilon"] == 1e-3
    assert main(["convert", str(root), str(tmp_path / "orb")]) == 0
    cfg, _ = load_params(tmp_path / "orb")
    assert cfg.layer_norm_eps == 1e-3
    ref = logits(m, IDS)
    assert np.abs(jax_logits(tmp_path / "orb") - ref).max() <= 1e-4 * np.abs(ref).max()
    # --verify builds the PyTorch side from the NeoX tensors and config: it must carry the eps too
    assert main(["convert", str(root), str(tmp_path / "orb2"), "--verify"]) == 0
    assert main(["convert", str(tmp_path / "orb"), str(tmp_path / "nx"), "--to", "neox"]) == 0
    y = yaml.safe_load(next((tmp_path / "nx").glob("global_step*/configs/neox_jax.yml")).read_text())
    assert y["layernorm-epsilon"] == 1e-3


def test_row_parallel_bias_that_does_not_split_exactly(tmp_path):
    """--to neox --tp N writes a parallel-residual row-parallel bias b as N copies of b/N when that is
    exact, else b on rank 0 and -0.0 on the others.  fp16 subnormals with the lowest bit set
    (odd multiples of 2^-24) have no exact half: such a tensor must take the fallback, and the
    independent merge (sum over ranks, reference 1.4) must give b back bit for bit."""
    m = tiny_hf(9, fp16_values=True, layers=2)
    tiny = 2.0 ** -24  # the smallest fp16 subnormal
    with torch.no_grad():
        m.gpt_neox.layers[0].attention.dense.bias[:3] = torch.tensor([tiny, -3 * tiny, 1023 * tiny])
        m.gpt_neox.layers[1].mlp.dense_4h_to_h.bias[5] = 5 * tiny
    ref = hf_state_numpy(m)
    odd = {"gpt_neox.layers.0.attention.dense.bias", "gpt_neox.layers.1.mlp.dense_4h_to_h.bias"}
    for k in odd:  # the values really are fp16 and really have no exact half in fp16
        b16 = ref[k].astype(np.float16)
        assert np.array_equal(b16.astype(np.float32), ref[k])
        assert not np.array_equal((b16 / np.float16(2)).astype(np.float64) * 2, b16.astype(np.float64))
    save_hf(m, tmp_path / "hf", dtype=torch.float16)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orb")]) == 0
    L = m.config.num_hidden_layers
    for tp in (2, 4):
        nx = tmp_path / f"nx{tp}"
        assert main(["convert", str(tmp_path / "orb"), str(nx), "--to", "neox", "--tp", str(tp)]) == 0
        merged = read_neox_independent(nx, tp=tp, L=L)
        for k in ref:
            assert np.array_equal(merged[k], ref[k]), (tp, k)
        step = next(nx.glob("global_step*"))
        for i in range(L):
            ranks = [torch.load(step / f"layer_{i + 2:02d}-model_{r:02d}-model_states.pt", weights_only=True)
                     for r in range(tp)]
            for key, hf in (("attention.dense.bias",) * 2, ("mlp.linear2.bias", "mlp.dense_4h_to_h.bias")):
                b = torch.tensor(ref[f"gpt_neox.layers.{i}.{hf}"]).half()
                if f"gpt_neox.layers.{i}.{hf}" in odd:  # fallback: b on rank 0, -0.0 elsewhere
                    assert torch.equal(ranks[0][key].view(torch.int16), b.view(torch.int16)), (tp, i, key)
                    for r in range(1, tp):
                        assert torch.equal(ranks[r][key].view(torch.int16),
                                           torch.full_like(b, -0.0).view(torch.int16)), (tp, i, key, r)
                else:  # exact: identical copies of b / TP, as GPT-NeoX's own checkpoints hold them
                    for r in range(tp):
                        assert torch.equal(ranks[r][key].double() * tp, b.double()), (tp, i, key, r)
        # and our reader merges it back to the same tensors
        assert main(["convert", str(nx), str(tmp_path / f"orb{tp}")]) == 0
        _, a = load_params(tmp_path / "orb")
        _, b = load_params(tmp_path / f"orb{tp}")
        fa, fb = flatten(a), flatten(b)
        for k in fa:
            assert np.array_equal(bits(fa[k]), bits(fb[k])), (tp, k)


def test_neox_config_option(tmp_path, model, capsys):
    """A NeoX save without global_stepN/configs/ needs --neox-config; several files are merged in order
    (a later file overrides an earlier one), and what they say is what is read."""
    root = write_neox(model, tmp_path / "neox", tp=2)
    configs = root / "global_step1000" / "configs"
    run = yaml.safe_load((configs / "model.yml").read_text())
    shutil.rmtree(configs)
    assert main(["convert", str(root), str(tmp_path / "x")]) == 2
    assert "--neox-config" in capsys.readouterr().err and not (tmp_path / "x").exists()
    first, second = tmp_path / "a.yml", tmp_path / "b.yml"
    first.write_text(yaml.safe_dump({**run, "hidden-size": 128}))  # wrong, overridden by the second file
    second.write_text(yaml.safe_dump({"hidden-size": 64, "layernorm-epsilon": 1e-5}))
    assert main(["convert", str(root), str(tmp_path / "orb"), "--neox-config", str(first),
                 "--neox-config", str(second)]) == 0
    ref = logits(model, IDS)
    assert np.abs(jax_logits(tmp_path / "orb") - ref).max() <= 1e-4 * np.abs(ref).max()
    # the other order: the wrong hidden size wins and the tensors do not fit it
    assert main(["convert", str(root), str(tmp_path / "bad"), "--neox-config", str(second),
                 "--neox-config", str(first)]) == 2
    assert "(128, 64)" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # inspect and diff read it too
    assert main(["inspect", str(root), "--no-hash", "--neox-config", str(first), "--neox-config", str(second)]) == 0
    assert "TP=2" in capsys.readouterr().out
    assert main(["diff", str(root), str(tmp_path / "orb"), "--neox-config-a", str(first),
                 "--neox-config-a", str(second)]) == 0
    assert "MATCH within rtol 0" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_inv_freq_buffers_written_by_to_neox(tmp_path, dtype):
    """--neox-names legacy: every layer file of every rank carries attention.rotary_emb.inv_freq as
    GPT-NeoX v1.0's RotaryEmbedding registers it, 1 / base ** (arange(0, R, 2).float() / R), in the
    checkpoint dtype (DeepSpeed's module.half() casts buffers too); R = rotary dims, not head_dim.
    (GPT-NeoX since its #1168 keeps the buffer out of the state dict, and a strict load refuses it:
    the current names write none, checked by read_neox_independent.)"""
    m = tiny_hf(12, fp16_values=True, layers=2, hidden=64, heads=4, rotary_pct=0.5, base=5000.0)
    save_hf(m, tmp_path / "hf", dtype=torch.float16)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "nx"), "--to", "neox", "--tp", "2",
                 "--dtype", dtype, "--neox-names", "legacy"]) == 0
    R = 8  # head_dim 16 x rotary_pct 0.5
    ref = 1.0 / (5000.0 ** (torch.arange(0, R, 2).float() / R))
    tdt = getattr(torch, dtype)
    step = next((tmp_path / "nx").glob("global_step*"))
    for i in range(2):
        for r in range(2):
            sd = torch.load(step / f"layer_{i + 2:02d}-model_{r:02d}-model_states.pt", weights_only=True)
            got = sd["attention.rotary_emb.inv_freq"]
            assert got.dtype == tdt and got.shape == (R // 2,)
            if dtype == "float32":  # two float32 pow implementations: within an ulp
                np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=2.5e-7, atol=0)
            else:
                assert torch.equal(got, ref.to(tdt)), (i, r, got, ref.to(tdt))
    for ll in (0, 5, 6):  # embedding, final norm and output layer files have no rotary buffer
        assert "attention.rotary_emb.inv_freq" not in torch.load(
            step / f"layer_{ll:02d}-model_00-model_states.pt", weights_only=True)
