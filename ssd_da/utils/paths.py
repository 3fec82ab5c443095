"""Output paths checked before any work: a folder that is a file, or a file that is a folder,
fails with a message naming the option, not with ``[Errno 17] File exists`` at the end."""
from __future__ import annotations

from pathlib import Path


def check_dir(path: str | Path, option: str) -> Path:
    """ValueError naming ``option`` when ``path``, or one of its parents, exists as something
    other than a folder (so it could not be created or written into); writes nothing."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            what = "" if part == path else f" (inside {path})"
            raise ValueError(f"{option} {path}: {part}{what} exists and is not a folder; "
                             f"give a folder path, or move that file away")
    return path


def ensure_dir(path: str | Path, option: str) -> Path:
    """:func:`check_dir`, then create the folder ``path`` (and its parents)."""
    path = check_dir(path, option)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_input_file(path: str | Path, what: str) -> Path:
    """An input file that must exist: ValueError when ``path`` is a folder (saying so, not
    "does not exist"), FileNotFoundError when it is missing."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file (e.g. {path / '<name>'})")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def ensure_file_parent(path: str | Path, option: str) -> Path:
    """Check that ``path`` can be written as a file: not an existing folder, its folder created."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name, e.g. {path / 'out'}")
    ensure_dir(path.parent, option)
    return path
