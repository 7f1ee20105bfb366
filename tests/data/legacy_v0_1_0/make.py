"""How this folder was made, with the code before the package layout of 0.2 (commit 28931fd):

  python train.py --config tests/tiny.py --workdir /tmp/legacy/run \
      --config.data.data_dir=/tmp/legacy/tfds --config.train.num_steps=3 \
      --config.train.checkpoint_every=3
  python tests/data/legacy_v0_1_0/make.py   # this file: logits.npy from the restored checkpoint

then `checkpoints/3` and `logits.npy` were copied here. `tests/test_layout.py` restores the
checkpoint with today's code and compares the logits.
"""
import numpy as np

from hemnet_jax import restore
from tests.tiny import tiny_config

config = tiny_config()
config.data.data_dir = "/tmp/legacy/tfds"
r = restore.restore_for_eval(config, workdir="/tmp/legacy/run")
x = np.linspace(-1, 1, 1 * 33 * 33 * 3, dtype=np.float32).reshape(1, 33, 33, 3)
logits = r.model.apply(r.variables, x, train=False)["logits"]
np.save("/tmp/legacy/logits.npy", np.asarray(logits))
print(r.step, r.path, logits.shape)
