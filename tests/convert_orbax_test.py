"""Streaming Orbax writes and reads: restore through checkpoint.load_params, bit for bit."""

from __future__ import annotations

import json
import random
import shutil
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts
import torch

from convert_fixtures import save_hf, tiny_hf
from neox_jax.checkpoint import load_params, prepare_destination, commit_destination, save_params, saved_tree, write_marker
from neox_jax.cli import main
from neox_jax.config import ModelConfig
from neox_jax.convert.mapping import our_entries
from neox_jax.convert.orbax_io import CHUNK_BYTES, OrbaxReader, OrbaxWriter, chunk_shape
from neox_jax.convert.stream import convert
from neox_jax.model import flatten, init_params

CFG = ModelConfig(vocab_size=96, hidden_size=32, num_layers=5, num_heads=4, intermediate_size=64,
                  max_position_embeddings=64)


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def random_slices(cfg, seed=0):
    """(entry, array) for every slice; dtypes mixed (bf16 for the MLP, fp32 elsewhere)."""
    rng = np.random.default_rng(seed)
    out = []
    for e in our_entries(cfg):
        dt = np.dtype(ml_dtypes.bfloat16) if e.name.startswith("layers/mlp") else np.dtype(np.float32)
        out.append((e.with_dtype(dt), rng.standard_normal(e.shape).astype(dt)))
    return out


def test_streamed_slices_restore_via_load_params(tmp_path):
    slices = random_slices(CFG)
    tmp = prepare_destination(tmp_path / "ckpt")
    w = OrbaxWriter(tmp, CFG, [e for e, _ in slices], source={"format": "test"})
    order = list(slices)
    random.Random(0).shuffle(order)  # writers accept any order
    for e, a in order:
        w.write(e, a)
    w.finish()
    commit_destination(tmp, tmp_path / "ckpt")

    # what checkpoint.py sees
    tree = flatten(saved_tree(tmp_path / "ckpt"))
    assert tree["layers/mlp/fc_in/kernel"].shape == (5, 32, 64)
    assert tree["layers/mlp/fc_in/kernel"].dtype == ml_dtypes.bfloat16
    cfg, params = load_params(tmp_path / "ckpt")
    flat = flatten(params)
    for e, a in slices:
        got = np.asarray(flat[e.name]) if e.layer is None else np.asarray(flat[e.name][e.layer])
        assert got.dtype == a.dtype and np.array_equal(bits(got), bits(a)), e.label
    # chunked one layer per chunk along the stacked axis
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{(tmp_path / 'ckpt' / 'params').resolve()}/",
                                          "path": "layers.attn.qkv.kernel/"}}
    t = ts.open(spec, open=True).result()
    assert t.chunk_layout.read_chunk.shape[0] == 1 and t.shape == (5, 32, 3, 4, 8)
    marker = json.loads((tmp_path / "ckpt" / "neox_jax.json").read_text())
    assert marker["converted_from"] == {"format": "test"} and marker["num_params"] == CFG.num_params()


def test_restore_onto_a_mesh(tmp_path):
    """The streamed checkpoint restores sharded over several devices (the trainer's use)."""
    assert len(jax.devices()) >= 2, "needs several devices (conftest.py asks XLA for 8 CPU devices)"
    slices = random_slices(CFG, 1)
    tmp = prepare_destination(tmp_path / "ckpt")
    w = OrbaxWriter(tmp, CFG, [e for e, _ in slices])
    for e, a in slices:
        w.write(e, a)
    w.finish()
    commit_destination(tmp, tmp_path / "ckpt")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    P = jax.sharding.PartitionSpec
    sh = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, P("x") if s.shape[0] % 2 == 0 else P()),
                      saved_tree(tmp_path / "ckpt"))
    _, params = load_params(tmp_path / "ckpt", shardings=sh)
    flat = flatten(params)
    emb = flat["embed_in/embedding"]
    assert len(emb.sharding.device_set) == 2
    assert np.array_equal(bits(emb), bits(dict((e.name, a) for e, a in slices)["embed_in/embedding"]))


def test_chunk_shape():
    assert chunk_shape((44, 6144, 24576), True, 2) [0] == 1
    c = chunk_shape((44, 6144, 24576), True, 2)
    assert np.prod(c) * 2 <= CHUNK_BYTES and c[2] == 24576
    assert chunk_shape((50432, 6144), False, 2)[1] == 6144
    assert np.prod(chunk_shape((50432, 6144), False, 2)) * 2 <= CHUNK_BYTES
    assert chunk_shape((7,), False, 4) == [7]


def test_save_params_checkpoints_stream_per_layer(tmp_path):
    params = init_params(CFG.replace(tie_word_embeddings=False), seed=3)
    save_params(tmp_path / "ckpt", CFG, params)
    r = OrbaxReader(tmp_path / "ckpt")
    assert r.per_layer["layers/mlp/fc_in/kernel"]
    r.close()


def test_reads_checkpoints_written_by_orbax_itself(tmp_path):
    """A checkpoint saved by plain Orbax (one chunk per array): the reader reads each leaf whole once."""
    import orbax.checkpoint as ocp

    params = init_params(CFG.replace(tie_word_embeddings=False), seed=3)
    (tmp_path / "ckpt").mkdir()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((tmp_path / "ckpt" / "params").resolve(), params)
    ckptr.wait_until_finished()
    write_marker(tmp_path / "ckpt", CFG)
    r = OrbaxReader(tmp_path / "ckpt")
    assert not r.per_layer["layers/mlp/fc_in/kernel"]
    ents = r.entries()
    names = [e.name for e in ents]
    assert names.index("layers/mlp/fc_in/kernel") + CFG.num_layers - 1 == \
        len(names) - 1 - names[::-1].index("layers/mlp/fc_in/kernel")  # all slices of a leaf together
    flat = flatten(params)
    for e in ents:
        a = r.read(e)
        ref = np.asarray(flat[e.name]) if e.layer is None else np.asarray(flat[e.name][e.layer])
        assert np.array_equal(a, ref), e.label
    r.close()
    # and converts to HF and back bit-identically
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    _, back = load_params(tmp_path / "back")
    fb = flatten(back)
    for k in flat:
        assert np.array_equal(bits(fb[k]), bits(flat[k])), k


def test_python_side_holds_one_tensor_at_a_time(tmp_path):
    """tracemalloc sees numpy buffers: during HF -> orbax -> HF the Python-side peak stays a small
    multiple of the largest single tensor, far below the model size (tensorstore's own C++ buffers
    are not counted here; bench/convert_memory.py measures the process RSS)."""
    model = tiny_hf(5, vocab=512, hidden=64, layers=12, heads=4)
    src = save_hf(model, tmp_path / "hf", dtype=torch.float32)
    total = sum(p.numel() * 4 for p in model.parameters())
    largest = 512 * 64 * 4
    for s, d, to in ((src, tmp_path / "orb", "orbax"), (tmp_path / "orb", tmp_path / "hf2", "hf")):
        tracemalloc.start()
        convert(str(s), str(d), to=to)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 6 * largest < total / 3, (to, peak, largest, total)
    shutil.rmtree(tmp_path / "hf2")
