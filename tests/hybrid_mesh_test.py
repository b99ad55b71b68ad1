"""Hybrid (ICI x DCN) meshes with fake devices: which devices each mesh axis groups, the default
data-across-nodes factor, and the one-line refusals (neox_jax/sharding.py: hybrid_device_array)."""

from types import SimpleNamespace

import jax
import pytest

from neox_jax.sharding import hybrid_device_array, make_mesh, node_count
from neox_jax.train.config import ConfigError, MeshConfig


def gpus(nodes: int, procs_per_node: int, gpus_per_proc: int, slice_index: bool = True):
    """Devices as jax.devices() lists them: process-major; ids numbered per process (shuffled within
    a node to check that ids, not list order, order a node's devices, as mesh_utils does for GPUs).
    `slice_index`: the host number, which XLA gives GPUs under jax.distributed (processes grouped by
    the host's boot id, xla/pjrt/distributed/topology_util.cc); False: no attribute, as on CPU."""
    out = []
    for p in range(nodes * procs_per_node):
        for g in range(gpus_per_proc):
            d = SimpleNamespace(id=p * gpus_per_proc + (gpus_per_proc - 1 - g), process_index=p,
                                platform="gpu", device_kind="fake gpu")
            if slice_index:
                d.slice_index = p // procs_per_node
            out.append(d)
    return out


@pytest.mark.parametrize("slice_index", [True, False])
@pytest.mark.parametrize("procs_per_node, gpus_per_proc", [(1, 8), (8, 1), (2, 4)])
def test_data_across_nodes_fsdp_and_tensor_within(procs_per_node, gpus_per_proc, slice_index):
    devs = gpus(3, procs_per_node, gpus_per_proc, slice_index)
    node = {id(d): d.process_index // procs_per_node for d in devs}
    arr = hybrid_device_array((1, 4, 2), (3, 1, 1), devs)
    assert arr.shape == (3, 4, 2)
    for n in range(3):
        # data index n is exactly node n's 8 devices, in id order (fsdp-major, tensor-minor)
        block = arr[n]
        assert {node[id(d)] for d in block.ravel()} == {n}
        assert [d.id for d in block.ravel()] == list(range(8 * n, 8 * n + 8))


def test_fsdp_across_nodes_and_minus_one_within():
    devs = gpus(2, 1, 8)
    arr = hybrid_device_array((1, -1, 2), (1, 2, 1), devs)
    assert arr.shape == (1, 8, 2)
    # fsdp index i < 4 on node 0, >= 4 on node 1: the dcn factor is the outer part of the axis
    assert all(d.process_index == (0 if i < 4 else 1) for i in range(8) for d in arr[0, i])


def test_tpu_slices_use_slice_index():
    devs = [SimpleNamespace(id=i, process_index=i // 4, slice_index=i // 8, platform="cpu", device_kind="fake")
            for i in range(16)]
    assert node_count(devs) == 2
    arr = hybrid_device_array((1, 8, 1), (2, 1, 1), devs)
    assert [d.slice_index for d in arr[:, 0, 0]] == [0, 1]
    assert {d.slice_index for d in arr[1].ravel()} == {1}


def test_node_count_defaults():
    # GPUs under jax.distributed: the hosts, whatever the processes per host
    assert node_count(gpus(3, 1, 8)) == 3
    assert node_count(gpus(3, 8, 1)) == 3
    assert node_count(gpus(1, 2, 4)) == 1  # two processes on one host share its NVLink: one node
    # no slice_index (CPU): processes holding several devices each are nodes; one device each, unknown
    assert node_count(gpus(3, 1, 8, slice_index=False)) == 3
    assert node_count(gpus(3, 8, 1, slice_index=False)) == 1
    # one TPU slice over 4 hosts is one granule (ICI joins the hosts), not 4
    one_slice = [SimpleNamespace(id=i, process_index=i // 4, slice_index=0) for i in range(16)]
    assert node_count(one_slice) == 1
    assert node_count(jax.devices()) == 1


def test_hosts_not_numbered_in_process_order():
    """Processes placed round-robin over two hosts (ranks 0, 2 on host 0; 1, 3 on host 1): the node
    blocks follow slice_index, not rank order."""
    devs = [SimpleNamespace(id=p * 2 + g, process_index=p, slice_index=p % 2, platform="gpu", device_kind="fake")
            for p in range(4) for g in range(2)]
    arr = hybrid_device_array((1, 4, 1), (2, 1, 1), devs)
    assert [{d.process_index for d in arr[n].ravel()} for n in range(2)] == [{0, 2}, {1, 3}]


@pytest.mark.parametrize("ici, dcn, words", [
    ((1, 4, 2), (2, 1, 1), ["within a node/slice needs 8 devices", "has 12"]),
    ((1, -1, 5), (3, 1, 1), ["8 devices per node/slice do not divide"]),
    ((1, -1, 1), (5, 1, 1), ["do not divide into 5 nodes"]),
    ((1, -1, -1), (3, 1, 1), ["at most one"]),
])
def test_refused(ici, dcn, words):
    with pytest.raises(ValueError) as e:
        hybrid_device_array(ici, dcn, gpus(3, 1, 8))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_single_process_mesh_with_dcn_factor_on_real_devices():
    """On one process of 8 CPU devices a dcn factor > 1 finds one node: refused, naming the count."""
    with pytest.raises(ValueError, match="1 processes do not divide into 2 nodes"):
        make_mesh(1, -1, 1, devices=jax.devices()[:8], dcn=(2, 1, 1))
    assert make_mesh(1, -1, 2, devices=jax.devices()[:8]).shape == {"data": 1, "fsdp": 4, "tensor": 2}


def test_config_validation():
    assert MeshConfig().dcn_data == 0
    with pytest.raises(ConfigError, match="dcn_fsdp"):
        MeshConfig(dcn_fsdp=0)
