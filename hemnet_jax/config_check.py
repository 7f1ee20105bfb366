"""The config check every program runs first, before anything is created, built or restored.

`check(config, ...)` expands `~` and `$VARS` in the path keys (in place), then collects every
violation (a key's type or range, a combination of keys, a file the run needs) and raises one
`ConfigError` that lists them all, each with its key, its value and what is allowed. It imports
neither TensorFlow nor the model (nor the dataset registry: programs that read data pass
`data.datasets.registry()`), so a bad command line fails in about a second.

RULES is a table: one line per key, `"section.key": rule`. A key of `config.py` without a rule
fails `tests/test_config_check.py`, so a new key gets its rule when it is added.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import ml_collections
from etils import epath

from hemnet_jax import storage
from hemnet_jax.errors import UserError


class ConfigError(ValueError, UserError):
    """One or more config values are not allowed; the message lists every one."""


class Dataset(Protocol):
    """What the check needs of a dataset (`data.datasets.DatasetInfo` has it)."""

    name: str
    eval_pad_size: tuple[int, int] | None  # the largest image (height, width)
    needs_download: bool


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a key allows: `ok(value)` is True for an allowed value; `allowed` says it in words."""

    allowed: str
    ok: Callable[[Any], bool]

    def __or__(self, other: Rule) -> Rule:
        return Rule(f"{self.allowed} or {other.allowed}", lambda v: self.ok(v) or other.ok(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(low: int | None = None, high: int | None = None) -> Rule:
    """An int in [low, high] (either bound may be open-ended)."""
    text = {(True, True): "any integer", (False, True): f"an integer >= {low}",
            (True, False): f"an integer <= {high}"}.get((low is None, high is None),
                                                        f"an integer in [{low}, {high}]")
    return Rule(text, lambda v: _is_int(v) and (low is None or v >= low)
                and (high is None or v <= high))


def number(low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite number in the interval from low to high, each end open or closed."""
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    text = f"a number in {'(' if low_open or low is None else '['}{lo}, {hi}" \
           f"{')' if high_open or high is None else ']'}"

    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    return Rule(text, ok)


def choice(*values: Any) -> Rule:
    return Rule("one of " + ", ".join(repr(v) for v in values),
                lambda v: not isinstance(v, bool) and v in values if values else False)


def boolean() -> Rule:
    return Rule("True or False", lambda v: isinstance(v, bool))


def none() -> Rule:
    return Rule("None", lambda v: v is None)


def text() -> Rule:
    return Rule("a string", lambda v: isinstance(v, str))


def sequence_of(item: Rule, *, min_len: int = 1) -> Rule:
    """A tuple or list of at least `min_len` items, each allowed by `item`."""
    return Rule(f"a sequence of at least {min_len} of: {item.allowed}",
                lambda v: isinstance(v, tuple | list) and len(v) >= min_len
                and all(item.ok(x) for x in v))


def positive_int_list() -> Rule:
    """A comma-separated string of positive integers, e.g. '1,2,3,4' ('' = none)."""
    return Rule("a comma-separated list of integers >= 1 such as '1,2,3,4,6,8' (or '')",
                lambda v: isinstance(v, str) and all(
                    s.strip().isdigit() and int(s) >= 1 for s in v.split(",") if s.strip()))


def path() -> Rule:
    """A path (after `expand_paths`): '' or one without an undefined `$VARIABLE` left in it."""
    return Rule("a path ('' for the default); every $VARIABLE in it defined",
                lambda v: isinstance(v, str) and not re.search(r"\$\{?[A-Za-z_]", v))


# Names of code the check must not import (it stays light): tests compare them with the code.
BACKBONES = ("resnet50", "resnet101", "resnet152", "resnet_tiny")
PATH_KEYS = ("model.pretrained", "data.data_dir", "data.manual_dir")

RULES: dict[str, Rule] = {
    # Model: the backbone.
    "model.backbone": choice(*BACKBONES),
    "model.stem": choice("deep", "torchvision"),
    "model.output_stride": choice(8, 16),
    "model.multi_grid": sequence_of(integer(1)),
    "model.base_width": integer(1),
    "model.pretrained": path(),
    # Model: the head.
    "model.head_channels": integer(1),
    "model.head_mid_channels": integer(1),
    "model.dropout": number(0, 1, high_open=True),
    "model.aux_head": boolean(),
    "model.aux_loss_weight": number(0),
    # Model: the HEM unit.
    "model.num_bases": integer(1),  # K
    "model.num_iters": integer(1),  # T
    "model.step_size": number(0, 1, low_open=True),  # eta of the N-step (eq. 13)
    "model.temperature": none() | number(0, low_open=True),  # None: sqrt(C)
    "model.kernel": choice("dot", "rbf"),
    "model.l2_normalize": boolean(),
    "model.stop_em_gradient": boolean(),
    "model.bases_momentum": number(0, 1),
    "model.remat": boolean(),
    "model.freeze_unit_conv_in": boolean(),
    "model.bn_momentum": number(0, 1),
    "model.bn_epsilon": number(0, low_open=True),
    "model.dtype": choice("float32", "bfloat16"),
    # Data.
    "data.name": text(),  # and one of the registry's names, where the program passes it
    "data.data_dir": path(),
    "data.manual_dir": path(),
    "data.train_split": text(),
    "data.eval_split": text(),
    "data.crop_size": integer(1),
    "data.allow_large_crop": boolean(),
    "data.scales": sequence_of(number(0, low_open=True)),
    "data.shuffle_buffer": integer(1),
    "data.eval_pad_size": integer(1),
    # Training.
    "train.batch_size": integer(1),
    "train.num_steps": integer(1),
    "train.learning_rate": number(0, low_open=True),
    "train.lr_power": number(0),
    "train.momentum": number(0, 1, high_open=True),
    "train.weight_decay": number(0),
    "train.bias_lr_mult": number(0),
    "train.lr_update_every": integer(1),
    "train.norm_bias_lr_mult": number(0),
    "train.loss_normalization": choice("valid_pixels", "all_pixels"),
    "train.log_every": integer(1),
    "train.eval_every": integer(0),
    "train.validate_at_end": boolean(),
    "train.checkpoint_every": integer(1),
    "train.keep_checkpoints": integer(1),
    "train.profile": boolean(),
    "train.grad_flow_every": integer(0),
    "train.basis_diagnostics": boolean(),
    "train.state_sharding": choice("replicated"),
    # Evaluation.
    "eval.batch_size": integer(1),
    "eval.num_iters": none() | integer(1),  # T_eval; None: T_train
    "eval.num_iters_sweep": positive_int_list(),
    "eval.multi_scale": boolean(),
    "eval.scales": sequence_of(number(0, low_open=True)),
    "eval.flip": boolean(),
    "eval.max_batches": integer(0),
    "eval.padding": choice("fixed", "official"),
    "eval.basis_diagnostics": boolean(),
    # The gradient-flow study.
    "study.num_images": integer(1),
    "study.batch_size": integer(1),
    "study.step_sizes": sequence_of(number(0, 1, low_open=True)),
    "study.num_iters": none() | integer(1),
    "study.seed": integer(0),
    "study.train_mode": boolean(),
    "study.checkpoint_step": none() | integer(0),
    "seed": integer(0),
}


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """("section.key", value) for every leaf of `config`."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def expand_path(value: str) -> str:
    """`~` and `$VARS` expanded (the shell leaves `--key=~/x` alone); URLs (gs://...) as given."""
    return value if "://" in value else os.path.expandvars(os.path.expanduser(value))


def expand_paths(config: ml_collections.ConfigDict) -> None:
    """Expands `~` and `$VARS` in the path keys of `config`, in place."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = config[section][name]
        if isinstance(value, str) and value:
            config[section][name] = expand_path(value)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def value_violations(config: ml_collections.ConfigDict) -> list[str]:
    """One line per key whose value its rule does not allow."""
    found = []
    for key, value in flat_items(config):
        rule = RULES.get(key)
        if rule is not None and not rule.ok(value):
            found.append(f"{key}={value!r}: allowed: {rule.allowed}.")
    return found


def combination_violations(config: ml_collections.ConfigDict, num_devices: int | None = None,
                           datasets: Mapping[str, Dataset] | None = None) -> list[str]:
    """Keys that are allowed alone but not together (or not on `num_devices` devices, or not
    with the dataset `data.name` names in `datasets`)."""
    found = []
    d = config.data
    info = (datasets or {}).get(d.name)
    if datasets is not None and info is None:
        found.append(f"data.name={d.name!r}: not a dataset; allowed: one of "
                     f"{', '.join(sorted(datasets))}.")
    if info is not None and info.eval_pad_size and _valid(config, "data.crop_size", "data.scales"):
        largest = max(info.eval_pad_size)
        reach = int(largest * max(d.scales))
        if d.crop_size > reach and not d.get("allow_large_crop", False):
            found.append(
                f"data.crop_size={d.crop_size}: larger than the largest training image of "
                f"{info.name} at the largest of data.scales ({largest} x {max(d.scales):g} = "
                f"{reach}), so most of each crop is padding and steps are slower; allowed: at "
                f"most {reach}, or set data.allow_large_crop=True."
            )
    if info is not None and info.eval_pad_size and _valid(config, "data.eval_pad_size"):
        largest = max(info.eval_pad_size)
        if d.eval_pad_size < largest:
            found.append(f"data.eval_pad_size={d.eval_pad_size}: smaller than the largest image "
                         f"of {info.name} ({largest}); allowed: at least {largest}.")
    if num_devices:
        for key in ("train.batch_size", "eval.batch_size"):
            value = _get(config, key)
            if _valid(config, key) and value % num_devices:
                found.append(
                    f"{key}={value}: not a multiple of the {num_devices} devices of this run "
                    f"(global batch, split evenly); allowed: a multiple of {num_devices}."
                )
    return found


def file_violations(config: ml_collections.ConfigDict, *, pretrained: bool = False,
                    data: Dataset | None = None) -> list[str]:
    """Files the run will read: `model.pretrained` (a new training run) and the downloads of
    the dataset `data` where it is not built yet."""
    found = []
    weights = config.model.pretrained
    if pretrained and weights and "://" not in weights and not os.path.isfile(weights):
        found.append(f"model.pretrained={weights!r}: no such file; allowed: a .pth or "
                     ".safetensors ImageNet checkpoint (docs/weights.md), or '' (from scratch).")
    info = data
    if info is not None and "://" in (config.data.data_dir or ""):
        try:
            storage.check_tensorflow_path(config.data.data_dir, "data.data_dir")
            storage.check_bucket(config.data.data_dir, "data.data_dir")
        except storage.StorageError as e:
            found.append(str(e))
    if info is not None and info.needs_download:
        data_dir = config.data.data_dir or expand_path(
            os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
        manual = config.data.manual_dir or os.path.join(data_dir, "downloads", "manual")
        local = "://" not in data_dir and "://" not in manual
        if local and not is_built(data_dir, info.name) and not os.path.isdir(manual):
            found.append(
                f"data.manual_dir={manual!r}: no such folder, and {info.name} is not built in "
                f"data.data_dir={data_dir!r}; allowed: the folder holding the downloaded "
                "archives (docs/datasets.md), or the data_dir where the dataset is built."
            )
    return found


def folder_violations(folders: Mapping[str, str | None]) -> list[str]:
    """Folders a run will write into ({"--workdir": path}): a local path must be a folder, or
    creatable, and writable; a gs:// one's bucket must answer (`storage.check_bucket`)."""
    found = []
    for flag, folder in folders.items():
        if folder and "://" in folder:
            try:
                storage.check_bucket(folder, flag)
            except storage.StorageError as e:
                found.append(str(e))
        if not folder or "://" in folder:
            continue
        existing = folder
        while not os.path.exists(existing):  # the nearest existing ancestor
            existing = os.path.dirname(os.path.abspath(existing))
        if not os.path.isdir(existing):
            what = "a file, not a folder" if existing == folder else f"under the file {existing}"
            found.append(f"{flag}={folder!r}: {what}; allowed: a folder (new or existing).")
        elif not os.access(existing, os.W_OK | os.X_OK):
            found.append(f"{flag}={folder!r}: {existing} is not writable; allowed: a folder you "
                         "can write to.")
    return found


def has_checkpoint(directory: str) -> bool:
    """Whether `directory` (local or gs://) holds a step directory (named by its step): a run
    there resumes, and does not read model.pretrained."""
    root = epath.Path(directory)
    return root.is_dir() and any(p.name.isdigit() and p.is_dir() for p in root.iterdir())


def is_built(data_dir: str, name: str) -> bool:
    """Whether TFDS has built `name` ("voc2012_aug", "pascal_context/59") under `data_dir`:
    `<data_dir>/<name>[/<config>]/<version>/dataset_info.json` exists."""
    pattern = os.path.join(glob.escape(data_dir), *name.split("/"), "**", "dataset_info.json")
    return bool(glob.glob(pattern, recursive=True))


def check(config: ml_collections.ConfigDict, *, datasets: Mapping[str, Dataset] | None = None,
          num_devices: int | None = None, data: bool = False, pretrained: bool = False,
          folders: Mapping[str, str | None] | None = None) -> None:
    """Expands the path keys, then raises ConfigError listing every violation of `config`.

    Args:
      datasets: the dataset registry (`data.datasets.registry()`): data.name must be in it, and
        data.crop_size and data.eval_pad_size must suit its images. None skips these checks.
      num_devices: the run's device count; None skips the batch-division check.
      data: the run reads the dataset: its downloads must exist unless it is built.
      pretrained: the run loads `model.pretrained` (a new training run).
      folders: flag -> folder the run writes into (see `folder_violations`).
    """
    expand_paths(config)
    found = value_violations(config)
    found += combination_violations(config, num_devices, datasets)
    info = (datasets or {}).get(config.data.name) if data else None
    found += file_violations(config, pretrained=pretrained, data=info)
    found += folder_violations(folders or {})
    if len(found) == 1:
        raise ConfigError(found[0])
    if found:
        raise ConfigError(f"{len(found)} config values not allowed (set them with "
                          "--config.KEY=VALUE):\n" + "\n".join(f"  {v}" for v in found))


def _valid(config: ml_collections.ConfigDict, *keys: str) -> bool:
    return all(RULES[k].ok(_get(config, k)) for k in keys if k in RULES)
