"""`neox-jax export` (neox_jax/export.py): the SavedModel, loaded and run by TensorFlow, against HF
transformers on the same weights, at two batch/sequence shapes (one program, symbolic shapes); a
greedy loop of its prefill/decode signatures in TensorFlow against HF `generate`; and the command's
refusals; and a bfloat16 export against float32 HF, within twice HF bfloat16's own error.  One float32
export (cache length 48 of the model's 64) serves every other test."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_reference import hf_logits, hf_model, ours_from_hf
from neox_jax.checkpoint import save_params
from neox_jax.cli import main

CACHE_LEN = 48


@pytest.fixture(scope="module")
def tf():
    import tensorflow  # the `export` extra (pyproject.toml; seqio installs it too); imported here, not at collection

    return tensorflow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = hf_model(seed=2, vocab=211, max_pos=64)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    root = tmp_path_factory.mktemp("export")
    save_params(root / "ck", cfg, params)
    assert main(["export", str(root / "ck"), str(root / "sm"), "--cache-len", str(CACHE_LEN)]) == 0
    return model, root


def test_saved_model_matches_hf(exported, tf):
    model, root = exported
    loaded = tf.saved_model.load(str(root / "sm"))
    for b, s in [(2, 9), (1, 64)]:
        ids = np.random.RandomState(s).randint(0, 211, (b, s)).astype(np.int32)
        ref = hf_logits(model, ids)
        got = loaded.signatures["logits"](tokens=tf.constant(ids))["logits"].numpy()
        assert got.shape == (b, s, 211)
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
        lp = loaded.signatures["token_log_probs"](tokens=tf.constant(ids))["token_log_probs"].numpy()
        want = torch.log_softmax(torch.tensor(ref[:, :-1], dtype=torch.float64), -1).gather(
            -1, torch.tensor(ids[:, 1:, None], dtype=torch.long))[..., 0].numpy()
        np.testing.assert_allclose(lp, want, atol=5e-5)
    assert json.loads((root / "sm" / "neox_jax.json").read_text())["num_layers"] == 2
    # past max_position_embeddings the program refuses (its shape constraint), it does not extrapolate
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["logits"](tokens=tf.zeros((1, 65), tf.int32))


def test_greedy_prefill_decode_matches_hf_generate(exported, tf, record_property):
    """Prompts of 9, 4 and 1 tokens left-padded into one batch; 8 greedy tokens by a plain TF loop
    (argmax, decode, feed the cache back); tokens and every step's logits against HF."""
    model, root = exported
    sm = tf.saved_model.load(str(root / "sm"))
    prefill, decode = sm.signatures["prefill"], sm.signatures["decode"]
    rs = np.random.RandomState(5)
    prompts = [rs.randint(2, 211, n).tolist() for n in (9, 4, 1)]
    S, new = 9, 8
    ids = np.array([[1] * (S - len(p)) + p for p in prompts], np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)

    state = prefill(tokens=tf.constant(ids), lengths=tf.constant(lengths))
    assert state["k"].shape == (2, 3, 4, CACHE_LEN, 16) and int(state["index"]) == S
    got_tokens, got_logits = [], []
    for step in range(new):
        got_logits.append(state["logits"].numpy())
        token = tf.argmax(state["logits"], axis=-1, output_type=tf.int32)
        got_tokens.append(token.numpy())
        if step < new - 1:
            state = decode(token=token, **{n: state[n] for n in ("k", "v", "lengths", "index")})
    assert int(state["index"]) == S + new - 1 and state["lengths"].numpy().tolist() == (lengths + new - 1).tolist()

    mask = (np.arange(S)[None, :] >= S - lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             max_new_tokens=new, do_sample=False, pad_token_id=1, output_logits=True,
                             return_dict_in_generate=True)
    ref_tokens = ref.sequences[:, S:].numpy()
    ref_logits = np.stack([l.float().numpy() for l in ref.logits], axis=1)
    assert np.stack(got_tokens, axis=1).tolist() == ref_tokens.tolist()
    diff = np.abs(np.stack(got_logits, axis=1) - ref_logits).max()
    assert diff < 2e-5, diff
    record_property("measured", f"TF prefill+decode greedy == HF generate, 3 prompts x {new} tokens "
                                f"({len(set(ref_tokens.ravel()))} distinct); max |logits diff| {diff:.1e} (float32)")

    # the cache is full at index == CACHE_LEN: decode refuses instead of overwriting a slot
    with pytest.raises(tf.errors.InvalidArgumentError, match="cache is full"):
        decode(token=token, k=state["k"], v=state["v"], lengths=state["lengths"], index=tf.constant(CACHE_LEN))
    with pytest.raises(tf.errors.InvalidArgumentError, match="lengths"):
        prefill(tokens=tf.constant(ids), lengths=tf.constant([S + 1, 1, 1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="longer than the cache length 48"):
        prefill(tokens=tf.zeros((1, CACHE_LEN + 1), tf.int32), lengths=tf.constant([CACHE_LEN + 1]))


def test_refusals(exported, tmp_path, capsys):
    _, root = exported
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neox-jax: error: ") and err.count("\n") == 1 and "nothing" in err, err
    assert not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["export", str(root / "ck"), str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "busy" in err, err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    for bad, words in (("0", ">= 1"), ("65", "max_position_embeddings 64")):
        assert main(["export", str(root / "ck"), str(tmp_path / "out"), "--cache-len", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("neox-jax: error: --cache-len") and err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--cache-len" in capsys.readouterr().out
    # a process's whole stderr (TensorFlow's C++ logging writes to it directly, unseen by capsys): an
    # error found before any work is one line; TensorFlow is not even imported then
    r = subprocess.run([sys.executable, "-m", "neox_jax", "export", str(tmp_path / "nothing"), str(tmp_path / "out")],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "nothing" in r.stderr, r.stderr


def test_tensorflow_that_cannot_read_jax2tf_is_refused_before_writing(exported, tf, tmp_path, capsys, monkeypatch):
    """TensorFlow 2.21 cannot load what jax 0.11.2's jax2tf serializes (StableHLO 1.18 against its
    1.13.7; found on the GPU machine's versions, launch/test_gpu_versions.sh): the SavedModel would be
    written and fail at its first call.  `export` runs a tiny jax2tf function first and refuses with
    one line naming both versions, writing nothing.  Here TensorFlow's load error is raised in place of
    the real one (the versions in this environment agree)."""
    import jax
    from jax.experimental import jax2tf

    _, root = exported

    def unreadable(fn, **kw):
        def call(*args):
            raise tf.errors.InvalidArgumentError(None, None, "Graph execution error:\n\nCannot deserialize "
                                                 "computation: UNKNOWN: unregistered operation 'vhlo.custom_call_v2'")
        return call

    monkeypatch.setattr(jax2tf, "convert", unreadable)
    assert main(["export", str(root / "ck"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neox-jax: error: ") and err.count("\n") == 1, err
    assert f"TensorFlow {tf.__version__}" in err and f"jax {jax.__version__}" in err and "deserialize" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("how", ["dtype-option", "checkpoint-compute-dtype"])
def test_bfloat16_export_is_as_close_to_float32_as_hf_bfloat16(exported, tf, tmp_path, record_property, how):
    """bf16 compute and KV cache, two ways: `--dtype bfloat16` (every parameter cast to bf16 on
    load), or a float32 checkpoint whose config computes in bf16 (no --dtype): its matmul weights and
    embedding are then stored in bf16, cast once at export, and its LayerNorms stay float32 (the
    6 float32 variables: two per stacked LayerNorm and the final one).  Logits and a decode step
    after prefill, against the float32 HF model, are within twice HF's own bf16 error (HF in
    bfloat16 on the same weights, measured in the same test) and 3e-2 x max|logit| (the bf16 bound
    of tests/model_test.py)."""
    import copy

    model, root = exported
    if how == "dtype-option":
        ck, extra, n_float32 = root / "ck", ["--dtype", "bfloat16"], 0
    else:
        cfg, params = ours_from_hf(model, compute_dtype="bfloat16")
        ck, extra, n_float32 = tmp_path / "ck", [], 6
        save_params(ck, cfg, params)
    assert main(["export", str(ck), str(tmp_path / "sm"), *extra, "--cache-len", str(CACHE_LEN)]) == 0
    sm = tf.saved_model.load(str(tmp_path / "sm"))
    dtypes = [v.dtype for v in sm.params]  # export.py keeps the parameter variables in `params`
    assert dtypes.count(tf.float32) == n_float32 and dtypes.count(tf.bfloat16) == len(dtypes) - n_float32, dtypes
    hf_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ids = np.random.RandomState(7).randint(0, 211, (2, 33)).astype(np.int32)
    ref, ref_bf16 = hf_logits(model, ids), hf_logits(hf_bf16, ids)
    got = sm.signatures["logits"](tokens=tf.constant(ids))["logits"].numpy()
    state = sm.signatures["prefill"](tokens=tf.constant(ids[:, :-1]), lengths=tf.constant([32, 32]))
    assert state["k"].dtype == tf.bfloat16
    step = sm.signatures["decode"](token=tf.constant(ids[:, -1]), **{n: state[n] for n in ("k", "v", "lengths", "index")})
    errs = {"logits": float(np.abs(got - ref).max()), "prefill": float(np.abs(state["logits"].numpy() - ref[:, -2]).max()),
            "decode": float(np.abs(step["logits"].numpy() - ref[:, -1]).max())}
    hf_err = float(np.abs(ref_bf16 - ref).max())
    record_property("measured", f"bf16 export vs HF float32: max |dlogit| "
                                f"{ {k: round(v, 4) for k, v in errs.items()} }, HF bf16's own {hf_err:.4f}, "
                                f"max |logit| {np.abs(ref).max():.2f}")
    for what, err in errs.items():
        assert err <= 2 * hf_err and err <= 3e-2 * np.abs(ref).max(), (what, err, hf_err)
