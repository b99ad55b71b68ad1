"""`neox-jax export` (neox_jax/export.py): the SavedModel, loaded and run by TensorFlow, against HF
transformers on the same weights, at two batch/sequence shapes (one program, symbolic shapes);
and the command's refusals."""

import json

import numpy as np
import pytest
import torch

from hf_reference import hf_logits, hf_model, ours_from_hf
from neox_jax.checkpoint import save_params
from neox_jax.cli import main



@pytest.fixture(scope="module")
def tf():
    import tensorflow  # the `export` extra (pyproject.toml; seqio installs it too); imported here, not at collection

    return tensorflow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = hf_model(seed=2, vocab=211, max_pos=64)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    root = tmp_path_factory.mktemp("export")
    save_params(root / "ck", cfg, params)
    assert main(["export", str(root / "ck"), str(root / "sm")]) == 0
    return model, root


def test_saved_model_matches_hf(exported, tf):
    model, root = exported
    loaded = tf.saved_model.load(str(root / "sm"))
    for b, s in [(2, 9), (1, 64)]:
        ids = np.random.RandomState(s).randint(0, 211, (b, s)).astype(np.int32)
        ref = hf_logits(model, ids)
        got = loaded.signatures["logits"](tokens=tf.constant(ids))["logits"].numpy()
        assert got.shape == (b, s, 211)
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
        lp = loaded.signatures["token_log_probs"](tokens=tf.constant(ids))["token_log_probs"].numpy()
        want = torch.log_softmax(torch.tensor(ref[:, :-1], dtype=torch.float64), -1).gather(
            -1, torch.tensor(ids[:, 1:, None], dtype=torch.long))[..., 0].numpy()
        np.testing.assert_allclose(lp, want, atol=5e-5)
    assert json.loads((root / "sm" / "neox_jax.json").read_text())["num_layers"] == 2
    # past max_position_embeddings the program refuses (its shape constraint), it does not extrapolate
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["logits"](tokens=tf.zeros((1, 65), tf.int32))


def test_refusals(exported, tmp_path, capsys):
    _, root = exported
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neox-jax: error: ") and err.count("\n") == 1 and "nothing" in err, err
    assert not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["export", str(root / "ck"), str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "busy" in err, err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
