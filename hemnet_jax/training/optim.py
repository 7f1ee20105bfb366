"""The optimiser of EMANet's recipe: SGD with momentum, poly schedule, per-group lr and decay.

Parameter groups (EMANet's train.py):
  weight: conv and dense kernels      lr x 1,             weight decay
  bias:   conv and dense biases       lr x bias_lr_mult,  no weight decay
  norm:   BatchNorm scale and bias    lr x 1,             no weight decay
          (with train.norm_bias_lr_mult != 1, the biases are their own group "norm_bias" at
          that multiple: the official code's 2x group holds BatchNorm biases too)
  frozen: parameters under the prefixes the model names (`models.frozen_param_prefixes`):
          never updated, never decayed (EMANet's EM unit conv1, which gets no gradient)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax
import ml_collections
import optax

GROUPS = ("weight", "bias", "norm", "norm_bias", "frozen")


def poly_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """The poly learning rate of step k (0-based, the optimiser's count), power p, T num_steps.

    lr_update_every N = 1: lr(k) = learning_rate * (1 - k / T) ** p (0 after T).
    N > 1, EMANet's train.py: its iterations count from i = k + 1 and `poly_lr_scheduler` sets
    the rate to learning_rate * (1 - i / T) ** p whenever i % N == 0, so iteration i runs at
    lr(k) = learning_rate * (1 - N floor(i / N) / T) ** p (learning_rate before i = N).
    """
    every = train.lr_update_every
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"train.lr_update_every must be an integer >= 1, got {every!r}.")
    poly = optax.polynomial_schedule(
        init_value=train.learning_rate,
        end_value=0.0,
        power=train.lr_power,
        transition_steps=train.num_steps,
    )
    if every == 1:
        return poly
    return lambda step: poly((step + 1) // every * every)


def param_groups(
    params: dict, frozen: Sequence[tuple[str, ...]] = (), norm_bias_group: bool = False
) -> dict:
    """A tree like `params` with each leaf's group name: a leaf under a prefix in `frozen` is
    frozen; otherwise a leaf whose module also holds a `kernel` is a bias of a conv or dense
    layer, and one whose module holds a `scale` is a norm's (its bias in "norm_bias" when
    norm_bias_group)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    names_in_module: dict[tuple, set[str]] = {}
    for path in flat:
        names_in_module.setdefault(path[:-1], set()).add(path[-1])
    unmatched = [p for p in frozen if not any(path[: len(p)] == tuple(p) for path in flat)]
    if unmatched:
        raise ValueError(f"No parameters under the frozen prefixes {unmatched}.")
    groups = {}
    for path in flat:
        siblings, name = names_in_module[path[:-1]], path[-1]
        if any(path[: len(p)] == tuple(p) for p in frozen):
            groups[path] = "frozen"
        elif name == "kernel":
            groups[path] = "weight"
        elif "scale" in siblings:
            groups[path] = "norm_bias" if norm_bias_group and name == "bias" else "norm"
        elif name == "bias" and "kernel" in siblings:
            groups[path] = "bias"
        else:
            raise ValueError(f"Cannot place parameter {'/'.join(path)} in a group of {GROUPS}.")
    return flax.traverse_util.unflatten_dict(groups)


def make_optimizer(
    train: ml_collections.ConfigDict, params: dict, frozen: Sequence[tuple[str, ...]] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD as PyTorch computes it (buf = m buf + g + wd p; p -= lr buf), one chain per group;
    parameters under the `frozen` path prefixes get no update at all."""
    schedule = poly_schedule(train)

    def sgd(lr_mult: float, weight_decay: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
            optax.trace(decay=train.momentum, nesterov=False),
            optax.scale_by_schedule(lambda step: -lr_mult * schedule(step)),
        )

    transforms = {
        "weight": sgd(1.0, train.weight_decay),
        "bias": sgd(train.bias_lr_mult, 0.0),
        "norm": sgd(1.0, 0.0),
    }
    # Extra groups only when used, so that the optimiser state of other runs keeps its structure.
    norm_bias_group = train.norm_bias_lr_mult != 1.0
    if norm_bias_group:
        transforms["norm_bias"] = sgd(train.norm_bias_lr_mult, 0.0)
    if frozen:
        transforms["frozen"] = optax.set_to_zero()
    tx = optax.multi_transform(transforms, param_groups(params, frozen, norm_bias_group))
    return tx, schedule
