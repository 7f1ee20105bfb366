"""A user's mistake ends in one `FATAL:` line, exit code 1, no traceback, nothing created.

Each test runs a real program in a subprocess (issue 15's "Found" items); the config check runs
before TensorFlow is imported, so most of them exit in a few seconds. Several mistakes share one
subprocess where the check lists them all at once.
"""

import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from hemnet_jax import config_check
from hemnet_jax.cli import load_config_file
from hemnet_jax.config import base_config
from hemnet_jax.data import datasets
from hemnet_jax.models import resnet
from hemnet_jax.training.checkpointing import Checkpointer, run_metadata
from tests.data_fakes import truncated_jpeg, write_sbd, write_voc2012
from tests.tiny import tiny_config

REPO = str(Path(__file__).resolve().parents[1])
PYTHON = sys.executable


def _env(home: Path | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop("HEMNET_DEBUG", None)
    env.update(extra)
    if home is not None:
        env["HOME"] = str(home)
        env.pop("TFDS_DATA_DIR", None)
    return env


def _run(args: list[str] | str, env: dict[str, str], cwd: str = REPO):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
                          shell=isinstance(args, str), executable="/bin/bash"
                          if isinstance(args, str) else None)


def _fatal(result: subprocess.CompletedProcess) -> str:
    """The text from the single FATAL line on; asserts exit code 1 and no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = result.stderr.splitlines()
    fatal = [i for i, line in enumerate(lines) if line.startswith("FATAL:")]
    assert len(fatal) == 1, output
    return "\n".join(lines[fatal[0]:])


def _imported(result: subprocess.CompletedProcess) -> set[str]:
    """The modules (dotted names) a program run with `python -X importtime` imported."""
    lines = (result.stdout + result.stderr).splitlines()
    return {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}


def _tree(root: Path) -> set[str]:
    """Every path under `root`, but libraries' caches in a HOME (.keras, .cache, .config)."""
    paths = {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()
    return {p for p in paths if not p.startswith(".")}


def _fake_checkpoint(workdir: Path, config: ml_collections.ConfigDict, step: int = 2) -> None:
    """A real orbax checkpoint whose recorded run is `config` (its state a placeholder: the
    recorded config is checked before any state is read)."""
    ckpt = Checkpointer(str(workdir / "checkpoints"), asynchronous=False)
    ckpt.save(step, {"step": np.zeros((), np.int32)}, run_metadata(config), force=True)
    ckpt.close()


# ---------------------------------------------------------------------------------------------
# The config check in-process: rules and messages.


def test_every_config_key_has_a_rule():
    keys = {k for k, _ in config_check.flat_items(base_config())}
    assert keys - set(config_check.RULES) == set()
    assert set(config_check.RULES) - keys == set()  # no rule for a key that does not exist


def test_rules_name_what_the_code_accepts():
    assert set(config_check.BACKBONES) == set(resnet.STAGE_SIZES)
    config = tiny_config()
    config.data.name = "voc2012"
    with pytest.raises(config_check.ConfigError, match="data.name='voc2012': not a dataset; "
                       "allowed: one of coco_stuff10k, pascal_context"):
        config_check.check(config, datasets=datasets.registry())


@pytest.mark.parametrize("key, bad, good", [
    ("model.step_size", 1.5, 1.0), ("model.step_size", 0.0, 0.2), ("model.num_iters", 0, 1),
    ("model.num_bases", 0, 1), ("model.temperature", 0.0, None), ("model.temperature", -1.0, 0.5),
    ("model.output_stride", 32, 16), ("model.dtype", "float16", "bfloat16"),
    ("train.batch_size", 0, 2), ("eval.num_iters", 0, None), ("train.learning_rate", float("nan"),
                                                              1e-3),
    ("eval.num_iters_sweep", "1,x", "1,2, 4"), ("data.scales", (), (1.0,)),
    ("model.kernel", "gauss", "rbf"), ("model.pretrained", "$UNSET_HEMNET_VAR/w.pth", ""),
    ("eval.padding", "offical", "official"), ("train.loss_normalization", "all", "all_pixels"),
    ("train.lr_update_every", 0, 10), ("train.norm_bias_lr_mult", -1.0, 2.0),
])
def test_a_value_outside_its_rule_is_named_with_the_allowed_range(key, bad, good):
    config = tiny_config()
    section, name = key.split(".")
    config[section][name] = good
    config_check.check(config)
    config[section][name] = bad
    with pytest.raises(config_check.ConfigError) as error:
        config_check.check(config)
    assert str(error.value).startswith(f"{key}={bad!r}: allowed: ")


def test_path_keys_expand_home_and_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HEMNET_TEST_WEIGHTS", "w")
    config = tiny_config()
    config.data.data_dir = "~/tfds"
    config.model.pretrained = "$HOME/${HEMNET_TEST_WEIGHTS}/r101.safetensors"
    config.data.manual_dir = "gs://bucket/~/x"
    config_check.check(config)
    assert config.data.data_dir == f"{tmp_path}/tfds"
    assert config.model.pretrained == f"{tmp_path}/w/r101.safetensors"
    assert config.data.manual_dir == "gs://bucket/~/x"  # URLs as given


def test_batch_must_divide_over_the_devices():
    config = tiny_config()  # batch 8
    config_check.check(config, datasets=datasets.registry(), num_devices=8)
    with pytest.raises(config_check.ConfigError, match=r"train\.batch_size=8: .* 3 devices"):
        config_check.check(config, num_devices=3)


# ---------------------------------------------------------------------------------------------
# The programs: one FATAL line each (issue 15, "Found" 1-10).


def test_found_1_readme_voc_command_as_written(tmp_path):
    """The README's VOC training command, verbatim, in a shell with HOME at a temporary folder
    that holds a fake VOC download: `~` in the overrides is expanded (no `./~` folder, the
    downloads found), and the missing weights file is the only complaint, before any work."""
    home = tmp_path / "home"
    manual = home / "tensorflow_datasets" / "downloads" / "manual"
    write_voc2012(manual, train=["2007_000032"], val=["2007_000033"], archive=False)
    write_sbd(manual, train=["2008_000003"], val=["2008_000008"], archive=False)
    readme = Path(REPO, "README.md").read_text()
    start = readme.index(".venv/bin/python train.py --config configs/voc.py")
    command = readme[start:readme.index("```", start)].strip()
    assert "--config.data.data_dir=~/tensorflow_datasets" in command
    before = _tree(home)
    result = _run(command.replace(".venv/bin/python", PYTHON, 1), _env(home))
    message = _fatal(result)
    assert message.startswith("FATAL: model.pretrained=")
    assert f"{home}/weights/resnet101-deep.safetensors" in message
    assert "manual_dir" not in message  # the data_dir's `~` was expanded: downloads found
    assert not Path(REPO, "~").exists()
    assert _tree(home) == before  # no workdir, no dataset folders


def test_found_2_senseless_values_are_listed_at_once_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    result = _run([PYTHON, "train.py", "--config", "configs/synthetic.py", "--workdir",
                   str(workdir), "--config.model.step_size=0", "--config.model.num_iters=0",
                   "--config.model.num_bases=0", "--config.data.crop_size=256",
                   f"--config.data.data_dir={tmp_path}/tfds"], _env())
    message = _fatal(result)
    assert message.startswith("FATAL: 4 config values not allowed")
    for line in ("model.step_size=0.0: allowed: a number in (0, 1]",
                 "model.num_iters=0: allowed: an integer >= 1",
                 "model.num_bases=0: allowed: an integer >= 1",
                 "data.crop_size=256: larger than the largest training image"):
        assert line in message
    assert not workdir.exists() and not (tmp_path / "tfds").exists()


def test_found_3_missing_files_and_a_bad_workdir_are_listed_at_once(tmp_path):
    """No download for an unbuilt dataset, a missing model.pretrained, a workdir that is a file."""
    home = tmp_path / "home"
    home.mkdir()
    workdir = tmp_path / "a_file"
    workdir.write_text("not a folder")
    result = _run([PYTHON, "train.py", "--config", "configs/voc.py", "--workdir", str(workdir),
                   "--config.model.pretrained=~/nowhere.pth"], _env(home))
    message = _fatal(result)
    assert message.startswith("FATAL: 3 config values not allowed")
    assert f"data.manual_dir='{home}/tensorflow_datasets/downloads/manual': no such folder" \
        in message
    assert f"model.pretrained='{home}/nowhere.pth': no such file" in message
    assert f"--workdir={str(workdir)!r}: a file, not a folder" in message
    assert _tree(home) == set() and workdir.read_text() == "not a folder"


def test_found_3_resuming_with_another_model_names_the_key(tmp_path):
    workdir = tmp_path / "run"
    _fake_checkpoint(workdir, tiny_config())
    before = _tree(workdir)
    result = _run([PYTHON, "train.py", "--config", "tests/tiny.py", "--workdir", str(workdir),
                   "--config.model.num_bases=4", f"--config.data.data_dir={tmp_path}/tfds"],
                  _env())
    message = _fatal(result)
    assert "model.num_bases: checkpoint 8, config 4" in message
    assert _tree(workdir) == before and not (tmp_path / "tfds").exists()


def test_found_3_a_missing_config_file_is_named(tmp_path):
    result = _run([PYTHON, "train.py", "--config", "configs/nope.py", "--workdir",
                   str(tmp_path / "run")], _env())
    message = _fatal(result)
    assert "configs/nope.py" in message and "object at 0x" not in message
    assert not (tmp_path / "run").exists()


def test_found_3_the_weights_converter_names_the_file(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 10)
    for args, named in [
        ([str(garbage), str(tmp_path / "out.safetensors")], str(garbage)),
        ([str(garbage), str(tmp_path / "missing" / "out.safetensors")],
         str(tmp_path / "missing")),
    ]:
        result = _run([PYTHON, "-m", "hemnet_jax.models.weights", *args], _env())
        assert named in _fatal(result)
    assert _tree(tmp_path) == {"garbage.safetensors"}


def test_found_3_a_corrupt_download_is_one_fatal_line(tmp_path):
    manual = tmp_path / "manual"
    write_voc2012(manual, train=["2007_000032"], val=["2007_000033"], archive=False)
    write_sbd(manual, train=["2008_000003"], val=["2008_000008"], archive=False)
    bad = manual / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000033.jpg"
    truncated_jpeg(bad)
    result = _run([PYTHON, "-m", "hemnet_jax.data.prepare", "voc2012_aug", "--manual_dir",
                   str(manual), "--data_dir", str(tmp_path / "data")], _env())
    assert str(bad) in _fatal(result)


def test_found_5_eval_names_the_checkpoints_dataset_before_touching_data(tmp_path):
    """eval.py with the VOC config on a workdir trained on synthetic scenes: the checkpoint's
    recorded dataset is named, and no dataset folder appears under ~/tensorflow_datasets."""
    home = tmp_path / "home"
    home.mkdir()
    workdir = tmp_path / "run"
    _fake_checkpoint(workdir, tiny_config())
    result = _run([PYTHON, "-X", "importtime", "eval.py", "--config", "configs/voc.py",
                   "--workdir", str(workdir)], _env(home))
    message = _fatal(result)
    assert "data.name: checkpoint 'synthetic_scenes/tiny', config 'voc2012_aug'" in message
    assert _tree(home) == set()
    # Checked once JAX is up (orbax reads the checkpoint), before TensorFlow loads.
    imported = _imported(result)
    assert "jax" in imported and "tensorflow" not in imported


HEAVY_LIBRARIES = {"jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "tensorflow_datasets"}


@pytest.mark.parametrize("program,args", [
    ("train.py", ["--config.model.step_size=0", "--workdir", "{tmp}/run"]),
    ("train.py", ["--config.model.stepsize=0", "--workdir", "{tmp}/run"]),
    ("train.py", ["--workdir", "{tmp}/run", "an_extra_argument"]),
    ("eval.py", ["--config.model.step_size=0", "--workdir", "{tmp}/run"]),
    ("eval.py", []),  # neither --workdir nor --checkpoint
])
def test_issue_21_a_command_line_mistake_is_alone_before_jax_and_tensorflow(tmp_path, program,
                                                                            args):
    """Issue 21, item 4: the FATAL line is the program's only output, and it comes before JAX
    or TensorFlow is imported (Python's import log, -X importtime, shows every import)."""
    command = [PYTHON, "-X", "importtime", program, "--config", "configs/synthetic.py",
               *(a.format(tmp=tmp_path) for a in args)]
    result = _run(command, _env())
    lines = (result.stdout + result.stderr).splitlines()
    output = [line for line in lines if not line.startswith("import time:")]
    assert result.returncode == 1 and len(output) == 1, output
    assert output[0].startswith("FATAL: "), output
    imported = _imported(result)
    assert "hemnet_jax.config_check" in imported and "absl.flags" in imported  # a real log
    assert not {name.split(".")[0] for name in imported} & HEAVY_LIBRARIES, output
    assert not (tmp_path / "run").exists()


def test_found_10_help_lists_every_flag_of_the_program():
    result = _run([PYTHON, "train.py", "--help"], _env())
    assert result.returncode == 1 and "Traceback" not in result.stderr  # absl's --help exits 1
    for flag in ("--config", "--workdir", "--coordinator_address", "--num_processes"):
        assert flag in result.stdout, result.stdout


def test_debug_variable_shows_the_traceback(tmp_path):
    result = _run([PYTHON, "train.py", "--config", "configs/synthetic.py", "--workdir",
                   str(tmp_path / "run"), "--config.model.num_iters=0"],
                  _env(HEMNET_DEBUG="1"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_readme_config_files_all_pass_the_check():
    for name in ("voc", "context", "cocostuff", "synthetic"):
        for variant in ("", ":emanet", ":r50_os16", ":r50_os16,emanet"):
            config_check.check(load_config_file(f"{REPO}/configs/{name}.py{variant}"),
                               datasets=datasets.registry(), num_devices=8)
