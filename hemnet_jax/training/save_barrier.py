"""Orbax's barriers between processes, for the saves of a multi-process run, that a failed save
can end at once.

Orbax's background save threads meet at barriers (`AsyncOptions.barrier_sync_fn`). When a save
fails on one process, that process's threads never reach the barrier the others wait at, and the
others would wait out orbax's timeout (20 minutes). `SaveBarrier` is such a barrier, through the
JAX coordination service's key-value store (the service `jax.distributed` starts; no XLA
collective, so it is safe in threads), and it

  - records a failure: a background thread of this process that reaches a barrier while an
    exception is propagating (orbax's save-finalize thread syncs in a `finally` after the save
    failed) has failed, and will not meet the other processes where they wait;
  - ends every wait, now and later, with `SaveAborted` once `abort()` is called (the processes
    call it together, once they have agreed that a save failed).
"""

from __future__ import annotations

import collections
import sys
import threading
import time

import jax

POLL_S = 0.5  # how often a waiting thread looks whether the wait was aborted


class SaveAborted(RuntimeError):
    """A barrier wait ended by `SaveBarrier.abort` (a save failed on some process)."""


# Barrier keys used before, on this process, with their use counts: orbax reuses some keys (the
# save-progress tracker's, at every save), the store needs a new name for each use; every process
# uses each key equally often, in the same order.
_uses: collections.Counter[str] = collections.Counter()
_uses_lock = threading.Lock()


class SaveBarrier:
    """`barrier(key=..., timeout_ms=...)`, orbax's `BarrierSyncFn`, for every process of the run
    (create it after `jax.distributed.initialize`)."""

    def __init__(self):
        self._client = jax._src.distributed.global_state.client  # noqa: SLF001
        if self._client is None:
            raise RuntimeError("SaveBarrier needs jax.distributed.initialize first.")
        self._count = jax.process_count()
        self._aborted = threading.Event()
        self.failure: BaseException | None = None  # what failed in a save of this process

    def __call__(self, *, key: str, timeout_ms: int) -> None:
        failing = sys.exc_info()[1]  # (the main thread's barriers may run in a caller's except)
        if (failing is not None and not isinstance(failing, SaveAborted) and self.failure is None
                and threading.current_thread() is not threading.main_thread()):
            self.failure = failing
        with _uses_lock:
            name = f"hemnet_jax/save_barrier/{key}/{_uses[key]}"
            _uses[key] += 1
        if self._client.key_value_increment(f"{name}/arrived", 1) == self._count:
            self._client.key_value_set(f"{name}/done", "1")
        deadline = time.monotonic() + timeout_ms / 1000
        while not self._aborted.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"Timed out after {timeout_ms / 1000:.0f} s at the barrier "
                                   f"{key!r} of a checkpoint save.")
            try:
                self._client.blocking_key_value_get(
                    f"{name}/done", max(1, int(min(remaining, POLL_S) * 1000)))
                return
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):  # the service is gone: no one will come
                    raise
        raise SaveAborted(f"The barrier {key!r} was abandoned: a checkpoint save failed.")

    def abort(self) -> None:
        """Ends every wait at these barriers, now and later, with SaveAborted."""
        self._aborted.set()
