"""The tiny model's initial variables: one compiled init for every test file.

Kept out of tests/tiny.py, which programs load as a config file (`--config tests/tiny.py`).
"""

import functools

import jax
import jax.numpy as jnp


@functools.cache
def _jitted_init(model):
    """One jitted init per model config (flax modules hash by their fields): traced once per
    worker, compiled once per test run (the persistent cache)."""
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))


def init_variables(model, seed: int = 0) -> dict:
    """`model.init` on a zero [1, 32, 32, 3] batch, jitted: the same program in every test file."""
    return _jitted_init(model)(jax.random.PRNGKey(seed))
