"""Replacing outputs so that a crash, a kill or a full disk never leaves a missing or mixed output.

Every writer (checkpoint save, `init`, `convert`, `data preprocess`, `data train-tokenizer`, the
`--output` of `score`, `generate`, `eval`, `data order`) goes through one `Replacement`:

    with Replacement([dst], overwrite=..., directory=True) as rep:
        write into rep.tmp(dst)        # a hidden sibling: .NAME.neox-jax-<op>.tmp
        rep.commit()                   # fsync, then publish every output

Names are unique per operation (`<op>`: 12 random hex digits), never per pid, so two hosts writing
beside each other cannot collide.  Beside the temporaries sits the operation's journal,
`.NAME.neox-jax-<op>.journal` (JSON): the creating host, boot id, pid and the pid's start time, the
state ("writing", then "committing"), and each output's final, temporary and aside names.

Commit, in order:
1. fsync every file and directory of the new outputs (the old outputs are untouched so far);
2. rewrite the journal atomically with state "committing" and the (device, inode) of each new
   output, fsynced: from here on the new outputs are complete and the operation can always be
   finished by whoever finds the journal;
3. publish each output.  A file: `rename(2)` over the old one (atomic).  A directory that exists:
   `renameat2(RENAME_EXCHANGE)` swaps old and new in one step, so at every instant DST holds the
   complete old or the complete new directory; the old one is then deleted.  Where the kernel or
   file system lacks RENAME_EXCHANGE, the old directory is renamed aside (`.NAME.neox-jax-<op>.old`),
   the new one renamed in, the aside one deleted: DST is then missing for the time between two
   renames, and a reader that looks in that window is told that a replacement is pending;
4. fsync the parent directory, delete the journal.

SIGINT and SIGTERM that arrive during step 3 are held until it ends (the output is then the new
one; the command still exits as interrupted).  Publishing is idempotent: the inode identity tells
whether an output is already in place, so a journal in state "committing" is finished by the next
`Replacement` in that directory.  Several outputs (a dataset's `.bin` and `.idx`) are never seen
as a mixed pair by our readers: `pending()` reports an unfinished journal and `IndexedDataset`
refuses the pair until it is finished.

A directory that is rebuilt in place (`train --overwrite`: the run directory is written for hours
under its own name) uses `SetAside` instead: the old directory is renamed to
`.NAME.neox-jax-<op>.old` under a journal in state "aside", the new one is written at NAME, and
`commit()` (fsync the new one, journal "committing", then the same publishing as above, which
deletes the aside copy) or `restore()` (the new one is swapped out and deleted, the old one renamed
back, by the (device, inode) recorded in the journal: idempotent too) ends it.

Leftovers: when a `Replacement` starts, it looks at the journals in its directory.  One whose
creating process is gone (same host and boot, pid not running or running a different process) is
provably ours and abandoned: in state "writing" its temporaries are deleted, in state
"committing" it is finished, in state "aside" the old directory is put back; each is logged.
Journals of live processes or of other hosts are reported and left alone, as are temporaries
without a journal.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import UserError

log = logging.getLogger(__name__)

TAG = "neox-jax"
_NAME = re.compile(r"^\.(?P<name>.+)\.neox-jax-(?P<op>[0-9a-f]{12})\.(?P<kind>tmp|old|journal|journal\.new)$")


# ----------------------------------------------------------------------------- small OS helpers


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path, *, missing_ok: bool = False) -> None:
    """fsync every file and directory under root (root itself included); with missing_ok, skip
    what disappears meanwhile (a directory still being written by someone else)."""
    root = Path(root)
    if not root.is_dir():
        fsync_path(root)
        return
    for dirpath, _, files in os.walk(root):
        for p in [os.path.join(dirpath, name) for name in files] + [dirpath]:
            try:
                if not os.path.islink(p):
                    fsync_path(Path(p))
            except FileNotFoundError:
                if not missing_ok:
                    raise


def remove(path: Path) -> None:
    """Delete a file, link or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _identity(path: Path) -> list[int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE).  False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _start_time(pid) in (None, start)


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "pid_start": _start_time(os.getpid())}


def _abandoned(j: dict) -> bool:
    """True when the journal's creator is provably gone (this host and boot, process not running)."""
    if j.get("host") != socket.gethostname() or j.get("boot_id") != _boot_id():
        return False
    return not _alive(int(j.get("pid", -1)), j.get("pid_start"))


def _write_json_atomic(path: Path, obj: dict) -> None:
    new = path.with_name(path.name + ".new")
    with open(new, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(new, path)
    fsync_path(path.parent)


def _write_journal(path: Path, op: str, state: str, targets: list[dict]) -> None:
    """The journal of operation `op` (Replacement or SetAside) in `state`, with its owner."""
    _write_json_atomic(path, {"tool": TAG, "op": op, "state": state,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "targets": targets, **_owner()})


class HeldSignals:
    """Hold SIGINT/SIGTERM (main thread only) for the block; deliver them afterwards.  `note`: logged
    (INFO) when the first one arrives, for a block that may take long, so that an interrupt that
    seems ignored says why."""

    def __init__(self, note: str = ""):
        self.note = note

    def __enter__(self):
        self.got: list[int] = []
        self.old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        if self.note and not self.got:
            log.info("%s: %s", signal.Signals(signum).name, self.note)
        self.got.append(signum)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        for s in self.got:
            h = self.old.get(s)
            if callable(h):
                h(s, None)
            elif s == signal.SIGINT:
                raise KeyboardInterrupt
            elif h == signal.SIG_DFL:
                signal.raise_signal(s)


def test_pause(point: str) -> None:
    """Fault tests (tests/atomic_test.py) widen a window to kill a run in: with
    NEOX_JAX_TEST_PAUSE="point:seconds" set, sleep that long each time `point` is reached."""
    spec = os.environ.get("NEOX_JAX_TEST_PAUSE")
    if spec and spec.rpartition(":")[0] == point:
        time.sleep(float(spec.rpartition(":")[2]))


# ----------------------------------------------------------------------------- journals


def _journals(parent: Path) -> Iterable[tuple[Path, str]]:
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    out = []
    for n in sorted(names):
        m = _NAME.match(n)
        if m and m.group("kind") == "journal":
            out.append((parent / n, m.group("op")))
    return out


def _read_journal(path: Path) -> dict | None:
    try:
        j = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return j if isinstance(j, dict) and j.get("tool") == TAG and isinstance(j.get("targets"), list) else None


def pending(final: str | os.PathLike) -> str | None:
    """A one-line description of an unfinished replacement of `final`, or None."""
    final = Path(final)
    for path, _ in _journals(final.parent):
        j = _read_journal(path)
        if not j or not any(t.get("final") == final.name for t in j["targets"]):
            continue
        if j.get("state") == "committing":
            return (f"{final}: an interrupted replacement is pending (journal {path}; pid {j.get('pid')} on "
                    f"{j.get('host')}); the next neox-jax write into {final.parent} finishes it")
        if j.get("state") == "aside":
            old = final.parent / next(t["old"] for t in j["targets"] if t.get("final") == final.name)
            return (f"{final}: is being rebuilt; its previous content was moved aside to {old} (journal "
                    f"{path}; pid {j.get('pid')} on {j.get('host')}); if that run was interrupted, the next "
                    f"neox-jax write into {final.parent} (e.g. `neox-jax train --run-dir {final}`) "
                    "puts it back")
    return None


def _publish(parent: Path, t: dict) -> None:
    """Move one new output into place (idempotent; see the module docstring)."""
    final, tmp, old = parent / t["final"], parent / t["tmp"], parent / t["old"]
    new_id = t["id"]
    if _identity(final) != new_id:
        if _identity(tmp) != new_id:
            raise UserError(f"{final}: cannot finish the replacement: its new copy {tmp} is missing")
        if os.path.lexists(final) and (t["dir"] or (final.is_dir() and not final.is_symlink())):
            if not exchange(tmp, final):
                if not os.path.lexists(old):
                    os.rename(final, old)
                os.rename(tmp, final)
        else:
            os.replace(tmp, final)
    # after an exchange the old output sits at the temporary name
    if os.path.lexists(tmp) and _identity(tmp) != new_id:
        remove(tmp)
    remove(old)


def _finish(path: Path, j: dict) -> None:
    parent = path.parent
    for t in j["targets"]:
        _publish(parent, t)
        test_pause("publish")
    fsync_path(parent)
    path.unlink(missing_ok=True)
    fsync_path(parent)


def _discard(path: Path, j: dict) -> None:
    parent = path.parent
    for t in j["targets"]:
        remove(parent / t["tmp"])
        remove(parent / t["old"])
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".new").unlink(missing_ok=True)


def _restore(path: Path, j: dict) -> None:
    """Undo a `SetAside`: the directory recorded as the old one (by its identity) back at its name,
    whatever stands there in its stead deleted.  Idempotent, so a restore cut short can be redone."""
    parent = path.parent
    for t in j["targets"]:
        final, tmp, old, old_id = parent / t["final"], parent / t["tmp"], parent / t["old"], t["old_id"]
        if _identity(final) != old_id:
            if _identity(old) != old_id:
                raise UserError(f"{final}: cannot put back the directory moved aside to {old}: it is missing "
                                f"(journal {path})")
            if not os.path.lexists(final):
                os.rename(old, final)
            elif not exchange(old, final):  # the new directory ends up at `old` (exchange) or `tmp`
                if not os.path.lexists(tmp):
                    os.rename(final, tmp)
                os.rename(old, final)
        fsync_path(parent)
        for p in (old, tmp):
            if os.path.lexists(p) and _identity(p) != old_id:
                remove(p)
    fsync_path(parent)
    path.unlink(missing_ok=True)
    fsync_path(parent)


def recover(parent: str | os.PathLike, *, skip_op: str | None = None) -> list[str]:
    """Deal with what interrupted operations left in `parent` (see the module docstring); returns
    one line per leftover found (also logged)."""
    parent = Path(parent)
    notes: list[str] = []
    known_ops = set()
    for path, op in _journals(parent):
        known_ops.add(op)
        if op == skip_op:
            continue
        j = _read_journal(path)
        if j is None:
            notes.append(f"{path}: unreadable neox-jax journal; left alone")
            continue
        who = f"pid {j.get('pid')} on {j.get('host')}"
        finals = ", ".join(str(parent / t["final"]) for t in j["targets"])
        if not _abandoned(j):
            notes.append(f"{path}: temporaries of another neox-jax run ({who}, writing {finals}); left alone")
        elif j.get("state") == "committing":
            _finish(path, j)
            notes.append(f"{finals}: finished a replacement that an interrupted run ({who}) had started")
        elif j.get("state") == "aside":
            _restore(path, j)
            notes.append(f"{finals}: put back the previous content, which an interrupted run ({who}) had "
                         "moved aside to rebuild it (the interrupted run's partial output is deleted)")
        else:
            _discard(path, j)
            notes.append(f"{finals}: removed the temporaries of an interrupted run ({who})")
    try:
        names = os.listdir(parent)
    except OSError:
        names = []
    for n in sorted(names):
        m = _NAME.match(n)
        if m and m.group("kind") == "journal.new" and m.group("op") not in known_ops and m.group("op") != skip_op:
            # a first journal cut short before its rename (nothing else of that operation exists yet)
            j = _read_journal(parent / n)
            if j is not None and _abandoned(j):
                (parent / n).unlink(missing_ok=True)
                notes.append(f"{parent / n}: removed the unfinished journal of an interrupted run "
                             f"(pid {j.get('pid')} on {j.get('host')})")
            elif j is None:
                notes.append(f"{parent / n}: an unreadable neox-jax journal being written; left alone, delete it "
                             "if no neox-jax command is writing here")
        if m and m.group("kind") in ("tmp", "old") and m.group("op") not in known_ops:
            notes.append(f"{parent / n}: a neox-jax temporary without a journal (not provably abandoned); "
                         f"left alone, delete it if no neox-jax command is writing here")
    for note in notes:
        log.warning("%s", note)
    return notes


# ----------------------------------------------------------------------------- the helper


def check_destination(final: str | os.PathLike, overwrite: bool, *, directory: bool,
                      error: type[UserError] = UserError) -> Path:
    """Refuse a destination we must not replace (raising `error`); return it as a Path.  A directory
    destination may exist empty; anything else that exists needs `overwrite`."""
    final = Path(final)
    if final.is_symlink():
        raise error(f"{final}: is a symbolic link; give the real path (a link is never replaced)")
    if final.exists() and final.is_dir() != directory:  # never a directory replaced by a file, or the reverse
        raise error(f"{final}: is a directory; give a file name" if not directory else
                    f"{final}: exists and is not a directory")
    if final.exists() and not overwrite:
        if directory and final.is_dir():
            if any(final.iterdir()):
                raise error(f"{final}: exists and is not empty (pass --overwrite to replace it)")
        else:
            raise error(f"{final}: exists (pass --overwrite to replace it)")
    check_writable(final, error)
    if not final.parent.is_dir():
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise error(f"{final.parent}: cannot create the output directory ({e.strerror})") from None
    return final


def shown(path: str | os.PathLike) -> str:
    """`path` as a message shows it: bytes that are not UTF-8 (a command-line argument's PEP 383
    escapes) as `\\xff`, not as the lone surrogates Python holds them as."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_name(final: str | os.PathLike, error: type[UserError] = UserError, what: str = "an output name") -> None:
    """Refuse an output name that is not UTF-8 (bytes of a command-line argument that no UTF-8 text can
    hold), as given or as its absolute path (the current directory's name): tensorstore takes no such
    path (`init`, `convert --to orbax` and `train` failed with a traceback after the work, leaving
    temporaries), and JSON, YAML and the logs cannot name the output either."""
    from .jsonl import check_utf8  # (jsonl imports nothing of ours but errors)

    names = [os.fspath(final)]
    try:
        names.append(os.path.abspath(final))
    except OSError:  # the current directory is gone: the name as given is all there is to check
        pass
    for p in names:
        try:
            check_utf8(str(p), shown(p), "the name", from_bytes=True)
        except UserError as e:
            raise error(f"{e}; {what} must be UTF-8 (tensorstore, which Orbax writes and reads with, and the JSON files "
                        "that name it take no other)") from None


def check_writable(final: str | os.PathLike, error: type[UserError] = UserError) -> None:
    """Refuse, before any work, an output whose directory (or, when that does not exist yet, its nearest
    existing ancestor) this process cannot write: a read-only file system, or missing permissions.
    Otherwise the first write, of a temporary at the very end, would be what fails.  A name that is
    not UTF-8 is refused here too (`check_name`)."""
    check_name(final, error)
    final = Path(final)
    d = final.parent
    while not d.exists() and d != d.parent:
        d = d.parent
    if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
        raise error(f"{d}: not writable (cannot write {final})")


def check_output(final: str | os.PathLike, overwrite: bool,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """The early checks of a command's output file (score, generate, eval, data order): it exists only
    with --overwrite, is none of the command's `inputs` (`check_not_input`), and its directory is
    writable.  Nothing is created; `Replacement` writes it at the end."""
    out = Path(final)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists (pass --overwrite to replace it)")
    check_not_input(out, inputs)
    check_writable(out)
    return out


def check_not_input(final: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]], *,
                    error: type[UserError] = UserError) -> None:
    """Refuse an output that is one of the command's inputs (`(label, path)` pairs, e.g. ("--input", p)),
    holds one or lies inside one: replacing it would destroy what the command reads."""
    out = Path(final).resolve()
    for label, path in inputs:
        if path is None:
            continue
        src = Path(path).resolve()
        if out == src or out in src.parents or src in out.parents:
            raise error(f"{final}: is the input {label} {path} (or holds it, or lies inside it); "
                        "write the output elsewhere")


def tmp_path(final: str | os.PathLike, op: str) -> Path:
    """Where operation `op` writes the new content of `final`."""
    final = Path(final)
    return final.parent / f".{final.name}.{TAG}-{op}.tmp"


_TS_OS_ERROR = re.compile(r"\[os_error_code='?(\d+)'?\]")
_TS_FILE = re.compile(r'Failed (?:writing|to open|to create)[^"]*"([^"]+)"')


def io_error(exc: BaseException) -> tuple[str | None, str | None]:
    """(the cause, the file) of an I/O error while writing, else (None, None): an OSError, or
    tensorstore's error for one (a ValueError whose text ends `... No space left on device
    [os_error_code='28']`; the cause then is the errno's own text, the file the one it failed writing)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or exc.__class__.__name__, getattr(exc, "filename", None)
    text = str(exc)
    m = _TS_OS_ERROR.search(text)
    if m:
        f = _TS_FILE.findall(text)
        return os.strerror(int(m.group(1))), (f[-1] if f else None)
    if "No space left on device" in text:
        return os.strerror(errno.ENOSPC), None
    return None, None


class Replacement:
    """Replace one or more outputs in one directory (module docstring).  Use as a context manager:
    leaving the block without `commit()` (an error, SIGINT, SIGTERM) deletes the temporaries; an
    OSError while writing becomes a UserError naming the destination."""

    def __init__(self, finals: Sequence[str | os.PathLike], *, overwrite: bool = False,
                 directory: bool = False, error: type[UserError] = UserError, op: str | None = None):
        """op: the operation's name (default: 12 random hex digits); several processes writing one
        output together agree on it first, so that all of them find `tmp_path(final, op)`."""
        self.finals = [check_destination(f, overwrite, directory=directory, error=error) for f in finals]
        parents = {f.parent.resolve() for f in self.finals}
        if len(parents) != 1:
            raise ValueError(f"outputs of one Replacement must share a directory: {self.finals}")
        self.parent = self.finals[0].parent
        self.op = op or secrets.token_hex(6)
        self.directory = directory
        self.state = "writing"
        recover(self.parent, skip_op=self.op)
        self.journal = self.parent / f".{self.finals[0].name}.{TAG}-{self.op}.journal"
        self._tmp = {f: tmp_path(f, self.op) for f in self.finals}
        self._old = {f: self.parent / f".{f.name}.{TAG}-{self.op}.old" for f in self.finals}
        try:
            self._write_journal("writing")
            if directory:
                for t in self._tmp.values():
                    t.mkdir()
        except OSError as e:
            self.abort()
            raise error(f"{self.finals[0]}: cannot write here ({e.strerror})") from None
        except BaseException:  # SIGINT/SIGTERM here, before the caller's `with` (its abort) has begun
            self.abort()
            raise

    def tmp(self, final: str | os.PathLike | None = None) -> Path:
        """Where the new content of `final` (default: the only output) is written."""
        return self._tmp[Path(final) if final is not None else self.finals[0]]

    @property
    def path(self) -> Path:
        return self.tmp()

    def _write_journal(self, state: str, ids: dict | None = None) -> None:
        targets = [{"final": f.name, "tmp": self._tmp[f].name, "old": self._old[f].name,
                    "dir": self.directory, "id": (ids or {}).get(f)} for f in self.finals]
        _write_journal(self.journal, self.op, state, targets)

    def commit(self) -> list[Path]:
        """fsync the new outputs, then publish them all (module docstring)."""
        if self.state != "writing":
            raise RuntimeError(f"commit in state {self.state}")
        ids = {}
        for f, t in self._tmp.items():
            if not os.path.lexists(t):
                raise UserError(f"{f}: nothing was written to {t}")
            sync_tree(t)
            ids[f] = _identity(t)
        fsync_path(self.parent)
        self._write_journal("committing", ids)  # from here on the new outputs can always be published
        self.state = "committing"
        with HeldSignals():
            _finish(self.journal, _read_journal(self.journal))
            self.state = "done"
        return list(self.finals)

    def abort(self) -> None:
        """Delete the temporaries (not once committing: then the journal finishes the job)."""
        if self.state != "writing":
            return
        self.state = "aborted"
        for t in self._tmp.values():
            remove(t)
        self.journal.with_name(self.journal.name + ".new").unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)

    def __enter__(self) -> "Replacement":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.state == "writing":
            self.abort()
        if exc_type is None or isinstance(exc, UserError) or not isinstance(exc, Exception):
            return
        what, where = io_error(exc)
        if what is None:
            return
        where = where or self.tmp(self.finals[0])
        after = ("the old output is untouched" if self.state == "aborted" else
                 "the new output is complete and the next neox-jax write here finishes publishing it")
        raise UserError(f"{self.finals[0]}: {what} while writing {where}; {after}") from None


class SetAside:
    """Rebuild a directory in place (module docstring): the existing `final` is moved aside under a
    journal; the caller writes the new one at `final`, then calls `commit()` (the old one is deleted)
    or `restore()` (the new one is deleted, the old one put back).  Leaving a `with` block by an
    exception restores."""

    def __init__(self, final: str | os.PathLike, *, error: type[UserError] = UserError,
                 op: str | None = None):
        self.final = final = Path(final)
        if final.is_symlink():
            raise error(f"{final}: is a symbolic link; give the real path (a link is never replaced)")
        self.parent = final.parent
        self.op = op or secrets.token_hex(6)
        recover(self.parent, skip_op=self.op)
        for path, _ in _journals(self.parent):  # left there: a live run (or another host's) is at work
            j = _read_journal(path)
            if j and any(t.get("final") == final.name for t in j["targets"]):
                raise error(f"{final}: another neox-jax run (pid {j.get('pid')} on {j.get('host')}) is "
                            f"replacing it (journal {path}); wait for it, or delete the journal if that run "
                            "is gone")
        self.journal = self.parent / f".{final.name}.{TAG}-{self.op}.journal"
        self.old = self.parent / f".{final.name}.{TAG}-{self.op}.old"
        self._target = {"final": final.name, "tmp": tmp_path(final, self.op).name, "old": self.old.name,
                        "dir": True, "id": None, "old_id": _identity(final)}
        self.state = "aside"
        try:
            self._write_journal("aside")
            with HeldSignals():
                os.rename(final, self.old)
                fsync_path(self.parent)
        except BaseException as e:  # an OSError, or SIGINT/SIGTERM before the caller's `with` has begun
            self.journal.with_name(self.journal.name + ".new").unlink(missing_ok=True)
            if self.journal.exists():
                _restore(self.journal, _read_journal(self.journal))  # the rename may have happened
            if isinstance(e, OSError):
                raise error(f"{final}: cannot move it aside ({e.strerror})") from None
            raise
        log.info("%s: moved aside to %s until its replacement is complete", final, self.old)

    def _write_journal(self, state: str) -> None:
        _write_journal(self.journal, self.op, state, [self._target])

    def commit(self) -> None:
        """The new `final` is complete: fsync it, then delete the old one."""
        if self.state != "aside":
            raise RuntimeError(f"commit in state {self.state}")
        if not self.final.is_dir() or self.final.is_symlink():
            raise UserError(f"{self.final}: the new directory is missing; the previous one is at {self.old}")
        sync_tree(self.final, missing_ok=True)  # a later save may be writing (and renaming) beside it
        fsync_path(self.parent)
        self._target["id"] = _identity(self.final)
        self._write_journal("committing")
        self.state = "committing"
        with HeldSignals():
            _finish(self.journal, _read_journal(self.journal))
            self.state = "done"

    def restore(self) -> None:
        """Delete what was written at `final` and put the old directory back."""
        if self.state != "aside":
            return
        with HeldSignals():
            _restore(self.journal, _read_journal(self.journal))
            self.state = "restored"

    def __enter__(self) -> "SetAside":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.restore()


def write_file(final: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Replace one small file atomically."""
    with Replacement([final], overwrite=overwrite) as rep:
        with open(rep.tmp(), "wb") as f:
            f.write(data)
        rep.commit()
    return Path(final)
