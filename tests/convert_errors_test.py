"""Bad input: one clear error line (exit 2) naming the file/tensor/key, and no half-written DST."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from convert_fixtures import save_hf, tiny_hf, write_neox
from neox_jax.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    model = tiny_hf(11, fp16_values=True)
    save_hf(model, d / "hf", dtype=torch.float16)
    write_neox(model, d / "neox", tp=2)
    return d


def fails(capsys, argv, *needles) -> str:
    """main(argv) exits 2 with exactly one stderr line 'neox-jax: error: ...' containing needles."""
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("neox-jax: error:")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def no_output(dst: Path) -> None:
    assert not dst.exists(), f"{dst} was created"
    assert not list(dst.parent.glob(f".{dst.name}.tmp-*")), "temporary directory left behind"


def copy_hf(good, tmp_path) -> Path:
    return Path(shutil.copytree(good / "hf", tmp_path / "src"))


def test_truncated_safetensors(good, tmp_path, capsys):
    src = copy_hf(good, tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    fails(capsys, ["convert", str(src), str(tmp_path / "dst")], "model.safetensors", "truncated")
    no_output(tmp_path / "dst")
    fails(capsys, ["inspect", str(src)], "truncated")


def test_missing_layer_file(good, tmp_path, capsys):
    src = Path(shutil.copytree(good / "neox", tmp_path / "neox"))
    (src / "global_step1000" / "layer_03-model_01-model_states.pt").unlink()
    fails(capsys, ["convert", str(src), str(tmp_path / "dst")], "layer_03-model_01-model_states.pt", "missing")
    no_output(tmp_path / "dst")


def test_shape_mismatch(good, tmp_path, capsys):
    src = copy_hf(good, tmp_path)
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        sd = {k: h.get_tensor(k) for k in h.keys()}
    key = "gpt_neox.layers.1.attention.query_key_value.bias"
    sd[key] = sd[key][:-3].clone()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    fails(capsys, ["convert", str(src), str(tmp_path / "dst")], key, "shape (189,)", "(192,)")
    no_output(tmp_path / "dst")


def test_unknown_architecture(good, tmp_path, capsys):
    src = copy_hf(good, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    fails(capsys, ["convert", str(src), str(tmp_path / "dst")], "config.json", "llama")
    no_output(tmp_path / "dst")


def test_config_disagrees_with_tensors(good, tmp_path, capsys):
    src = copy_hf(good, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    fails(capsys, ["convert", str(src), str(tmp_path / "dst")], "gpt_neox.layers.2.", "missing", "3 layers")
    cfg["num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    fails(capsys, ["convert", str(src), str(tmp_path / "dst")], "unexpected tensor gpt_neox.layers.1.")
    # native: the YAML's hidden size is not the tensors'
    neox = Path(shutil.copytree(good / "neox", tmp_path / "neox"))
    yml = neox / "global_step1000" / "configs" / "model.yml"
    yml.write_text(yml.read_text().replace("hidden-size: 64", "hidden-size: 128"))
    fails(capsys, ["convert", str(neox), str(tmp_path / "dst")], "word_embeddings", "(128, 64)")
    no_output(tmp_path / "dst")


def test_existing_destination_refused_unless_overwrite(good, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    fails(capsys, ["convert", str(good / "hf"), str(dst)], str(dst), "--overwrite")
    assert (dst / "precious.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".dst.tmp-*"))
    assert main(["convert", str(good / "hf"), str(dst), "--overwrite"]) == 0
    assert not (dst / "precious.txt").exists() and (dst / "neox_jax.json").exists()


def test_arbitrary_pickle_refused(good, tmp_path, capsys):
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(good / "hf" / "config.json", src / "config.json")
    with safe_open(str(good / "hf" / "model.safetensors"), "pt") as h:
        sd = {k: h.get_tensor(k) for k in h.keys()}
    sd["extra"] = os.system  # needs a global outside torch's weights-only set
    torch.save(sd, src / "pytorch_model.bin")
    fails(capsys, ["convert", str(src), str(tmp_path / "dst")], "pytorch_model.bin", "refusing to unpickle",
          "weights_only")
    no_output(tmp_path / "dst")


def test_failure_while_streaming_leaves_no_destination(good, tmp_path, capsys, monkeypatch):
    from neox_jax.convert import hf

    calls = {"n": 0}
    real = hf.HFReader.read_torch

    def flaky(self, entry):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError(5, "Input/output error", "model.safetensors")
        return real(self, entry)

    monkeypatch.setattr(hf.HFReader, "read_torch", flaky)  # read() goes through it too
    for to in ("orbax", "hf", "neox"):
        calls["n"] = 0
        fails(capsys, ["convert", str(good / "hf"), str(tmp_path / f"dst_{to}"), "--to", to], "Input/output error")
        no_output(tmp_path / f"dst_{to}")


def test_bad_options(good, tmp_path, capsys):
    fails(capsys, ["convert", str(good / "hf"), str(tmp_path / "dst"), "--tp", "2"], "--tp")
    fails(capsys, ["convert", str(good / "hf"), str(tmp_path / "dst"), "--to", "neox", "--tp", "3"], "--tp 3",
          "num_heads")
    fails(capsys, ["convert", str(tmp_path / "nope"), str(tmp_path / "dst")], "no such file")
    fails(capsys, ["convert", str(good / "hf"), str(good / "hf" / "sub")], "sub: is the input SRC",
          str(good / "hf"))
    no_output(tmp_path / "dst")


def test_cli_subprocess_exit_codes(good, tmp_path):
    """The installed entry point: exit 2 and one line, no traceback; exit 0 on success."""
    src = copy_hf(good, tmp_path)
    (src / "model.safetensors").write_bytes(b"\x10\x00")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "neox_jax", "convert", str(src), str(tmp_path / "dst")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 2, p.stderr
    err = [line for line in p.stderr.splitlines() if line.strip() and "INFO" not in line]
    assert len(err) == 1 and err[0].startswith("neox-jax: error:") and "truncated" in err[0], p.stderr
    assert "Traceback" not in p.stderr
    no_output(tmp_path / "dst")


@pytest.mark.parametrize("to", ["orbax", "hf", "neox"])
def test_verify_failure_exits_2_and_writes_nothing(good, tmp_path, capsys, monkeypatch, to):
    """A converter bug that writes one wrong tensor (one layer's MLP output kernel scaled by 1.5) is caught
    by --verify: exit 2, one 'verify failed' line, nothing at DST, no temporary directory left."""
    from neox_jax.convert import hf, neox, orbax_io

    writer = {"orbax": orbax_io.OrbaxWriter, "hf": hf.HFWriter, "neox": neox.NeoxWriter}[to]
    real = writer.write

    def corrupting(self, entry, array):
        if entry.name == "layers/mlp/fc_out/kernel" and entry.layer == 1:
            array = (array.astype("float32") * 1.5).astype(array.dtype)
        return real(self, entry, array)

    monkeypatch.setattr(writer, "write", corrupting)
    dst = tmp_path / "dst"
    err = fails(capsys, ["convert", str(good / "hf"), str(dst), "--to", to, "--verify"], "verify failed",
                "max |dlogit|", "tolerance", f"{dst} was not written")
    assert err.startswith("neox-jax: error: verify failed")
    no_output(dst)
    # the same conversion without the bug passes --verify and is written
    monkeypatch.setattr(writer, "write", real)
    assert main(["convert", str(good / "hf"), str(dst), "--to", to, "--verify"]) == 0
    assert dst.is_dir() and "OK" in capsys.readouterr().out


def _neox_copy(good, tmp_path) -> tuple[Path, Path]:
    src = Path(shutil.copytree(good / "neox", tmp_path / "neox"))
    return src, src / "global_step1000" / "configs" / "model.yml"


def _edit_yaml(path: Path, **changes) -> None:
    import yaml

    y = yaml.safe_load(path.read_text())
    y.update({k.replace("_", "-"): v for k, v in changes.items()})
    path.write_text(yaml.safe_dump(y))


def test_neox_reader_refusals(good, tmp_path, capsys):
    """The GPT-NeoX checkpoint (TP 2, 2 layers, 256-row vocabulary) disagrees with its YAML: refused,
    naming the file and both values, nothing written."""
    dst = tmp_path / "dst"
    src, yml = _neox_copy(good, tmp_path)
    _edit_yaml(yml, model_parallel_size=4)
    fails(capsys, ["convert", str(src), str(dst)], "model.yml", "model-parallel-size 4", "2 tensor-parallel rank")
    no_output(dst)

    _edit_yaml(yml, model_parallel_size=2, padded_vocab_size=384)
    fails(capsys, ["convert", str(src), str(dst)], "layer_00-model_00-model_states.pt", "256 rows over 2 rank",
          "padded-vocab-size is 384")
    no_output(dst)

    _edit_yaml(yml, padded_vocab_size=256, no_weight_tying=False)  # tied, but a final_linear file exists
    fails(capsys, ["convert", str(src), str(dst)], "layer_06-model_00-model_states.pt", "present", "tied")  # L + 4
    no_output(dst)

    # several steps and no `latest`: refused (which one?); naming one of them works
    src, yml = _neox_copy(good, tmp_path / "b")
    shutil.copytree(src / "global_step1000", src / "global_step2000")
    (src / "latest").unlink()
    fails(capsys, ["convert", str(src), str(dst)], str(src), "no 'latest'", "several global_stepN")
    no_output(dst)
    assert main(["convert", str(src / "global_step2000"), str(dst), "--to", "neox"]) == 0
    assert (dst / "latest").read_text() == "global_step2000"  # the step comes from the directory name
    # `latest` naming a missing directory
    (src / "latest").write_text("global_step3000\n")
    fails(capsys, ["convert", str(src), str(tmp_path / "dst2")], "latest", "global_step3000", "not a directory")
    no_output(tmp_path / "dst2")


def test_neox_step_directory_given_directly(good, tmp_path, capsys):
    """SRC may be the save directory (read through `latest`), a global_stepN directory itself, or a save
    directory with one step and no `latest`: the same tensors every time."""
    from neox_jax.checkpoint import load_params
    from neox_jax.model import flatten

    src, _ = _neox_copy(good, tmp_path)
    assert main(["convert", str(src), str(tmp_path / "a")]) == 0
    assert main(["convert", str(src / "global_step1000"), str(tmp_path / "b")]) == 0
    (src / "latest").unlink()
    assert main(["convert", str(src), str(tmp_path / "c")]) == 0
    _, ref = load_params(tmp_path / "a")
    for other in ("b", "c"):
        _, got = load_params(tmp_path / other)
        fa, fb = flatten(ref), flatten(got)
        assert set(fa) == set(fb)
        for k in fa:
            assert fa[k].dtype == fb[k].dtype and (fa[k] == fb[k]).all(), (other, k)


@pytest.mark.parametrize("command", ["convert", "init"])
def test_interrupt_while_orbax_writes_waits_for_it(command, good, tmp_path, capsys, monkeypatch, caplog):
    """A real SIGINT while Orbax's background thread may still write (sent as its save() returns):
    the temporary directory is deleted only once that write has ended, the command exits 130 with
    one line and nothing is left beside DST.  Before, `convert --to orbax` deleted the directory under
    the running write: Orbax's threads printed tracebacks and recreated files in it (left behind) or
    made the deletion fail (exit 2, 'params.orbax-checkpoint-tmp: Directory not empty').  The wait is
    logged (INFO), so that an interrupt that seems ignored for a large write says why."""
    import signal

    import orbax.checkpoint as ocp

    from neox_jax import atomic

    real_save, real_wait, real_remove = (ocp.StandardCheckpointer.save, ocp.StandardCheckpointer.wait_until_finished,
                                         atomic.remove)
    state = {"signalled": None, "waited": False}

    def save(self, *a, **kw):
        real_save(self, *a, **kw)
        if state["signalled"] is None:
            state["signalled"] = self
            signal.raise_signal(signal.SIGINT)  # Ctrl-C, with the background write just started

    def wait(self):
        real_wait(self)
        state["waited"] = state["waited"] or self is state["signalled"]

    def remove(path):
        assert state["waited"], f"{path} deleted while the interrupted Orbax write may still run"
        real_remove(path)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
    monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", wait)
    monkeypatch.setattr(atomic, "remove", remove)
    dst = tmp_path / "out"
    argv = (["convert", str(good / "hf"), str(dst), "--to", "orbax"] if command == "convert" else
            ["init", str(REPO / "configs" / "tiny.yaml"), str(dst)])
    capsys.readouterr()
    with caplog.at_level("INFO", logger="neox_jax.atomic"):
        assert main(["-q", *argv]) == 130
    assert "SIGINT: stopping once the checkpoint write in progress has ended" in caplog.text, caplog.text
    assert state["signalled"] is not None and state["waited"]
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["neox-jax: interrupted"], err
    assert sorted(os.listdir(tmp_path)) == []
