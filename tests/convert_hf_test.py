"""HF <-> Orbax conversion: bit-exact round trips, from_pretrained compatibility, old checkpoints."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open

from convert_fixtures import load_hf, logits, save_hf, tiny_hf
from neox_jax.checkpoint import load_params
from neox_jax.cli import main
from neox_jax.model import forward

IDS = np.random.default_rng(0).integers(0, 256, size=(2, 48))


def st_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, read with the safetensors library (not our reader)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def jax_logits(ckpt, ids=IDS) -> np.ndarray:
    cfg, params = load_params(ckpt, dtype="float32")
    return np.asarray(forward(cfg.replace(compute_dtype="float32"), params, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def fp16_model():
    return tiny_hf(0, fp16_values=True)


def test_hf_orbax_hf_bit_identical(tmp_path, fp16_model, capsys):
    src = save_hf(fp16_model, tmp_path / "hf", dtype=torch.float16, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()  # sharded source
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    assert main(["convert", str(src), str(tmp_path / "orb")]) == 0
    out = capsys.readouterr().out
    assert "float16" in out and "total" in out  # summary table

    ref = logits(fp16_model, IDS)
    got = jax_logits(tmp_path / "orb")
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    cfg, params = load_params(tmp_path / "orb")
    assert params["layers"]["attn"]["qkv"]["kernel"].dtype == jnp.float16  # source dtype kept

    assert main(["convert", str(tmp_path / "orb"), str(tmp_path / "hf2"), "--to", "hf",
                 "--max-shard-size", "150KB"]) == 0
    dst = tmp_path / "hf2"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (dst / "tokenizer.json").read_text() == '{"version": "1.0"}'
    a, b = st_tensors(src), st_tensors(dst)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k

    m1 = load_hf(src)
    m2, info = type(m1).from_pretrained(str(dst), dtype=torch.float32, attn_implementation="eager",
                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert np.array_equal(logits(m1, IDS), logits(m2.eval(), IDS))
    hf_cfg = json.loads((dst / "config.json").read_text())
    assert hf_cfg["dtype"] == "float16" and hf_cfg["eos_token_id"] == 0


def test_bfloat16_round_trip_tolerance(tmp_path, record_property):
    """fp32 HF -> --dtype bfloat16 -> orbax -> HF: bf16 tensors; logits within the documented bound."""
    model = tiny_hf(1)
    src = save_hf(model, tmp_path / "hf", dtype=torch.float32)
    assert main(["convert", str(src), str(tmp_path / "orb"), "--dtype", "bfloat16", "--verify"]) == 0
    assert main(["convert", str(tmp_path / "orb"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    t = st_tensors(tmp_path / "hf2")
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    ref = logits(model, IDS)
    got = logits(load_hf(tmp_path / "hf2"), IDS)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    record_property("measured", f"bf16 round trip max|dlogit|/max|logit| = {rel:.2e} (bound 5e-2)")
    assert rel <= 5e-2
    # the bf16 values themselves survive orbax -> hf unchanged
    sd = {k: v.float() for k, v in model.state_dict().items()}
    for k, v in t.items():
        ref_t = sd["lm_head.weight" if k == "embed_out.weight" else k].to(torch.bfloat16)
        assert torch.equal(v.view(torch.int16), ref_t.view(torch.int16)), k


def test_old_style_checkpoint_buffers_ignored(tmp_path, fp16_model):
    """2022-era files: attention.bias / masked_bias / inv_freq buffers, rotary_pct config keys."""
    src = save_hf(fp16_model, tmp_path / "old", old_style=True)
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        assert any(k.endswith("attention.masked_bias") for k in h.keys())
    assert main(["convert", str(src), str(tmp_path / "orb")]) == 0
    ref = logits(fp16_model, IDS)
    assert np.abs(jax_logits(tmp_path / "orb") - ref).max() <= 1e-4 * np.abs(ref).max()


def test_pytorch_bin_source(tmp_path, fp16_model):
    src = save_hf(fp16_model, tmp_path / "bin", bin=True)
    assert (src / "pytorch_model.bin").exists() and not list(src.glob("*.safetensors"))
    assert main(["convert", str(src), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    ref = {k: v for k, v in torch.load(src / "pytorch_model.bin", weights_only=True).items()}
    got = st_tensors(tmp_path / "hf2")
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_hf_to_hf_cast_and_tied_embeddings(tmp_path):
    model = tiny_hf(2, tied=True, parallel=False, act="gelu_fast", layers=3)
    src = save_hf(model, tmp_path / "hf", dtype=torch.float32)
    assert main(["convert", str(src), str(tmp_path / "hf16"), "--to", "hf", "--dtype", "float16", "--verify"]) == 0
    m2, info = type(model).from_pretrained(str(tmp_path / "hf16"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert m2.config.tie_word_embeddings and not m2.config.use_parallel_residual
    assert "embed_out.weight" not in st_tensors(tmp_path / "hf16")
    # orbax from the fp16 copy: same logits as transformers on the same fp16 weights
    assert main(["convert", str(tmp_path / "hf16"), str(tmp_path / "orb")]) == 0
    ref = logits(load_hf(tmp_path / "hf16"), IDS)
    assert np.abs(jax_logits(tmp_path / "orb") - ref).max() <= 1e-4 * np.abs(ref).max()


def test_verify_reports_and_overwrite(tmp_path, fp16_model, capsys):
    src = save_hf(fp16_model, tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "orb"), "--verify", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    v = res["verify"]
    assert v["ok"] and v["max_abs_diff"] <= v["tolerance"] and v["mean_kl"] < 1e-8 and v["batch"] == [2, 64]
    # an existing DST is replaced only with --overwrite
    assert main(["convert", str(src), str(tmp_path / "orb")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "orb" / "tokenizer", ignore_errors=True)
    assert main(["convert", str(src), str(tmp_path / "orb"), "--overwrite", "--dtype", "float32"]) == 0
    cfg, params = load_params(tmp_path / "orb")
    assert cfg.param_dtype == "float32" and params["embed_in"]["embedding"].dtype == jnp.float32


def test_sharded_pytorch_bin_with_index(tmp_path, fp16_model):
    src = save_hf(fp16_model, tmp_path / "bin", bin=True)
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    (src / "pytorch_model.bin").unlink()
    keys = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in halves.items():
        torch.save({k: sd[k] for k in ks}, src / fname)
        weight_map.update({k: fname for k in ks})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert main(["convert", str(src), str(tmp_path / "orb")]) == 0
    ref = logits(fp16_model, IDS)
    assert np.abs(jax_logits(tmp_path / "orb") - ref).max() <= 1e-4 * np.abs(ref).max()


def _with_eps(model, eps):
    """A copy of `model` whose LayerNorms use `eps` (same weights)."""
    import copy

    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = eps
    return m


def test_layer_norm_eps_survives_conversion(tmp_path):
    """A model with layer_norm_eps 1e-3 (every other fixture uses 1e-5): the eps is read from the new and
    the 2022-era config.json, drives our forward pass, and is written back for transformers."""
    model = tiny_hf(5, fp16_values=True, eps=1e-3)
    ref = logits(model, IDS)
    # the eps matters for this model: the same weights with the default eps give other logits
    assert np.abs(logits(_with_eps(model, 1e-5), IDS) - ref).max() > 100 * 1e-4 * np.abs(ref).max()
    for name, kw in (("hf", {}), ("hf_old", {"old_style": True})):
        src = save_hf(model, tmp_path / name, dtype=torch.float16, **kw)
        assert json.loads((src / "config.json").read_text())["layer_norm_eps"] == 1e-3
        assert main(["convert", str(src), str(tmp_path / f"orb_{name}")]) == 0
        cfg, _ = load_params(tmp_path / f"orb_{name}")
        assert cfg.layer_norm_eps == 1e-3, name
        got = jax_logits(tmp_path / f"orb_{name}")
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), name
    assert main(["convert", str(tmp_path / "orb_hf"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = load_hf(tmp_path / "back")
    assert back.config.layer_norm_eps == 1e-3
    assert np.abs(logits(back, IDS) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_tokenizer_vocab_size_comes_from_the_checkpoints_tokenizer(tmp_path, neox_tokenizer_path, caplog):
    """HF's config.json has no tokenizer size; the checkpoint's tokenizer.json does (the 20B tokenizer:
    50277 with its added tokens, per `tokenizers`).  An HF model whose padding row 50290 wins every
    step (final LayerNorm output all ones, that row 10s): greedy `generate` from the conversion used
    to emit 50290 forever (decoded as ""); it now never draws an id past the tokenizer's."""
    from tokenizers import Tokenizer

    from neox_jax.checkpoint import read_config

    real = Tokenizer.from_file(str(neox_tokenizer_path)).get_vocab_size(with_added_tokens=True)
    assert real == 50277
    model = tiny_hf(0, vocab=50304, hidden=16, layers=1, heads=2)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight.zero_()
        model.gpt_neox.final_layer_norm.bias.fill_(1.0)
        model.get_output_embeddings().weight[50290].fill_(10.0)
    src = save_hf(model, tmp_path / "hf", dtype=torch.float32)
    shutil.copy(neox_tokenizer_path, src / "tokenizer.json")
    assert main(["convert", str(src), str(tmp_path / "ck")]) == 0
    assert read_config(tmp_path / "ck").tokenizer_vocab_size == real
    out = tmp_path / "g.jsonl"
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "ROMEO:", "--max-new-tokens", "4", "--tokenizer",
                 str(neox_tokenizer_path), "--output", str(out)]) == 0
    toks = json.loads(out.read_text())["completion_tokens"]
    assert len(toks) == 4 and all(t < real for t in toks), toks
    # without a tokenizer.json beside the weights nothing is assumed (every row may be drawn)
    (src / "tokenizer.json").unlink()
    assert main(["convert", str(src), str(tmp_path / "ck2")]) == 0
    assert read_config(tmp_path / "ck2").tokenizer_vocab_size == 0
    (src / "tokenizer.json").write_text("{not json")  # converted all the same, with a warning saying so
    with caplog.at_level("WARNING", logger="neox_jax"):
        assert main(["convert", str(src), str(tmp_path / "ck3")]) == 0
    assert "tokenizer.json: not a tokenizer the tokenizers library reads" in caplog.text
    assert read_config(tmp_path / "ck3").tokenizer_vocab_size == 0
