"""Download and extract the PASCAL VOC archives: MD5-checked, resumable, extracted into a
VOCdevkit folder that ``--data-root`` takes as it is.

torchvision's ``download_url`` fetches a file in one go (no HTTP Range), so an interrupted 2 GB
download would start again from zero; the download loop here resumes a partial ``.part`` file
with a Range request and reuses torchvision's ``calculate_md5`` for the checksum. Extraction
strips the archives' leading ``VOCdevkit/`` so that the files land in any folder the user names.
"""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from torchvision.datasets.utils import calculate_md5
from tqdm import tqdm

logger = logging.getLogger(__name__)

DEFAULT_MIRROR = "https://thor.robots.ox.ac.uk/pascal/VOC/voc{year}"


@dataclass(frozen=True)
class VOCArchive:
    """One published VOC archive: its file name, the MD5 published with it, its year."""

    filename: str
    md5: str
    year: str


# The MD5s published with the archives (torchvision's VOCDetection checks the same ones; a test
# compares the two tables). VOC2012 test has no public annotations, so it is not offered.
VOC_ARCHIVES: dict[str, VOCArchive] = {
    "voc07_trainval": VOCArchive("VOCtrainval_06-Nov-2007.tar",
                                 "c52e279531787c972589f7e41ab4ae64", "2007"),
    "voc07_test": VOCArchive("VOCtest_06-Nov-2007.tar",
                             "b6e924de25625d8de591ea690078ad9f", "2007"),
    "voc12_trainval": VOCArchive("VOCtrainval_11-May-2012.tar",
                                 "6cd6e144f989b92b3379bac3b3de84fd", "2012"),
}


class DownloadError(RuntimeError):
    """A download failed (network, HTTP status) or its checksum does not match."""


def archive_url(archive: VOCArchive, mirror: str = DEFAULT_MIRROR) -> str:
    """``<mirror>/<file name>``; ``{year}`` in the mirror is replaced by the archive's year."""
    return mirror.replace("{year}", archive.year).rstrip("/") + "/" + archive.filename


def _open(url: str, offset: int, timeout: float) -> urllib.request.addinfourl:
    headers = {"User-Agent": "ssd_da-download_voc"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # Range not satisfiable: the partial file is already whole
            raise
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"{url}: cannot connect ({getattr(err, 'reason', err)}); "
                            f"try again (the download resumes) or pick another --mirror") from None


def _fetch(url: str, part: Path, timeout: float, chunk_size: int) -> None:
    """Append the rest of ``url`` to ``part``, resuming after its current size when the server
    honours Range (206); a server that answers 200 sends the whole file, so start over."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError:
        logger.info("%s: the partial download is already complete", part.name)
        return
    with response:
        resumed = offset > 0 and response.status == 206
        if offset and not resumed:
            logger.warning("%s: the server ignored the resume request; downloading from the "
                           "start", url)
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(part, "ab" if resumed else "wb") as fh, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name.removesuffix(".part")) as bar:
            try:
                while chunk := response.read(chunk_size):
                    fh.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                raise DownloadError(f"{url}: connection lost after {fh.tell()} bytes ({err!r}); "
                                    f"run again to resume from {part}") from None
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"{url}: connection closed after {part.stat().st_size} of {total} "
                            f"bytes; run again to resume from {part}")


def download(url: str, dest: Path, md5: str, timeout: float = 60.0,
             chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest`` and check its MD5; resumes a ``dest.part`` left by an
    interrupted run, and skips the download when ``dest`` is already there with the right MD5.

    Raises:
        DownloadError: network or HTTP failure (the partial file is kept for the next run), or a
            checksum mismatch (naming the file and both checksums; the bad file is removed).
    """
    dest = Path(dest)
    if dest.is_file():
        if calculate_md5(dest) == md5:
            logger.info("%s: already downloaded, MD5 %s checked", dest, md5)
            return dest
        logger.warning("%s exists but its MD5 is not %s; downloading it again", dest, md5)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    logger.info("downloading %s to %s", url, dest)
    _fetch(url, part, timeout, chunk_size)
    actual = calculate_md5(part)
    if actual != md5:
        part.unlink()
        raise DownloadError(f"{dest.name} from {url}: MD5 is {actual}, expected {md5}. The file "
                            f"was removed; run again to download it anew, or use another --mirror")
    os.replace(part, dest)
    return dest


def _strip_member(member: tarfile.TarInfo, strip: str, archive: Path) -> str | None:
    """The member's path below ``strip``/ (None for ``strip`` itself or entries outside it);
    absolute paths, '..' and links pointing out of the tree are errors."""
    parts = PurePosixPath(member.name).parts
    if member.name.startswith("/") or ".." in parts:
        raise DownloadError(f"{archive}: unsafe path {member.name!r} in the archive; "
                            f"not extracting")
    if member.issym() or member.islnk():
        raise DownloadError(f"{archive}: link {member.name!r} in the archive; VOC archives "
                            f"have none")
    if not parts or parts[0] != strip or len(parts) == 1:
        return None
    return "/".join(parts[1:])


def extract(archive: Path, data_root: Path, strip: str = "VOCdevkit") -> int:
    """Extract ``archive`` into ``data_root``, dropping the leading ``strip`` folder that VOC
    archives put around ``VOC2007/`` or ``VOC2012/``. Returns the number of files written.
    Members outside ``strip`` are skipped with a warning."""
    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    count = 0
    skipped = 0
    with tarfile.open(archive) as tar:
        for member in tqdm(tar, desc=f"extract {archive.name}", unit=" files"):
            rel = _strip_member(member, strip, archive)
            if rel is None:
                skipped += member.isfile()
                continue
            target = data_root / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None  # a regular file member always has data
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
    if skipped:
        logger.warning("%s: %d files outside %s/ were not extracted", archive, skipped, strip)
    return count


def done_marker(data_root: Path, archive: VOCArchive) -> Path:
    """A file that records a finished download + extraction of ``archive`` under ``data_root``."""
    return Path(data_root) / ".downloads" / (archive.filename + ".done")


def fetch_archive(name: str, data_root: Path, archive_dir: Path, mirror: str = DEFAULT_MIRROR,
                  keep_archive: bool = True, timeout: float = 60.0) -> bool:
    """Download (or resume) the archive of split ``name``, check it and extract it into
    ``data_root``. Returns False when a previous run had already finished it (nothing done).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones).
        DownloadError: see :func:`download`.
    """
    if name not in VOC_ARCHIVES:
        raise ValueError(f"unknown VOC set {name!r}; valid names: {', '.join(VOC_ARCHIVES)}")
    archive = VOC_ARCHIVES[name]
    marker = done_marker(data_root, archive)
    extracted = (Path(data_root) / f"VOC{archive.year}" / "Annotations").is_dir()
    if extracted and marker.is_file() and marker.read_text().strip() == archive.md5:
        logger.info("%s: already downloaded and extracted into %s", name, data_root)
        return False
    path = download(archive_url(archive, mirror), Path(archive_dir) / archive.filename, archive.md5,
                    timeout=timeout)
    count = extract(path, data_root)
    logger.info("%s: %d files extracted into %s", name, count, data_root)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(archive.md5 + "\n")
    if not keep_archive:
        path.unlink()
    return True
