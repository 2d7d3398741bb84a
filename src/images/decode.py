"""Decode any image file (or bytes) to a fixed-size RGB uint8 array under a pixel cap, with the
digest of the file's bytes; which files are images; the natural sort order of names."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
JPEG_FORMATS = ("JPEG", "MPO")  # decoded by libjpeg, which can scale down while decoding
DEFAULT_MAX_PIXELS = 40_000_000  # the cap on an image's decoded pixels unless dataset.max_pixels sets one

ImageFile.LOAD_TRUNCATED_IMAGES = False


# Pillow's bomb check sees the full size before a JPEG is scaled down and warns below its error
# threshold; load_rgb checks the size really decoded against its own cap instead, on every image.
Image.MAX_IMAGE_PIXELS = None


class ImageTooLarge(ValueError):
    """An image with more pixels to decode than the configured cap."""


def natural_key(name: str) -> tuple:
    """Sort key putting "10" after "9" and "img2" before "img10"."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower())
        for part in re.split(r"(\d+)", name)
        if part
    )


def load_rgb(path: Path | io.BytesIO, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode any image file to a size x size x 3 uint8 RGB array (alpha composited on white).

    JPEGs are decoded at a reduced scale where that still covers `size`; an image with more than
    `max_pixels` pixels left to decode raises ImageTooLarge before any pixel is decoded."""
    with Image.open(path) as im:
        if im.format in JPEG_FORMATS:
            im.draft("RGB", (size, size))  # let libjpeg decode at a reduced scale: much faster
        width, height = im.size
        if width * height > max_pixels:
            reduced = " (after reduced-size JPEG decoding)" if im.format in JPEG_FORMATS else ""
            raise ImageTooLarge(
                f"{width}x{height} = {width * height:,} pixels to decode{reduced}, "
                f"over dataset.max_pixels={max_pixels}"
            )
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im.alpha_composite(rgba)
        elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = im.point(lambda v: v / 256).convert("L")  # 16-bit grayscale down to 8 bit
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def decode_file(path: Path, size: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """The decoded image and the blake2b digest of the file's bytes, reading the file once."""
    data = path.read_bytes()
    try:
        array = load_rgb(io.BytesIO(data), size, max_pixels)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None
    return array, hashlib.blake2b(data, digest_size=16).hexdigest()


def is_image(path: Path) -> bool:
    """A visible file with an image suffix."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
