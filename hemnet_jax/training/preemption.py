"""Preemption notices turned into one stop step that every process agrees on.

Multi-process runs (`jax.distributed`, whose preemption service is on by default): JAX installs
its own SIGTERM notifier in `jax.distributed.initialize`. A notice on any host reaches the
coordination service, which sets the stop step to the fastest process's step count + 1, and
`multihost_utils.reached_preemption_sync_point(count)` turns True at that count on every process.
The counts given to JAX are the steps of this invocation (0 at the step the run resumed from, as
JAX's own count starts), so a notice that arrives before the first step (during the restore or
the compile) stops the run after its first step. No Python SIGTERM handler is installed there:
it would replace JAX's notifier.

Single-process runs, and multi-process runs with `jax_enable_preemption_service` off: a Python
SIGTERM handler sets a flag; with several processes the flags are agreed (an all-gather of one
integer) every `agree_every` steps, so that all stop at the same step.

Either handler stays installed until the process ends: a notice after the last step (during the
final validation) neither kills the process nor loses the final checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """`reached(step)`, called at every step boundary, is True at one and the same step on every
    process once any process has received a preemption notice (SIGTERM)."""

    def __init__(self, agree_every: int = 1):
        self._event = threading.Event()
        self._agree_every = max(agree_every, 1)
        self._jax_service = False
        self._start_step = 0

    def install(self, start_step: int) -> PreemptionWatcher:
        """Starts watching from `start_step`, the step every process resumes from."""
        self._start_step = start_step
        if jax.process_count() > 1:
            try:
                multihost_utils.reached_preemption_sync_point(0)  # fails if the service is off
                self._jax_service = True
            except RuntimeError:  # jax_enable_preemption_service is off
                self._jax_service = False
        if not self._jax_service and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        logging.warning(
            "SIGTERM received: saving a checkpoint at the next step boundary, then exiting."
        )
        self._event.set()

    def reached(self, step: int) -> bool:
        """True at the step where every process stops; call it at every step, on every process."""
        if self._jax_service:
            return multihost_utils.reached_preemption_sync_point(step - self._start_step)
        if jax.process_count() == 1:
            return self._event.is_set()
        if step % self._agree_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.int32(self._event.is_set()))))
