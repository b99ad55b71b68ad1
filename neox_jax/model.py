"""GPT-NeoX (20B, Pythia) in Flax NNX.

Dimension letters used in shapes:
  B batch   S query positions   T key positions   D hidden   N heads   H head_dim
  F MLP width   V padded vocab   L layers   R rotary dims (first R of each head's H)

Parameter tree (`docs/params.md` is the table; checkpoints and converters write exactly this):
  embed_in/embedding                [V, D]
  layers/ln_attn/{scale,bias}       [L, D]           LN1, input of attention ("input_layernorm")
  layers/ln_mlp/{scale,bias}        [L, D]           LN2, input of the MLP ("post_attention_layernorm")
  layers/attn/qkv/kernel            [L, D, 3, N, H]  q, k, v projections fused; bias [L, 3, N, H]
  layers/attn/out/kernel            [L, N, H, D]     bias [L, D]
  layers/mlp/fc_in/kernel           [L, D, F]        bias [L, F]
  layers/mlp/fc_out/kernel          [L, F, D]        bias [L, D]
  final_ln/{scale,bias}             [D]
  embed_out/kernel                  [D, V]           absent when tie_word_embeddings

Layers are stored stacked (leading L) and run with `jax.lax.scan` (or a Python loop when
`scan_layers` is false), so compile time does not grow with depth.  The NNX modules below only
create and hold parameters (with logical axis names as metadata); the math lives in pure functions
(`forward`, `block`, `attention`, ...) that take the plain parameter dict, which is what
checkpoints, converters and the train step pass around.  The operations with hand-written gradients
they are built from (LayerNorm, GELU, the float32-output einsum, the cross-entropy's pieces) are in
ops.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from .config import FLOAT_DTYPES, ModelConfig
from .errors import UserError
from . import ops
from .ops import (add_bias, cast_on_shards, dense_wide_grads, einsum_f32_out, embed_lookup, gelu,
                  head_wide_grads, target_logit_lse)
from .quant import Int8, weight
from .sharding import constrain, tree_shardings
from .tree import count_params, flatten, unflatten  # noqa: F401  (re-exported for callers)


Params = dict[str, Any]
DTYPES = {name: jnp.dtype(name) for name in FLOAT_DTYPES}


# ----------------------------------------------------------------------------- parameters


def _normal(key, shape, dtype, std: float):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _param(value, axes: tuple[str, ...]) -> nnx.Param:
    assert value.ndim == len(axes), (value.shape, axes)
    return nnx.Param(value, logical_axes=axes)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, stack: tuple[int, ...], dtype):
        lead = ("layers",) * len(stack)
        self.scale = _param(jnp.ones(stack + (dim,), dtype), lead + ("embed_vec",))
        self.bias = _param(jnp.zeros(stack + (dim,), dtype), lead + ("embed_vec",))


class Linear(nnx.Module):
    """A kernel of any rank (contracting dims first) plus a bias over the output dims."""

    def __init__(self, key, kernel_shape, kernel_axes, bias_shape, bias_axes, *, std: float, dtype):
        self.kernel = _param(_normal(key, kernel_shape, dtype, std), kernel_axes)
        self.bias = _param(jnp.zeros(bias_shape, dtype), bias_axes)


class Embed(nnx.Module):
    def __init__(self, key, vocab: int, dim: int, *, std: float, dtype):
        self.embedding = _param(_normal(key, (vocab, dim), dtype, std), ("vocab", "embed"))


class Head(nnx.Module):
    """Untied output projection (GPT-NeoX `embed_out` / `final_linear`), no bias."""

    def __init__(self, key, dim: int, vocab: int, *, std: float, dtype):
        self.kernel = _param(_normal(key, (dim, vocab), dtype, std), ("embed", "vocab"))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, key, *, std_in: float, std_out: float, dtype):
        L, D, N, H = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim
        k1, k2 = jax.random.split(key)
        self.qkv = Linear(k1, (L, D, 3, N, H), ("layers", "embed", "qkv", "heads", "head_dim"),
                          (L, 3, N, H), ("layers", "qkv", "heads", "head_dim"), std=std_in, dtype=dtype)
        self.out = Linear(k2, (L, N, H, D), ("layers", "heads", "head_dim", "embed"),
                          (L, D), ("layers", "embed_vec"), std=std_out, dtype=dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, key, *, std_in: float, std_out: float, dtype):
        L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        k1, k2 = jax.random.split(key)
        self.fc_in = Linear(k1, (L, D, F), ("layers", "embed", "mlp"), (L, F), ("layers", "mlp"),
                            std=std_in, dtype=dtype)
        self.fc_out = Linear(k2, (L, F, D), ("layers", "mlp", "embed"), (L, D), ("layers", "embed_vec"),
                             std=std_out, dtype=dtype)


class Blocks(nnx.Module):
    """All L transformer blocks, parameters stacked along a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, key, *, std_in: float, std_out: float, dtype):
        k1, k2 = jax.random.split(key)
        stack = (cfg.num_layers,)
        self.ln_attn = LayerNorm(cfg.hidden_size, stack=stack, dtype=dtype)
        self.ln_mlp = LayerNorm(cfg.hidden_size, stack=stack, dtype=dtype)
        self.attn = Attention(cfg, k1, std_in=std_in, std_out=std_out, dtype=dtype)
        self.mlp = MLP(cfg, k2, std_in=std_in, std_out=std_out, dtype=dtype)


def init_stds(cfg: ModelConfig) -> tuple[float, float]:
    """(std of input-side matrices, std of output projections) for the configured scheme.

    small_wang: small_init sqrt(2 / 5D) and wang_init 2 / (L sqrt D)   (Pythia <= 2.8B, 20B)
    normal:     normal(init_std) and scaled_normal init_std / sqrt(2L)  (Pythia 6.9B, 12B)"""
    D, L = cfg.hidden_size, cfg.num_layers
    if cfg.init == "small_wang":
        return math.sqrt(2.0 / (5.0 * D)), 2.0 / (L * math.sqrt(D))
    return cfg.init_std, cfg.init_std / math.sqrt(2.0 * L)


class GPTNeoX(nnx.Module):
    """GPT-NeoX causal LM.  `model(tokens)` returns float32 logits [B, S, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype = DTYPES[cfg.param_dtype]
        std_in, std_out = init_stds(cfg)
        k_emb, k_layers, k_out = jax.random.split(rngs.params(), 3)
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed_in = Embed(k_emb, V, D, std=std_in, dtype=dtype)
        self.layers = Blocks(cfg, k_layers, std_in=std_in, std_out=std_out, dtype=dtype)
        self.final_ln = LayerNorm(D, stack=(), dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.embed_out = Head(k_out, D, V, std=std_in, dtype=dtype)

    def params(self) -> Params:
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, tokens, **kwargs):
        return forward(self.config, self.params(), tokens, **kwargs)


# ----------------------------------------------------------------------------- pure tree helpers


def init_params(cfg: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> Params:
    """Random parameters as a plain nested dict (see the module docstring for the tree).

    With a mesh, every tensor is created already sharded (the init is jitted with out_shardings
    from the logical-axis rules), so no host or device ever holds the whole model.  The init is
    always jitted, so a seed gives bit-identical weights on any mesh."""
    shardings = None if mesh is None else tree_shardings(param_axes(cfg), mesh, abstract_params(cfg))
    return jax.jit(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(seed)).params(), out_shardings=shardings)()


def abstract_params(cfg: ModelConfig) -> Params:
    """ShapeDtypeStruct tree of the parameters, without allocating (works for 20B)."""
    model = nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(0)))
    return jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    )


def param_axes(cfg: ModelConfig) -> Params:
    """Tree of logical axis-name tuples, same structure as the parameters."""
    model = nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return unflatten({"/".join(map(str, path)): v.get_metadata()["logical_axes"] for path, v in flat})


# ----------------------------------------------------------------------------- math



def layer_norm(x: Float[Array, "... D"], p: Params, eps: float, dtype) -> Float[Array, "... D"]:
    """`ops.layer_norm`, keeping its saved statistics behind a barrier in programs traced for a GPU."""
    return ops.layer_norm(x, p, eps, dtype, keep_stats=target_backend() == "gpu")



def rotary_tables(
    positions: Int[Array, "B S"], cfg: ModelConfig
) -> tuple[Float[Array, "B S R"], Float[Array, "B S R"]]:
    """cos/sin tables (float32 values) for rotate-half RoPE over the first R dims of each head.

    inv_freq[i] = base^(-2i/R) (denominator R = rotary dims, not head_dim).  With rotary_dtype
    float16/bfloat16 the NeoX-era tables are reproduced: inv_freq, positions and angles rounded to
    that dtype before cos/sin, and cos/sin rounded again (reference 1.7)."""
    R = cfg.rotary_dims
    inv = 1.0 / (cfg.rotary_emb_base ** (jnp.arange(0, R, 2, dtype=jnp.float32) / R))
    t = positions.astype(jnp.float32)
    if cfg.rotary_dtype == "float32":
        ang = t[..., None] * inv
        ang = jnp.concatenate([ang, ang], axis=-1)
        return jnp.cos(ang), jnp.sin(ang)
    low = DTYPES[cfg.rotary_dtype]
    inv = inv.astype(low).astype(jnp.float32)
    t = t.astype(low).astype(jnp.float32)
    ang = (t[..., None] * inv).astype(low).astype(jnp.float32)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang).astype(low).astype(jnp.float32), jnp.sin(ang).astype(low).astype(jnp.float32)


def apply_rotary(x: Float[Array, "B S N H"], cos: Float[Array, "B S R"], sin: Float[Array, "B S R"]):
    R = cos.shape[-1]
    rot, rest = x[..., :R].astype(jnp.float32), x[..., R:]
    half = R // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)


def attention_mask(
    S: int,
    T: int,
    *,
    padding_mask: Bool[Array, "B T"] | None = None,
    segment_ids: Int[Array, "B S"] | None = None,
    q_offset: int | jax.Array = 0,
) -> Bool[Array, "B 1 S T"]:
    """True where query s may attend key t: causal (t <= s + q_offset), not padded, same segment."""
    q = jnp.arange(S)[:, None] + q_offset
    k = jnp.arange(T)[None, :]
    mask = (k <= q)[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        if S != T:
            raise ValueError("segment_ids need S == T (no cache)")
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask



def dense(cfg: ModelConfig, spec: str, x: Array, p: Params) -> Array:
    """`einsum(spec, x, kernel) + bias` in the compute dtype (the bias over the output's trailing dims).

    With `fp32_allreduce` and a 16-bit compute dtype the backward pass keeps the kernel's and the
    bias's gradients in float32 (`dense_wide_grads`): the weight-gradient GEMM writes its float32
    accumulator instead of rounding it to bf16, and the bias gradient is summed in float32.  Under
    data parallelism those per-device partial sums are what XLA's partitioner all-reduces, so this
    is GPT-NeoX's `fp32_allreduce` (Pythia-1B trained with it); it also keeps gradient accumulation
    over micro-batches free of bf16 rounding.  Without it the partial sums are reduced in bf16.

    `bias_grad: separate`: the bias gradient is summed in float32 by a reduction kernel of its own,
    after the output gradient is written (`_bias_sum`).  XLA otherwise folds that sum into the
    kernel making the output gradient (the GELU backward for fc_in, the rotary backward and q/k/v
    concatenation for qkv), where it runs as a column reduction over batch x sequence rows: on an
    H200 that kernel took 0.54 ms of a pythia-1.4b layer, against about 0.22 ms to read and write its
    tensors once (bench/throughput_notes.md)."""
    dtype, precision = _numerics(cfg)
    separate = cfg.bias_grad == "separate"
    if wide_grads(cfg) and not isinstance(p["kernel"], Int8):
        return dense_wide_grads(spec, dtype, precision, separate, x, p["kernel"], p["bias"])
    y = jnp.einsum(spec, x, weight(p["kernel"], dtype), precision=precision)
    if separate:
        return add_bias(y.ndim - p["bias"].ndim, y, p["bias"])
    return y + p["bias"].astype(dtype)




def head_logits(cfg: ModelConfig, spec: str, h: Array, w: Array, axes: tuple | None) -> Float[Array, "..."]:
    """Float32 logits of the vocab head `einsum(spec, h, w)`: w cast to the compute dtype on its
    shards (`axes`; None inside a shard_map, where w is already the local block), the backward in the
    compute dtype (`einsum_f32_out`); with `fp32_allreduce` the weight's gradient stays float32
    (`head_wide_grads`), as in `dense`."""
    dtype, precision = _numerics(cfg)
    if isinstance(w, Int8):  # decoding with int8 weights (quant.py): no gradient, no FSDP gather
        return einsum_f32_out(spec, h, w.dequant(dtype), precision)
    if wide_grads(cfg):
        return head_wide_grads(spec, dtype, precision, axes, h, w)
    return einsum_f32_out(spec, h, cast_on_shards(w, dtype, axes), precision)



def _dot_attention_xla(q, k, v, mask, precision):
    """Reference attention: scores and softmax in float32."""
    H = q.shape[-1]
    scores = einsum_f32_out("bsnh,btnh->bnst", q, k, precision)
    scores = scores * (1.0 / math.sqrt(H))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnst,btnh->bsnh", probs, v, precision=precision)


# The backend the model is traced for, when not JAX's default.  A JAX user context, so that jit's
# trace and compile caches key on it: a function traced for the CPU and then under
# `compiling_for("gpu")` is traced again, not served the CPU trace.
_TARGET = jax.make_user_context(default_value=None)


@contextlib.contextmanager
def compiling_for(backend: str):
    """Trace the model for `backend` ("gpu") rather than JAX's default one: for compiling a GPU
    program on a machine without a GPU (`neox-jax plan --target`, bench/gpu_aot.py)."""
    with _TARGET(backend):
        yield


def target_backend() -> str:
    """The backend the model is traced for: JAX's default, or what `compiling_for` says."""
    return _TARGET.value or jax.default_backend()


def _dot_attention_cudnn(q, k, v, mask, causal_only: bool):
    if target_backend() != "gpu":
        raise UserError(f"attention=cudnn needs an NVIDIA GPU; this process runs on {target_backend()!r} "
                        "(set model.attention to xla)")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"attention=cudnn needs bfloat16/float16 compute, got {q.dtype}")
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if causal_only else mask, is_causal=causal_only,
        scale=1.0 / math.sqrt(q.shape[-1]), implementation="cudnn",
    )


def attention(
    cfg: ModelConfig,
    p: Params,
    x: Float[Array, "B S D"],
    cos: Float[Array, "B S R"],
    sin: Float[Array, "B S R"],
    mask: Bool[Array, "B 1 S T"],
    causal_only: bool,
    past: tuple | None = None,
):
    """Self-attention over the S new positions; returns [B, S, D].

    With `past = (k_past, v_past, past_mask)` (k/v [B, N, T, H] already rotated, heads before
    positions so each head's keys are one contiguous matrix; past_mask [B, T] true for filled cache
    slots) the queries also attend to those cached keys, `mask` [B, 1, S, S] covers the new
    positions among themselves, and the result is `(out, (k, v))` with the new positions' rotated
    keys and values [B, S, N, H] for the caller to store (generate.py's KV cache)."""
    _, precision = _numerics(cfg)
    qkv = dense(cfg, "bsd,dknh->bsknh", x, p["qkv"])
    qkv = checkpoint_name(qkv, "qkv")
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = constrain(apply_rotary(q, cos, sin), ("batch", "seq", "act_heads", None))
    k = constrain(apply_rotary(k, cos, sin), ("batch", "seq", "act_heads", None))
    if past is not None:
        ctx = _dot_attention_with_past(q, k, v, mask, past, precision)
    elif cfg.attention == "cudnn":
        ctx = _dot_attention_cudnn(q, k, v, mask, causal_only)
    else:
        ctx = _dot_attention_xla(q, k, v, mask, precision)
    out = dense(cfg, "bsnh,nhd->bsd", ctx, p["out"])
    out = checkpoint_name(out, "attn_out")
    return out if past is None else (out, (k, v))


def _dot_attention_with_past(q, k, v, mask, past, precision):
    """Softmax over [cached keys, new keys] without concatenating the cache (which would copy it
    every step): two score blocks, one float32 softmax over both, two weighted sums."""
    k_past, v_past, past_mask = past
    H = q.shape[-1]
    s_past = jnp.einsum("bsnh,bnth->bnst", q, k_past.astype(q.dtype), preferred_element_type=jnp.float32,
                        precision=precision)
    s_new = jnp.einsum("bsnh,btnh->bnst", q, k, preferred_element_type=jnp.float32, precision=precision)
    T, scale, neg = k_past.shape[2], 1.0 / math.sqrt(H), jnp.finfo(jnp.float32).min
    scores = jnp.concatenate([jnp.where(past_mask[:, None, None, :], s_past * scale, neg),
                              jnp.where(mask, s_new * scale, neg)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return (jnp.einsum("bnst,bnth->bsnh", probs[..., :T], v_past.astype(v.dtype), precision=precision)
            + jnp.einsum("bnst,btnh->bsnh", probs[..., T:], v, precision=precision))


def mlp(cfg: ModelConfig, p: Params, x: Float[Array, "B S D"]) -> Float[Array, "B S D"]:
    h = dense(cfg, "bsd,df->bsf", x, p["fc_in"])
    h = constrain(checkpoint_name(h, "mlp_in"), ("batch", "seq", "act_mlp"))
    h = gelu(h, cfg.hidden_act)
    out = dense(cfg, "bsf,fd->bsd", h, p["fc_out"])
    return checkpoint_name(out, "mlp_out")


def block(cfg: ModelConfig, p: Params, x: Float[Array, "B S D"], cos, sin, mask, causal_only: bool,
          past: tuple | None = None):
    """One GPT-NeoX layer: parallel `x + attn(ln1(x)) + mlp(ln2(x))` or the sequential form.

    With `past` (see `attention`) returns `(x, (k, v))`, the new positions' keys and values."""
    dtype, _ = _numerics(cfg)
    eps = cfg.layer_norm_eps
    a = attention(cfg, p["attn"], layer_norm(x, p["ln_attn"], eps, dtype), cos, sin, mask, causal_only, past)
    if past is not None:
        a, kv = a
    if cfg.use_parallel_residual:
        m = mlp(cfg, p["mlp"], layer_norm(x, p["ln_mlp"], eps, dtype))
        x = x + (a + m)  # under tensor parallelism both partial sums travel in one collective per layer
    else:
        x = x + a
        x = x + mlp(cfg, p["mlp"], layer_norm(x, p["ln_mlp"], eps, dtype))
    x = constrain(x, ("batch", "seq", "act_embed"))
    return x if past is None else (x, kv)



def wide_grads(cfg: ModelConfig) -> bool:
    """Whether weight gradients leave their matmuls in float32 although the compute dtype is 16-bit
    (`fp32_allreduce`; with float32 compute they are float32 anyway)."""
    return cfg.fp32_allreduce and DTYPES[cfg.compute_dtype] != jnp.float32


_LAYER_NORMS = ("ln_attn", "ln_mlp", "final_ln")


def inference_params(cfg: ModelConfig, params: Params) -> Params:
    """The parameters as the forward pass reads them, for programs that only run it (decoding,
    scoring, an exported SavedModel): every weight the forward casts to the compute dtype where it
    is used (matmul kernels and their biases, the embedding table) cast once here; LayerNorm scales
    and biases, which it reads in float32, and int8 weights as they are.  `forward(cfg, p)` is
    unchanged, bit for bit; what changes is that a program called once per token no longer reads
    every float32 weight and writes its bf16 copy on each call (on a memory-bound decode step that
    is 4 bytes read and 2 written per parameter before the step's own 2), and the weights take half
    the memory.  Not for training: the float32 parameters are the optimizer's master copy."""
    dtype = _numerics(cfg)[0]

    def cast(path, x):
        if isinstance(x, Int8) or any(getattr(k, "key", None) in _LAYER_NORMS for k in path):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params, is_leaf=lambda x: isinstance(x, Int8))


def _numerics(cfg: ModelConfig):
    dtype = DTYPES[cfg.compute_dtype]
    # float32 compute means float32 matmuls on every backend (no TF32 on GPUs).
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return dtype, precision


# cuDNN fused attention's forward primitive as JAX names it (jax 0.10 and 0.11): its outputs are the
# attention output and the softmax statistics its backward needs.  `check_attention_policy` proves the
# name against the running JAX before any `dots_attn` step is traced.
_CUDNN_ATTENTION_FWD = frozenset({"dot_product_attention_fwd_wrapper", "dot_product_attention_fwd"})


def _dots_and_attention(prim, *args, **params) -> bool:
    """Remat policy `dots_attn`: what `dots` saves (matmul outputs without batch dimensions) plus the
    outputs of cuDNN's attention forward, so the backward pass does not run the attention forward a
    second time (under `dots` it does: 48 cuDNN forward calls per step for 24 layers on the H200)."""
    return (prim.name in _CUDNN_ATTENTION_FWD
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


@functools.cache
def check_attention_policy() -> None:
    """Trace (not run) the gradient of one small cuDNN attention under the `dots_attn` policy and fail
    unless the policy saved the attention forward's outputs: a JAX that renamed the primitive would
    otherwise silently fall back to `dots`."""
    seen = []

    def policy(prim, *args, **params):
        if prim.name in _CUDNN_ATTENTION_FWD:
            seen.append(prim.name)
        return _dots_and_attention(prim, *args, **params)

    q = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    attn = jax.checkpoint(lambda q: _dot_attention_cudnn(q, q, q, None, True), policy=policy)
    jax.make_jaxpr(jax.grad(lambda q: attn(q).astype(jnp.float32).sum()))(q)
    if not seen:
        raise UserError(f"remat dots_attn: jax {jax.__version__} does not name cuDNN attention's forward "
                        f"{sorted(_CUDNN_ATTENTION_FWD)}; the policy would save nothing beyond dots "
                        "(use remat dots)")


def _remat(fn, cfg: ModelConfig):
    policy = cfg.remat
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                              prevent_cse=False)
    if policy == "dots_attn":
        check_attention_policy()
        return jax.checkpoint(fn, policy=_dots_and_attention, prevent_cse=False)
    if policy == "save_proj":
        names = ("qkv", "attn_out", "mlp_in", "mlp_out")
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(*names), prevent_cse=False)
    raise ValueError(f"unknown remat policy {policy!r}")


def hidden_states(
    cfg: ModelConfig,
    params: Params,
    tokens: Int[Array, "B S"],
    *,
    positions: Int[Array, "B S"] | None = None,
    padding_mask: Bool[Array, "B S"] | None = None,
    segment_ids: Int[Array, "B S"] | None = None,
) -> Float[Array, "B S D"]:
    """Final-LayerNorm output."""
    dtype, _ = _numerics(cfg)
    B, S = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    causal_only = padding_mask is None and segment_ids is None
    mask = attention_mask(S, S, padding_mask=padding_mask, segment_ids=segment_ids)
    cos, sin = rotary_tables(positions, cfg)

    x = embed_lookup(params["embed_in"]["embedding"], tokens, dtype)
    x = constrain(x, ("batch", "seq", "act_embed"))

    def body(carry, layer_params):
        return block(cfg, layer_params, carry, cos, sin, mask, causal_only), None

    body = _remat(body, cfg)
    layers = params["layers"]
    if cfg.scan_layers:
        x, _ = jax.lax.scan(body, x, layers)
    else:
        for i in range(cfg.num_layers):
            x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], layers))
    return layer_norm(x, params["final_ln"], cfg.layer_norm_eps, dtype)


def logits_from_hidden(cfg: ModelConfig, params: Params, h: Float[Array, "B S D"]) -> Float[Array, "B S V"]:
    if cfg.tie_word_embeddings:
        out = head_logits(cfg, "bsd,vd->bsv", h, params["embed_in"]["embedding"], ("vocab", "embed"))
    else:
        out = head_logits(cfg, "bsd,dv->bsv", h, params["embed_out"]["kernel"], ("embed", "vocab"))
    return constrain(out, ("batch", "seq", "act_vocab"))


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: Int[Array, "B S"],
    *,
    positions: Int[Array, "B S"] | None = None,
    padding_mask: Bool[Array, "B S"] | None = None,
    segment_ids: Int[Array, "B S"] | None = None,
) -> Float[Array, "B S V"]:
    """Logits in float32 over the whole padded vocabulary.

    positions: absolute positions for rotary (default 0..S-1, as HF and NeoX).
    padding_mask: 1 for real tokens, 0 for padding (keys that no query may attend).
    segment_ids: packed documents; queries attend only keys of the same segment."""
    h = hidden_states(cfg, params, tokens, positions=positions, padding_mask=padding_mask, segment_ids=segment_ids)
    return logits_from_hidden(cfg, params, h)


def over_position_chunks(one, h: Float[Array, "B S D"], targets: Int[Array, "B S"], chunk: int):
    """Apply `one(h_chunk, targets_chunk) -> pytree of [B, c]` to `chunk` positions at a time
    (`lax.map`) and reassemble [B, S] results.  Each chunk is rematerialised in the backward pass
    (`jax.checkpoint`): without it the scan would keep every chunk's logits for the gradient, i.e.
    the whole [B, S, V] again.  S <= chunk, or S not a multiple of it, runs in one piece and is not
    rematerialised: its logits are the gradient's first input, so keeping them costs no more memory
    than recomputing them (the head's GEMM, 2·B·S·D·V FLOPs) at the start of the backward pass."""
    B, S, D = h.shape
    if S <= chunk or S % chunk:
        return one(h, targets)
    one = jax.checkpoint(one)
    hc = h.reshape(B, S // chunk, chunk, D).swapaxes(0, 1)
    tc = targets.reshape(B, S // chunk, chunk).swapaxes(0, 1)
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(B, S), jax.lax.map(lambda a: one(*a), (hc, tc)))


def target_logits_lse(
    cfg: ModelConfig,
    params: Params,
    h: Float[Array, "B S D"],
    targets: Int[Array, "B S"],
    chunk: int = 256,
) -> tuple[Float[Array, "B S"], Float[Array, "B S"]]:
    """(logits[target], logsumexp(logits)) from final hidden states, `chunk` positions at a time, so
    the float32 [B, S, V] logits never exist whole (V = 50k makes them the largest activation)."""
    return over_position_chunks(lambda hh, tt: target_logit_lse(logits_from_hidden(cfg, params, hh), tt),
                                h, targets, chunk)



def target_logprobs(
    cfg: ModelConfig,
    params: Params,
    h: Float[Array, "B S D"],
    targets: Int[Array, "B S"],
    chunk: int = 256,
) -> Float[Array, "B S"]:
    """log softmax(logits)[target], chunked (see `target_logits_lse`)."""
    tgt, lse = target_logits_lse(cfg, params, h, targets, chunk)
    return tgt - lse


def token_logprobs(
    cfg: ModelConfig,
    params: Params,
    tokens: Int[Array, "B S"],
    **kwargs,
) -> Float[Array, "B S-1"]:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for t = 0..S-2, softmax over all V (float32)."""
    h = hidden_states(cfg, params, tokens, **kwargs)[:, :-1]
    return target_logprobs(cfg, params, h, tokens[:, 1:])
