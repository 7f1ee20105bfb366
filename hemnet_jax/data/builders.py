"""Imports every TFDS builder of hemnet_jax, which registers them with TFDS by name.

After `import hemnet_jax.data.builders`, `tfds.builder("voc2012_aug")` etc. find them; so does
`tfds build --imports hemnet_jax.data.builders voc2012_aug --manual_dir DIR`.
"""

from hemnet_jax.data.coco_stuff10k import CocoStuff10k
from hemnet_jax.data.pascal_context import PascalContext
from hemnet_jax.data.synthetic_scenes import SyntheticScenes
from hemnet_jax.data.voc2012_aug import Voc2012Aug

__all__ = ["CocoStuff10k", "PascalContext", "SyntheticScenes", "Voc2012Aug"]
