"""One run per folder at a time: an OS-level lock on a run folder (or an ablation suite's).

Two trainings started into one folder would interleave its log.jsonl and replace each other's
checkpoints. :func:`hold_folder_lock` takes ``flock`` on ``<folder>/.lock`` for as long as the
run lives; a second process that asks for it fails at once with :class:`FolderLockedError`
naming the holder (pid, host, start time, command), which the tools report with exit status 2.
The kernel releases the lock when its process ends, however it ends (a crash or SIGKILL
included): a ``.lock`` file left behind never blocks anyone. ``flock`` works between processes
of one machine, and between machines on NFS (Linux clients map it to NFS byte-range locks).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no lock, said once per run
    fcntl = None  # type: ignore[assignment]

from ssd_da.engine.run_folder import RunFolderError, check_folder_path

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class FolderLockedError(RunFolderError):
    """Another live process holds the folder's lock (the message names it)."""


def _holder_line() -> str:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "python"
    return f"pid {os.getpid()} on host {socket.gethostname()}, started {started}: {command}\n"


def _open_locked(path: Path, folder: Path, option: str) -> int | None:
    """A descriptor of ``path`` holding its exclusive lock, or None where the filesystem has no
    locks (said in a warning); FolderLockedError if another process holds it. Retries when the
    holder deleted the file between our open and lock (we would hold a lock on a file nobody
    else can see)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: held by a live process
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise FolderLockedError(
                f"{option} {folder} is in use by another run ({holder}); two runs in one "
                f"folder would mix their logs and checkpoints: wait for it to end, stop it, or "
                f"choose another {option}") from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
            os.close(fd)
            path.unlink(missing_ok=True)
            logger.warning("%s: cannot lock %s (%s); nothing keeps a second run out of it",
                           option, folder, exc)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def hold_folder_lock(folder: str | Path, option: str = "--output-dir",
                     enabled: bool = True) -> Iterator[None]:
    """Hold ``folder``'s lock for the block (module docstring); ``enabled=False`` does nothing
    (processes of a torchrun job other than rank 0, which holds it for them all).

    The folder is created if needed; if the block fails and the folder (or its parents) did not
    exist before, they are removed again when empty, so a refused run leaves nothing behind.

    Raises:
        FolderLockedError: another live process holds the lock.
        RunFolderError: ``folder`` or one of its parents exists as a file.
    """
    folder = Path(folder)
    if not enabled:
        yield
        return
    if fcntl is None:
        logger.warning("no file locking on this system: nothing keeps a second run out of %s",
                       folder)
        yield
        return
    check_folder_path(folder, option)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        fd = _open_locked(path, folder, option)
    except BaseException:
        _remove_empty(created)
        raise
    if fd is None:
        try:
            yield
        finally:
            _remove_empty(created)
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_line().encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiting opener then makes a new file
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this lock created (innermost first) if nothing was put in them."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
