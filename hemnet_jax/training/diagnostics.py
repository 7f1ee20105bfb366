"""The HEM unit's basis diagnostics on a model: `hem_diagnostics` on its bases and attention.

Training logs them at every log interval (`train.basis_diagnostics`): from the bases collection
mu0 [K, C] and one forward pass over the step's batch. eval.py reports them over the
evaluation split (`evaluation.validation.basis_diagnostics`). docs/diagnostics.md says which
values mean collapse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hemnet_jax import hem_diagnostics as diag
from hemnet_jax.models.hemnet import HEM_SCOPE, feature_mask, valid_pixels
from hemnet_jax.training import sharding

PREFIX = "bases/"  # of the scalars' names in TensorBoard and JSON

# (variables, images [B, H, W, 3], heights [B] | None, widths [B] | None) -> attention sums.
Probe = Callable[..., dict[str, jax.Array]]


def make_probe(model: nn.Module, mesh: Mesh, *, train: bool,
               num_iters: int | None = None) -> Probe:
    """A jitted forward pass returning `hem_diagnostics.attention_stats` of the last HEM
    iteration's gamma [B, h, w, K], and the bases mu0 [K, C] as "mu0" (replicated, so every
    process can read them whatever the state's sharding). Given the examples' real `heights`
    and `widths` [B] on a padded canvas (evaluation batches), the forward pass is masked as
    evaluation's (`HEMNet.__call__`'s `valid`: the HEM unit sees only the feature positions of
    the real region) and only those positions are counted: padding is never a pixel.

    train=True runs the network as a training step does (batch statistics; dropout, which
    comes after the unit, with a fixed key) and discards the updated state.
    """
    mutable = ["intermediates", "batch_stats", "bases"] if train else ["intermediates"]

    def probe(variables: dict, images: jax.Array, heights: jax.Array | None = None,
              widths: jax.Array | None = None) -> dict[str, jax.Array]:
        valid = None if heights is None else valid_pixels(heights, widths, images.shape[1:3])
        _, state = model.apply(
            variables, images, train=train, num_iters=num_iters, mutable=mutable,
            rngs={"dropout": jax.random.PRNGKey(0)} if train else None,
            **({} if valid is None else {"valid": valid}),
        )
        gamma = state["intermediates"][HEM_SCOPE]["gamma"][0][-1]  # [B, h, w, K]
        weights = None
        if valid is not None:
            weights = feature_mask(valid, model.backbone.output_stride).astype(jnp.float32)
        return {**diag.attention_stats(gamma, weights),
                "mu0": variables["bases"][HEM_SCOPE]["mu"]}

    return jax.jit(probe, out_shardings=sharding.replicated(mesh))


def add_stats(total: dict | None, sums: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    """total + a probe's output, on the host in float64 (total None: the output); "mu0" is
    the latest, not summed."""
    sums = {k: np.asarray(v, np.float64) for k, v in jax.device_get(dict(sums)).items()}
    if total is None:
        return sums
    return {k: sums[k] if k == "mu0" else total[k] + sums[k] for k in total}


def scalars(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
    """`hem_diagnostics.summarize` of `add_stats`' output (mu0 and the attention sums), with
    names "bases/distinct_bases", ..."""
    return {PREFIX + k: v for k, v in diag.summarize(sums["mu0"], sums).items()}


def describe(values: Mapping[str, float]) -> str:
    """One line of `scalars`' values for a console, e.g. "bases: 2 distinct of 16 (largest
    cluster 15), 2 distinct attention maps, effective bases in use 12.9, distinguishing 1.50,
    norm 3.23 +- 0.43"."""
    v = {k.removeprefix(PREFIX): x for k, x in values.items()}
    parts = []
    if "distinct_bases" in v:
        parts.append(f"{int(v['distinct_bases'])} distinct of {int(v['num_bases'])} "
                     f"(largest cluster {int(v['largest_cluster'])})")
    if "distinct_attention" in v:
        parts += [f"{int(v['distinct_attention'])} distinct attention maps",
                  f"effective bases in use {v['effective_in_use']:.1f}",
                  f"distinguishing {v['effective_distinguishing']:.2f}"]
    if "norm_mean" in v:
        parts.append(f"norm {v['norm_mean']:.3g} +- {v['norm_std']:.2g}")
    return "bases: " + ", ".join(parts)
