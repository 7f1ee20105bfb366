"""Preemption notices (SIGTERM) turned into a flag the training loop polls at step boundaries."""

from __future__ import annotations

import logging
import signal
import threading


class PreemptionWatcher:
    """Turns SIGTERM (a TPU VM's preemption notice, or `kill`) into a flag the loop polls, so the
    loop saves a checkpoint at a step boundary and exits cleanly."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then exiting.")
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()
