"""The official EMANet network layout (XiaLiPKU/EMANet, network.py): state-dict key names of a
whole trained network, conversion to HEMNet's variables, and mismatch messages.

    extractor.0 (deep stem convs .0/.3/.6, BNs .1/.4), extractor.1 (bn1), extractor.4-7
    (layer1-4, torchvision block names), fc0 (ConvBNReLU), emau (mu [1, C, K] buffer, conv1,
    conv2 = conv + BN), fc1.0 (ConvBNReLU), fc2 (classifier conv)

A PyTorch HEMNet laid out the same way (the unit's conv1/conv2/mu) converts the same way: the
architecture comes from the config, the weights from the file. docs/weights.md has the table.
The program that writes a checkpoint from such a file is `hemnet_jax.training.import_official`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from hemnet_jax.models.resnet import STAGE_SIZES
from hemnet_jax.models.weights import (
    LEAF_NAMES,
    CheckpointMismatchError,
    Match,
    Stem,
    ignored,
    match_variables,
    to_torch_shape,
    torch_key,
)

# Torchvision-layout backbone module -> its index in the official `extractor` Sequential
# (0 stem convs, 1 bn1, 2 relu, 3 maxpool, 4-7 layer1-4).
EXTRACTOR = {
    "conv1": "extractor.0", "bn1": "extractor.1", "layer1": "extractor.4",
    "layer2": "extractor.5", "layer3": "extractor.6", "layer4": "extractor.7",
}
# HEMNet head and HEM unit module -> official module (fc1 is Sequential(ConvBNReLU, Dropout2d)).
OFFICIAL_HEAD = {"head_in": "fc0", "head_out": "fc1.0"}
OFFICIAL_UNIT = {"conv_in": "emau.conv1", "conv_out": "emau.conv2.0", "bn_out": "emau.conv2.1"}
COLLECTIONS = ("params", "batch_stats", "bases")


class MismatchError(CheckpointMismatchError):
    """An official-layout state dict does not fit the configured model; a one-line message."""


def key_of(collection: str, path: tuple[str, ...], stem: Stem) -> str:
    """The official EMANet state-dict key of a HEMNet variable, e.g.
    params ("backbone", "layer3_4", "conv2", "kernel") -> "extractor.6.4.conv2.weight",
    batch_stats ("head_in", "bn", "var") -> "fc0.bn.running_var", bases ("hem", "mu") ->
    "emau.mu". KeyError for a variable the official network lacks (the auxiliary head)."""
    module = path[0]
    if collection == "bases" and path == ("hem", "mu"):
        return "emau.mu"
    if module == "backbone":
        first, rest = torch_key(collection, path[1:], stem).split(".", 1)
        return f"{EXTRACTOR[first]}.{rest}"
    if len(path) == 3:
        leaf = LEAF_NAMES[collection, path[2]]
        if module == "hem" and path[1] in OFFICIAL_UNIT:
            return f"{OFFICIAL_UNIT[path[1]]}.{leaf}"
        if module == "classifier" and path[1] == "conv":
            return f"fc2.{leaf}"
        if module in OFFICIAL_HEAD:
            return f"{OFFICIAL_HEAD[module]}.{path[1]}.{leaf}"
    raise KeyError(f"The official layout has no counterpart of {collection}/{'/'.join(path)}.")


def shapes_of(target: Mapping[str, Any], stem: Stem) -> dict[str, tuple[int, ...]]:
    """official key -> torch-layout shape of every variable of a HEMNet's
    {"params", "batch_stats", "bases"} (arrays or ShapeDtypeStructs)."""
    return {
        key_of(c, path, stem): to_torch_shape(tuple(leaf.shape), c)
        for c in COLLECTIONS
        for path, leaf in traverse_util.flatten_dict(dict(target[c])).items()
    }


def convert(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    stem: Stem,
    source: str = "state dict",
) -> dict[str, Any]:
    """An official-layout EMANet/HEMNet state dict -> HEMNet's params, batch_stats and bases.

    Every BatchNorm's running_mean / running_var is copied as is. PyTorch accumulates the
    unbiased batch variance (Flax the biased one), but at evaluation both use the stored
    variance unchanged, so the imported model computes what the PyTorch model computed.
    emau.mu [1, C, K] becomes mu0 [K, C].

    Args:
      state_dict: key -> array, torch layout (conv weights [O, I, kh, kw]).
      target: the HEMNet's {"params", "batch_stats", "bases"}, arrays or ShapeDtypeStructs.
      stem: the model's stem ("deep" in the official code).
      source: named in the error message (the file).
    Raises:
      MismatchError: one line naming every missing key, unexpected key and shape
        mismatch, and the model keys whose values the file implies when they differ.
    """
    match = match_variables(state_dict, target, COLLECTIONS, lambda c, p: key_of(c, p, stem))
    if match.problems:
        raise MismatchError(_mismatch_message(source, match, state_dict, shapes_of(target, stem)))
    return match.converted


def _mismatch_message(
    source: str, match: Match, state_dict: Mapping[str, np.ndarray],
    model_shapes: Mapping[str, tuple[int, ...]],
) -> str:
    """One line: what the file lacks, what the model lacks, the shapes that differ, and the
    config values the file implies where they differ from the model's."""
    file_shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items() if not ignored(k)}
    problems = [
        _named("the file lacks", match.missing, model_shapes),
        _named("the model has no", match.unexpected, file_shapes),
        "shapes differ: " + ", ".join(match.mismatched) if match.mismatched else "",
    ]
    return (
        f"{source} does not fit the configured model: "
        + "; ".join(p for p in problems if p) + "."
        + _architecture_hint(file_shapes, model_shapes)
    )


def describe(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The model config values an official-layout key -> shape map implies (those it holds):
    stem, base_width, backbone, head_channels, head_mid_channels, num_bases, classes."""
    found: dict[str, Any] = {}
    for stem, key in (("deep", "extractor.0.0.weight"), ("torchvision", "extractor.0.weight")):
        if key in shapes:
            found["stem"], found["base_width"] = stem, shapes[key][0]
    blocks = tuple(
        1 + max((int(k.split(".")[2]) for k in shapes if k.startswith(f"extractor.{s}.")),
                default=-1)
        for s in range(4, 8)
    )
    if all(blocks):
        names = [name for name, sizes in STAGE_SIZES.items() if sizes == blocks]
        found["backbone"] = names[0] if names else f"blocks per stage {blocks}"
    for name, key, axis in (
        ("head_channels", "fc0.conv.weight", 0),
        ("head_mid_channels", "fc1.0.conv.weight", 0),
        ("num_bases", "emau.mu", 2),
        ("classes", "fc2.weight", 0),
    ):
        if key in shapes and len(shapes[key]) > axis:
            found[name] = shapes[key][axis]
    return found


def _architecture_hint(
    file_shapes: Mapping[str, tuple[int, ...]], model_shapes: Mapping[str, tuple[int, ...]]
) -> str:
    """' The file implies model.backbone 'resnet50' (config: 'resnet101'), ...' for every
    config value the file's shapes imply that differs, or a hint for an ImageNet backbone."""
    in_file, in_model = describe(file_shapes), describe(model_shapes)
    if not in_file and any(k.startswith("layer1.") for k in file_shapes):
        return " It looks like an ImageNet backbone: those go to --config.model.pretrained."
    diffs = [
        f"{'classes (of data.name)' if name == 'classes' else 'model.' + name} {value!r} "
        f"(config: {in_model[name]!r})"
        for name, value in in_file.items()
        if name in in_model and in_model[name] != value
    ]
    return f" The file implies {', '.join(diffs)}." if diffs else ""


def _named(title: str, keys: list[str], universe: Mapping[str, Any], limit: int = 40) -> str:
    """'TITLE k1, k2, extractor.6.{6..22}.* (17 blocks)': a ResNet block all of whose keys in
    `universe` are listed is named once, runs of such blocks as ranges; at most `limit` names
    (then how many more); '' for no keys."""
    if not keys:
        return ""
    listed, rest = set(keys), []
    whole: dict[str, set[int]] = {}  # "extractor.6" -> numbers of the blocks listed whole
    for key in keys:
        block = _block_of(key)
        if block and all(k in listed for k in universe if _block_of(k) == block):
            whole.setdefault(block[0], set()).add(block[1])
        else:
            rest.append(key)
    names = rest + [_block_range(stage, sorted(nums)) for stage, nums in sorted(whole.items())]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{title} {', '.join(names[:limit])}{more}"


def _block_of(key: str) -> tuple[str, int] | None:
    """("extractor.6", 4) for "extractor.6.4.conv2.weight" (layer3's block 4); None outside
    layer1-4's blocks."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "extractor" and parts[1] in "4567" and parts[2].isdigit():
        return ".".join(parts[:2]), int(parts[2])
    return None


def _block_range(stage: str, numbers: list[int]) -> str:
    """("extractor.6", [6, 7, 8, 10]) -> "extractor.6.{6..8,10}.* (4 blocks)"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    text = ",".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
    if len(numbers) > 1:
        text = "{" + text + "}"
    return f"{stage}.{text}.* ({len(numbers)} block{'s' if len(numbers) > 1 else ''})"


