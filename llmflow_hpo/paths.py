"""Checks of the folders and files a study will write, made before anything is written.

Each check says in a few words what is wrong with a path (a file where a folder should be, a folder
that cannot be made or written to), so the caller can report it as one line naming the setting. Nothing
here creates, changes or removes a file, except ``probe_folder``, which makes and removes one empty file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["folder_problem", "probe_folder", "writable_problem"]

# Kernel file systems: files cannot be made in them (creating one fails with "No such file or directory").
_VIRTUAL = (Path("/proc"), Path("/sys"))


def writable_problem(folder: Path) -> str | None:
    """Why files cannot be made in the existing folder ``folder``, or None (as far as can be told unwritten)."""
    resolved = folder.resolve()
    for root in _VIRTUAL:
        if resolved == root or root in resolved.parents:
            return f"{folder} is {'' if resolved == root else f'in {root}, '}a kernel file system where no file can be made"
    try:
        read_only = bool(os.statvfs(resolved).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"{folder} is on a read-only file system"
    if not os.access(resolved, os.W_OK | os.X_OK):
        return f"{folder} is not writable (permission denied)"
    return None


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as a folder to write into (made if missing), or None."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        return writable_problem(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, so the folder {path} cannot be made"
            problem = writable_problem(parent)
            return f"cannot make {path}: {problem}" if problem else None
    return None


def probe_folder(folder: Path) -> str | None:
    """Make and remove an empty file in the existing folder ``folder``: why that failed, or None.

    Catches what the checks above cannot see (a full disk, a network file system that refuses the user).
    """
    try:
        fd, name = tempfile.mkstemp(prefix=".llmflow-hpo-probe-", dir=folder)
    except OSError as e:
        return f"cannot make a file in {folder} ({e.strerror})"
    os.close(fd)
    os.unlink(name)
    return None
