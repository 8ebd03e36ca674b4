"""Atomic writes: a stage that fails or is killed half-way leaves its previous outputs, or nothing, never a torso.

An output is built in a staging folder beside it (`.<name>.partial-*`, ignored by git and DVC), then swapped
in by renames: a file replaces the old one in one step; a folder first moves the old one aside into the
staging folder, then takes its place, and only then is the old one deleted. A kill at any point leaves the
old output whole, the new one whole, or (between the two renames of a folder) none; leftovers of a killed
write are removed by the next write of the same output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a frame is written through its own method: no pandas import for the paths that need none
    import pandas as pd

STAGING = ".partial-"


def leftovers(target: Path) -> list[Path]:
    """Staging folders of earlier writes of `target` that did not finish (killed before their clean-up)."""
    return sorted(p for p in target.parent.glob(f".{target.name}{STAGING}*") if p.is_dir())


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `target` (file or folder), on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in leftovers(target):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING}", dir=target.parent))
    tmp = staging / target.name
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            os.replace(target, staging / "previous")  # aside, still whole
        os.replace(tmp, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: str | Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
