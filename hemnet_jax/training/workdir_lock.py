"""One training run per workdir: an advisory lock held for the run's life.

The lock is `<workdir>/train.lock`, holding a JSON record {"host", "pid", "started"} of its holder.
On a local or NFS disk it is an exclusive `flock` on that file: the kernel drops it when the holder
exits in any way (SIGKILL included), so a stale record never blocks the next run. On a bucket
(gs://...) the record itself is the lock, written create-only (`ifGenerationMatch=0`): Cloud
Storage applies the condition atomically, so of runs starting together exactly one gets it. A
record left by a killed run is recognised as stale only on the host that wrote it (its pid is
gone) and is then replaced under the condition that it is still that record; from another host,
delete the object by hand. The lock is released by deleting the object.
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

from hemnet_jax import storage
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
    path = f"{workdir.rstrip('/')}/{LOCK_NAME}"
    mine = json.dumps(_record()).encode()
    generation = storage.write_if_generation(path, mine, 0)  # created only if absent: atomic
    if generation is None:
        found = storage.read_with_generation(path)
        record = _parse(found[0]) if found else {}
        ours = record.get("host") == socket.gethostname()
        stale = ours and isinstance(record.get("pid"), int) and not _pid_alive(record["pid"])
        if found and stale:  # replaced only if still that record's generation: atomic too
            logging.warning("Taking over the stale lock of %s in %s.", _describe(record), workdir)
            generation = storage.write_if_generation(path, mine, found[1])
        if generation is None:
            raise _locked_error(
                workdir, record, f" (if that run is gone, delete {path}: on a bucket the lock "
                "is a record, not a kernel lock)"
            )
    try:
        yield
    finally:
        storage.delete_if_generation(path, generation)


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _read(path: str) -> dict:
    try:
        return _parse(epath.Path(path).read_bytes())
    except OSError:
        return {}
