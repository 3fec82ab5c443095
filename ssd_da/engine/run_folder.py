"""The output folder of a training run: never silently replaced, cleaned only when asked.

A rerun of a command into a folder that already holds a run would replace its checkpoints and
append a second run's records to its log; :func:`check_run_folder` refuses it unless the run is
resumed (``--resume``) or replaced on purpose (``--overwrite``, :func:`clear_run`).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

# What a run writes besides config.yaml (which alone means nothing was trained: the ablation
# runner writes it before starting tools/train.py on it).
RUN_FILES = ("last.pth", "best.pth", "log.jsonl", "summary.json", "curves.png")
# Folders a run may write (--tensorboard's events), deleted with the run by clear_run.
RUN_FOLDERS = ("tensorboard",)
# save_checkpoint's temporary files: .last.pth.<random>.tmp, .best.pth.<random>.tmp
TEMPORARY_PATTERNS = (".last.pth.*.tmp", ".best.pth.*.tmp")


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (the message says why and what to do)."""


def existing_run_files(out_dir: Path) -> list[str]:
    """Names of :data:`RUN_FILES` present in ``out_dir``."""
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def check_folder_path(out_dir: Path, option: str = "--output-dir") -> None:
    """RunFolderError unless ``out_dir`` is, or could be created as, a folder."""
    for part in (out_dir, *out_dir.parents):
        if part.exists() and not part.is_dir():
            raise RunFolderError(f"{option} {out_dir}: {part} exists and is not a folder; "
                                 f"give a folder path, or move that file away")


def check_run_folder(out_dir: Path, resume: Path | None, overwrite: bool) -> None:
    """Raise :class:`RunFolderError` unless ``out_dir`` may receive this run: it is (or would
    be) a folder, and it holds no run, or the run it holds is the one resumed, or ``overwrite``
    (which may not delete the checkpoint being resumed). Reads nothing but names and writes
    nothing."""
    check_folder_path(out_dir)
    if overwrite and resume is not None and Path(resume).resolve().parent == out_dir.resolve():
        raise RunFolderError(
            f"--resume {resume} --overwrite: --overwrite would delete the run being resumed "
            f"(its last.pth, best.pth and log.jsonl in {out_dir}); to continue it, drop "
            f"--overwrite; to start again, drop --resume")
    found = existing_run_files(out_dir)
    if not found or overwrite:
        return
    if resume is not None and Path(resume).resolve().parent == out_dir.resolve():
        return  # continuing the run that lives there
    if (out_dir / "last.pth").exists():
        hint = f"continue it with --resume {out_dir / 'last.pth'}"
    else:
        hint = "it has no last.pth to continue from (stopped before its first checkpoint)"
    raise RunFolderError(
        f"{out_dir} already holds a run ({', '.join(found)}); starting another there would "
        f"replace its checkpoints and mix two runs in its log. {hint[0].upper()}{hint[1:]}, "
        f"pass --overwrite to delete it and start again, or choose another --output-dir")


def clear_run(out_dir: Path) -> None:
    """Delete the files of the run in ``out_dir`` (:data:`RUN_FILES`, :data:`RUN_FOLDERS`,
    config.yaml and checkpoint temporaries); other files in the folder are left alone."""
    removed = [name for name in (*RUN_FILES, "config.yaml") if (out_dir / name).exists()]
    for name in removed:
        (out_dir / name).unlink()
    for name in RUN_FOLDERS:
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
            removed.append(name + "/")
    removed += [p.name for p in remove_stale_temporaries(out_dir)]
    if removed:
        logger.warning("--overwrite: deleted the earlier run's %s in %s", ", ".join(removed), out_dir)


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete checkpoint temporaries left by a process killed while writing (each as large as a
    checkpoint). Call only when no other process writes checkpoints into ``out_dir``."""
    stale = sorted(p for pattern in TEMPORARY_PATTERNS for p in out_dir.glob(pattern))
    for path in stale:
        logger.info("removing %s (%.1f MB), left by a run killed while writing a checkpoint",
                    path, path.stat().st_size / 2**20)
        path.unlink()
    return stale


def adopt_log(resume: Path, out_dir: Path) -> None:
    """Resuming into another folder: start its log from the resumed run's, so that curves.png
    shows the whole run (records after the checkpoint are dropped when the run continues)."""
    source = Path(resume).parent / "log.jsonl"
    target = out_dir / "log.jsonl"
    if source.exists() and not target.exists() and source.resolve() != target.resolve():
        shutil.copyfile(source, target)
