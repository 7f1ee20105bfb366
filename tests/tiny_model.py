"""The tiny model's initial variables: one compiled init for every test file.

Kept out of tests/tiny.py, which programs load as a config file (`--config tests/tiny.py`).
"""

import jax
import jax.numpy as jnp


def init_variables(model, seed: int = 0) -> dict:
    """`model.init` on a zero [1, 32, 32, 3] batch, jitted: the same program in every test file,
    so that each model config's init is compiled once per test run (the persistent cache)."""
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))
    return init(jax.random.PRNGKey(seed))
