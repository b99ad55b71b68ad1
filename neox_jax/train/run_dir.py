"""The run directory of `neox-jax train`: whether a run resumes, refusing a directory that is not
ours to write, `--overwrite` (the old directory waits aside until the new run has a checkpoint), and
the lock that keeps a second `train` out of a directory a run is using.

    RUN_DIR/config.yaml          the resolved run config (process 0, before the first step)
    RUN_DIR/metrics.jsonl        one line per logged step (`metrics.py`)
    RUN_DIR/checkpoints/STEP/    Orbax training checkpoints (`checkpoints.py`)
    .RUN_DIR.neox-jax-train.lock beside it, while a run uses it (`RunLock`)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

import yaml

from .. import atomic
from ..config import load_yaml
from ..errors import UserError
from . import checkpoints as tc

log = logging.getLogger(__name__)


class RunLock:
    """An exclusive `flock` on `.NAME.neox-jax-train.lock` beside the run directory NAME, held by the
    run's process 0 from before it looks at the directory until the run has ended: a second `train`
    of the same directory (submitted twice, requeued while the first still runs) is refused in one
    line naming the holder, instead of both writing the same checkpoints, or the second starting
    over a directory the first has not stepped in yet.  The file holds the holder's host and pid and
    is removed when the run ends.  Where it cannot be made or locked (a filesystem without flock,
    a parent directory we may not write in) the run goes on unlocked, with a warning."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        full = Path(os.path.abspath(run_dir))  # `.` or `a/..` has no name of its own
        self.path = full.parent / f".{full.name}.neox-jax-train.lock"
        self.fd: int | None = None
        self.created: list[Path] = []  # the run directory's missing parents, made for the lock

    def acquire(self) -> None:
        missing = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
        try:
            for d in reversed(missing):
                d.mkdir()
                self.created.append(d)
        except OSError as e:
            self._remove_created()
            raise UserError(f"{d}: cannot create the run directory's parent ({e.strerror or e})") from None
        for _ in range(10):  # the lock file was removed between our open and our flock: open the new one
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a parent we may not write in: the run directory itself may be ours
                return self._unlocked(e)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"{self.run_dir}: another neox-jax train ({holder}) is using this run "
                                f"directory (lock {self.path})") from None
            except OSError as e:  # a filesystem without flock (some NFS mounts)
                os.close(fd)
                self.path.unlink(missing_ok=True)
                return self._unlocked(e)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
                self.fd = fd
                return
            os.close(fd)
        raise UserError(f"{self.path}: the run lock kept changing under us; is another train starting?")

    def _unlocked(self, e: OSError) -> None:
        log.warning("%s: cannot lock the run directory (%s): a second train of it would not be refused",
                    self.path, e.strerror or e)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still held: a waiting opener then sees a new file
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        if not self.run_dir.exists():  # a run refused before it made its directory leaves no parents behind
            self._remove_created()

    def _remove_created(self) -> None:
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                break
        self.created = []

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(info['pid'])} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def will_resume(run_dir: Path, overwrite: bool, resume: str) -> bool:
    """Whether the run continues from `run_dir`'s checkpoints.  resume: "auto" (when there are
    checkpoints), "require" (--resume) or "never" (--no-resume)."""
    found = tc.has_checkpoints(run_dir)
    if resume == "require" and (overwrite or not found):
        raise UserError(f"{run_dir}: --resume needs a complete checkpoint under {run_dir / 'checkpoints'}"
                        + (" (and no --overwrite)" if overwrite else ""))
    if found and not overwrite and resume == "never":
        raise UserError(f"{run_dir}: has checkpoints and --no-resume refuses to continue it "
                        "(pass --overwrite to start over, or another --run-dir)")
    return found and not overwrite


def prepare_run_dir(run_dir: Path, overwrite: bool, *, create: bool = True) -> "Overwrite":
    """Refuse an unusable run directory; with `create`, create it, after moving an existing one
    aside (--overwrite: `Overwrite`).  Every process checks (so all refuse alike on a shared
    filesystem); only process 0 creates."""
    aside = None
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / "config.yaml").exists():  # before the hint below, which --overwrite would not honour
            raise UserError(f"{run_dir}: exists and is not a neox-jax run directory (no config.yaml); "
                            "give another --run-dir" + ("" if overwrite else " (--overwrite would not delete it)"))
        if not overwrite and not never_stepped(run_dir):
            raise UserError(f"{run_dir}: run directory exists and is not empty and has no complete "
                            "checkpoint to resume from (pass --overwrite to start over)")
        if not overwrite and create:
            log.info("%s: a run that stopped before its first step (a config.yaml, no step in metrics.jsonl, "
                     "no checkpoint); starting it over", run_dir)
        if run_dir.is_symlink():
            raise UserError(f"{run_dir}: is a symbolic link; --overwrite needs the run directory's real path")
        if create:
            aside = atomic.SetAside(run_dir)
    if create:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if aside is not None:
                aside.restore()
            raise UserError(f"{run_dir}: cannot create the run directory ({e.strerror or e})") from None
    return Overwrite(run_dir, aside)


def never_stepped(run_dir: Path) -> bool:
    """Whether `run_dir` holds only what a run writes before its first step: the run's config.yaml,
    an empty metrics.jsonl and an empty checkpoints/ (a run that failed or was killed while
    compiling, say).  Such a directory is started over without --overwrite: nothing in it is lost."""
    allowed = {"config.yaml", "metrics.jsonl", "checkpoints"}
    entries = {p.name: p for p in run_dir.iterdir()}
    if not set(entries) <= allowed or "config.yaml" not in entries or run_dir.is_symlink():
        return False
    try:
        raw = load_yaml(entries["config.yaml"].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not (isinstance(raw, dict) and {"model", "train"} <= set(raw)):
        return False  # not a neox-jax run's config
    m, c = entries.get("metrics.jsonl"), entries.get("checkpoints")
    return ((m is None or (m.is_file() and not m.is_symlink() and m.stat().st_size == 0))
            and (c is None or (c.is_dir() and not c.is_symlink() and not any(c.iterdir()))))


class Overwrite:
    """--overwrite of an existing run directory: the old one waits aside (`atomic.SetAside`) until
    the new run has a complete checkpoint, or has finished; it is deleted then.  A run that fails or
    is interrupted before that gets the old directory back (`undo`), and one that is killed leaves
    it to the next `train` (or any neox-jax write beside it), which puts it back."""

    def __init__(self, run_dir: Path, aside: atomic.SetAside | None):
        self.run_dir, self.aside = run_dir, aside
        self.ckpts: tc.TrainCheckpoints | None = None  # to wait for a save in flight before undoing

    @property
    def pending(self) -> bool:
        return self.aside is not None

    def confirm(self, why: str = "has a complete checkpoint") -> None:
        """The new run stands: delete the old directory."""
        if self.aside is not None:
            self.aside.commit()
            self.aside = None
            log.info("%s: the new run %s; deleted the previous run", self.run_dir, why)

    def poll(self) -> None:
        if self.aside is not None and tc.has_checkpoints(self.run_dir):
            self.confirm()

    def undo(self) -> None:
        """The new run failed: keep it if a checkpoint of it committed after all, else put the old back."""
        if self.aside is None:
            return
        if self.ckpts is not None:
            try:
                self.ckpts.close()  # nothing may still be writing into the directory that is moved
            except Exception:  # noqa: BLE001 - the run's own error is the one reported
                pass
        if tc.has_checkpoints(self.run_dir):
            return self.confirm()
        self.aside.restore()
        self.aside = None
        log.warning("%s: the new run stopped before its first checkpoint; the previous run directory is back "
                    "as it was", self.run_dir)




@contextlib.contextmanager
def undo_on_error(ow: Overwrite):
    try:
        yield
    except BaseException:
        ow.undo()
        raise
