"""Images in and out of the data sets: raw files at build time, stored bytes at training time.

`rgb_jpeg_bytes` (build time): every image leaves as RGB JPEG bytes, upright. Grayscale,
palette, CMYK and alpha images are converted to RGB; EXIF orientation is applied; PNG data
behind a .jpg name is detected by content, not by extension. Files that are already upright RGB
JPEGs are stored byte for byte.

`decode_rgb` (training and evaluation time): the RGB pixels of stored image bytes, exactly the
pixels of PIL's `Image.open(...).convert("RGB")`, with simplejpeg as the JPEG decoder (faster
than PIL's on COCO-sized files; `python -m mlgraph.bench input` compares the decoders).
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
# The decoder `decode_rgb` uses for JPEGs, and the JPEG colour spaces it hands to it: those
# whose RGB output is PIL's, pixel for pixel (libjpeg-turbo in both, with PIL's settings:
# accurate integer IDCT, fancy upsampling). Grayscale, CMYK and YCCK JPEGs go to PIL (its
# CMYK -> RGB formula is its own; PIL's L -> RGB is the reference for grey).
JPEG_DECODER = "simplejpeg"
SIMPLEJPEG_COLORSPACES = frozenset({"YCbCr", "RGB"})


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


def decode_rgb(data: bytes, name: str = "image") -> np.ndarray:
    """uint8 [H, W, 3]: the RGB pixels of encoded image bytes, identical to
    `np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))`. `name` is the image as error
    messages call it (e.g. "image 391895").

    The decoder is chosen by format, from the bytes: a JPEG whose header reads YCbCr or RGB
    (every image the builders store) goes to simplejpeg with PIL's settings (fastdct=False,
    fastupsample=False); any other format (PNG, ...) and grayscale, CMYK or YCCK JPEGs go to
    PIL. simplejpeg runs strict: a JPEG in which libjpeg reports damage (a truncated file, a
    header it cannot read) is handed to PIL, which decodes it as before or raises. So the
    pixels are always PIL's, and an image PIL cannot decode raises the error PIL's path always
    raised.

    Raises:
      BadImage: the bytes are not an image PIL can decode; the message names `name`.
    """
    if data[:3] == b"\xff\xd8\xff":  # JPEG start-of-image marker
        try:
            colorspace = simplejpeg.decode_jpeg_header(data)[2]
        except ValueError:
            colorspace = None  # header unreadable to libjpeg-turbo: PIL decides
        if colorspace in SIMPLEJPEG_COLORSPACES:
            try:
                return simplejpeg.decode_jpeg(
                    data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True
                )
            except ValueError:
                pass  # libjpeg reported damage: PIL gives its pixels or the error below
    return decode_rgb_pil(data, name)


def decode_rgb_pil(data: bytes, name: str = "image") -> np.ndarray:
    """uint8 [H, W, 3]: PIL's RGB pixels of encoded image bytes (the reference decoder).

    Raises:
      BadImage: the bytes are not an image PIL can decode; the message names `name`.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise BadImage(f"{name}: cannot decode image (not a known image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{name}: cannot decode image ({e})") from None
