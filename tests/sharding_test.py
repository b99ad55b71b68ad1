"""Logical-axis rules, meshes, sharded init and sharded forward on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from neox_jax import model as M
from neox_jax.config import load_config
from neox_jax.sharding import RULES, logical_to_spec, make_mesh, tree_shardings



@pytest.fixture
def eight_devices():
    """The mesh tests need 8 devices; conftest.py asks XLA for 8 CPU devices, so fewer is a failure."""
    n = len(jax.devices())
    assert n >= 8, f"{n} device(s): run on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def test_rules_table():
    assert logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("batch", "seq", "act_embed")) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("nonsense",))
    # every logical name the model uses has a rule
    names = {a for axes in M.flatten(M.param_axes(load_config("tiny"))).values() for a in axes}
    assert names <= set(RULES)


def test_make_mesh_shapes(eight_devices):
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh(data=3, fsdp=2, tensor=2)


def test_sharded_init_and_forward_equal_single_device(eight_devices):
    cfg = load_config("tiny").replace(num_heads=4, compute_dtype="float32")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = M.init_params(cfg, 3, mesh=mesh)
    k = params["layers"]["attn"]["qkv"]["kernel"]
    assert k.sharding.spec == P(None, "fsdp", None, "tensor", None)
    assert params["embed_in"]["embedding"].sharding.spec == P("tensor", "fsdp")
    # each device holds a quarter of the MLP kernel (fsdp x tensor)
    fc = params["layers"]["mlp"]["fc_in"]["kernel"]
    assert fc.addressable_shards[0].data.size == fc.size // 4
    ref_params = M.init_params(cfg, 3)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 32)))
    ref = np.asarray(jax.jit(lambda p, t: M.forward(cfg, p, t))(ref_params, ids))
    with jax.set_mesh(mesh):
        batch_sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "seq")))
        out = jax.jit(lambda p, t: M.forward(cfg, p, t))(params, jax.device_put(ids, batch_sharding))
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_indivisible_dimensions_fall_back_to_replicated(eight_devices):
    cfg = load_config("tiny").replace(num_heads=2, hidden_size=64)  # 2 heads on tensor=4
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    sh = tree_shardings(M.param_axes(cfg), mesh, M.abstract_params(cfg))
    assert sh["layers"]["attn"]["qkv"]["kernel"].spec == P(None, "fsdp", None, None, None)
    assert sh["layers"]["mlp"]["fc_in"]["kernel"].spec == P(None, "fsdp", "tensor")
