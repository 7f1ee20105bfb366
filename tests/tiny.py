"""A tiny HEMNet config shared by the tests: the real code paths at toy widths and sizes."""

from hemnet_jax import config as cfg

# conftest's `tiny_run`: the tiny config with 12 steps, stopped after 2.
TINY_RUN_NUM_STEPS = 12
TINY_RUN_STEPS = 2


def tiny_config(dataset: str = "synthetic_scenes/tiny"):
    config = cfg.base_config()
    m = config.model
    m.backbone = "resnet_tiny"
    m.base_width = 4
    m.output_stride = 8
    m.head_channels = 16
    m.head_mid_channels = 16
    m.num_bases = 8
    m.num_iters = 2
    config.data.name = dataset
    config.data.crop_size = 32
    config.data.scales = (0.75, 1.0, 1.25)
    config.data.shuffle_buffer = 64
    config.data.eval_pad_size = 32
    t = config.train
    t.batch_size = 8
    t.num_steps = 6
    t.learning_rate = 0.01
    t.log_every = 2
    t.eval_every = 0
    t.validate_at_end = False  # seconds per run; the tests of the final validation turn it on
    t.checkpoint_every = 3
    t.basis_diagnostics = False  # one compile less per run; tests/test_train.py checks them
    config.eval.batch_size = 8
    config.eval.basis_diagnostics = False  # one pass less per evaluation; test_eval checks them
    return config


def get_config(arg: str = ""):
    """So that this file is also a config file: `--config tests/tiny.py[:dataset][,variant...]`
    (variants as in configs/*.py, e.g. `tests/tiny.py:emanet`)."""
    names = [a.strip() for a in arg.split(",") if a.strip()]
    datasets = [a for a in names if a not in cfg.VARIANTS]
    variants = ",".join(a for a in names if a in cfg.VARIANTS)
    config = tiny_config(datasets[0] if datasets else "synthetic_scenes/tiny")
    return cfg.apply_variants(config, variants, cfg.VARIANTS, "tests/tiny.py")
