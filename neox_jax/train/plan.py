"""`neox-jax plan`: size a pod before paying for it, by compiling the real train step for it.

    neox-jax plan configs/train/neox-20b.yaml --devices 64 --mesh 1,16,4 --device-memory 80GiB

The run's train step (`step.make_train_step`, the same function `neox-jax train` runs) is lowered
and compiled ahead of time (`jit(...).lower(...).compile()`) for N simulated CPU devices with the
model's real shapes: the state and batch are `jax.ShapeDtypeStruct`s carrying their shardings, so
nothing is allocated.  From the compiled SPMD program (one program = one device) it reports:

  parameters, optimizer state, batch   bytes per device from each leaf's shard shape (float32 master
                                       parameters, two float32 AdamW moments each)
  arguments, temporaries, outputs      XLA's `memory_analysis()`: temporaries are activations, saved
                                       residuals, gradients, gathered FSDP shards and scratch; the
                                       state is donated, so outputs alias arguments
  peak estimate                        arguments + outputs - aliased + temporaries, compared with
                                       `--device-memory`
  FLOPs per device per step            matmul FLOPs of every dot in the compiled HLO times the trip
                                       counts of its loops (counts rematerialised work), the project's
                                       model-FLOPs formula (`neox_jax.flops`) / N, and XLA's own
                                       `cost_analysis()` (which counts a loop body once: low for scans)
  collectives                          every all-reduce / all-gather / reduce-scatter / all-to-all /
                                       collective-permute in the HLO, times the trip count of the
                                       loops around it (layer scan, micro-batch scan), with result bytes;
                                       on several nodes (`--nodes`, or the config's mesh.dcn_* factors)
                                       also those whose device groups span two nodes: the devices are
                                       split into consecutive node blocks and the mesh is the hybrid
                                       mesh training builds, so this is what crosses the slow network

With `--target h100|h200` the program is compiled by XLA's GPU compiler instead, for devices of that
card described to it (gpu_target.py; no GPU needed): GPU fusion, buffer assignment and collectives,
cuDNN attention as configured, so the memory analysis is the card's (checked against a measured
H200 peak).  The rest of this docstring is about the default, simulated CPU devices.

Caveats: the program is compiled by XLA's CPU backend, whose fusion and buffer assignment differ from
the GPU and TPU backends (the cuDNN attention kernel becomes plain XLA attention here), so temporaries
are an estimate, usually within tens of percent; parameter, optimizer and collective numbers follow
from the shardings and are exact.  Collective bytes are the result size per device per step.  The CPU
backend widens every bfloat16/float16 collective to float32 (it has none of its own), which made a
bf16 run's FSDP all-gathers look float32 (twice their bytes) in this tool's first version.  So the
module right after SPMD partitioning is dumped during the same compile, and each kind's bytes are
also given as GPU/TPU would move them: scaled by that module's ratio of real to widened bytes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_CALLEES = re.compile(r"(?:body|calls|to_apply)=%([\w.\-]+)|branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def compile_with_partitioned_module(lowered, module: str) -> tuple[Any, str]:
    """(compiled, HLO text of the module right after SPMD partitioning), from one compile: the
    per-device program with the collectives' element types as the partitioner chose them, before
    backend passes (the CPU backend widens bf16 collectives to float32 later)."""
    with tempfile.TemporaryDirectory(prefix="neox-jax-plan-") as dump:
        compiled = lowered.compile(compiler_options={"xla_dump_to": dump, "xla_dump_hlo_module_re": module,
                                                     "xla_dump_hlo_pass_re": "spmd-partitioning"})
        partitioned = sorted(Path(dump).glob(f"*{module}*after_spmd-partitioning*.txt"))
        if not partitioned:
            raise UserError("plan: XLA wrote no module after SPMD partitioning "
                            f"({len(list(Path(dump).iterdir()))} dump files); cannot tell collective dtypes")
        return compiled, partitioned[0].read_text()


def unwidened_ratio(partitioned_hlo: str) -> dict[str, float]:
    """Per collective kind: bytes of the partitioned module's collectives as written, divided by the
    same with every 2-byte float widened to float32 (what the CPU backend compiles).  1.0 when a kind
    moves only 4-byte types or does not occur."""
    real = {k: 0 for k in COLLECTIVES}
    wide = dict(real)
    for line in partitioned_hlo.splitlines():
        op = _OP.match(line)
        if op:
            real[op.group(2)] += _shape_bytes(op.group(1))
            wide[op.group(2)] += _shape_bytes(re.sub(r"\b(bf16|f16)\[", "f32[", op.group(1)))
    return {k: (real[k] / wide[k] if wide[k] else 1.0) for k in COLLECTIVES}


_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\((.*?)\))? \{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)")
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")


def _iota(spec: str) -> np.ndarray:
    """'[2,4]T(1,0)' -> iota(8) reshaped [2,4], transposed (1,0), flattened; '0,4,1,5' -> that list."""
    m = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", spec.strip())
    if not m:
        return np.array([int(x) for x in spec.split(",")])
    dims = [int(x) for x in m.group(1).split(",")]
    arr = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(2):
        arr = arr.transpose([int(x) for x in m.group(2).split(",")])
    return arr.ravel()


def collective_groups(line: str, n: int) -> list[list[int]] | None:
    """The device groups (partition ids 0..n-1) of one collective's HLO instruction, in any of the forms
    XLA prints: explicit `{{0,1},{2,3}}` (`{}`: all n devices), iota `[G,S]<=[dims]T(perm)`, mesh axes
    `mesh['axis_0'=4,...], device_ids=(...) {'axis_0'}`, and a collective-permute's source-target
    pairs (each pair a group).  None when the line has a form not known here."""
    m = _PAIRS.search(line)
    if m:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    m = _MESH_GROUPS.search(line)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        sizes = [int(k) for _, k in axes]
        ids = _iota(m.group(2)) if m.group(2) else np.arange(int(np.prod(sizes)))
        over = [i for i, (name, _) in enumerate(axes) if f"'{name}'" in m.group(3)]
        rest = [i for i in range(len(axes)) if i not in over]
        arr = ids.reshape(sizes).transpose(rest + over)
        return arr.reshape(-1, int(np.prod([sizes[i] for i in over]))).tolist()
    m = _IOTA_GROUPS.search(line)
    if m:
        return _iota(m.group(3)).reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = _LIST_GROUPS.search(line)
    if m:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
        return groups or [list(range(n))]
    return None


def crosses_nodes(line: str, node_of: Sequence[int]) -> bool | None:
    """Whether any group of the collective on `line` holds devices of two nodes (`node_of[k]`: the
    node of partition k); None when its groups cannot be read."""
    groups = collective_groups(line, len(node_of))
    if groups is None:
        return None
    return any(len({node_of[k] for k in g}) > 1 for g in groups)


def parse_size(text: str) -> int:
    """'80GiB' / '80 GB' / '16e9' -> bytes (GiB = 2^30, GB = 10^9)."""
    m = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.I)
    try:
        number = float(m.group(1)) if m else None
    except ValueError:  # '1.2.3'
        number = None
    if number is None:
        raise UserError(f"--device-memory {text!r}: expected a size such as 80GiB, 96GB or 16e9")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = number * mult
    if not 1 <= size < math.inf:
        raise UserError(f"--device-memory {text!r}: must be a finite size of at least one byte")
    return int(size)


def _shape_bytes(text: str, async_start: bool = False) -> int:
    """Bytes of an HLO result type (a tuple sums its parts; an async start's tuple holds the operands
    and then the results: only the results count)."""
    shapes = _SHAPE.findall(text)
    if async_start:
        shapes = shapes[len(shapes) // 2:]
    total = 0
    for dtype, dims in shapes:
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * _DTYPE_BYTES.get(dtype, 1)
    return total


_DEF = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[\d,]*\})? ")
_DOT = re.compile(r" dot\(%([\w.\-]+), %[\w.\-]+\).*?lhs_contracting_dims=\{([\d,]*)\}")


def _dims(shape: str) -> list[int]:
    m = _SHAPE.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def analyse_hlo(hlo: str, node_of: Sequence[int] | None = None) -> tuple[dict[str, dict[str, int]], float]:
    """(collectives, dot FLOPs) of an optimized HLO module's text, per device per step.

    collectives: {kind: {"count": executions, "bytes": result bytes}}; with `node_of` (the node of
    each partition id) also "across_nodes_count"/"across_nodes_bytes" for the collectives with a group
    spanning two nodes, and "groups_unread" (executions whose groups are in a form not known here:
    their crossing is unknown, not counted as within).  dot FLOPs: 2 x result
    elements x contracted size of every `dot`.  An instruction inside a while loop counts once per
    iteration (the loop's known_trip_count; 1 when XLA does not know it) and nested loops multiply,
    which XLA's own `cost_analysis()` does not do (it counts a loop body once)."""
    comps: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.startswith(" "):
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    memo: dict[str, dict[str, list[float]]] = {}

    def visit(name: str, stack: tuple = ()) -> dict[str, list[float]]:
        if name in memo:
            return memo[name]
        acc = {k: [0, 0, 0, 0, 0] for k in (*COLLECTIVES, "dot")}
        shapes = {}
        for line in comps.get(name, ()):
            d = _DEF.match(line)
            if d:
                shapes[d.group(1)] = d.group(2)
        for line in comps.get(name, ()):
            op = _OP.match(line)
            if op:
                a, nbytes = acc[op.group(2)], _shape_bytes(op.group(1), async_start=bool(op.group(3)))
                a[0] += 1
                a[1] += nbytes
                if node_of is not None:
                    cross = crosses_nodes(line, node_of)
                    a[2] += bool(cross)
                    a[3] += nbytes if cross else 0
                    a[4] += cross is None
            dot = _DOT.search(line)
            d = _DEF.match(line)
            if dot and d:
                lhs = _dims(shapes.get(dot.group(1), ""))
                contracted = int(np.prod([lhs[int(i)] for i in dot.group(2).split(",") if i])) if lhs else 0
                acc["dot"][0] += 1
                acc["dot"][1] += 2 * int(np.prod(_dims(d.group(2)))) * contracted
            trip = _TRIP.search(line)
            times = int(trip.group(1)) if (trip and " while(" in line) else 1
            for single, multi in _CALLEES.findall(line):
                for callee in ([single] if single else re.findall(r"%([\w.\-]+)", multi)):
                    if callee in comps and callee not in stack and callee != name:
                        sub = visit(callee, stack + (name,))
                        for k in acc:
                            for i in range(5):
                                acc[k][i] += times * sub[k][i]
        memo[name] = acc
        return acc

    total = visit(entry)
    names = ("count", "bytes") + (("across_nodes_count", "across_nodes_bytes", "groups_unread")
                                  if node_of is not None else ())
    return ({k: {n: int(v) for n, v in zip(names, total[k])} for k in COLLECTIVES}, float(total["dot"][1]))


@dataclasses.dataclass
class Plan:
    mesh: dict[str, int]
    devices: int
    nodes: int
    global_batch: int
    micro_batch: int
    seq_length: int
    compute_dtype: str
    remat: str
    param_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int
    flops_hlo: float
    flops_xla: float | None  # None: XLA gave no cost analysis (a deviceless GPU compile)
    flops_model: float
    collectives: dict[str, dict[str, int]]
    compile_s: float
    device_memory: int | None = None
    target: str = "cpu"  # what the program was compiled for: simulated CPU devices, or a GPU card (gpu_target)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak_bytes <= self.device_memory

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fits": self.fits}


def _leaf_bytes(abstract: Any, shardings: Any) -> int:
    import jax

    return int(sum(int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
                   for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))))


def per_node_sizes(total: tuple[int, int, int], dcn: tuple[int, int, int]) -> tuple[int, int, int]:
    """Total mesh sizes (one may be -1) -> the sizes within a node, given the across-node factors."""
    out = []
    for name, t, f in zip(("data", "fsdp", "tensor"), total, dcn):
        if t != -1 and t % f:
            raise ValueError(f"{name} {t} is not a multiple of its across-node factor {f} (mesh.dcn_{name})")
        out.append(t if t == -1 else t // f)
    return tuple(out)  # type: ignore[return-value]


def default_nodes(run) -> int:
    """The node count the config's mesh.dcn_* factors make (dcn_data 0 counting one)."""
    m = run.mesh
    return max(m.dcn_data, 1) * m.dcn_fsdp * m.dcn_tensor


def plan(run, mesh_shape: tuple[int, int, int] | None = None, devices: list | None = None,
         device_memory: int | None = None, nodes: int | None = None, target: str = "cpu") -> Plan:
    """Compile `run`'s train step for `devices` (default: all) on `mesh_shape` (total sizes; default:
    run.mesh's per-node sizes), the devices split into `nodes` consecutive blocks (default: what the
    config's mesh.dcn_* factors make, dcn_data 0 counting one) joined by a hybrid mesh as in training.
    `target`: "cpu", or the GPU card `devices` describe (gpu_target.devices), traced for a GPU."""
    import contextlib

    import jax

    from .. import flops
    from ..model import compiling_for
    from ..sharding import dcn_factors, make_mesh
    from . import state as S
    from . import step as T
    from .loop import check_micro_batch

    devices = list(devices if devices is not None else jax.devices())
    m = run.mesh
    nodes = nodes or default_nodes(run)
    try:
        if nodes < 1 or len(devices) % nodes:
            raise ValueError(f"{len(devices)} devices do not split into {nodes} nodes")
        dcn = dcn_factors(m.dcn_data, m.dcn_fsdp, m.dcn_tensor, nodes)
        if int(np.prod(dcn)) != nodes:
            raise ValueError(f"the across-node factors {dict(zip(('data', 'fsdp', 'tensor'), dcn))} (mesh.dcn_*) "
                             f"make {int(np.prod(dcn))} nodes, planning for {nodes}")
        ici = (m.data, m.fsdp, m.tensor) if mesh_shape is None else per_node_sizes(mesh_shape, dcn)
        node_ids = [i * nodes // len(devices) for i in range(len(devices))]
        mesh = make_mesh(*ici, devices=devices, dcn=dcn, nodes=node_ids)
    except ValueError as e:
        raise UserError(f"mesh: {e}") from None
    node_of = {d.id: k for d, k in zip(devices, node_ids)}
    partition_nodes = [node_of[d.id] for d in mesh.devices.flat] if nodes > 1 else None
    check_micro_batch(run, mesh)
    B, S_len = run.train.batch_size, run.data.seq_length
    opt = S.make_optimizer(run)
    sh = S.state_shardings(run, mesh, opt)
    state = S.abstract_state(run, opt, sh)
    with jax.set_mesh(mesh):
        batch = {"tokens": jax.ShapeDtypeStruct((B, S_len + 1), np.int32, sharding=T.batch_sharding(mesh))}
        if run.data.segment_ids:
            batch["segment_ids"] = batch["tokens"]
        with compiling_for("gpu") if target != "cpu" else contextlib.nullcontext():
            lowered = T.make_train_step(run, mesh, opt, sh).lower(state, batch)
        t0 = time.perf_counter()
        if target == "cpu":
            compiled, partitioned = compile_with_partitioned_module(lowered, "jit_step")
            ratio = unwidened_ratio(partitioned)
        else:  # the GPU compiler keeps bf16 collectives bf16: the compiled program's bytes are the real ones
            compiled, ratio = lowered.compile(), dict.fromkeys(COLLECTIVES, 1.0)
        compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # none from a deviceless GPU compile
    n = mesh.size
    collectives, dot_flops = analyse_hlo(compiled.as_text(), partition_nodes)
    for k, c in collectives.items():
        c["bytes_accelerator"] = int(round(c["bytes"] * ratio[k]))
        if partition_nodes is not None:
            c["across_nodes_bytes_accelerator"] = int(round(c["across_nodes_bytes"] * ratio[k]))
    batch_sh = jax.tree.map(lambda _: T.batch_sharding(mesh), batch)
    return Plan(
        mesh=dict(mesh.shape), devices=n, nodes=nodes, global_batch=B, micro_batch=run.micro_batch, seq_length=S_len,
        compute_dtype=run.model.compute_dtype, remat=run.model.remat,
        param_bytes=_leaf_bytes(state.params, sh.params),
        optimizer_bytes=_leaf_bytes(state.opt_state, sh.opt_state),
        batch_bytes=_leaf_bytes(batch, batch_sh),
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        peak_bytes=mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes,
        flops_hlo=dot_flops, flops_xla=float(cost["flops"]) if "flops" in cost else None,
        flops_model=flops.train_flops_per_token(run.model, S_len) * B * S_len / n,
        collectives=collectives, compile_s=compile_s, device_memory=device_memory, target=target)


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def format_plan(p: Plan) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in p.mesh.items())
    lines = [
        f"mesh {mesh} = {p.devices} devices"
        + (f" on {p.nodes} nodes of {p.devices // p.nodes}" if p.nodes > 1 else "")
        + f"; batch {p.global_batch} x {p.seq_length} "
        f"(micro-batch {p.micro_batch}); compute {p.compute_dtype}, remat {p.remat}; compiled in {p.compile_s:.1f} s "
        + ("for simulated CPU devices" if p.target == "cpu" else f"by XLA's GPU compiler for {p.target} devices"),
        "per device:",
        f"  parameters (float32)     {_gib(p.param_bytes)}",
        f"  optimizer state          {_gib(p.optimizer_bytes)}",
        f"  batch                    {_gib(p.batch_bytes)}",
        f"  arguments (XLA)          {_gib(p.argument_bytes)}",
        f"  temporaries (XLA)        {_gib(p.temp_bytes)}   activations, gradients, gathered shards",
        f"  peak estimate            {_gib(p.peak_bytes)}"
        + ("" if p.device_memory is None else
           f"   {'fits' if p.fits else 'DOES NOT FIT'} in {_gib(p.device_memory)}"),
        f"  FLOPs per step           {p.flops_hlo:.3e} matmul FLOPs in the HLO (loops x trip count, with "
        f"recomputation); {p.flops_model:.3e} model formula"
        + ("" if p.flops_xla is None else f"; [XLA cost_analysis {p.flops_xla:.3e}: loop bodies counted once]"),
        "  collectives per step     " + ("none" if not any(c["count"] for c in p.collectives.values()) else ""),
    ]
    for k, c in p.collectives.items():
        if c["count"]:
            lines.append(f"    {k:<20} {c['count']:>6} x, " + (
                f"{_gib(c['bytes'])} as compiled for CPU, {_gib(c['bytes_accelerator'])} on GPU/TPU (bf16 not widened)"
                if p.target == "cpu" else _gib(c["bytes"])))
            if p.nodes > 1:
                lines.append(f"      {'across nodes':<18} {c['across_nodes_count']:>6} x, "
                             f"{_gib(c['across_nodes_bytes_accelerator'])} on GPU/TPU"
                             + (f"; {c['groups_unread']} x with device groups not read (crossing unknown)"
                                if c["groups_unread"] else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="memory, FLOPs and collectives per device of a run on N devices (AOT compile, no hardware)",
        description="Compile the run's real train step for N simulated CPU devices with the model's real "
                    "shapes (nothing is allocated) and print, per device: parameter, optimizer, batch, argument "
                    "and temporary bytes (XLA's memory analysis), a peak estimate and whether it fits "
                    "--device-memory, FLOPs per step (XLA's count and the model formula), and the collectives "
                    "in the compiled program by kind with their bytes (loops counted per iteration). The CPU "
                    "backend's buffer assignment differs from GPU/TPU: treat temporaries as an estimate, or "
                    "compile for the GPU itself with --target (no GPU needed; see neox_jax/train/gpu_target.py).")
    p.add_argument("config", nargs="+", help="run YAML, or GPT-NeoX YAML file(s)")
    p.add_argument("--devices", type=int, required=True, metavar="N", help="devices to plan for")
    p.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                   help="total mesh sizes (one may be -1), each a multiple of its mesh.dcn_* factor; default: "
                        "the config's sizes within a node x its across-node factors")
    p.add_argument("--nodes", type=int, metavar="K",
                   help="the devices are K nodes of N/K (default: what mesh.dcn_* make, dcn_data 0 counting "
                        "one); the mesh is the hybrid mesh training builds, and each collective kind also "
                        "reports what crosses nodes")
    p.add_argument("--device-memory", metavar="SIZE", help="memory of one device, e.g. 80GiB, 96GB (default with "
                                                              "--target: the card's)")
    p.add_argument("--target", choices=["cpu", "h100", "h200"], default="cpu",
                   help="compile for simulated CPU devices (default), or with XLA's GPU compiler for H100 / H200 "
                        "devices (cuDNN attention as configured; buffer assignment as on the card: needs JAX's "
                        "CUDA plugin and cuDNN's library, not a GPU)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key, e.g. --set model.remat=full --set train.batch_size=64 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(run=_run_plan)


def _mesh_arg(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR sizes (>= 1, or one -1), e.g. 1,16,4")
    return sizes  # type: ignore[return-value]


# The largest mesh planned at all, on either target: 2^18 devices, more than the largest machines
# (--target h200 plans a data-parallel 2^18 in 20 s and 2.2 GB here); a larger --devices is refused
# before JAX builds a device list of that length (10^8 used to be killed for memory, with no message).
MAX_DEVICES = 1 << 18


def thread_limit() -> tuple[int, str] | None:
    """The most threads this machine lets a process start, and the setting that says so: the
    smallest of kernel.pid_max, kernel.threads-max and RLIMIT_NPROC (None where none is known)."""
    import resource

    limits = []
    for name in ("pid_max", "threads-max"):
        try:
            limits.append((int(Path(f"/proc/sys/kernel/{name}").read_text()), f"kernel.{name}"))
        except (OSError, ValueError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if soft != resource.RLIM_INFINITY:
        limits.append((soft, "ulimit -u"))
    return min(limits) if limits else None


def check_simulable(devices: int) -> None:
    """XLA's CPU client starts a thread for each simulated device: refuse, in one line, a count the
    machine cannot start (it used to abort in pthread_create, or be killed for memory at 10^8),
    keeping an eighth of the limit for everything else."""
    limit = thread_limit()
    if limit is not None and devices > limit[0] - limit[0] // 8:
        raise UserError(f"--devices {devices}: simulating that many CPU devices takes a thread each, and this "
                        f"machine allows {limit[0]} threads ({limit[1]}); plan on a machine that allows more, "
                        "or with --target h100|h200")


def _run_plan(args) -> None:
    import json
    import os

    from .config import load_run_config

    if not 1 <= args.devices <= MAX_DEVICES:
        raise UserError(f"--devices must be in [1, {MAX_DEVICES}], got {args.devices}")
    if args.nodes is not None and args.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {args.nodes}")
    mesh = _mesh_arg(args.mesh)
    memory = parse_size(args.device_memory) if args.device_memory else None
    if args.target != "cpu":
        from . import gpu_target

        gpu_target.use_packages()
    run = load_run_config(args.config, args.set, num_devices=args.devices)
    if args.target != "cpu":
        nodes = args.nodes or default_nodes(run)
        devices = gpu_target.devices(args.target, args.devices, nodes)
        memory = memory or gpu_target.CARDS[args.target]["memory"]
        result = plan(run, mesh, devices, memory, nodes=nodes, target=gpu_target.CARDS[args.target]["name"])
    else:
        if run.model.attention == "cudnn":  # planned with XLA attention (see the caveats above)
            remat = "dots" if run.model.remat == "dots_attn" else run.model.remat
            run = dataclasses.replace(run, model=run.model.replace(attention="xla", remat=remat))
        check_simulable(args.devices)
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
        import jax

        jax.config.update("jax_platforms", "cpu")
        cpus = jax.devices("cpu")
        if len(cpus) < args.devices:
            raise UserError(f"JAX already started with {len(cpus)} CPU devices; run `neox-jax plan` in a fresh "
                            "process")
        result = plan(run, mesh, cpus[:args.devices], memory, nodes=args.nodes)
    print(json.dumps(result.to_dict()) if args.json else format_plan(result))
