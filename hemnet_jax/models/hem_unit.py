"""The HEM unit: the Flax module that wires `hemnet_jax.hem` with parameters and state.

Layout (EMANet's EMA unit with the M-step replaced by the N-step; REFERENCE.md):

  x ─ conv1x1 (bias) ─ unrolled HEM (T iterations from mu0) ─ R-step ─ ReLU
    ─ conv1x1 (no bias) ─ BatchNorm ─ (+ x) ─ ReLU

The initial bases mu0 [K, C] are state, not parameters: they live in the mutable collection
`bases` and follow a moving average of the batch-mean final bases during training.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hemnet_jax import hem
from hemnet_jax.models.layers import Conv1x1, torch_default_bias_init

BASES = "bases"  # the collection holding mu0
INTERMEDIATES = "intermediates"

def init_bases(key: jax.Array, num_bases: int, channels: int) -> jax.Array:
    """mu0 [K, C]: Normal(0, sqrt(2 / K)), then each basis L2-normalised over C (EMANet)."""
    mu = jax.random.normal(key, (num_bases, channels), jnp.float32) * math.sqrt(2.0 / num_bases)
    return hem.l2_normalize_bases(mu)


class HEMUnit(nn.Module):
    """HEM attention unit. Input and output: [B, H, W, C].

    Attributes:
      num_bases: K.
      num_iters: T used in training (and at evaluation unless overridden per call).
      step_size: eta of the N-step (eq. 13); 1.0 is plain EM.
      temperature: sigma^2 of the E-step; None means sqrt(C) as in the paper.
      kernel: "dot" (eq. 8) or "rbf" (eq. 7).
      l2_normalize: normalise the bases over C after every N-step (EMANet).
      stop_em_gradient: no gradient through the EM loop (EMANet).
      bases_momentum: mu0 <- m mu0 + (1 - m) mean_batch(mu_T) in training.
      bn_momentum, bn_epsilon: of the BatchNorm after the second conv (Flax convention:
        running = momentum * running + (1 - momentum) * batch; PyTorch's 0.1 is Flax's 0.9).
      dtype: compute dtype of the convs and BatchNorm; the EM math runs in at least float32.
      param_dtype: dtype of parameters, BatchNorm statistics and bases.
      axis_name: for use under pmap/shard_map only, the mapped axis over which BatchNorm
        statistics and the bases' batch mean are averaged. Under jit with a sharded batch (the
        way train.py runs) leave it None: the mean is over the global batch already.
      remat: recompute each HEM iteration in the backward pass (saves memory).
      frozen_conv_in: the first conv is not trained (the optimiser freezes it, see
        `models.frozen_param_prefixes`), as in EMANet, whose EM loop under no_grad leaves it
        without gradient: its bias then starts as PyTorch's default, U(-1/sqrt(C), 1/sqrt(C)),
        instead of 0, and keeps that value for the whole run.
      layer_gradients: for gradient-flow studies (`hemnet_jax.studies.gradient_flow`): each HEM
        layer t reads X through zero offsets [T, B, H*W, C] declared with `self.perturb` as
        "e_step" and "n_step" in the "perturbations" collection, so `jax.grad` w.r.t. that
        collection gives every layer's E-step and N-step share of dL/dX (eq. 16-17). Values are
        unchanged; off (the default), the unit is exactly as without it.
    """

    num_bases: int = 64
    num_iters: int = 3
    step_size: float = 0.5
    temperature: float | None = None
    kernel: hem.Kernel = "dot"
    l2_normalize: bool = False
    stop_em_gradient: bool = False
    bases_momentum: float = 0.9
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    remat: bool = False
    frozen_conv_in: bool = False
    layer_gradients: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        num_iters: int | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]. num_iters overrides T (e.g. T_eval at evaluation).

        mask: [B, H, W] bool, or None: only the True positions (real pixels, not padding) enter
        the M-step's sums and the bases' moving average; an example with no True position is
        left out of that average.
        """
        b, h, w, c = x.shape
        temperature = math.sqrt(c) if self.temperature is None else self.temperature
        num_iters = self.num_iters if num_iters is None else num_iters
        mu0 = self.variable(
            BASES, "mu", lambda: init_bases(self.make_rng("params"), self.num_bases, c)
        )

        identity = x
        bias_init = torch_default_bias_init(c) if self.frozen_conv_in else nn.initializers.zeros
        feats = Conv1x1(
            c, use_bias=True, bias_init=bias_init, dtype=self.dtype, param_dtype=self.param_dtype,
            name="conv_in",
        )(x)
        flat_mask = None if mask is None else mask.reshape(b, h * w)
        record = self.is_mutable_collection(INTERMEDIATES)
        layer_offsets = None
        if self.layer_gradients:
            dtype = jnp.promote_types(feats.dtype, jnp.float32)
            zeros = jnp.zeros((num_iters, b, h * w, c), dtype)
            layer_offsets = (self.perturb("e_step", zeros), self.perturb("n_step", zeros))
        outs = hem.unrolled_hem(
            feats.reshape(b, h * w, c),
            mu0.value,
            num_iters=num_iters,
            step_size=self.step_size,
            temperature=temperature,
            kernel=self.kernel,
            l2_normalize=self.l2_normalize,
            stop_em_gradient=self.stop_em_gradient,
            return_history=record,
            remat=self.remat,
            layer_offsets=layer_offsets,
            mask=flat_mask,
        )
        mu, gamma = outs[:2]
        x_tilde = hem.r_step(gamma, mu).reshape(b, h, w, c)
        if record:
            self.sow(INTERMEDIATES, "mu", outs[2])  # [T, B, K, C]
            self.sow(INTERMEDIATES, "gamma", outs[3].reshape(num_iters, b, h, w, -1))  # [T,B,H,W,K]
            self.sow(INTERMEDIATES, "x_tilde", x_tilde)  # [B, H, W, C], before the ReLU

        if train and not self.is_initializing():
            self._update_bases(mu0, mu, flat_mask)

        y = nn.relu(x_tilde).astype(self.dtype)
        y = Conv1x1(
            c, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="conv_out"
        )(y)
        y = nn.BatchNorm(
            use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name, name="bn_out",
        )(y)
        return nn.relu(y + identity.astype(y.dtype))

    def _update_bases(self, mu0: nn.Variable, mu_t: jax.Array, mask: jax.Array | None) -> None:
        """mu0 <- m mu0 + (1 - m) mean over the (global) batch of stop_gradient(mu_T); with a
        mask [B, N], the mean over the examples with at least one valid position."""
        mu_t = jax.lax.stop_gradient(mu_t)
        if mask is None:
            batch_mean = jnp.mean(mu_t, axis=0)
            if self.axis_name is not None:
                batch_mean = jax.lax.pmean(batch_mean, self.axis_name)
        else:
            weights = jnp.any(mask, axis=-1).astype(mu_t.dtype)  # [B]
            total, count = jnp.einsum("b,bkc->kc", weights, mu_t), jnp.sum(weights)
            if self.axis_name is not None:
                total, count = jax.lax.psum((total, count), self.axis_name)
            batch_mean = total / jnp.maximum(count, 1.0)
        m = self.bases_momentum
        mu0.value = (m * mu0.value + (1.0 - m) * batch_mean).astype(mu0.value.dtype)
