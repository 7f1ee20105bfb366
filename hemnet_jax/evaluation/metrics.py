"""Segmentation metrics from a confusion matrix: the code train.py's validation and eval.py share.

Conventions (the standard ones of VOC/Context/COCO-Stuff benchmarks):
  - rows are ground truth, columns are predictions; pixels labelled `ignore_label` are not counted;
  - IoU_c = TP_c / (TP_c + FP_c + FN_c);
  - a class absent from both the ground truth and the predictions (TP + FP + FN = 0) has an
    undefined IoU (NaN) and is excluded from the mean;
  - pixel accuracy = trace / total.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hemnet_jax.data.classes import IGNORE_LABEL


def confusion_matrix(
    labels: jax.Array, predictions: jax.Array, num_classes: int, ignore_label: int = IGNORE_LABEL
) -> jax.Array:
    """[K, K] int32 counts of (ground truth, prediction) over the pixels not ignored.

    Args:
      labels, predictions: integer arrays of one shape, e.g. [B, H, W].
    Labels outside [0, K) are not counted; the dataset builders reject them at build time.
    """
    labels = labels.reshape(-1).astype(jnp.int32)
    predictions = predictions.reshape(-1).astype(jnp.int32)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    index = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(valid.astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict[str, object]:
    """mIoU, pixel accuracy and per-class IoU (NaN where undefined) from a [K, K] matrix."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = confusion.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "per_class_iou": iou,
        "num_pixels": int(total),
    }


def format_table(metrics: dict[str, object], class_names: Sequence[str]) -> str:
    """A plain-text table of per-class IoU with the summary lines, for logs and eval.py."""
    iou = metrics["per_class_iou"]
    width = max(len("class"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    for name, value in zip(class_names, iou, strict=True):
        lines.append(f"{name:<{width}}  {'-' if np.isnan(value) else f'{100 * value:6.2f}'}")
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}  {100 * metrics['miou']:6.2f}")
    lines.append(f"{'pixel acc.':<{width}}  {100 * metrics['pixel_accuracy']:6.2f}")
    return "\n".join(lines)
