"""The paper's Fig. 4: what the bases attend to, iteration by iteration, for one image.

    python -m hemnet_jax.evaluation.visualize --config configs/voc.py --workdir DIR \
        --image IMG.jpg --output fig4.png [--label LABEL.png] [--bases 3,17,40] \
        [--channels 5,100,311]

Writes one PNG grid. Top row: the image, the prediction (VOC colours), the label if given, and
the chosen channels of X (the HEM unit's input features, after its 1x1 conv). One row per
chosen basis k / channel c: the attention map gamma[:, k] after each HEM iteration t = 1..T
(left), and channel c of the reconstruction X_tilde^(t) = gamma^(t) mu^(t) (right; at t = T
this is the unit's X_tilde, eq. 10). Maps are at the feature resolution (1/8 of the image at
output stride 8); each row shares one colour scale so sharpening over t shows. All of it is
read from the HEM unit's `intermediates` (gamma, mu, x_tilde) and its captured conv_in output.
By default the bases shown are the ones with the most attention mass whose maps differ
(`hem_diagnostics.select_bases`: a map correlating above 0.95 with one already chosen is a
duplicate; the program says when fewer distinct bases exist than asked), and the channels of
X_tilde with the largest variance at t = T. Every row has a colour bar with its value range; the
title names the image, the variant (HEMNet / EMANet and eta), T and the bases shown.
T = `eval.num_iters` (default T_train). The image is run as evaluation runs it: on its canvas,
the HEM unit masked to its real region (`eval.padding` "fixed"), so padding is never a pixel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from hemnet_jax import cli, config_check, hem, hem_diagnostics, storage
from hemnet_jax.data import augment, palette
from hemnet_jax.errors import UserError
from hemnet_jax.evaluation import predict, predictors
from hemnet_jax.evaluation.predict import ImageReadError, read_image
from hemnet_jax.models import hemnet
from hemnet_jax.training import sharding, state

PROGRAM = "python -m hemnet_jax.evaluation.visualize"  # as named in one-line errors

NUM_SHOWN = 3  # rows of the grid when --bases / --channels are not given


class IndexSelectionError(ValueError, UserError):
    """A chosen basis or channel index is out of range."""


def hem_pictures(model, variables: dict, rgb: np.ndarray,
                 config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Runs one image as evaluation does and returns what Fig. 4 shows, as numpy arrays.

    The image is predicted on evaluation's canvas (`predict.canvas_batch`), the HEM unit masked
    to its real region where `eval.padding` is "fixed" (padding is never a pixel: the maps do
    not depend on the canvas size), at T = `eval.num_iters`. The maps are cut to the image's
    feature positions, the official evaluation's grid: h = (P - 1) / stride + 1 for the image
    padded to P >= H with P % stride == 1 (24 -> 4 at stride 8), w likewise.

    Args:
      rgb: uint8 [H, W, 3].
    Returns:
      {"prediction": int [H, W], "gamma": [T, h, w, K] (after each iteration),
       "x": [h, w, C] (the unit's input X), "x_tilde": [T, h, w, C] (gamma^(t) mu^(t))}.
    """
    masked = predictors.padding_mode(config.eval) == "fixed"
    stride = config.model.output_stride
    height, width = rgb.shape[:2]
    h, w = ((augment.official_padded_size(n, stride) - 1) // stride + 1 for n in (height, width))

    def run(v: dict, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        image = batch["image"]
        valid = hemnet.valid_pixels(batch["height"], batch["width"], image.shape[1:3])
        outputs, state = model.apply(
            v, image, train=False, num_iters=config.eval.num_iters, mutable=["intermediates"],
            capture_intermediates=lambda mdl, method: mdl.name == "conv_in"
            and method == "__call__", **({"valid": valid} if masked else {}),
        )
        sown = state["intermediates"]["hem"]
        gamma, mu = sown["gamma"][0][:, 0], sown["mu"][0][:, 0]  # [T, h', w', K], [T, K, C]
        t, fh, fw, k = gamma.shape
        x_tilde = hem.r_step(gamma.reshape(t, fh * fw, k), mu).reshape(t, fh, fw, -1)
        return {"prediction": jnp.argmax(outputs["logits"][0], axis=-1), "gamma": gamma,
                "x": sown["conv_in"]["__call__"][0][0], "x_tilde": x_tilde}

    out = jax.device_get(jax.jit(run)(variables, predict.canvas_batch(rgb, config)))
    return {"prediction": out["prediction"][:height, :width], "gamma": out["gamma"][:, :h, :w],
            "x": out["x"][:h, :w], "x_tilde": out["x_tilde"][:, :h, :w]}


def default_bases(gamma: np.ndarray, count: int = NUM_SHOWN) -> hem_diagnostics.Selection:
    """Up to `count` well-used bases whose attention maps differ, most attention mass first
    (`hem_diagnostics.select_bases` on the last iteration's maps). gamma: [T, h, w, K]."""
    return hem_diagnostics.select_bases(gamma[-1], count)


def default_channels(x_tilde: np.ndarray, count: int = NUM_SHOWN) -> list[int]:
    """The `count` channels of X_tilde varying most over the image at the last iteration."""
    return [int(c) for c in np.argsort(-x_tilde[-1].var((0, 1)), kind="stable")[:count]]


def describe_variant(model_config) -> str:
    """"HEMNet (eta 0.5, dot kernel, K 64)" or "EMANet (eta 1, ..., L2-normalised, no EM
    gradient)": the HEM unit as `model_config` sets it."""
    m = model_config
    emanet = m.step_size == 1.0 and m.stop_em_gradient and m.l2_normalize
    extras = [f"eta {m.step_size:g}", f"{m.kernel} kernel", f"K {m.num_bases}"]
    if m.l2_normalize and not emanet:
        extras.append("L2-normalised bases")
    if m.stop_em_gradient and not emanet:
        extras.append("no EM gradient")
    return f"{'EMANet' if emanet else 'HEMNet'} ({', '.join(extras)})"


def attention_grid(
    rgb: np.ndarray, pictures: dict[str, np.ndarray], *, bases: Sequence[int],
    channels: Sequence[int], label: np.ndarray | None = None, title: str = "",
):
    """The Fig. 4 grid as a matplotlib Figure (see the module docstring for the layout).

    Every map has a colour bar with its value range (one per row of iterations, which share
    it); the label panel is there only when a label is given.

    Args:
      rgb: uint8 [H, W, 3]. pictures: `hem_pictures`' output. label: [H, W] class indices.
      bases: indices into K. channels: indices into C. title: the figure's title.
    Raises:
      IndexSelectionError: an index out of range.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    gamma, x, x_tilde = pictures["gamma"], pictures["x"], pictures["x_tilde"]
    num_iters, num_bases, num_channels = gamma.shape[0], gamma.shape[-1], x.shape[-1]
    _check_indices("bases", bases, num_bases)
    _check_indices("channels", channels, num_channels)
    header = [("image", rgb), ("prediction", palette.colorize(pictures["prediction"]))]
    if label is not None:
        header.append(("label", palette.colorize(label)))
    header += [(f"X[:, {c}]", x[..., c]) for c in channels]
    rows = max(len(bases), len(channels))
    cols = max(2 * num_iters, len(header))
    fig, axes = plt.subplots(1 + rows, cols, figsize=(2.1 * cols, 1.9 * (1 + rows)),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, picture) in zip(axes[0], header, strict=False):
        shown = ax.imshow(picture, cmap=None if picture.ndim == 3 else "viridis")
        ax.set_title(name, fontsize=8)
        if picture.ndim == 2:
            _colour_bar(fig, shown, [ax], picture.min(), picture.max())
    for r in range(rows):
        if r < len(bases):
            maps = gamma[..., bases[r]]
            _map_row(fig, axes[1 + r, :num_iters], maps, 0.0, float(maps.max()),
                     f"gamma[:, {bases[r]}]")
        if r < len(channels):
            maps = x_tilde[..., channels[r]]
            _map_row(fig, axes[1 + r, num_iters:2 * num_iters], maps, float(maps.min()),
                     float(maps.max()), f"X_tilde[:, {channels[r]}]")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _map_row(fig, axes, maps: np.ndarray, low: float, high: float, name: str) -> None:
    """maps [T, h, w] on `axes`, one colour scale [low, high] and one colour bar for the row."""
    for t, ax in enumerate(axes):
        shown = ax.imshow(maps[t], cmap="viridis", vmin=low, vmax=high)
        ax.set_title(f"{name} t={t + 1}", fontsize=8)
    _colour_bar(fig, shown, list(axes), low, high)


def _colour_bar(fig, shown, axes, low: float, high: float) -> None:
    """A colour bar beside `axes` labelled with the range's ends."""
    bar = fig.colorbar(shown, ax=axes, fraction=0.05, pad=0.02, ticks=[low, high])
    bar.ax.set_yticklabels([f"{low:.3g}", f"{high:.3g}"], fontsize=7)


def save_attention_grid(path: str | os.PathLike, rgb: np.ndarray,
                        pictures: dict[str, np.ndarray], **kwargs) -> None:
    """Writes `attention_grid(rgb, pictures, **kwargs)` as a PNG."""
    from matplotlib import pyplot as plt

    fig = attention_grid(rgb, pictures, **kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_indices(spec: str) -> list[int]:
    """"3,17,40" -> [3, 17, 40]; "" -> []."""
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"Expected comma-separated integers, got {spec!r}.") from e


def read_label(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """Class indices [H, W] of a label PNG (palette indices, as VOC's), checked against `size`.

    Raises:
      ImageReadError: unreadable, or not a [H, W] index image of `size`.
    """
    try:
        with Image.open(path) as image:
            label = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"Cannot read label {str(path)!r}: {e}") from e
    if label.shape != tuple(size):
        raise ImageReadError(f"Label {str(path)!r} is {label.shape}, the image {tuple(size)}: "
                             "expected an index PNG ('P' or 'L' mode) of the image's size.")
    return label


def _check_indices(what: str, indices: Sequence[int], size: int) -> None:
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise IndexSelectionError(f"--{what} {bad} out of range: the model has {size} {what} "
                         f"(indices 0..{size - 1}).")


def _define_flags() -> None:
    cli.define_config_flag("A configs/*.py file (with :variant): the config it was trained with.")
    cli.define_checkpoint_flags()
    flags.DEFINE_string("image", None, "The image to show.")
    flags.DEFINE_string("label", None, "Optional: its label, a PNG of class indices (VOC style).")
    flags.DEFINE_string("output", None, "The PNG to write.")
    flags.DEFINE_string("bases", "", "Comma-separated basis indices (default: up to 3 most used "
                        "with distinct attention maps).")
    flags.DEFINE_string("channels", "", "Comma-separated channel indices (default: the 3 of "
                        "X_tilde with the largest variance).")
    flags.mark_flags_as_required(["image", "output"])


def main(argv: list[str]) -> None:
    cli.no_extra_arguments(argv)
    cli.require_checkpoint_source()
    FLAGS = flags.FLAGS
    cli.quiet_library_logs()
    try:
        bases, channels = parse_indices(FLAGS.bases), parse_indices(FLAGS.channels)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    output = config_check.expand_path(FLAGS.output)
    storage.require_local(PROGRAM, {"--image": FLAGS.image, "--label": FLAGS.label,
                                    "--output": output})
    for key in ("workdir", "checkpoint"):  # may be gs://
        storage.check_bucket(FLAGS[key].value, f"--{key}")
    config_check.check(FLAGS.config, folders={"--output": os.path.dirname(output) or "."})
    rgb = read_image(FLAGS.image)
    label = read_label(FLAGS.label, rgb.shape[:2]) if FLAGS.label else None
    restored = state.restore_for_eval(
        FLAGS.config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
        mesh=sharding.create_mesh(jax.local_devices()[:1]),
    )
    pictures = hem_pictures(restored.model, restored.variables, rgb, FLAGS.config)
    if not bases:
        selection = default_bases(pictures["gamma"])
        bases = selection.indices
        if selection.short:
            print(f"Only {len(bases)} of the {pictures['gamma'].shape[-1]} bases have distinct, "
                  f"used attention maps on this image (asked for {selection.requested}): "
                  f"showing {bases}.", flush=True)
    title = (f"{os.path.basename(FLAGS.image)}: {describe_variant(FLAGS.config.model)}, "
             f"T={pictures['gamma'].shape[0]}, bases {', '.join(map(str, bases))}")
    save_attention_grid(
        output, rgb, pictures, label=label, bases=bases, title=title,
        channels=channels or default_channels(pictures["x_tilde"]),
    )
    print(f"Wrote {output} (checkpoint {restored.path}).")


if __name__ == "__main__":
    cli.run(main, _define_flags)
