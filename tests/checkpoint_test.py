"""The Orbax params checkpoint: exact restore, refusal of mismatched config, atomic writes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax import checkpoint as C
from neox_jax import model as M
from neox_jax.config import load_config


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny").replace(num_layers=3)
    return cfg, M.init_params(cfg, 7)


def test_roundtrip_exact_tree_dtypes_shapes(tmp_path, tiny):
    cfg, params = tiny
    params = dict(params, final_ln=jax.tree.map(lambda x: x.astype(jnp.bfloat16), params["final_ln"]))
    C.save_params(tmp_path / "ck", cfg, params)
    cfg2, restored = C.load_params(tmp_path / "ck")
    assert cfg2 == cfg
    a, b = M.flatten(params), M.flatten(restored)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8), err_msg=k)
    meta = json.loads((tmp_path / "ck" / "neox_jax.json").read_text())
    assert meta["format"] == "neox-jax" and meta["num_params"] == cfg.num_params()
    C.load_params(tmp_path / "ck", verify=True)  # every tensor against checksums.json
    (tmp_path / "ck" / "checksums.json").unlink()  # as a checkpoint written before checksums existed
    with pytest.raises(C.CheckpointError, match=r"no checksums.json \(written before checksums existed\)"):
        C.load_params(tmp_path / "ck", verify=True)


def test_restore_with_dtype_cast(tmp_path, tiny):
    cfg, params = tiny
    C.save_params(tmp_path / "ck", cfg, params)
    cfg2, restored = C.load_params(tmp_path / "ck", dtype="bfloat16")
    assert cfg2.param_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(restored))
    ref = np.asarray(params["layers"]["mlp"]["fc_in"]["kernel"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(restored["layers"]["mlp"]["fc_in"]["kernel"]), ref)


def test_config_disagreeing_with_tensors_is_refused(tmp_path, tiny):
    cfg, params = tiny
    C.save_params(tmp_path / "ck", cfg, params)
    cfgfile = tmp_path / "ck" / "config.json"
    raw = json.loads(cfgfile.read_text())
    raw["intermediate_size"] = 128
    cfgfile.write_text(json.dumps(raw))
    with pytest.raises(C.CheckpointError, match=r"layers/mlp/fc_in/bias has shape \(3, 256\), config implies \(3, 128\)"):
        C.load_params(tmp_path / "ck")
    raw["intermediate_size"] = 256
    raw["tie_word_embeddings"] = True
    cfgfile.write_text(json.dumps(raw))
    with pytest.raises(C.CheckpointError, match="embed_out/kernel is not part of the configured model"):
        C.load_params(tmp_path / "ck")


def test_save_refuses_params_that_do_not_fit(tmp_path, tiny):
    cfg, params = tiny
    with pytest.raises(C.CheckpointError, match="config expects tensor"):
        C.save_params(tmp_path / "ck", cfg.replace(num_layers=4, tie_word_embeddings=True), {"embed_in": params["embed_in"]})
    assert not (tmp_path / "ck").exists()


def test_existing_destination_refused_unless_overwrite(tmp_path, tiny):
    cfg, params = tiny
    dst = tmp_path / "ck"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(C.CheckpointError, match="exists and is not empty"):
        C.save_params(dst, cfg, params)
    assert (dst / "keep.txt").read_text() == "user data"
    C.save_params(dst, cfg, params, overwrite=True)
    assert C.is_checkpoint(dst) and not (dst / "keep.txt").exists()
    assert not list(tmp_path.glob(".ck.tmp-*"))


def test_failed_write_leaves_no_destination(tmp_path, tiny, monkeypatch):
    cfg, params = tiny

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(C, "write_marker", boom)
    with pytest.raises(RuntimeError):
        C.save_params(tmp_path / "ck", cfg, params)
    assert not (tmp_path / "ck").exists() and not list(tmp_path.iterdir())


def test_resolve_run_directory_picks_newest_step(tmp_path, tiny):
    cfg, params = tiny
    C.save_params(tmp_path / "run" / "100", cfg, params)
    C.save_params(tmp_path / "run" / "200", cfg, params)
    (tmp_path / "run" / "300").mkdir()  # incomplete step: no marker
    assert C.resolve(tmp_path / "run").name == "200"
    with pytest.raises(C.CheckpointError, match="not a neox-jax checkpoint"):
        C.resolve(tmp_path / "run" / "300")


def test_restore_onto_a_mesh(tmp_path, tiny):
    """A checkpoint saved unsharded restores directly into NamedShardings of another mesh."""
    from neox_jax.sharding import make_mesh, tree_shardings

    cfg, params = tiny
    C.save_params(tmp_path / "ck", cfg, params)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = tree_shardings(M.param_axes(cfg), mesh, M.abstract_params(cfg))
    _, restored = C.load_params(tmp_path / "ck", shardings=shardings, verify=True)  # checksums, sharded
    k = restored["layers"]["mlp"]["fc_in"]["kernel"]
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(k), np.asarray(params["layers"]["mlp"]["fc_in"]["kernel"]))


def test_stacked_tensors_are_chunked_one_layer_at_a_time(tmp_path, tiny):
    """Converters stream per layer: a stacked tensor's chunks must not span layers."""
    import tensorstore as ts

    cfg, params = tiny
    C.save_params(tmp_path / "ck", cfg, params)
    kv = {"driver": "ocdbt", "base": f"file://{(tmp_path / 'ck' / 'params').resolve()}"}
    t = ts.open({"driver": "zarr", "kvstore": kv, "path": "layers.mlp.fc_in.kernel"}).result()
    assert t.shape == (3, 64, 256) and t.chunk_layout.read_chunk.shape[0] == 1
    np.testing.assert_array_equal(t[1].read().result(), np.asarray(params["layers"]["mlp"]["fc_in"]["kernel"][1]))
