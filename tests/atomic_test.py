"""Write safety (issue 8): atomic replacement, interrupted runs, full disks, checksums.

Fault tests run the real CLI in a subprocess and kill it.  The window is widened with the test hook
NEOX_JAX_TEST_PAUSE="point:seconds" (neox_jax/atomic.py: `test_pause`), which sleeps at a named
point: after each tensor of `convert`, after each chunk of documents of `data preprocess`, after
each output is published.  The test waits until the run's journal exists (it is writing), or says
"committing" (it is publishing), then sends the signal.  DST must then be byte-identical to the
complete old output or to the complete new output made by an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neox_jax import atomic
from neox_jax.checkpoint import CheckpointError, load_params, save_params
from neox_jax.cli import main
from neox_jax.config import load_config
from neox_jax.convert.stream import convert
from neox_jax.data.indexed import IndexedDataset
from neox_jax.data.preprocess import preprocess
from neox_jax.errors import UserError
from neox_jax.model import abstract_params

ROOT = Path(__file__).resolve().parents[1]


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file under path (or path itself) -> its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if atomic._NAME.match(n))


def one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [x for x in err if x.startswith("neox-jax: error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def random_params(cfg, seed: int):
    """Random values of the model's shapes (only the bytes matter here; no jit compile)."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), abstract_params(cfg))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny checkpoints (seeds 0 and 1) and the HF conversion of each."""
    d = tmp_path_factory.mktemp("ck")
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    for seed in (0, 1):
        save_params(d / f"ck{seed}", cfg, random_params(cfg, seed))
        convert(str(d / f"ck{seed}"), str(d / f"hf{seed}"), to="hf")
    return d


# ----------------------------------------------------------------------------- the helper itself


@pytest.mark.parametrize("swap", ["exchange", "aside"])
def test_directory_replacement(tmp_path, monkeypatch, swap):
    if swap == "aside":  # a kernel or file system without RENAME_EXCHANGE
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(UserError, match="exists and is not empty"):
        atomic.Replacement([dst], directory=True)
    with atomic.Replacement([dst], overwrite=True, directory=True) as rep:
        (rep.path / "new.txt").write_text("new")
        assert json.loads(rep.journal.read_text())["state"] == "writing"
        rep.commit()
    assert tree_bytes(dst) == {"new.txt": b"new"} and leftovers(tmp_path) == []
    (tmp_path / "link").symlink_to(dst)
    with pytest.raises(UserError, match="symbolic link"):
        atomic.Replacement([tmp_path / "link"], overwrite=True, directory=True)


def test_failure_keeps_the_old_output(tmp_path):
    dst = tmp_path / "out.txt"
    dst.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.Replacement([dst], overwrite=True) as rep:
            rep.tmp().write_text("half")
            raise RuntimeError("boom")
    assert dst.read_text() == "old" and leftovers(tmp_path) == []


def test_stale_temporaries_removed_only_when_provably_abandoned(tmp_path, caplog):
    parent = tmp_path
    mine = {"tool": "neox-jax", "host": __import__("socket").gethostname(), "boot_id": atomic._boot_id(),
            "state": "writing"}
    for op, pid in (("0000000000aa", dead_pid()), ("0000000000bb", os.getpid())):
        (parent / f".x.neox-jax-{op}.tmp").mkdir()
        (parent / f".x.neox-jax-{op}.journal").write_text(json.dumps(
            {**mine, "op": op, "pid": pid, "pid_start": atomic._start_time(pid),
             "targets": [{"final": "x", "tmp": f".x.neox-jax-{op}.tmp", "old": f".x.neox-jax-{op}.old",
                          "dir": True, "id": None}]}))
    (parent / ".y.neox-jax-0000000000cc.tmp").write_text("no journal")
    notes = atomic.recover(parent)
    assert leftovers(parent) == [".x.neox-jax-0000000000bb.journal", ".x.neox-jax-0000000000bb.tmp",
                                 ".y.neox-jax-0000000000cc.tmp"]
    assert any("removed the temporaries of an interrupted run" in n for n in notes)
    assert any("another neox-jax run" in n and str(os.getpid()) in n for n in notes)
    assert any("without a journal" in n for n in notes)


@pytest.mark.parametrize("swap", ["exchange", "aside"])
def test_set_aside_restore_commit_and_recover(tmp_path, monkeypatch, swap):
    """SetAside (train --overwrite): restore puts the old directory back and deletes the new one;
    commit deletes the old one; a journal left by a dead process is undone by `recover` whether the
    restore had not begun or was cut between its renames; a live one makes a second SetAside refuse."""
    if swap == "aside":
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    dst = tmp_path / "run"

    def old_run():
        atomic.remove(dst)
        (dst / "sub").mkdir(parents=True)
        (dst / "sub" / "old.txt").write_text("old")
        return tree_bytes(dst)

    def new_run():
        dst.mkdir()
        (dst / "new.txt").write_text("new")

    before = old_run()
    rep = atomic.SetAside(dst)
    assert not dst.exists() and json.loads(rep.journal.read_text())["state"] == "aside"
    new_run()
    with pytest.raises(UserError, match="another neox-jax run"):
        atomic.SetAside(dst)  # this process is alive: its journal is not abandoned
    assert "is being rebuilt; its previous content was moved aside" in atomic.pending(dst)
    # every reader says so, `inspect`, `diff` and `convert` too (they said "not a recognised checkpoint")
    from neox_jax.convert.dispatch import detect_format

    with pytest.raises(CheckpointError, match="is being rebuilt; its previous content was moved aside"):
        detect_format(dst)
    with pytest.raises(CheckpointError, match="is being rebuilt"):
        load_params(dst)
    rep.restore()
    assert tree_bytes(dst) == before and leftovers(tmp_path) == []
    rep = atomic.SetAside(dst)
    new_run()
    rep.commit()
    assert tree_bytes(dst) == {"new.txt": b"new"} and leftovers(tmp_path) == []
    for cut in ("before-restore", "between-renames", "committing"):
        before = old_run()
        rep = atomic.SetAside(dst)
        new_run()
        if cut == "committing":  # killed after the journal said so, before the old copy was deleted
            rep._target["id"] = atomic._identity(dst)
            rep._write_journal("committing")
        j = json.loads(rep.journal.read_text())
        rep.journal.write_text(json.dumps({**j, "pid": dead_pid(), "pid_start": None}))
        if cut == "between-renames":  # the fallback's first rename done, the second not
            os.rename(dst, tmp_path / j["targets"][0]["tmp"])
        notes = atomic.recover(tmp_path)
        if cut == "committing":
            assert any("finished a replacement" in n for n in notes), notes
            assert tree_bytes(dst) == {"new.txt": b"new"} and leftovers(tmp_path) == []
            continue
        assert any("put back the previous content" in n for n in notes), notes
        assert tree_bytes(dst) == before and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- full disk


def test_disk_full_during_convert_and_init(ckpts, tmp_path, capsys, monkeypatch):
    """ENOSPC injected at the write layer, in-process (no small file system can be mounted here):
    the converter's tensor write and Orbax's save for `init`."""
    from neox_jax.convert.orbax_io import OrbaxWriter

    dst = tmp_path / "dst"
    shutil.copytree(ckpts / "ck1", dst)
    before = tree_bytes(dst)
    calls = []

    def full(self, entry, array):
        calls.append(entry)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, entry, array)

    real = OrbaxWriter.write
    monkeypatch.setattr(OrbaxWriter, "write", full)
    assert main(["convert", str(ckpts / "hf0"), str(dst), "--overwrite"]) == 2
    one_error_line(capsys, str(dst), "No space left on device", "old output is untouched")
    assert tree_bytes(dst) == before and leftovers(tmp_path) == []
    monkeypatch.undo()

    import orbax.checkpoint as ocp

    from neox_jax import model

    def full_save(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full_save)
    monkeypatch.setattr(model, "init_params", random_params)  # the write is under test, not the init
    assert main(["init", str(ROOT / "configs" / "tiny.yaml"), str(dst), "--overwrite"]) == 2
    one_error_line(capsys, str(dst), "No space left on device")
    assert tree_bytes(dst) == before and leftovers(tmp_path) == []


def _tiny_run_yaml(d: Path) -> Path:
    f = d / "run.yaml"
    f.write_text(json.dumps({  # JSON is YAML
        "model": {"preset": "tiny", "num_layers": 1}, "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "data": {"path": str(d / "corpus"), "seq_length": 32}, "train": {"steps": 2, "batch_size": 2}}))
    return f


BAD = os.fsdecode(b"x\xff\xfe")  # what Python makes of a command-line argument with these bytes (PEP 383)


@pytest.mark.parametrize("cmd", [
    lambda fx, d: ["init", "tiny", str(d / BAD)],
    lambda fx, d: ["convert", str(fx["ck"] / "ck0"), str(d / BAD), "--to", "orbax"],
    lambda fx, d: ["convert", str(fx["ck"] / "ck0"), str(d / BAD), "--to", "hf"],
    lambda fx, d: ["data", "preprocess", str(fx["corpus"] / "old.jsonl"), "--output-prefix", str(d / BAD),
                   "--tokenizer", str(fx["tok"])],
    lambda fx, d: ["score", str(fx["ck"] / "ck0"), "--input", str(fx["corpus"] / "old.jsonl"),
                   "--tokenizer", str(fx["tok"]), "--output", str(d / BAD)],
    lambda fx, d: ["train", str(_tiny_run_yaml(fx["ck"])), "--run-dir", str(d / BAD)],
], ids=["init", "convert-orbax", "convert-hf", "preprocess", "score", "train"])
def test_destination_name_not_utf8_is_refused(cmd, ckpts, corpus, neox_tokenizer_path, tmp_path, capsys):
    """A destination whose name holds bytes that are not UTF-8: one line naming it (its bytes shown
    as \\xff), before any work, and nothing written.  tensorstore takes no such path: `init` and
    `convert --to orbax` failed with a traceback after the work (init, now and then, leaving its
    temporary directory behind), `train` after training, at its first checkpoint."""
    d = tmp_path / "out"
    d.mkdir()
    args = cmd({"ck": ckpts, "corpus": corpus, "tok": neox_tokenizer_path}, d)
    assert main(args) == 2
    line = one_error_line(capsys, "x\\xff\\xfe", "not UTF-8 (byte 0xff at offset")
    assert line.startswith(f"neox-jax: error: {d}/x\\xff\\xfe"), line
    assert os.listdir(d) == []


def test_working_directory_not_utf8_is_refused(tmp_path, monkeypatch, capsys):
    """A plain output name inside a working directory whose name is not UTF-8: the absolute path
    (what tensorstore gets) is the one refused, named."""
    cwd = Path(os.fsdecode(bytes(tmp_path) + b"/d\xe9"))
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["init", "tiny", "ck"]) == 2
    one_error_line(capsys, f"{tmp_path}/d\\xe9/ck: not UTF-8 (byte 0xe9 at offset {len(bytes(tmp_path)) + 2})")
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("cmd", ["inspect", "convert", "generate"])
def test_checkpoint_at_a_path_not_utf8_is_one_line(cmd, ckpts, neox_tokenizer_path, tmp_path, capsys):
    """A neox-jax checkpoint moved to a name that is not UTF-8: tensorstore cannot open it; readers
    said "unreadable Orbax metadata (RuntimeError: Unable to cast ...)" after Orbax's logged traceback,
    and `inspect` (which tries the other formats) "has config.json but no model.safetensors".  Now one
    line naming the path; an HF checkpoint at such a path still reads (torch opens any name)."""
    import shutil

    src = Path(os.fsdecode(bytes(tmp_path) + b"/ck\xff"))
    shutil.copytree(ckpts / "ck0", src)
    args = {"inspect": ["inspect", str(src), "--no-hash"], "convert": ["convert", str(src), str(tmp_path / "hf"),
                                                                       "--to", "hf"],
            "generate": ["generate", str(src), "--prompt", "hi", "--tokenizer", str(neox_tokenizer_path)]}[cmd]
    assert main(args) == 2
    one_error_line(capsys, f"{tmp_path}/ck\\xff: not UTF-8 (byte 0xff at offset {len(bytes(tmp_path)) + 3}); "
                   "a checkpoint's path must be UTF-8")
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(src)]
    if cmd == "inspect":
        hf = Path(os.fsdecode(bytes(tmp_path) + b"/hf\xff"))
        shutil.copytree(ckpts / "hf0", hf)
        assert main(["inspect", str(hf), "--no-hash"]) == 0


def test_failed_orbax_save_waits_for_its_threads(tmp_path, monkeypatch):
    """Orbax fails a save as soon as one of its threads fails, while others still work: here the
    array writes fail at once (ENOSPC) while the directory for the arrays' metadata is being created
    (slowed to 1 s).  That directory used to appear after the temporary directory had been deleted,
    leaving `.ck.neox-jax-....tmp/params.orbax-checkpoint-tmp/array_metadatas` behind."""
    import asyncio

    import jax
    from orbax.checkpoint._src.path import async_path
    from orbax.checkpoint._src.serialization import serialization

    async def slow_mkdir(path, parents=False, exist_ok=False, mode=None):
        def mkdir():
            time.sleep(1.0)
            path.mkdir(parents=parents, exist_ok=exist_ok)
        return await asyncio.to_thread(mkdir)

    async def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(async_path, "mkdir", slow_mkdir)
    monkeypatch.setattr(serialization, "async_serialize_from_host", full)
    cfg = load_config(ROOT / "configs" / "tiny.yaml").replace(num_layers=1)
    dst = tmp_path / "ck"
    dst.mkdir()
    (dst / "old").write_text("old")
    params = jax.tree.map(jax.numpy.asarray, random_params(cfg, 0))
    with pytest.raises(UserError, match=f"^{dst}: No space left on device while writing .*; the old output is untouched$"):
        save_params(dst, cfg, params, overwrite=True)
    time.sleep(1.5)  # longer than the slowed mkdir
    assert os.listdir(tmp_path) == ["ck"] and tree_bytes(dst) == {"old": b"old"}


FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk with ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
from neox_jax.cli import main
sys.exit(main(sys.argv[2:]))
"""


def fsize_limited(limit: int, *args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`neox-jax ARGS` with no file allowed to grow past `limit` bytes: a real failing write inside
    Orbax and tensorstore (no small file system can be mounted here).  `env`: added to os.environ."""
    return subprocess.run([sys.executable, "-c", FSIZE, str(limit), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("cmd", ["init", "convert"])
def test_failed_orbax_write_is_a_few_lines(cmd, ckpts, tmp_path):
    """A write that fails inside Orbax (every array file is over 1 MB, the limit): stderr is at most
    4 lines (INFO, Orbax's first error as one line, ours), the last the one-line error naming the
    destination and the cause; the old output untouched, no temporary left.  Orbax logged a traceback
    from each of its threads and tensorstore's callbacks into the closed event loop one each: about
    250 lines before our line (or, for a cause other than ENOSPC, a traceback, exit status 1)."""
    dst = tmp_path / "dst"
    shutil.copytree(ckpts / "ck1", dst)
    before = tree_bytes(dst)
    args = (["init", "tiny", dst, "--set", "model.num_layers=1"] if cmd == "init" else
            ["convert", ckpts / "hf0", dst, "--to", "orbax"])
    proc = fsize_limited(2**20, *args, "--overwrite")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(err) <= 4, proc.stderr
    assert err[-1].startswith(f"neox-jax: error: {dst}: {os.strerror(errno.EFBIG)} while writing {tmp_path}/.dst.neox-jax-"), err[-1]
    assert err[-1].endswith("; the old output is untouched"), err[-1]
    assert tree_bytes(dst) == before and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- checksums


def test_checksums_are_zlib_crc32_of_each_tensor_and_layer(ckpts, tmp_path):
    """checksums.json from save_params (init) and from the streaming converter (HF -> orbax) is
    zlib.crc32 of each tensor's little-endian bytes, one per layer for stacked tensors."""
    import zlib

    from neox_jax.tree import flatten

    convert(str(ckpts / "hf0"), str(tmp_path / "conv"))
    _, params = load_params(ckpts / "ck0")
    for ck in (ckpts / "ck0", tmp_path / "conv"):
        stored = json.loads((ck / "checksums.json").read_text())
        assert stored["algorithm"] == "crc32"
        want = {}
        for name, x in flatten(params).items():
            a = np.asarray(x)
            crc = [zlib.crc32(np.ascontiguousarray(s).astype(s.dtype.newbyteorder("<")).tobytes())
                   for s in (a if name.startswith("layers/") else [a])]
            want[name] = [f"{c:08x}" for c in crc] if name.startswith("layers/") else f"{crc[0]:08x}"
        assert stored["tensors"] == want, ck


def test_flipped_bit_is_named(ckpts, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts / "ck0", bad)
    big = max((p for p in (bad / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0x10
    big.write_bytes(bytes(data))
    (tmp_path / "in.jsonl").write_text('{"tokens": [1, 2, 3, 4, 5]}\n')
    for argv in (["inspect", str(bad), "--no-hash"], ["convert", str(bad), str(tmp_path / "out"), "--to", "hf"],
                 ["score", str(bad), "--input", str(tmp_path / "in.jsonl"), "--verify"]):
        assert main(argv) == 2, argv
        one_error_line(capsys, str(bad), "tensor ", "is damaged", "checksums.json")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    with pytest.raises(CheckpointError, match=r"tensor \S+ is damaged"):
        load_params(bad, verify=True)
    cfg, params = load_params(ckpts / "ck0", verify=True, dtype="bfloat16")  # clean: passes, then casts
    assert str(params["embed_in"]["embedding"].dtype) == "bfloat16"


# ----------------------------------------------------------------------------- killed runs


def _spawn(args, pause: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NEOX_JAX_TEST_PAUSE": pause,
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "neox_jax", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _wait_for_journal(proc, parent: Path, state: str, timeout: float = 90) -> None:
    end = time.time() + timeout
    while time.time() < end:
        for j in parent.glob(".*.neox-jax-*.journal"):
            try:
                if json.loads(j.read_text()).get("state") == state:
                    return
            except (OSError, ValueError):
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no journal in state {state} under {parent}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_convert_leaves_old_or_new(ckpts, tmp_path, capsys, caplog, sig):
    dst = tmp_path / "hf"
    shutil.copytree(ckpts / "hf1", dst)
    old, new = tree_bytes(dst), tree_bytes(ckpts / "hf0")
    assert old != new
    proc = _spawn(["convert", ckpts / "ck0", dst, "--to", "hf", "--overwrite"], "convert-tensor:0.2")
    _wait_for_journal(proc, tmp_path, "writing")
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert tree_bytes(dst) == old  # killed while writing: the old output, whole
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and err.strip().splitlines()[-1] == "neox-jax: terminated", err
        assert leftovers(tmp_path) == []
    else:
        assert proc.returncode == -signal.SIGKILL and leftovers(tmp_path)
        caplog.set_level("WARNING", logger="neox_jax")
        assert main(["convert", str(ckpts / "ck0"), str(dst), "--to", "hf", "--overwrite"]) == 0
        assert "removed the temporaries of an interrupted run" in caplog.text
        assert tree_bytes(dst) == new and leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare):
    """Old and new inputs, and the new pair as an uninterrupted run writes it."""
    d = tmp_path_factory.mktemp("corpus")
    lines = [ln for ln in shakespeare.splitlines() if ln.strip()]
    (d / "old.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:200]))
    (d / "new.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:1500]))
    return d


def _pair(prefix: Path) -> dict[str, bytes]:
    return {s: Path(f"{prefix}_text_document{s}").read_bytes() for s in (".bin", ".idx")}


@pytest.mark.parametrize("sig,when", [(signal.SIGTERM, "writing"), (signal.SIGKILL, "writing"),
                                      (signal.SIGKILL, "committing")])
def test_killed_preprocess_leaves_old_or_new_pair(corpus, neox_tokenizer_path, tmp_path, caplog, sig, when):
    ref = tmp_path / "ref" / "d"
    preprocess([corpus / "new.jsonl"], str(ref), neox_tokenizer_path)
    out = tmp_path / "out"
    out.mkdir()
    prefix = out / "d"
    preprocess([corpus / "old.jsonl"], str(prefix), neox_tokenizer_path)
    old, new = _pair(prefix), _pair(ref)
    pause = "preprocess-chunk:0.4" if when == "writing" else "publish:30"
    proc = _spawn(["data", "preprocess", corpus / "new.jsonl", "--output-prefix", prefix,
                   "--tokenizer", neox_tokenizer_path, "--overwrite"], pause)
    _wait_for_journal(proc, out, when)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if when == "writing":
        assert _pair(prefix) == old
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and "neox-jax: terminated" in err and leftovers(out) == []
        return
    # killed between publishing the .bin and the .idx: on disk a new .bin beside the old .idx, which
    # no reader accepts; the journal says the new pair is complete, and the next write finishes it
    assert Path(f"{prefix}_text_document.bin").read_bytes() == new[".bin"]
    with pytest.raises(UserError, match="interrupted replacement is pending"):
        IndexedDataset(f"{prefix}_text_document")
    caplog.set_level("WARNING", logger="neox_jax")
    notes = atomic.recover(out)
    assert any("finished a replacement" in n for n in notes), notes
    assert _pair(prefix) == new and leftovers(out) == []
    assert IndexedDataset(f"{prefix}_text_document").num_tokens > 0


def _tokenising_with_workers(corpus, tokenizer, out: Path) -> subprocess.Popen:
    """`data preprocess --workers 2` into the new directory OUT, in a session of its own, once its
    workers are tokenising (each chunk held 0.3 s in the parent)."""
    out.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NEOX_JAX_TEST_PAUSE": "preprocess-chunk:0.3",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "neox_jax", "data", "preprocess", str(corpus / "new.jsonl"),
                             "--output-prefix", str(out / "d"), "--tokenizer", str(tokenizer),
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    try:
        _wait_for_journal(proc, out, "writing")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    time.sleep(1.0)
    return proc


def test_sigterm_to_the_process_group_of_preprocess_with_workers(corpus, neox_tokenizer_path, tmp_path):
    """A scheduler's SIGTERM (scancel, a time limit) reaches the whole process group, the tokenising
    workers too: multiprocessing.Pool.terminate then waited forever for a queue lock a killed worker
    held, and every such signal during tokenising hung the command.  Now: exit 143, one line, the
    output's temporaries gone, within seconds."""
    out = tmp_path / "out"
    proc = _tokenising_with_workers(corpus, neox_tokenizer_path, out)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and err.strip().splitlines() == ["neox-jax: terminated"], err[-2000:]
    assert leftovers(out) == [] and os.listdir(out) == []


def test_sigkill_of_preprocess_ends_its_workers_quietly(corpus, neox_tokenizer_path, tmp_path):
    """SIGKILL to preprocess alone (the OOM killer; `kill -9` of the command): its tokenising workers
    die with it (the kernel's parent-death signal) instead of waiting on a queue nobody feeds and then
    printing tracebacks from it (BrokenPipeError, EOFError)."""
    out = tmp_path / "out"
    proc = _tokenising_with_workers(corpus, neox_tokenizer_path, out)
    try:
        children = [int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
        assert len(children) >= 2, children  # the workers (and multiprocessing's resource tracker)
        proc.kill()
        _, err = proc.communicate(timeout=30)  # EOF once every holder of the stderr pipe (the workers) is gone
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{c}").exists() for c in children):
        time.sleep(0.1)
    assert not [c for c in children if Path(f"/proc/{c}").exists()], children
    assert "Traceback" not in err and "Error" not in err, err[-3000:]


def test_bin_longer_than_index_refused(tmp_path, neox_tokenizer_path, corpus):
    prefix = tmp_path / "d"
    preprocess([corpus / "old.jsonl"], str(prefix), neox_tokenizer_path)
    with open(f"{prefix}_text_document.bin", "ab") as f:
        f.write(np.zeros(3, np.uint16).tobytes())
    with pytest.raises(UserError, match="longer than the index says"):
        IndexedDataset(f"{prefix}_text_document")


def test_an_interrupt_while_a_replacement_or_set_aside_begins_leaves_nothing(tmp_path, monkeypatch):
    """SIGINT/SIGTERM (KeyboardInterrupt, Terminated) raised inside `Replacement(...)` right after its
    journal is written, before the caller's `with` has begun: the journal used to stay behind (the
    next write removed it with a warning).  A `SetAside(...)` interrupted as its held signals are
    delivered, right after the rename: the directory used to stay aside until the next run."""
    real = atomic._write_journal

    def interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_write_journal", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.Replacement([tmp_path / "out.jsonl"])
    with pytest.raises(KeyboardInterrupt):
        atomic.Replacement([tmp_path / "ck"], directory=True)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(atomic, "_write_journal", real)

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old\n")
    real_exit = atomic.HeldSignals.__exit__

    def delivered(self, *exc):  # a signal held during the rename, raised as the block ends
        real_exit(self, *exc)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.HeldSignals, "__exit__", delivered)
    with pytest.raises(KeyboardInterrupt):
        atomic.SetAside(run)
    monkeypatch.setattr(atomic.HeldSignals, "__exit__", real_exit)
    assert os.listdir(tmp_path) == ["run"] and (run / "config.yaml").read_text() == "old\n"


def test_an_orphan_first_journal_is_recovered(tmp_path):
    """A run killed between writing its first journal (`.journal.new`) and renaming it leaves only that
    file; `recover` (every neox-jax write beside it) used to ignore it for good.  Its owner gone, it
    is removed (one note); a live owner's is left alone, silently."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("a", dead.pid), ("b", os.getpid())):
        j = tmp_path / f".{name}.jsonl.{atomic.TAG}-{name * 12}.journal"
        atomic._write_journal(j, name * 12, "writing", [{"final": f"{name}.jsonl", "tmp": "t", "old": "o",
                                                          "dir": False, "id": None}])
        data = json.loads(j.read_text())
        data.update(pid=pid, pid_start=atomic._start_time(pid) if pid == os.getpid() else None)
        j.with_name(j.name + ".new").write_text(json.dumps(data))
        j.unlink()
    notes = atomic.recover(tmp_path)
    assert notes == [f"{tmp_path}/.a.jsonl.{atomic.TAG}-{'a' * 12}.journal.new: removed the unfinished journal "
                     f"of an interrupted run (pid {dead.pid} on {data['host']})"], notes
    assert os.listdir(tmp_path) == [f".b.jsonl.{atomic.TAG}-{'b' * 12}.journal.new"]
