"""Mesh and logical-axis rules: the only place that maps names to mesh axes.

Mode: **Auto axis types** (the MaxText way).  The mesh is built with
`axis_types=(AxisType.Auto,) * 3`; parameters are placed by `NamedSharding`s derived from their
logical axis names through `RULES`, and activations are steered with
`jax.lax.with_sharding_constraint` (`constrain`).  XLA's SPMD partitioner inserts the collectives.

Mesh axes
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  tensor (model) parallelism: heads and MLP columns split, Megatron style

Logical axes (every parameter names one per dimension; see docs/params.md)
  vocab, embed, embed_vec, heads, head_dim, qkv, mlp, layers       (parameters)
  batch, seq, act_embed, act_heads, act_mlp, act_vocab             (activations)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_vec": None,  # LayerNorm scales/biases and D-sized biases: small, replicated
    "heads": "tensor",
    "head_dim": None,
    "qkv": None,
    "mlp": "tensor",
    "layers": None,  # the scanned axis is never split
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

# Decoding (generate.py): tensor parallelism only.  One token per step reads every weight once, so
# FSDP would all-gather the whole model every token; here weights stay split over `tensor` (heads,
# MLP columns, vocabulary) and are never gathered, the KV cache is split by heads, and the batch
# goes over `data`.  A model that does not fit one device decodes on a (data=1, fsdp=1, tensor=N) mesh.
DECODE_RULES: dict[str, Any] = {
    **RULES,
    "embed": None,
    "batch": "data",
}


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, Any] = RULES) -> P:
    """('layers', 'embed', 'mlp') -> PartitionSpec(None, 'fsdp', 'tensor'); a mesh axis is used once."""
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in neox_jax.sharding.RULES")
        target = rules[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*out)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Iterable | None = None,
              dcn: Sequence[int] = (1, 1, 1), nodes: Sequence[int] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types; one size may be -1 (the rest).

    With `dcn` factors (data, fsdp, tensor) whose product is > 1, the sizes are per node/slice and
    axis i spans dcn[i] x size[i] devices (`hybrid_device_array`; `nodes`: each device's node, given
    instead of found, as `neox-jax plan` does for simulated devices)."""
    devices = list(devices if devices is not None else jax.devices())
    if int(np.prod(dcn)) > 1:
        arr = hybrid_device_array((data, fsdp, tensor), dcn, devices, nodes)
        return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(zip(MESH_AXES, shape))}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def slice_indices(devices: Sequence[Any]) -> list[int] | None:
    """Each device's `slice_index` when every device has one, else None.  TPUs number their slices;
    GPUs under jax.distributed number their hosts (XLA groups processes by the host's boot id, so one
    process per GPU and one per node both give one index per node; newer JAX also calls it
    `partition_index`).  A single-process CPU backend has none; CPU processes under jax.distributed
    all report 0, so there a node count is given explicitly (mesh.dcn_*)."""
    idx = [getattr(d, "slice_index", getattr(d, "partition_index", None)) for d in devices]
    return None if any(i is None for i in idx) else [int(i) for i in idx]


def by_slice_index(devices: Sequence[Any], count: int) -> bool:
    """Whether `granules` groups these devices by their slice_index (else by process blocks)."""
    slices = slice_indices(devices)
    return slices is not None and len(set(slices)) == count


def granules(devices: Sequence[Any], count: int) -> list[int]:
    """Which of `count` granules (units joined by the slow network: TPU slices, or nodes) each device
    belongs to: its slice_index when the devices carry `count` distinct ones; otherwise (CPU, or
    factors that split a node) a granule is a block of consecutive processes (srun and launch/*.sh
    number a node's processes consecutively)."""
    if count == 1:
        return [0] * len(devices)
    if by_slice_index(devices, count):
        slices = slice_indices(devices)
        order = sorted(set(slices))
        return [order.index(i) for i in slices]
    procs = sorted({d.process_index for d in devices})
    if len(procs) % count:
        raise ValueError(f"{len(procs)} processes do not divide into {count} nodes/slices (the product of the "
                         "dcn_* mesh factors)")
    per = len(procs) // count
    return [procs.index(d.process_index) // per for d in devices]


@dataclasses.dataclass(frozen=True)
class _InGranule:
    """A device seen by mesh_utils with its granule as `slice_index` (for non-TPU nodes)."""

    device: Any
    slice_index: int

    def __getattr__(self, name):
        return getattr(self.device, name)


def node_count(devices: Sequence[Any]) -> int:
    """Nodes/slices the devices span, the default across-node factor: the distinct slice indices
    where devices carry them (TPU slices; GPU hosts), else (CPU) the processes when each holds several
    devices, else 1 (one device per process on CPU: say mesh.dcn_* explicitly)."""
    slices = slice_indices(devices)
    if slices is not None:
        return len(set(slices))
    procs = {d.process_index for d in devices}
    return len(procs) if len(devices) > len(procs) else 1


def dcn_factors(dcn_data: int, dcn_fsdp: int, dcn_tensor: int, nodes: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) across-node factors of a run on `nodes` nodes: mesh.dcn_* as given,
    with dcn_data 0 meaning what the other two leave (nodes / (dcn_fsdp x dcn_tensor), at least 1)."""
    if dcn_data:
        return dcn_data, dcn_fsdp, dcn_tensor
    if nodes % (dcn_fsdp * dcn_tensor) and nodes > 1:
        raise ValueError(f"{nodes} nodes do not divide by dcn_fsdp x dcn_tensor = {dcn_fsdp * dcn_tensor} "
                         "(set mesh.dcn_data)")
    return max(nodes // (dcn_fsdp * dcn_tensor), 1), dcn_fsdp, dcn_tensor


def hybrid_device_array(ici: Sequence[int], dcn: Sequence[int], devices: Sequence[Any],
                        nodes: Sequence[int] | None = None) -> np.ndarray:
    """Devices as an array of shape ici * dcn (elementwise) for the axes ('data', 'fsdp', 'tensor'):
    axis i is dcn[i] granules of ici[i] devices, built by `mesh_utils.create_hybrid_device_mesh`, so
    each granule holds a contiguous [ici] block and only the dcn part of an axis crosses the slow
    network.  One ici size may be -1 (the rest of a granule's devices).  `nodes`: each device's
    granule (0 .. count-1), overriding `granules`."""
    from jax.experimental import mesh_utils

    count = int(np.prod(dcn))
    if any(x < 1 for x in dcn):
        raise ValueError(f"dcn mesh factors must be >= 1, got {dict(zip(MESH_AXES, dcn))}")
    if len(devices) % count:
        raise ValueError(f"{len(devices)} devices do not divide into {count} nodes/slices")
    per = len(devices) // count
    ici = list(ici)
    if ici.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in ici:
        known = int(np.prod([s for s in ici if s != -1]))
        if per % known:
            raise ValueError(f"{per} devices per node/slice do not divide into mesh {dict(zip(MESH_AXES, ici))}")
        ici[ici.index(-1)] = per // known
    if int(np.prod(ici)) != per:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, ici))} within a node/slice needs {int(np.prod(ici))} devices, "
                         f"each of the {count} nodes/slices has {per}")
    if nodes is not None and (len(nodes) != len(devices) or set(nodes) != set(range(count))):
        raise ValueError(f"nodes {list(nodes)[:16]}... must number {len(devices)} devices' nodes 0..{count - 1}")
    tagged = [_InGranule(d, g) for d, g in zip(devices, granules(devices, count) if nodes is None else nodes)]
    sizes = np.bincount([t.slice_index for t in tagged], minlength=count)
    if (sizes != per).any():
        raise ValueError(f"devices per node/slice are {sizes.tolist()}, not {per} each")
    arr = mesh_utils.create_hybrid_device_mesh(ici, list(dcn), tagged)
    return np.vectorize(lambda t: t.device, otypes=[object])(arr)


def tree_shardings(axes_tree: Any, mesh: Mesh, shapes_tree: Any | None = None,
                   rules: Mapping[str, Any] = RULES) -> Any:
    """Tree of logical-axis tuples -> tree of NamedShardings (`rules`: RULES or DECODE_RULES).

    With `shapes_tree`, a dimension that the mesh axis does not divide is left replicated
    (e.g. 8 heads on tensor=16), so any model runs on any mesh."""
    def one(axes, shape=None):
        spec = logical_to_spec(axes, rules)
        if shape is not None:
            spec = fit_spec(spec, shape.shape, mesh.shape)
        return NamedSharding(mesh, spec)

    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)  # noqa: E731
    if shapes_tree is None:
        return jax.tree.map(one, axes_tree, is_leaf=is_axes)
    return jax.tree.map(one, axes_tree, shapes_tree, is_leaf=is_axes)


def fit_spec(spec: P, shape: Sequence[int], mesh_shape: Mapping[str, int]) -> P:
    """Drop the mesh axes of any dimension they do not divide evenly (that dimension is replicated)."""
    parts = []
    for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (part,) if isinstance(part, str) else tuple(part or ())
        size = int(np.prod([mesh_shape[n] for n in names])) if names else 1
        parts.append(part if dim % size == 0 else None)
    return P(*parts)


def _current_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Mapping[str, Any] = RULES) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `jax.set_mesh(mesh)`."""
    mesh = _current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(logical_to_spec(axes, rules), x.shape, mesh.shape))
