"""Gradient flow through the unrolled HEM layers with `jax.grad`: the paper's Fig. 3 (eq. 14-18).

Each HEM layer t reads the features X twice: in its E-step (gamma^(t) from mu^(t-1), eq. 8) and
in its N-step (mu^(t) = (1 - eta) mu^(t-1) + eta F_EM(mu^(t-1), X), eq. 13). Giving every read its
own zero-valued copy of X (`hem.unrolled_hem(layer_offsets=...)`) splits dL/dX exactly into 2T
per-layer shares that sum to it (eq. 16-17). Ignoring the E-step's shares, eq. 18 predicts that
layer t's N-step share is proportional to eta (1 - eta)^(T - t).

Three levels, one summary (`summarize`: mean absolute values over every element, as in Fig. 3):
  per_layer_input_gradients  arrays in (X, mu0, a loss on X_tilde), for notebooks.
  model_layer_gradients      the HEM unit inside HEMNet (backbone, head, cross-entropy), one
                             batch; `layer_gradient_metrics` is its training-time hook.
  the program                a fixed set of training crops and a list of eta values, at
                             initialisation or from a checkpoint; writes CSV, JSON and a PNG:

  python -m hemnet_jax.studies.gradient_flow --config configs/voc.py [--workdir DIR] \\
      [--output_dir DIR] [--config.study.num_images=100 ...]

Importing this module loads neither TensorFlow nor matplotlib (the program does, when it needs).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from hemnet_jax import hem, losses
from hemnet_jax.models import HEMNet

HEM_SCOPE = "hem"  # HEMNet's attribute (so module name) for its HEM unit
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


# ---------------------------------------------------------------------------------------------
# The program: fixed training crops, several eta, at initialisation or from a checkpoint.


def fixed_training_crops(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The study's images: the first `study.num_images` crops of the training stream of seed
    `study.seed` (random scale, crop and flip as in training). {"image", "label"} numpy."""
    from hemnet_jax.data import datasets, pipeline  # TensorFlow

    info = datasets.get_dataset_info(config.data.name)
    ds = pipeline.make_train_dataset(
        name=info.name,
        split=config.data.train_split or info.train_split,
        data_dir=config.data.data_dir or None,
        manual_dir=config.data.manual_dir or None,
        per_process_batch_size=config.study.num_images,
        crop_size=config.data.crop_size,
        scales=tuple(config.data.scales),
        seed=config.study.seed,
        shuffle_buffer=config.data.shuffle_buffer,
        process_index=0,
        process_count=1,
    )
    batch = next(ds.as_numpy_iterator())
    return {"image": batch["image"], "label": batch["label"]}


def load_variables(
    config: ml_collections.ConfigDict, model: HEMNet, workdir: str | None, mesh: Mesh
) -> tuple[dict[str, Any], int]:
    """(variables, step): the checkpoint of step `study.checkpoint_step` (default: the latest)
    in <workdir>/checkpoints, or without one a fresh initialisation (seed, model.pretrained)."""
    from hemnet_jax import checkpointing, trainer

    directory = os.path.join(workdir, "checkpoints") if workdir else ""
    ckpt = None
    if os.path.isdir(directory):
        ckpt = checkpointing.Checkpointer(directory, read_only=True)
    latest = None if ckpt is None else ckpt.latest_step()
    step = config.study.checkpoint_step
    if latest is None and step is not None:
        raise FileNotFoundError(f"study.checkpoint_step={step}, but no checkpoint in {workdir!r}.")
    tx, _ = trainer.optimizer_for(config, model)
    if latest is None:
        return trainer.init_state(config, model, tx, mesh).variables, 0
    state, _ = ckpt.restore(trainer.abstract_state(model, tx, mesh), config, step)
    ckpt.close()
    return state.variables, int(state.step)


def run_study(
    config: ml_collections.ConfigDict,
    model: HEMNet,
    variables: Mapping[str, Any],
    batch: Mapping[str, np.ndarray],
    mesh: Mesh | None = None,
) -> list[dict[str, Any]]:
    """`model_layer_gradients` per eta of `study.step_sizes`, averaged over the images in
    batches of `study.batch_size` (sharded over `mesh` where it divides). Same weights for
    every eta. Returns one dict per eta: "eta" and the summary's keys as numpy."""
    from hemnet_jax import parallel

    study = config.study
    rng = jax.random.PRNGKey(study.seed)
    images, labels = batch["image"], batch["label"]
    results = []
    for eta in study.step_sizes:
        fn = jax.jit(functools.partial(
            model_layer_gradients, model.clone(hem=model.hem.clone(step_size=float(eta))),
            num_iters=study.num_iters, train=study.train_mode,
        ))
        sums: dict[str, np.ndarray] = {}
        for start in range(0, len(images), study.batch_size):
            chunk = (images[start:start + study.batch_size], labels[start:start + study.batch_size])
            if mesh is not None and len(chunk[0]) % mesh.devices.size == 0:
                chunk = jax.device_put(chunk, parallel.batch_sharding(mesh))
            out = jax.device_get(fn(variables, *chunk, rng=rng))
            for k in SUMMARY_KEYS:
                sums[k] = sums.get(k, 0.0) + len(chunk[0]) * np.asarray(out[k], np.float64)
        results.append({"eta": float(eta), **{k: v / len(images) for k, v in sums.items()}})
    return results


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per (eta, layer); `total` on each eta's first row."""
    header = (f"{'eta':>5} {'layer':>5} {'ELBO':>12} {'N-step |g|':>12} {'E-step |g|':>12} "
              f"{'eq.18 N-step':>12} {'total |g|':>12}")
    rows = [header, "-" * len(header)]
    for r in results:
        for t in range(len(r["n_step"])):
            total = f"{r['total']:12.4e}" if t == 0 else ""
            rows.append(
                f"{r['eta']:5.2f} {t + 1:5d} {r['elbo'][t]:12.5e} {r['n_step'][t]:12.4e} "
                f"{r['e_step'][t]:12.4e} {r['predicted'][t]:12.4e} {total}".rstrip()
            )
    return "\n".join(rows)


def plot_fig3(results: Sequence[Mapping[str, Any]], path: str, title: str = "") -> None:
    """Fig. 3's panels: (a) ELBO per iteration, (b) N-step and (c) E-step gradient per layer
    (dashed: eq. 18's profile), per eta; (d) the total gradient to X against eta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    (ax_a, ax_b), (ax_c, ax_d) = axes
    for r in results:
        layers = np.arange(1, len(r["n_step"]) + 1)
        label = f"eta={r['eta']:g}"
        ax_a.plot(layers, r["elbo"], "o-", label=label)
        (line,) = ax_b.plot(layers, r["n_step"], "o-", label=label)
        ax_b.plot(layers, r["predicted"], "--", color=line.get_color(), alpha=0.6)
        ax_c.plot(layers, r["e_step"], "o-", label=label)
    etas = [r["eta"] for r in results]
    ax_d.plot(etas, [r["total"] for r in results], "o-")
    for ax, name, xlabel, ylabel in (
        (ax_a, "(a) ELBO", "HEM iteration t", "ELBO (eq. 3)"),
        (ax_b, "(b) gradient to X from the N-step", "HEM layer t", "mean |dL/dX^(t)|"),
        (ax_c, "(c) gradient to X from the E-step", "HEM layer t", "mean |dL/dX^(t)|"),
        (ax_d, "(d) total gradient to X", "eta", "mean |dL/dX|"),
    ):
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for ax in (ax_a, ax_b, ax_c):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_b.legend(fontsize="small", title="dashed: eq. 18", title_fontsize="small")
    ax_a.legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(
    results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], output_dir: str
) -> dict[str, str]:
    """gradient_flow.csv (one row per eta and layer), gradient_flow.json (meta and results) and
    gradient_flow.png (Fig. 3) in `output_dir`. Returns their paths by format."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {e: os.path.join(output_dir, f"gradient_flow.{e}") for e in ("csv", "json", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["eta", "layer", "elbo", "n_step_grad", "e_step_grad",
                         "predicted_n_step_grad", "total_grad"])
        for r in results:
            for t in range(len(r["n_step"])):
                writer.writerow([r["eta"], t + 1, r["elbo"][t], r["n_step"][t], r["e_step"][t],
                                 r["predicted"][t], r["total"]])
    serialisable = [{k: np.asarray(v).tolist() for k, v in r.items()} for r in results]
    with open(paths["json"], "w") as f:
        json.dump({**meta, "results": serialisable}, f, indent=2)
    plot_fig3(results, paths["png"], title=f"{meta['dataset']}, step {meta['step']}")
    return paths


def study_meta(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    """What the JSON records about the run next to the numbers."""
    m, s = config.model, config.study
    temperature = math.sqrt(m.head_channels) if m.temperature is None else m.temperature
    return {
        "dataset": config.data.name,
        "step": step,
        "num_images": s.num_images,
        "batch_size": s.batch_size,
        "num_iters": s.num_iters or m.num_iters,
        "train_mode": s.train_mode,
        "kernel": m.kernel,
        "temperature": temperature,
        "elbo_sigma2": elbo_sigma2(temperature, m.kernel),
        "l2_normalize": m.l2_normalize,
        "stop_em_gradient": m.stop_em_gradient,
    }


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    from hemnet_jax import cli, parallel

    cli.no_extra_arguments(argv)
    from hemnet_jax.data import datasets
    from hemnet_jax.models import create_model

    cli.quiet_library_logs()
    FLAGS = flags.FLAGS
    config, workdir = FLAGS.config, FLAGS.workdir
    model = create_model(config.model, datasets.get_dataset_info(config.data.name).num_classes)
    mesh = parallel.create_mesh()
    variables, step = load_variables(config, model, workdir, mesh)
    logging.info("Gradient-flow study at step %d on %d training crops.", step,
                 config.study.num_images)
    results = run_study(config, model, variables, fixed_training_crops(config), mesh)
    output_dir = FLAGS.output_dir or os.path.join(workdir or ".", "gradient_flow", f"step_{step}")
    paths = write_results(results, study_meta(config, step), output_dir)
    print(format_table(results))
    print("\n".join(f"wrote {p}" for p in paths.values()))


def _define_flags() -> None:
    """Only when run as a program: importing this module defines no absl flags."""
    from absl import flags

    from hemnet_jax import cli

    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "A training workdir: its checkpoint is studied (else "
                        "the initialisation); results go to <workdir>/gradient_flow/step_<N>.")
    flags.DEFINE_string("output_dir", None, "Where results go instead.")


if __name__ == "__main__":
    from hemnet_jax import cli

    cli.run(main, _define_flags)
