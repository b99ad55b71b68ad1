"""Continue a GPT-NeoX (DeepSpeed) training run: `train.init_from_neox: SAVE[/global_stepN]`.

The run starts from the checkpoint's float32 master weights, Adam moments, update count and fp16
loss-scaler state (convert/zero.py reads them from the ZeRO-1 optimizer files), at its iteration:
the same data position and learning rate GPT-NeoX would have continued with.  Each tensor is placed
with `jax.make_array_from_callback`, so every process builds only its own shards of the global
arrays (every process reads the files).  Host memory: the whole state in float32 (12 bytes per
parameter) while it is placed; fine up to a few billion parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import optax

from ..errors import UserError
from ..tree import unflatten
from .config import RunConfig
from .optimizer import LossScale, init_loss_scale
from .state import TrainState

log = logging.getLogger("neox_jax")


def read_config(path: str):
    """The model config of the GPT-NeoX checkpoint at `path` (for the architecture check before
    anything is written)."""
    from ..convert.neox import NeoxReader

    with NeoxReader(Path(path)) as r:
        return r.config


def _put(arr: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def load(run: RunConfig, path: str, opt: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """The train state of the GPT-NeoX checkpoint at `path`, placed with `shardings`."""
    from ..convert.zero import read_zero

    zs = read_zero(path)
    if zs.iteration >= run.train.steps:
        raise UserError(f"train.init_from_neox {path}: the checkpoint is at iteration {zs.iteration}, the run ends "
                        f"at train.steps {run.train.steps}")
    layers: dict[str, list] = {}
    flat: dict[str, tuple] = {}
    for e, master, mu, nu in zs.arrays():
        if e.layer is None:
            flat[e.name] = (master, mu, nu)
        else:
            layers.setdefault(e.name, []).append((e.layer, (master, mu, nu)))
    for name, items in layers.items():
        items.sort(key=lambda t: t[0])
        flat[name] = tuple(np.stack([t[1][i] for t in items]) for i in range(3))
    trees = [unflatten({k: v[i] for k, v in flat.items()}) for i in range(3)]
    params = jax.tree.map(_put, trees[0], shardings.params)
    adam, *rest = shardings.opt_state
    if not isinstance(adam, optax.ScaleByAdamState):
        raise TypeError(f"the optimizer's first state is {type(adam).__name__}, expected Adam's")
    mu = jax.tree.map(_put, trees[1], adam.mu)
    nu = jax.tree.map(_put, trees[2], adam.nu)
    updates = _put(np.int32(zs.updates), shardings.updates)
    empty = jax.eval_shape(opt.init, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
    count = zs.updates if zs.adam_step is None else zs.adam_step
    opt_state = (optax.ScaleByAdamState(count=_put(np.int32(count), adam.count), mu=mu, nu=nu),
                 *jax.tree.map(lambda a, s: _put(np.zeros(a.shape, a.dtype), s), tuple(empty[1:]), tuple(rest)))
    ls = init_loss_scale(run.optimizer)
    if run.optimizer.loss_scale == "dynamic" and zs.loss_scale:
        s = zs.loss_scale
        ls = LossScale(np.float32(s["cur_scale"]), np.int32(s.get("cur_iter", 0)),
                       np.int32(s.get("last_overflow_iter", -1)),
                       np.int32(s.get("cur_hysteresis", run.optimizer.hysteresis)))
        how = f"loss scale {s['cur_scale']:g} (DeepSpeed's scaler state)"
    else:
        how = f"loss scaling {run.optimizer.loss_scale} (the checkpoint's scaler state not used)"
    loss_scale = jax.tree.map(lambda v, sh: _put(np.asarray(v), sh), ls, shardings.loss_scale)
    log.info("continuing the GPT-NeoX run %s: iteration %d (data position), %d updates applied (the LR "
             "schedule), float32 master weights and Adam moments from %d x %d ZeRO file(s) (data x model "
             "ranks; TP %d, %d pipeline stage(s)), %s", zs.reader.step_dir, zs.iteration, zs.updates, zs.dp,
             zs.tp * zs.pp, zs.tp, zs.pp, how)
    if zs.adam_step is None:
        log.info("Adam's step count taken as the %d applied updates (this DeepSpeed version does not save its "
                 "own; the bias correction differs by < 1e-4 relative after 180 updates)", zs.updates)
    else:
        log.info("Adam's step count %d, from the optimizer files", zs.adam_step)
    if zs.tp > 1 and zs.reader.parallel:
        log.warning("TP %d with the parallel residual: GPT-NeoX updated each row-parallel bias as %d copies "
                    "(their sum moved %d x an Adam step); continued here as one bias (one Adam step)",
                    zs.tp, zs.tp, zs.tp)
    return TrainState(step=_put(np.int32(zs.iteration), shardings.step), updates=updates, params=params,
                      opt_state=opt_state, loss_scale=loss_scale)
