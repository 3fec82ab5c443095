"""tools/download_voc.py and ssd_da/data/download.py against a local HTTP server (127.0.0.1):
download, resume with HTTP Range, checksum failures, skipping finished work, extraction.
Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import tarfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from ssd_da.cli import download_voc
from ssd_da.data import download as dl
from ssd_da.data.voc import VOCDetection

REPO = Path(__file__).resolve().parents[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-`` unless ``server.ignore_range``; with
    ``server.cut_after`` set, announces the full length but closes after that many bytes."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not srv.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            body = body[: srv.cut_after]
            self.close_connection = True
        # Counted before the write: the client may read the body and the test assert on `sent`
        # before this thread runs again (a race seen on a loaded machine).
        srv.sent.append(len(body))
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.sent = {}, [], []
    srv.ignore_range, srv.cut_after = False, None
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _voc_tar(year: str, image_set: str, image_id: str, box: tuple[int, int, int, int],
             padding: int = 300_000) -> bytes:
    """An uncompressed tar laid out as the VOC archives are (VOCdevkit/VOC<year>/...): one
    image with one 'cat' box, its set file, and incompressible padding so a download takes
    several reads."""
    buf = io.BytesIO()
    image = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(image, format="JPEG")
    coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    xml = (f"<annotation><filename>{image_id}.jpg</filename><size><width>40</width><height>30</height>"
           f"</size><object><name>cat</name><difficult>0</difficult><bndbox>{coords}</bndbox></object>"
           f"</annotation>")
    base = f"VOCdevkit/VOC{year}"
    members = {f"{base}/Annotations/{image_id}.xml": xml.encode(),
               f"{base}/JPEGImages/{image_id}.jpg": image.getvalue(),
               f"{base}/ImageSets/Main/{image_set}.txt": f"{image_id}\n".encode(),
               f"{base}/padding.bin": np.random.default_rng(0).bytes(padding)}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _serve_archives(server, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Serve test archives under the VOC file names at <base>/voc<year>/, with their MD5s
    patched into VOC_ARCHIVES."""
    tars = {"voc07_trainval": _voc_tar("2007", "trainval", "000005", (2, 3, 20, 25)),
            "voc07_test": _voc_tar("2007", "test", "000001", (5, 6, 30, 28)),
            "voc12_trainval": _voc_tar("2012", "trainval", "2008_000002", (1, 1, 10, 10))}
    for name, data in tars.items():
        old = dl.VOC_ARCHIVES[name]
        monkeypatch.setitem(dl.VOC_ARCHIVES, name,
                            dl.VOCArchive(old.filename, hashlib.md5(data).hexdigest(), old.year))
        server.files[f"/voc{old.year}/{old.filename}"] = data
    return tars


def _run(*argv: str) -> int:
    return download_voc.main(list(argv))


def test_download_extract_then_skip(server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tars = _serve_archives(server, monkeypatch)
    root = tmp_path / "data" / "VOCdevkit"
    assert _run("--data-root", str(root), "--mirror", server.base + "/voc{year}") == 0
    assert [path for path, _ in server.log] == [
        "/voc2007/VOCtrainval_06-Nov-2007.tar", "/voc2007/VOCtest_06-Nov-2007.tar",
        "/voc2012/VOCtrainval_11-May-2012.tar"]
    # The leading VOCdevkit/ is stripped: the folder given is the one --data-root takes.
    test = VOCDetection(root, "voc07_test", ["cat"])
    assert test.annotations[0].image_id == "000001"
    np.testing.assert_array_equal(test.annotations[0].boxes, [[4, 5, 29, 27]])  # XML minus 1
    assert len(VOCDetection(root, "voc07_trainval+voc12_trainval", ["cat"])) == 2
    # Archives kept beside the VOCdevkit folder, byte for byte.
    assert (tmp_path / "data" / "VOCtest_06-Nov-2007.tar").read_bytes() == tars["voc07_test"]
    assert not list((tmp_path / "data").glob("*.part"))
    # A second run finds everything done and asks the server for nothing.
    assert _run("--data-root", str(root), "--mirror", server.base + "/voc{year}") == 0
    assert len(server.log) == 3


def test_resume_after_a_lost_connection(server, tmp_path: Path) -> None:
    data = _voc_tar("2007", "test", "000001", (5, 6, 30, 28))
    md5 = hashlib.md5(data).hexdigest()
    server.files["/a.tar"] = data
    dest = tmp_path / "a.tar"
    server.cut_after = 100_000
    with pytest.raises(dl.DownloadError, match=r"100000 of \d+ bytes; run again to resume"):
        dl.download(server.base + "/a.tar", dest, md5, chunk_size=8192)
    part = tmp_path / "a.tar.part"
    assert part.stat().st_size == 100_000 and not dest.exists()
    server.cut_after = None
    dl.download(server.base + "/a.tar", dest, md5, chunk_size=8192)
    assert server.log[-1] == ("/a.tar", "bytes=100000-")
    assert server.sent == [100_000, len(data) - 100_000]  # only the rest was sent again
    assert dest.read_bytes() == data and not part.exists()


def test_a_server_ignoring_range_restarts_from_zero(server, tmp_path: Path) -> None:
    data = _voc_tar("2007", "test", "000001", (5, 6, 30, 28))
    server.files["/a.tar"] = data
    server.ignore_range = True
    (tmp_path / "a.tar.part").write_bytes(data[:5000])
    dl.download(server.base + "/a.tar", tmp_path / "a.tar", hashlib.md5(data).hexdigest())
    assert server.log == [("/a.tar", "bytes=5000-")] and server.sent == [len(data)]
    assert (tmp_path / "a.tar").read_bytes() == data  # not 5000 bytes twice


def test_a_complete_partial_file_is_checked_and_kept(server, tmp_path: Path) -> None:
    data = b"x" * 1000
    server.files["/a.tar"] = data
    (tmp_path / "a.tar.part").write_bytes(data)
    dl.download(server.base + "/a.tar", tmp_path / "a.tar", hashlib.md5(data).hexdigest())
    assert server.sent == [] and (tmp_path / "a.tar").read_bytes() == data  # the server said 416


def test_checksum_mismatch_names_the_file_and_the_expected_md5(server, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path, capsys) -> None:
    _serve_archives(server, monkeypatch)
    good = dl.VOC_ARCHIVES["voc07_test"]
    server.files["/voc2007/VOCtest_06-Nov-2007.tar"] = b"not the archive"
    root = tmp_path / "VOCdevkit"
    assert _run("--data-root", str(root), "--sets", "voc07_test", "--mirror", server.base + "/voc{year}") == 2
    err = capsys.readouterr().err
    actual = hashlib.md5(b"not the archive").hexdigest()
    assert f"VOCtest_06-Nov-2007.tar from {server.base}/voc2007/VOCtest_06-Nov-2007.tar: MD5 is {actual}, " \
           f"expected {good.md5}" in err
    assert list(tmp_path.iterdir()) == []  # the bad file was removed, nothing was extracted


def test_a_corrupt_partial_file_fails_the_checksum(server, tmp_path: Path) -> None:
    data = _voc_tar("2007", "test", "000001", (5, 6, 30, 28))
    server.files["/a.tar"] = data
    (tmp_path / "a.tar.part").write_bytes(b"\0" * 5000)  # wrong first bytes, right length so far
    md5 = hashlib.md5(data).hexdigest()
    with pytest.raises(dl.DownloadError, match=f"a.tar from .*: MD5 is [0-9a-f]{{32}}, expected {md5}"):
        dl.download(server.base + "/a.tar", tmp_path / "a.tar", md5)
    assert list(tmp_path.iterdir()) == []
    dl.download(server.base + "/a.tar", tmp_path / "a.tar", md5)  # the next run starts anew
    assert (tmp_path / "a.tar").read_bytes() == data


def test_a_wrong_existing_archive_is_downloaded_again(server, tmp_path: Path) -> None:
    data = b"archive bytes"
    server.files["/a.tar"] = data
    (tmp_path / "a.tar").write_bytes(b"something else")
    dl.download(server.base + "/a.tar", tmp_path / "a.tar", hashlib.md5(data).hexdigest())
    assert (tmp_path / "a.tar").read_bytes() == data and len(server.log) == 1


def test_http_errors_name_the_url(server, tmp_path: Path, capsys) -> None:
    with pytest.raises(dl.DownloadError, match=r"/missing.tar: HTTP 404"):
        dl.download(server.base + "/missing.tar", tmp_path / "m.tar", "0" * 32)
    assert _run("--data-root", str(tmp_path / "v"), "--sets", "voc07_test", "--mirror", server.base) == 2
    assert f"{server.base}/VOCtest_06-Nov-2007.tar: HTTP 404" in capsys.readouterr().err


def test_unknown_set_lists_the_valid_ones(capsys) -> None:
    assert _run("--sets", "voc07_trainval,voc12_test") == 2
    assert "unknown set 'voc12_test'; valid names: voc07_trainval, voc07_test, voc12_trainval" in \
        capsys.readouterr().err


def test_unsafe_archive_members_are_refused(tmp_path: Path) -> None:
    for name in ("VOCdevkit/../../evil.txt", "/etc/evil.txt"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        archive = tmp_path / "evil.tar"
        archive.write_bytes(buf.getvalue())
        with pytest.raises(dl.DownloadError, match="unsafe path"):
            dl.extract(archive, tmp_path / "out")
        assert not (tmp_path / "evil.txt").exists()


def test_mirror_urls() -> None:
    archive = dl.VOC_ARCHIVES["voc12_trainval"]
    assert dl.archive_url(archive) == "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
    assert dl.archive_url(archive, "http://m.org/files/") == "http://m.org/files/VOCtrainval_11-May-2012.tar"


def test_md5s_agree_with_torchvision() -> None:
    voc = pytest.importorskip("torchvision.datasets.voc")
    table = getattr(voc, "DATASET_YEAR_DICT", None)
    if table is None:
        pytest.skip("torchvision no longer has DATASET_YEAR_DICT")
    theirs = {entry["filename"]: entry["md5"] for key, entry in table.items() if key in ("2007", "2007-test", "2012")}
    ours = {a.filename: a.md5 for a in dl.VOC_ARCHIVES.values()}
    assert ours == theirs
