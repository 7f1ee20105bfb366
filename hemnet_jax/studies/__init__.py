"""Studies of trained or initialised models.

`layer_gradients`: per-HEM-layer gradient magnitudes and the ELBO per iteration (Fig. 3), as
  functions of arrays or of the full network (also the training loop's `grad_flow` probe).
`gradient_flow`: the Fig. 3 program (`python -m hemnet_jax.studies.gradient_flow`).
`ablation`: the Tables 1-2 program (`python -m hemnet_jax.studies.ablation`): a grid of
  train.py runs, each evaluated with a T_eval sweep; `ablation_tables`: its tables.
`figures`: their plots (matplotlib is imported only when a figure is drawn).
"""
