"""TensorFlow for tf.data and TFDS: imported on first use, quietly, and kept off accelerators.

The data modules call `tensorflow()` where they use it, never at import, so a program that
stops at a mistake, or never reads data, does not load TensorFlow (3-8 s on 2 busy cores).

Its C++ start-up notices are dropped: absl's "All log messages before absl::InitializeLog()"
warning and oneDNN's "custom operations are on" notice (each printed twice: once per TensorFlow
library loaded), and the CPU-feature notice (printed when oneDNN is off). They ask nothing of a
user and TF_CPP_MIN_LOG_LEVEL does not hide them (they are logged before TensorFlow reads it).
Anything else TensorFlow prints while it loads is kept. `TF_ENABLE_ONEDNN_OPTS=0` would not
silence it: it turns oneDNN's CPU kernels off (the tf.data ops' float rounding and speed change),
and TensorFlow then prints the CPU-feature notice instead. Its C++ INFO records at run time
(e.g. tf.data's "The default buffer size is 262144, which is overridden...") are hidden by
`TF_CPP_MIN_LOG_LEVEL=1` where the environment does not set it; warnings and errors stay.

TensorFlow (a CUDA build, if installed instead of tensorflow-cpu) would otherwise reserve most of
every GPU's memory the first time it runs an op: `tensorflow()` hides GPUs and TPUs from it
before returning it.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from types import ModuleType

_ACCELERATOR_TYPES = ("GPU", "TPU")

# TensorFlow's C++ start-up notices (see the module docstring), one line each.
_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|\] oneDNN custom operations are on\."
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
)


@functools.cache
def tensorflow() -> ModuleType:
    """The `tensorflow` module, imported on the first call without its start-up notices, with
    accelerators hidden from it."""
    tf = _import_without_notices()
    hide_accelerators_from_tensorflow(tf)
    return tf


def _import_without_notices() -> ModuleType:
    """`import tensorflow` with the process's stderr (file descriptor 2, which its C++ libraries
    write to) captured, then written back without the lines `_NOTICES` matches."""
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                import tensorflow as tf
            finally:
                os.dup2(saved, 2)
                captured.seek(0)
                text = captured.read().decode(errors="replace")
                kept = [line for line in text.splitlines(keepends=True)
                        if not _NOTICES.search(line)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()
    finally:
        os.close(saved)
    return tf


def hide_accelerators_from_tensorflow(tf: ModuleType | None = None) -> None:
    """Makes GPUs and TPUs invisible to TensorFlow (`tf`, default: `tensorflow()`); idempotent.

    Raises:
      RuntimeError: TensorFlow already initialised an accelerator (some TensorFlow op ran before
        the data modules used it), so it may hold accelerator memory that JAX needs.
    """
    tf = tensorflow() if tf is None else tf
    for device_type in _ACCELERATOR_TYPES:
        try:
            tf.config.set_visible_devices([], device_type)
        except RuntimeError as e:  # The runtime is initialised; fine if it sees none anyway.
            visible = tf.config.get_visible_devices(device_type)
            if visible:
                raise RuntimeError(
                    f"TensorFlow has already initialised {visible} and may hold their memory, "
                    "which JAX needs. Call hemnet_jax.data.tf_devices.tensorflow() before "
                    "running any TensorFlow op, or install tensorflow-cpu."
                ) from e
        except ValueError:  # This TensorFlow build does not know the device type.
            pass
