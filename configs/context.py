"""PASCAL Context (59 classes), HEMNet with ResNet-101 at output stride 8, eta 0.5.

The paper gives no separate schedule for Context: this is the VOC recipe on `pascal_context`.
Variants as in configs/voc.py (`:emanet`, `:r50_os16`).
"""

from hemnet_jax import config as cfg


def get_config(arg: str = ""):
    config = cfg.official_recipe(cfg.base_config())
    config.data.name = "pascal_context"
    return cfg.apply_variants(config, arg, cfg.VARIANTS, "configs/context.py")
