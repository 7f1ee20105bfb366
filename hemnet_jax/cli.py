"""Command-line plumbing shared by train.py, eval.py and the library's `python -m` tools.

`--config FILE[:ARG]` loads a config file; `--config.a.b=value` overrides a key. A mistyped key
ends the program with one line that names it and the keys that do exist there.

Every program's main runs under `run` (or `run_plain`): an expected error (`UserError`, e.g. a
config value `config_check` rejects, a checkpoint of another model, a missing download) ends it
with one `FATAL:` line and exit code 1; `HEMNET_DEBUG=1` shows its traceback too. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import difflib
import functools
import gc
import importlib.util
import json
import logging as std_logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from ml_collections import config_flags

from hemnet_jax import accelerators, storage
from hemnet_jax.errors import UserError


class ConfigFileError(FileNotFoundError, UserError):
    """The --config file does not exist."""


def require_config_file(spec: str) -> None:
    """Raises ConfigFileError unless the file of `FILE[:ARG]` exists."""
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise ConfigFileError(
            f"--config {spec}: no such file {path!r}. Pass a config file such as "
            "configs/synthetic.py (relative to the current folder)."
        )


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` the way `--config` does (get_config(arg))."""
    require_config_file(spec)
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_hemnet_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigFileError(f"--config {spec}: {path!r} is not a Python file.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def config_spec(argv: Sequence[str]) -> str | None:
    """The FILE[:ARG] of `--config` in argv, if any."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[list(argv).index("--config") + 1]
    return spec


def unknown_override(argv: Sequence[str]) -> str | None:
    """The message for the first `--config.KEY=` override naming a key the config lacks."""
    spec = config_spec(argv)
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
    spec = config_spec(argv[1:])
    try:
        if spec is not None:
            require_config_file(spec)  # else absl prints a traceback and an _ErrorConfig object
    except ConfigFileError as e:
        fatal(str(e))
    try:
        rest = flags.FLAGS(argv)
    except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
        try:
            message = unknown_override(argv[1:])
        except UserError as user_error:  # e.g. an unknown variant
            message = str(user_error)
        except Exception:  # the config file itself is broken: its own error says more
            message = None
        fatal(message or f"bad command line: {e}")
    if spec is not None:
        try:
            flags.FLAGS.config  # noqa: B018  (config_flags defers a loading error to here)
        except Exception as e:
            try:
                load_config_file(spec)  # the error itself, not absl's wrapper of it
            except UserError as user_error:  # e.g. an unknown variant
                fatal(str(user_error))
            raise e
    return rest


# ---------------------------------------------------------------------------------------------
# The console and the run's log file: what a person reads.

# Library warnings that ask nothing of the user, each with its source.
HARMLESS_WARNINGS = (
    "Given directory is read only",  # orbax, on every read-only restore (eval, predict)
    "has no dataset_info.json",  # TFDS, looking for a dataset before building it
)


class ConsoleFilter(std_logging.Filter):
    """Keeps this project's records, clu's progress (steps/s, ETA) and metrics, and every
    library's warnings and errors, except HARMLESS_WARNINGS and clu's hyperparameter dump (the
    config is in the workdir's config.json). Libraries' INFO records are dropped."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        path = record.pathname
        if "/hemnet_jax/" in path or path == os.path.abspath(sys.argv[0]):
            return True
        if "/orbax/" in path:
            # Its error lines stay, their tracebacks go (a failed save is reported in one FATAL
            # line); its errors of waits ended because a save failed on another process go too
            # (training/save_barrier.py). Decided once per record: every handler filters it.
            if record.exc_info:
                record.save_aborted = type(record.exc_info[1]).__name__ == "SaveAborted"
                record.exc_info, record.exc_text = None, None
            if getattr(record, "save_aborted", False):
                return False
        if record.levelno >= std_logging.WARNING:
            return not any(text in str(record.msg) for text in HARMLESS_WARNINGS)
        return "/clu/" in path and not str(record.msg).startswith("[Hyperparameters]")


class LogFileOnly(std_logging.Filter):
    """Keeps clu's INFO records (every scalar written, its progress notes) off the console: they
    go to the run's log file, and the trainer's one line per log step says the progress."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "/clu/" not in record.pathname or record.levelno >= std_logging.WARNING


def quiet_library_logs() -> None:
    """Applies ConsoleFilter and LogFileOnly to absl's handler (the console)."""
    handler = absl_logging.get_absl_handler()
    handler.addFilter(ConsoleFilter())
    handler.addFilter(LogFileOnly())


def log_to_file(path: str) -> None:
    """Also writes what the console shows (absl's format) to `path`, a local file, appended."""
    handler = std_logging.FileHandler(path)
    handler.setFormatter(absl_logging.PythonFormatter())
    handler.addFilter(ConsoleFilter())
    std_logging.getLogger().addHandler(handler)


def start_run_files(config: ml_collections.ConfigDict, workdir: str, program: str,
                    index: int) -> None:
    """Creates `workdir`; process 0 (`index`, jax.process_index()) writes config.json there;
    every process logs what its console shows to `<program>.log` (`<program>.process<i>.log`
    beyond process 0); on gs:// the log is staged locally and copied into the bucket
    (`storage.Staging`)."""
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if index == 0:
        write_config_json(config, os.path.join(workdir, "config.json"))
    name = f"{program}.log" if index == 0 else f"{program}.process{index}.log"
    if storage.is_remote(workdir):  # logged locally, copied into the bucket at each sync
        log_to_file(storage.staging(workdir).resume(name))
    else:
        log_to_file(os.path.join(workdir, name))
    absl_logging.info("Config written to %s.", os.path.join(workdir, "config.json"))


def write_config_json(config: ml_collections.ConfigDict, path: str) -> None:
    """The resolved config as JSON (tuples as lists), written atomically where local."""
    text = json.dumps(config.to_dict(), indent=1, sort_keys=True) + "\n"
    if "://" in path:
        epath.Path(path).write_text(text)
        return
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


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



# ---------------------------------------------------------------------------------------------
# Expected errors: one FATAL line.

DEBUG_VARIABLE = "HEMNET_DEBUG"  # =1: a user error shows its full traceback too


def fatal(message: str) -> NoReturn:
    """Ends the program: `FATAL: message` on stderr, exit code 1."""
    print(f"FATAL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def user_error_in(error: BaseException) -> UserError | None:
    """`error` or the first UserError it was raised from (libraries such as TFDS re-raise)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def reporting_user_errors(main: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`main` with expected errors (UserError) turned into `fatal`; others keep their traceback,
    and so do expected ones when HEMNET_DEBUG=1."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except Exception as e:
            user_error = user_error_in(e)
            if user_error is None or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
                raise
            fatal(str(user_error))

    return wrapped


# The arguments for main when `parse_command_line` parsed them before `run`.
_parsed_argv: list[str] | None = None


def parse_command_line(define_flags: Callable[[], None],
                       check: Callable[[list[str]], None] | None = None) -> None:
    """A program's first step, before it imports JAX or TensorFlow (3-8 s on 2 busy cores):
    defines its flags (and absl's --help), parses sys.argv and runs `check(argv)` (argv: what
    the flags left), the checks that need neither (the config's values, its folders). A mistake
    (a UserError or app.UsageError) ends here in one FATAL line, in about a second; `run` then
    uses this parse."""
    global _parsed_argv
    _start_program()
    app.define_help_flags()
    _define_program_flags(define_flags)
    _parsed_argv = parse_flags(sys.argv)
    if check is not None:
        try:
            reporting_user_errors(check)(_parsed_argv)
        except app.UsageError as e:
            fatal(f"{e} (--help lists the flags)")


def run(main: Callable[[list[str]], Any], define_flags: Callable[[], None]) -> None:
    """A program's `__main__`: define its flags (all shown by --help), then absl's app.run with
    our flag parser (or `parse_command_line`'s parse) and expected errors reported as one FATAL
    line."""
    _start_program()
    if _parsed_argv is None:
        _define_program_flags(define_flags)
        app.run(reporting_user_errors(main), flags_parser=parse_flags)
    else:
        app.run(reporting_user_errors(main), flags_parser=lambda _: _parsed_argv)


# CPython collects its youngest generation every 700 container allocations. Importing TensorFlow
# and JAX and tracing a model allocate millions: a tiny train.py run (tests/tiny.py) spent 1.6-1.8 s
# of its 8.5-10 s of CPU in the collector, 0.3 s with 50,000 (measured; peak memory 966-973 MB
# either way). The older generations keep their ratios (one collection per 10 younger ones), so
# reference cycles are still collected, in full too, only after more allocations.
YOUNG_GENERATION_THRESHOLD = 50_000


def collect_garbage_less_often() -> None:
    """Raises the collector's youngest-generation threshold to `YOUNG_GENERATION_THRESHOLD`
    (idempotent; the other thresholds stay as they are)."""
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])


@functools.cache
def _start_program() -> None:
    collect_garbage_less_often()  # first: before TensorFlow and JAX are imported
    accelerators.keep_tpu_plugin_off_without_tpu()  # before JAX initialises a backend
    # Registered first, so it runs last at exit: Python's shutdown then skips collecting the
    # frozen objects (TensorFlow's and JAX's millions), which took 5 s at rest and 20-45 s on a
    # busy machine after the program's work was done and flushed.
    atexit.register(gc.freeze)
    storage.configure()  # before any layer opens a gs:// path


def _define_program_flags(define_flags: Callable[[], None]) -> None:
    before = set(flags.FLAGS)
    define_flags()
    for name in sorted(set(flags.FLAGS) - before):  # --help lists the main module's key flags
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def run_plain(main: Callable[[list[str]], Any]) -> None:
    """`run` for a program that parses its own arguments: main(sys.argv) (the program name
    first, as absl passes it) with expected errors as FATAL lines."""
    _start_program()
    reporting_user_errors(main)(sys.argv)
