"""DVC re-runs a stage only when one of its deps changes: each stage's deps must list exactly the code it runs."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = REPO / "src" / "braintumor"


def imported_modules(path: Path) -> set[str]:
    """The `braintumor.*` modules a file imports anywhere (at the top or inside a function, which runs too):
    `from braintumor.data import dedup` imports the package `braintumor.data` and its module `dedup`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("braintumor.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "braintumor" or node.module.startswith("braintumor."):
                found.add(node.module)
                found |= {
                    f"{node.module}.{alias.name}"
                    for alias in node.names
                    if module_file(f"{node.module}.{alias.name}").is_file()  # a module, not a name in one
                }
    found.discard("braintumor")
    return found


def module_file(name: str) -> Path:
    """The file that `import name` runs: a module's .py, or a package's __init__.py."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def code_closure(entry: Path) -> set[str]:
    """Repository-relative paths of `entry` and every package module it imports, transitively (importing any
    submodule runs the __init__ of each package above it too)."""
    files, todo = {entry}, [entry]
    while todo:
        for name in imported_modules(todo.pop()):
            parts = name.split(".")
            for path in [module_file(".".join(parts[:k])) for k in range(2, len(parts))] + [module_file(name)]:
                if not path.is_file():
                    raise AssertionError(f"{name} is imported but {path} does not exist")
                if path not in files:
                    files.add(path)
                    todo.append(path)
    if len(files) > 1:
        files.add(PACKAGE / "__init__.py")
    return {path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path) for path in files}


# The pipeline of `dvc repro`, and the optional one that `dvc exp run benchmarks/dvc.yaml` runs (its wdir is the root).
PIPELINES = ("dvc.yaml", "benchmarks/dvc.yaml")
STAGES = {
    name: spec for file in PIPELINES for name, spec in yaml.safe_load((REPO / file).read_text())["stages"].items()
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_are_exactly_the_code_it_runs(stage):
    spec = STAGES[stage]
    command = spec["cmd"].split()
    assert command[:2] == ["python", f"stages/{stage}.py"], f"{stage}: expected `python stages/{stage}.py`"
    listed = {dep for dep in spec["deps"] if dep.endswith(".py")}
    needed = code_closure(REPO / command[1])
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing, f"dvc.yaml stage `{stage}` runs {missing} but does not list it in its deps"
    assert not extra, f"dvc.yaml stage `{stage}` lists {extra} in its deps, but never imports it"


def test_the_closure_follows_lazy_and_package_imports(tmp_path, monkeypatch):
    """The walk itself: an import inside a function and `from braintumor import x` both count."""
    entry = tmp_path / "entry.py"
    entry.write_text("def f():\n    from braintumor.data import ixi\n")
    closure = code_closure(entry)
    assert "src/braintumor/data/ixi.py" in closure and "src/braintumor/errors.py" in closure  # ixi imports errors
    assert {"src/braintumor/__init__.py", "src/braintumor/data/__init__.py"} <= closure


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_runs_the_code_of_its_own_checkout(tmp_path, stage):
    """`dvc exp run --queue` runs stages in a temporary copy of the repository: the copy's code must run, not the
    installed package's (which is the main checkout's, and may have changed since the experiment was queued)."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "stages", copy / "stages")
    shutil.copytree(REPO / "src", copy / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    stage_py = copy / "src/braintumor/stage.py"
    stage_py.write_text(stage_py.read_text().replace("(see dvc.yaml)", "(the copy's code)"))
    result = subprocess.run(
        [sys.executable, str(copy / "stages" / f"{stage}.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(the copy's code)" in result.stdout


TRAINING = {
    "src/braintumor/model/train.py",
    "src/braintumor/model/architectures.py",
    "src/braintumor/model/distribution.py",
}


@pytest.mark.parametrize("package", ["data"])
def test_data_code_knows_no_model(package):
    for module in sorted((PACKAGE / package).glob("*.py")):
        touched = {path for path in code_closure(module) if path.startswith("src/braintumor/")}
        model_side = {path for path in touched if path.split("/")[2] in {"model", "quality", "registry", "serve"}}
        assert not model_side, f"{module.relative_to(REPO)} imports {sorted(model_side)}"


@pytest.mark.parametrize(
    "user", ["serve/predict.py", "serve/service.py", "quality/evaluate.py", "quality/explain.py", "quality/review.py"]
)
def test_using_or_judging_a_model_imports_no_training_code(user):
    assert not code_closure(PACKAGE / user) & TRAINING, f"{user} imports training code"
