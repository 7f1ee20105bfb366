"""COCO-Stuff 10k (171 classes), HEMNet with ResNet-101 at output stride 8, eta 0.6 (the paper).

Images are up to 640 pixels a side, so whole-image evaluation pads to 640.
Variants as in configs/voc.py (`:emanet`, `:r50_os16`).
"""

from hemnet_jax import config as cfg


def get_config(arg: str = ""):
    config = cfg.official_recipe(cfg.base_config())
    config.data.name = "coco_stuff10k"
    config.data.eval_pad_size = 640
    config.model.step_size = 0.6
    return cfg.apply_variants(config, arg, cfg.VARIANTS, "configs/cocostuff.py")
