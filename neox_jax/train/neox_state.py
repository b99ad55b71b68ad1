"""Continue a GPT-NeoX (DeepSpeed) training run: `train.init_from_neox: SAVE[/global_stepN]`.

The run starts from the checkpoint's float32 master weights, Adam moments, update count and fp16
loss-scaler state (convert/zero.py reads them from the ZeRO-1 optimizer files), at its iteration:
the same data position and learning rate GPT-NeoX would have continued with.

Bounded host memory: the state arrives one tensor at a time (one layer's slice of a stacked
parameter, merged over tensor-parallel ranks; convert/zero.py maps the files and copies only that),
and each is placed at once: `jax.make_array_from_callback` puts it on the devices with its layer's
sharding, and a jitted, donating update writes it into its layer of the stacked array, which lives
only on the devices.  The host holds about one layer's largest matrix (master and two moments,
float32) plus the mapped pages convert/zero.py allows, whatever the model size; the devices, the
state itself.

Read once, however many processes: with P processes the tensors are dealt out round robin (P
layers of one parameter at a time, each to another process; the unstacked ones in turn), so each
process reads about 1/P of the files' bytes.  A round's tensors meet on the devices: a [P, ...]
array whose row p lives on process p's devices (split over them), moved to every device's shard of
the target sharding by `jax.device_put` (one collective; the devices' order differs from the
training mesh's, which device_put handles and jit does not), then scattered into the stacked array
by layer.  The log says how many tensors and bytes each process read.
"""

from __future__ import annotations

import functools
import itertools
import logging
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..convert.formats import Entry
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


def _check_names(zs, targets: list[dict]) -> None:
    for e in zs.reader.entries():
        if e.name not in targets[0]:
            raise CheckpointError(f"{zs.reader.step_dir}: {e.label} is not a parameter of the model being trained")


def _check_complete(zs, num_layers: int, targets: list[dict], out: list[dict]) -> None:
    layers: dict[str, set] = {}
    for e in zs.reader.entries():
        if e.layer is not None:
            layers.setdefault(e.name, set()).add(e.layer)
    missing = sorted(set(targets[0]) - set(out[0]))
    short = sorted(n for n, got in layers.items() if len(got) != num_layers)
    if missing or short:
        what = missing[0] if missing else f"{short[0]} (layers {sorted(layers[short[0]])} of {num_layers})"
        raise CheckpointError(f"{zs.reader.step_dir}: the optimizer state has no {what}")


def _place(zs, num_layers: int, targets: list[dict]) -> list[dict]:
    """Each (name, layer) tensor of the three float32 trees (master, exp_avg, exp_avg_sq) from `zs`,
    read by this process and placed as it is read: [{flat name: jax.Array}] with the shardings of
    `targets`."""
    _check_names(zs, targets)
    out: list[dict] = [{}, {}, {}]
    for e, *arrays in zs.arrays():
        for tree, target, arr in zip(out, targets, arrays):
            sharding = target[e.name]
            if e.layer is None:
                tree[e.name] = _put(arr, sharding)
                continue
            if e.name not in tree:
                tree[e.name] = _zeros((num_layers, *arr.shape), sharding)()
            one = _put(arr, _layer_sharding(sharding))
            tree[e.name] = _setter(sharding)(tree[e.name], one, np.int32(e.layer))
    _check_complete(zs, num_layers, targets, out)
    return out


def readers(mesh: Mesh) -> list[list]:
    """The mesh's devices grouped by process, in process order: each group's process reads the
    tensors dealt to it (`_place_shared`)."""
    by: dict[int, list] = {}
    for d in mesh.devices.flat:
        by.setdefault(d.process_index, []).append(d)
    return [by[p] for p in sorted(by)]


def deal(entries: list[Entry], n: int) -> list[list[Entry | None]]:
    """Rounds of `entries` for n readers: row r of a round is reader r's tensor (None: nothing).  A
    stacked parameter goes n layers at a time, the others one per round; the reader to start each
    round turns, so every reader gets about as many tensors as any other."""
    rounds: list[list[Entry | None]] = []
    turn = itertools.count()
    stacked: dict[str, list[Entry]] = {}
    for e in entries:
        if e.layer is None:
            row: list[Entry | None] = [None] * n
            row[next(turn) % n] = e
            rounds.append(row)
        else:
            stacked.setdefault(e.name, []).append(e)
    for group in stacked.values():
        for i in range(0, len(group), n):
            row = [None] * n
            for e in group[i:i + n]:
                row[next(turn) % n] = e
            rounds.append(row)
    return rounds


def _rows(rows: dict[int, np.ndarray], shape: tuple[int, ...], groups: list[list]) -> jax.Array:
    """[len(groups), *shape] float32 with row r on group r's devices (split over them along the first
    axis they divide, else copied to each); `rows` holds the rows this process has (others zeros)."""
    n = len(groups[0])
    mesh = Mesh(np.array(groups, dtype=object).reshape(len(groups), n), ("reader", "local"))
    axis = next((a for a, size in enumerate(shape) if size % n == 0), None)
    spec = ["reader"] + [None] * len(shape)
    if axis is not None:
        spec[1 + axis] = "local"
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    full = (len(groups), *shape)

    def piece(idx):
        r = idx[0].start or 0
        if r not in rows:
            return np.zeros(sharding.shard_shape(full), np.float32)
        return rows[r][idx[1:]][None]

    return jax.make_array_from_callback(full, sharding, piece)


def _spread(rows: jax.Array, mesh: Mesh, spec: tuple) -> jax.Array:
    """`rows` on every device of `mesh`, each row split by `spec`: an all-gather over the readers.
    Waited for before the next is started: with several in flight, two CPU processes' (gloo)
    collectives deadlocked (pythia-160m's shapes, bench/neox_state_memory.py --processes 2)."""
    return jax.block_until_ready(jax.device_put(rows, NamedSharding(mesh, PartitionSpec(None, *spec))))


@functools.cache
def _scatter(sharding):
    """stacked, [n, ...] rows, [n] layers -> stacked with those layers replaced (index num_layers:
    dropped; the old buffer donated)."""
    return jax.jit(lambda full, rows, at: full.at[at].set(rows, mode="drop"), out_shardings=sharding,
                   donate_argnums=0)


@functools.cache
def _take(sharding):
    return jax.jit(lambda rows, r: rows[r], out_shardings=sharding)


def _place_shared(zs, num_layers: int, targets: list[dict], groups: list[list]) -> list[dict]:
    """As `_place`, but each tensor is read by one reader (a process: `groups` are its devices, as
    `readers` lists them) and sent to the others' devices (module docstring); this process reads for
    the groups whose devices it holds."""
    _check_names(zs, targets)
    n = len(groups)
    mine = [r for r, g in enumerate(groups) if g[0].process_index == jax.process_index()]
    rounds = deal(zs.reader.entries(), n)
    stream = zs.arrays([row[r] for row in rounds for r in mine if row[r] is not None])
    read = np.zeros((n, 2), np.float64)  # per reader: tensors, bytes (the three float32 trees)
    out: list[dict] = [{}, {}, {}]
    try:
        for row in rounds:
            got: dict[int, list[np.ndarray]] = {}
            for r in mine:
                if row[r] is not None:
                    e, *arrays = next(stream)
                    assert (e.name, e.layer) == (row[r].name, row[r].layer), (e, row[r])
                    got[r] = arrays
                    read[r] += (1, sum(a.nbytes for a in arrays))
            first = next(e for e in row if e is not None)
            for k, (tree, target) in enumerate(zip(out, targets)):
                sharding = target[first.name]
                mesh, spec = sharding.mesh, tuple(sharding.spec)
                rows = _rows({r: a[k] for r, a in got.items()}, first.shape, groups)
                if first.layer is None:
                    owner = next(r for r, e in enumerate(row) if e is not None)
                    tree[first.name] = _take(sharding)(_spread(rows, mesh, spec), np.int32(owner))
                    continue
                if first.name not in tree:
                    tree[first.name] = _zeros((num_layers, *first.shape), sharding)()
                at = np.array([num_layers if e is None else e.layer for e in row], np.int32)
                tree[first.name] = _scatter(sharding)(tree[first.name], _spread(rows, mesh, spec[1:]), at)
    finally:
        stream.close()  # drops the file mappings
    _check_complete(zs, num_layers, targets, out)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        read = np.asarray(multihost_utils.process_allgather(read)).sum(axis=0)
    log.info("the optimizer state was read in %d parts, one per process: %s tensors, %s GiB (master and "
             "moments)", n, ", ".join(str(int(c)) for c in read[:, 0]),
             ", ".join(f"{b / 2**30:.3g}" for b in read[:, 1]))
    return out


def load(run: RunConfig, path: str, opt: optax.GradientTransformation, shardings: TrainState,
         groups: list[list] | None = None) -> TrainState:
    """The train state of the GPT-NeoX checkpoint at `path`, placed with `shardings`.  `groups`: the
    readers' devices (default `readers(mesh)`, one group per process; a test may split one process's
    devices to run the shared reading in one process)."""
    from ..convert.zero import read_zero

    zs = read_zero(path)
    if zs.iteration >= run.train.steps:
        raise UserError(f"train.init_from_neox {path}: the checkpoint is at iteration {zs.iteration}, the run ends "
                        f"at train.steps {run.train.steps}")
    adam, *rest = shardings.opt_state
    if not isinstance(adam, optax.ScaleByAdamState):
        raise TypeError(f"the optimizer's first state is {type(adam).__name__}, expected Adam's")
    targets = [flatten(shardings.params), flatten(adam.mu), flatten(adam.nu)]
    groups = readers(next(iter(targets[0].values())).mesh) if groups is None else groups
    if len(groups) > 1 and len({len(g) for g in groups}) > 1:
        log.warning("processes hold %s devices of the mesh (unequal): every process reads the whole optimizer "
                    "state", sorted({len(g) for g in groups}))
        groups = groups[:1]
    L = zs.reader.config.num_layers
    placed = _place(zs, L, targets) if len(groups) == 1 else _place_shared(zs, L, targets, groups)
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
