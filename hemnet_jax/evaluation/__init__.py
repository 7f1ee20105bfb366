"""Evaluation: metrics, predictors (single scale, multi-scale + flip), validation over a split,
the eval.py runner, and the `predict` and `visualize` programs."""

from hemnet_jax import _compat

# Until 0.2 `hemnet_jax.evaluation` was the module that is now `evaluation.predictors`.
__getattr__ = _compat.moved_attributes(
    __name__,
    dict.fromkeys(
        ["Batch", "Predictor", "single_scale_predictor", "multi_scale_predictor",
         "make_predictor", "mode_name", "make_eval_step", "accumulate_confusion"],
        "hemnet_jax.evaluation.predictors",
    ),
)
