"""The jitted training step: forward, loss, backward, SGD update, step metrics."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from hemnet_jax.training import losses, sharding
from hemnet_jax.training.state import TrainState, mean_bases_norm

MUTABLE = ["batch_stats", "bases"]  # the collections a training forward pass updates


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
) -> Callable:
    """jit((state, batch, key) -> (state, metrics)) with the batch sharded over `data`."""
    aux_weight = config.model.aux_loss_weight
    cross_entropy = functools.partial(
        losses.cross_entropy, normalization=config.train.loss_normalization
    )

    def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
        dropout_key = jax.random.fold_in(key, state.step)

        def loss_fn(params):
            outputs, updated = model.apply(
                {**state.variables, "params": params},
                batch["image"],
                train=True,
                rngs={"dropout": dropout_key},
                mutable=MUTABLE,
            )
            ce = cross_entropy(outputs["logits"], batch["label"])
            total = ce
            if "aux_logits" in outputs:
                total = total + aux_weight * cross_entropy(outputs["aux_logits"], batch["label"])
            return total, (ce, updated)

        (loss, (ce, updated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            batch_stats=updated["batch_stats"],
            bases=updated.get("bases", {}),
        )
        step_metrics = {
            "loss": loss,
            "cross_entropy": ce,
            "learning_rate": schedule(state.step),
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(new_state.params),
            "bases_norm": mean_bases_norm(new_state.bases),
        }
        return new_state, step_metrics

    state_sharding = None  # inferred from the (already sharded) state
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
