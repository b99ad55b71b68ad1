"""Optimizer pieces, each as GPT-NeoX (Pythia era, DeepSpeed) computed it.

* `lr_at(step, cfg)`: GPT-NeoX's `AnnealingLR`, in the 2022 form that trained Pythia and 20B
  (`neox_2022`) or the form GPT-NeoX uses since August 2023 (`neox_2023`), with decay styles
  cosine / linear / exponential / constant.  `step` counts *applied* updates: DeepSpeed advances
  the scheduler only on steps whose gradients were finite, and the first update uses lr(0) = 0.
* `decay_mask(params)`: the one place deciding weight decay: kernels and embeddings decay,
  biases and LayerNorm parameters do not (NeoX's two parameter groups).
* `adamw(cfg)`: optax's Adam with decoupled weight decay (AdamW, bias correction on), the learning
  rate applied by the train step (so the step can report it and skip it on overflow).
* `clip_by_global_norm`: DeepSpeed/torch clipping, g * min(1, clip / (norm + 1e-6)).
* `LossScale`: DeepSpeed's `DynamicLossScaler` (initial 2^12, window 1000, hysteresis 2, min 1),
  state and update rule, as a pytree that lives in the train state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ..tree import flatten, unflatten
from .config import OptimizerConfig

# ----------------------------------------------------------------------------- learning rate


def lr_at(step: jax.Array | int, cfg: OptimizerConfig, total_steps: int) -> jax.Array:
    """Learning rate for the update after `step` applied updates (float32, traceable).

    W = warmup * T (a float, as NeoX computes it), T = decay_steps or total_steps.
    neox_2022: n' = min(n, T - W); n <= W: lr * n' / W; else n' -= W and
               cosine      lr/2 * (1 + cos(pi n'/T))
               linear      lr * (T - n') / T
               exponential lr * exp(-0.693 n'/T)
               constant    lr
               then max(., min_lr).  Note the cosine period T (not T - W): the floor is reached early
               (Pythia, T = 143000: at step 115,139).
    neox_2023: n <= W: lr * max(1, n) / W; else n' = n - W, T' = T - W and
               cosine      min_lr + (lr - min_lr)/2 * (1 + cos(pi n'/T'))
               linear      lr * (T' - n') / T'
               exponential lr * exp(-0.693 n'/T')
               constant    lr
               then max(., min_lr)."""
    T = float(cfg.decay_steps or total_steps)
    W = cfg.warmup * T
    n = jnp.asarray(step, jnp.float32)
    lr, floor = cfg.lr, cfg.min_lr
    if cfg.schedule == "neox_2022":
        nc = jnp.minimum(n, T - W)
        warm = lr * nc / W if W > 0 else jnp.float32(lr)
        d, period = nc - W, T
    else:
        warm = lr * jnp.maximum(1.0, n) / W if W > 0 else jnp.float32(lr)
        d, period = n - W, T - W
    if cfg.decay_style == "cosine":
        if cfg.schedule == "neox_2022":
            decayed = lr / 2.0 * (jnp.cos(math.pi * d / period) + 1.0)
        else:
            decayed = floor + (lr - floor) / 2.0 * (jnp.cos(math.pi * d / period) + 1.0)
    elif cfg.decay_style == "linear":
        decayed = lr * (period - d) / period
    elif cfg.decay_style == "exponential":
        decayed = lr * jnp.exp(-0.693 * d / period)
    else:
        decayed = jnp.float32(lr)
    decayed = jnp.maximum(decayed, floor)
    out = jnp.where(n <= W, warm, decayed) if W > 0 else decayed
    return out.astype(jnp.float32)


# ----------------------------------------------------------------------------- AdamW and clipping


def decay_mask(params: Any) -> Any:
    """True for tensors that get weight decay: every `kernel` and `embedding`; not biases or LayerNorm
    scales (GPT-NeoX's `get_params_for_weight_decay_optimization`).  docs/params.md lists the result."""
    return unflatten({name: name.rsplit("/", 1)[-1] in ("kernel", "embedding") for name in flatten(params)})


def adamw(cfg: OptimizerConfig, params: Any) -> optax.GradientTransformation:
    """Adam moments (fp32, bias-corrected) plus decoupled weight decay on the masked tensors; the
    result is the direction that the step multiplies by -lr."""
    return optax.chain(
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(params)),
    )


def global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(grads: Any, max_norm: float) -> tuple[Any, jax.Array]:
    """(clipped grads, the norm before clipping).  max_norm 0 disables clipping."""
    norm = global_norm(grads)
    if max_norm <= 0:
        return grads, norm
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * factor, grads), norm


# ----------------------------------------------------------------------------- loss scaling


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LossScale:
    """DeepSpeed `DynamicLossScaler` state (its `cur_iter`, `last_overflow_iter`, `cur_hysteresis`)."""

    scale: jax.Array  # float32
    iter: jax.Array  # int32, steps seen (overflowing ones included)
    last_overflow: jax.Array  # int32, iter of the last overflow (-1: none yet)
    hysteresis: jax.Array  # int32, overflows still tolerated before the scale drops


# DeepSpeed keeps the scale in a Python float; ours is float32, so it stops doubling at 2^64 (far above
# any scale an fp16 run reaches: fp16 overflows at 65504) instead of becoming inf and sticking there.
MAX_SCALE = 2.0 ** 64


def init_loss_scale(cfg: OptimizerConfig) -> LossScale:
    scale = {"dynamic": 2.0 ** cfg.initial_scale_power, "static": cfg.static_scale, "none": 1.0}[cfg.loss_scale]
    return LossScale(jnp.float32(scale), jnp.int32(0), jnp.int32(-1), jnp.int32(cfg.hysteresis))


def update_loss_scale(ls: LossScale, overflow: jax.Array, cfg: OptimizerConfig) -> LossScale:
    """DeepSpeed `DynamicLossScaler.update_scale` (consecutive_hysteresis=False, scale factor 2):

    overflow:  if hysteresis == 1: scale = max(scale / 2, min_scale)  else hysteresis -= 1;
               last_overflow = iter
    otherwise: if (iter - last_overflow) % window == 0: hysteresis = initial; scale *= 2 (at most 2^64)
    then iter += 1.  Static and disabled scaling never change."""
    if cfg.loss_scale != "dynamic":
        return dataclasses.replace(ls, iter=ls.iter + 1)
    drop = overflow & (ls.hysteresis == 1)
    grow = ~overflow & ((ls.iter - ls.last_overflow) % cfg.scale_window == 0)
    scale = jnp.where(drop, jnp.maximum(ls.scale / 2.0, cfg.min_scale), ls.scale)
    scale = jnp.where(grow, jnp.minimum(scale * 2.0, MAX_SCALE), scale)
    hysteresis = jnp.where(overflow & ~drop, ls.hysteresis - 1, ls.hysteresis)
    hysteresis = jnp.where(grow, jnp.int32(cfg.hysteresis), hysteresis)
    last = jnp.where(overflow, ls.iter, ls.last_overflow)
    return LossScale(scale.astype(jnp.float32), ls.iter + 1, last, hysteresis)
