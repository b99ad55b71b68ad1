"""Run configuration (neox_jax/train/config.py, neox_yaml.py): sections and their refusals, `--set`
overrides, the resolved-config round trip, the published recipes in configs/train/, and GPT-NeoX's own
YAML (the Pythia-70M and 20B configs as published) resolving to the same runs.

Every expected value is written out here from the published configs (GPT-NeoX `configs/20B.yml`,
`configs/pythia/*.yml`, the pythia repo's `models/*/*.yml`) and ../shared/reference/neox-reference.md
sections 1.8, 1.9 and 4, never taken from our own output.  No training, no compilation, no jax."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from neox_jax.config import ConfigError, load_config
from neox_jax.train.config import (
    RunConfig, apply_overrides, from_sections, load_resolved, load_run_config,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = ROOT / "configs" / "train"
PILE = "/fsx/pile/pile_20B_tokenizer_text_document"


def _write(path: Path, raw) -> Path:
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def _base(**sections) -> dict:
    """The smallest valid run: a preset-name model section and a data path; everything else default."""
    return {"model": "pythia-14m", "data": {"path": "runs/data/x_text_document"}, **sections}


def _refused(raw, *names: str):
    with pytest.raises(ConfigError) as e:
        from_sections(raw, where="run.yaml")
    for n in names:
        assert n in str(e.value), (n, str(e.value))
    return str(e.value)


# ============================================================================ 1. sections


@pytest.mark.parametrize("section", ["trainer", "optim", "checkpoints"])
def test_unknown_section_is_refused_by_name(section):
    _refused(_base(**{section: {}}), "run.yaml", repr(section))


@pytest.mark.parametrize("section,key", [
    ("mesh", "pipeline"), ("data", "data_path"), ("optimizer", "learning_rate"), ("optimizer", "beta1"),
    ("train", "iters"), ("train", "micro_batch_size"), ("checkpoint", "save_interval"),
])
def test_unknown_key_is_refused_naming_section_and_key(section, key):
    sec = {"path": "x"} if section == "data" else {}
    _refused(_base(**{section: {**sec, key: 1}}), f"'{section}.{key}'")


@pytest.mark.parametrize("section,key,value,kind", [
    ("train", "steps", "ten", "int"),
    ("train", "steps", True, "int"),  # a bool is not an int
    ("train", "steps", 10.5, "int"),
    ("train", "batch_size", 32.0, "int"),
    ("train", "grad_accum", [2], "int"),
    ("train", "tensorboard", "yes", "bool"),
    ("train", "init_from", 3, "str"),
    ("optimizer", "lr", [1], "float"),
    ("optimizer", "lr", "fast", "float"),
    ("optimizer", "lr", True, "float"),  # nor a float
    ("optimizer", "schedule", 2022, "str"),
    ("optimizer", "initial_scale_power", False, "int"),
    ("mesh", "tensor", "2", "int"),
    ("mesh", "fsdp", 2.0, "int"),
    ("data", "mask_eod_loss", 1, "bool"),
    ("data", "split", 995, "str"),
    ("data", "seq_length", "2048", "int"),
])
def test_wrong_types_are_refused_naming_the_key(section, key, value, kind):
    sec = {"path": "x"} if section == "data" else {}
    msg = _refused(_base(**{section: {**sec, key: value}}), f"{section}.{key} must be {kind}")
    assert repr(value) in msg


@pytest.mark.parametrize("key,value", [
    ("train_paths", [1, 2]), ("train_paths", [True]), ("train_weights", ["a", "b"]),
    ("train_weights", [True, False]), ("train_weights", {"a": 1}),
])
def test_list_keys_are_type_checked(key, value):
    _refused(_base(data={"train_paths": ["a", "b"], key: value}), f"data.{key} must be a list")


def test_ints_are_accepted_for_floats_and_lists_for_tuples():
    cfg = from_sections(_base(optimizer={"lr": 1, "min_lr": 0, "clip": 2},
                              data={"train_paths": ["a", "b"], "train_weights": [1, 3]}))
    assert cfg.optimizer.lr == 1.0 and type(cfg.optimizer.lr) is float
    assert type(cfg.optimizer.min_lr) is float and type(cfg.optimizer.clip) is float
    assert cfg.data.train_paths == ("a", "b")
    assert cfg.data.train_weights == (1.0, 3.0) and all(type(w) is float for w in cfg.data.train_weights)


@pytest.mark.parametrize("sections,names", [
    ({"train": 5}, ["'train'", "mapping"]),
    ({"train": {"steps": 0}}, ["train.steps"]),
    ({"mesh": {"data": -1, "fsdp": -1}}, ["-1"]),
    ({"mesh": {"tensor": 0}}, ["mesh sizes"]),
    ({"optimizer": {"min_lr": 1e-3, "lr": 1e-4}}, ["optimizer.min_lr"]),
    ({"optimizer": {"schedule": "neox_2024"}}, ["optimizer.schedule", "neox_2024"]),
    ({"optimizer": {"decay_style": "inverse_sqrt"}}, ["optimizer.decay_style", "inverse_sqrt"]),
    ({"optimizer": {"loss_scale": "auto"}}, ["optimizer.loss_scale", "auto"]),
    ({"optimizer": {"warmup": 1.5}}, ["optimizer.warmup"]),
    ({"data": {}}, ["data.train_paths", "data.path"]),
    ({"data": {"path": "x", "train_paths": ["y"]}}, ["data.train_paths", "data.path"]),
    ({"data": {"train_paths": ["a", "b"], "train_weights": [1.0]}}, ["data.train_weights"]),
    ({"train": {"steps": 10, "start_step": 10}}, ["train.start_step"]),
    ({"checkpoint": {"preset": "gpt3"}}, ["checkpoint.preset", "gpt3"]),
    ({"checkpoint": {"steps": [4, -1]}}, ["checkpoint.steps"]),
    ({"checkpoint": {"keep_last": -2}}, ["checkpoint.keep_last"]),
    # seeds: numpy's RandomState takes [0, 2**32 - 1]; a JAX key keeps only the low 32 bits
    ({"data": {"path": "x", "seed": -1}}, ["data.seed", "-1"]),
    ({"data": {"path": "x", "seed": 2**32}}, ["data.seed", "4294967296"]),
    ({"train": {"seed": 10**23}}, ["train.seed", str(10**23)]),
    ({"train": {"seed": -1}}, ["train.seed", "-1"]),
    # split and blend weights: finite, >= 0, not all zero
    ({"data": {"path": "x", "split": "nan,1,1"}}, ["data.split", "'nan,1,1'", "finite"]),
    ({"data": {"path": "x", "split": "inf,1,1"}}, ["data.split", "'inf,1,1'"]),
    ({"data": {"path": "x", "split": "-1,2,3"}}, ["data.split", "'-1,2,3'", ">= 0"]),
    ({"data": {"path": "x", "split": "0,0,0"}}, ["data.split", "not all zero"]),
    ({"data": {"path": "x", "split": "a,b"}}, ["data.split", "'a,b'"]),
    ({"data": {"train_paths": ["a", "b"], "train_weights": [float("nan"), 1.0]}}, ["data.train_weights[0]", "nan"]),
    ({"data": {"train_paths": ["a", "b"], "train_weights": [-1, 2]}}, ["data.train_weights", "-1.0", ">= 0"]),
    ({"data": {"train_paths": ["a", "b"], "train_weights": [0, 0]}}, ["data.train_weights", "not all zero"]),
    ({"data": {"train_paths": ["a"], "valid_paths": ["v"], "valid_weights": [-2]}}, ["data.valid_weights"]),
    # every float of the sections is finite
    ({"optimizer": {"lr": float("inf")}}, ["optimizer.lr", "finite", "inf"]),
    ({"optimizer": {"weight_decay": float("inf")}}, ["optimizer.weight_decay", "inf"]),
    ({"optimizer": {"clip": float("nan")}}, ["optimizer.clip", "nan"]),
    ({"optimizer": {"z_loss": float("inf")}}, ["optimizer.z_loss", "inf"]),
    ({"optimizer": {"lr": 10**400}}, ["optimizer.lr", "finite"]),
    ({"train": {"peak_tflops": float("inf")}}, ["train.peak_tflops", "inf"]),
    ({"checkpoint": {"every_minutes": float("nan")}}, ["checkpoint.every_minutes", "nan"]),
])
def test_values_are_validated(sections, names):
    _refused(_base(**sections), *names)


@pytest.mark.parametrize("item,names", [
    ("optimizer.lr=.inf", ["optimizer.lr", "inf"]), ("optimizer.weight_decay=.inf", ["optimizer.weight_decay"]),
    ("optimizer.clip=.inf", ["optimizer.clip"]), ("data.split=nan,1,1", ["data.split"]),
    ("data.seed=-1", ["data.seed"]), ("train.seed=99999999999999999999999", ["train.seed"]),
])
def test_set_refuses_out_of_range_values_by_name(tmp_path, item, names):
    with pytest.raises(ConfigError) as e:
        load_run_config(_write(tmp_path / "run.yaml", _base()), [item])
    for n in names:
        assert n in str(e.value), (n, str(e.value))


def test_non_utf8_run_config_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(yaml.safe_dump(_base()).encode() + b"# \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"{path}: not UTF-8 text"):
        load_run_config(path)


def test_no_model_section_is_refused():
    _refused({"data": {"path": "x"}}, "'model'")


# ---------------------------------------------------------------------------- --set


def test_set_overrides_are_section_aware(tmp_path):
    path = _write(tmp_path / "run.yaml", _base(train={"steps": 100}))
    base = load_run_config(path)
    cfg = load_run_config(path, ["train.steps=5", "optimizer.lr=3e-4", "model.num_layers=4",
                                 "data.train_paths=[a, b]", "data.path=''", "mesh.tensor=2",
                                 "optimizer.loss_scale=static", "train.tensorboard=false"])
    assert cfg.train.steps == 5
    assert cfg.optimizer.lr == 3e-4 and type(cfg.optimizer.lr) is float  # YAML 1.1 reads 3e-4 as a string
    # a preset-name model section takes a model key: the preset with that key changed
    assert cfg.model == load_config("pythia-14m").replace(num_layers=4)
    assert cfg.data.train_paths == ("a", "b") and cfg.data.path == ""
    assert cfg.mesh.tensor == 2 and cfg.optimizer.loss_scale == "static" and cfg.train.tensorboard is False
    # nothing else moved
    assert cfg == dataclasses.replace(
        base, model=base.model.replace(num_layers=4),
        train=dataclasses.replace(base.train, steps=5, tensorboard=False),
        optimizer=dataclasses.replace(base.optimizer, lr=3e-4, loss_scale="static"),
        data=dataclasses.replace(base.data, train_paths=("a", "b"), path=""),
        mesh=dataclasses.replace(base.mesh, tensor=2))
    # the later --set of the same key wins; the documented example of the tinyshakespeare config works
    assert load_run_config(path, ["train.steps=5", "train.steps=7"]).train.steps == 7
    tiny = load_run_config(TRAIN_CONFIGS / "tinyshakespeare.yaml", ["optimizer.lr=3e-4", "train.steps=50"])
    assert (tiny.optimizer.lr, tiny.train.steps) == (3e-4, 50)


@pytest.mark.parametrize("text,value", [
    ("3e-4", 3e-4), ("1e3", 1000.0), ("1.0e8", 1e8), ("2E-5", 2e-5), ("6.0e-4", 6e-4), ("0.001", 1e-3),
    ("1", 1.0),
])
def test_float_spellings(tmp_path, text, value):
    """`lr: 3e-4` in a run file and `--set optimizer.lr=3e-4` both mean the number 0.0003."""
    path = _write(tmp_path / "run.yaml", f"model: pythia-14m\ndata: {{path: x}}\noptimizer: {{lr: {text}}}\n")
    assert load_run_config(path).optimizer.lr == value
    other = _write(tmp_path / "b.yaml", _base())
    assert load_run_config(other, [f"optimizer.lr={text}"]).optimizer.lr == value


@pytest.mark.parametrize("item", ["lr=1", "nosuch.x=1", "train=1", "steps=5", ".steps=5", "train.steps"])
def test_set_refuses_keys_without_a_known_section(item):
    with pytest.raises(ConfigError) as e:
        apply_overrides(_base(), [item])
    assert repr(item) in str(e.value)


@pytest.mark.parametrize("item,name", [
    ("train.nosuch=1", "train.nosuch"), ("optimizer.learning_rate=1", "optimizer.learning_rate"),
    ("model.nosuch=1", "model.nosuch"), ("train.steps=ten", "train.steps"),
    ("optimizer.lr=[1]", "optimizer.lr"),
])
def test_set_refuses_unknown_keys_and_bad_values_by_name(tmp_path, item, name):
    with pytest.raises(ConfigError, match=re.escape(name)):
        load_run_config(_write(tmp_path / "run.yaml", _base()), [item])


def test_set_does_not_modify_its_input():
    raw = _base(train={"steps": 3})
    before = json.dumps(raw)
    apply_overrides(raw, ["train.steps=5", "model.num_layers=2", "mesh.tensor=2"])
    assert json.dumps(raw) == before


# ---------------------------------------------------------------------------- across sections


def test_float16_compute_needs_loss_scaling():
    _refused(_base(model={"preset": "pythia-14m", "compute_dtype": "float16"}),
             "float16", "optimizer.loss_scale")
    for scale in ("dynamic", "static"):
        cfg = from_sections(_base(model={"preset": "pythia-14m", "compute_dtype": "float16"},
                                  optimizer={"loss_scale": scale}))
        assert cfg.model.compute_dtype == "float16"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_master_parameters_are_refused(dtype):
    _refused(_base(model={"preset": "pythia-14m", "param_dtype": dtype}, optimizer={"loss_scale": "dynamic"}),
             "model.param_dtype", dtype)


def test_seq_length_above_max_position_embeddings_is_refused():
    _refused(_base(data={"path": "x", "seq_length": 4096}),
             "data.seq_length 4096", "max_position_embeddings 2048")
    _refused(_base(model={"preset": "pythia-14m", "max_position_embeddings": 256}, data={"path": "x"}),
             "data.seq_length 2048", "max_position_embeddings 256")
    assert from_sections(_base(data={"path": "x", "seq_length": 2048})).data.seq_length == 2048


def test_batch_must_divide_into_micro_batches():
    _refused(_base(train={"batch_size": 10, "grad_accum": 4}), "train.batch_size 10", "train.grad_accum 4")
    cfg = from_sections(_base(train={"batch_size": 12, "grad_accum": 4}))
    assert cfg.micro_batch == 3


# ---------------------------------------------------------------------------- model section forms

# Pythia-70M written out from the reference (section 1.9: L 6, h 512, nh 8, ffn 2048, V_pad 50304, 50277 real,
# rotary 0.25, parallel residual, untied, tanh GELU, small_init / wang_init).
PYTHIA_70M_MODEL = {
    "vocab_size": 50304, "tokenizer_vocab_size": 50277, "hidden_size": 512, "num_layers": 6, "num_heads": 8,
    "intermediate_size": 2048, "max_position_embeddings": 2048, "rotary_pct": 0.25,
    "rotary_emb_base": 10000.0, "layer_norm_eps": 1e-5, "use_parallel_residual": True,
    "tie_word_embeddings": False, "hidden_act": "gelu_tanh",
    "init": "small_wang",
}


def test_model_section_as_preset_mapping_and_preset_plus_keys():
    by_name = from_sections(_base(model="pythia-70m")).model
    by_map = from_sections(_base(model=PYTHIA_70M_MODEL)).model
    by_preset = from_sections(_base(model={"preset": "pythia-70m"})).model
    assert by_name == by_map == by_preset
    for k, v in PYTHIA_70M_MODEL.items():
        assert getattr(by_name, k) == v, k
    changed = from_sections(_base(model={"preset": "pythia-70m", "num_layers": 2, "remat": "full"})).model
    assert changed == dataclasses.replace(by_map, num_layers=2, remat="full")


def test_model_section_refusals():
    _refused(_base(model={"preset": "pythia-70m", "num_layer": 2}), "model.num_layer")
    _refused(_base(model={**PYTHIA_70M_MODEL, "num_layer": 2}), "model", "num_layer")
    _refused(_base(model="pythia-71m"), "pythia-71m")
    _refused(_base(model=["pythia-70m"]), "model")
    _refused(_base(model={"preset": "pythia-70m", "num_layers": "six"}), "num_layers")
    _refused(_base(model={"preset": "pythia-70m", "remat": "some"}), "remat")


# ---------------------------------------------------------------------------- resolved config


def _roundtrip_configs() -> list[RunConfig]:
    return [
        load_run_config(TRAIN_CONFIGS / "tinyshakespeare.yaml"),
        load_run_config(TRAIN_CONFIGS / "pythia-1b.yaml"),
        load_run_config(TRAIN_CONFIGS / "neox-20b.yaml"),
        from_sections(_base(
            model={"preset": "pythia-14m", "compute_dtype": "float16", "layer_norm_eps": 1e-6,
                   "init": "normal", "init_std": 0.006},
            data={"train_paths": ["a", "b/c"], "train_weights": [0.25, 3], "valid_paths": ["v"],
                  "seq_length": 512, "mask_eod_loss": True},
            optimizer={"lr": 9.7e-5, "min_lr": 9.7e-6, "eps": 1e-8, "loss_scale": "static",
                       "static_scale": 128,
                       "schedule": "neox_2023", "decay_style": "linear", "z_loss": 1e-4},
            train={"steps": 7, "batch_size": 12, "grad_accum": 3, "init_from": "ckpt/step 5",
                   "peak_tflops": 989.5},
            mesh={"data": 2, "fsdp": 2, "tensor": -1},
            checkpoint={"every_minutes": 30, "steps": [3, 5], "preset": "pythia", "keep_last": 2,
                        "keep_every": 1000, "async_save": False})),
    ]


@pytest.mark.parametrize("index", range(4))
def test_resolved_config_round_trip(tmp_path, index):
    cfg = _roundtrip_configs()[index]
    path = tmp_path / "config.yaml"
    cfg.save(path)
    assert load_resolved(path) == cfg
    assert load_run_config(path) == cfg
    # every key explicit: each section lists all of its fields
    saved = yaml.safe_load(path.read_text())
    assert list(saved) == ["model", "mesh", "data", "optimizer", "train", "checkpoint"]
    for name in saved:
        assert set(saved[name]) == {f.name for f in dataclasses.fields(getattr(cfg, name))}, name


# ============================================================================ 2. published recipes

# From the reference: section 1.9 (per size: L, h, nh, V_pad, TP, lr with min_lr = lr/10, precision, init)
# and the micro-batch x GAS x data-parallel of the yml comments (GAS 2 for 6.9B and 12B, else 1);
# sections 4.1-4.3 for what is shared.
#          name           L   h     nh  V_pad  TP  lr       precision  init         GAS
RECIPES = [
    ("pythia-14m",   6,  128,  4,  50304, 1, 1.0e-3, "float16",  "small_wang", 1),
    ("pythia-31m",   6,  256,  8,  50304, 1, 1.0e-3, "float16",  "small_wang", 1),
    ("pythia-70m",   6,  512,  8,  50304, 1, 1.0e-3, "float16",  "small_wang", 1),
    ("pythia-160m", 12,  768, 12,  50304, 1, 6.0e-4, "float16",  "small_wang", 1),
    ("pythia-410m", 24, 1024, 16,  50304, 1, 3.0e-4, "float16",  "small_wang", 1),
    ("pythia-1b",   16, 2048,  8,  50304, 1, 2.5e-4, "bfloat16", "small_wang", 1),
    ("pythia-1.4b", 24, 2048, 16,  50304, 1, 2.0e-4, "float16",  "small_wang", 1),
    ("pythia-2.8b", 32, 2560, 32,  50304, 1, 1.6e-4, "float16",  "small_wang", 1),
    ("pythia-6.9b", 32, 4096, 32,  50432, 2, 1.2e-4, "float16",  "normal",     2),
    ("pythia-12b",  36, 5120, 40,  50688, 4, 1.2e-4, "float16",  "normal",     2),
    # 20B (sections 1.8, 4.2): batch 1536 = micro 4 x GAS 32 x DP 12, 150,000 steps, weight decay 0.01
    ("neox-20b",    44, 6144, 64,  50432, 2, 9.7e-5, "float16",  "small_wang", 32),
]


def test_every_recipe_file_is_in_the_table():
    names = {p.stem for p in TRAIN_CONFIGS.glob("*.yaml")} - {"tinyshakespeare"}
    assert names == {r[0] for r in RECIPES}


@pytest.mark.parametrize("name,L,h,nh,vocab,tp,lr,precision,init,gas", RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_files_carry_the_published_recipes(name, L, h, nh, vocab, tp, lr, precision, init, gas):
    cfg = load_run_config(TRAIN_CONFIGS / f"{name}.yaml")
    is_20b = name == "neox-20b"
    steps = 150_000 if is_20b else 143_000
    m, o, t, d = cfg.model, cfg.optimizer, cfg.train, cfg.data

    # model: the preset of that size, as trained
    shape = (m.num_layers, m.hidden_size, m.num_heads, m.vocab_size, m.intermediate_size)
    assert shape == (L, h, nh, vocab, 4 * h)
    assert (m.tokenizer_vocab_size, m.max_position_embeddings, m.rotary_pct) == (50277, 2048, 0.25)
    assert (m.use_parallel_residual, m.tie_word_embeddings, m.hidden_act) == (True, False, "gelu_tanh")
    assert m.compute_dtype == precision and m.param_dtype == "float32"
    assert m.init == init and m.init_std == 0.02
    assert m.remat == "full"  # checkpoint_activations: true
    assert m.arch_dict() == load_config(name).arch_dict()

    # mesh: tensor parallel as trained, the rest data parallel
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, tp)

    # optimizer
    assert o.lr == lr
    assert o.min_lr == pytest.approx(lr / 10, rel=1e-12)
    assert (o.schedule, o.decay_style, o.warmup, o.decay_steps) == ("neox_2022", "cosine", 0.01, steps)
    assert (o.b1, o.b2, o.eps) == (0.9, 0.95, 1e-8)
    assert o.weight_decay == (0.01 if is_20b else 0.1)
    assert o.clip == 1.0 and o.z_loss == 0.0
    if precision == "float16":
        assert o.loss_scale == "dynamic"
        assert (o.initial_scale_power, o.scale_window, o.hysteresis, o.min_scale) == (12, 1000, 2, 1.0)
    else:
        assert o.loss_scale == "none"

    # train / data
    assert t.steps == steps
    assert t.batch_size == (1536 if is_20b else 1024) and t.grad_accum == gas
    assert t.seed == 1234 and t.init_from == ""
    assert (d.seq_length, d.seed, d.mask_eod_loss, d.segment_ids) == (2048, 1234, False, False)
    if is_20b:
        assert d.path.endswith("pile_20B_tokenizer_text_document") and d.split == "995,4,1"
        assert (t.eval_every, t.eval_steps, t.log_every) == (1000, 10, 2)
    else:
        assert d.path == "" and len(d.train_paths) == 1 and d.train_paths[0].endswith("_text_document")
        assert t.eval_steps == 10 and t.log_every == 10


# ============================================================================ 3. GPT-NeoX YAML

# GPT-NeoX configs/pythia/70M.yml in the pythia repo's models/70M/pythia-70m.yml spelling (dashed keys,
# `True`/`False`, trailing commas, comments), with the data paths and vocab file of the pythia repo.
PYTHIA_70M_NEOX = """\
{
  # parallelism settings
  "pipe-parallel-size": 1,
  "model-parallel-size": 1,

  # model settings
  "num-layers": 6,
  "hidden-size": 512,
  "num-attention-heads": 8,
  "seq-length": 2048,
  "max-position-embeddings": 2048,
  "pos-emb": "rotary",
  "rotary-pct": 0.25,
  "no-weight-tying": true,
  "gpt-j-residual": true,
  "output-layer-parallelism": "column",

  "attention-config": [[["flash"], 6]],

  "scaled-upper-triang-masked-softmax-fusion": true,
  "bias-gelu-fusion": true,

  # init methods
  "init_method": "small_init",
  "output_layer_init_method": "wang_init",

  "optimizer": {
    "type": "Adam",
    "params": {
      "lr": 0.001,
      "betas": [0.9, 0.95],
      "eps": 1.0e-8,
    }
  },
  "min_lr": 0.0001,

  "zero_optimization": {
    "stage": 1,
    "allgather_partitions": True,
    "allgather_bucket_size": 500000000,
    "overlap_comm": True,
    "reduce_scatter": True,
    "reduce_bucket_size": 500000000,
    "contiguous_gradients": True,
    "cpu_offload": False
  },

  # batch size (trained on 32 gpus)
  "train_micro_batch_size_per_gpu": 32,
  "gas": 1,
  "data-impl": "mmap",
  "num_workers": 1,

  # activation checkpointing
  "checkpoint-activations": true,
  "checkpoint-num-layers": 1,
  "partition-activations": true,
  "synchronize-each-layer": true,

  # regularization
  "gradient_clipping": 1.0,
  "weight-decay": 0.1,
  "hidden-dropout": 0,
  "attention-dropout": 0,

  # precision settings
  "fp16": {
    "fp16": true,
    "enabled": true,
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 12,
    "hysteresis": 2,
    "min_loss_scale": 1,
  },

  "train-iters": 143000,
  "lr-decay-iters": 143000,
  "distributed-backend": "nccl",
  "lr-decay-style": "cosine",
  "warmup": 0.01,
  "checkpoint-factor": 1000,
  "extra-save-iters": [0,1,2,4,8,16,32,64,128,256,512],
  "eval-interval": 100000,
  "eval-iters": 10,

  "log-interval": 10,
  "steps_per_print": 10,
  "wall_clock_breakdown": true,

  "train-data-paths": ["/fsx/pile/pile_20B_tokenizer_text_document"],
  "valid-data-paths": ["/fsx/pile/pile_20B_tokenizer_text_document"],
  "test-data-paths": ["/fsx/pile/pile_20B_tokenizer_text_document"],

  "tokenizer-type": "HFTokenizer",
  "vocab-file": "/fsx/pile/20B_tokenizer.json",
}
"""

# GPT-NeoX configs/20B.yml as published (comments, `True`, trailing commas, its odd indentation).
NEOX_20B = """\
# DISCLAIMER: This is the configuration file for the GPT-NeoX-20B model as it was trained on 96x 40GB A100
# GPUs. Depending on your system configuration, you may need to change some parameters in order to fit
# the model in memory.

{
  # Tokenizer /  checkpoint settings - you will need to change these to the location you have them saved in
  "vocab_file": "./20B_checkpoints/20B_tokenizer.json",
  "save": "./20B_checkpoints",
  "load": "./20B_checkpoints",

  # If finetuning, edit the following to the location of your finetuning dataset:
  "data_path": "./data/pile_20B_tokenizer/pile_20B_tokenizer_text_document",

  # parallelism settings ( you will want to change these based on your cluster setup, ideally scheduling pipeline stages
  # across the node boundaries )
  "pipe_parallel_size": 4,
  "model_parallel_size": 2,

  # model settings
  "num_layers": 44,
  "hidden_size": 6144,
  "num_attention_heads": 64,
  "seq_length": 2048,
  "max_position_embeddings": 2048,
  "norm": "layernorm",
  "pos_emb": "rotary",
  "rotary_pct": 0.25,
  "no_weight_tying": true,
  "gpt_j_residual": true,
  "output_layer_parallelism": "column",
  "scaled_upper_triang_masked_softmax_fusion": true,
  "bias_gelu_fusion": true,
  "rope_fusion": false,
  "layernorm_fusion": false,

  # init methods
  "init_method": "small_init",
  "output_layer_init_method": "wang_init",

  # optimizer settings
  "optimizer": {
    "type": "Adam",
    "params": {
      "lr": 0.97e-4,
      "betas": [0.9, 0.95],
      "eps": 1.0e-8,
      }
      },

  "min_lr": 0.97e-5,

  # for all zero_optimization options, see https://www.deepspeed.ai/docs/config-json/#zero-optimizations-for-fp16-training
  "zero_optimization": {
  "stage": 1,
  "allgather_partitions": True,
  "allgather_bucket_size": 1260000000,
  "overlap_comm": True,
  "reduce_scatter": True,
  "reduce_bucket_size": 1260000000,
  "contiguous_gradients": True,
  },

  # batch / data settings (assuming 96 GPUs)
  "train_micro_batch_size_per_gpu": 4,
  "gradient_accumulation_steps": 32,
  "data_impl": "mmap",
  "split": "995,4,1",

  # activation checkpointing
  "checkpoint_activations": true,
  "checkpoint_num_layers": 1,
  "partition_activations": false,
  "synchronize_each_layer": true,

  # regularization
  "gradient_clipping": 1.0,
  "weight_decay": 0.01,
  "hidden_dropout": 0,
  "attention_dropout": 0,

  # precision settings
  "fp16": {
    "fp16": true,
    "enabled": true,
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 12,
    "hysteresis": 2,
    "min_loss_scale": 1
    },

  # misc. training settings
  "train_iters": 150000,
  "lr_decay_iters": 150000,

  "distributed_backend": "nccl",
  "lr_decay_style": "cosine",
  "warmup": 0.01,
  "checkpoint_factor": 500, # this variable previously called `save-interval`
  "eval_interval": 1000,
  "eval_iters": 10,

  # logging
  "log_interval": 2,
  "steps_per_print": 2,
  "wall_clock_breakdown": false,

  ### NEW DATA: ####
  "tokenizer_type": "HFTokenizer",
  "tensorboard-dir": "./tensorboard",
  "log_dir": "./logs",

}
"""


@pytest.fixture
def p70m(tmp_path) -> Path:
    return _write(tmp_path / "70M.yml", PYTHIA_70M_NEOX)


def _neox_dict() -> dict:
    return yaml.safe_load(PYTHIA_70M_NEOX)


def _load_neox(tmp_path, raw: dict, num_devices: int | None = 32, overrides=()) -> RunConfig:
    return load_run_config(_write(tmp_path / "neox.yml", json.dumps(raw, indent=1)), list(overrides),
                           num_devices=num_devices)


def test_pythia_70m_neox_yaml_resolves_to_our_recipe(p70m):
    ours = load_run_config(TRAIN_CONFIGS / "pythia-70m.yaml",
                           [f"data.train_paths=[{PILE}]", f"data.valid_paths=[{PILE}]"])
    theirs = load_run_config(p70m, num_devices=32)  # 32 A100s, as trained
    assert theirs == ours
    # and the numbers themselves: 32 x 1 x 32 = 1024 sequences, fp16 with DeepSpeed's dynamic scaler
    assert (theirs.train.batch_size, theirs.train.grad_accum, theirs.train.steps) == (1024, 1, 143000)
    o = theirs.optimizer
    assert (o.lr, o.min_lr, o.decay_steps) == (1e-3, 1e-4, 143000)
    assert theirs.model.compute_dtype == "float16" and theirs.optimizer.loss_scale == "dynamic"
    assert theirs.optimizer.initial_scale_power == 12 and theirs.model.remat == "full"
    assert theirs.data.train_paths == (PILE,) and theirs.data.valid_paths == (PILE,)
    # checkpoint-factor 1000 + extra-save-iters: Pythia's 154 checkpoints
    assert theirs.checkpoint.every_steps == 1000
    assert theirs.checkpoint.steps == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def test_neox_20b_yaml_resolves_to_our_recipe(tmp_path):
    theirs = load_run_config(_write(tmp_path / "20B.yml", NEOX_20B), num_devices=96)
    # 96 GPUs / (TP 2 x PP 4) = 12 data-parallel; 4 x 32 x 12 = 1536
    assert (theirs.train.batch_size, theirs.train.grad_accum, theirs.mesh.tensor) == (1536, 32, 2)
    assert theirs.model.vocab_size == 50432 and theirs.optimizer.weight_decay == 0.01
    ours = load_run_config(TRAIN_CONFIGS / "neox-20b.yaml",
                           ["data.path=./data/pile_20B_tokenizer/pile_20B_tokenizer_text_document"])
    assert theirs == ours


def test_neox_yaml_merged_from_several_files(tmp_path, p70m):
    raw = _neox_dict()
    model_keys = {"pipe-parallel-size", "model-parallel-size", "num-layers", "hidden-size",
                  "num-attention-heads",
                  "seq-length", "max-position-embeddings", "pos-emb", "rotary-pct", "no-weight-tying",
                  "gpt-j-residual", "output-layer-parallelism", "attention-config",
                  "scaled-upper-triang-masked-softmax-fusion", "bias-gelu-fusion", "init_method",
                  "output_layer_init_method"}
    data_keys = {k for k in raw if "data-paths" in k or k in ("vocab-file", "tokenizer-type", "data-impl")}
    parts = [{k: v for k, v in raw.items() if k in model_keys},
             {k: v for k, v in raw.items() if k not in model_keys | data_keys},
             {k: v for k, v in raw.items() if k in data_keys}]
    paths = [_write(tmp_path / f"part{i}.yml", json.dumps(p)) for i, p in enumerate(parts)]
    whole = load_run_config(p70m, num_devices=32)
    assert load_run_config(paths, num_devices=32) == whole
    assert load_run_config(paths[::-1], num_devices=32) == whole
    # a later file's value of a key wins (merged in order)
    later = _write(tmp_path / "later.yml", '{"train-iters": 1000, "lr-decay-iters": 1000}')
    cfg = load_run_config([*paths, later], num_devices=32)
    assert (cfg.train.steps, cfg.optimizer.decay_steps) == (1000, 1000)


def test_neox_yaml_takes_set_overrides(p70m):
    cfg = load_run_config(p70m, ["train.steps=10", "optimizer.lr=6e-4", "model.num_layers=2"], num_devices=32)
    base = load_run_config(p70m, num_devices=32)
    assert (cfg.train.steps, cfg.optimizer.lr, cfg.model.num_layers) == (10, 6e-4, 2)
    assert cfg.optimizer.decay_steps == 143000 and cfg.model == base.model.replace(num_layers=2)


def test_neox_yaml_without_data_paths_takes_them_from_set(tmp_path):
    """GPT-NeoX's configs/pythia/*.yml leave the data paths to local_setup.yml: --set gives them here."""
    raw = {k: v for k, v in _neox_dict().items() if "data-paths" not in k}
    cfg = _load_neox(tmp_path, raw, overrides=["data.path=/data/pile_text_document"])
    assert cfg.data.path == "/data/pile_text_document" and cfg.data.train_paths == ()
    cfg = _load_neox(tmp_path, raw, overrides=[f"data.train_paths=[{PILE}]", f"data.valid_paths=[{PILE}]"])
    assert cfg == _load_neox(tmp_path, _neox_dict())
    with pytest.raises(ConfigError, match=r"data\.train_paths.*data\.path"):
        _load_neox(tmp_path, raw)


def test_neox_yaml_not_applicable_keys_are_logged_once(p70m, caplog):
    caplog.set_level(logging.INFO, logger="neox_jax")
    load_run_config(p70m, num_devices=32)
    records = [r.getMessage() for r in caplog.records if "not applicable" in r.getMessage()]
    assert len(records) == 1, records
    for key in ("zero_optimization", "partition_activations", "distributed_backend", "wall_clock_breakdown",
                "attention_config", "scaled_upper_triang_masked_softmax_fusion", "synchronize_each_layer"):
        assert key in records[0], key
    # keys that we map are not among them
    for key in ("train_iters", "fp16", "optimizer", "checkpoint_activations", "gradient_clipping"):
        assert not re.search(rf"\b{key}\b", records[0].split(":", 2)[-1]), key


def _changed(raw: dict, changes: dict, drop=()) -> dict:
    out = {k: v for k, v in raw.items() if k not in drop}
    out.update(changes)
    return out


_DATA_PATHS = ("train-data-paths", "valid-data-paths", "test-data-paths")


@pytest.mark.parametrize("changes,drop,names", [
    ({"foo-bar": 1}, (), [r"foo[-_]bar"]),
    ({"rotary_emb_dim": 8}, (), ["rotary_emb_dim"]),
    ({}, ("hidden-dropout",), [r"hidden[-_]dropout", "0.1"]),
    ({}, ("attention-dropout",), [r"attention[-_]dropout", "0.1"]),
    ({"hidden-dropout": 0.1}, (), [r"hidden[-_]dropout"]),
    ({"attention-dropout": 0.05}, (), [r"attention[-_]dropout"]),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}, (), ["Lamb"]),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "amsgrad": True}}}, (), ["amsgrad"]),
    ({"lr-decay-style": "inverse_sqrt"}, (), [r"lr[-_]decay[-_]style", "inverse_sqrt"]),
    ({"finetune": True}, (), ["finetune"]),
    ({}, ("train-iters",), [r"train[-_]iters"]),
    ({}, ("train_micro_batch_size_per_gpu",), ["train_micro_batch_size_per_gpu"]),
    ({"pos-emb": "alibi"}, (), ["alibi"]),
    ({"attention-config": [[["local"], 6]]}, (), ["local"]),
    ({"fp16": {"enabled": True, "consecutive_hysteresis": True}}, (), ["consecutive_hysteresis"]),
    ({"precision": "fp8"}, ("fp16",), ["fp8"]),
    ({"seed": -1}, (), [r"seed must be in \[0, 2\*\*32 - 1\]"]),
    ({"seed": 2**64}, (), [r": seed must be in", "18446744073709551616"]),
    ({"data-path": "x", "split": "nan,1,1"}, _DATA_PATHS, [r": split 'nan,1,1'", "finite"]),
    ({"data-path": "x", "split": "1,-1,1"}, _DATA_PATHS, [r": split '1,-1,1'", ">= 0"]),
    ({"train-data-paths": ["a", "b"], "train-data-weights": [1, -1]}, (), ["train_data_weights"]),
    ({"train-data-paths": ["a"], "valid-data-paths": ["v"], "valid-data-weights": [0]}, (),
     ["valid_data_weights"]),
])
def test_neox_yaml_refusals_by_name(tmp_path, changes, drop, names):
    with pytest.raises(ConfigError) as e:
        _load_neox(tmp_path, _changed(_neox_dict(), changes, drop))
    for n in names:
        assert re.search(n, str(e.value)), (n, str(e.value))


def test_neox_yaml_global_batch_needs_devices_or_train_batch_size(tmp_path):
    with pytest.raises(ConfigError, match="train_batch_size"):
        _load_neox(tmp_path, _neox_dict(), num_devices=None)
    with pytest.raises(ConfigError, match="does not divide"):
        _load_neox(tmp_path, _changed(_neox_dict(), {"model-parallel-size": 4}), num_devices=30)


def test_neox_yaml_batch_arithmetic(tmp_path):
    # micro 8 x gas 4 x (32 devices / TP 2) = 512, accumulated in 4 micro-batches
    cfg = _load_neox(tmp_path, _changed(_neox_dict(), {"train_micro_batch_size_per_gpu": 8,
                                                       "gradient_accumulation_steps": 4,
                                                       "model-parallel-size": 2}, drop=("gas",)))
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.mesh.tensor) == (512, 4, 2)
    assert cfg.model.vocab_size == 50432  # 50277 padded to a multiple of 128 x TP 2
    # train_batch_size present wins over micro x gas x devices
    for nd in (32, 8, None):
        cfg = _load_neox(tmp_path, _changed(_neox_dict(), {"train_batch_size": 2048}), num_devices=nd)
        assert (cfg.train.batch_size, cfg.train.grad_accum) == (2048, 1)


def test_neox_yaml_precision_blocks(tmp_path):
    fp16 = _load_neox(tmp_path, _neox_dict())
    bf16 = _load_neox(tmp_path, _changed(_neox_dict(), {"bf16": {"enabled": True}}, drop=("fp16",)))
    assert bf16.model.compute_dtype == "bfloat16" and bf16.optimizer.loss_scale == "none"
    # everything but the precision is the fp16 run's
    assert bf16 == dataclasses.replace(fp16, model=fp16.model.replace(compute_dtype="bfloat16"),
                                       optimizer=dataclasses.replace(fp16.optimizer, loss_scale="none"))
    # GPT-NeoX's configs/pythia/1B.yml spelling: an fp16 block with type bfloat16
    typed = _load_neox(tmp_path, _changed(_neox_dict(), {"fp16": {
        "enabled": True, "type": "bfloat16", "auto_cast": True, "loss_scale": 0, "loss_scale_window": 1000,
        "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1}}))
    assert typed == bf16
    static = _load_neox(tmp_path, _changed(_neox_dict(), {"fp16": {"enabled": True, "loss_scale": 128}}))
    assert static.model.compute_dtype == "float16"
    assert (static.optimizer.loss_scale, static.optimizer.static_scale) == ("static", 128.0)
    fp32 = _load_neox(tmp_path, _changed(_neox_dict(), {}, drop=("fp16",)))
    assert fp32.model.compute_dtype == "float32" and fp32.optimizer.loss_scale == "none"


def test_neox_yaml_defaults_are_the_pythia_era_ones(tmp_path):
    """Keys absent from a GPT-NeoX config take GPT-NeoX's defaults of the Pythia era (neox_args.py before
    #1107): weight_decay 0.01, gradient_clipping 0 (DeepSpeed), warmup 0.01, lr_decay_style linear,
    min_lr 0, lr_decay_iters = train_iters, Adam betas (0.9, 0.999), eps 1e-8, seed 1234, split 969,30,1,
    eval every 1000 for 100 iterations."""
    raw = _changed(_neox_dict(), {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                                  "data-path": "/d/x_text_document"},
                   drop=("weight-decay", "gradient_clipping", "warmup", "lr-decay-style", "min_lr",
                         "lr-decay-iters", "eval-interval", "eval-iters", "train-data-paths",
                         "valid-data-paths", "test-data-paths"))
    cfg = _load_neox(tmp_path, raw)
    o = cfg.optimizer
    assert (o.weight_decay, o.clip, o.warmup, o.decay_style, o.min_lr, o.decay_steps) == (
        0.01, 0.0, 0.01, "linear", 0.0, 143000)
    assert (o.b1, o.b2, o.eps) == (0.9, 0.999, 1e-8)
    assert cfg.train.seed == cfg.data.seed == 1234
    assert (cfg.train.eval_every, cfg.train.eval_steps) == (1000, 100)
    assert cfg.data.path == "/d/x_text_document"
    assert [int(x) for x in cfg.data.split.split(",")] == [969, 30, 1]


def test_neox_yaml_load_continues_a_saved_run(tmp_path, caplog):
    """GPT-NeoX's `load: DIR`: with a checkpoint there, the run continues it (train.init_from_neox);
    with none, a fresh start as GPT-NeoX makes one; weights without the optimizer are refused by name."""
    ck = tmp_path / "ckpts"
    text = NEOX_20B.replace('"load": "./20B_checkpoints"', f'"load": "{ck}"')
    assert text != NEOX_20B
    with caplog.at_level("INFO"):
        fresh = load_run_config(_write(tmp_path / "a.yml", text), num_devices=96)
    assert fresh.train.init_from_neox == "" and "holds no GPT-NeoX checkpoint: starting fresh" in caplog.text
    (ck / "global_step1000").mkdir(parents=True)
    (ck / "latest").write_text("global_step1000")
    assert load_run_config(_write(tmp_path / "b.yml", text), num_devices=96).train.init_from_neox == str(ck)
    with pytest.raises(ConfigError, match="no_load_optim"):
        load_run_config(_write(tmp_path / "c.yml", text.replace('"load":', '"no_load_optim": true,\n  "load":')),
                        num_devices=96)
