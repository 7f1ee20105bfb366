"""Old import paths of the modules that moved in 0.2 (the package layout by role), for one release.

`import hemnet_jax.restore`, `from hemnet_jax import parallel`, `trainer.validate` and
`python -m hemnet_jax.predict` keep working and warn with the new path; they go in 0.3. This is
the package's only dynamic import: the old names resolve to the very same module objects (and
`lazy_attributes` serves the package face's names on first use).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

REMOVED_IN = "0.3"

MOVED_MODULES = {
    "hemnet_jax.hem_unit": "hemnet_jax.models.hem_unit",
    "hemnet_jax.weights": "hemnet_jax.models.weights",
    "hemnet_jax.report": "hemnet_jax.models.report",
    "hemnet_jax.optim": "hemnet_jax.training.optim",
    "hemnet_jax.losses": "hemnet_jax.training.losses",
    "hemnet_jax.checkpointing": "hemnet_jax.training.checkpointing",
    "hemnet_jax.parallel": "hemnet_jax.training.sharding",
    "hemnet_jax.train_state": "hemnet_jax.training.state",
    "hemnet_jax.restore": "hemnet_jax.training.state",
    "hemnet_jax.metrics": "hemnet_jax.evaluation.metrics",
    "hemnet_jax.eval_runner": "hemnet_jax.evaluation.runner",
    "hemnet_jax.predict": "hemnet_jax.evaluation.predict",
    "hemnet_jax.visualize": "hemnet_jax.evaluation.visualize",
}


def _warn(old: str, new: str, category: type[Warning] = DeprecationWarning) -> None:
    warnings.warn(
        f"{old} moved to {new}; the old name goes in hemnet-jax {REMOVED_IN}.",
        category,
        stacklevel=3,
    )


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the moved module itself (one module object, one state)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=MOVED_MODULES[fullname])

    def __init__(self):
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = MOVED_MODULES[spec.name]
        _warn(spec.name, new)
        module = importlib.import_module(new)
        self._specs[new] = module.__spec__  # the import system re-points __spec__ at the alias
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._specs[module.__name__]  # already executed under its new name

    def get_code(self, fullname: str) -> types.CodeType:
        """`python -m OLD`: runs the moved program's code as __main__."""
        new = MOVED_MODULES[fullname]
        _warn(f"python -m {fullname}", f"python -m {new}", FutureWarning)
        return importlib.util.find_spec(new).loader.get_code(new)


def install() -> None:
    """Adds the old-path resolver to the import system (once)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())


def moved_attributes(module_name: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that serves names which moved to other modules, with a warning."""
    return _served(module_name, {name: f"{module}:{name}" for name, module in moved.items()},
                   warn=True)


def lazy_attributes(module_name: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports a name's module on first use, without a warning:
    names maps a name to "module" (the module itself) or "module:attribute". The package face
    (`hemnet_jax.hem`, `hemnet_jax.HEMUnit`) is served so, so that importing the package (and
    `hemnet_jax.cli`) loads no JAX: a program's command line is checked in a second."""
    return _served(module_name, names, warn=False)


def _served(module_name: str, names: dict[str, str], *, warn: bool) -> Callable[[str], Any]:
    def __getattr__(name: str) -> Any:
        if name in names:
            module, _, attribute = names[name].partition(":")
            if warn:
                _warn(f"{module_name}.{name}", f"{module}.{name}")
            loaded = importlib.import_module(module)
            return getattr(loaded, attribute) if attribute else loaded
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
