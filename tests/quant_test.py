"""Weight-only int8 decoding (neox_jax/quant.py, `generate --int8`): the quantizer against a NumPy
re-derivation, and int8 generation against HF transformers running the dequantized weights (the
same numbers in float32: logits to float tolerance, greedy tokens equal), on one device and split
over two tensor-parallel devices; plus how far int8 moves the logits of the float model."""

import jax
import numpy as np
import pytest
import torch

from generate_test import _prompts, hf_greedy
from hf_reference import hf_logits, hf_model, ours_from_hf
from neox_jax import model as M
from neox_jax import quant
from neox_jax.checkpoint import save_params
from neox_jax.convert.mapping import params_to_hf
from neox_jax.generate import load_generator


def test_quantize_against_numpy():
    w = np.random.RandomState(0).standard_normal((3, 16, 2, 4, 8)).astype(np.float32)
    w[1, :, 0, 2, 5] = 0.0  # an all-zero channel
    got = quant.quantize(w, (1,))
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    # XLA divides by the constant 127 as a multiplication by its reciprocal: within 1 ulp
    np.testing.assert_allclose(np.asarray(got.scale), scale, rtol=2.5e-7, atol=0)
    q = np.clip(np.round(w / np.asarray(got.scale)), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(got.q), q)
    assert np.abs(q).max() == 127
    assert got.scale.shape == (3, 1, 2, 4, 8)
    err = np.abs(np.asarray(got.dequant(np.float32)) - w)
    assert (err <= scale / 2 + 1e-7).all() and err.max() > 0


def _dequantized_hf(model, cfg, params):
    """A copy of the HF model carrying our dequantized weights (float32)."""
    flat = {k: (np.asarray(v.dequant(np.float32)) if isinstance(v, quant.Int8) else np.asarray(v, np.float32))
            for k, v in M.flatten(jax.device_get(params)).items()}
    sd = params_to_hf(cfg, M.unflatten(flat))
    ref = hf_model(seed=99, vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_layers,
                   heads=cfg.num_heads)
    missing = ref.load_state_dict({("lm_head.weight" if k == "embed_out.weight" else k): torch.tensor(v)
                                   for k, v in sd.items()}, strict=False)
    assert not missing.unexpected_keys and not missing.missing_keys, missing
    return ref.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = hf_model(seed=4, vocab=211, hidden=64, layers=2, heads=4)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    path = tmp_path_factory.mktemp("q") / "ck"
    save_params(path, cfg, params)
    return model, cfg, params, path


@pytest.mark.parametrize("tensor", [1, 2])
def test_int8_generation_equals_hf_on_dequantized_weights(saved, tensor, record_property):
    model, cfg, float_params, path = saved
    gen = load_generator(str(path), tensor=tensor, int8=True)
    kernels = {k: v for k, v in M.flatten(gen.params).items() if isinstance(v, quant.Int8)}
    assert set(kernels) == set(quant.CONTRACT) and all(v.q.dtype == np.int8 for v in kernels.values())
    ref = _dequantized_hf(model, cfg, gen.params)

    ids = np.random.RandomState(1).randint(0, 211, (2, 24)).astype(np.int32)
    ours = np.asarray(jax.jit(lambda p, t: M.forward(gen.cfg, p, t))(gen.params, ids))
    np.testing.assert_allclose(ours[..., :211], hf_logits(ref, ids), atol=2e-5, rtol=1e-4)

    prompts = _prompts(cfg.vocab_size, lengths=(5, 16, 9))
    alone, _ = hf_greedy(ref, prompts, 8)
    got = gen.generate(prompts, max_new_tokens=8, batch_size=3)
    assert [c.completion_tokens for c in got] == alone
    drift = np.abs(ours[..., :211] - hf_logits(model, ids)).max()
    record_property("measured", f"int8 (tensor {tensor}): logits vs the float model max |diff| {drift:.3f} "
                                f"(logit range {np.ptp(hf_logits(model, ids)):.1f})")
    assert drift < 0.1  # int8 keeps the model: per-channel error <= scale/2


def test_generate_command_int8(saved, tmp_path, caplog):
    import json

    from neox_jax.cli import main

    _, cfg, _, path = saved
    prompts = _prompts(cfg.vocab_size, lengths=(4, 11))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt_tokens": p}) + "\n" for p in prompts))
    with caplog.at_level("INFO", logger="neox_jax"):
        assert main(["generate", str(path), "--input", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "out.jsonl"), "--max-new-tokens", "6", "--int8", "--ignore-eod"]) == 0
    assert "int8 weights" in caplog.text  # (int8 and float greedy tokens may well agree: the log says which ran)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = load_generator(str(path), int8=True).generate(prompts, max_new_tokens=6)
    assert [r["completion_tokens"] for r in rows] == [c.completion_tokens for c in want]


def test_eval_perplexity_int8_equals_hf_on_dequantized_weights(saved, tmp_path):
    """`eval --int8 --perplexity`: the perplexity of token documents (each one window) equals HF's on
    the dequantized weights; and it moves from the float model's by a small amount."""
    import json
    import math

    from neox_jax.cli import main

    model, cfg, _, path = saved
    docs = _prompts(cfg.vocab_size, lengths=(40, 17, 63), seed=3)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"tokens": d}) + "\n" for d in docs))

    def ours(*extra):
        out = tmp_path / f"r{len(extra)}.json"
        assert main(["-q", "eval", str(path), "--perplexity", str(tmp_path / "docs.jsonl"), "--output", str(out),
                     *extra]) == 0
        return json.loads(out.read_text())["results"]["perplexity"]["perplexity"]

    def hf_ppl(m):
        total = count = 0
        for d in docs:
            with torch.no_grad():
                lp = torch.log_softmax(m(torch.tensor([d])).logits.double(), -1)[0]
            total += sum(float(lp[i - 1, d[i]]) for i in range(1, len(d)))
            count += len(d) - 1
        return math.exp(-total / count)

    ref = _dequantized_hf(model, cfg, load_generator(str(path), int8=True).params)
    got = ours("--int8")
    assert got == pytest.approx(hf_ppl(ref), rel=1e-5)
    flt = ours()
    assert got == pytest.approx(flt, rel=2e-2) and got != flt
