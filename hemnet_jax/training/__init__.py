"""Training components: the state (creation, abstract shapes, restore), the optimiser, losses,
checkpoints, sharding, the jitted step, the input pipeline and preemption; and the import of
official EMANet checkpoints as training checkpoints (`import_official`).

The loop that drives them is `hemnet_jax.trainer`, which only `train.py` imports.
"""
