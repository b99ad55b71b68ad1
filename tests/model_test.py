"""The Flax model against HF transformers' GPTNeoXForCausalLM (PyTorch, fp32, eager attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_reference import hf_logits, hf_model, ours_from_hf
from neox_jax import model as M
from neox_jax.config import load_config
from neox_jax.errors import UserError

REL_TOL = 1e-4  # max |logit difference| <= REL_TOL * max |logit|, fp32


def _forward(cfg, params, ids, **kw):
    return np.asarray(jax.jit(lambda p, t, **k: M.forward(cfg, p, t, **k))(params, jnp.asarray(ids), **kw))


def _check(record_property, label, ours, ref, tol=REL_TOL):
    err = float(np.max(np.abs(ours - ref)))
    scale = float(np.max(np.abs(ref)))
    record_property("measured", f"{label}: max|dlogit| {err:.3e}, max|logit| {scale:.3f}, ratio {err / scale:.2e}")
    assert err <= tol * scale, (label, err, scale)


PARITY_CASES = [
    # (id, kwargs for hf_model)
    ("pct0.25-parallel-untied-erf-hd16", dict(hidden=64, heads=4, rotary_pct=0.25, parallel=True, tied=False, act="gelu")),
    ("pct1.0-sequential-untied-tanh-hd32", dict(hidden=64, heads=2, rotary_pct=1.0, parallel=False, tied=False, act="gelu_fast")),
    ("pct0.25-parallel-tied-tanh-hd128", dict(hidden=256, heads=2, rotary_pct=0.25, parallel=True, tied=True, act="gelu_new")),
    ("pct0.5-sequential-tied-erf-hd64", dict(hidden=128, heads=2, rotary_pct=0.5, parallel=False, tied=True, act="gelu")),
    ("pct0.25-parallel-hd96-base1e4-3layers", dict(hidden=192, heads=2, layers=3, rotary_pct=0.25, act="gelu_pytorch_tanh")),
]


@pytest.mark.parametrize("name,kw", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_logits_match_hf(name, kw, record_property):
    model = hf_model(seed=1, **kw)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 97))
    _check(record_property, name, _forward(cfg, params, ids), hf_logits(model, ids))


def test_long_sequence_2048_large_rotary_angles(record_property):
    model = hf_model(seed=2, hidden=64, heads=2, rotary_pct=0.25)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 2048))
    _check(record_property, "seq2048", _forward(cfg, params, ids), hf_logits(model, ids))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(side, record_property):
    model = hf_model(seed=3, hidden=64, heads=4)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    rs = np.random.RandomState(2)
    S, lengths = 40, [40, 25, 7]
    ids = rs.randint(2, cfg.vocab_size, (3, S))
    mask = np.zeros((3, S), np.int64)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, S - n :] = 1
    ids = np.where(mask == 1, ids, 1)  # pad id 1 (<|padding|>)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # generation convention: positions count real tokens
    ref = hf_logits(model, ids, attention_mask=mask, position_ids=pos)
    ours = _forward(cfg, params, ids, padding_mask=jnp.asarray(mask), positions=jnp.asarray(pos))
    keep = mask.astype(bool)
    _check(record_property, f"padded-{side}", ours[keep], ref[keep])


def test_segment_ids_equal_separate_documents():
    """Packed documents with segment ids give each document's logits as if run alone (positions reset)."""
    model = hf_model(seed=4, hidden=64, heads=4)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    rs = np.random.RandomState(3)
    a, b = rs.randint(0, cfg.vocab_size, 13), rs.randint(0, cfg.vocab_size, 19)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 13 + [2] * 19])
    pos = np.array([list(range(13)) + list(range(19))])
    ours = _forward(cfg, params, packed, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
    ref = np.concatenate([hf_logits(model, a[None]), hf_logits(model, b[None])], axis=1)
    assert np.max(np.abs(ours - ref)) <= REL_TOL * np.max(np.abs(ref))


def test_bf16_compute_tolerance(record_property):
    """bf16 compute with fp32 params against the fp32 PyTorch reference: stated, measured bound."""
    model = hf_model(seed=5, hidden=128, heads=4, layers=4)
    cfg, params = ours_from_hf(model, compute_dtype="bfloat16")
    ids = np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 256))
    ours = _forward(cfg, params, ids)
    ref = hf_logits(model, ids)
    err = float(np.max(np.abs(ours - ref)))
    scale = float(np.max(np.abs(ref)))
    p_ref = torch.softmax(torch.tensor(ref), -1)
    kl = float(torch.sum(p_ref * (torch.log_softmax(torch.tensor(ref), -1) - torch.log_softmax(torch.tensor(ours), -1)), -1).mean())
    record_property("measured", f"bf16: max|dlogit| {err:.3e} ({err / scale:.2e} of max|logit| {scale:.2f}), mean KL {kl:.2e}")
    # Stated tolerance for bf16 compute: 3e-2 x max|logit| and mean KL < 1e-3 nats.
    assert err <= 3e-2 * scale
    assert kl < 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_inference_params_cast_what_the_forward_casts(tied):
    """`inference_params` stores in bf16 exactly the weights the forward casts to bf16 (kernels,
    linear biases, the embedding; LayerNorms stay float32), so the logits are the same bits as with
    the float32 parameters, and still within the bf16 tolerance of the PyTorch reference."""
    from neox_jax.quant import Int8, quantize_params
    from neox_jax.tree import flatten

    model = hf_model(seed=7, hidden=64, heads=4, layers=2, tied=tied)
    cfg, params = ours_from_hf(model, compute_dtype="bfloat16")
    lean = M.inference_params(cfg, params)
    for name, x in flatten(lean).items():
        want = "float32" if name.split("/")[-2] in ("ln_attn", "ln_mlp", "final_ln") else "bfloat16"
        assert x.dtype == want, (name, x.dtype)
    ids = np.random.RandomState(6).randint(0, cfg.vocab_size, (2, 40))
    ours = _forward(cfg, lean, ids)
    np.testing.assert_array_equal(ours, _forward(cfg, params, ids))
    ref = hf_logits(model, ids)
    assert np.max(np.abs(ours - ref)) <= 3e-2 * np.max(np.abs(ref))
    # float32 compute: nothing to cast; int8 weights pass through as they are
    f32 = cfg.replace(compute_dtype="float32")
    assert all(x.dtype == "float32" for x in flatten(M.inference_params(f32, params)).values())
    q = jax.jit(quantize_params)(params)
    q_lean = M.inference_params(cfg, q)
    assert isinstance(q_lean["layers"]["mlp"]["fc_in"]["kernel"], Int8)
    assert q_lean["layers"]["mlp"]["fc_in"]["kernel"].q.dtype == jnp.int8


def test_scan_unrolled_and_remat_agree():
    model = hf_model(seed=6, hidden=64, heads=4, layers=3)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    ids = jnp.asarray(np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 33)))

    def loss(p, c):
        return jnp.mean(M.token_logprobs(c, p, ids))

    base_val, base_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg)))(params)
    for variant in [dict(scan_layers=False), dict(remat="full"), dict(remat="dots"), dict(remat="save_proj")]:
        c = cfg.replace(**variant)
        val, grad = jax.jit(jax.value_and_grad(lambda p: loss(p, c)))(params)
        assert abs(float(val) - float(base_val)) < 1e-5, variant
        for g0, g1 in zip(jax.tree.leaves(base_grad), jax.tree.leaves(grad)):
            np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-4, atol=1e-6, err_msg=str(variant))


def test_rotary_fp16_tables_reproduce_neox_era_numerics():
    """rotary_dtype=float16 equals the 2022 NeoX computation done in torch fp16 (reference 1.7)."""
    cfg = load_config("configs/tiny.yaml").replace(rotary_dtype="float16", hidden_size=384, num_heads=4)
    R = cfg.rotary_dims  # 24, as in 20B
    S = 2048
    # NeoX RotaryEmbedding after module.half(): every tensor below is fp16.
    inv_freq = (1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))).half()
    t = torch.arange(S).type_as(inv_freq)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    ref_cos, ref_sin = emb.cos().float().numpy(), emb.sin().float().numpy()
    cos, sin = M.rotary_tables(jnp.arange(S)[None], cfg)
    # Equal up to the final fp16 rounding of cos/sin, where two libms may round a value that sits on
    # a rounding boundary differently: at most one fp16 ulp (2^-11 near 1), on a handful of entries.
    for ours, ref in ((np.asarray(cos[0]), ref_cos), (np.asarray(sin[0]), ref_sin)):
        diff = np.abs(ours - ref)
        assert diff.max() <= 2.0**-11
        assert np.mean(diff > 0) < 1e-3
    # ...and they really differ from the fp32 tables at large positions (gpt-neox #1003)
    cos32, _ = M.rotary_tables(jnp.arange(S)[None], cfg.replace(rotary_dtype="float32"))
    assert np.max(np.abs(np.asarray(cos32[0]) - ref_cos)) > 0.1


def test_rotary_tables_numpy_rederivation():
    cfg = load_config("configs/tiny.yaml").replace(hidden_size=128, num_heads=2, rotary_pct=0.25, rotary_emb_base=500.0)
    R = cfg.rotary_dims
    pos = np.arange(300)
    inv = 1.0 / (500.0 ** (np.arange(0, R, 2) / R))
    ang = np.concatenate([np.outer(pos, inv)] * 2, axis=1)
    cos, sin = M.rotary_tables(jnp.asarray(pos)[None], cfg)
    np.testing.assert_allclose(np.asarray(cos[0]), np.cos(ang), atol=2e-5)
    np.testing.assert_allclose(np.asarray(sin[0]), np.sin(ang), atol=2e-5)


def test_cudnn_backend_is_an_error_off_gpu():
    cfg = load_config("configs/tiny.yaml").replace(attention="cudnn", compute_dtype="bfloat16")
    params = M.init_params(cfg, 0)
    if jax.default_backend() == "gpu":
        pytest.fail("this test asserts CPU behaviour; run the GPU check in bench/ instead")
    with pytest.raises(UserError, match="cudnn needs an NVIDIA GPU"):
        M.forward(cfg, params, jnp.zeros((1, 8), jnp.int32))


def test_every_parameter_has_logical_axes():
    cfg = load_config("configs/tiny.yaml")
    axes = M.flatten(M.param_axes(cfg))
    shapes = M.flatten(M.abstract_params(cfg))
    assert set(axes) == set(shapes)
    for name, ax in axes.items():
        assert len(ax) == len(shapes[name].shape), name
        assert all(isinstance(a, str) for a in ax), name
    assert axes["layers/attn/qkv/kernel"] == ("layers", "embed", "qkv", "heads", "head_dim")
    assert axes["embed_in/embedding"] == ("vocab", "embed")


def test_chunked_target_logprobs_equal_full_softmax():
    cfg = load_config("tiny").replace(compute_dtype="float32")
    params = M.init_params(cfg, 1)
    toks = jnp.asarray(np.random.RandomState(6).randint(0, cfg.vocab_size, (2, 512)))
    h = M.hidden_states(cfg, params, toks)
    chunked = M.target_logprobs(cfg, params, h[:, :384], toks[:, 1:385], chunk=128)
    logits = np.asarray(M.logits_from_hidden(cfg, params, h), np.float64)[:, :384]
    ref = np.take_along_axis(logits, np.asarray(toks[:, 1:385])[..., None], -1)[..., 0] - np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(np.asarray(chunked), ref, atol=2e-5)


def neox_era_rotary(positions: torch.Tensor, R: int, base: float, dtype: torch.dtype):
    """cos/sin as GPT-NeoX's RotaryEmbedding computed them after DeepSpeed's module.half() (fp16 runs) or
    in the bf16 branch (reference 1.7, gpt-neox #1003): inv_freq buffer, positions and angles in the model
    dtype; the bf16 branch takes cos/sin of the bf16 angles in fp32 and rounds them back to bf16."""
    inv_freq = (1.0 / (base ** (torch.arange(0, R, 2).float() / R))).to(dtype)
    t = positions.to(dtype)
    freqs = torch.einsum("...i,j->...ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    if dtype == torch.bfloat16:
        emb = emb.float()
    return emb.cos().to(dtype).float(), emb.sin().to(dtype).float()


@pytest.mark.parametrize("rotary_dtype", ["float16", "bfloat16"])
def test_low_precision_rotary_in_a_full_forward_pass(rotary_dtype, record_property):
    """rotary_dtype float16/bfloat16 through the whole model (2048 positions, where the low-precision angles
    are far off) equals transformers running the same weights with its rotary tables replaced by the
    NeoX-era torch computation above; fp32 tables would not."""
    model = hf_model(seed=7, hidden=64, heads=2, rotary_pct=1.0, layers=2)  # every q/k dim rotated
    cfg, params = ours_from_hf(model, compute_dtype="float32", rotary_dtype=rotary_dtype)
    R, base = cfg.rotary_dims, cfg.rotary_emb_base
    ids = np.random.RandomState(8).randint(0, cfg.vocab_size, (1, 2048))
    fp32_ref = hf_logits(model, ids)
    rotary = model.gpt_neox.rotary_emb
    tdt = getattr(torch, rotary_dtype)
    rotary.forward = lambda x, position_ids: tuple(t.to(x.dtype) for t in neox_era_rotary(position_ids, R, base, tdt))
    try:
        ref = hf_logits(model, ids)
    finally:
        del rotary.forward
    ours = _forward(cfg, params, ids)
    scale = float(np.max(np.abs(ref)))
    # the tables matter at this length (measured: fp16 2.6e-3, bf16 2.6e-2 of max |logit|)
    assert float(np.max(np.abs(fp32_ref - ref))) > 10 * REL_TOL * scale
    _check(record_property, f"rotary {rotary_dtype} forward vs torch NeoX-era tables", ours, ref)


def _saved(fn, *args, capsys):
    from jax.ad_checkpoint import print_saved_residuals
    capsys.readouterr()
    print_saved_residuals(fn, *args)
    return capsys.readouterr().out.splitlines()


def test_no_remat_saves_no_float32_activations_per_layer(capsys):
    """Without remat, autodiff keeps per layer only bf16 [B, S, *] tensors plus float32 [B, S, 1]
    LayerNorm statistics (xla attention's float32 scores aside): before the written-out LayerNorm
    and GELU backward it kept six float32 [B, S, D] tensors and five bf16 [B, S, F] ones."""
    cfg = load_config("configs/tiny.yaml").replace(remat="none", compute_dtype="bfloat16", num_layers=2)
    params = jax.eval_shape(lambda: M.init_params(cfg))
    B, S, D, F = 2, 16, cfg.hidden_size, cfg.intermediate_size
    lines = _saved(lambda p: M.hidden_states(cfg, p, jnp.zeros((B, S), jnp.int32)).astype(jnp.float32).sum(),
                   params, capsys=capsys)
    stacked = [ln for ln in lines if "output of scan" in ln]
    f32_acts = [ln for ln in stacked if ln.startswith("f32") and f",{S},{D}]" in ln]
    assert stacked and not f32_acts, f32_acts
    wide = [ln for ln in stacked if ln.startswith("bf16") and ln.split()[0].endswith(f",{S},{F}]")]
    assert len(wide) == 2, wide  # the MLP input of GELU and its output (fc_out's input)


@pytest.fixture
def fake_cudnn(monkeypatch):
    """Let JAX *trace* cuDNN attention on a CPU (version checks answered; nothing is compiled)."""
    import jax._src.cudnn.fused_attention_stablehlo as fa
    monkeypatch.setattr(fa, "check_cudnn_version", lambda *a, **k: 91000)
    monkeypatch.setattr(fa, "check_is_flash_attention", lambda *a, **k: None)
    monkeypatch.setattr(fa, "check_compute_capability", lambda *a, **k: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    M.check_attention_policy.cache_clear()
    yield
    M.check_attention_policy.cache_clear()


@pytest.mark.parametrize("remat,saved", [("dots", False), ("dots_attn", True)])
def test_dots_attn_saves_the_cudnn_attention_forward(fake_cudnn, remat, saved, capsys):
    cfg = load_config("configs/tiny.yaml").replace(remat=remat, attention="cudnn", compute_dtype="bfloat16",
                                                   num_layers=2)
    params = jax.eval_shape(lambda: M.init_params(cfg))
    lines = _saved(lambda p: M.hidden_states(cfg, p, jnp.zeros((2, 128), jnp.int32)).astype(jnp.float32).sum(),
                   params, capsys=capsys)
    L, B, S, N, H = cfg.num_layers, 2, 128, cfg.num_heads, cfg.head_dim
    # inside the layer scan JAX reports the residuals as scan outputs: recognise them by shape
    stats, out = f"f32[{L},{B},{N},{S}] output of scan", f"bf16[{L},{B},{S},{N},{H}] output of scan"
    hits = [ln for ln in lines if ln.startswith((stats, out))]
    assert len(hits) == (2 if saved else 0), lines


def test_dots_attn_fails_loudly_when_jax_renames_the_primitive(fake_cudnn, monkeypatch):
    monkeypatch.setattr(M, "_CUDNN_ATTENTION_FWD", frozenset({"some_other_name"}))
    with pytest.raises(UserError, match="dots_attn: jax .* does not name cuDNN attention"):
        M.check_attention_policy()


def test_dots_attn_needs_cudnn_attention():
    from neox_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="dots_attn .* needs attention cudnn"):
        load_config("configs/tiny.yaml").replace(remat="dots_attn")


def test_layer_norm_backward_traced_for_a_gpu_reads_the_saved_statistics():
    """Traced for a GPU (`compiling_for("gpu")`, as `plan --target` and bench/gpu_aot.py trace), the
    LayerNorm backward puts its saved mean and 1/std behind an optimization barrier (XLA's GPU fusion
    otherwise recomputes them and writes the scale gradient's product out; bench/throughput_notes.md,
    lever 15); for the CPU it does not.  The gradients are the same either way (run here on CPU)."""
    rs = np.random.RandomState(8)
    x = jnp.asarray(rs.randn(4, 16, 32).astype(np.float32) * 3 + 1)
    p = {"scale": jnp.asarray(rs.randn(32).astype(np.float32)), "bias": jnp.asarray(rs.randn(32).astype(np.float32))}
    g = jnp.asarray(rs.randn(4, 16, 32).astype(np.float32))

    def grads(x, p):
        return jax.vjp(lambda x, p: M.layer_norm(x, p, 1e-5, jnp.float32), x, p)[1](g)

    jitted = jax.jit(grads)  # one function for both: the target is part of JAX's trace cache key

    def traced():
        return str(jitted.trace(x, p).jaxpr), jitted.lower(x, p).compile()(x, p)

    cpu_jaxpr, cpu = traced()
    with M.compiling_for("gpu"):
        gpu_jaxpr, gpu = traced()
        assert "optimization_barrier" in str(jax.make_jaxpr(grads)(x, p))
    assert "optimization_barrier" not in traced()[0]  # and back
    assert "optimization_barrier" in gpu_jaxpr and "optimization_barrier" not in cpu_jaxpr
    for a, b in zip(jax.tree.leaves(cpu), jax.tree.leaves(gpu)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("wide,bias_grad", [(False, "fused"), (True, "fused"), (False, "separate"),
                                            (True, "separate")])
def test_fp32_allreduce_keeps_weight_and_bias_gradients_in_float32(wide, bias_grad):
    """bf16 compute: the input gradient is rounded to bf16 either way; with `fp32_allreduce` the kernel
    and bias gradients are the float32 sums of the bf16 products (NumPy float64 re-derivation),
    without it they are those sums rounded to bf16 (what the partitioner then reduces across devices).
    `bias_grad: separate` sums the bias gradient in float32 in either case, behind an optimization
    barrier (in the jitted gradient's HLO: one per dense layer)."""
    cfg = load_config("configs/tiny.yaml").replace(compute_dtype="bfloat16", fp32_allreduce=wide,
                                                   bias_grad=bias_grad)
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(4, 64, 8), jnp.bfloat16)
    p = {"kernel": jnp.asarray(rs.randn(8, 3, 2, 4).astype(np.float32)),
         "bias": jnp.asarray(rs.randn(3, 2, 4).astype(np.float32))}
    g = jnp.asarray(rs.randn(4, 64, 3, 2, 4), jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, q: M.dense(cfg, "bsd,dknh->bsknh", a, q), x, p)
    dx, dp = vjp(g)
    assert out.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dp["kernel"].dtype == jnp.float32
    xf, gf = np.asarray(x, np.float64), np.asarray(g, np.float64)
    wf = np.asarray(p["kernel"].astype(jnp.bfloat16), np.float64)
    dw_ref, db_ref = np.einsum("bsd,bsknh->dknh", xf, gf), gf.sum(axis=(0, 1))
    rnd = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)  # noqa: E731
    np.testing.assert_allclose(np.asarray(dx, np.float64), rnd(np.einsum("bsknh,dknh->bsd", gf, wf)), rtol=1e-2, atol=1e-2)
    dw, db = np.asarray(dp["kernel"], np.float64), np.asarray(dp["bias"], np.float64)
    if wide:
        np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)
    else:  # rounded to bf16: visibly off the float32 sums
        np.testing.assert_allclose(dw, rnd(dw_ref), rtol=1e-2, atol=1e-1)
        assert np.max(np.abs(dw - dw_ref)) > 1e-3
    if wide or bias_grad == "separate":
        np.testing.assert_allclose(db, db_ref, rtol=1e-5, atol=1e-4)
    else:  # summed in bf16 (on CPU the partial sums too: up to 6% off here, not one rounding of the sum)
        np.testing.assert_allclose(db, db_ref, rtol=0.1, atol=0.5)
        assert np.max(np.abs(db - db_ref)) > 1e-3
    grad = jax.jit(jax.grad(lambda a, q: M.dense(cfg, "bsd,dknh->bsknh", a, q).astype(jnp.float32).sum(), (0, 1)))
    hlo = grad.lower(x, p).as_text()
    assert hlo.count("optimization_barrier") == (bias_grad == "separate"), hlo.count("optimization_barrier")
