"""One training run per workdir: an advisory lock held for the run's life.

The lock is `<workdir>/train.lock`, holding a JSON record {"host", "pid", "started"} of its holder.
On a local or NFS disk it is an exclusive `flock` on that file: the kernel drops it when the holder
exits in any way (SIGKILL included), so a stale record never blocks the next run. Object stores
(gs://...) have no locks: there the record itself is the lock, best-effort (two runs starting in
the same second can both pass), and a record left by a killed run is recognised as stale only on
the host that wrote it (its pid is gone); from another host, delete the file by hand.
In a multi-process run, process 0 takes the lock and every process learns the outcome.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from hemnet_jax.errors import UserError

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError, UserError):
    """Another live run holds the workdir; the message (one line) names it."""


def _record() -> dict:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now}


def _describe(record: dict) -> str:
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"running since {record.get('started', '?')}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _locked_error(workdir: str, record: dict, hint: str = "") -> WorkdirLockedError:
    return WorkdirLockedError(
        f"The workdir {workdir} is in use by another training run ({_describe(record)}): wait "
        f"for it to end, stop it, or pass another --workdir{hint}."
    )


@contextlib.contextmanager
def run_lock(workdir: str) -> Iterator[None]:
    """The lock of a (possibly multi-process) run: process 0 holds `workdir_lock`, and every
    process raises WorkdirLockedError if it is taken."""
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(workdir_lock(workdir))
            except WorkdirLockedError as e:
                error = e
        if jax.process_count() > 1:
            taken = multihost_utils.process_allgather(np.int32(error is not None))
            if np.any(taken) and error is None:
                error = WorkdirLockedError(
                    f"The workdir {workdir} is in use by another training run (process 0's "
                    "log names it): wait for it to end, stop it, or pass another --workdir."
                )
        if error is not None:
            raise error
        yield


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock for the `with` block; raises WorkdirLockedError at once if a live
    run holds it."""
    if "://" in workdir:
        with _record_lock(workdir):
            yield
    else:
        with _flock(workdir):
            yield


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[None]:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise _locked_error(workdir, _read(path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_record()).encode())
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the file stays (removing it would race a waiting opener)
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _record_lock(workdir: str) -> Iterator[None]:
    path = epath.Path(workdir) / LOCK_NAME
    if path.exists():
        record = _read(str(path))
        ours = record.get("host") == socket.gethostname()
        if not (ours and isinstance(record.get("pid"), int) and not _pid_alive(record["pid"])):
            raise _locked_error(
                workdir, record, f" (if that run is gone, delete {path}: on object stores the "
                "lock is a record, not a kernel lock)"
            )
        logging.warning("Taking over the stale lock of %s in %s.", _describe(record), workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = _record()
    path.write_text(json.dumps(mine))
    try:
        yield
    finally:
        if _read(str(path)) == mine:
            path.unlink(missing_ok=True)


def _read(path: str) -> dict:
    try:
        record = json.loads(epath.Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
