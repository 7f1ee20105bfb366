"""Studies of trained or initialised models.

`layer_gradients`: per-HEM-layer gradient magnitudes and the ELBO per iteration (Fig. 3), as
  functions of arrays or of the full network (also the training loop's `grad_flow` probe).
`gradient_flow`: the Fig. 3 program (`python -m hemnet_jax.studies.gradient_flow`).
`figures`: their plots (matplotlib is imported only when a figure is drawn).
"""
