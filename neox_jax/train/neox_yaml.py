"""GPT-NeoX's own YAML (e.g. `configs/pythia/1-4B.yml`, `configs/20B.yml`) -> our run config sections.

Every top-level key of a GPT-NeoX config falls in exactly one class (after `-` -> `_`):

* model keys: read by `neox_jax.config.from_neox_yaml` (it refuses values we do not implement);
* training keys we map (`_MAPPED`): batch, iterations, schedule, optimizer, precision, seed, data,
  logging and validation cadence, activation checkpointing, tensor-parallel size, `fp32_allreduce`;
* checkpoint keys (`_CHECKPOINT`): the save schedule (`checkpoint_factor` / `save_interval` with
  `checkpoint_scale`, `extra_save_iters`, `keep_last_n_checkpoints`) becomes the `checkpoint`
  section; `load` pointing at a GPT-NeoX checkpoint continues that run (`train.init_from_neox`); the
  others (paths, what to save) are listed in the log and have no effect;
* GPT-NeoX / DeepSpeed machinery (`_NOT_APPLICABLE`): kernel fusions, ZeRO, pipeline stages,
  launchers, logging backends; accepted and listed once in the log as not applicable;
* anything else is refused by name: we do not guess whether an unknown key changes training.

Values that change training and that we do not implement are refused by name too (dropout, which
GPT-NeoX enables at 0.1 when the keys are absent; optimizers other than Adam/AdamW; fp16 loss-scale
settings we do not model; `finetune`).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from ..config import _NEOX_MATH_ALLOWED, _NEOX_READ, ConfigError, from_neox_yaml
from ..values import Fields, check_seed, check_split, check_weights

log = logging.getLogger(__name__)

_MAPPED = {
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gas", "train_batch_size",
    "train_iters", "lr_decay_iters", "lr_decay_style", "warmup", "min_lr", "lr", "optimizer",
    "weight_decay", "gradient_clipping", "clip_grad", "fp16", "bf16", "precision", "seed", "data_path",
    "train_data_paths", "valid_data_paths", "test_data_paths", "train_data_weights",
    "valid_data_weights", "test_data_weights", "split", "seq_length", "checkpoint_activations",
    "log_interval", "eval_interval", "eval_iters", "model_parallel_size", "eod_mask_loss",
    "hidden_dropout", "attention_dropout", "finetune", "init_method_std", "fp32_allreduce",
}
_CHECKPOINT = {
    "save", "load", "checkpoint_factor", "save_interval", "extra_save_iters", "keep_last_n_checkpoints",
    "no_save_optim", "no_save_rng", "no_load_optim", "no_load_rng", "save_iters", "checkpoint_scale",
    "checkpoint_validation_with_forward_pass", "use_checkpoint_lr_scheduler", "override_lr_scheduler",
}
_NOT_APPLICABLE = {
    # kernel fusions and numerics switches with no effect on the math here
    "scaled_upper_triang_masked_softmax_fusion", "scaled_masked_softmax_fusion", "bias_dropout_fusion",
    "rope_fusion", "layernorm_fusion", "fp16_lm_cross_entropy", "attention_softmax_in_fp32",
    "apply_query_key_layer_scaling", "use_cpu_initialization",
    # parallelism / memory machinery (our mesh and remat cover these)
    "zero_optimization", "zero_stage", "zero_reduce_scatter", "zero_contiguous_gradients",
    "zero_reduce_bucket_size", "zero_allgather_bucket_size", "zero_allow_untested_optimizer",
    "pipe_parallel_size", "pipe_partition_method", "partition_activations", "checkpoint_num_layers",
    "deepspeed_activation_checkpointing", "contiguous_checkpointing", "checkpoint_in_cpu",
    "synchronize_each_layer", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "data_impl", "mmap_warmup", "num_workers", "use_shared_fs", "world_size", "is_pipe_parallel",
    # launch, logging and tooling
    "distributed_backend", "wall_clock_breakdown", "steps_per_print", "launcher", "deepspeed_mpi",
    "deepspeed_slurm", "deepspeed", "hostfile", "include", "exclude", "num_nodes", "num_gpus",
    "master_port", "master_addr", "detect_nvlink_pairs", "comment", "global_num_gpus", "local_rank",
    "rank", "log_dir", "tensorboard_dir", "use_wandb", "wandb_group", "wandb_team", "wandb_project",
    "wandb_host", "wandb_init_all_ranks", "git_hash", "log_grad_pct_zeros", "log_param_norm",
    "log_grad_norm", "log_optimizer_states", "log_gradient_noise_scale", "gradient_noise_scale_n_batches",
    "gradient_noise_scale_cpu_offload", "dump_state", "flops_profiler", "profile_backward", "profile",
    "tokenizer_type", "vocab_file", "merge_file", "user_script", "config_files", "lazy_mpu_init",
    "onnx_safe", "adlr_autoresume", "adlr_autoresume_interval", "exit_interval", "char_level_ppl",
    "text_gen_type", "temperature", "top_p", "top_k", "return_logits", "maximum_tokens", "prompt_end",
    "sample_input_file", "sample_output_file", "num_samples", "recompute", "eval_results_prefix",
    "eval_tasks", "do_train", "do_valid", "do_test", "iteration", "memory_profiling",
    # attention kinds (global / flash are the same math; others are refused by the model reader)
    "attention_config", "output_layer_parallelism",
}
_MODEL = set(_NEOX_MATH_ALLOWED) | _NEOX_READ | {
    "norm", "pos_emb", "layernorm_epsilon", "make_vocab_size_divisible_by", "padded_vocab_size",
    "init_method", "output_layer_init_method", "activation",
}
_DECAY_STYLES = {"cosine", "linear", "exponential", "constant"}


def _where(where: str, key: str) -> str:
    return f"{where}: GPT-NeoX key {key!r}"


def _precision(d: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """(compute dtype, optimizer loss-scale keys) from the fp16 / bf16 blocks or `precision`."""
    top = Fields(d, where)
    f16, b16 = top.sub("fp16"), top.sub("bf16")
    fp16, bf16 = f16.data, b16.data
    if f16.bool("enabled", False) and fp16.get("type") in ("bfloat16", "bf16"):
        fp16, bf16 = {}, {"enabled": True}
        f16, b16 = Fields(fp16, where, "fp16."), Fields(bf16, where, "bf16.")
    precision = d.get("precision")
    if f16.bool("enabled", False) or precision == "fp16":
        unknown = sorted(set(fp16) - {"fp16", "enabled", "type", "loss_scale", "loss_scale_window",
                                      "initial_scale_power", "hysteresis", "min_loss_scale",
                                      "consecutive_hysteresis"})
        if unknown:
            raise ConfigError(f"{_where(where, 'fp16')}: unsupported setting(s) {unknown}")
        if f16.bool("consecutive_hysteresis", False):
            raise ConfigError(f"{_where(where, 'fp16')}: consecutive_hysteresis=true is not supported")
        static = f16.float("loss_scale", 0.0, nullable=True)
        opt = {"loss_scale": "static", "static_scale": static} if static > 0 else {
            "loss_scale": "dynamic",
            "initial_scale_power": f16.int("initial_scale_power", 16),  # DeepSpeed's default 2^16
            "scale_window": f16.int("loss_scale_window", 1000),
            "hysteresis": f16.int("hysteresis", 2),
            "min_scale": f16.float("min_loss_scale", 1.0),
        }
        return "float16", opt
    if b16.bool("enabled", False) or precision in ("bfloat16", "bf16"):
        return "bfloat16", {}
    if precision not in (None, "fp32", "float32"):
        raise ConfigError(f"{_where(where, 'precision')}: {precision!r} is not supported")
    return "float32", {}


def run_config_from_neox(raw: Mapping[str, Any], *, where: str = "neox config",
                         num_devices: int | None = None) -> dict[str, Any]:
    """Our raw run-config sections (model, mesh, data, optimizer, train) from a merged GPT-NeoX YAML.

    Without `train_batch_size` the global batch is micro-batch x gradient_accumulation_steps x the
    data-parallel size num_devices / (model_parallel_size x pipe_parallel_size), as GPT-NeoX computes
    it for the devices the config was written for (GPT-NeoX-20B on 96 GPUs: 4 x 32 x 12 = 1536)."""
    d = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(d) - _MAPPED - _CHECKPOINT - _NOT_APPLICABLE - _MODEL)
    if unknown:
        raise ConfigError(f"{_where(where, unknown[0])} is not known to neox-jax; refusing to guess "
                          f"whether it changes training" + (f" (also: {unknown[1:]})" if unknown[1:] else ""))
    for key in ("hidden_dropout", "attention_dropout"):
        value = d.get(key, 0.1)  # GPT-NeoX's default when absent
        if value not in (0, 0.0):
            raise ConfigError(f"{_where(where, key)} = {value} (GPT-NeoX's default is 0.1 when absent): "
                              "neox-jax has no dropout; set it to 0")
    if d.get("finetune"):
        raise ConfigError(f"{_where(where, 'finetune')}: use `neox-jax train --init-from CKPT` instead")
    for key in ("train_iters", "train_micro_batch_size_per_gpu"):
        if key not in d:
            raise ConfigError(f"{where}: missing GPT-NeoX key {key!r}")

    f = Fields(d, where)
    compute, loss_scale = _precision(d, where)
    remat = "full" if f.bool("checkpoint_activations", False) else "none"
    model = from_neox_yaml(d, where=where, compute_dtype=compute, param_dtype="float32", remat=remat,
                           fp32_allreduce=f.bool("fp32_allreduce", False),
                           **({"init_std": f.float("init_method_std")} if "init_method_std" in d else {}))

    opt = f.sub("optimizer")
    kind = opt.str("type", "Adam")
    if kind.lower() not in ("adam", "adamw"):
        raise ConfigError(f"{_where(where, 'optimizer.type')} = {kind!r}: only Adam / AdamW are supported")
    pf = opt.sub("params")
    params = pf.data
    unknown_p = sorted(set(params) - {"lr", "betas", "eps", "weight_decay"})
    if unknown_p:
        raise ConfigError(f"{_where(where, 'optimizer.params')}: unsupported parameter(s) {unknown_p}")
    if "lr" not in params and "lr" not in d:
        raise ConfigError(f"{where}: no learning rate (optimizer.params.lr)")
    style = f.str("lr_decay_style", "linear")  # GPT-NeoX's default
    if style not in _DECAY_STYLES:
        raise ConfigError(f"{_where(where, 'lr_decay_style')} = {style!r} is not supported")
    betas = pf.list("betas", float, [0.9, 0.999])  # torch Adam's default
    if len(betas) != 2:
        raise ConfigError(f"{_where(where, 'optimizer.params.betas')} must be two numbers, got {betas}")
    optimizer = {
        "lr": pf.float("lr") if pf.has("lr") else f.float("lr"),
        "min_lr": f.float("min_lr", 0.0),
        "schedule": "neox_2022",
        "decay_style": style,
        "warmup": f.float("warmup", 0.01),
        "decay_steps": f.int("lr_decay_iters", 0, nullable=True) or f.int("train_iters"),
        "b1": betas[0],
        "b2": betas[1],
        "eps": pf.float("eps", 1e-8),
        "weight_decay": pf.float("weight_decay") if pf.has("weight_decay") else f.float("weight_decay", 0.01),
        "clip": (f.float("gradient_clipping", 0.0, nullable=True) if f.has("gradient_clipping")
                 else f.float("clip_grad", 0.0, nullable=True)),
        **loss_scale,
    }

    micro = f.int("train_micro_batch_size_per_gpu")
    gas = (f.int("gradient_accumulation_steps", 1, nullable=True) if f.has("gradient_accumulation_steps")
           else f.int("gas", 1, nullable=True)) or 1
    if f.int("train_batch_size", 0, nullable=True):
        batch = f.int("train_batch_size")
    elif num_devices is not None:
        tp = f.int("model_parallel_size", 1, nullable=True) or 1
        pp = max(1, f.int("pipe_parallel_size", 0, nullable=True))
        if num_devices % (tp * pp):
            raise ConfigError(f"{where}: model_parallel_size {tp} x pipe_parallel_size {pp} does not divide "
                              f"the {num_devices} devices")
        batch = micro * gas * (num_devices // (tp * pp))
    else:
        raise ConfigError(f"{where}: no train_batch_size; the global batch is micro-batch x "
                          "gradient_accumulation_steps x data-parallel devices, which needs the mesh")
    seed = check_seed(f.int("seed", 1234), f.name("seed"))
    train = {
        "steps": f.int("train_iters"),
        "batch_size": batch,
        "grad_accum": gas,
        "seed": seed,
        "eval_every": f.int("eval_interval", 1000),
        "eval_steps": f.int("eval_iters", 100),
    }
    if f.int("log_interval", 0, nullable=True):
        train["log_every"] = f.int("log_interval")

    data: dict[str, Any] = {"seq_length": f.int("seq_length", 0, nullable=True) or model.max_position_embeddings,
                            "seed": seed,
                            "mask_eod_loss": f.bool("eod_mask_loss", False)}
    if d.get("train_data_paths"):
        data["train_paths"] = list(d["train_data_paths"])
        if d.get("train_data_weights"):
            data["train_weights"] = check_weights(f.list("train_data_weights", float), f.name("train_data_weights"))
        if d.get("valid_data_paths"):
            data["valid_paths"] = list(d["valid_data_paths"])
            if d.get("valid_data_weights"):
                data["valid_weights"] = check_weights(f.list("valid_data_weights", float),
                                                      f.name("valid_data_weights"))
    elif d.get("data_path"):
        data["path"] = str(d["data_path"])
        data["split"] = str(d.get("split", "969, 30, 1"))
    elif "split" in d:
        data["split"] = str(d["split"])
    if "split" in data:
        check_split(data["split"], f.name("split"))
    # neither data_path nor train_data_paths (GPT-NeoX's configs/pythia/*.yml leave them to
    # local_setup.yml): `--set data.path=...` or `--set data.train_paths=[...]` may still give them;
    # DataConfig refuses the run if nothing does.

    mesh = {"data": 1, "fsdp": -1, "tensor": f.int("model_parallel_size", 1, nullable=True) or 1}

    na = sorted(k for k in d if k in _NOT_APPLICABLE)
    if na:
        log.info("%s: GPT-NeoX keys not applicable to neox-jax (accepted, no effect): %s", where, ", ".join(na))
    checkpoint = _checkpoint_section(d, int(d["train_iters"]), where)
    resume = _load_key(d, where)
    if resume:
        train["init_from_neox"] = resume
    ck = sorted(k for k in d if k in _CHECKPOINT and k not in _SCHEDULE_KEYS and not (k == "load" and resume))
    if ck:
        log.info("%s: checkpoint keys without effect in neox-jax (checkpoints go to RUN_DIR/checkpoints): "
                 "%s", where, ", ".join(f"{k}={d[k]!r}" for k in ck))
    log.info("%s: lr_decay_style %s with the Pythia-era AnnealingLR formula (optimizer.schedule=neox_2022; "
             "--set optimizer.schedule=neox_2023 for GPT-NeoX's current one)", where, style)
    model_dict = model.to_dict()
    return {"model": model_dict, "mesh": mesh, "data": data, "optimizer": optimizer, "train": train,
            "checkpoint": checkpoint}


def _load_key(d: dict, where: str) -> str:
    """GPT-NeoX's `load: DIR`: continue the run saved there (weights, optimizer state, iteration) when
    DIR holds a checkpoint (a `latest` file or `global_step*` directories), as GPT-NeoX does; with no
    checkpoint there GPT-NeoX starts fresh, and so does this (logged).  `no_load_optim` (weights only)
    is refused by name: convert the weights and use --init-from."""
    from pathlib import Path

    load = d.get("load")
    if not load:
        return ""
    path = Path(str(load))
    found = path.is_dir() and ((path / "latest").is_file() or any(path.glob("global_step*")) or
                               path.name.startswith("global_step"))
    if not found:
        log.info("%s: load %s holds no GPT-NeoX checkpoint: starting fresh (as GPT-NeoX does)", where, load)
        return ""
    if d.get("no_load_optim"):
        raise ConfigError(f"{_where(where, 'no_load_optim')}: loading the weights of {load} without its optimizer "
                          "state: convert them (`neox-jax convert`) and pass --init-from")
    log.info("%s: load %s: continuing that GPT-NeoX run (train.init_from_neox)", where, load)
    return str(load)


_SCHEDULE_KEYS = {"checkpoint_factor", "save_interval", "checkpoint_scale", "extra_save_iters", "save_iters",
                  "keep_last_n_checkpoints"}


def _checkpoint_section(d: dict, train_iters: int, where: str) -> dict:
    """GPT-NeoX's save schedule: every `checkpoint_factor` (formerly `save_interval`) steps, or with
    `checkpoint_scale: log` at its powers; plus `extra_save_iters`; `keep_last_n_checkpoints`."""
    out: dict = {}
    factor = d.get("checkpoint_factor", d.get("save_interval"))
    steps = set(int(s) for s in (d.get("extra_save_iters") or []) + (d.get("save_iters") or []))
    scale = d.get("checkpoint_scale", "linear")
    if factor:
        if scale == "linear":
            out["every_steps"] = int(factor)
        elif scale == "log" and factor > 1:
            steps |= {int(factor ** i) for i in range(64) if factor ** i <= train_iters}
        else:
            raise ConfigError(f"{_where(where, 'checkpoint_scale')}: {scale!r} with checkpoint_factor {factor} "
                              "is not a schedule we know (linear, or log with a factor > 1)")
    if steps:
        out["steps"] = sorted(steps)
    if d.get("keep_last_n_checkpoints"):
        out["keep_last"] = int(d["keep_last_n_checkpoints"])
    return out
