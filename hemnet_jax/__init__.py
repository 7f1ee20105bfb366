"""hemnet-jax: Highway Expectation Maximization Networks (AAAI 2021) in JAX and Flax.

The method's math is `hem` (pure functions on arrays); `HEMUnit` is its Flax module. The roles:
`models/` (networks, layers, weight import, cost report), `data/` (datasets, tf.data),
`training/` (state, optimiser, losses, checkpoints, sharding, the step), `evaluation/`
(metrics, predictors, eval runner, predict, visualize), `studies/` (gradient flow), and
`trainer` (the loop, run by train.py).
"""

from hemnet_jax import _compat

_compat.install()
# Imported on first use: the package itself loads no JAX (a program checks its command line first).
__getattr__ = _compat.lazy_attributes(
    __name__, {"hem": "hemnet_jax.hem", "HEMUnit": "hemnet_jax.models.hem_unit:HEMUnit"}
)

__all__ = ["HEMUnit", "hem"]
__version__ = "0.2.0"
