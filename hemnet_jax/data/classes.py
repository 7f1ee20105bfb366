"""Class tables of the datasets: names, and the id mappings from the source annotations.

Pure Python (no TensorFlow): the registry (`datasets.py`) and the TFDS builders share these.
Every label the builders store is a class index in [0, num_classes) or 255 (ignored).
"""

IGNORE_LABEL = 255

# PASCAL VOC 2012: the palette index of a SegmentationClass PNG is the class; 255 is the void
# border around objects.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# PASCAL-Context: the 59 most frequent classes of the 459-class full annotation, as
# (id in the full annotation, name). Full-annotation ids are those of the dataset's labels.txt
# ("2: aeroplane", ...): the values of `LabelMap` in trainval/<id>.mat, where 0 is unlabelled.
# Sorted by full id, which is also alphabetical order, the order of the dataset's 59_labels.txt
# and of the detail API's 59-class masks (PyTorch-Encoding, mmsegmentation).
CONTEXT_59: tuple[tuple[int, str], ...] = (
    (2, "aeroplane"), (9, "bag"), (18, "bed"), (19, "bedclothes"), (22, "bench"),
    (23, "bicycle"), (25, "bird"), (31, "boat"), (33, "book"), (34, "bottle"),
    (44, "building"), (45, "bus"), (46, "cabinet"), (59, "car"), (65, "cat"),
    (68, "ceiling"), (72, "chair"), (80, "cloth"), (85, "computer"), (98, "cow"),
    (104, "cup"), (105, "curtain"), (113, "dog"), (115, "door"), (144, "fence"),
    (158, "floor"), (159, "flower"), (162, "food"), (187, "grass"), (189, "ground"),
    (207, "horse"), (220, "keyboard"), (232, "light"), (258, "motorbike"), (259, "mountain"),
    (260, "mouse"), (284, "person"), (295, "plate"), (296, "platform"), (308, "pottedplant"),
    (324, "road"), (326, "rock"), (347, "sheep"), (349, "shelves"), (354, "sidewalk"),
    (355, "sign"), (360, "sky"), (366, "snow"), (368, "sofa"), (397, "table"),
    (415, "track"), (416, "train"), (420, "tree"), (424, "truck"), (427, "tvmonitor"),
    (440, "wall"), (445, "water"), (454, "window"), (458, "wood"),
)  # fmt: skip
CONTEXT_NUM_FULL_CLASSES = 459
CONTEXT_59_CLASSES: tuple[str, ...] = tuple(name for _, name in CONTEXT_59)
CONTEXT_60_CLASSES: tuple[str, ...] = ("background", *CONTEXT_59_CLASSES)

# COCO-Stuff 10k v1.1: `S` in annotations/<id>.mat holds 0 = unlabelled, 1-91 = COCO thing ids
# (91 slots, of which 80 are used), 92-182 = the 91 stuff classes. (source id, name) of the 182;
# None marks the 11 thing ids COCO never annotated.
COCO_STUFF_IDS: tuple[tuple[int, str | None], ...] = tuple(enumerate((
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", None, "backpack",
    "umbrella", None, None, "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet",
    None, "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", None, "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", None,
    # stuff, ids 92-182
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net",
    "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield",
    "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea",
    "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
), start=1))  # fmt: skip
COCO_STUFF_NUM_SOURCE_IDS = 182
# The 171 used ids in increasing order; class k of the dataset is COCO_STUFF_USED_IDS[k].
COCO_STUFF_USED_IDS: tuple[int, ...] = tuple(i for i, name in COCO_STUFF_IDS if name is not None)
COCO_STUFF_CLASSES: tuple[str, ...] = tuple(n for _, n in COCO_STUFF_IDS if n is not None)


def context_lut(with_background: bool) -> list[int]:
    """Lookup table full-annotation id (0..459) -> stored label.

    59-class convention (`with_background=False`): the 59 classes are 0..58; unlabelled and the
    other 400 classes are 255. 60-class convention: 0 = background (unlabelled and the other
    400), the 59 classes 1..59.
    """
    offset = 1 if with_background else 0
    lut = [0 if with_background else IGNORE_LABEL] * (CONTEXT_NUM_FULL_CLASSES + 1)
    for k, (full_id, _) in enumerate(CONTEXT_59):
        lut[full_id] = k + offset
    return lut


def coco_stuff_lut() -> list[int]:
    """Lookup table COCO-Stuff id (0..182) -> stored label: the k-th used id -> k, else 255."""
    lut = [IGNORE_LABEL] * (COCO_STUFF_NUM_SOURCE_IDS + 1)
    for k, source_id in enumerate(COCO_STUFF_USED_IDS):
        lut[source_id] = k
    return lut
