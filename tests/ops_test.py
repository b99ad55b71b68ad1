"""neox_jax/ops.py: each hand-written backward against PyTorch autograd or a NumPy float64
re-derivation of the derivative, and each forward against the formula it implements."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from neox_jax import ops


def _bf16_round(x):
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))


def test_gelu_tanh_uses_neox_constants():
    x = np.linspace(-6, 6, 1001).astype(np.float32)
    ref = 0.5 * x * (1.0 + np.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))
    np.testing.assert_allclose(np.asarray(ops.gelu(jnp.asarray(x), "gelu_tanh")), ref, atol=1e-6)
    erf = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(np.asarray(ops.gelu(jnp.asarray(x), "gelu")), erf, atol=1e-6)


def test_target_logit_lse_gradient_is_the_softmax_and_onehot_in_float64():
    """The cross-entropy's own backward (`target_logit_lse`, one elementwise pass) against the float64
    derivative written out: d/dx [a·x[t] + b·logsumexp(x)] = b·softmax(x) + a·onehot(t).  Logits of
    up to ±100 (float32 exp overflows above 88.7 unless shifted), one of them a row's target; targets
    at the vocabulary's first and last index."""
    rs = np.random.RandomState(11)
    B, S, V = 3, 7, 61
    x = (rs.randn(B, S, V) * 30).astype(np.float32)
    t = rs.randint(0, V, (B, S)).astype(np.int32)
    t[0, 0], t[0, 1] = 0, V - 1
    x[1, 2, t[1, 2]], x[2, 3, 5] = 100.0, -100.0
    a, b = rs.randn(B, S).astype(np.float32), rs.randn(B, S).astype(np.float32)

    def f(x):
        tgt, lse = ops.target_logit_lse(x, jnp.asarray(t))
        return jnp.sum(a * tgt + b * lse)

    grad = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(x)))
    x64 = x.astype(np.float64)
    lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1)
    ref = b[..., None] * np.exp(x64 - lse[..., None]) + a[..., None] * (np.arange(V) == t[..., None])
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-6)
    tgt, out_lse = jax.jit(ops.target_logit_lse)(jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(tgt), np.take_along_axis(x, t[..., None], -1)[..., 0])
    np.testing.assert_allclose(np.asarray(out_lse), lse, rtol=1e-6)


@pytest.mark.parametrize("dtype,tol", [("float32", 5e-6), ("bfloat16", 1e-2)])
def test_layer_norm_and_gelu_gradients_match_torch(dtype, tol, record_property):
    """The written-out backward of LayerNorm and both GELUs against PyTorch autograd in float64."""
    rs = np.random.RandomState(0)
    x = (3.0 * rs.randn(4, 5, 64) + 1.0).astype(np.float32)
    g = rs.randn(4, 5, 64).astype(np.float32)
    scale, bias = (1 + 0.3 * rs.randn(64)).astype(np.float32), (0.2 * rs.randn(64)).astype(np.float32)
    dt = jnp.dtype(dtype)
    xq, gq = (np.asarray(jnp.asarray(a, dt).astype(jnp.float32)) for a in (x, g))  # what both sides see

    def ours(fn, *args):
        _, vjp = jax.vjp(fn, jnp.asarray(xq, dt), *args)
        return jax.tree.map(lambda a: np.asarray(a, np.float64), vjp(jnp.asarray(gq, dt)))

    def theirs(fn, *args):
        ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (xq, *args)]
        fn(*ts).backward(torch.tensor(gq, dtype=torch.float64))
        return [t.grad.numpy() for t in ts]

    worst = 0.0
    p = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    (dx, dp), ref = ours(lambda a, q: ops.layer_norm(a, q, 1e-5, dt), p), theirs(
        lambda a, s, b: torch.nn.functional.layer_norm(a, (64,), s, b, 1e-5), scale, bias)
    for got, want in [(dx, ref[0]), (np.asarray(dp["scale"]), ref[1]), (np.asarray(dp["bias"]), ref[2])]:
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        worst = max(worst, err)
        assert err <= tol, err
    for kind, approx in [("gelu", "none"), ("gelu_tanh", "tanh")]:
        (dx,), (want,) = ours(lambda a: ops.gelu(a, kind)), theirs(lambda a: torch.nn.functional.gelu(a, approximate=approx))
        err = float(np.max(np.abs(dx - want)) / np.max(np.abs(want)))
        worst = max(worst, err)
        assert err <= tol, (kind, err)
    record_property("measured", f"{dtype}: worst relative gradient error {worst:.2e} (tolerance {tol})")


def test_embedding_gradient_of_repeated_tokens_is_summed_in_float32():
    """bf16 compute: the embedding rows are looked up in bf16, but a token's gradient over its 4096
    occurrences is summed in float32 (NumPy float64 re-derivation of the same bf16 cotangents); a bf16
    sum would be off by ~1e-2 relative."""
    rs = np.random.RandomState(0)
    table = jnp.asarray(rs.randn(16, 8).astype(np.float32))
    tokens = jnp.asarray(np.where(rs.rand(4, 1024) < 0.9, 3, rs.randint(0, 16, (4, 1024))).astype(np.int32))
    g = jnp.asarray(rs.randn(4, 1024, 8).astype(np.float32) + 1.0).astype(jnp.bfloat16)
    rows, vjp = jax.vjp(lambda t: ops.embed_lookup(t, tokens, jnp.bfloat16), table)
    assert rows.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(rows, np.float32), np.asarray(table.astype(jnp.bfloat16), np.float32)[np.asarray(tokens)])
    (dt,) = vjp(g)
    assert dt.dtype == jnp.float32
    want = np.zeros((16, 8))
    np.add.at(want, np.asarray(tokens), np.asarray(g, np.float64))
    np.testing.assert_allclose(np.asarray(dt, np.float64), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_float32_output_matmul_backward_runs_in_operand_dtype(dtype):
    """`einsum_f32_out` (the logits head, XLA attention scores): forward accumulated in float32;
    backward = the cotangent rounded to the operands' dtype, then the two transposed matmuls rounded to
    that dtype (PyTorch autocast's bf16 logits gradient).  Re-derived in NumPy float64."""
    rs = np.random.RandomState(0)
    h32, w32, g = rs.randn(2, 5, 16), rs.randn(16, 24), rs.randn(2, 5, 24)
    h, w = jnp.asarray(h32, dtype), jnp.asarray(w32, dtype)
    out, vjp = jax.vjp(lambda a, b: ops.einsum_f32_out("bsd,dv->bsv", a, b, jax.lax.Precision.HIGHEST), h, w)
    dh, dw = vjp(jnp.asarray(g, jnp.float32))
    assert out.dtype == jnp.float32 and dh.dtype == h.dtype and dw.dtype == w.dtype
    hf, wf = np.asarray(h, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(out), np.einsum("bsd,dv->bsv", hf, wf), rtol=1e-5, atol=1e-5)
    gq = g if dtype == "float32" else _bf16_round(g)
    rnd = (lambda x: x) if dtype == "float32" else _bf16_round
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=8e-3, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dh, np.float64), rnd(np.einsum("bsv,dv->bsd", gq, wf)), **tol)
    np.testing.assert_allclose(np.asarray(dw, np.float64), rnd(np.einsum("bsd,bsv->dv", hf, gq)), **tol)
