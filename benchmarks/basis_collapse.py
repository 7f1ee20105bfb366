"""The collapse of the bases, measured: short training runs with basis diagnostics every few steps.

Trains a config (default: the demo, configs/synthetic.py) from scratch for `--steps` steps with
the training code's own pieces (state, train step, input pipeline; the learning-rate schedule of
the config's full run) and, at step 0 and every `--every` steps, measures on a fixed
evaluation batch (the split's first):
- from the bases mu0 (`hem_diagnostics.summarize`): distinct bases (cosine clusters > 0.95),
  the largest cluster, norm mean / std, and quantiles of the pairwise cosine;
- from the last HEM iteration's attention: effective bases in use / distinguishing, distinct
  attention maps; the same effective number for the first iteration ("eff_dist_t1");
- distinct bases of mu^(T) of the batch's first image;
- the scale of the unit's features X (after conv_in): mean ||x_n|| and the norm of their mean
  over pixels and batch (how much of X is one common vector), and the spread over K of the
  unscaled logits x.mu0_k (divided by the temperature, what the first E-step's softmax sees).
`--renorm` L2-normalises mu0 after every step (a re-normalised moving average of the bases).
Prints one JSON line per measurement and writes them all to `--out`. See docs/diagnostics.md.

  python benchmarks/basis_collapse.py --steps 200 --every 50 --out base.json
  python benchmarks/basis_collapse.py --steps 200 --every 50 --set model.kernel=rbf --out rbf.json
"""

from __future__ import annotations

import argparse
import ast
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from hemnet_jax import hem, hem_diagnostics
from hemnet_jax.cli import load_config_file
from hemnet_jax.data import datasets
from hemnet_jax.evaluation.validation import eval_batches
from hemnet_jax.models import create_model
from hemnet_jax.models.hemnet import HEM_SCOPE
from hemnet_jax.training import sharding
from hemnet_jax.training.input_pipeline import prepare_data, train_batches
from hemnet_jax.training.state import init_state, optimizer_for
from hemnet_jax.training.train_step import make_train_step


def _override(config, assignment: str) -> None:
    """"model.kernel=rbf" / "model.temperature=1.0": sets a config key (Python literal or str)."""
    key, value = assignment.split("=", 1)
    *path, leaf = key.split(".")
    node = config
    for name in path:
        node = node[name]
    try:
        node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        node[leaf] = value


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/synthetic.py", help="FILE[:variant]")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE, repeatable")
    p.add_argument("--bases_init_scale", type=float, default=1.0, help="mu0 *= this at init")
    p.add_argument("--renorm", action="store_true", help="L2-normalise mu0 after every step")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    config = load_config_file(args.config)
    for assignment in args.set:
        _override(config, assignment)
    mesh = sharding.create_mesh()
    info = datasets.get_dataset_info(config.data.name)
    prepare_data(config)
    model = create_model(config.model, info.num_classes)
    tx, schedule = optimizer_for(config, model)
    state = init_state(config, model, tx, mesh)
    state = state.replace(bases=jax.tree.map(lambda b: b * args.bases_init_scale, state.bases))
    step_fn = make_train_step(model, tx, schedule, config, mesh)
    batches = train_batches(config, mesh, 0)
    images = sharding.global_batch(next(eval_batches(config, mesh)[0]), mesh)["image"]
    temperature = config.model.temperature or float(np.sqrt(config.model.head_channels))

    @jax.jit
    def probe(variables, images):
        _, st = model.apply(
            variables, images, train=False, mutable=["intermediates"],
            capture_intermediates=lambda m, method: m.name == "conv_in" and method == "__call__")
        sown = st["intermediates"][HEM_SCOPE]
        x = sown["conv_in"]["__call__"][0]  # [B, h, w, C]
        logits = jnp.einsum("bhwc,kc->bhwk", x, variables["bases"][HEM_SCOPE]["mu"])
        return {"last": hem_diagnostics.attention_stats(sown["gamma"][0][-1]),
                "first": hem_diagnostics.attention_stats(sown["gamma"][0][0]),
                "mu_t": sown["mu"][0][-1][0],
                "x_norm": jnp.mean(jnp.linalg.norm(x, axis=-1)),
                "x_mean_norm": jnp.linalg.norm(jnp.mean(x, axis=(0, 1, 2))),
                "logit_spread": jnp.mean(jnp.std(logits, axis=-1)) / temperature}

    def measure(step: int, state) -> dict:
        r = jax.device_get(probe(state.variables, images))
        mu0 = np.asarray(state.bases[HEM_SCOPE]["mu"])
        row = {"step": step, **hem_diagnostics.summarize(mu0, r["last"])}
        cosine = hem_diagnostics.cosine_similarity(mu0)[np.triu_indices(len(mu0), 1)]
        row["cosine_q10_q50_q90"] = [float(q) for q in np.quantile(cosine, [0.1, 0.5, 0.9])]
        row["eff_dist_t1"] = hem_diagnostics.effective_bases_distinguishing(r["first"])
        row["distinct_mu_t_image0"] = int(hem_diagnostics.distinct_bases(r["mu_t"]).max() + 1)
        for name in ("x_norm", "x_mean_norm", "logit_spread"):
            row[name] = float(r[name])
        print(json.dumps(row), flush=True)
        return row

    renorm = jax.jit(lambda b: jax.tree.map(hem.l2_normalize_bases, b))
    key = jax.device_put(jax.random.PRNGKey(config.seed + 1), sharding.replicated(mesh))
    start = time.time()
    rows = [measure(0, state)]
    for step in range(1, args.steps + 1):
        state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh), key)
        if args.renorm:
            state = state.replace(bases=renorm(state.bases))
        if step % args.every == 0 or step == args.steps:
            rows.append(measure(step, state) | {"loss": float(metrics["loss"])})
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "wall_s": time.time() - start}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
