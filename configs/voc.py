"""PASCAL VOC 2012 + SBD, HEMNet with ResNet-101 at output stride 8 (the paper's Table 3 setting).

Variants: `--config configs/voc.py:emanet` (the EMANet baseline), `:r50_os16` (Table 1's ablation
backbone), combinable with commas, e.g. `configs/voc.py:r50_os16,emanet`.
"""

from hemnet_jax import config as cfg


def get_config(arg: str = ""):
    config = cfg.base_config()
    for variant in filter(None, arg.split(",")):
        if variant == "emanet":
            cfg.emanet(config.model)
        elif variant == "r50_os16":
            config.model.backbone = "resnet50"
            config.model.output_stride = 16
        else:
            raise ValueError(f"Unknown variant {variant!r} of configs/voc.py: emanet, r50_os16.")
    return config
