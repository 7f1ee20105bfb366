"""Command-line plumbing shared by train.py, eval.py and the library's `python -m` tools.

`--config FILE[:ARG]` loads a config file; `--config.a.b=value` overrides a key. A mistyped key
ends the program with one line that names it and the keys that do exist there.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as std_logging
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` the way `--config` does (get_config(arg))."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_hemnet_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"Config file {path!r} not found.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_override(argv: Sequence[str]) -> str | None:
    """The message for the first `--config.KEY=` override naming a key the config lacks."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv:
        spec = argv[list(argv).index("--config") + 1]
    if spec is None:
        return None
    config = load_config_file(spec)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        node, walked = config, []
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(part, known, n=3)
                where = "config." + ".".join(walked) if walked else "config"
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                return (
                    f"Unknown config key {path!r} in {arg!r}: {where} has no key {part!r}.{hint}"
                    f" Known keys there: {', '.join(known)}."
                )
            node, walked = node[part], walked + [part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """`flags_parser` for absl's app.run: parses, or exits with a clear line on a bad override."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
        try:
            message = unknown_override(argv[1:])
        except Exception:  # the config file itself is broken: its own error says more
            message = None
        print(f"FATAL: {message or f'bad command line: {e}'}", file=sys.stderr)
        sys.exit(2)


class _QuietLibraries(std_logging.Filter):
    """Drops INFO records of orbax's internals so the training log shows the run itself."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())


# ---------------------------------------------------------------------------------------------
# Flags the programs share. Defined only by a program's `__main__`, never at library import.


def define_config_flag(help_text: str = "A configs/*.py file, optionally with :variant.") -> None:
    """`--config FILE[:ARG]` with `--config.key=value` overrides of existing keys only."""
    config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
    flags.mark_flag_as_required("config")


def define_checkpoint_flags() -> None:
    """`--workdir` (its latest checkpoint) or `--checkpoint` (a step directory)."""
    flags.DEFINE_string("workdir", None, "A training workdir: its latest checkpoint is used.")
    flags.DEFINE_string(
        "checkpoint", None, "A checkpoint step directory (WORKDIR/checkpoints/STEP) instead."
    )


def require_checkpoint_source() -> None:
    """Usage error unless --workdir or --checkpoint was given."""
    if not (flags.FLAGS.workdir or flags.FLAGS.checkpoint):
        raise app.UsageError("Pass --workdir (its latest checkpoint) or --checkpoint PATH.")


def define_distributed_flags() -> None:
    """Multi-process flags; `distributed_args` reads them."""
    flags.DEFINE_string("coordinator_address", "", "Multi-process: the coordinator's HOST:PORT.")
    flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes in all.")
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
    flags.DEFINE_bool(
        "distributed", False, "Call jax.distributed.initialize() with auto-detection."
    )


def distributed_args() -> dict[str, Any]:
    """The multi-process flags as `training.sharding.initialize_distributed`'s arguments."""
    f = flags.FLAGS
    return {
        "coordinator_address": f.coordinator_address,
        "num_processes": f.num_processes,
        "process_id": f.process_id,
        "force": f.distributed,
    }


def no_extra_arguments(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")


def run(main, define_flags) -> None:
    """A program's `__main__`: define its flags, then absl's app.run with our flag parser."""
    define_flags()
    app.run(main, flags_parser=parse_flags)
