"""Whole-image evaluation: predictors and a confusion matrix over a dataset, on every device.

Batches are whole images padded at the bottom and right to one canvas [B, PH, PW, 3] (zeros =
the mean colour after normalisation), with each image's real `height` and `width`. Padding
pixels carry the ignore label, so whatever a predictor outputs there is never counted: every
real pixel is scored exactly once; padded examples at the end of the split are all-ignore.

The jitted step maps a sharded batch to a replicated [K, K] confusion matrix (the global
batch's), so after the loop every process holds the same totals.

Predictors map (variables, batch) to softmax probabilities [B, PH, PW, K]:
  - `single_scale_predictor`: one forward pass over the canvas (the SS numbers).
  - `multi_scale_predictor`: the average of the probabilities of several views (MS + flip).
    Each view resamples every example's *real* region only: image b's h x w pixels are resized
    (bilinear, align_corners=True like EMANet's test code) to round(h s) x round(w s) at the
    top-left of a round(PH s) x round(PW s) canvas, zero elsewhere, i.e. exactly the image
    scaled alone and padded at the bottom/right as the pipeline pads it. A flipped view mirrors
    the real columns (x -> w - 1 - x), so padding stays at the right. The view's probabilities
    are mapped back the same way (un-flipped, resized from the scaled real region onto the
    h x w real region) and are 0 on padding. Scale and flip are per-example [out, in] matrices
    applied by einsum (matmuls: fast on accelerators, shapes static, sizes dynamic); at scale
    1.0 they are the identity, so MS with scales (1.0,) and no flip equals SS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hemnet_jax.evaluation import metrics
from hemnet_jax.models import hemnet
from hemnet_jax.training import sharding

Batch = Mapping[str, jax.Array]  # "image" [B, PH, PW, 3]; "height", "width" [B] int
Predictor = Callable[[dict, Batch], jax.Array]  # (variables, batch) -> probabilities [B,PH,PW,K]

_HIGHEST = jax.lax.Precision.HIGHEST  # exact float32 resampling (TPU would round to bf16)


def single_scale_predictor(
    model: nn.Module, *, num_iters: int | None = None, masked: bool = False
) -> Predictor:
    """Softmax probabilities [B, PH, PW, K] of one forward pass over the canvas.

    masked: the model gets each example's real region (`valid_mask` of the batch's "height" and
    "width"), so the canvas's padding stays out of the HEM unit (eval.padding = "fixed").
    """

    def predict(variables: dict, batch: Batch) -> jax.Array:
        images = batch["image"]
        extra = {"valid": valid_mask(batch, images.shape[1:3])} if masked else {}
        logits = model.apply(variables, images, train=False, num_iters=num_iters, **extra)
        return jax.nn.softmax(logits["logits"].astype(jnp.float32), axis=-1)

    return predict


def valid_mask(batch: Batch, canvas: tuple[int, int]) -> jax.Array:
    """[B, PH, PW] bool: True on each example's real top-left height x width pixels."""
    return hemnet.valid_pixels(batch["height"], batch["width"], canvas)


def multi_scale_predictor(
    model: nn.Module,
    *,
    scales: Sequence[float],
    flip: bool,
    num_iters: int | None = None,
    masked: bool = False,
) -> Predictor:
    """Mean softmax probabilities [B, PH, PW, K] over `scales` (x {plain, left-right flipped}).

    See the module docstring for how each example's real region is scaled and flipped; the
    probabilities are 0 on padding. Needs the batch's "height" and "width".
    """
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"eval.scales must be positive numbers, got {scales}.")
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    forward = single_scale_predictor(model, num_iters=num_iters, masked=masked)

    def predict(variables: dict, batch: Batch) -> jax.Array:
        images = batch["image"]
        _, ph, pw, _ = images.shape
        heights, widths = batch["height"], batch["width"]
        total = None
        for scale, flipped in views:
            sh, sw = _scaled(ph, scale), _scaled(pw, scale)
            vh, vw = _scaled(heights, scale), _scaled(widths, scale)
            mirror = flip_matrices(pw, widths) if flipped else None
            rows_in = resize_matrices(sh, ph, vh, heights)
            cols_in = resize_matrices(sw, pw, vw, widths)
            cols_in = cols_in if mirror is None else _matmul(cols_in, mirror)
            view = {**batch, "image": resample(images, rows_in, cols_in),
                    "height": vh, "width": vw}  # fmt: skip
            probs = forward(variables, view)
            rows_out = resize_matrices(ph, sh, heights, vh)
            cols_out = resize_matrices(pw, sw, widths, vw)
            cols_out = cols_out if mirror is None else _matmul(mirror, cols_out)
            probs = resample(probs, rows_out, cols_out)
            total = probs if total is None else total + probs
        return total / len(views)

    return predict


def make_predictor(
    model: nn.Module, eval_config: ml_collections.ConfigDict, *, num_iters: int | None = None
) -> Predictor:
    """The predictor `config.eval` asks for: SS, or MS (+ flip) when `eval.multi_scale`;
    masked (the padding kept out of the HEM unit) unless `eval.padding` is "official"."""
    masked = padding_mode(eval_config) == "fixed"
    if not eval_config.multi_scale:
        return single_scale_predictor(model, num_iters=num_iters, masked=masked)
    return multi_scale_predictor(
        model, scales=eval_config.scales, flip=eval_config.flip, num_iters=num_iters,
        masked=masked,
    )


PADDINGS = ("fixed", "official")


def padding_mode(eval_config: ml_collections.ConfigDict) -> str:
    """`eval.padding`, checked: "fixed" or "official"."""
    if eval_config.padding not in PADDINGS:
        raise ValueError(f"eval.padding must be one of {PADDINGS}, got {eval_config.padding!r}.")
    return eval_config.padding


def mode_name(eval_config: ml_collections.ConfigDict) -> str:
    """"ss", "ms" or "ms_flip": how `eval_config` tests, for tables and file names."""
    if not eval_config.multi_scale:
        return "ss"
    return "ms_flip" if eval_config.flip else "ms"


# ---------------------------------------------------------------------------------------------
# Per-example resampling matrices.


def resize_matrices(out_len: int, in_len: int, out_valid: jax.Array,
                    in_valid: jax.Array) -> jax.Array:
    """[B, out_len, in_len] float32: per example, bilinear resampling (align_corners=True) of
    entries [0, in_valid) onto [0, out_valid); rows from out_valid on are 0.

    Row o samples input position o (in_valid - 1) / (out_valid - 1) (0 when out_valid == 1),
    as `models.resize.interpolation_matrix(out_valid, in_valid)` does. out_valid, in_valid:
    int [B], at most out_len / in_len; 0 (a padding example) gives all zeros.
    """
    n_out = jnp.asarray(out_valid, jnp.float32)[:, None]
    n_in = jnp.asarray(in_valid, jnp.float32)[:, None]
    o = jnp.arange(out_len, dtype=jnp.float32)[None, :]
    ratio = jnp.where(n_out > 1, (n_in - 1) / jnp.maximum(n_out - 1, 1), 0.0)
    pos = o * ratio  # [B, out_len]
    last = jnp.maximum(n_in - 1, 0)
    lo = jnp.minimum(jnp.floor(pos), last)
    hi = jnp.minimum(lo + 1, last)
    frac = (pos - lo)[..., None]
    w = (1 - frac) * jax.nn.one_hot(lo.astype(jnp.int32), in_len) + frac * jax.nn.one_hot(
        hi.astype(jnp.int32), in_len
    )
    return jnp.where((o < n_out)[..., None], w, 0.0)


def flip_matrices(length: int, valid: jax.Array) -> jax.Array:
    """[B, length, length] permutations mirroring entries [0, valid) (x -> valid - 1 - x) and
    keeping the rest in place; each is its own inverse."""
    x = jnp.arange(length)[None, :]
    valid = jnp.asarray(valid)[:, None]
    source = jnp.where(x < valid, valid - 1 - x, x)
    return jax.nn.one_hot(source, length, dtype=jnp.float32)


def resample(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> [B, H', W', C] = rows [B, H', H] . x . cols [B, W', W]^T, in float32."""
    x = jnp.einsum("boh,bhwc->bowc", rows, x.astype(jnp.float32), precision=_HIGHEST)
    return jnp.einsum("bpw,bowc->bopc", cols, x, precision=_HIGHEST)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _scaled(size, scale: float):
    """round(size * scale) half up, at least 1 for a non-empty size; Python ints stay static
    (canvas sizes), arrays stay arrays (per-example sizes; 0 for padding examples)."""
    if isinstance(size, int):
        return max(int(size * scale + 0.5), 1)
    scaled = jnp.maximum(jnp.floor(size * scale + 0.5).astype(jnp.int32), 1)
    return jnp.where(size > 0, scaled, 0)


# ---------------------------------------------------------------------------------------------
# The step and the loop.


def make_eval_step(predict: Predictor, num_classes: int, mesh: Mesh | None) -> Callable:
    """jit((variables, batch) -> confusion [K, K] int32), batch sharded, result replicated;
    mesh None: a plain jit on the device of its inputs (one image of the official padding; each
    new shape compiles anew)."""

    def step(variables: dict, batch: Batch) -> jax.Array:
        predictions = jnp.argmax(predict(variables, batch), axis=-1)
        return metrics.confusion_matrix(batch["label"], predictions, num_classes)

    if mesh is None:
        return jax.jit(step)
    return jax.jit(step, out_shardings=sharding.replicated(mesh))


def accumulate_confusion(
    eval_step: Callable, variables: dict, batches: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh | None, num_classes: int,
) -> np.ndarray:
    """Sums the step's matrices over `batches` (this process's shards) in int64 on the host.

    The next batch is dispatched before the previous matrix is fetched, so the host never waits
    on the device between batches. mesh None (the official padding's per-image steps): each
    batch goes to this process's first device as it is; the distinct shapes are logged.
    """
    total = np.zeros((num_classes, num_classes), np.int64)
    pending = None
    shapes = set()
    for local in batches:
        if mesh is None:
            shapes.add(local["image"].shape)
            arrays = {k: v for k, v in local.items() if v.dtype.kind not in "OSU"}  # no ids
            current = eval_step(variables, jax.device_put(arrays, jax.local_devices()[0]))
        else:
            current = eval_step(variables, sharding.global_batch(local, mesh))
        if pending is not None:
            total += np.asarray(pending)
        pending = current
    if pending is not None:
        total += np.asarray(pending)
    if shapes:
        logging.info("Evaluated %d distinct padded shapes (one compile each).", len(shapes))
    return total


def sum_over_processes(confusion: np.ndarray) -> np.ndarray:
    """The sum of every process's int64 matrix (each evaluated its own images), on all.
    Gathered as two int32 halves (JAX without x64 has no int64), so the counts stay exact."""
    if jax.process_count() == 1:
        return confusion
    halves = np.stack([confusion >> 30, confusion & (2**30 - 1)]).astype(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(halves), np.int64).sum(axis=0)
    return (gathered[0] << 30) + gathered[1]
