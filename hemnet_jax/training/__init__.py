"""Training components: the state (creation, abstract shapes, restore), the optimiser, losses,
checkpoints, sharding, the jitted step, the input pipeline, preemption and the basis diagnostics
of a model (`diagnostics`); and the import of
official EMANet checkpoints as training checkpoints (`import_official`).

The loop that drives them is `hemnet_jax.trainer`, which only `train.py` imports.
"""
