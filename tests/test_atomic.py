"""Outputs are whole or absent: a write that fails, or a clean-up that fails, never leaves half an output."""

from __future__ import annotations

import shutil

import pytest

from braintumor import atomic
from braintumor.atomic import atomic_path, leftovers


def write_folder(target, files: dict[str, str]) -> None:
    with atomic_path(target) as tmp:
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text)


def test_a_failing_removal_of_the_old_folder_leaves_the_new_one_whole(tmp_path, monkeypatch):
    target = tmp_path / "out"
    write_folder(target, {f"old{k}.txt": "old" for k in range(5)})
    real_rmtree = shutil.rmtree

    def dies_midway(path, *args, **kwargs):
        """Delete one file of the folder, then fail, as a kill or a full disk would part-way through."""
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if files:
            files[0].unlink()
        raise OSError("interrupted")

    monkeypatch.setattr(atomic.shutil, "rmtree", dies_midway)
    with pytest.raises(OSError, match="interrupted"):
        write_folder(target, {"new.txt": "new"})
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # the new output, whole
    monkeypatch.setattr(atomic.shutil, "rmtree", real_rmtree)
    assert leftovers(target)  # the old copy waits in its staging folder ...
    write_folder(target, {"newer.txt": "x"})
    assert not leftovers(target)  # ... until the next write of the same output removes it
    assert sorted(p.name for p in target.iterdir()) == ["newer.txt"]


def test_a_failing_write_keeps_the_previous_output(tmp_path):
    target = tmp_path / "out"
    write_folder(target, {"a.txt": "1"})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert not leftovers(target)


def test_staging_folders_are_ignored_by_git_and_dvc(tmp_path, monkeypatch):
    """A killed stage's staging folder must not show up as a change to commit or to track."""
    import pathspec

    from conftest import REPO

    target = tmp_path / "artifacts" / "train"
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *args, **kwargs: None)  # killed before its clean-up
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "model.keras").write_text("half")
        raise RuntimeError("killed")
    (staging,) = leftovers(target)
    relative = staging.relative_to(tmp_path).as_posix()
    for name in (".gitignore", ".dvcignore"):  # both read their files with git's rules
        spec = pathspec.GitIgnoreSpec.from_lines((REPO / name).read_text().splitlines())
        assert spec.match_file(relative + "/model.keras"), name
        assert not spec.match_file("artifacts/train/model.keras"), name  # and a finished output is not ignored
