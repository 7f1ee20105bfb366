"""The embedded default: a small HEMNet on `synthetic_scenes`, which needs no download.

Trains on a 2-core CPU in minutes: `python train.py --config configs/synthetic.py --workdir DIR`.
`configs/synthetic.py:emanet` is the same run with the EMANet unit (eta = 1, gradient-free EM).
"""

from hemnet_jax import config as cfg


def get_config(arg: str = ""):
    config = cfg.base_config()
    m = config.model
    m.backbone = "resnet_tiny"
    m.stem = "deep"
    m.output_stride = 8
    m.base_width = 8
    m.head_channels = 32
    m.head_mid_channels = 32
    m.num_bases = 16
    m.bn_momentum = 0.9

    d = config.data
    d.name = "synthetic_scenes"
    d.crop_size = 64
    d.scales = (0.75, 1.0, 1.25)
    d.shuffle_buffer = 256
    d.eval_pad_size = 64

    t = config.train
    t.batch_size = 16
    t.num_steps = 3000
    t.learning_rate = 0.02
    t.log_every = 50
    t.eval_every = 1000
    t.checkpoint_every = 500

    config.eval.batch_size = 16
    return cfg.apply_variants(config, arg, cfg.VARIANTS, "configs/synthetic.py")
