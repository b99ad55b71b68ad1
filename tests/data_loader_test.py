"""Loader: determinism, O(1) resume without replay, per-host shares (in-process and with two real JAX
processes), segment ids and NeoX-style packing against loop references."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from neox_jax.data.indexed import IndexedDatasetWriter
from neox_jax.data.loader import Loader, pack_documents, segment_ids_from_eod
from neox_jax.data.order import GPT2Dataset
from neox_jax.errors import UserError

S = 32
B = 8


def make_dataset(path: Path, seed: int = 1234) -> GPT2Dataset:
    if not Path(f"{path}.idx").exists():
        rng = np.random.RandomState(0)
        with IndexedDatasetWriter(path, np.uint16) as w:
            for n in rng.randint(1, 90, size=300):
                w.add_document(np.append(rng.randint(2, 50000, size=n), 0))  # documents end with EOD 0
    return GPT2Dataset.build(str(path), 200, S, seed)


class Counting:
    """A dataset wrapper that records which items were read."""

    def __init__(self, ds):
        self.ds, self.reads = ds, []

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.ds[i]


def test_same_seed_same_batches_and_rows_are_dataset_items(tmp_path):
    a = list(Loader(make_dataset(tmp_path / "d"), B, process_index=0, process_count=1))
    ds = make_dataset(tmp_path / "d")
    b = list(Loader(ds, B, process_index=0, process_count=1, prefetch=0))
    assert len(a) == len(ds) // B and len(a) > 5  # last partial batch dropped
    for s, (x, y) in enumerate(zip(a, b)):
        assert x["tokens"].dtype == np.int32 and x["tokens"].shape == (B, S + 1)
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["tokens"], np.stack([ds[i] for i in range(s * B, (s + 1) * B)]))
    other = list(Loader(make_dataset(tmp_path / "d", seed=5), B, process_index=0, process_count=1))
    assert not np.array_equal(other[0]["tokens"], a[0]["tokens"])


def test_resume_is_the_same_continuation_without_replay(tmp_path):
    ds = make_dataset(tmp_path / "d")
    full = [b["tokens"] for b in Loader(ds, B, process_index=0, process_count=1)]
    first = Loader(ds, B, process_index=0, process_count=1, prefetch=2)
    for _ in range(3):
        next(first)
    state = first.state()
    first.close()
    assert state == {"step": 3, "global_batch": B, "dataset_len": len(ds)}
    counting = Counting(ds)
    resumed = Loader(counting, B, process_index=0, process_count=1, prefetch=0)
    resumed.set_state(state)
    rest = [b["tokens"] for b in resumed]
    assert len(rest) == len(full) - 3
    for x, y in zip(rest, full[3:]):
        np.testing.assert_array_equal(x, y)
    assert min(counting.reads) == 3 * B  # nothing before the resume point was read
    # a state from another setup is refused
    with pytest.raises(UserError, match="global_batch"):
        Loader(ds, 2 * B, process_index=0, process_count=1).set_state(state)
    with Loader(ds, B, start_step=len(full), process_index=0, process_count=1) as done:
        assert list(done) == []


def test_hosts_get_disjoint_contiguous_halves(tmp_path):
    ds = make_dataset(tmp_path / "d")
    one = list(Loader(ds, B, process_index=0, process_count=1))
    halves = [list(Loader(ds, B, process_index=h, process_count=2)) for h in range(2)]
    for s, full in enumerate(one):
        np.testing.assert_array_equal(np.concatenate([halves[0][s]["tokens"], halves[1][s]["tokens"]]),
                                      full["tokens"])
    with pytest.raises(UserError, match="multiple"):
        Loader(ds, 6, process_index=0, process_count=4)


def ref_segment_ids(row, eod):
    seg, out = 1, []
    for t in row:
        out.append(seg)
        if t == eod:
            seg += 1
    return out


def test_segment_ids(tmp_path):
    ds = make_dataset(tmp_path / "d")
    batch = next(Loader(ds, B, process_index=0, process_count=1, segment_ids=True))
    assert batch["segment_ids"].shape == batch["tokens"].shape
    for row, seg in zip(batch["tokens"], batch["segment_ids"]):
        assert seg.tolist() == ref_segment_ids(row.tolist(), 0)
    assert segment_ids_from_eod(np.array([5, 0, 0, 7]), 0).tolist() == [1, 1, 2, 3]


def test_pack_documents_neox_way():
    rng = np.random.RandomState(3)
    docs = [rng.randint(1, 100, size=n).tolist() for n in rng.randint(0, 30, size=40)]
    stream = []
    for d in docs:
        stream += d + [0]
    ref = [stream[j * S: j * S + S + 1] for j in range((len(stream) - 1) // S)]
    rows = [r.tolist() for r in pack_documents(docs, S, eod_id=0)]
    assert rows == ref and len(rows) > 5
    stream_no_eod = [t for d in docs for t in d]
    rows = [r.tolist() for r in pack_documents(docs, S, eod_id=0, append_eod=False)]
    assert rows == [stream_no_eod[j * S: j * S + S + 1] for j in range((len(stream_no_eod) - 1) // S)]


WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, prefix, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from neox_jax.data.loader import Loader, global_batch_arrays
    from neox_jax.data.order import GPT2Dataset

    ds = GPT2Dataset.build(prefix, 200, 32, 1234)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    local, gathered = [], []
    with Loader(ds, 8, start_step=1, num_steps=4) as loader:  # process index/count from jax
        for batch in loader:
            local.append(batch["tokens"])
            arr = global_batch_arrays(batch, sharding, 8)["tokens"]
            assert arr.shape == (8, 33)
            gathered.append(np.asarray(multihost_utils.process_allgather(arr, tiled=True)))
    np.savez(out, local=np.stack(local), gathered=np.stack(gathered))
    jax.distributed.shutdown()
""")


@pytest.mark.multiprocess
def test_two_jax_processes_share_each_global_batch(tmp_path):
    ds = make_dataset(tmp_path / "d")  # written before the processes start
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(port), str(i),
                               str(tmp_path / "d"), str(tmp_path / f"out{i}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    logs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    outs = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
    single = list(Loader(ds, B, start_step=1, num_steps=4, process_index=0, process_count=1))
    assert len(single) == 3
    for s, batch in enumerate(single):
        h0, h1 = outs[0]["local"][s], outs[1]["local"][s]
        assert h0.shape == h1.shape == (B // 2, S + 1)
        np.testing.assert_array_equal(np.concatenate([h0, h1]), batch["tokens"])
        for o in outs:  # the assembled global jax.Array is the 1-process batch
            np.testing.assert_array_equal(o["gathered"][s], batch["tokens"])


def test_resume_refuses_a_different_dataset_length(tmp_path):
    """A state saved over one dataset is refused by a loader over a dataset of another length (another
    corpus or another num_samples), naming the key; the same length is accepted."""
    ds = make_dataset(tmp_path / "d")
    with Loader(ds, B, process_index=0, process_count=1) as a:
        next(a)
        state = a.state()
    longer = GPT2Dataset.build(str(tmp_path / "d"), 1000, S, 1234)  # more epochs: same corpus and seed
    assert len(longer) != len(ds)
    with Loader(longer, B, process_index=0, process_count=1) as b:
        with pytest.raises(UserError, match=rf"dataset_len={len(ds)}, this loader has {len(longer)}"):
            b.set_state(state)
        assert b.step == 0  # unchanged
    with Loader(make_dataset(tmp_path / "d"), B, process_index=0, process_count=1) as c:
        c.set_state(state)
        assert c.step == 1


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1), (2, 4)])
def test_resume_with_a_different_number_of_hosts(tmp_path, before, after):
    """The state is the global step: a run checkpointed on `before` processes continues on `after` with the
    same global batches (each host's contiguous share, concatenated, is the 1-process batch)."""
    ds = make_dataset(tmp_path / "d")
    full = [b["tokens"] for b in Loader(ds, B, process_index=0, process_count=1)]
    states = []
    for h in range(before):
        with Loader(ds, B, process_index=h, process_count=before) as old:
            for _ in range(4):
                next(old)
            states.append(old.state())
    assert all(s == states[0] for s in states)  # every host saves the same state
    resumed = []
    for h in range(after):
        new = Loader(ds, B, process_index=h, process_count=after, prefetch=1)
        new.set_state(states[0])
        resumed.append([b["tokens"] for b in new])
        new.close()
    assert len(resumed[0]) == len(full) - 4
    for s, want in enumerate(full[4:]):
        np.testing.assert_array_equal(np.concatenate([r[s] for r in resumed]), want)
