"""The train state, its shardings, and its sharded creation.

    TrainState
      step        int32    iterations run, skipped (overflowing) ones included = the data position
      updates     int32    optimizer updates applied = the LR scheduler's step (DeepSpeed skips it
                           on overflow) and Adam's bias-correction count
      params      float32  master parameters (docs/params.md), sharded by `neox_jax.sharding.RULES`
      opt_state   optax    AdamW moments mu, nu (float32), each sharded like its parameter
      loss_scale  LossScale  DeepSpeed's dynamic loss-scaler state (constant 1 without fp16)

Every leaf's sharding comes from the parameters' logical axes (`state_shardings`); the state is
created by jitted functions with those `out_shardings`, so it never exists whole on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .. import model as M
from ..sharding import tree_shardings
from .config import RunConfig
from .optimizer import LossScale, adamw, init_loss_scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    updates: jax.Array
    params: Any
    opt_state: Any
    loss_scale: LossScale


def make_optimizer(run: RunConfig) -> optax.GradientTransformation:
    return adamw(run.optimizer, M.abstract_params(run.model))


def param_shardings(run: RunConfig, mesh: Mesh) -> Any:
    return tree_shardings(M.param_axes(run.model), mesh, M.abstract_params(run.model))


def abstract_state(run: RunConfig, opt: optax.GradientTransformation, shardings: Any = None) -> TrainState:
    """The state's shapes and dtypes (`jax.ShapeDtypeStruct`s, nothing allocated); with `shardings`
    (a `state_shardings` tree) each leaf carries its sharding, as AOT lowering and restores need."""
    params = M.abstract_params(run.model)
    abstract = jax.eval_shape(lambda p: _fresh(run, opt, p), params)
    if shardings is None:
        return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def state_shardings(run: RunConfig, mesh: Mesh, opt: optax.GradientTransformation) -> TrainState:
    """NamedShardings of every state leaf: parameters and the optimizer's parameter-shaped leaves by
    the logical-axis rules; scalars (counts, loss scale) replicated."""
    p_sh = param_shardings(run, mesh)
    replicated = NamedSharding(mesh, P())
    abstract = abstract_state(run, opt)
    opt_sh = optax.tree_map_params(opt, lambda _, s: s, abstract.opt_state, p_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, updates=replicated, params=p_sh, opt_state=opt_sh,
                      loss_scale=jax.tree.map(lambda _: replicated, abstract.loss_scale))


def _fresh(run: RunConfig, opt: optax.GradientTransformation, params: Any) -> TrainState:
    return TrainState(step=jnp.int32(0), updates=jnp.int32(0), params=params, opt_state=opt.init(params),
                      loss_scale=init_loss_scale(run.optimizer))


def init_state(run: RunConfig, mesh: Mesh, opt: optax.GradientTransformation, params: Any | None = None,
               shardings: TrainState | None = None) -> TrainState:
    """A fresh state on `mesh`: random parameters from `train.seed` (bit-identical on any mesh), or
    the given `params` (e.g. restored from `--init-from`, already placed with `param_shardings`)."""
    shardings = shardings or state_shardings(run, mesh, opt)
    if params is None:
        params = M.init_params(run.model, run.train.seed, mesh=mesh)
    return jax.jit(lambda p: _fresh(run, opt, p), out_shardings=shardings, donate_argnums=0)(params)
