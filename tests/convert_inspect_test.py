"""`neox-jax inspect` and `neox-jax diff` across the three formats."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from convert_fixtures import save_hf, tiny_hf, write_neox
from neox_jax.checkpoint import load_params
from neox_jax.cli import main
from neox_jax.model import flatten


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect")
    model = tiny_hf(7, fp16_values=True)
    save_hf(model, d / "hf", dtype=torch.float16)
    assert main(["convert", str(d / "hf"), str(d / "orb")]) == 0
    write_neox(model, d / "neox", tp=2)
    return d, model


def run_json(capsys, argv):
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_inspect_hf_hashes_are_the_stored_bytes(ckpts, capsys):
    d, model = ckpts
    code, info = run_json(capsys, ["inspect", str(d / "hf"), "--json"])
    assert code == 0 and info["format"] == "hf"
    assert info["num_params"] == sum(p.numel() for p in model.parameters())
    assert info["config"]["num_layers"] == 2 and info["dtypes"] == ["float16"]
    by_name = {t["name"]: t for t in info["tensors"]}
    with safe_open(str(d / "hf" / "model.safetensors"), "pt") as h:
        assert set(h.keys()) == set(by_name)
        for k in h.keys():
            t = h.get_tensor(k)
            raw = t.contiguous().view(torch.int16).numpy().tobytes()
            assert by_name[k]["sha256"] == hashlib.sha256(raw).hexdigest(), k
            assert by_name[k]["shape"] == list(t.shape) and by_name[k]["dtype"] == "float16"
            assert by_name[k]["norm"] == pytest.approx(float(t.double().norm()), rel=1e-9)


def test_inspect_orbax_and_neox(ckpts, capsys):
    d, model = ckpts
    code, info = run_json(capsys, ["inspect", str(d / "orb"), "--json"])
    assert code == 0 and info["format"] == "orbax"
    _, params = load_params(d / "orb")
    flat = flatten(params)
    assert {t["name"] for t in info["tensors"]} == set(flat)
    for t in info["tensors"]:
        a = np.ascontiguousarray(np.asarray(flat[t["name"]]))
        assert t["sha256"] == hashlib.sha256(a.tobytes()).hexdigest(), t["name"]
    assert info["num_params"] == info["stored_elements"]

    code, info = run_json(capsys, ["inspect", str(d / "neox"), "--json"])
    assert code == 0 and info["neox"]["tp"] == 2 and info["neox"]["layout"] == "pipeline"
    names = {t["name"] for t in info["tensors"]}
    assert "layer_02-model_01-model_states/attention.dense.weight" in names
    assert "layer_02-model_00-model_states/attention.rotary_emb.inv_freq" in names
    # text form: a config line and one row per tensor
    assert main(["inspect", str(d / "neox"), "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "TP=2" in out and "parameters" in out and "layer_00-model_01-model_states/word_embeddings.weight" in out


def test_diff_across_formats_and_finds_a_changed_tensor(ckpts, capsys, tmp_path):
    d, model = ckpts
    # the same weights in three formats: everything identical
    for a, b in (("hf", "orb"), ("hf", "neox"), ("neox", "orb")):
        code, res = run_json(capsys, ["diff", str(d / a), str(d / b), "--json"])
        assert code == 0 and res["match"], (a, b, res["counts"])
        assert set(res["counts"]) <= {"identical"}, res["counts"]

    # a copy with one tensor of one layer changed (a "mislabelled" checkpoint)
    bad = tmp_path / "bad"
    shutil.copytree(d / "hf", bad)
    with safe_open(str(bad / "model.safetensors"), "pt") as h:
        sd = {k: h.get_tensor(k) for k in h.keys()}
    sd["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"] = sd["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"] * 1.01
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SystemExit) as e:
        main(["diff", str(d / "orb"), str(bad), "--per-layer"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("layers/", "embed", "final"))}
    assert rows["layers/mlp/fc_out/kernel"].endswith("DIFFERENT")
    assert rows["layers/mlp/fc_out/kernel[0]"].endswith("identical")
    assert rows["layers/mlp/fc_out/kernel[1]"].endswith("DIFFERENT")
    assert sum(r.endswith("DIFFERENT") for r in rows.values()) == 2
    assert "DIFFER within rtol 0" in out
    # relative L2 of a 1% scale of one of two layers is below 1e-2: --rtol 1e-2 accepts it
    code, res = run_json(capsys, ["diff", str(d / "orb"), str(bad), "--rtol", "1e-2", "--json"])
    assert code == 0 and res["counts"]["close"] == 1

    # fp32 vs fp16 copies of the same model: 'equal' values here (fp16-exact weights)
    assert main(["convert", str(d / "orb"), str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    code, res = run_json(capsys, ["diff", str(d / "hf"), str(tmp_path / "f32"), "--json"])
    assert code == 0 and set(res["counts"]) == {"equal"}


def test_diff_reports_config_mismatch(ckpts, capsys, tmp_path):
    d, _ = ckpts
    other = tiny_hf(8, layers=3, fp16_values=True)
    save_hf(other, tmp_path / "hf3", dtype=torch.float16)
    with pytest.raises(SystemExit) as e:
        main(["diff", str(d / "hf"), str(tmp_path / "hf3")])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "config num_layers: 2 vs 3" in out and "missing in A" in out


def test_inspect_neox_hashes_are_the_stored_bytes(ckpts, capsys):
    """Every tensor of every GPT-NeoX layer file (TP 2), loaded here with torch.load: sha256 of its bytes in
    the stored dtype, shape, dtype and L2 norm; nothing missing, nothing extra."""
    d, _ = ckpts
    code, info = run_json(capsys, ["inspect", str(d / "neox"), "--json"])
    assert code == 0
    by_name = {t["name"]: t for t in info["tensors"]}
    expected = {}
    for f in sorted((d / "neox" / "global_step1000").glob("layer_*-model_*-model_states.pt")):
        for k, t in torch.load(f, weights_only=True).items():
            expected[f"{f.stem}/{k}"] = t
    assert set(by_name) == set(expected)
    for name, t in expected.items():
        raw = t.contiguous().view(torch.int16).numpy().tobytes()
        assert by_name[name]["sha256"] == hashlib.sha256(raw).hexdigest(), name
        assert by_name[name]["shape"] == list(t.shape) and by_name[name]["dtype"] == "float16", name
        assert by_name[name]["norm"] == pytest.approx(float(t.double().norm()), rel=1e-9), name
    # the two ranks' halves of a column-parallel tensor hash differently; identical LayerNorm copies equally
    h = {n: t["sha256"] for n, t in by_name.items()}
    assert h["layer_02-model_00-model_states/attention.query_key_value.weight"] != \
        h["layer_02-model_01-model_states/attention.query_key_value.weight"]
    assert h["layer_02-model_00-model_states/input_layernorm.weight"] == \
        h["layer_02-model_01-model_states/input_layernorm.weight"]


def test_diff_shape_mismatch(ckpts, capsys, tmp_path):
    """Same architecture keys except the MLP width: the MLP tensors are reported as shape mismatches (in our
    layout) with exit status 1, the others compared as usual."""
    d, _ = ckpts
    other = tiny_hf(7, fp16_values=True, ffn=128)  # same seed, MLP width 128 instead of 256
    save_hf(other, tmp_path / "narrow", dtype=torch.float16)
    with pytest.raises(SystemExit) as e:
        main(["diff", str(d / "hf"), str(tmp_path / "narrow"), "--json"])
    assert e.value.code == 1
    res = json.loads(capsys.readouterr().out)
    assert not res["match"] and res["config_diff"] == {"intermediate_size": [256, 128]}
    status = {r["name"]: r["status"] for r in res["tensors"]}
    assert status["layers/mlp/fc_in/kernel"] == "shape (64, 256) vs (64, 128)"  # ours: [D, F] per layer
    assert status["layers/mlp/fc_in/bias"] == "shape (256,) vs (128,)"
    assert status["layers/mlp/fc_out/kernel"] == "shape (256, 64) vs (128, 64)"
    assert res["counts"]["shape (64, 256) vs (64, 128)"] == 1
    assert not status["layers/mlp/fc_out/bias"].startswith("shape")  # [D] in both: compared
    assert status["embed_in/embedding"] in ("identical", "DIFFERENT")
    # the text form names the mismatch too, and the exit status is the same
    with pytest.raises(SystemExit) as e:
        main(["diff", str(d / "hf"), str(tmp_path / "narrow")])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "config intermediate_size: 256 vs 128" in out and "shape (256, 64) vs (128, 64)" in out
