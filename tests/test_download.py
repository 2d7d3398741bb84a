"""The download stage: local copies, verified downloads from a real HTTP server on localhost,
offline failures, safe extraction, and each dataset's archive layout unpacked into class folders."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import json
import pickle
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.config.checks import validate
from src.config.compose import compose
from src.data import sources
from src.data.sources import Archive, DownloadError
from src.outputs import folders
from src.stages import download, prepare
from tests.conftest import path_overrides


def cfg_for(tmp_path: Path, *overrides: str):
    return validate(compose([*path_overrides(tmp_path / "work"), *overrides]))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jpeg_bytes(seed: int, size: int = 24) -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


class Server:
    """A real HTTP server on 127.0.0.1 serving a folder and counting requests."""

    def __init__(self, folder: Path):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args):
                requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    server = Server(folder)
    yield folder, server
    server.close()


def closed_port_url(name: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


# --- local copies --------------------------------------------------------------------------


def test_local_path_is_recorded_with_a_fingerprint_that_tracks_the_files(tmp_path):
    images = tmp_path / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        (images / cls / "1.jpg").write_bytes(jpeg_bytes(1))
    cfg = cfg_for(tmp_path, "dataset=folder", f"dataset.path={images}")
    info = download.run(cfg)
    source = json.loads((Path(cfg.paths.raw) / "source.json").read_text())
    assert source == info
    assert source["kind"] == "local" and source["root"] == str(images.resolve())
    assert source["files"] == 2
    (images / "b" / "2.jpg").write_bytes(jpeg_bytes(2))
    assert download.run(cfg)["fingerprint"] != info["fingerprint"]
    assert not (Path(cfg.paths.raw) / "folder").exists()  # nothing copied


def test_no_download_source_for_folder_names_the_key(tmp_path):
    (tmp_path / "images").mkdir()
    cfg = cfg_for(tmp_path, "dataset=folder", f"dataset.path={tmp_path / 'images'}")
    cfg.dataset.path = None
    with pytest.raises(DownloadError, match="dataset.path"):
        download.run(cfg)


# --- verified downloads --------------------------------------------------------------------


def test_fetch_verifies_the_checksum_and_then_reuses_the_file(tmp_path, served):
    folder, server = served
    payload = b"archive bytes " * 5000
    (folder / "data.zip").write_bytes(payload)
    archive = Archive(server.url("data.zip"), sha256=sha256(payload))
    downloads = tmp_path / "downloads"
    path = sources.fetch(archive, downloads)
    assert path == downloads / "data.zip" and path.read_bytes() == payload
    assert not list(downloads.glob("*.part"))
    n_requests = len(server.requests)
    assert sources.fetch(archive, downloads) == path
    assert len(server.requests) == n_requests  # a verified copy is never fetched again


def test_fetch_with_md5_pin_and_a_corrupt_cached_copy_downloads_again(tmp_path, served):
    folder, server = served
    payload = b"gtsrb-like archive"
    (folder / "gt.zip").write_bytes(payload)
    archive = Archive(server.url("gt.zip"), md5=hashlib.md5(payload).hexdigest())
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "gt.zip").write_bytes(b"truncated")
    assert sources.fetch(archive, downloads).read_bytes() == payload
    assert server.requests


def test_checksum_mismatch_keeps_nothing(tmp_path, served):
    folder, server = served
    (folder / "data.tgz").write_bytes(b"changed upstream")
    archive = Archive(server.url("data.tgz"), sha256="0" * 64)
    downloads = tmp_path / "downloads"
    with pytest.raises(DownloadError, match="checksum mismatch") as err:
        sources.fetch(archive, downloads)
    assert "0" * 64 in str(err.value) and sha256(b"changed upstream") in str(err.value)
    assert list(downloads.iterdir()) == []


def test_offline_fails_at_once_naming_the_url_and_the_local_alternative(tmp_path):
    url = closed_port_url("flower_photos.tgz")
    with pytest.raises(DownloadError) as err:
        sources.fetch(Archive(url, sha256="0" * 64), tmp_path / "downloads")
    message = str(err.value)
    assert url in message
    assert "dataset=folder dataset.path=" in message
    assert str(tmp_path / "downloads" / "flower_photos.tgz") in message


def test_offline_run_writes_no_source_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.ARCHIVES, "flowers", (Archive(closed_port_url("f.tgz"), sha256="0" * 64),))
    cfg = cfg_for(tmp_path, "dataset=flowers")
    with pytest.raises(DownloadError, match="f.tgz"):
        download.run(cfg)
    assert not (Path(cfg.paths.raw) / "source.json").exists()


def test_pinned_archives_all_carry_a_checksum():
    for name, archives in sources.ARCHIVES.items():
        assert name in sources.BUILDERS
        for archive in archives:
            assert archive.url.startswith("https://")
            algorithm, _, expected = archive.hasher()
            assert len(expected) == {"sha256": 64, "md5": 32}[algorithm]


# --- safe extraction -----------------------------------------------------------------------


def test_zip_member_escaping_the_target_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/fine.txt", "fine")
        zf.writestr("../escaped.txt", "evil")
    with pytest.raises(DownloadError, match="outside"):
        sources.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_zip_absolute_member_is_refused(tmp_path):
    archive = tmp_path / "abs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo("/tmp/absolute.txt"), "evil")
    with pytest.raises(DownloadError, match="outside"):
        sources.safe_extract(archive, tmp_path / "out")


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.addfile(member, io.BytesIO(data) if data else None)
    return archive


def test_tar_member_escaping_the_target_is_refused(tmp_path):
    member = tarfile.TarInfo("../../escaped.txt")
    member.size = 4
    with pytest.raises(DownloadError, match="outside"):
        sources.safe_extract(_tar_with(tmp_path, member, b"evil"), tmp_path / "a" / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_tar_symlink_is_refused(tmp_path):
    member = tarfile.TarInfo("flower_photos/link")
    member.type = tarfile.SYMTYPE
    member.linkname = "/etc/passwd"
    with pytest.raises(DownloadError, match="link"):
        sources.safe_extract(_tar_with(tmp_path, member), tmp_path / "out")
    assert not (tmp_path / "out" / "flower_photos" / "link").exists()


def test_safe_extract_unpacks_an_ordinary_tar(tmp_path):
    member = tarfile.TarInfo("flower_photos/daisy/1.jpg")
    data = jpeg_bytes(3)
    member.size = len(data)
    out = sources.safe_extract(_tar_with(tmp_path, member, data), tmp_path / "out")
    assert (out / "flower_photos" / "daisy" / "1.jpg").read_bytes() == data


# --- each dataset's layout, end to end through a real server -------------------------------


def serve_archive(folder: Path, server: Server, name: str, data: bytes) -> Archive:
    (folder / name).write_bytes(data)
    return Archive(server.url(name), sha256=sha256(data))


def test_flowers_download_feeds_prepare(tmp_path, served, monkeypatch):
    folder, server = served
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i, (cls, n) in enumerate([("daisy", 6), ("roses", 6)] * 1):
            for j in range(n):
                data = jpeg_bytes(10 * i + j)
                member = tarfile.TarInfo(f"flower_photos/{cls}/{j}.jpg")
                member.size = len(data)
                tf.addfile(member, io.BytesIO(data))
        licence = b"licence text"
        member = tarfile.TarInfo("flower_photos/LICENSE.txt")
        member.size = len(licence)
        tf.addfile(member, io.BytesIO(licence))
    archive = serve_archive(folder, server, "flower_photos.tgz", buf.getvalue())
    monkeypatch.setitem(sources.ARCHIVES, "flowers", (archive,))
    cfg = cfg_for(tmp_path, "dataset=flowers", "dataset.image_size=32")
    info = download.run(cfg)
    root = Path(cfg.paths.raw) / "flowers"
    assert info["kind"] == "download" and info["root"] == str(root.resolve())
    assert sorted(p.name for p in root.iterdir() if p.name != folders.MARKER) == ["daisy", "roses"]
    assert info["files"] == 12
    prepared = prepare.run(cfg)
    assert prepared["classes"] == ["daisy", "roses"]
    assert sum(prepared["counts"].values()) == 12


def test_cats_vs_dogs_builds_the_dlwp_subset_skipping_corrupt_jpegs(tmp_path, served, monkeypatch):
    folder, server = served
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for kaggle_class in ("Cat", "Dog"):
            for number in range(6):
                data = jpeg_bytes(number) if number != 1 else b"\xff\xd8\xff\xe0 not a jpeg"
                zf.writestr(f"PetImages/{kaggle_class}/{number}.jpg", data)
            zf.writestr(f"PetImages/{kaggle_class}/Thumbs.db", b"junk")
    archive = serve_archive(folder, server, "kagglecatsanddogs.zip", buf.getvalue())
    monkeypatch.setitem(sources.ARCHIVES, "cats_vs_dogs", (archive,))
    monkeypatch.setattr(sources, "DLWP_PER_CLASS", {"train": 2, "validation": 1, "test": 2})
    cfg = cfg_for(tmp_path, "dataset=cats_vs_dogs")
    download.run(cfg)
    root = Path(cfg.paths.raw) / "cats_vs_dogs"
    assert sorted(p.name for p in (root / "train" / "cats").iterdir()) == ["cat.0.jpg", "cat.2.jpg"]
    assert [p.name for p in (root / "validation" / "dogs").iterdir()] == ["dog.3.jpg"]
    assert sorted(p.name for p in (root / "test" / "dogs").iterdir()) == ["dog.4.jpg", "dog.5.jpg"]


def test_gtsrb_builds_numeric_class_folders_and_a_test_csv(tmp_path, served, monkeypatch):
    folder, server = served
    ppm = io.BytesIO()
    Image.new("RGB", (30, 31), (200, 10, 10)).save(ppm, format="PPM")
    train, test, gt = io.BytesIO(), io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(train, "w") as zf:
        for class_id in (0, 10, 2):
            for i in range(2):
                zf.writestr(f"GTSRB/Training/{class_id:05d}/00000_{i:05d}.ppm", ppm.getvalue())
            zf.writestr(f"GTSRB/Training/{class_id:05d}/GT-{class_id:05d}.csv", "Filename;ClassId\n")
    with zipfile.ZipFile(test, "w") as zf:
        for i in range(3):
            zf.writestr(f"GTSRB/Final_Test/Images/{i:05d}.ppm", ppm.getvalue())
    with zipfile.ZipFile(gt, "w") as zf:
        rows = "".join(f"{i:05d}.ppm;30;31;5;5;25;25;{c}\n" for i, c in enumerate((10, 0, 2)))
        zf.writestr("GT-final_test.csv", "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n" + rows)
    archives = tuple(
        serve_archive(folder, server, name, buf.getvalue())
        for name, buf in (("train.zip", train), ("test.zip", test), ("gt.zip", gt))
    )
    monkeypatch.setitem(sources.ARCHIVES, "gtsrb", archives)
    cfg = cfg_for(tmp_path, "dataset=gtsrb", "dataset.image_size=32")
    download.run(cfg)
    root = Path(cfg.paths.raw) / "gtsrb"
    assert sorted(p.name for p in (root / "train").iterdir()) == ["0", "10", "2"]
    with open(root / "Test.csv", newline="") as f:
        assert list(csv.reader(f)) == [
            ["Path", "ClassId"],
            ["test/00000.ppm", "10"],
            ["test/00001.ppm", "0"],
            ["test/00002.ppm", "2"],
        ]
    assert not (root / ".unpacked").exists()
    prepared = prepare.run(cfg)
    assert prepared["classes"] == ["0", "2", "10"]
    assert prepared["counts"]["test"] == 3


def test_cifar10_batches_become_png_class_folders(tmp_path, served, monkeypatch):
    folder, server = served
    rng = np.random.default_rng(0)
    classes = ["airplane", "automobile"]

    def batch(n: int, offset: int) -> bytes:
        data = rng.integers(0, 255, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = [i % 2 for i in range(n)]
        names = [f"img_{offset + i}.png".encode() for i in range(n)]
        return pickle.dumps({b"data": data, b"labels": labels, b"filenames": names}), data

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:

        def add(name: str, data: bytes) -> None:
            member = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))

        add("batches.meta", pickle.dumps({"label_names": classes}))
        first = None
        for i in range(1, 6):
            payload, data = batch(2, 10 * i)
            first = data if first is None else first
            add(f"data_batch_{i}", payload)
        add("test_batch", batch(4, 100)[0])
    archive = serve_archive(folder, server, "cifar-10-python.tar.gz", buf.getvalue())
    monkeypatch.setitem(sources.ARCHIVES, "cifar10", (archive,))
    cfg = cfg_for(tmp_path, "dataset=cifar10")
    info = download.run(cfg)
    root = Path(cfg.paths.raw) / "cifar10"
    assert info["files"] == 14
    assert len(list((root / "test" / "automobile").iterdir())) == 2
    image = np.asarray(Image.open(root / "train" / "airplane" / "img_10.png"))
    assert np.array_equal(image, first[0].reshape(3, 32, 32).transpose(1, 2, 0))  # lossless, HWC
