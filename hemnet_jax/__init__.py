"""hemnet-jax: Highway Expectation Maximization Networks (AAAI 2021) in JAX and Flax."""

from hemnet_jax import hem
from hemnet_jax.hem_unit import HEMUnit

__all__ = ["HEMUnit", "hem"]
__version__ = "0.1.0"
