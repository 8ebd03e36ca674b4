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
    """The `braintumor.*` modules a file imports anywhere (at the top or inside a function, which runs too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("braintumor.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "braintumor":  # from braintumor import ixi
                found |= {f"braintumor.{alias.name}" for alias in node.names}
            elif node.module.startswith("braintumor."):
                found.add(node.module)
    return found


def module_file(name: str) -> Path:
    return PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(".py")


def code_closure(entry: Path) -> set[str]:
    """Repository-relative paths of `entry` and every package module it imports, transitively (importing any
    submodule runs the package's __init__ too)."""
    files, todo = {entry}, [entry]
    while todo:
        for name in imported_modules(todo.pop()):
            path = module_file(name)
            if not path.is_file():
                raise AssertionError(f"{name} is imported but {path} does not exist")
            if path not in files:
                files.add(path)
                todo.append(path)
    if len(files) > 1:
        files.add(PACKAGE / "__init__.py")
    return {path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path) for path in files}


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


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
    entry.write_text("def f():\n    from braintumor import ixi\n")
    closure = code_closure(entry)
    assert "src/braintumor/ixi.py" in closure and "src/braintumor/errors.py" in closure  # ixi imports errors
    assert "src/braintumor/__init__.py" in closure


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
