"""Gradient flow through the unrolled HEM layers with `jax.grad`: the paper's Fig. 3 (eq. 14-18).

Each HEM layer t reads the features X twice: in its E-step (gamma^(t) from mu^(t-1), eq. 8) and
in its N-step (mu^(t) = (1 - eta) mu^(t-1) + eta F_EM(mu^(t-1), X), eq. 13). Giving every read its
own zero-valued copy of X (`hem.unrolled_hem(layer_offsets=...)`) splits dL/dX exactly into 2T
per-layer shares that sum to it (eq. 16-17). Ignoring the E-step's shares, eq. 18 predicts that
layer t's N-step share is proportional to eta (1 - eta)^(T - t).

Two levels, one summary (`summarize`: mean absolute values over every element, as in Fig. 3):
  per_layer_input_gradients  arrays in (X, mu0, a loss on X_tilde), for notebooks.
  model_layer_gradients      the HEM unit inside HEMNet (backbone, head, cross-entropy), one
                             batch; `layer_gradient_metrics` is its training-time hook.
The program over a fixed set of training crops is `hemnet_jax.studies.gradient_flow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hemnet_jax import hem
from hemnet_jax.models import HEMNet
from hemnet_jax.models.hemnet import HEM_SCOPE
from hemnet_jax.training import losses

SUMMARY_KEYS = ("n_step", "e_step", "total", "elbo", "predicted")
Summary = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------
# Summaries shared by every level.


def elbo_sigma2(temperature: float, kernel: hem.Kernel) -> float:
    """The variance sigma2 for which the E-step at `temperature` is the GMM posterior (eq. 4).

    rbf: softmax_K(-||x - mu_k||^2 / temperature) is the posterior of N(x | mu_k, sigma2 I) for
      sigma2 = temperature / 2, exactly.
    dot: softmax_K(x.mu_k / tau) = softmax_K((2 x.mu_k - ||mu_k||^2) / (2 tau)) when all bases
      have one norm, which is the rbf E-step at temperature 2 tau: sigma2 = tau (not tau / 2).
      Exact for L2-normalised bases (EMANet); otherwise the dot E-step is only close to the
      posterior and the ELBO need not rise at every E-step (each N-step still raises it for its
      own gamma: Proposition 1).
    """
    if kernel == "rbf":
        return temperature / 2.0
    if kernel == "dot":
        return temperature
    raise ValueError(f"Unknown E-step kernel {kernel!r}: expected 'dot' or 'rbf'.")


def eq18_weights(num_iters: int, step_size: float) -> np.ndarray:
    """eta (1 - eta)^(T - t) for t = 1..T: eq. 18's factor on layer t's N-step share. [T]."""
    t = np.arange(1, num_iters + 1)
    return step_size * (1.0 - step_size) ** (num_iters - t)


class LayerGradients(NamedTuple):
    """dL/dX split by HEM layer, with the forward pass's X and histories."""

    features: jax.Array  # [..., N, C] X
    x: jax.Array  # [..., N, C] dL/dX
    e_step: jax.Array  # [T, ..., N, C] dL/d(layer t's E-step copy of X)
    n_step: jax.Array  # [T, ..., N, C] dL/d(layer t's N-step copy of X)
    mu: jax.Array  # [T, ..., K, C] bases after iteration t
    gamma: jax.Array  # [T, ..., N, K] responsibilities of iteration t's E-step


def summarize(g: LayerGradients, step_size: float, sigma2: float) -> Summary:
    """The study's numbers (Fig. 3) from the per-layer gradients.

    Returns:
      n_step, e_step: [T] mean |.| of layer t's N-step, resp. E-step, share of dL/dX.
      total: mean |dL/dX|.
      elbo: [T] eq. 3 after each iteration, L(mu^(t), gamma^(t)) with `sigma2` (sum over N and
        K, mean over leading axes).
      predicted: [T] eq. 18's eta (1 - eta)^(T - t), scaled to the same sum as n_step.
    """
    layer_axes = tuple(range(1, g.n_step.ndim))
    n_step = jnp.mean(jnp.abs(g.n_step), axis=layer_axes)
    weights = jnp.asarray(eq18_weights(g.n_step.shape[0], step_size), n_step.dtype)
    return {
        "n_step": n_step,
        "e_step": jnp.mean(jnp.abs(g.e_step), axis=layer_axes),
        "total": jnp.mean(jnp.abs(g.x)),
        "elbo": jax.vmap(lambda m, r: jnp.mean(hem.elbo(g.features, m, r, sigma2)))(g.mu, g.gamma),
        "predicted": weights * (jnp.sum(n_step) / jnp.sum(weights)),
    }


# ---------------------------------------------------------------------------------------------
# Arrays in: the notebook functions.


def layer_input_gradients(
    x: jax.Array,
    mu0: jax.Array,
    loss_fn: Callable[[jax.Array], jax.Array],
    *,
    num_iters: int,
    step_size: float,
    temperature: float,
    kernel: hem.Kernel = "dot",
    l2_normalize: bool = False,
    stop_e_step_gradient: bool = False,
) -> LayerGradients:
    """dL/dX and its 2T per-layer shares (eq. 16-17), L = loss_fn(X_tilde), X_tilde = gamma mu.

    Args:
      x: [..., N, C]. mu0: [..., K, C]. loss_fn: X_tilde [..., N, C] -> scalar.
      num_iters, step_size, temperature, kernel, l2_normalize: of `hem.unrolled_hem`.
      stop_e_step_gradient: gamma is constant in the backward pass (eq. 15 and 18's
        approximation): the E-step shares are then zero.
    """
    dtype = jnp.promote_types(jnp.result_type(x, mu0), jnp.float32)
    zeros = jnp.zeros((num_iters,) + x.shape, dtype)

    def loss(x, offsets):
        mu, gamma, mu_history, gamma_history = hem.unrolled_hem(
            x, mu0, num_iters=num_iters, step_size=step_size, temperature=temperature,
            kernel=kernel, l2_normalize=l2_normalize, stop_e_step_gradient=stop_e_step_gradient,
            return_history=True, layer_offsets=offsets,
        )
        return loss_fn(hem.r_step(gamma, mu)), (mu_history, gamma_history)

    (g_x, (g_e, g_n)), (mu, gamma) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        x, (zeros, zeros)
    )
    return LayerGradients(x, g_x, g_e, g_n, mu, gamma)


def per_layer_input_gradients(
    x: jax.Array,
    mu0: jax.Array,
    loss_fn: Callable[[jax.Array], jax.Array],
    *,
    num_iters: int,
    step_size: float,
    temperature: float,
    kernel: hem.Kernel = "dot",
    l2_normalize: bool = False,
    stop_e_step_gradient: bool = False,
) -> Summary:
    """Fig. 3 for arrays: per-layer gradient magnitudes and the ELBO per iteration.

    Args: as `layer_input_gradients`.
    Returns:
      n_step, e_step: [T] mean |dL/d(layer t's N-step, resp. E-step, copy of X)|.
      total: mean |dL/dX| (the plain jax.grad). elbo: [T] eq. 3 after each iteration (sum over
      N and K, mean over leading axes; sigma2 from `elbo_sigma2`). predicted: [T] eq. 18's
      eta (1 - eta)^(T - t), scaled to n_step's sum.
    """
    g = layer_input_gradients(
        x, mu0, loss_fn, num_iters=num_iters, step_size=step_size, temperature=temperature,
        kernel=kernel, l2_normalize=l2_normalize, stop_e_step_gradient=stop_e_step_gradient,
    )
    return summarize(g, step_size, elbo_sigma2(temperature, kernel))


# ---------------------------------------------------------------------------------------------
# The HEM unit inside the full network.


def with_layer_gradients(model: HEMNet, **hem_overrides: Any) -> HEMNet:
    """`model` with per-layer copies of X in its HEM unit (`HEMUnit.layer_gradients`), and any
    other HEM unit field changed (e.g. step_size). Same variables, same outputs."""
    return model.clone(hem=model.hem.clone(layer_gradients=True, **hem_overrides))


def _is_hem_input(module, method_name: str) -> bool:
    """capture_intermediates filter: the HEM unit's conv_in, whose output is the EM's X."""
    return method_name == "__call__" and module.scope.path == (HEM_SCOPE, "conv_in")


def model_layer_input_gradients(
    model: HEMNet,
    variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    *,
    num_iters: int | None = None,
    train: bool = True,
    rng: jax.Array | None = None,
) -> LayerGradients:
    """dL/dX and its per-layer shares in the full network (backbone, head, cross-entropy).

    X is the HEM unit's EM input (its conv_in output), flattened to [B, N, C]. It reaches the
    loss only through the HEM layers (the unit's skip connection adds the unit's input, not X),
    so dL/dX is exactly the sum of the 2T shares. The loss is `losses.cross_entropy` of the
    logits: the mean over the batch's labelled pixels, as in the training step.

    Args:
      model: a HEMNet; its HEM unit's eta, T, kernel and temperature are studied.
      variables: params, batch_stats, bases (`TrainState.variables`).
      images: [B, H, W, 3]. labels: [B, H, W], 255 ignored.
      num_iters: T of the study (default: the model's).
      train: BatchNorm on the batch's statistics and dropout with `rng`, as in a training step
        (nothing is updated). False: inference mode (running statistics, no dropout).
      rng: the dropout key when `train` (default PRNGKey(0)).
    """
    model = with_layer_gradients(model)
    mutable = ["intermediates", "batch_stats", "bases"] if train else ["intermediates"]
    rngs = {"dropout": jax.random.PRNGKey(0) if rng is None else rng} if train else {}

    def apply(extra: Mapping[str, Any], *extra_mutable: str):
        return model.apply(
            {**variables, **extra}, images, train=train, num_iters=num_iters, rngs=rngs,
            mutable=mutable + list(extra_mutable), capture_intermediates=_is_hem_input,
        )

    shapes = jax.eval_shape(lambda: apply({}, "perturbations"))[1]["perturbations"]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def loss(perturbations):
        outputs, state = apply({"perturbations": perturbations})
        return losses.cross_entropy(outputs["logits"], labels), state["intermediates"][HEM_SCOPE]

    grads, recorded = jax.grad(loss, has_aux=True)(zeros)
    g_e, g_n = grads[HEM_SCOPE]["e_step"], grads[HEM_SCOPE]["n_step"]  # [T, B, N, C]
    x = recorded["conv_in"]["__call__"][0]  # [B, H, W, C]
    gamma = recorded["gamma"][0]  # [T, B, H, W, K]
    return LayerGradients(
        features=x.reshape(g_e.shape[1:]),
        x=g_e.sum(0) + g_n.sum(0),
        e_step=g_e,
        n_step=g_n,
        mu=recorded["mu"][0],
        gamma=gamma.reshape(g_e.shape[:-1] + gamma.shape[-1:]),
    )


def model_layer_gradients(
    model: HEMNet,
    variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    *,
    num_iters: int | None = None,
    train: bool = True,
    rng: jax.Array | None = None,
) -> Summary:
    """Fig. 3 in the full network on one batch: `model_layer_input_gradients`, summarised as
    `per_layer_input_gradients` (the ELBO averaged over the batch's images)."""
    g = model_layer_input_gradients(
        model, variables, images, labels, num_iters=num_iters, train=train, rng=rng
    )
    unit = model.hem
    channels = g.features.shape[-1]
    temperature = math.sqrt(channels) if unit.temperature is None else unit.temperature
    return summarize(g, unit.step_size, elbo_sigma2(temperature, unit.kernel))


def layer_gradient_metrics(
    model: HEMNet,
    variables: Mapping[str, Any],
    batch: Mapping[str, jax.Array],
    *,
    num_iters: int | None = None,
    train: bool = True,
    rng: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The training-time hook (Fig. 3(d) over training): `model_layer_gradients` on
    batch = {"image", "label"}, as scalars for a metric writer:

      grad_flow/n_step_t{t}, grad_flow/e_step_t{t}, grad_flow/elbo_t{t} for t = 1..T,
      grad_flow/total.

    Jit-friendly with the model bound: jax.jit(functools.partial(layer_gradient_metrics, model)).
    """
    s = model_layer_gradients(
        model, variables, batch["image"], batch["label"], num_iters=num_iters, train=train, rng=rng
    )
    metrics = {"grad_flow/total": s["total"]}
    for name in ("n_step", "e_step", "elbo"):
        for t in range(s[name].shape[0]):
            metrics[f"grad_flow/{name}_t{t + 1}"] = s[name][t]
    return metrics
