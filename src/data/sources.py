"""The datasets' official archives: pinned checksums, fetching with progress, safe extraction,
and the class-folder layout built from each."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import pickle
import re
import shutil
import stat
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from src.errors import StageError

log = logging.getLogger(__name__)


CHUNK = 1 << 20


TIMEOUT_S = 30


class DownloadError(StageError):
    """A download, checksum or extraction failure, with what to do about it."""


@dataclass(frozen=True)
class Archive:
    """One file to download, pinned to a published checksum (sha256, or md5 where that is all
    the publisher lists)."""

    url: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    @property
    def filename(self) -> str:
        return PurePosixPath(self.url).name

    def hasher(self) -> tuple[str, hashlib._Hash, str]:
        if self.sha256:
            return "sha256", hashlib.sha256(), self.sha256
        if self.md5:
            return "md5", hashlib.md5(usedforsecurity=False), self.md5
        raise ValueError(f"{self.url}: no checksum pinned")


_GTSRB = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"


# Checksums as published by TensorFlow Datasets (url_checksums) and, for GTSRB, whose publisher
# and torchvision list only MD5s, by torchvision's GTSRB loader.
ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "cats_vs_dogs": (
        Archive(
            "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
            "kagglecatsanddogs_5340.zip",
            sha256="b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9",
        ),
    ),
    "gtsrb": (
        Archive(_GTSRB + "GTSRB-Training_fixed.zip", md5="513f3c79a4c5141765e10e952eaa2478"),
        Archive(_GTSRB + "GTSRB_Final_Test_Images.zip", md5="c7e4e6327067d32654124b0fe9e82185"),
        Archive(_GTSRB + "GTSRB_Final_Test_GT.zip", md5="fe31e9c9270bbcd7b84b7f21a9d9d9e5"),
    ),
    "flowers": (
        Archive(
            "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz",
            sha256="4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c",
            size=228813984,
        ),
    ),
    "cifar10": (
        Archive(
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            size=170498071,
        ),
    ),
}


DLWP_PER_CLASS = {"train": 1000, "validation": 500, "test": 1000}


def file_digest(path: Path, archive: Archive) -> str:
    """The checksum of `path` in the algorithm `archive` is pinned to."""
    _, digest, _ = archive.hasher()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _offline_message(archive: Archive, folder: Path, err: object) -> str:
    return (
        f"cannot download {archive.url} ({err}). Without network access, either place the file at "
        f"{folder / archive.filename} and rerun, or use a local copy of the images: "
        "dataset=folder dataset.path=/path/to/images (class subfolders, optionally under "
        "train/ val/ test/), or set dataset.path for this dataset"
    )


def fetch(archive: Archive, folder: Path) -> Path:
    """Download `archive` into `folder` unless a verified copy is there; return its path.

    The bytes go to `<file>.part` and are hashed on the way; only a file whose checksum matches
    is renamed into place, so a failed or interrupted download never looks complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / archive.filename
    algorithm, digest, expected = archive.hasher()
    if target.is_file():
        if file_digest(target, archive) == expected:
            log.info("using cached %s", target)
            return target
        log.warning("%s does not match its %s checksum: downloading it again", target, algorithm)
    part = target.with_name(target.name + ".part")
    try:
        response = urllib.request.urlopen(archive.url, timeout=TIMEOUT_S)  # noqa: S310 (pinned https URLs)
    except OSError as err:  # URLError, refused connections and timeouts are all OSErrors
        raise DownloadError(_offline_message(archive, folder, getattr(err, "reason", err))) from err
    try:
        total = int(response.headers.get("Content-Length") or 0) or archive.size
        with (
            response,
            open(part, "wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=archive.filename) as bar,
        ):
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except OSError as err:
        part.unlink(missing_ok=True)
        raise DownloadError(_offline_message(archive, folder, err)) from err
    got = digest.hexdigest()
    if got != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{archive.url}: {algorithm} checksum mismatch (expected {expected}, got {got}); "
            "the download was corrupted or the file changed upstream. Nothing was kept: rerun, "
            f"or place a verified copy at {target}"
        )
    os.replace(part, target)
    return target


def _safe_member_path(name: str, dest: Path, archive: Path) -> Path:
    """Where member `name` goes under `dest`; refuse absolute paths and `..` escapes."""
    pure = PurePosixPath(name.replace("\\", "/"))
    target = (dest / pure).resolve()
    if pure.is_absolute() or ".." in pure.parts or not target.is_relative_to(dest.resolve()):
        raise DownloadError(f"{archive}: member {name!r} would be written outside {dest}; refusing to unpack")
    return target


def safe_extract(archive: Path, dest: Path) -> Path:
    """Unpack a zip or tar archive into `dest`, refusing escapes, links and special files."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = _safe_member_path(info.filename, dest, archive)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise DownloadError(f"{archive}: member {info.filename!r} is a link; refusing to unpack")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
        return dest
    if not tarfile.is_tarfile(archive):
        raise DownloadError(f"{archive} is neither a zip nor a tar archive: delete it and rerun")
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for member in members:
            _safe_member_path(member.name, dest, archive)
            if not (member.isfile() or member.isdir()):
                raise DownloadError(
                    f"{archive}: member {member.name!r} is a link or special file; refusing to unpack"
                )
        tf.extractall(dest, members=members, filter="data")  # the stdlib's own safety net too
    return dest


def _readable_jpeg(data: bytes) -> bool:
    """True for bytes that hold a complete, decodable JPEG (the Kaggle archive has broken ones)."""
    if b"JFIF" not in data[:10] and not data.startswith(b"\xff\xd8"):
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return False
            im.draft("RGB", (256, 256))  # reduced-size decoding: the check needs no full-size pixels
            if im.size[0] * im.size[1] > 40_000_000:
                return False  # far beyond any photo of the archive: not decoded
            im.load()
        return True
    except Exception:
        return False


def build_cats_vs_dogs(archives: list[Path], out: Path) -> None:
    """The DLWP subset: per class the first 1000 / next 500 / next 1000 readable images."""
    with zipfile.ZipFile(archives[0]) as zf:
        for kaggle_class, class_name, prefix in (("Cat", "cats", "cat"), ("Dog", "dogs", "dog")):
            pattern = re.compile(rf"PetImages/{kaggle_class}/(\d+)\.jpg$")
            numbered = sorted(
                (int(m.group(1)), info) for info in zf.infolist() if (m := pattern.search(info.filename))
            )
            members = iter(numbered)
            for split, wanted in DLWP_PER_CLASS.items():
                folder = out / split / class_name
                folder.mkdir(parents=True, exist_ok=True)
                written = 0
                for number, info in members:
                    data = zf.read(info)
                    if not _readable_jpeg(data):
                        log.warning("skipping corrupt image %s", info.filename)
                        continue
                    (folder / f"{prefix}.{number}.jpg").write_bytes(data)
                    written += 1
                    if written == wanted:
                        break
                if written < wanted:
                    raise DownloadError(
                        f"{archives[0]}: only {written} readable {kaggle_class} images for {split}"
                    )


def build_gtsrb(archives: list[Path], out: Path) -> None:
    """`train/<ClassId>/`, flat `test/` and `Test.csv` (Path,ClassId) from the official files."""
    scratch = out / ".unpacked"
    for archive in archives:
        safe_extract(archive, scratch)
    class_dirs = [d for d in scratch.glob("GTSRB/*/*") if d.is_dir() and d.name.isdigit()]
    if not class_dirs:
        raise DownloadError(f"{archives[0]}: no GTSRB/<split>/<class id>/ folders inside")
    for class_dir in class_dirs:
        target = out / "train" / str(int(class_dir.name))
        target.mkdir(parents=True, exist_ok=True)
        for image in class_dir.glob("*.ppm"):
            os.replace(image, target / image.name)
    gt_files = list(scratch.rglob("GT-final_test.csv"))
    if not gt_files:
        raise DownloadError(f"{archives[-1]}: GT-final_test.csv not found inside")
    test_images = {p.name: p for p in scratch.rglob("*.ppm")}
    (out / "test").mkdir(parents=True, exist_ok=True)
    with open(gt_files[0], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    with open(out / "Test.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Path", "ClassId"])
        for row in rows:
            name = row["Filename"]
            if name in test_images:
                os.replace(test_images[name], out / "test" / name)
                writer.writerow([f"test/{name}", int(row["ClassId"])])
    shutil.rmtree(scratch)


def build_flowers(archives: list[Path], out: Path) -> None:
    """The five `flower_photos/<class>/` folders (the licence file stays behind)."""
    scratch = out / ".unpacked"
    safe_extract(archives[0], scratch)
    for class_dir in (scratch / "flower_photos").iterdir():
        if class_dir.is_dir():
            os.replace(class_dir, out / class_dir.name)
    shutil.rmtree(scratch)


def build_cifar10(archives: list[Path], out: Path) -> None:
    """PNG files in `train/<class>/` and `test/<class>/` from the pickled python batches."""
    scratch = out / ".unpacked"
    safe_extract(archives[0], scratch)
    batches = scratch / "cifar-10-batches-py"
    with open(batches / "batches.meta", "rb") as f:
        classes = [c.decode() if isinstance(c, bytes) else c for c in pickle.load(f)["label_names"]]
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        for name in names:
            with open(batches / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")  # trusted: the archive's checksum matched
            images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for image, label, filename in zip(images, batch[b"labels"], batch[b"filenames"]):
                folder = out / split / classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                stem = Path(filename.decode()).stem
                Image.fromarray(image).save(folder / f"{stem}.png")
    shutil.rmtree(scratch)


BUILDERS: dict[str, Callable[[list[Path], Path], None]] = {
    "cats_vs_dogs": build_cats_vs_dogs,
    "gtsrb": build_gtsrb,
    "flowers": build_flowers,
    "cifar10": build_cifar10,
}
