"""A training run's configuration: one YAML file, one frozen validated dataclass per section.

    model:      ModelConfig (neox_jax.config): a preset name, a mapping of its keys, or a mapping
                with `preset: NAME` plus the keys that differ from that preset
    mesh:       MeshConfig        device mesh ('data', 'fsdp', 'tensor')
    data:       DataConfig        NeoX indexed datasets, split or blend, sequence length, loss mask
    optimizer:  OptimizerConfig   AdamW, LR schedule, clipping, loss scaling, z-loss
    train:      TrainConfig       steps, batch, accumulation, seed, logging and validation cadence
    checkpoint: CheckpointConfig  when training checkpoints are written and which are kept

`load_run_config(paths, overrides)` reads our YAML or GPT-NeoX's own YAML (detected by its keys;
see `neox_yaml.py`), applies `--set section.key=value` overrides, and validates across sections.
`RunConfig.to_dict()` is the resolved config written into the run directory; reading it back gives
the same RunConfig.  `configs/train/tinyshakespeare.yaml` documents every key.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..config import ConfigError, ModelConfig, UniqueKeyLoader, _read_text, _yaml_problem, load_config, load_yaml
from ..config import from_dict as model_from_dict
from ..values import check_float, check_seed, check_split, check_weights

SCHEDULES = ("neox_2022", "neox_2023")
DECAY_STYLES = ("cosine", "linear", "exponential", "constant")
LOSS_SCALES = ("none", "dynamic", "static")


class _Loader(UniqueKeyLoader):
    """PyYAML's safe loader (YAML 1.1), refusing a key given twice, plus YAML 1.2's floats without a
    dot or exponent sign (`3e-4`, `1e3`, `1.0e8`), which YAML 1.1 reads as strings: `--set
    optimizer.lr=3e-4` and `lr: 3e-4` in a run config mean the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load_yaml(text: str) -> Any:
    return load_yaml(text, _Loader)


def _check_fields(obj) -> None:
    """Type-check a section's fields (ints are not bools, floats accept ints and must be finite, tuples from
    lists)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, t = getattr(obj, f.name), hints[f.name]
        name = f"{_SECTION_OF[type(obj)]}.{f.name}"
        if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            object.__setattr__(obj, f.name, check_float(v, name))  # not NaN or infinite
        elif typing.get_origin(t) is tuple:
            if isinstance(v, (str, int, float)) and not isinstance(v, bool):
                v = (v,)
            if not isinstance(v, (list, tuple)):
                raise ConfigError(f"{name} must be a list, got {v!r}")
            item = typing.get_args(t)[0]
            conv = []
            for i, x in enumerate(v):
                if item is float and isinstance(x, (int, float)) and not isinstance(x, bool):
                    x = check_float(x, f"{name}[{i}]")
                if not isinstance(x, item) or isinstance(x, bool):
                    raise ConfigError(f"{name} must be a list of {item.__name__}, got {v!r}")
                conv.append(x)
            object.__setattr__(obj, f.name, tuple(conv))
        elif t in (int, str, bool, float):
            if not isinstance(v, t) or (t is int and isinstance(v, bool)):
                raise ConfigError(f"{name} must be {t.__name__}, got {v!r}")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # sizes within one node / TPU slice (NVLink, ICI); one may be -1 (the rest of its devices)
    data: int = 1  # pure data parallelism (parameters replicated)
    fsdp: int = -1  # data parallelism with parameters and optimizer state sharded; -1: the rest
    tensor: int = 1  # tensor parallelism (heads, MLP columns, vocabulary)
    # factors across nodes / slices (InfiniBand, DCN): axis size = within x across
    dcn_data: int = 0  # 0: the number of nodes/slices (data parallelism across them), 1 when alone
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    # several processes (neox_jax/distributed.py; usually set by a launcher, not here): all three or none
    coordinator: str = ""  # HOST:PORT of process 0's coordination service
    num_processes: int = 0  # 0: single process, or detected from SLURM / the launcher's environment
    process_id: int = -1  # this process's rank in [0, num_processes)

    def __post_init__(self):
        _check_fields(self)
        sizes = (self.data, self.fsdp, self.tensor)
        _need(all(s == -1 or s >= 1 for s in sizes), f"mesh sizes must be >= 1 or -1, got {sizes}")
        _need(sizes.count(-1) <= 1, "at most one mesh axis may be -1")
        _need(self.dcn_data >= 0 and self.dcn_fsdp >= 1 and self.dcn_tensor >= 1,
              f"mesh.dcn_data must be >= 0 (0: one per node/slice), dcn_fsdp and dcn_tensor >= 1, got "
              f"{(self.dcn_data, self.dcn_fsdp, self.dcn_tensor)}")
        _need(self.num_processes >= 0, f"mesh.num_processes must be >= 0, got {self.num_processes}")
        _need(self.process_id >= -1, f"mesh.process_id must be >= 0 (or -1: unset), got {self.process_id}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # GPT-NeoX's train-data-paths route (Pythia): indexed-dataset prefixes, blended by weight
    train_paths: tuple[str, ...] = ()
    train_weights: tuple[float, ...] = ()
    valid_paths: tuple[str, ...] = ()
    valid_weights: tuple[float, ...] = ()
    # GPT-NeoX's data-path route (20B): one prefix cut into train/valid/test documents by `split`
    path: str = ""
    split: str = "969,30,1"
    seq_length: int = 2048
    seed: int = 1234  # numpy RandomState seed of the sample order (NeoX: the run's seed)
    eod_id: int = 0
    mask_eod_loss: bool = False  # NeoX eod_mask_loss: no loss where the input token is EOD
    segment_ids: bool = False  # per-document attention (NeoX trains without it)
    save_index_maps: bool = False  # write GPT-NeoX's *_indexmap_*.npy caches beside the data
    prefetch: int = 4  # batches computed ahead by the loader threads

    def __post_init__(self):
        _check_fields(self)
        _need(bool(self.train_paths) != bool(self.path),
              "data: give exactly one of data.train_paths (blend) and data.path (split)")
        _need(not self.train_weights or len(self.train_weights) == len(self.train_paths),
              f"data.train_weights has {len(self.train_weights)} entries for {len(self.train_paths)} paths")
        _need(not self.valid_weights or len(self.valid_weights) == len(self.valid_paths),
              f"data.valid_weights has {len(self.valid_weights)} entries for {len(self.valid_paths)} paths")
        _need(not (self.path and self.valid_paths), "data.valid_paths belongs to the train_paths route; "
                                                    "with data.path the valid split comes from data.split")
        _need(self.seq_length >= 2, f"data.seq_length must be >= 2, got {self.seq_length}")
        _need(self.eod_id >= 0, "data.eod_id must be >= 0")
        check_seed(self.seed, "data.seed")
        check_split(self.split, "data.split")
        for key in ("train_weights", "valid_weights"):
            if getattr(self, key):
                check_weights(getattr(self, key), f"data.{key}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 6e-4  # peak learning rate
    min_lr: float = 0.0  # floor of the decay
    schedule: str = "neox_2022"  # neox_2022 (Pythia / 20B AnnealingLR) | neox_2023 (GPT-NeoX since Aug 2023)
    decay_style: str = "cosine"  # cosine | linear | exponential | constant
    warmup: float = 0.01  # warmup length as a fraction of decay_steps
    decay_steps: int = 0  # T of the schedule (lr_decay_iters); 0 = train.steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW), kernels and embeddings only
    clip: float = 1.0  # global gradient-norm clipping; 0 = off
    loss_scale: str = "none"  # none | dynamic (fp16, DeepSpeed's scaler) | static
    static_scale: float = 1.0  # the scale when loss_scale is static
    initial_scale_power: int = 12  # dynamic: initial scale 2^power
    scale_window: int = 1000  # dynamic: double after this many steps without overflow
    hysteresis: int = 2  # dynamic: overflows tolerated before the scale halves
    min_scale: float = 1.0  # dynamic: lower bound of the scale
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2) added to the loss

    def __post_init__(self):
        _check_fields(self)
        _need(self.lr >= 0 and self.min_lr >= 0, "optimizer.lr and optimizer.min_lr must be >= 0")
        _need(self.min_lr <= self.lr, f"optimizer.min_lr {self.min_lr} exceeds optimizer.lr {self.lr}")
        _need(self.schedule in SCHEDULES, f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _need(self.decay_style in DECAY_STYLES,
              f"optimizer.decay_style must be one of {DECAY_STYLES}, got {self.decay_style!r}")
        _need(0 <= self.warmup < 1, f"optimizer.warmup is a fraction in [0, 1), got {self.warmup}")
        _need(self.decay_steps >= 0, "optimizer.decay_steps must be >= 0")
        _need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optimizer.b1 and b2 must be in [0, 1)")
        _need(self.eps > 0 and self.weight_decay >= 0 and self.clip >= 0,
              "optimizer.eps must be > 0, weight_decay and clip >= 0")
        _need(self.loss_scale in LOSS_SCALES,
              f"optimizer.loss_scale must be one of {LOSS_SCALES}, got {self.loss_scale!r}")
        _need(self.static_scale > 0 and self.min_scale > 0, "loss scales must be positive")
        _need(self.scale_window >= 1 and self.hysteresis >= 1, "scale_window and hysteresis must be >= 1")
        _need(self.z_loss >= 0, "optimizer.z_loss must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps (train_iters)
    batch_size: int = 32  # global batch in sequences per step (all devices, all micro-batches)
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step
    loss_chunk: int = 256  # positions per cross-entropy chunk (float32 logits of one chunk at a time; 0: whole)
    seed: int = 1234  # parameter init
    log_every: int = 10  # log line (and TensorBoard scalars) every N steps; metrics.jsonl gets every step
    eval_every: int = 0  # validation loss every N steps (0: only at the end); needs a valid split
    eval_steps: int = 10  # validation batches per evaluation (the same first N batches every time)
    init_from: str = ""  # a neox-jax checkpoint to start from instead of random init
    start_step: int = 0  # begin at this step: its data position and LR, fresh Adam moments
    init_from_neox: str = ""  # continue a GPT-NeoX run: its checkpoint's fp32 weights, Adam moments, step
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = from the device kind (none on CPU)
    tensorboard: bool = True  # TensorBoard event files in the run directory

    def __post_init__(self):
        _check_fields(self)
        _need(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        check_seed(self.seed, "train.seed")
        _need(self.batch_size >= 1 and self.grad_accum >= 1, "train.batch_size and grad_accum must be >= 1")
        _need(self.batch_size % self.grad_accum == 0,
              f"train.batch_size {self.batch_size} is not divisible by train.grad_accum {self.grad_accum}")
        _need(self.log_every >= 1 and self.eval_every >= 0 and self.eval_steps >= 0,
              "train.log_every must be >= 1, eval_every and eval_steps >= 0")
        _need(self.peak_tflops >= 0, "train.peak_tflops must be >= 0")
        _need(self.loss_chunk >= 0, f"train.loss_chunk must be >= 0 (0: the whole sequence), got {self.loss_chunk}")
        _need(0 <= self.start_step < self.steps,
              f"train.start_step must be in [0, train.steps = {self.steps}), got {self.start_step}")
        _need(not (self.init_from_neox and (self.init_from or self.start_step)),
              "train.init_from_neox starts at the GPT-NeoX checkpoint's weights and iteration: it excludes "
              "train.init_from and train.start_step")


PYTHIA_STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # then every 1000 (Pythia's 154 checkpoints)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0  # a checkpoint after steps N, 2N, ... (0: off)
    every_minutes: float = 0.0  # a checkpoint when T minutes have passed since the last one (0: off)
    steps: tuple[int, ...] = ()  # checkpoints after exactly these steps
    preset: str = ""  # "pythia": every_steps 1000 and steps 0, 1, 2, 4, ..., 512 (expanded into them)
    keep_last: int = 0  # keep the newest K checkpoints ... (0: keep all)
    keep_every: int = 0  # ... plus every one whose step is a multiple of M (0: none extra)
    at_end: bool = True  # a checkpoint after the last step (and when SIGINT/SIGTERM stop the run)
    async_save: bool = True  # write in the background while training continues
    # a save that is not written and committed by every process within this many seconds fails (the
    # bound on Orbax's barriers; also how long the others take to learn of a write that failed on one)
    write_timeout_s: int = 1200

    def __post_init__(self):
        _check_fields(self)
        _need(self.every_steps >= 0 and self.every_minutes >= 0,
              "checkpoint.every_steps and checkpoint.every_minutes must be >= 0")
        _need(all(s >= 0 for s in self.steps), f"checkpoint.steps must be >= 0, got {list(self.steps)}")
        _need(self.preset in ("", "pythia"), f"checkpoint.preset must be '' or 'pythia', got {self.preset!r}")
        _need(self.keep_last >= 0 and self.keep_every >= 0, "checkpoint.keep_last and keep_every must be >= 0")
        _need(self.write_timeout_s > 0, f"checkpoint.write_timeout_s must be > 0, got {self.write_timeout_s}")
        if self.preset == "pythia":  # resolved into the keys it means, so config.yaml shows them
            _need(self.every_steps in (0, 1000), f"checkpoint.preset pythia saves every 1000 steps, "
                                                 f"checkpoint.every_steps says {self.every_steps}")
            object.__setattr__(self, "every_steps", 1000)
            object.__setattr__(self, "steps", tuple(sorted(set(self.steps) | set(PYTHIA_STEPS))))
            object.__setattr__(self, "preset", "")

    def due(self, step: int) -> bool:
        """A checkpoint of the state after `step` steps is scheduled (the step-based rules)."""
        if self.every_steps and step > 0 and step % self.every_steps == 0:
            return True
        return step in self.steps


SECTIONS: dict[str, type] = {
    "mesh": MeshConfig, "data": DataConfig, "optimizer": OptimizerConfig, "train": TrainConfig,
    "checkpoint": CheckpointConfig,
}
_SECTION_OF = {cls: name for name, cls in SECTIONS.items()}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    mesh: MeshConfig
    data: DataConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    checkpoint: CheckpointConfig = CheckpointConfig()

    def __post_init__(self):
        m, d, o = self.model, self.data, self.optimizer
        _need(m.param_dtype == "float32",
              f"model.param_dtype is {m.param_dtype}: training keeps float32 master parameters "
              "(set model.compute_dtype for bf16/fp16 compute)")
        _need(m.compute_dtype != "float16" or o.loss_scale != "none",
              "model.compute_dtype float16 needs loss scaling: set optimizer.loss_scale to dynamic or static")
        _need(d.seq_length <= m.max_position_embeddings,
              f"data.seq_length {d.seq_length} exceeds model.max_position_embeddings {m.max_position_embeddings}")
        _need(o.decay_steps == 0 or o.decay_steps >= 1, "optimizer.decay_steps must be positive")

    @property
    def micro_batch(self) -> int:
        return self.train.batch_size // self.train.grad_accum

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict()}
        for name in SECTIONS:
            sec = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items()}
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _section(cls, raw: Any, where: str):
    name = _SECTION_OF[cls]
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: section {name!r} must be a mapping, got {raw!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[f'{name}.{k}' for k in unknown]}; "
                          f"known {name} keys: {sorted(known)}")
    try:
        return cls(**raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _model(raw: Any, where: str) -> ModelConfig:
    """A preset name, a mapping of ModelConfig keys, or `{preset: NAME, key: value, ...}`."""
    if isinstance(raw, str):
        return load_config(raw)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: section 'model' must be a preset name or a mapping")
    raw = dict(raw)
    preset = raw.pop("preset", None)
    if preset is not None:
        base = load_config(str(preset)).to_dict()
        unknown = sorted(set(raw) - set(base))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {[f'model.{k}' for k in unknown]}")
        raw = {**base, **raw}
    return model_from_dict(raw, where=f"{where}: model")


def from_sections(raw: Mapping[str, Any], where: str = "config") -> RunConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: top level must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"model", *SECTIONS})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {['model', *SECTIONS]}")
    if "model" not in raw:
        raise ConfigError(f"{where}: no 'model' section")
    try:
        return RunConfig(model=_model(raw["model"], where),
                         **{name: _section(cls, raw.get(name), where) for name, cls in SECTIONS.items()})
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set section.key=value` (value parsed as a YAML scalar or flow list) into a raw config."""
    raw = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        key, text = item.split("=", 1)
        section, _, name = key.strip().partition(".")
        if section not in ("model", *SECTIONS) or not name:
            raise ConfigError(f"--set {item!r}: key must be SECTION.KEY with SECTION one of "
                              f"{['model', *SECTIONS]}")
        try:
            value = _load_yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({_yaml_problem(e)})") from None
        sec = raw.get(section)
        if section == "model" and isinstance(sec, str):
            sec = {"preset": sec}
        sec = dict(sec or {})
        sec[name] = value
        raw[section] = sec
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = _load_yaml(_read_text(p))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at top level")
    return raw


def is_neox_yaml(raw: Mapping[str, Any]) -> bool:
    """GPT-NeoX configs have flat keys (num-layers, train_iters, ...); ours have only section names."""
    return not set(raw) <= {"model", *SECTIONS}


def load_run_config(paths: str | Path | list, overrides: list[str] | tuple[str, ...] = (), *,
                    num_devices: int | None = None) -> RunConfig:
    """Read our run YAML or GPT-NeoX YAML file(s) (merged in order, as GPT-NeoX merges them).

    `num_devices` is what a GPT-NeoX config without `train_batch_size` needs to turn its per-GPU
    micro-batch into a global batch (see `neox_yaml.run_config_from_neox`)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    raws = [read_yaml(p) for p in paths]
    where = ", ".join(str(p) for p in paths)
    if any(is_neox_yaml(r) for r in raws):
        from .neox_yaml import run_config_from_neox

        merged: dict[str, Any] = {}
        for r in raws:
            merged.update(r)
        raw = run_config_from_neox(merged, where=where, num_devices=num_devices)
    else:
        if len(raws) > 1:
            raise ConfigError(f"{where}: several neox-jax run configs given; pass one (use --set to change keys)")
        raw = raws[0]
    return from_sections(apply_overrides(raw, overrides), where=where)


def load_resolved(path: str | Path) -> RunConfig:
    """Read a run directory's `config.yaml` (what `RunConfig.save` wrote)."""
    return from_sections(read_yaml(path), where=str(path))


__all__ = [
    "MeshConfig", "DataConfig", "OptimizerConfig", "TrainConfig", "CheckpointConfig", "RunConfig", "load_run_config",
    "load_resolved", "from_sections", "apply_overrides", "SECTIONS",
]
