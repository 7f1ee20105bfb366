"""hemnet-jax: Highway Expectation Maximization Networks (AAAI 2021) in JAX and Flax.

The method's math is `hem` (pure functions on arrays); `HEMUnit` is its Flax module. The roles:
`models/` (networks, layers, weight import, cost report), `data/` (datasets, tf.data),
`training/` (state, optimiser, losses, checkpoints, sharding, the step), `evaluation/`
(metrics, predictors, eval runner, predict, visualize), `studies/` (gradient flow), and
`trainer` (the loop, run by train.py).
"""

from hemnet_jax import _compat, hem
from hemnet_jax.models.hem_unit import HEMUnit

_compat.install()

__all__ = ["HEMUnit", "hem"]
__version__ = "0.2.0"
