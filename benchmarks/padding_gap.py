"""How far the "fixed" evaluation padding (one canvas, padding masked out of the HEM unit) is from
the "official" one (each image padded to the next size % 8 == 1), on the whole network.

For each image size, the same random photo-like image is evaluated three ways: official (padded
to 8k + 1, no mask), fixed + mask (padded to the canvas, `eval.padding="fixed"`), and fixed
without the mask (this project before the mask). On the image's own pixels it reports the
largest logit difference to the official result, the share of pixels whose predicted class
differs, and the relative difference of the HEM unit's final bases mu^(T).

    python benchmarks/padding_gap.py [--config tests/tiny.py] [--canvas 513] [--json PATH]

Random weights (the model's own initialisation, BatchNorm at its initial statistics): no
trained checkpoint exists here. Prints a table and writes JSON (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import sys

import common
import jax
import jax.numpy as jnp
import numpy as np

from hemnet_jax import cli
from hemnet_jax.models import create_model

SIZES = ((375, 500), (500, 375), (333, 500), (281, 500))


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A normalised photo-like image [H, W, 3]: smooth gradients plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = [np.sin(xx / 17.0 + c) * np.cos(yy / 11.0) for c in range(3)]
    return (np.stack(smooth, -1) + 0.3 * rng.standard_normal((height, width, 3))).astype(
        np.float32
    )


def official_size(n: int, stride: int) -> int:
    return n + (stride + 1 - n % stride) % stride


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tests/tiny.py")
    parser.add_argument("--canvas", type=int, default=513)
    parser.add_argument("--num_classes", type=int, default=21)
    parser.add_argument("--json", default=str(common.RESULTS_DIR / "padding_gap.json"))
    args = parser.parse_args(argv)
    config = cli.load_config_file(args.config)
    stride = config.model.output_stride
    model = create_model(config.model, args.num_classes)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3)), train=False))(
        jax.random.PRNGKey(0)
    )

    @jax.jit
    def forward(images, valid):
        out, state = model.apply(
            variables, images, train=False, valid=valid, mutable=["intermediates"]
        )
        return out["logits"], state["intermediates"]["hem"]["mu"][0][-1]  # mu^(T): [B, K, C]

    @jax.jit
    def forward_unmasked(images):
        out, state = model.apply(variables, images, train=False, mutable=["intermediates"])
        return out["logits"], state["intermediates"]["hem"]["mu"][0][-1]

    rows = []
    for seed, (h, w) in enumerate(SIZES):
        image = photo(h, w, seed)
        official = np.zeros((1, official_size(h, stride), official_size(w, stride), 3), np.float32)
        official[0, :h, :w] = image
        canvas = np.zeros((1, args.canvas, args.canvas, 3), np.float32)
        canvas[0, :h, :w] = image
        valid = np.zeros((1, args.canvas, args.canvas), bool)
        valid[0, :h, :w] = True
        ref_logits, ref_mu = (np.asarray(a) for a in forward_unmasked(jnp.asarray(official)))
        ref_logits = ref_logits[0, :h, :w]
        for mode, (logits, mu) in (
            ("fixed+mask", forward(jnp.asarray(canvas), jnp.asarray(valid))),
            ("fixed", forward_unmasked(jnp.asarray(canvas))),
        ):
            logits = np.asarray(logits)[0, :h, :w]
            rows.append({
                "size": f"{h}x{w}",
                "mode": mode,
                "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
                "mean_abs_logit_diff": float(np.abs(logits - ref_logits).mean()),
                "logit_scale": float(np.abs(ref_logits).mean()),
                "pixels_class_differs_pct": float(
                    100 * np.mean(logits.argmax(-1) != ref_logits.argmax(-1))
                ),
                "bases_rel_diff": float(
                    np.linalg.norm(np.asarray(mu) - ref_mu) / np.linalg.norm(ref_mu)
                ),
            })  # fmt: skip
    columns = [
        ("size", "image", "s"), ("mode", "padding", "s"),
        ("max_abs_logit_diff", "max |dlogit|", ".2e"),
        ("mean_abs_logit_diff", "mean |dlogit|", ".2e"),
        ("logit_scale", "mean |logit|", ".2e"),
        ("pixels_class_differs_pct", "class differs %", ".3f"),
        ("bases_rel_diff", "mu_T rel. diff", ".2e"),
    ]  # fmt: skip
    print(f"{args.config}: against official padding (8k+1), canvas {args.canvas}, random weights")
    print(common.format_table(rows, columns))
    payload = {"command": " ".join(["python", "benchmarks/padding_gap.py", *argv]),
               "machine": common.machine(), "config": args.config, "canvas": args.canvas,
               "rows": rows}  # fmt: skip
    print(f"wrote {common.write_json(args.json, payload)}")


if __name__ == "__main__":
    main(sys.argv[1:])
