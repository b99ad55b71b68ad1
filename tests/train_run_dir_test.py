"""The run directory's lock (`train.run_dir.RunLock`): one `train` per run directory, read back by
flock(2) itself and by the file the holder writes."""

import fcntl
import json
import os
import socket
from pathlib import Path

import pytest

from neox_jax.errors import UserError
from neox_jax.train.run_dir import RunLock


def test_a_second_lock_of_the_same_run_directory_is_refused(tmp_path):
    run = tmp_path / "runs" / "r"
    first = RunLock(run)
    first.acquire()
    lock = tmp_path / "runs" / ".r.neox-jax-train.lock"
    assert json.loads(lock.read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    with open(lock) as f:  # flock(2) itself says it is held (a lock of another open file is refused)
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(UserError, match=f"^{run}: another neox-jax train \\(pid {os.getpid()} on "):
        RunLock(run).acquire()
    (run).mkdir()  # the run made its directory
    first.release()
    assert sorted(os.listdir(tmp_path / "runs")) == ["r"]  # the lock file is removed
    with RunLock(run):  # and can be taken again
        assert lock.exists()
    assert not lock.exists()


def test_parents_made_for_the_lock_are_removed_when_the_run_made_nothing(tmp_path):
    """A run refused before it made its directory (bad data, say) leaves no directory behind."""
    run = tmp_path / "a" / "b" / "r"
    with RunLock(run):
        assert (tmp_path / "a" / "b" / ".r.neox-jax-train.lock").exists()
    assert os.listdir(tmp_path) == []


def test_a_lock_that_cannot_be_made_runs_unlocked_with_a_warning(tmp_path, caplog, monkeypatch):
    """A run directory made for the user inside a directory they may not write in (EACCES; simulated:
    the tests run as root), or a filesystem without flock (ENOLCK): the run goes on unlocked, saying so."""
    import errno

    real_open = os.open
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    lock = str(tmp_path / "runs" / ".r.neox-jax-train.lock")

    def no_write(path, *a, **kw):
        if str(path) == lock:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "open", no_write)
        with RunLock(run) as held:
            assert held.fd is None
    assert "cannot lock the run directory (Permission denied)" in caplog.text

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    caplog.clear()
    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_flock)
        with RunLock(run) as held:
            assert held.fd is None
    assert "cannot lock the run directory (No locks available)" in caplog.text
    assert os.listdir(tmp_path / "runs") == ["r"]  # nothing left beside the run directory


def test_the_lock_of_the_current_directory_lies_beside_it(tmp_path, monkeypatch):
    """`--run-dir .` (or `a/..`): the lock is named after the directory itself, beside it, not inside it."""
    (tmp_path / "runs" / "r").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runs" / "r")
    for given in (Path("."), Path("sub/..")):
        lock = RunLock(given)
        assert lock.path == tmp_path / "runs" / ".r.neox-jax-train.lock"
