"""Keep TensorFlow off accelerators: tf.data and TFDS run on the host CPU, JAX owns GPUs/TPUs.

TensorFlow (a CUDA build, if installed instead of tensorflow-cpu) would otherwise reserve most of
every GPU's memory the first time it runs an op. Every module of `hemnet_jax.data` that uses
TensorFlow calls `hide_accelerators_from_tensorflow()` when it is imported, before any op runs.
"""

import tensorflow as tf

_ACCELERATOR_TYPES = ("GPU", "TPU")


def hide_accelerators_from_tensorflow() -> None:
    """Makes GPUs and TPUs invisible to TensorFlow; idempotent.

    Raises:
      RuntimeError: TensorFlow already initialised an accelerator (some TensorFlow op ran before
        this module was imported), so it may hold accelerator memory that JAX needs.
    """
    for device_type in _ACCELERATOR_TYPES:
        try:
            tf.config.set_visible_devices([], device_type)
        except RuntimeError as e:  # The runtime is initialised; fine if it sees none anyway.
            visible = tf.config.get_visible_devices(device_type)
            if visible:
                raise RuntimeError(
                    f"TensorFlow has already initialised {visible} and may hold their memory, "
                    "which JAX needs. Import hemnet_jax.data (or call "
                    "hide_accelerators_from_tensorflow()) before running any TensorFlow op, or "
                    "install tensorflow-cpu."
                ) from e
        except ValueError:  # This TensorFlow build does not know the device type.
            pass
