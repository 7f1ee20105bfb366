"""ImageNet ResNet checkpoints (torchvision key names) -> the backbone's params and batch_stats.

Two layouts, chosen by `stem` (config.model.stem):
  "torchvision": conv1, bn1 (7x7 stem), e.g. torchvision's resnet50-0676ba61.pth / resnet101-*.pth
                 or timm's resnet50.tv_in1k model.safetensors.
  "deep":        conv1.0, conv1.1, conv1.3, conv1.4, conv1.6, bn1 (3x3 convs 64-64-128), the
                 PyTorch-Encoding checkpoints EMANet loads (resnet101-2a57e44d.pth).
Blocks are layerS.B.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1} in both.

Files: .safetensors through `safetensors.numpy` (no torch), anything else through `torch.load`
(imported only then). `python -m hemnet_jax.models.weights in.pth out.safetensors` converts once
on a machine with torch. The classifier (fc.*) and num_batches_tracked are ignored; every other
missing key, unexpected key or shape mismatch is reported in one error.

A whole network trained by the official EMANet code is another layout (`models.official`);
`python -m hemnet_jax.models.weights import-emanet FILE --config ... --workdir DIR` turns one into
a training checkpoint (`hemnet_jax.training.import_official`, docs/weights.md).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hemnet_jax import cli
from hemnet_jax.errors import UserError

Stem = Literal["deep", "torchvision"]
StateDict = dict[str, np.ndarray]

# Flax stem module -> torchvision-layout module, per stem (hemnet_jax.models.resnet names).
STEM_NAMES: dict[str, dict[str, str]] = {
    "torchvision": {"stem_conv1": "conv1", "stem_bn1": "bn1"},
    "deep": {
        "stem_conv1": "conv1.0", "stem_bn1": "conv1.1",
        "stem_conv2": "conv1.3", "stem_bn2": "conv1.4",
        "stem_conv3": "conv1.6", "stem_bn3": "bn1",
    },
}
BLOCK_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
COLLECTIONS = ("params", "batch_stats")
IMPORT_USAGE = "import-emanet FILE.pth --config configs/voc.py:emanet --workdir DIR [--step N]"
SHOWN_PER_KIND = 8  # keys listed per kind of mismatch; the rest are counted


class CheckpointMismatchError(ValueError, UserError):
    """The checkpoint's keys or shapes do not match the backbone; lists every problem."""


def torch_key(collection: str, path: tuple[str, ...], stem: Stem) -> str:
    """The torchvision key of a backbone variable, e.g. ("layer1_0", "conv1", "kernel") in
    "params" -> "layer1.0.conv1.weight"; ("stem_bn3", "mean") in "batch_stats", deep stem ->
    "bn1.running_mean"."""
    *modules, leaf = path
    if modules[0] in STEM_NAMES[stem]:
        prefix = [STEM_NAMES[stem][modules[0]]]
    elif modules[0].startswith("layer") and len(modules) == 2:  # layerS_B / module
        prefix = [modules[0].replace("_", "."), BLOCK_NAMES.get(modules[1], modules[1])]
    else:
        raise KeyError(f"No torchvision name for backbone variable {collection}/{'/'.join(path)}.")
    return ".".join(prefix + [LEAF_NAMES[collection, leaf]])


def _to_flax(value: np.ndarray, collection: str) -> np.ndarray:
    """Conv weights OIHW -> HWIO; bases [1, C, K] -> [K, C]; vectors unchanged."""
    if collection == "bases":
        return value[0].T if value.ndim == 3 and value.shape[0] == 1 else value
    return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value


def to_torch_shape(shape: tuple[int, ...], collection: str) -> tuple[int, ...]:
    if collection == "bases":
        return (1, shape[1], shape[0])
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def ignored(key: str) -> bool:
    return key.startswith("fc.") or key.endswith("num_batches_tracked")


def convert_resnet(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    stem: Stem,
    source: str = "state dict",
) -> dict[str, Any]:
    """A torchvision-layout ResNet state dict -> {"params", "batch_stats"} of the Flax ResNet.

    Args:
      state_dict: name -> array (torch layout: conv weights [O, I, kh, kw]).
      target: the backbone's {"params": ..., "batch_stats": ...}: arrays or ShapeDtypeStructs,
        giving the structure, shapes and dtypes to produce.
      stem: "deep" or "torchvision", the checkpoint's (and the model's) stem.
      source: named in the error message (the file).
    Returns:
      {"params": ..., "batch_stats": ...} nested dicts of jnp arrays in the target's dtypes.
    Raises:
      CheckpointMismatchError listing all missing keys, unexpected keys and shape mismatches.
    """
    if stem not in STEM_NAMES:
        raise ValueError(f"Unknown stem {stem!r}: expected one of {sorted(STEM_NAMES)}.")
    match = match_variables(state_dict, target, COLLECTIONS, lambda c, p: torch_key(c, p, stem))
    if match.problems:
        raise CheckpointMismatchError(
            _mismatch_message(
                source, stem, state_dict, match.missing, match.unexpected, match.mismatched
            )
        )
    return match.converted


@dataclasses.dataclass
class Match:
    """What `match_variables` found: converted variables and every problem."""

    converted: dict[str, Any]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    @property
    def problems(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def match_variables(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    collections: tuple[str, ...],
    key_of: Callable[[str, tuple[str, ...]], str],
) -> Match:
    """Converts every leaf of target[collection] from state_dict[key_of(collection, path)],
    recording missing keys, unexpected keys and shape mismatches (in torch's layout)."""
    converted: dict[str, dict[tuple[str, ...], jnp.ndarray]] = {c: {} for c in collections}
    missing, mismatched, used = [], [], set()
    for collection in collections:
        for path, leaf in traverse_util.flatten_dict(dict(target[collection])).items():
            key = key_of(collection, path)
            if key not in state_dict:
                missing.append(key)
                continue
            used.add(key)
            value = _to_flax(np.asarray(state_dict[key]), collection)
            if value.shape != tuple(leaf.shape):
                mismatched.append(
                    f"{key}: file {tuple(np.shape(state_dict[key]))}, "
                    f"model {to_torch_shape(tuple(leaf.shape), collection)}"
                )
                continue
            converted[collection][path] = jnp.asarray(value, dtype=leaf.dtype)
    unexpected = sorted(k for k in state_dict if k not in used and not ignored(k))
    return Match(
        {c: traverse_util.unflatten_dict(converted[c]) for c in collections},
        missing, unexpected, mismatched,
    )


def _mismatch_message(
    source: str,
    stem: Stem,
    state_dict: Mapping[str, np.ndarray],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    lines = [f"Checkpoint {source} does not fit the ResNet backbone (stem {stem!r}):"]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {item}" for item in items[:SHOWN_PER_KIND])
            if len(items) > SHOWN_PER_KIND:
                lines.append(f"    ... and {len(items) - SHOWN_PER_KIND} more")
    if stem == "deep" and "conv1.weight" in state_dict:
        lines.append("  The file has a 7x7 stem (conv1.weight): set model.stem='torchvision'.")
    if stem == "torchvision" and "conv1.0.weight" in state_dict:
        lines.append("  The file has a deep stem (conv1.0.weight): set model.stem='deep'.")
    return "\n".join(lines)


class WeightsFileError(ValueError, UserError):
    """A weights file is missing or not a readable checkpoint; the message names it."""


class MissingTorchError(ImportError, UserError):
    """A .pth file needs PyTorch, which is not installed."""


def read_state_dict(path: str) -> StateDict:
    """name -> np.ndarray from a .safetensors file (no torch) or a torch checkpoint (.pth).

    Torch checkpoints may wrap the state dict in {"net": ...} (the official EMANet train.py),
    {"state_dict": ...} or {"model": ...} and prefix keys with "module." (DataParallel); both
    are undone.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path: str) -> tuple[StateDict, int | None]:
    """(name -> np.ndarray, the training step the file records or None), as `read_state_dict`;
    the step is the "step" beside the wrapped state dict (EMANet's {'net': ..., 'step': ...}).

    Raises:
      WeightsFileError: no such file, or not a readable checkpoint (the file is named).
      MissingTorchError: a .pth file without PyTorch installed.
      CheckpointMismatchError: a readable file that holds no state dict.
    """
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path}: no such weights file (docs/weights.md: where to get one).")
    try:
        return _read_checkpoint(path)
    except UserError:
        raise
    except Exception as e:  # each format raises its own types for a damaged file
        kind = "safetensors" if path.endswith(".safetensors") else "PyTorch checkpoint"
        raise WeightsFileError(
            f"{path}: not a readable {kind} file ({type(e).__name__}: {e}). Download it again, "
            "or check that the name's extension matches its format."
        ) from e


def _read_checkpoint(path: str) -> tuple[StateDict, int | None]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path)), None
    try:
        import torch
    except ImportError as e:
        raise MissingTorchError(
            f"Reading {path} needs PyTorch (pip install torch, the CPU build is enough), or "
            "convert it once elsewhere: python -m hemnet_jax.models.weights IN.pth OUT.safetensors"
        ) from e
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointMismatchError(f"{path} is no readable PyTorch checkpoint: {e}") from e
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(
            f"{path} holds a {type(checkpoint).__name__}, not a state dict."
        )
    step = None
    for wrapper in ("net", "state_dict", "model"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            if step is None and type(checkpoint.get("step")) is int:
                step = checkpoint["step"]
            checkpoint = checkpoint[wrapper]
    state_dict = {
        k.removeprefix("module."): v.detach().float().numpy()
        for k, v in checkpoint.items()
        if isinstance(v, torch.Tensor)
    }
    return state_dict, step


def load_pretrained(variables: Mapping[str, Any], path: str, *, stem: Stem) -> dict[str, Any]:
    """HEMNet variables with the backbone's params and batch_stats read from `path`.

    Everything else (the head, the HEM unit's bases) is returned untouched. Raises
    CheckpointMismatchError (naming the file) when the checkpoint does not fit.
    """
    backbone = {c: variables[c]["backbone"] for c in COLLECTIONS}
    loaded = convert_resnet(read_state_dict(path), backbone, stem=stem, source=path)
    out = dict(variables)
    for c in COLLECTIONS:
        out[c] = {**variables[c], "backbone": loaded[c]}
    return out


def main(argv: list[str]) -> None:
    """`python -m hemnet_jax.models.weights IN.pth OUT.safetensors`: torch -> safetensors.

    `... import-emanet FILE --config CONFIG --workdir DIR` hands the process over to the import
    program, `python -m hemnet_jax.training.import_official FILE ...` (it writes a training
    checkpoint, which this module, below training, cannot import)."""
    if argv[1:2] == ["import-emanet"]:
        program = [sys.executable, "-m", "hemnet_jax.training.import_official", *argv[2:]]
        os.execv(sys.executable, program)
    if len(argv) != 3:
        raise SystemExit(
            f"usage: python -m hemnet_jax.models.weights IN.pth OUT.safetensors\n"
            f"   or: python -m hemnet_jax.models.weights {IMPORT_USAGE}\n{__doc__}"
        )
    source, target = argv[1:]
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise WeightsFileError(f"{target}: the folder {folder} does not exist; create it first.")
    from safetensors.numpy import save_file

    state_dict = {k: np.ascontiguousarray(v) for k, v in read_state_dict(source).items()}
    save_file(state_dict, target)
    print(f"Wrote {len(state_dict)} tensors to {target}.")


if __name__ == "__main__":
    cli.run_plain(main)
