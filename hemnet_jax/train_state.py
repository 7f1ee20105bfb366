"""The training state: everything a checkpoint holds and a train step updates."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """step: scalar int32. params: trained by SGD. opt_state: optax state.
    batch_stats: BatchNorm running statistics. bases: the HEM units' initial bases mu0."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    batch_stats: PyTree
    bases: PyTree

    @property
    def variables(self) -> dict[str, PyTree]:
        """The model's variables, as `model.apply` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats, "bases": self.bases}

    @classmethod
    def create(cls, variables: dict[str, PyTree], opt_state: PyTree) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            opt_state=opt_state,
            batch_stats=variables.get("batch_stats", {}),
            bases=variables.get("bases", {}),
        )


def mean_bases_norm(bases: PyTree) -> jax.Array:
    """Mean L2 norm of every basis (row over C) of every HEM unit: a training health signal."""
    norms = [jnp.linalg.norm(mu, axis=-1).mean() for mu in jax.tree.leaves(bases)]
    return jnp.mean(jnp.stack(norms)) if norms else jnp.zeros(())
