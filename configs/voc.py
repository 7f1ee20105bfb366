"""PASCAL VOC 2012 + SBD, HEMNet with ResNet-101 at output stride 8 (the paper's Table 3 setting).

The official EMANet training and evaluation details (`config.official_recipe`, docs/reproducing.md).
Variants: `--config configs/voc.py:emanet` (the EMANet baseline), `:r50_os16` (Table 1's ablation
backbone), combinable with commas, e.g. `configs/voc.py:r50_os16,emanet`. Table 1's grid:
`--config.model.step_size=0.2 --config.model.num_iters=6`.
"""

from hemnet_jax import config as cfg


def get_config(arg: str = ""):
    config = cfg.official_recipe(cfg.base_config())
    return cfg.apply_variants(config, arg, cfg.VARIANTS, "configs/voc.py")
