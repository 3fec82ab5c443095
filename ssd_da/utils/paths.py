"""Output paths checked before any work: a folder that is a file, or a file that is a folder,
fails with a message naming the option, not with ``[Errno 17] File exists`` at the end."""
from __future__ import annotations

from pathlib import Path


def ensure_dir(path: str | Path, option: str) -> Path:
    """Create the folder ``path`` (and its parents); ValueError naming ``option`` when it, or
    one of its parents, exists as something other than a folder."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            what = "" if part == path else f" (inside {path})"
            raise ValueError(f"{option} {path}: {part}{what} exists and is not a folder; "
                             f"give a folder path, or move that file away")
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_file_parent(path: str | Path, option: str) -> Path:
    """Check that ``path`` can be written as a file: not an existing folder, its folder created."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name, e.g. {path / 'out'}")
    ensure_dir(path.parent, option)
    return path
