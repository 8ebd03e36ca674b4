"""Listing the files under a folder without losing any: what is not read gets a reason, never silence.

`Path.rglob` passes over linked folders, broken links, FIFOs and folders it cannot list without a word;
fetch and `braintumor predict` list folders here instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def walk_files(root: Path) -> tuple[list[Path], list[tuple[Path | str, str, str]]]:
    """Every regular file under `root`, sorted, following linked folders; and (path, reason, detail) for each
    entry that is not read: a broken link, something that is not a file (a FIFO, a socket, a device), a folder
    that cannot be listed, a link to a folder already read (a loop, or two links to one folder)."""
    files, problems, unlistable = [], [], []
    seen = {os.path.realpath(root)}
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=unlistable.append):
        kept = []
        for sub in sorted(subfolders):
            real = os.path.realpath(Path(folder) / sub)
            if real in seen:
                problems.append(
                    (Path(folder) / sub, "linked_folder_read_already", f"a link to {real}, whose files are read once")
                )
            else:
                seen.add(real)
                kept.append(sub)
        subfolders[:] = kept
        for entry in names:
            path = Path(folder) / entry
            if path.is_symlink() and not path.exists():
                problems.append((path, "broken_link", f"points to {os.readlink(path)}, which does not exist"))
            elif not path.is_file():
                problems.append((path, "not_a_file", "not a regular file (a FIFO, socket or device)"))
            else:
                files.append(path)
    problems += [(err.filename, "unreadable_folder", f"cannot list it: {err.strerror}") for err in unlistable]
    return sorted(files), problems


def printable(path: Path | str) -> str:
    """`path` as text that any CSV writer takes: bytes of a name that is not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
