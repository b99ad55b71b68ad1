"""The neox-jax checkpoint format: one directory, read by every command.

    CKPT/
      neox_jax.json   {"format": "neox-jax", "version": 1, "kind": "params", ...}
      config.json     the ModelConfig (neox_jax.config), as JSON
      params/         an Orbax PyTree checkpoint of the nested parameter dict (docs/params.md)
      checksums.json  CRC-32 of every tensor's bytes, per layer for stacked ones (checksums.py)

Training checkpoints (a later issue) are the same directory with more Orbax items beside
`params/` (optimizer state, data-loader state); a run directory holds numbered step directories,
and `resolve()` picks the newest complete one.  Writes go through `atomic.Replacement`: a hidden
temporary sibling, fsynced, then swapped in, so an interrupted or failed write never leaves a half
checkpoint, or none, at DST (neox_jax/atomic.py says exactly what is guaranteed).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import atomic, checksums
from .config import ModelConfig, from_dict
from .errors import CheckpointError, ConfigError, one_line, reading
from .model import DTYPES, abstract_params
from .tree import flatten, unflatten
from .values import Fields

log = logging.getLogger(__name__)

# Arrays are stored in chunks of at most this many bytes, one layer per chunk along the stacked
# `layers` axis, so one layer can be read or written alone (converters stream layer by layer).
CHUNK_BYTES = 16 * 2**20

FORMAT = "neox-jax"
VERSION = 1
MARKER = "neox_jax.json"


class _ItemMetadataNote(logging.Filter):
    """Drop Orbax's warning that an item directory has no `_CHECKPOINT_METADATA`: a training step
    keeps that file one level up (`STEP/`), and restoring its `params/` item alone is what we mean."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Metadata file does not exist") and msg.endswith("/_CHECKPOINT_METADATA"))


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

    absl = logging.getLogger("absl")
    if not any(isinstance(f, _ItemMetadataNote) for f in absl.filters):
        absl.addFilter(_ItemMetadataNote())
    return ocp


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A params checkpoint, or a training step directory (`neox_jax.train.checkpoints`), whose
    marker and config are Orbax JSON items: `neox_jax/neox_jax.json`, `config/config.json`."""
    return (Path(path) / MARKER).exists() or (Path(path) / "neox_jax" / MARKER).exists()


def _config_file(p: Path) -> Path:
    return p / "config.json" if (p / "config.json").exists() or not (p / "config").is_dir() \
        else p / "config" / "config.json"


class PathNotUTF8(CheckpointError):
    """A neox-jax checkpoint at a path that is not UTF-8, which tensorstore cannot open."""


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory (params or training step), or a directory whose newest complete
    numbered step is one (a training run directory keeps its steps under `checkpoints/`; an
    unfinished save is only a temporary `STEP.orbax-checkpoint-tmp-*` there)."""
    p = Path(path)
    found = p if is_checkpoint(p) else None
    for d in (p, p / "checkpoints"):
        if found is None and d.is_dir():
            steps = sorted((int(c.name), c) for c in d.iterdir() if c.name.isdigit() and is_checkpoint(c))
            found = steps[-1][1] if steps else None
    if found is not None:  # tensorstore opens no path that is not UTF-8: one line, not Orbax's traceback
        atomic.check_name(found, PathNotUTF8, what="a checkpoint's path")
        return found
    note = atomic.pending(p)
    if note:
        raise CheckpointError(note)
    raise CheckpointError(f"{p}: not a neox-jax checkpoint (no {MARKER})")


def read_marker(path: str | os.PathLike) -> dict:
    """The checkpoint's `neox_jax.json` (a training step keeps it as the Orbax JSON item
    `neox_jax/neox_jax.json`), checked: format "neox-jax", a version this code reads."""
    f = Path(path) / MARKER
    if not f.exists() and (Path(path) / "neox_jax" / MARKER).exists():
        f = Path(path) / "neox_jax" / MARKER
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({one_line(e)})") from None
    m = Fields(meta, str(f))
    fmt, version = m.str("format"), m.int("version")
    if fmt != FORMAT:
        raise CheckpointError(f"{f}: format {fmt!r} is not {FORMAT!r} (not a neox-jax checkpoint)")
    if version != VERSION:
        raise CheckpointError(f"{f}: version {version} is not supported (this neox-jax reads version {VERSION})")
    m.str("kind", "params")
    return meta


def read_config(path: str | os.PathLike) -> ModelConfig:
    p = resolve(path)
    read_marker(p)
    f = _config_file(p)
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return from_dict(raw, where=str(f))


def check_params_dir(path: str | os.PathLike) -> Path:
    """`CKPT/params` with the files Orbax needs to read it (named when missing)."""
    p = resolve(path) / "params"
    if not p.is_dir():
        raise CheckpointError(f"{p}: missing (the checkpoint has no parameters directory)")
    meta = p / "_METADATA"
    try:
        md = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta}: unreadable Orbax metadata ({one_line(e)})") from None
    if not isinstance(md, dict) or not isinstance(md.get("tree_metadata"), dict):
        raise CheckpointError(f"{meta}: no tree_metadata (not an Orbax PyTree checkpoint)")
    if md.get("use_ocdbt", True) and not (p / "manifest.ocdbt").is_file():
        raise CheckpointError(f"{p / 'manifest.ocdbt'}: missing (the OCDBT manifest of the parameter arrays)")
    return p



def check_destination(dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a DST that exists and is not empty (unless overwrite), or is a symbolic link."""
    return atomic.check_destination(dst, overwrite, directory=True, error=CheckpointError)


def open_destination(dst: str | os.PathLike, overwrite: bool = False) -> atomic.Replacement:
    """The Replacement for a checkpoint directory DST: write into `.path`, then `.commit()`."""
    return atomic.Replacement([dst], overwrite=overwrite, directory=True, error=CheckpointError)


_OPEN: dict[Path, atomic.Replacement] = {}


def prepare_destination(dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """`open_destination(...).path` for callers that hold only the temporary path; finish with
    `commit_destination(tmp, dst)` or `discard_destination(tmp)`."""
    rep = open_destination(dst, overwrite)
    _OPEN[rep.path] = rep
    return rep.path


def commit_destination(tmp: Path, dst: str | os.PathLike) -> Path:
    rep = _OPEN.pop(Path(tmp))
    if rep.finals[0] != Path(dst):
        raise ValueError(f"{tmp} was prepared for {rep.finals[0]}, not {dst}")
    rep.commit()
    return Path(dst)


def discard_destination(tmp: Path) -> None:
    rep = _OPEN.pop(Path(tmp), None)
    if rep is not None:
        rep.abort()


def write_marker(directory: Path, cfg: ModelConfig, kind: str = "params", **extra) -> None:
    (directory / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "num_params": cfg.num_params(), **extra}
    (directory / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


class OrbaxErrorRecords(logging.Filter):
    """On the `absl` logger (Orbax logs through absl) while an Orbax write runs: Orbax logs one failed
    write from each of its threads (arrays, shardings, metadata, the commit), each record with a
    traceback of some 70 lines, so one full disk printed about 250 lines before our one-line error.
    The first ERROR record passes as one line (its message's first line, and the cause's first line
    when the message does not hold it); later ERROR records are dropped (counted in `dropped`), and
    any other record with a traceback keeps one line.  Told apart by level, not by file: absl's logger
    is a plain `logging.Logger` when the CLI configured it before absl was imported, and every record's
    pathname is then absl's own module.

    It is also the `sys.unraisablehook` of that time (`unraisable`), which drops RuntimeError('Event
    loop is closed'): after a write fails Orbax closes its event loop while tensorstore still completes
    the other writes of that save, and each completion's callback into the closed loop is such an
    error (a 6-line traceback each, 15 and more for one full disk), saying nothing beyond the failure
    that is reported anyway.  `last_callback` is when the latest one came (time.monotonic)."""

    def __init__(self, hook=None):
        super().__init__()
        self.first: str | None = None
        self.dropped = 0
        self.hook = hook or sys.unraisablehook
        self.last_callback = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.ERROR and exc is None:
            return True
        if record.levelno >= logging.ERROR and self.first is not None:
            self.dropped += 1
            return False
        msg = (record.getMessage().strip().splitlines() or [""])[0]
        cause = (str(exc).strip().splitlines() or [""])[0] if exc is not None else ""
        if cause and cause not in msg:
            msg = f"{msg} ({exc.__class__.__name__}: {cause})"
        record.msg, record.args = msg, ()
        record.exc_info = record.exc_text = record.stack_info = None
        if record.levelno >= logging.ERROR:
            self.first = msg
        return True

    def unraisable(self, u) -> None:
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            self.last_callback = time.monotonic()
            return
        self.hook(u)

    def quiesce(self, idle_s: float = 0.25, timeout_s: float = 10.0) -> None:
        """Wait until no closed-loop callback has come for idle_s (at most timeout_s): the writes that
        tensorstore still had in flight when Orbax gave up have ended by then."""
        start = time.monotonic()
        while time.monotonic() - max(self.last_callback, start) < idle_s and time.monotonic() - start < timeout_s:
            time.sleep(0.05)


def raised_in_orbax(e: BaseException | None) -> bool:
    """Whether `e` was raised in (or passed through) Orbax's code."""
    tb = e.__traceback__ if e is not None else None
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _UnretrievedOrbaxErrors(logging.Filter):
    """On the `asyncio` logger, for good: drops 'Task exception was never retrieved' (and the like) of
    Orbax's writer tasks.  When one write of a save fails, Orbax's `gather` gives up on the others; each
    of those that failed too (a full disk fails them all) is logged with its traceback when its task
    is garbage-collected, often at exit, after our one-line error.  The save's failure is reported
    already (the first error, by Orbax and by the command)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("never retrieved" in str(record.msg) and raised_in_orbax(exc))


@contextlib.contextmanager
def quiet_orbax_errors():
    """For the duration of an Orbax write: its error records, and the closed-loop callbacks that follow
    a failure, as `OrbaxErrorRecords` says.  Yields the filter."""
    aio = logging.getLogger("asyncio")
    if not any(isinstance(x, _UnretrievedOrbaxErrors) for x in aio.filters):
        aio.addFilter(_UnretrievedOrbaxErrors())
    f = OrbaxErrorRecords(sys.unraisablehook)
    absl = logging.getLogger("absl")
    absl.addFilter(f)
    sys.unraisablehook = f.unraisable
    try:
        yield f
    finally:
        absl.removeFilter(f)
        sys.unraisablehook = f.hook


def _left_running(t: threading.Thread) -> bool:
    """A thread that a failed Orbax write may have left at work: one of Orbax's own, or a worker of a
    thread pool that has been shut down (the default executor of an event loop that Orbax closed on the
    failure: a directory it was creating then, `array_metadatas`, appeared after the caller had deleted
    the temporary directory).  The idle workers of a live pool are not waited for: they never end."""
    if type(t).__module__.startswith("orbax"):
        return True
    target = getattr(t, "_target", None)
    if getattr(target, "__module__", None) != "concurrent.futures.thread":
        return False
    args = getattr(t, "_args", ())
    if not (args and isinstance(args[0], weakref.ref)):  # CPython's worker takes a weak reference to its
        return False  # pool first; another layout: not waited for (an idle worker of a live pool never ends)
    pool = args[0]()
    return pool is None or bool(getattr(pool, "_shutdown", True))


def settle_orbax_threads(before: set, timeout_s: float = 300.0) -> None:
    """After a failed Orbax write: wait (up to timeout_s in all) for the threads it started (those not in
    `before`) that may still write into its directory (`_left_running`), so that the caller deletes its
    temporary directory after them and not under them.  Orbax's own threads first: a pool is shut down
    when the thread whose event loop owns it ends.  Orbax's threads re-raise their error from join();
    that error has been reported."""
    deadline = time.monotonic() + timeout_s
    joined: set = set()
    while time.monotonic() < deadline:
        running = [t for t in threading.enumerate() if t not in before and t not in joined
                   and t is not threading.current_thread() and _left_running(t)]
        if not running:
            return
        running.sort(key=lambda t: not type(t).__module__.startswith("orbax"))
        for t in running:
            try:
                t.join(max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
            joined.add(t)


def orbax_save(ckptr, path: Path, tree: Any, **kw) -> None:
    """`ckptr.save(path, tree)` and wait for its background write, with SIGINT/SIGTERM held until that
    write has ended (then delivered): no write may outlive the temporary directory that the caller's
    Replacement deletes on the interrupt.  Holding is the only safe wait: an interrupt inside
    `save()` leaves its event loop's writer threads running unseen, and one inside the wait's
    `Thread.join` marks Orbax's still-running thread as finished (CPython's bpo-45274 handling), so
    no later wait would wait for it.  An error is reported once the write has ended too: Orbax fails
    the save as soon as one of its threads fails, so on a failure `ckptr` is closed and the threads
    that save started are waited for (`settle_orbax_threads`).  Orbax's error records are one line
    (`quiet_orbax_errors`): the caller reports the error itself."""
    before = set(threading.enumerate())
    with atomic.HeldSignals(note="stopping once the checkpoint write in progress has ended"), \
            quiet_orbax_errors() as quiet:
        try:
            ckptr.save(path, tree, **kw)
            ckptr.wait_until_finished()
        except BaseException:
            try:
                ckptr.wait_until_finished()
            except Exception:  # the save failed already; that error is the one reported
                pass
            try:
                ckptr.close()  # its metadata writer's thread too
            except Exception:
                pass
            settle_orbax_threads(before)
            quiet.quiesce()
            gc.collect()  # abandoned writer coroutines finalised now, not at exit (each printed a traceback)
            raise


def save_params(dst: str | os.PathLike, cfg: ModelConfig, params: Any, *, overwrite: bool = False, **extra) -> Path:
    """Write a params checkpoint atomically.  `params` must match `abstract_params(cfg)` in shapes."""
    check_tree(cfg, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params), str(dst))
    if jax.process_count() > 1:
        return _save_params_multiprocess(dst, cfg, params, overwrite, extra)
    with open_destination(dst, overwrite) as out:
        orbax_save(_ocp().StandardCheckpointer(), out.path.resolve() / "params", params,
                   save_args=save_args(params))
        flat = flatten(params)
        if all(getattr(x, "is_fully_addressable", True) for x in flat.values()):
            checksums.write(out.path, checksums.tree_digests({n: np.asarray(x) for n, x in flat.items()}))
        else:
            log.warning("%s: parameters span several processes; no checksums written", dst)
        write_marker(out.path, cfg, **extra)
        out.commit()
    return Path(dst)


def _save_params_multiprocess(dst, cfg: ModelConfig, params: Any, overwrite: bool, extra: dict) -> Path:
    """save_params when several processes hold shards of `params` (a filesystem all processes share):
    every process checks DST (so all refuse alike); process 0 opens the Replacement under an
    operation name it broadcasts, so every process finds the same temporary directory; all write
    their shards through Orbax; process 0 writes the marker and commits; nobody returns before the
    checkpoint is complete.  No checksums: no process holds every tensor."""
    from .distributed import barrier, broadcast_bytes

    dst = Path(dst)
    check_destination(dst, overwrite)
    lead = jax.process_index() == 0
    op = broadcast_bytes(secrets.token_bytes(6), 6).hex()  # process 0's, in every process
    rep = atomic.Replacement([dst], overwrite=overwrite, directory=True, error=CheckpointError, op=op) \
        if lead else None
    barrier(f"neox_jax.save_params.prepare:{dst.name}")
    tmp = atomic.tmp_path(dst, op)
    try:
        orbax_save(_ocp().StandardCheckpointer(), tmp.resolve() / "params", params, save_args=save_args(params))
        barrier(f"neox_jax.save_params.written:{dst.name}")
        if lead:
            log.warning("%s: parameters span several processes; no checksums written", dst)
            write_marker(tmp, cfg, **extra)
            rep.commit()
    finally:
        if rep is not None and rep.state == "writing":
            rep.abort()
    barrier(f"neox_jax.save_params.committed:{dst.name}")
    return dst


def save_args(params: Any) -> Any:
    """Orbax SaveArgs per tensor: CHUNK_BYTES chunks, split along the stacked layer axis first."""
    ocp = _ocp()
    return unflatten({
        name: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if name.startswith("layers/") else ())
        for name in flatten(params)
    })


def saved_tree(path: str | os.PathLike) -> dict[str, Any]:
    """Shapes and dtypes of the saved parameters as a nested dict of ShapeDtypeStruct."""
    p = check_params_dir(path)
    with reading(p, "unreadable Orbax metadata"):  # orbax raises many types for a broken directory
        md = _ocp().StandardCheckpointer().metadata(p.resolve())
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or not tree:
        raise CheckpointError(f"{p}: Orbax finds no parameter metadata (damaged _METADATA?)")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), dict(tree),
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def check_tree(cfg: ModelConfig, tree: Any, where: str) -> None:
    """Raise CheckpointError naming the first tensor whose name or shape disagrees with cfg."""
    want = flatten(abstract_params(cfg))
    have = flatten(tree)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        raise CheckpointError(f"{where}: config expects tensor {missing[0]} {tuple(want[missing[0]].shape)}, not present")
    if extra:
        raise CheckpointError(f"{where}: tensor {extra[0]} is not part of the configured model")
    for name in want:
        if tuple(want[name].shape) != tuple(have[name].shape):
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(have[name].shape)}, config implies {tuple(want[name].shape)}"
            )


def load_params(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    shardings: Any | None = None,
    verify: bool = False,
) -> tuple[ModelConfig, dict]:
    """Restore (config, params).  dtype casts on restore; shardings (tree of NamedSharding) places
    each tensor directly on a mesh, which may differ from the one that saved it.  verify: check
    every tensor against checksums.json (restored in the stored dtype, checked, then cast); needs
    each tensor whole in this process."""
    p = resolve(path)
    cfg = read_config(p)
    saved = saved_tree(p)
    check_tree(cfg, saved, str(p))
    digests = checksums.read(p) if verify else None
    if verify and digests is None:
        why = ("a training checkpoint (Orbax's own step files; checksums are written by init and convert --to orbax)"
               if read_marker(p).get("kind") == "train" else "written before checksums existed")
        raise CheckpointError(f"{p}: no {checksums.FILE} ({why}); cannot verify")
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)

    def target(sds, sharding=None):
        dt = DTYPES[dtype] if dtype and not verify else sds.dtype
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(sds.shape, dt, sharding=sharding)

    abstract = jax.tree.map(target, saved) if shardings is None else jax.tree.map(target, saved, shardings)
    with reading(p / "params", "restore failed (damaged or missing array data)"):
        try:
            params = _ocp().StandardCheckpointer().restore((p / "params").resolve(), abstract)
        except Exception as e:  # noqa: BLE001 - name the damaged tensor and file when tensorstore does
            hit = damaged_array(e)
            if hit is None:
                raise
            raise CheckpointError(f"{hit[0]}: tensor {hit[1]} unreadable ({hit[2]})") from None
    if verify:
        flat = flatten(params)
        spread = [n for n, x in flat.items() if not x.is_fully_addressable]
        if spread:
            raise CheckpointError(f"{p}: tensor {spread[0]} spans several processes; verify it with "
                                  f"`neox-jax inspect {p}` (which checks every checksum)")
        checksums.check_tree(digests, flat, str(p))
        if dtype is not None:
            params = cast_params(params, dtype)
    return cfg, params


_TS_ERROR = re.compile(r"([A-Z_]{5,}): Error reading \"([^\"]+)\" in OCDBT database at local file "
                       r"\"([^\"]+)\": ([^|\n]*)")


def error_chain(e: BaseException, limit: int = 10) -> list[str]:
    """The messages of `e` and of the exceptions it came from (cause or context), outermost first."""
    chain: list[str] = []
    x: BaseException | None = e
    while x is not None and len(chain) < limit:
        chain.append(str(x))
        x = x.__cause__ or x.__context__
    return chain


def damaged_array(e: BaseException) -> tuple[Path, str, str] | None:
    """(file, tensor, what went wrong) when an Orbax restore failed because tensorstore could not read
    an array: it names the tensor and its OCDBT database somewhere in the exception chain; when it
    reports a short read ("value of size N"), the data file of that size in the database is the
    truncated one, and it is named instead.  None for any other failure."""
    for text in error_chain(e):
        m = _TS_ERROR.search(text)
        if m:
            code, tensor, db, detail = m.groups()
            where = Path(db)
            size = re.search(r"value of size (\d+)", detail)
            if size:
                hits = [f for f in where.rglob("*") if f.is_file() and f.stat().st_size == int(size.group(1))]
                if len(hits) == 1:
                    where = hits[0]
            return where, tensor.split("/")[0], f"{code}: {detail.strip()[:200]}"
    return None


def cast_params(params: Any, dtype: str) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, DTYPES[dtype]), params)


__all__ = [
    "CheckpointError", "ConfigError", "resolve", "read_config", "save_params", "load_params",
    "saved_tree", "check_tree", "check_destination", "open_destination", "prepare_destination",
    "commit_destination", "discard_destination", "write_marker",
    "is_checkpoint", "cast_params",
]
