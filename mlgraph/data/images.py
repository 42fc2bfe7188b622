"""Reading raw image files at build time: every image leaves as RGB JPEG bytes, upright.

Grayscale, palette, CMYK and alpha images are converted to RGB; EXIF orientation is applied;
PNG data behind a .jpg name is detected by content, not by extension. Files that are already
upright RGB JPEGs are stored byte for byte.
"""

from __future__ import annotations

import io
import pathlib

from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """An image file is missing or cannot be decoded."""


def rgb_jpeg_bytes(path: str | pathlib.Path) -> tuple[bytes, tuple[int, int]]:
    """Return (JPEG bytes of the upright RGB image, (height, width)) for the file at `path`."""
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadImage(f"{path}: image file not found") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            if im.format == "JPEG" and im.mode == "RGB" and orientation == 1:
                return raw, (im.height, im.width)
            upright = ImageOps.exif_transpose(im) if orientation != 1 else im
            rgb = upright.convert("RGB")
            out = io.BytesIO()
            rgb.save(out, format="JPEG", quality=95)
            return out.getvalue(), (rgb.height, rgb.width)
    except UnidentifiedImageError:
        raise BadImage(f"{path}: cannot decode image (not a known image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{path}: cannot decode image ({e})") from None
