"""Download PASCAL VOC2007 trainval, VOC2007 test and VOC2012 trainval into a VOCdevkit folder.

    python tools/download_voc.py                                  # all three into data/VOCdevkit
    python tools/download_voc.py --sets voc07_trainval,voc07_test # VOC2007 only
    python tools/download_voc.py --mirror https://pjreddie.com/media/files

The folder is what --data-root takes (data/VOCdevkit is the default of tools/train.py). Each
archive is checked against its published MD5; an interrupted download resumes where it stopped
when run again (HTTP Range), and archives already downloaded and extracted are skipped. The
archives are uncompressed tar files of about 0.44, 0.43 and 1.9 GB; extracted, they take as much
again (--remove-archives deletes each one once it is extracted).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ssd_da.data.download import DEFAULT_MIRROR, VOC_ARCHIVES, DownloadError, fetch_archive
from ssd_da.utils.cli import report_error, run_program


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data/VOCdevkit",
                   help="the VOCdevkit folder to fill (VOC2007/, VOC2012/); default data/VOCdevkit")
    p.add_argument("--sets", default=",".join(VOC_ARCHIVES),
                   help=f"comma-separated, from {', '.join(VOC_ARCHIVES)} (default: all)")
    p.add_argument("--archive-dir", default=None,
                   help="where the .tar files go (default: the data root's parent folder)")
    p.add_argument("--mirror", default=DEFAULT_MIRROR,
                   help="base URL holding the .tar files; {year} becomes 2007 or 2012 "
                        f"(default {DEFAULT_MIRROR})")
    p.add_argument("--remove-archives", action="store_true",
                   help="delete each .tar after it is extracted")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    return p


def run(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in names if s not in VOC_ARCHIVES]
    if not names or unknown:
        return report_error("download_voc.py", f"--sets: unknown set "
                            f"{unknown[0] if unknown else args.sets!r}; valid names: "
                            f"{', '.join(VOC_ARCHIVES)}")
    data_root = Path(args.data_root)
    archive_dir = Path(args.archive_dir) if args.archive_dir else data_root.parent
    try:
        for name in names:
            fetch_archive(name, data_root, archive_dir, mirror=args.mirror,
                          keep_archive=not args.remove_archives, timeout=args.timeout)
    except (DownloadError, OSError) as exc:
        return report_error("download_voc.py", exc)
    print(f"VOC sets {', '.join(names)} are in {data_root}: "
          f"python tools/train.py --data-root {data_root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line ``argv`` (default: ``sys.argv[1:]``) parsed and run; the exit status."""
    return run(get_args_parser().parse_args(argv))


def script() -> None:
    """The program (``tools/download_voc.py``, ``python -m ssd_da.cli.download_voc``): logging set up, then
    :func:`main` on the command line; exits with its status."""
    run_program(main, timestamps=True)


if __name__ == "__main__":
    script()
