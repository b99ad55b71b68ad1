"""GPT-NeoX training state from DeepSpeed ZeRO-1/2 optimizer files: float32 master weights, Adam
moments and counters, to continue a GPT-NeoX run (Pythia, 20B) where it stopped.

Format (DeeperSpeed 0.3.15, which GPT-NeoX v1.0 pins and which trained Pythia and 20B; ZeRO stage 1,
`elastic_checkpoint` on by default), in SAVE/global_stepN/ next to the weights (convert/neox.py):

    zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt   one per data-parallel rank dp and model rank
                                                         mp = pipeline stage x TP + tensor-parallel rank
      ["param_shapes"]          OrderedDict name -> shape of the stage's parameters, in
                                `named_parameters` order ("2.attention.dense.weight"; "sequential.2...."
                                without pipeline parallelism); TP-sliced shapes
      ["optimizer_state_dict"]
        zero_stage 1, partition_count (= dp ranks), num_comm_intervals_per_group [C_g]
        local_sub_partitions_of_fp32_groups[g][c]   1-D float32, this rank's piece of interval c
        base_optimizer_state[g][c]                  {"exp_avg", "exp_avg_sq"}, the same pieces
        loss_scaler             DeepSpeed's DynamicLossScaler (cur_scale, cur_iter, last_overflow_iter,
                                cur_hysteresis, ...)
    mp_rank_{mp:02d}_model_states.pt   iteration, global_steps, skipped_steps, lr_scheduler{num_iters}

Parameter groups (GPT-NeoX `get_params_for_weight_decay_optimization`): group 0 every weight of a
non-norm module (embedding, QKV, dense, MLP, output layer); group 1 the LayerNorms and every bias; one
group holding everything when weight decay is 0.  A group's parameters, in `param_shapes` order, are
flattened into one buffer, zero-padded at its tail and cut into sub-partitions handed out round robin
(piece i to rank i mod dp, interval i div dp); the saved pieces have the padding removed, so the
group's buffer is the pieces concatenated interval-major, rank-minor, and its length must equal the
sum of its parameters' sizes (checked: a wrong group rule or order fails loudly, never mis-assigns).

Tensor-parallel pieces merge by convert/neox.py's rules (masters: row-parallel biases summed under
the parallel residual, as for the weights; their moments are identical copies and are averaged).
The Adam step count is not in these files (it lives in the optimizer's param group): it is taken as
the applied updates, global_steps - skipped_steps; DeepSpeed's own count differs by the warm-up step
it takes at start-up and restarts at every resume, which changes Adam's bias correction by less than
1e-4 relative once 180 updates have run (0.95^180), i.e. for any real checkpoint.

Newer runs (DeepSpeed >= 0.6, DeeperSpeed 2 and 3, i.e. GPT-NeoX since 2023; ZeRO-1 or 2, and the
`bf16_zero_pp_rank_...` files of bf16 runs) keep one contiguous partition per rank and group:
`single_partition_of_fp32_groups[g]` (tail padding removed; kept only by BF16_Optimizer, whose
`bf16_` files have no `zero_stage` and whose `group_paddings` say how much: a bf16 ZeRO-2 run's
`bf16_` files are stage_1_and_2.py's, padding removed), the moments in a torch optimizer state dict
(`base_optimizer_state["state"][g]`, padded to the partition: cut to the master's length) with
Adam's own `step`, which is then used as is, and `param_shapes` as a list per group, in buffer
order, in `mp_rank_XX_model_states.pt`.  The ranks' partitions concatenate to the group's buffer,
aligned to 2 x dp elements.

Newer DeepSpeed (0.19.8 does) also saves `param_alignment_paddings`: per group, the zeros after
each parameter inside the flat buffer (in buffer order; non-zero with
`zero_optimization.parameter_alignment`), skipped here.  A static loss scaler
(`dynamic_loss_scale` false: what a float32 run saves, at 1.0) is no scaler state to continue
(ZeroState.loss_scale None).

Checked against files DeepSpeed 0.19.8 itself wrote (tests/fixtures/deepspeed_zero1: ZeRO-1,
data-parallel 2; float32, bf16, fp16 with skipped steps, parameter_alignment, GPT-NeoX's pipeline
layout with two stages, and two tensor-parallel ranks; ZeRO-2 in float32 and in bf16), bit for bit
against DeepSpeed's own safe_get_full_fp32_param / safe_get_full_optimizer_state (per TP rank,
before the merge), and the counters and loss scaler against its live engine.  DeeperSpeed 0.3.15's
layout is checked against files its own engines and FP16_DeepSpeedZeroOptimizer_Stage1 wrote
(tests/fixtures/deeperspeed_0315: tag v1.0 run on CPU with CUDA calls shimmed, fp16 with 4 of 12
steps skipped, elastic checkpoint, every group cut into several communication intervals, some
sub-partitions all padding and saved empty; GPT-NeoX's sequential names with 2 data-parallel ranks,
Pythia's layout (pipe-parallel-size 1, model-parallel-size 1: a one-stage PipelineModule, `LL.<param>`
names, `layer_LL-model_00` weight files, `mp_rank_00` optimizer files) with 2 data-parallel ranks,
and 20B's pipeline layout with 2 stages x 2 tensor-parallel x 2 data-parallel ranks), bit for bit
against the optimizer's own fp32 sub-partitions and Adam state (per TP rank, before the merge), and
the counters and loss scaler against its engine; its files' Adam step (not saved) is the group's, the
applied updates plus the warm-up step (checked).  Without tensor parallelism (sequential and Pythia's
layouts) that holds for the whole read, through `read_zero` and `init_from_neox`; the TP merge is
checked against the published layout only.

The loss scaler (and, in newer files, the ZeRO stage enum and the slice mappings) are pickled
DeepSpeed classes: they are read through stand-ins allow-listed under DeepSpeed's names, with
torch's weights-only unpickler (no DeepSpeed code runs or is needed).

Memory: `read_zero` reads only the files' pickled metadata (names, shapes, piece lengths); the
values are copied out of the memory-mapped files one tensor (one layer's slice, merged over TP) at a
time by `ZeroState.arrays`, and every mapping is dropped whenever REMAP_BYTES have been copied
(touched pages of a mapping count as resident), so the host holds about one tensor's master and
moments plus REMAP_BYTES, not the files (12 bytes per parameter).  Legacy (pre-zip) torch files
cannot be mapped: torch reads them whole, for the metadata and again for the values, which are then
kept.
"""

from __future__ import annotations

import dataclasses
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import CheckpointError
from .formats import Entry, torch_load, torch_to_numpy
from .mapping import to_ours
from .neox import NEW_NAMES, NeoxReader, merge

_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_NAME = re.compile(r"^(?:sequential\.)?(\d+)\.(.+)$")
_NORM_MODULES = ("input_layernorm.", "post_attention_layernorm.", "norm.")
_MOMENTS = ("exp_avg", "exp_avg_sq")
REMAP_BYTES = 512 * 2**20  # copied out of the mapped files before every mapping is dropped


class _DeepSpeedScaler:
    """Stand-in for DeepSpeed's loss-scaler classes: holds the pickled attributes, runs nothing."""

    def __setstate__(self, state):
        self.__dict__.update(state)


def _zero_stage(value):
    """Stand-in for DeepSpeed's ZeroStageEnum(value) (an int enum)."""
    return int(value)


# DeepSpeed classes its files pickle: plain attribute holders, read through stand-ins (no DeepSpeed code)
_DS_GLOBALS = [(_DeepSpeedScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
               (_DeepSpeedScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
               (_DeepSpeedScaler, "deepspeed.utils.tensor_fragment.fragment_address"),
               (_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum")]


def optim_file(dp: int, mp: int) -> str:
    return f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"


def no_decay(name: str) -> bool:
    """GPT-NeoX's second parameter group (no weight decay): LayerNorm parameters and biases.  `name` as in
    param_shapes, "LL.<param>" or (no pipeline parallelism) "sequential.LL.<param>"."""
    m = _NAME.match(name)
    param = m.group(2) if m else name
    return param.endswith("bias") or param.startswith(_NORM_MODULES)


@dataclasses.dataclass
class ZeroState:
    """A GPT-NeoX run's training state at one checkpoint, in our parameter layout."""

    iteration: int  # batches consumed (the data position)
    updates: int  # optimizer updates applied (the LR schedule's count)
    adam_step: int | None  # Adam's own count where the files keep it (DeepSpeed >= 0.6), else None
    loss_scale: dict[str, float] | None  # cur_scale, cur_iter, last_overflow_iter, cur_hysteresis
    reader: NeoxReader
    tp: int
    dp: int
    pp: int
    _tensors: dict = dataclasses.field(repr=False, default_factory=dict)  # (ll, param) -> [tp] _Slice
    _files: "_Files" = dataclasses.field(repr=False, default_factory=lambda: _Files())

    def arrays(self, entries: list[Entry] | None = None) -> Iterator[tuple[Entry, np.ndarray, np.ndarray, np.ndarray]]:
        """(entry, float32 master, exp_avg, exp_avg_sq) for each of our (name, layer) slices (all of
        them, or `entries` of `reader.entries()` in the order given), our layout, read from the files as
        they are yielded (one at a time in host memory)."""
        r = self.reader
        try:
            for e in (r.entries() if entries is None else entries):
                ll, param, kind = r._where(e.name, e.layer)
                parts = self._tensors.get((ll, param))
                if parts is None or any(p is None for p in parts):
                    raise CheckpointError(f"{r.step_dir}: the optimizer files have no {param} of pipeline index "
                                          f"{ll} for every tensor-parallel rank")
                out = []
                for i in range(3):
                    k = "norm" if (i > 0 and kind == "rowbias") else kind  # moments of bias copies: identical
                    merged = merge(k, [p.read(self._files, i) for p in parts], r.parallel)
                    out.append(to_ours(e.name, merged, r.config).astype(np.float32, copy=False))
                yield e.with_dtype(np.float32), *out
        finally:
            self._files.release(everything=True)


class _Files:
    """The optimizer files' state dicts, memory-mapped when first read from and all dropped (so
    unmapped) whenever REMAP_BYTES have been copied out of them; legacy (non-zip) files, which torch
    reads whole, are kept once read."""

    def __init__(self):
        self._open: dict[Path, dict] = {}
        self._whole: set[Path] = set()
        self._copied = 0

    def osd(self, path: Path) -> dict:
        osd = self._open.get(path)
        if osd is None:
            osd = self._open[path] = _osd(torch_load(path, extra_globals=_DS_GLOBALS), path)
            if not zipfile.is_zipfile(path):
                self._whole.add(path)
        return osd

    def copy(self, path: Path, where: tuple, kind: int, lo: int, hi: int) -> np.ndarray:
        out = torch_to_numpy(_piece(self.osd(path), where, kind, path)[lo:hi])
        self._copied += out.nbytes
        if self._copied >= REMAP_BYTES:
            self.release()
        return out

    def release(self, everything: bool = False) -> None:
        self._open = {p: v for p, v in self._open.items() if p in self._whole and not everything}
        self._copied = 0


def _piece(osd: dict, where: tuple, kind: int, path: Path):
    """One piece of a flat group buffer as a 1-D torch view: kind 0 the float32 master, 1 exp_avg,
    2 exp_avg_sq; `where` (group, interval) for a DeepSpeed 0.3 sub-partition, (group,) for a newer
    rank partition (BF16_Optimizer files: the master without its tail padding; the moments cut to
    the master)."""
    try:
        if len(where) == 2:
            g, c = where
            if kind == 0:
                return osd["local_sub_partitions_of_fp32_groups"][g][c]
            return osd["base_optimizer_state"][g][c][_MOMENTS[kind - 1]]
        g, = where
        master = osd["single_partition_of_fp32_groups"][g]
        if _padded_master(osd, path):
            master = master[:master.numel() - int(osd["group_paddings"][g])]
        if kind == 0:
            return master
        return _adam_state(osd, g)[_MOMENTS[kind - 1]].reshape(-1)[:master.numel()]
    except (IndexError, KeyError, TypeError, AttributeError) as e:
        at = f"group {where[0]} interval {where[1]}" if len(where) == 2 else f"group {where[0]}"
        raise CheckpointError(f"{path}: {at}: no piece ({e!r})") from None


def _padded_master(osd: dict, path: Path) -> bool:
    """Whether a newer file's masters keep their tail padding: only BF16_Optimizer's (`bf16_` files
    without `zero_stage`).  bf16 runs under stage_1_and_2.py (ZeRO-2, or ZeRO-1 without float32
    gradient accumulation) write `bf16_` files too, but with `zero_stage` and the padding removed,
    as every precision does there."""
    return path.name.startswith("bf16_") and "zero_stage" not in osd and bool(osd.get("group_paddings"))


def _adam_state(osd: dict, g: int) -> dict:
    """Group g's Adam state in a DeepSpeed >= 0.6 file: a list per group, or a torch optimizer
    state dict (`state[g]`)."""
    base = osd["base_optimizer_state"]
    return base[g] if isinstance(base, list) else base["state"][g]


def _lengths(osd: dict, where: tuple, path: Path) -> int:
    """The piece's length, the same for the master and both moments (checked; metadata only)."""
    n = [int(_piece(osd, where, i, path).numel()) for i in range(3)]
    if len(set(n)) != 1:
        raise CheckpointError(f"{path}: group {where[0]}: master and moments have {n} values")
    return n[0]


@dataclasses.dataclass
class _Flat:
    """A parameter group's flat buffer: its pieces (file, where, length) in buffer order."""

    pieces: list[tuple[Path, tuple, int]]

    def __post_init__(self):
        self.ends = np.cumsum([n for *_, n in self.pieces], dtype=np.int64)

    @property
    def size(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, files: _Files, kind: int, lo: int, hi: int) -> np.ndarray:
        parts = []
        i = int(np.searchsorted(self.ends, lo, side="right"))
        while lo < hi:
            path, where, n = self.pieces[i]
            begin, end = int(self.ends[i]) - n, int(self.ends[i])
            parts.append(files.copy(path, where, kind, lo - begin, min(hi, end) - begin))
            lo, i = min(hi, end), i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class _Slice:
    """One tensor-parallel rank's piece of a parameter: values [at, at + size) of a group buffer."""

    flat: _Flat
    at: int
    shape: tuple[int, ...]

    def read(self, files: _Files, kind: int) -> np.ndarray:
        return self.flat.read(files, kind, self.at, self.at + int(np.prod(self.shape))).reshape(self.shape)


def _shapes(named: dict) -> dict[str, tuple[int, ...]]:
    """param_shapes entries under today's GPT-NeoX parameter names."""
    return {NEW_NAMES.get(n, n): tuple(v) for n, v in named.items()}


def _osd(sd: Any, path: Path) -> dict:
    osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
    if not isinstance(osd, dict):
        raise CheckpointError(f"{path}: no 'optimizer_state_dict' (not a DeepSpeed ZeRO optimizer file)")
    return osd


def _split_groups(names: list[str], count: int, where: Path) -> list[list[str]]:
    """GPT-NeoX's parameter groups from named_parameters order: weights decayed, then the rest."""
    if count == 1:
        return [names]  # weight decay 0: one group
    if count != 2:
        raise CheckpointError(f"{where}: {count} parameter groups; GPT-NeoX has 2 (or 1 without weight decay)")
    return [[n for n in names if not no_decay(n)], [n for n in names if no_decay(n)]]


def _pieces_v03(files: list[Path], sds: list, osds: list[dict]) -> tuple[list[list[str]], dict, list, None]:
    """DeeperSpeed 0.3 ZeRO-1 (elastic): (groups, shapes, per group a _Flat of its pieces (file,
    (group, interval), length) in buffer order, Adam step (not saved: None))."""
    if not isinstance(osds[0].get("base_optimizer_state"), list):
        raise CheckpointError(f"{files[0]}: base_optimizer_state is not a per-group list (an "
                              f"'elastic_checkpoint: false' file, not supported)")
    if not isinstance(sds[0].get("param_shapes"), dict):
        raise CheckpointError(f"{files[0]}: no param_shapes (name -> shape) to cut the flat groups with")
    shapes = _shapes(sds[0]["param_shapes"])
    groups = _split_groups(list(shapes), len(osds[0]["local_sub_partitions_of_fp32_groups"]), files[0])
    pieces = []
    for g in range(len(groups)):
        try:
            count = int(osds[0]["num_comm_intervals_per_group"][g])
        except (IndexError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{files[0]}: group {g}: no num_comm_intervals_per_group ({e!r})") from None
        pieces.append(_Flat([(f, (g, c), _lengths(osd, (g, c), f)) for c in range(count)
                             for f, osd in zip(files, osds)]))
    return groups, shapes, pieces, None


def _pieces_v06(files: list[Path], sds: list, osds: list[dict], model_states: Path
                ) -> tuple[list[list[str]], dict, list, int | None]:
    """DeepSpeed >= 0.6 / DeeperSpeed 2-3 ZeRO-1/2 (`stage_1_and_2.py`, and `bf16_` files), also
    DeeperSpeed 0.3's ZeRO-2: one contiguous partition per rank and group; the moments may carry the
    partition's tail padding (cut to the master's length), BF16_Optimizer files the master too
    (group_paddings)."""
    if isinstance(sds[0].get("param_shapes"), dict):  # DeeperSpeed 0.3 ZeRO-2: flat, named_parameters order
        shapes = _shapes(sds[0]["param_shapes"])
        groups = _split_groups(list(shapes), len(osds[0]["single_partition_of_fp32_groups"]), files[0])
    else:
        ms = torch_load(model_states, extra_globals=_DS_GLOBALS) if model_states.exists() else None
        per_group = ms.get("param_shapes") if isinstance(ms, dict) else None
        if not isinstance(per_group, list):
            raise CheckpointError(f"{model_states}: no param_shapes (a list per parameter group) to cut the "
                                  f"flat groups with")
        groups = [list(_shapes(grp)) for grp in per_group]
        shapes = {n: v for grp in per_group for n, v in _shapes(grp).items()}
    pieces, step = [], None
    for g in range(len(groups)):
        flat = []
        for f, osd in zip(files, osds):
            flat.append((f, (g,), _lengths(osd, (g,), f)))
            try:
                s = _adam_state(osd, g).get("step")
                base = osd["base_optimizer_state"]
                if s is None and isinstance(base, dict):
                    s = base.get("param_groups", [{}])[g].get("step")
                step = int(s) if s is not None and int(s) > 0 else step
            except (IndexError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{f}: group {g}: no partition ({e!r})") from None
        pieces.append(_Flat(flat))
    return groups, shapes, pieces, step


def _param_paddings(files: list[Path], osds: list[dict], groups: list[list[str]]) -> list[list[int]]:
    """Per group, the zeros newer DeepSpeed puts after each of its parameters inside the flat buffer
    (`param_alignment_paddings`, in buffer order: non-zero with `zero_optimization.parameter_alignment`,
    each parameter but the group's last padded to 16 bytes); no file key, no padding."""
    pads = osds[0].get("param_alignment_paddings")
    if pads is None:
        return [[0] * len(g) for g in groups]
    for f, osd in zip(files[1:], osds[1:]):
        if osd.get("param_alignment_paddings") != pads:
            raise CheckpointError(f"{f}: param_alignment_paddings differ from {files[0].name}'s")
    try:
        out = [[int(p) for p in pads[g]] for g in range(len(groups))]
    except (IndexError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{files[0]}: param_alignment_paddings is not a list of paddings per group "
                              f"({e!r})") from None
    for g, (pad, group) in enumerate(zip(out, groups)):
        if len(pad) != len(group):
            raise CheckpointError(f"{files[0]}: param_alignment_paddings has {len(pad)} entries for group {g}, "
                                  f"param_shapes {len(group)} parameters")
    return out


def optimizer_files(step_dir: Path) -> dict[tuple[int, int], Path]:
    """{(data-parallel rank, model rank): path} of the ZeRO optimizer files in a global_stepN directory."""
    return {(int(m.group(2)), int(m.group(3))): p for p in step_dir.iterdir() if (m := _OPTIM_FILE.match(p.name))}


def optimizer_ranks(found: dict[tuple[int, int], Path]) -> tuple[int, int]:
    """(data-parallel ranks, model ranks) that `optimizer_files` found (the highest of each, plus one)."""
    return 1 + max(d for d, _ in found), 1 + max(m for _, m in found)


def read_zero(path: str | Path, config_files: list[str] | None = None) -> ZeroState:
    """The training state of the GPT-NeoX checkpoint at `path` (SAVE or SAVE/global_stepN)."""
    reader = NeoxReader(Path(path), config_files)
    step_dir, tp = reader.step_dir, reader.tp
    found = optimizer_files(step_dir)
    if not found:
        raise CheckpointError(f"{step_dir}: no zero_pp_rank_*_mp_rank_*_optim_states.pt files (the checkpoint "
                              f"has no ZeRO optimizer state)")
    prefix = "bf16_" if next(iter(found.values())).name.startswith("bf16_") else ""
    dp, mp = optimizer_ranks(found)
    for d in range(dp):
        for m in range(mp):
            if (d, m) not in found:
                raise CheckpointError(f"{step_dir / (prefix + optim_file(d, m))}: missing (data-parallel rank {d}, "
                                      f"model rank {m} of {dp} x {mp})")
    if mp % tp:
        raise CheckpointError(f"{step_dir}: {mp} model ranks in the optimizer files, not a multiple of the "
                              f"checkpoint's {tp} tensor-parallel ranks")
    tensors: dict = {}
    scaler = adam_step = None
    for m in range(mp):
        files = [found[(d, m)] for d in range(dp)]
        sds = [torch_load(f, extra_globals=_DS_GLOBALS) for f in files]
        osds = [_osd(sd, f) for sd, f in zip(sds, files)]
        for f, osd in zip(files, osds):
            counts = osd.get("partition_count")
            if any(c != dp for c in (counts if isinstance(counts, (list, tuple)) else [counts])):
                raise CheckpointError(f"{f}: partition_count {counts!r}, but {dp} data-parallel ranks have files")
        if "local_sub_partitions_of_fp32_groups" in osds[0]:
            groups, shapes, pieces, step = _pieces_v03(files, sds, osds)
        elif "single_partition_of_fp32_groups" in osds[0]:
            groups, shapes, pieces, step = _pieces_v06(files, sds, osds, step_dir / f"mp_rank_{m:02d}_model_states.pt")
        else:
            raise CheckpointError(f"{files[0]}: neither local_sub_partitions_of_fp32_groups (DeepSpeed 0.3 ZeRO-1) "
                                  f"nor single_partition_of_fp32_groups (ZeRO-1/2): keys {sorted(osds[0])}")
        adam_step = step if step is not None else adam_step
        pads = _param_paddings(files, osds, groups)
        if any(n.startswith("tied_modules.") for n in shapes):
            raise CheckpointError(f"{files[0]}: tied embeddings (tied_modules.*) are not supported")
        for g, group in enumerate(groups):
            flat = pieces[g]
            want = sum(int(np.prod(shapes[n])) for n in group) + sum(pads[g])
            # a ZeRO-1/2 group is aligned to 2 x dp elements; a tail of padding under that is dropped
            if not want <= flat.size < want + 2 * dp:
                raise CheckpointError(f"{files[0]}: parameter group {g} holds {flat.size} values over {dp} "
                                      f"rank(s), its {len(group)} parameters in param_shapes have {want}"
                                      + (" with their alignment padding" if any(pads[g]) else ""))
            at = 0
            for n, pad in zip(group, pads[g]):
                size = int(np.prod(shapes[n]))
                mt = _NAME.match(n)
                if not mt:
                    raise CheckpointError(f"{files[0]}: parameter {n!r} has no pipeline index")
                key = (int(mt.group(1)), mt.group(2))
                slot = tensors.setdefault(key, [None] * tp)
                slot[m % tp] = _Slice(flat, at, tuple(shapes[n]))
                at += size + pad
        if m == 0:
            scaler = getattr(osds[0].get("loss_scaler"), "__dict__", None)
            if scaler is not None and (osds[0].get("dynamic_loss_scale") is False or scaler.get("dynamic") is False):
                scaler = None  # a static LossScaler (float32 runs save one at 1.0): no state to continue
        del sds, osds, pieces
    known = {reader._where(e.name, e.layer)[:2] for e in reader.entries()}
    unknown = sorted(set(tensors) - known)
    if unknown:
        ll, param = unknown[0]
        raise CheckpointError(f"{step_dir}: the optimizer files hold {ll}.{param}, not a parameter of this model "
                              f"(learned position embeddings, or another architecture)")
    client = torch_load(step_dir / "mp_rank_00_model_states.pt", extra_globals=_DS_GLOBALS)
    iteration = client.get("iteration", client.get("total_iters")) if isinstance(client, dict) else None
    if iteration is None:
        raise CheckpointError(f"{step_dir / 'mp_rank_00_model_states.pt'}: no 'iteration'")
    sched = client.get("lr_scheduler") or {}
    if "num_iters" in sched:
        updates = int(sched["num_iters"])
    elif "global_steps" in client:
        updates = int(client["global_steps"]) - int(client.get("skipped_steps", 0))
    else:
        raise CheckpointError(f"{step_dir / 'mp_rank_00_model_states.pt'}: neither lr_scheduler.num_iters nor "
                              f"global_steps (the applied updates)")
    loss_scale = None
    if scaler is not None and "cur_scale" in scaler:
        loss_scale = {k: float(scaler[k]) for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
                      if k in scaler}
    return ZeroState(iteration=int(iteration), updates=updates, adam_step=adam_step, loss_scale=loss_scale,
                     reader=reader, tp=tp, dp=dp, pp=mp // tp, _tensors=tensors)
