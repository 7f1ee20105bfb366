"""The training loop: one jitted step over a mesh of every device, orbax checkpoints, clu logging.

`train.py` parses flags and calls `train_and_evaluate`; this module knows the model and the HEM
unit only through `models.create_model` and the variable collections they declare.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hemnet_jax import checkpointing, evaluation, losses, metrics, optim, parallel
from hemnet_jax.data import datasets, pipeline, prepare
from hemnet_jax.models import create_model
from hemnet_jax.train_state import TrainState, mean_bases_norm

MUTABLE = ["batch_stats", "bases"]


def dtype_of(name: str) -> jnp.dtype:
    """The compute dtype a config names ('float32' or 'bfloat16')."""
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {name!r}.")
    return jnp.dtype(name)


class PreemptionWatcher:
    """Turns SIGTERM (a TPU VM's preemption notice, or `kill`) into a flag the loop polls, so the
    loop saves a checkpoint at a step boundary and exits cleanly."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then exiting.")
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


# ---------------------------------------------------------------------------------------------
# State and steps.


def _initializer(model, tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
    dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)  # parameter shapes do not depend on H, W

    def init(key: jax.Array) -> TrainState:
        variables = model.init({"params": key, "dropout": key}, dummy, train=False)
        return TrainState.create(dict(variables), tx.init(variables["params"]))

    return init


def optimizer_for(
    config: ml_collections.ConfigDict, model
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser of `config.train` for `model`'s parameters (their shapes only)."""
    params = jax.eval_shape(_initializer(model, optax.identity()), jax.random.PRNGKey(0)).params
    return optim.make_optimizer(config.train, params)


def abstract_state(
    model, tx: optax.GradientTransformation, mesh: Mesh, rule: str = "replicated"
) -> TrainState:
    """The state's shapes, dtypes and shardings (`train.state_sharding`), without computing it."""
    abstract = jax.eval_shape(_initializer(model, tx), jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        parallel.state_shardings(abstract, mesh, rule),
    )


def init_state(
    config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Initialises variables (on device, with the state's shardings) and the optimiser state;
    loads the ImageNet backbone when `model.pretrained` names a file."""
    rule = config.train.state_sharding
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state(model, tx, mesh, rule))
    state = jax.jit(_initializer(model, tx), out_shardings=shardings)(
        jax.random.PRNGKey(config.seed)
    )
    if config.model.pretrained:
        from hemnet_jax import weights  # torch / safetensors only when asked for

        variables = weights.load_pretrained(
            jax.device_get(state.variables), config.model.pretrained, stem=config.model.stem
        )
        variables = jax.device_put(variables, parallel.state_shardings(variables, mesh, rule))
        state = state.replace(
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            bases=variables["bases"],
        )
    return state


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
) -> Callable:
    """jit((state, batch, key) -> (state, metrics)) with the batch sharded over `data`."""
    aux_weight = config.model.aux_loss_weight

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
            ce = losses.cross_entropy(outputs["logits"], batch["label"])
            total = ce
            if "aux_logits" in outputs:
                total = total + aux_weight * losses.cross_entropy(
                    outputs["aux_logits"], batch["label"]
                )
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
        in_shardings=(state_sharding, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


# ---------------------------------------------------------------------------------------------
# Data.


def _data_dirs(config: ml_collections.ConfigDict) -> dict[str, str | None]:
    return {"data_dir": config.data.data_dir or None, "manual_dir": config.data.manual_dir or None}


def prepare_data(config: ml_collections.ConfigDict) -> None:
    """Builds the dataset if it is not built yet: process 0 first, then (where hosts do not share
    the data_dir) each other process, so no two processes build into one folder at once."""
    if jax.process_index() == 0:
        prepare.prepare_dataset(config.data.name, **_data_dirs(config))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("hemnet_jax: dataset prepared by process 0")
        if jax.process_index() != 0:
            prepare.prepare_dataset(config.data.name, **_data_dirs(config))


def train_batches(config: ml_collections.ConfigDict, mesh: Mesh, start_step: int) -> Iterator:
    """This process's share of each global training batch, from `start_step` on."""
    info = datasets.get_dataset_info(config.data.name)
    ds = pipeline.make_train_dataset(
        name=info.name,
        split=config.data.train_split or info.train_split,
        per_process_batch_size=parallel.per_process_batch_size(config.train.batch_size, mesh),
        crop_size=config.data.crop_size,
        scales=tuple(config.data.scales),
        seed=config.seed,
        start_step=start_step,
        shuffle_buffer=config.data.shuffle_buffer,
        **_data_dirs(config),
    )
    return ds.as_numpy_iterator()


def eval_batches(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Iterator, int]:
    """This process's share of the evaluation split (whole, padded images) and the batch count."""
    info = datasets.get_dataset_info(config.data.name)
    ds, num_batches = pipeline.make_eval_dataset(
        name=info.name,
        split=config.data.eval_split or info.eval_split,
        per_process_batch_size=parallel.per_process_batch_size(config.eval.batch_size, mesh),
        pad_size=config.data.eval_pad_size,
        **_data_dirs(config),
    )
    if config.eval.max_batches:
        ds, num_batches = (
            ds.take(config.eval.max_batches),
            min(num_batches, config.eval.max_batches),
        )
    return ds.as_numpy_iterator(), num_batches


@functools.lru_cache(maxsize=8)
def _single_scale_eval_step(model, num_iters: int | None, num_classes: int, mesh: Mesh):
    """One compiled evaluation step per (model, T_eval, mesh), reused by periodic validation."""
    predictor = evaluation.single_scale_predictor(model, num_iters=num_iters)
    return evaluation.make_eval_step(predictor, num_classes, mesh)


def validate(
    config,
    model,
    variables,
    mesh,
    num_classes: int,
    *,
    num_iters: int | None = None,
    predictor=None,
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of `variables` on the evaluation split."""
    if predictor is None:
        step = _single_scale_eval_step(model, num_iters, num_classes, mesh)
    else:
        step = evaluation.make_eval_step(predictor, num_classes, mesh)
    batches, _ = eval_batches(config, mesh)
    confusion = evaluation.accumulate_confusion(step, variables, batches, mesh, num_classes)
    result = metrics.segmentation_metrics(confusion)
    result["confusion"] = confusion
    return result


# ---------------------------------------------------------------------------------------------
# The loop.


def _check_finite(finite: jax.Array, first_step: int, last_step: int, ckpt_step) -> None:
    if not bool(finite):
        raise FloatingPointError(
            f"The training loss became NaN or Inf between steps {first_step} and {last_step}. "
            f"Training stopped without saving; the last good checkpoint is step {ckpt_step}. "
            "Lower train.learning_rate, check the data, or train in float32 (model.dtype)."
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh: Mesh | None = None,
    stop_after: int | None = None,
) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest checkpoint.

    Args:
      mesh: devices to use (default: every device of every process).
      stop_after: stop after this many steps of this invocation, saving a checkpoint as a
        preemption would (a later call resumes).
    Returns:
      The final training state.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    info = datasets.get_dataset_info(config.data.name)
    prepare_data(config)
    num_steps = config.train.num_steps
    model = create_model(config.model, info.num_classes)

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    ckpt = checkpointing.Checkpointer(
        f"{workdir}/checkpoints",
        every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
    )
    meta = checkpointing.run_metadata(config)

    tx, schedule = optimizer_for(config, model)
    latest = ckpt.latest_step()
    if latest is None:
        state = init_state(config, model, tx, mesh)
        logging.info("Initialised a new run in %s.", workdir)
        writer.write_hparams(_flat_hparams(config))
    else:
        rule = config.train.state_sharding
        state, _ = ckpt.restore(abstract_state(model, tx, mesh, rule), config, latest)
        logging.info("Resumed from the checkpoint of step %d in %s.", latest, workdir)
    start_step = int(state.step)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "%s: %.2fM parameters; %d devices in %d processes; global batch %d.",
        config.model.backbone,
        num_params / 1e6,
        mesh.devices.size,
        jax.process_count(),
        config.train.batch_size,
    )

    train_step = make_train_step(model, tx, schedule, config, mesh)
    key = jax.device_put(jax.random.PRNGKey(config.seed + 1), parallel.replicated(mesh))
    batches = train_batches(config, mesh, start_step)
    hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
    if config.train.profile and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))

    loop = _Loop(config, mesh, model, info, writer, ckpt, meta, latest)
    if config.train.grad_flow_every:
        loop.grad_flow = _grad_flow_probe(config, model, mesh)
    try:
        state = loop.run(state, train_step, batches, key, hooks, stop_after)
    finally:
        ckpt.close()  # lets a save in flight finish, whatever happened
        writer.flush()
    return state


def _grad_flow_probe(config, model, mesh: Mesh) -> tuple[Callable, dict[str, jax.Array]]:
    """Per-HEM-layer input-gradient magnitudes (Fig. 3(d) over training) on a fixed batch: the
    first batch of the training stream, the same whenever the run is resumed."""
    from hemnet_jax.studies import gradient_flow

    probe = jax.jit(
        functools.partial(gradient_flow.layer_gradient_metrics, model),
        out_shardings=parallel.replicated(mesh),
    )
    return probe, parallel.global_batch(next(train_batches(config, mesh, 0)), mesh)


class _Loop:
    """The step loop's bookkeeping: logging windows, finiteness, checkpoints, validation."""

    def __init__(self, config, mesh, model, info, writer, ckpt, meta, last_saved):
        self.config, self.mesh, self.model, self.info = config, mesh, model, info
        self.writer, self.ckpt, self.meta = writer, ckpt, meta
        self.last_saved = last_saved
        self.grad_flow: tuple[Callable, dict] | None = None  # (jitted probe, fixed batch)

    def run(self, state, train_step, batches, key, hooks, stop_after) -> TrainState:
        t = self.config.train
        step = int(state.step)
        last_stop = t.num_steps if stop_after is None else min(t.num_steps, step + stop_after)
        window: list[dict[str, jax.Array]] = []
        window_start, finite = step, jnp.array(True)
        with PreemptionWatcher() as preemption:
            while step < last_stop:
                state, step_metrics = train_step(
                    state, parallel.global_batch(next(batches), self.mesh), key
                )
                step += 1
                # Dispatched, not waited for: the host syncs only where it logs or saves.
                finite &= jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(
                    step_metrics["param_norm"]
                )
                window.append(step_metrics)
                for hook in hooks:
                    hook(step)
                preempted = preemption.requested or self.ckpt.reached_preemption(step)
                final = step == last_stop or preempted
                save = final or step % max(t.checkpoint_every, 1) == 0
                if save or step % t.log_every == 0:
                    _check_finite(finite, window_start, step, self.last_saved)
                    self._write_window(step, window)
                    window, window_start = [], step
                if save:
                    self.ckpt.save(step, state, self.meta, force=final)
                    self.last_saved = step
                if t.eval_every and step % t.eval_every == 0 and step < t.num_steps:
                    self._validate(step, state)
                if self.grad_flow and step % t.grad_flow_every == 0:
                    probe, fixed_batch = self.grad_flow
                    values = jax.device_get(probe(state.variables, fixed_batch))
                    self.writer.write_scalars(step, {k: float(v) for k, v in values.items()})
                if preempted:
                    logging.warning("Stopped at step %d after a preemption notice.", step)
                    return state
        if step == t.num_steps:
            self._validate(step, state)
        return state

    def _write_window(self, step: int, window: list[dict[str, jax.Array]]) -> None:
        """Writes the means of the metrics of the steps since the last write."""
        if window:
            summary = jax.device_get(window)
            means = {k: float(np.mean([m[k] for m in summary])) for k in summary[0]}
            self.writer.write_scalars(step, means)

    def _validate(self, step: int, state: TrainState) -> None:
        info = self.info
        result = validate(self.config, self.model, state.variables, self.mesh, info.num_classes)
        self.writer.write_scalars(
            step, {"val_miou": result["miou"], "val_pixel_accuracy": result["pixel_accuracy"]}
        )
        logging.info(
            "Validation at step %d:\n%s", step, metrics.format_table(result, info.class_names)
        )


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}

    def visit(prefix: str, node) -> None:
        for k, v in node.items():
            if isinstance(v, ml_collections.ConfigDict):
                visit(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)

    visit("", config)
    return flat
