"""Continue a GPT-NeoX (DeepSpeed) training run: `train.init_from_neox: SAVE[/global_stepN]`.

The run starts from the checkpoint's float32 master weights, Adam moments, update count and fp16
loss-scaler state (convert/zero.py reads them from the ZeRO-1 optimizer files), at its iteration:
the same data position and learning rate GPT-NeoX would have continued with.

Bounded host memory: the state arrives one tensor at a time (one layer's slice of a stacked
parameter, merged over tensor-parallel ranks; convert/zero.py maps the files and copies only that),
and each is placed at once: `jax.make_array_from_callback` puts it on the devices with its layer's
sharding (so every process builds only its own shards; every process reads the files), and a
jitted, donating update writes it into its layer of the stacked array, which lives only on the
devices.  The host holds about one layer's largest matrix (master and two moments, float32) plus
the mapped pages convert/zero.py allows, whatever the model size; the devices, the state itself.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ..errors import CheckpointError, UserError
from ..tree import flatten, unflatten
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


@functools.cache
def _zeros(shape: tuple[int, ...], sharding) -> Callable[[], jax.Array]:
    """() -> a float32 zero array of `shape`, created already sharded."""
    return jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=sharding)


@functools.cache
def _setter(sharding):
    """stacked, one layer, index -> stacked with that layer replaced (the old buffer donated)."""
    return jax.jit(lambda full, one, i: jax.lax.dynamic_update_index_in_dim(full, one, i, 0),
                   out_shardings=sharding, donate_argnums=0)


def _layer_sharding(sharding: NamedSharding) -> NamedSharding:
    """The sharding of one layer of a stacked [L, ...] array (its spec without the layer axis)."""
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))


def _place(zs, num_layers: int, targets: list[dict]) -> list[dict]:
    """Each (name, layer) tensor of the three float32 trees (master, exp_avg, exp_avg_sq) from `zs`,
    placed as it is read: [{flat name: jax.Array}] with the shardings of `targets`."""
    out: list[dict] = [{}, {}, {}]
    layers: dict[str, set] = {}
    for e, *arrays in zs.arrays():
        if e.name not in targets[0]:
            raise CheckpointError(f"{zs.reader.step_dir}: {e.label} is not a parameter of the model being trained")
        for tree, target, arr in zip(out, targets, arrays):
            sharding = target[e.name]
            if e.layer is None:
                tree[e.name] = _put(arr, sharding)
                continue
            if e.name not in tree:
                tree[e.name] = _zeros((num_layers, *arr.shape), sharding)()
            one = _put(arr, _layer_sharding(sharding))
            tree[e.name] = _setter(sharding)(tree[e.name], one, np.int32(e.layer))
        if e.layer is not None:
            layers.setdefault(e.name, set()).add(e.layer)
    missing = sorted(set(targets[0]) - set(out[0]))
    short = sorted(n for n, got in layers.items() if len(got) != num_layers)
    if missing or short:
        what = missing[0] if missing else f"{short[0]} (layers {sorted(layers[short[0]])} of {num_layers})"
        raise CheckpointError(f"{zs.reader.step_dir}: the optimizer state has no {what}")
    return out


def load(run: RunConfig, path: str, opt: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """The train state of the GPT-NeoX checkpoint at `path`, placed with `shardings`."""
    from ..convert.zero import read_zero

    zs = read_zero(path)
    if zs.iteration >= run.train.steps:
        raise UserError(f"train.init_from_neox {path}: the checkpoint is at iteration {zs.iteration}, the run ends "
                        f"at train.steps {run.train.steps}")
    adam, *rest = shardings.opt_state
    if not isinstance(adam, optax.ScaleByAdamState):
        raise TypeError(f"the optimizer's first state is {type(adam).__name__}, expected Adam's")
    placed = _place(zs, zs.reader.config.num_layers, [flatten(shardings.params), flatten(adam.mu), flatten(adam.nu)])
    params, mu, nu = (unflatten(t) for t in placed)
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
