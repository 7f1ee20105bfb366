"""The console's one line per log step: the step, loss, learning rate, steps/s and ETA.

Every other scalar (the full metrics, `bases/*`, clu's steps_per_sec) goes to TensorBoard and
the run's log file only (`cli.quiet_library_logs` keeps clu's lines off the console).
The line reads `[STEP] loss=..., learning_rate=..., S steps/s, ETA H:MM:SS`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping


class ProgressLine:
    """Logs one line per log step; steps/s over the steps since the previous line.

    The clock starts at `start(step)`, called once the first step has run (after compiling),
    so a rate never includes the compile time.
    """

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self._since: tuple[int, float] | None = None  # (step, time) the rate counts from

    def start(self, step: int) -> None:
        """The clock starts at the end of `step` (the first step run)."""
        self._since = (step, time.monotonic())

    def log(self, step: int, means: Mapping[str, float]) -> str:
        """Logs (INFO) and returns the line of `step`, whose window's metric means are `means`
        ("loss", "learning_rate")."""
        now = time.monotonic()
        rate = None
        if self._since is not None and step > self._since[0] and now > self._since[1]:
            rate = (step - self._since[0]) / (now - self._since[1])
        self._since = (step, now)
        if rate is None:  # the first step of the run: nothing timed yet
            speed = "? steps/s, ETA ?"
        else:
            minutes, seconds = divmod(round(max(self.num_steps - step, 0) / rate), 60)
            speed = f"{rate:.3g} steps/s, ETA {minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
        line = (f"[{step}] loss={means['loss']:.4g}, "
                f"learning_rate={means['learning_rate']:.3g}, {speed}")
        logging.info("%s", line)
        return line
