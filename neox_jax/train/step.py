"""Loss and the jitted train / eval steps.

Loss: mean next-token cross-entropy over every position of the global batch (GPT-NeoX's default),
optionally without positions whose input is EOD (`data.mask_eod_loss`), plus an optional z-loss
`z * mean(logsumexp^2)`.  Logits are produced `chunk` positions at a time, so the float32 [B, S, V]
logits never exist whole.

Vocabulary-parallel cross-entropy (`jax.shard_map`): with the vocabulary split over the `tensor`
axis, XLA's partitioner sees `take_along_axis(logits, target)` as a gather from a sharded operand
and all-gathers the [B, S, V] logits to every tensor shard first.  `_vocab_parallel_logits_lse`
instead lets each tensor shard compute, for its own V/t columns, the max, the sum of exponentials
and the target logit (when the target falls in its range), and combines them with one `pmax` and two
`psum`s of [B, S] values, as Megatron's vocab-parallel cross-entropy does.  tests/train_step_test.py
checks the compiled HLO for this.

One step (`make_train_step`): the global batch [B, S+1] is cut into `grad_accum` micro-batches
inside the jit (row i goes to micro-batch i % A, so no rows move between devices), gradients are
accumulated in float32 by `lax.scan`, unscaled by the loss scale, checked for inf/nan, clipped by
global norm, and applied by AdamW with the step's learning rate.  A step with non-finite gradients
applies nothing (parameters, moments and the LR schedule stay as they were) and only moves the step
counter, the data position and the loss scaler: DeepSpeed's fp16 rule.  Without loss scaling such
a step stops the run (the loop raises, naming the step).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int

from .. import model as M
from .. import ops
from ..sharding import constrain, logical_to_spec
from .config import RunConfig
from .optimizer import clip_by_global_norm, lr_at, update_loss_scale
from .state import TrainState

Batch = dict[str, jax.Array]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of the global batch split over ('data', 'fsdp'); sequence positions whole."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq")))


def use_vocab_parallel(run: RunConfig, mesh: Mesh | None) -> bool:
    """The shard_map cross-entropy runs when the vocabulary is really split over `tensor`."""
    if mesh is None:
        return False
    t = mesh.shape["tensor"]
    return t > 1 and run.model.vocab_size % t == 0


def _vocab_parallel_logits_lse(cfg, params, h, targets, mesh: Mesh, chunk: int):
    tied = cfg.tie_word_embeddings
    dtype, _ = M._numerics(cfg)
    w = params["embed_in"]["embedding"] if tied else params["embed_out"]["kernel"]
    axes = ("vocab", "embed") if tied else ("embed", "vocab")
    if not M.wide_grads(cfg):
        # cast on the shards, so the fsdp gather into the shard_map moves compute-dtype bytes; with
        # fp32_allreduce the float32 weight goes in and `head_logits` casts the local block (its
        # gradient then leaves the shard_map, and is reduced over the batch axes, in float32)
        w = ops.cast_on_shards(w, dtype, axes)
    eq = "bsd,vd->bsv" if tied else "bsd,dv->bsv"
    rows = logical_to_spec(("batch",))[0]

    def local(h, w, t):
        lo = jax.lax.axis_index("tensor") * (w.shape[0] if tied else w.shape[1])

        def one(hh, tt):
            return _split_vocab_target_logit_lse(M.head_logits(cfg, eq, hh, w, None), tt - lo)

        return M.over_position_chunks(one, h, t, chunk)

    w_spec = P("tensor", None) if tied else P(None, "tensor")
    return jax.shard_map(local, mesh=mesh, in_specs=(P(rows, None, None), w_spec, P(rows, None)),
                         out_specs=(P(rows, None), P(rows, None)))(h, w, targets)


@jax.custom_vjp
def _split_vocab_target_logit_lse(logits: Float[Array, "B S Vt"], idx: Int[Array, "B S"]):
    """`ops.target_logit_lse` inside the shard_map, for this tensor shard's block of the vocabulary
    (`idx` = target − the block's first id; outside [0, Vt) on the other shards): the max, the sum of
    exponentials and the target logit reduced over `tensor`.  The backward is the same single local
    pass, g_lse · exp(logits − lse) + g_target · onehot, with no collective."""
    return _split_vocab_fwd(logits, idx)[0]


def _split_vocab_fwd(logits, idx):
    V_local = logits.shape[-1]
    m = jax.lax.pmax(jnp.max(logits, axis=-1), "tensor")
    lse = jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), "tensor")) + m
    here = (idx >= 0) & (idx < V_local)
    tgt = jnp.take_along_axis(logits, jnp.clip(idx, 0, V_local - 1)[..., None], axis=-1)[..., 0]
    tgt = jax.lax.psum(jnp.where(here, tgt, 0.0), "tensor")
    return (tgt, lse), (logits, idx, lse)


_split_vocab_target_logit_lse.defvjp(_split_vocab_fwd, ops.target_logit_lse_bwd)


def token_scores(run: RunConfig, params, inputs: Int[Array, "B S"], targets: Int[Array, "B S"],
                 segment_ids: Int[Array, "B S"] | None = None, mesh: Mesh | None = None,
                 chunk: int | None = None) -> tuple[Float[Array, "B S"], Float[Array, "B S"]]:
    """(target logit, logsumexp) per position, float32; `chunk` positions at a time (default
    `train.loss_chunk`; 0 = the whole sequence at once)."""
    cfg = run.model
    chunk = run.train.loss_chunk if chunk is None else chunk
    chunk = chunk or inputs.shape[1]
    h = M.hidden_states(cfg, params, inputs, segment_ids=segment_ids)
    if use_vocab_parallel(run, mesh):
        return _vocab_parallel_logits_lse(cfg, params, h, targets, mesh, chunk)
    return M.target_logits_lse(cfg, params, h, targets, chunk)


def loss_mask(run: RunConfig, inputs: Int[Array, "B S"]) -> Float[Array, "B S"]:
    if run.data.mask_eod_loss:
        return (inputs != run.data.eod_id).astype(jnp.float32)
    return jnp.ones(inputs.shape, jnp.float32)


def _split(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    tokens = batch["tokens"]
    seg = batch.get("segment_ids")
    return tokens[:, :-1], tokens[:, 1:], None if seg is None else seg[:, :-1]


def loss_sums(run: RunConfig, params, batch: Batch, mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of masked token NLL, sum of masked lse^2, number of loss tokens) of a batch."""
    inputs, targets, seg = _split(batch)
    tgt, lse = token_scores(run, params, inputs, targets, seg, mesh)
    mask = loss_mask(run, inputs)
    return jnp.sum((lse - tgt) * mask), jnp.sum(jnp.square(lse) * mask), jnp.sum(mask)


def _micro_batches(batch: Batch, A: int) -> Batch:
    """[B, ...] -> [A, B/A, ...] with row i in micro-batch i % A (rows stay on their devices)."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // A, A) + x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(run: RunConfig, mesh: Mesh, opt, shardings: TrainState) -> Callable:
    """The jitted `step(state, batch) -> (state, metrics)`; the state is donated."""
    A = run.train.grad_accum
    ocfg = run.optimizer
    z = ocfg.z_loss

    def micro_loss(params, mb, n_tokens, scale):
        nll, lse2, _ = loss_sums(run, params, mb, mesh)
        loss = nll / n_tokens
        zl = z * lse2 / n_tokens
        return (loss + zl) * scale, (loss, zl)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: Batch):
        inputs, _, _ = _split(batch)
        n_tokens = jnp.maximum(jnp.sum(loss_mask(run, inputs)), 1.0)
        scale = state.loss_scale.scale
        p_sh = shardings.params

        def one(mb):
            mb = jax.tree.map(lambda x: constrain(x, ("batch", "seq")), mb)
            g, aux = grad_fn(state.params, mb, n_tokens, scale)
            return jax.lax.with_sharding_constraint(g, p_sh), aux

        if A == 1:
            grads, (loss, zl) = one(batch)
        else:
            def body(carry, mb):
                g_acc, l_acc, z_acc = carry
                g, (l, zz) = one(mb)
                g_acc = jax.tree.map(jnp.add, g_acc, g)
                return (jax.lax.with_sharding_constraint(g_acc, p_sh), l_acc + l, z_acc + zz), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss, zl), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)),
                                                _micro_batches(batch, A))
        grads = jax.tree.map(lambda g: g / scale, grads)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        grads, grad_norm = clip_by_global_norm(grads, ocfg.clip)
        lr = lr_at(state.updates, ocfg, run.train.steps)
        direction, opt_state = opt.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), state.params, direction)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            updates=state.updates + finite.astype(jnp.int32),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            loss_scale=update_loss_scale(state.loss_scale, ~finite, ocfg),
        )
        metrics = {"loss": loss, "z_loss": zl, "grad_norm": grad_norm, "lr": lr, "loss_scale": scale,
                   "skipped": ~finite, "tokens": n_tokens}
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=0)


def make_eval_step(run: RunConfig, mesh: Mesh, param_sh: Any) -> Callable:
    """Jitted `eval(params, batch) -> (sum of token NLL, number of loss tokens)`."""

    def ev(params, batch):
        nll, _, n = loss_sums(run, params, batch, mesh)
        return nll, n

    replicated = NamedSharding(mesh, P())
    return jax.jit(ev, in_shardings=(param_sh, batch_sharding(mesh)), out_shardings=replicated)


def loss_and_grads(run: RunConfig, mesh: Mesh, param_sh: Any) -> Callable:
    """Jitted `(params, batch) -> (mean loss, grads)` of one batch without accumulation or
    clipping (what the sharding tests compare across meshes)."""

    def f(params, batch):
        def loss(p):
            nll, _, n = loss_sums(run, p, batch, mesh)
            return nll / n
        return jax.value_and_grad(loss)(params)

    replicated = NamedSharding(mesh, P())
    return jax.jit(f, in_shardings=(param_sh, batch_sharding(mesh)), out_shardings=(replicated, param_sh))


def perplexity(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")
