"""The optimiser of EMANet's recipe: SGD with momentum, poly schedule, per-group lr and decay.

Parameter groups (EMANet's train.py):
  weight: conv and dense kernels      lr x 1,             weight decay
  bias:   conv and dense biases       lr x bias_lr_mult,  no weight decay
  norm:   BatchNorm scale and bias    lr x 1,             no weight decay
"""

from __future__ import annotations

import flax
import ml_collections
import optax

GROUPS = ("weight", "bias", "norm")


def poly_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """lr(step) = learning_rate * (1 - step / num_steps) ** lr_power (0 after num_steps)."""
    return optax.polynomial_schedule(
        init_value=train.learning_rate,
        end_value=0.0,
        power=train.lr_power,
        transition_steps=train.num_steps,
    )


def param_groups(params: dict) -> dict:
    """A tree like `params` with each leaf's group name: a leaf whose module also holds a
    `kernel` is a bias of a conv or dense layer; one whose module holds a `scale` is a norm's."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    names_in_module: dict[tuple, set[str]] = {}
    for path in flat:
        names_in_module.setdefault(path[:-1], set()).add(path[-1])
    groups = {}
    for path in flat:
        siblings, name = names_in_module[path[:-1]], path[-1]
        if name == "kernel":
            groups[path] = "weight"
        elif "scale" in siblings:
            groups[path] = "norm"
        elif name == "bias" and "kernel" in siblings:
            groups[path] = "bias"
        else:
            raise ValueError(f"Cannot place parameter {'/'.join(path)} in a group of {GROUPS}.")
    return flax.traverse_util.unflatten_dict(groups)


def make_optimizer(
    train: ml_collections.ConfigDict, params: dict
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD as PyTorch computes it (buf = m buf + g + wd p; p -= lr buf), one chain per group."""
    schedule = poly_schedule(train)

    def sgd(lr_mult: float, weight_decay: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
            optax.trace(decay=train.momentum, nesterov=False),
            optax.scale_by_schedule(lambda step: -lr_mult * schedule(step)),
        )

    tx = optax.multi_transform(
        {
            "weight": sgd(1.0, train.weight_decay),
            "bias": sgd(train.bias_lr_mult, 0.0),
            "norm": sgd(1.0, 0.0),
        },
        param_groups(params),
    )
    return tx, schedule
