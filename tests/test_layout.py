"""The package layout: imports point one way, only train.py imports the loop, old import paths
and checkpoints written before the layout change still work."""

import ast
import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from hemnet_jax import _compat, evaluation, trainer
from hemnet_jax.evaluation import predictors, validation
from hemnet_jax.training import sharding
from hemnet_jax.training.state import restore_for_eval

from .tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "hemnet_jax"
PROGRAMS = ("train.py", "eval.py")  # and benchmarks/*.py
LOOP = "hemnet_jax.trainer"

# Every project module belongs to a group of a rank; an import may go to its own group or to a
# group of lower rank, never up and never sideways (models and data are independent).
GROUP_RANKS = {
    "hemnet_jax.errors": -1,  # UserError, which every layer's expected errors subclass
    "hemnet_jax.accelerators": -0.5,  # the host's accelerators; the programs' start-up rule
    "hemnet_jax.config_check": 0,
    "hemnet_jax.hem": 0, "hemnet_jax.hem_diagnostics": 0, "hemnet_jax.config": 0,
    "hemnet_jax.cli": 0, "hemnet_jax._compat": 0, "hemnet_jax.storage": -0.5,
    "hemnet_jax.tpu_topology": 0, "hemnet_jax.gpu_topology": 0, "hemnet_jax.compiled_hlo": 0,
    "hemnet_jax.models": 1, "hemnet_jax.data": 1,
    "hemnet_jax": 1.5,  # the package face: hem and HEMUnit
    "hemnet_jax.training": 2,
    "hemnet_jax.evaluation": 3,
    "hemnet_jax.studies": 4,
    "hemnet_jax.plan": 4,  # python -m hemnet_jax.plan: compiles the steps for a TPU slice
    "hemnet_jax.trainer": 5,
    "programs": 6,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts) if parts[0] == PACKAGE else "programs." + ".".join(parts)


def _sources() -> dict[str, Path]:
    files = sorted((ROOT / PACKAGE).rglob("*.py")) + [ROOT / p for p in PROGRAMS]
    files += sorted((ROOT / "benchmarks").glob("*.py"))
    return {_module_name(p): p for p in files}


def _group(module: str) -> str:
    if module.startswith("programs."):
        return "programs"
    parts = module.split(".")
    return module if len(parts) == 1 else ".".join(parts[:2])


def _imports(tree: ast.Module, modules: set[str]):
    """(project module imported, the import node, at module level?) for every import."""
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     else node.module for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE:
                yield name, node, id(node) in top_level


@pytest.fixture(scope="module")
def graph() -> dict[str, dict]:
    sources = _sources()
    modules = set(sources)
    out = {}
    for name, path in sources.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        out[name] = {"path": path, "imports": list(_imports(tree, modules)), "tree": tree}
    return out


def test_no_function_level_imports_of_project_modules(graph):
    late = [f"{g['path'].relative_to(ROOT)}:{node.lineno} imports {name}"
            for g in graph.values() for name, node, top in g["imports"] if not top]
    assert not late, "project modules are imported at the top of a file:\n" + "\n".join(late)


def test_only_the_compat_module_imports_dynamically(graph):
    dynamic = [name for name, g in graph.items() if name != "hemnet_jax._compat"
               and "import_module" in g["path"].read_text()]
    assert not dynamic


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph `edges` (module -> imported modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_import_graph_has_no_cycles(graph):
    edges = {m: {n for n, _, _ in g["imports"] if n in graph and n != m} for m, g in graph.items()}
    assert _find_cycle(edges) is None, "import cycle: " + " -> ".join(_find_cycle(edges))
    # Not vacuous: the pre-layout trainer <-> gradient-flow cycle would be found.
    planted = {**edges, "hemnet_jax.studies.layer_gradients": {"hemnet_jax.trainer"}}
    assert _find_cycle(planted) is not None


def test_imports_point_one_way(graph):
    wrong = []
    for module, g in graph.items():
        src = _group(module)
        for target, node, _ in g["imports"]:
            dst = _group(target)
            if dst != src and GROUP_RANKS[dst] >= GROUP_RANKS[src]:
                wrong.append(f"{module}:{node.lineno} -> {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_only_train_py_imports_the_loop(graph):
    importers = {m for m, g in graph.items() if any(n == LOOP for n, _, _ in g["imports"])}
    assert importers == {"programs.train"}


def test_every_module_is_in_a_ranked_group(graph):
    assert {_group(m) for m in graph} <= set(GROUP_RANKS)


# ---------------------------------------------------------------------------------------------
# What moved keeps working for one release.


@pytest.mark.parametrize("old", sorted(_compat.MOVED_MODULES))
def test_old_module_paths_are_the_moved_modules(old):
    new = importlib.import_module(_compat.MOVED_MODULES[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new.__name__}"):
        module = importlib.import_module(old)
    assert module is new and new.__spec__.name == new.__name__


def test_old_attribute_paths_warn_and_resolve():
    with pytest.warns(DeprecationWarning, match="evaluation.predictors.make_predictor"):
        assert evaluation.make_predictor is predictors.make_predictor
    with pytest.warns(DeprecationWarning, match="evaluation.validation.validate"):
        assert trainer.validate is validation.validate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
            _ = trainer.no_such_name


def test_old_program_path_runs_the_moved_program():
    """`python -m hemnet_jax.weights` (before 0.2) still runs the weights program, and says
    where it moved."""
    result = subprocess.run(
        [sys.executable, "-m", "hemnet_jax.weights"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120,
    )
    assert result.returncode == 1
    assert "usage: python -m hemnet_jax.models.weights IN.pth OUT.safetensors" in result.stderr
    assert "python -m hemnet_jax.weights moved to python -m hemnet_jax.models.weights" in (
        result.stderr
    )


def test_checkpoint_written_before_the_layout_change_restores(tmp_path):
    """tests/data/legacy_v0_1_0: a tiny training checkpoint written by the code before the move
    (see make.py there) and the eval-mode logits it gave; today's code restores it to the same
    function."""
    legacy = ROOT / "tests" / "data" / "legacy_v0_1_0"
    shutil.copytree(legacy / "checkpoints", tmp_path / "checkpoints")
    restored = restore_for_eval(tiny_config(), workdir=str(tmp_path),
                                mesh=sharding.create_mesh(jax.local_devices()[:1]))
    x = np.linspace(-1, 1, 33 * 33 * 3, dtype=np.float32).reshape(1, 33, 33, 3)
    apply = jax.jit(lambda v, x: restored.model.apply(v, x, train=False)["logits"])
    logits = apply(restored.variables, x)
    expected = np.load(legacy / "logits.npy")
    assert restored.step == 3
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected).max() > 0.1  # a real function, not zeros
