"""The custom-gradient operations the model is built from: each one's forward is the plain formula,
and its backward is written out to choose what autodiff saves, in which dtype gradients travel, or
which kernels XLA may fuse.  Every choice is explained where it is made, with the measurement that
motivated it (bench/throughput_notes.md).  The model (model.py) picks among them by its config; these
functions take no config, only arrays, dtypes and logical axes.

  layer_norm          float32 statistics; saves only x, mean and 1/std
  gelu                exact or tanh; saves only x
  einsum_f32_out      float32 accumulation and output, backward in the operands' dtype
  add_bias            the bias gradient by a reduction of its own (`bias_grad: separate`)
  dense_wide_grads    matmul + bias whose weight and bias gradients stay float32 (`fp32_allreduce`)
  head_wide_grads     the vocab head's matmul, likewise
  cast_on_shards      a dtype cast done on a weight's own shards, so FSDP gathers the cast bytes
  embed_lookup        embedding rows whose gradient is summed in the table's dtype
  target_logit_lse    (logits[target], logsumexp) with a one-pass backward (the cross-entropy)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .sharding import constrain


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _layer_norm(x, p, eps: float, dtype, keep_stats: bool):
    return _layer_norm_fwd(x, p, eps, dtype, keep_stats)[0]


def _layer_norm_fwd(x, p, eps, dtype, keep_stats):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    y = (x32 - mean) * rstd
    out = (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(dtype)
    return out, (x, mean, rstd, p)


def _layer_norm_bwd(eps, dtype, keep_stats, res, g):
    x, mean, rstd, p = res
    if keep_stats:
        # The saved statistics, not recomputed: without the barrier XLA's GPU fusion recomputes mean
        # and 1/std from x inside the backward's kernels, and a kernel holding that row reduction
        # cannot be fused into the scale gradient's column sum, so g·normalised(x) was written out in
        # float32 and read back (pythia-1.4b at micro-batch 24: 49 such kernels, 8.2 ms of H200
        # traffic a step).  On the CPU backend the recomputing fusion is the faster one (the demo's
        # pythia-14m step ran 7% slower with the barrier), so only programs traced for a GPU get it
        # (model.layer_norm sets keep_stats).
        mean, rstd = jax.lax.optimization_barrier((mean, rstd))
    y = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    lead = tuple(range(g.ndim - 1))
    d_scale = jnp.sum(g * y, axis=lead).astype(p["scale"].dtype)
    d_bias = jnp.sum(g, axis=lead).astype(p["bias"].dtype)
    dy = g * p["scale"].astype(jnp.float32)
    dx = rstd * (dy - jnp.mean(dy, axis=-1, keepdims=True) - y * jnp.mean(dy * y, axis=-1, keepdims=True))
    return dx.astype(x.dtype), {"scale": d_scale, "bias": d_bias}


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: Float[Array, "... D"], p, eps: float, dtype,
               keep_stats: bool = False) -> Float[Array, "... D"]:
    """LayerNorm of x with p {"scale", "bias"} [D], statistics in float32; output in `dtype`.

    The backward is written out (as Apex's and PyTorch's fused LayerNorm kernels do) so that autodiff
    saves only the input and the float32 mean and 1/std per position: plain autodiff of the float32
    formula keeps three float32 [..., D] intermediates per LayerNorm, 12 bytes per element, which
    made `remat: none` hold about 20 GB more than needed for pythia-1.4b at 8 x 2048 tokens.
    keep_stats: the backward reads the saved statistics behind an optimization barrier instead of
    letting XLA recompute them (faster on GPUs, slower on the CPU backend; see `_layer_norm_bwd`)."""
    return _layer_norm(x, {"scale": p["scale"], "bias": p["bias"]}, eps, dtype, keep_stats)


_GELU_C = math.sqrt(2.0 / math.pi)  # 0.7978845608...


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x, kind: str):
    """GELU ("gelu": exact erf form; "gelu_fast"/"gelu_new"/tanh kinds: NeoX's bias_gelu
    0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2))), i.e. HF gelu_fast / gelu_new).

    The derivative is written out and evaluated in float32 from the input alone, so autodiff saves
    only x: plain autodiff of the tanh form keeps about five [..., F] intermediates per layer."""
    if kind == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x, kind):
    return gelu(x, kind), x


def _gelu_bwd(kind, x, g):
    x32 = x.astype(jnp.float32)
    if kind == "gelu":
        cdf = 0.5 * (1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0))))
        d = cdf + x32 * jnp.exp(-0.5 * x32 * x32) * (1.0 / math.sqrt(2.0 * math.pi))
    else:
        t = jnp.tanh(_GELU_C * (x32 + 0.044715 * x32 * x32 * x32))
        d = 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * 0.044715 * x32 * x32)
    return ((g.astype(jnp.float32) * d).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def einsum_f32_out(spec: str, a: Array, b: Array, precision=None) -> Float[Array, "..."]:
    """`einsum(spec, a, b)` accumulated and returned in float32, whose backward runs in the operands'
    dtype.

    Plain autodiff of an einsum with `preferred_element_type=float32` transposes with the float32
    cotangent, so a bf16 model's two backward matmuls become float32 (TF32) GEMMs: for the 50k-vocab
    head of pythia-1.4b that was 22 ms of a 317 ms step on an H200 (bench/throughput_notes.md).  Here
    the cotangent is cast to the operands' dtype first, as PyTorch autocast does (its logits and their
    gradient are bf16), and the backward GEMMs accumulate in float32 and round to that dtype like
    every other matmul of the model.  Float32 operands take the exact float32 path."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=precision)


def _einsum_f32_out_fwd(spec, a, b, precision):
    return einsum_f32_out(spec, a, b, precision), (a, b)


def _einsum_f32_out_bwd(spec, precision, res, g):
    a, b = res
    dtype = jnp.result_type(a, b)
    if dtype == jnp.float32:
        _, vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32,
                                                   precision=precision), a, b)
        return vjp(g)
    _, vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y, precision=precision), a, b)
    return vjp(g.astype(dtype))


einsum_f32_out.defvjp(_einsum_f32_out_fwd, _einsum_f32_out_bwd)

def _bias_sum(g: Array, lead: int) -> Array:
    """The bias gradient: `g` summed over its `lead` leading dims in float32, by its own reduction
    (the optimization barrier keeps XLA from fusing the sum into the kernel that produces g)."""
    return jnp.sum(jax.lax.optimization_barrier(g), axis=tuple(range(lead)), dtype=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def add_bias(lead: int, y: Array, b: Array) -> Array:
    return y + b.astype(y.dtype)


def _add_bias_fwd(lead, y, b):
    return add_bias(lead, y, b), jnp.zeros((), b.dtype)


def _add_bias_bwd(lead, b_like, g):
    return g, _bias_sum(g, lead).astype(b_like.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def dense_wide_grads(spec, dtype, precision, separate, x, w, b):
    return _dense_wide_grads_fwd(spec, dtype, precision, separate, x, w, b)[0]


def _dense_wide_grads_fwd(spec, dtype, precision, separate, x, w, b):
    wc = w.astype(dtype)
    out = jnp.einsum(spec, x, wc, precision=precision) + b.astype(dtype)
    return out, (x, wc, jnp.zeros((), w.dtype), jnp.zeros((), b.dtype))


def _wide_backward(spec: str, precision, x, wc, g):
    """(dx in the compute dtype, dw in float32) of `einsum(spec, x, wc)` for a compute-dtype cotangent."""
    inputs, out_spec = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    dx = jnp.einsum(f"{out_spec},{w_spec}->{x_spec}", g, wc, precision=precision)
    dw = jnp.einsum(f"{x_spec},{out_spec}->{w_spec}", x, g, precision=precision, preferred_element_type=jnp.float32)
    return dx, dw


def _dense_wide_grads_bwd(spec, dtype, precision, separate, res, g):
    x, wc, w_like, b_like = res
    dx, dw = _wide_backward(spec, precision, x, wc, g)
    inputs, out_spec = spec.split("->")
    lead = sum(c in inputs.split(",")[0] for c in out_spec)  # output dims from x; the bias covers the rest
    db = _bias_sum(g, lead) if separate else jnp.sum(g.astype(jnp.float32), axis=tuple(range(lead)))
    return dx.astype(x.dtype), dw.astype(w_like.dtype), db.astype(b_like.dtype)


dense_wide_grads.defvjp(_dense_wide_grads_fwd, _dense_wide_grads_bwd)

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def head_wide_grads(spec, dtype, precision, axes, h, w):
    return _head_wide_fwd(spec, dtype, precision, axes, h, w)[0]


def _head_wide_fwd(spec, dtype, precision, axes, h, w):
    wc = cast_on_shards(w, dtype, axes)
    out = jnp.einsum(spec, h, wc, precision=precision, preferred_element_type=jnp.float32)
    return out, (h, wc, jnp.zeros((), w.dtype))


def _head_wide_bwd(spec, dtype, precision, axes, res, g):
    h, wc, w_like = res
    dh, dw = _wide_backward(spec, precision, h, wc, g.astype(dtype))
    return dh.astype(h.dtype), _on_shards(dw.astype(w_like.dtype), axes)


head_wide_grads.defvjp(_head_wide_fwd, _head_wide_bwd)

def _on_shards(x, axes: tuple | None):
    return x if axes is None else constrain(x, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def cast_on_shards(w, dtype, axes: tuple | None):
    """`w.astype(dtype)` computed on w's own shards (constrained to its logical `axes`), so whatever
    gathers it afterwards (FSDP) moves `dtype` bytes.  The gradient comes back in w's dtype on the
    same shards.

    The model casts each weight where it is used.  For the layer weights XLA's SPMD partitioner
    already gathers the cast bf16 shards inside the layer loop; for the weights used outside the
    loop (the vocab head, the embedding table) it gathered float32 shards and cast afterwards: the
    only float32 all-gathers of a bf16 step (read in the module right after SPMD partitioning; the
    CPU backend then widens every bf16 collective to float32 anyway, which `neox-jax plan` undoes).
    Casting the layer weights this way too would be wrong: XLA then computes all the casts before
    the loop, a bf16 copy of every layer's shard (+3.5 GiB per device for neox-20b on 8 x 8 x 1).
    `axes` None (inside a shard_map, on a local block): a plain cast."""
    return _on_shards(w.astype(dtype), axes)


def _cast_on_shards_fwd(w, dtype, axes):
    return cast_on_shards(w, dtype, axes), jnp.zeros((), w.dtype)


def _cast_on_shards_bwd(dtype, axes, like, g):
    return (_on_shards(g.astype(like.dtype), axes),)


cast_on_shards.defvjp(_cast_on_shards_fwd, _cast_on_shards_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_lookup(table: Float[Array, "V D"], tokens: Int[Array, "B S"], dtype) -> Float[Array, "B S D"]:
    """Rows of the embedding table in the compute dtype.  Forward: the table is cast on its own
    shards, its `embed` (fsdp) shards gathered in that dtype, then rows taken.  Backward: the rows'
    gradients are summed into a zero table of the table's dtype (float32 for training): a token that
    occurs thousands of times in a batch would otherwise have its gradient summed in bf16."""
    return _embed_lookup_fwd(table, tokens, dtype)[0]


def _embed_lookup_fwd(table, tokens, dtype):
    rows = cast_on_shards(table, dtype, ("vocab", "embed"))
    # Gather the `embed` (fsdp) shards first, so the lookup is a gather from a table split only by
    # vocabulary rows; XLA then partitions it as a masked local lookup plus one reduction over
    # `tensor` (without this, some meshes replicate the [B, S, D] result: "involuntary full
    # rematerialization", e.g. mesh (2, 2, 2) at B 8, S 32).
    rows = constrain(rows, ("vocab", None))
    return jnp.take(rows, tokens, axis=0), (tokens, jnp.zeros((0,) + table.shape, table.dtype))


def _embed_lookup_bwd(dtype, res, g):
    tokens, like = res
    V, D = like.shape[1:]
    grad = jnp.zeros((V, D), like.dtype).at[tokens].add(g.astype(like.dtype))
    return constrain(grad, ("vocab", "embed")), None


embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)

@jax.custom_vjp
def target_logit_lse(
    logits: Float[Array, "B S V"], targets: Int[Array, "B S"]
) -> tuple[Float[Array, "B S"], Float[Array, "B S"]]:
    """(logits[target], logsumexp(logits)) over the vocabulary, with the gradient in one elementwise
    pass: d logits = g_lse · exp(logits − lse) + g_target · onehot(target).

    Autodiff of `take_along_axis` and `logsumexp` compiles to five kernels over the float32
    [B, S, V] logits in the backward (the softmax product, a scatter of the target's gradient into
    zeros, two reductions of that sum, the cast to the head's compute dtype): for pythia-1.4b at
    micro-batch 24, 12.5 ms a step at an H200's bandwidth (bench/gpu_aot.py).  This backward reads
    the logits once and XLA fuses the head's cast into it.  Targets must index the vocabulary
    (0 <= t < V).  `train.step`'s vocabulary-parallel form shares the backward."""
    return _target_logit_lse_fwd(logits, targets)[0]


def _target_logit_lse_fwd(logits, targets):
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(logits, axis=-1)
    return (tgt, lse), (logits, targets, lse)


def target_logit_lse_bwd(res, g):
    """d logits from the residuals (logits, targets, lse) and the cotangents of (target logit, lse);
    a target outside [0, V) matches no column (the vocabulary-parallel shards)."""
    logits, targets, lse = res
    g_tgt, g_lse = g
    vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    d = g_lse[..., None] * jnp.exp(logits - lse[..., None])
    d = d + jnp.where(vocab == targets[..., None], g_tgt[..., None], 0.0)
    return d.astype(logits.dtype), None


target_logit_lse.defvjp(_target_logit_lse_fwd, target_logit_lse_bwd)
