"""Images in and out of the data sets: raw files at build time, stored bytes at training time.

Every image file mlgraph is given is decoded by `opened` and `to_rgb`: the builders' files
(`rgb_jpeg_bytes`), `mlgraph.predict`'s and `mlgraph.viz cam`'s (`read_rgb`, the pixels a
built data set holds for the file). Two policies hold there:

* Size: an image of at most `max_pixels` pixels (width x height; `MAX_IMAGE_PIXELS`, PIL's own
  default limit, unless `--max_image_pixels` of build, predict and viz raises it) is decoded at
  full size. A larger JPEG is decoded at the largest of libjpeg's reduced scales (1/2, 1/4,
  1/8) that fits the limit, inside the decoder (PIL's `draft`), so its full-size pixels are
  never held; one warning line says so. Any other larger image, or a JPEG still over the limit
  at 1/8, is refused before a pixel is decoded (`BadImage`: one line, the file is skipped): PIL
  can shrink only JPEGs while decoding. This check replaces PIL's decompression-bomb warning and
  error while mlgraph decodes.
* Mode: `to_rgb` turns every mode PIL opens into 8-bit RGB by its value range (16-bit and float
  images are scaled, not clipped; alpha is dropped). PIL's warnings about a file (a damaged
  EXIF block, ...) become one `warning:` line each, naming the file.

`rgb_jpeg_bytes` (build time): every image leaves as RGB JPEG bytes, upright: EXIF orientation is
applied; PNG data behind a .jpg name is detected by content, not by extension. Files that are
already upright RGB JPEGs within the limit are stored byte for byte.

`decode_rgb` (training and evaluation time): the RGB pixels of stored image bytes, PIL's pixels
(`to_rgb`), with simplejpeg as the JPEG decoder (faster than PIL's on COCO-sized files;
`python -m mlgraph.bench input` compares the decoders). Stored images were held to the size
limit when built, so none applies here.
"""

from __future__ import annotations

import contextlib
import io
import math
import pathlib
import struct
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import simplejpeg
from absl import flags
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from mlgraph.errors import warn

EXIF_ORIENTATION = 0x0112
# The decoder `decode_rgb` uses for JPEGs, and the JPEG colour spaces it hands to it: those
# whose RGB output is PIL's, pixel for pixel (libjpeg-turbo in both, with PIL's settings:
# accurate integer IDCT, fancy upsampling). Grayscale, CMYK and YCCK JPEGs go to PIL (its
# CMYK -> RGB formula is its own; PIL's L -> RGB is the reference for grey).
JPEG_DECODER = "simplejpeg"
SIMPLEJPEG_COLORSPACES = frozenset({"YCbCr", "RGB"})

# PIL's default decompression-bomb limit (about 0.25 GB of RGB): the images PIL decodes without
# a warning are decoded exactly as before.
MAX_IMAGE_PIXELS = 89_478_485
JPEG_SCALES = (2, 4, 8)  # the reduced sizes libjpeg decodes a JPEG to directly
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# The value range a mode's full scale spans when every value of the image lies in it.
DECLARED_RANGE = {"I": (0.0, 65535.0), "F": (0.0, 1.0)}
# What PIL raises on damaged or hostile files (fuzzing its decoders finds each of these).
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    MemoryError,
    struct.error,
    Image.DecompressionBombError,
)
# PIL's limit is a module global: it is switched off only while one mlgraph decode runs.
_PIL_LIMIT = threading.Lock()


class BadImage(Exception):
    """An image file is missing, cannot be decoded, or is over the size limit."""


def define_max_pixels_flag(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """Define `--max_image_pixels` (build, predict, viz cam) in `flag_values`."""
    return flags.DEFINE_integer(
        "max_image_pixels",
        MAX_IMAGE_PIXELS,
        "Largest image decoded at full size (width x height pixels): a larger JPEG is decoded "
        "at 1/2, 1/4 or 1/8 scale, any other larger image is skipped.",
        lower_bound=1,
        flag_values=flag_values,
    )


@contextlib.contextmanager
def opened(
    data: bytes, name: str, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> Iterator[tuple[Image.Image, int]]:
    """(the image in `data`, opened for decoding, its JPEG scale: 1, or 2/4/8 when reduced) under
    the size policy (module docstring) for `max_pixels` (None: no limit). Errors inside the
    block are PIL's decoding errors too, and become `BadImage`; PIL's warnings become one
    `warning: <name>: ...` line each once the block succeeds.

    Raises:
      BadImage: not an image PIL can decode, or over the limit; the message names `name`.
    """
    with _PIL_LIMIT, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(io.BytesIO(data)) as im:
                yield im, _fit(im, name, max_pixels)
        except UnidentifiedImageError:
            raise BadImage(f"{name}: cannot decode image (not a known image format)") from None
        except DECODE_ERRORS as e:
            raise BadImage(f"{name}: cannot decode image ({str(e) or type(e).__name__})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    for w in caught:
        if issubclass(w.category, UserWarning):
            warn(f"{name}: {w.message}")


def _fit(im: Image.Image, name: str, max_pixels: int | None) -> int:
    """The scale `im` decodes at under the limit (1: full size), after setting a JPEG over it to
    decode reduced.

    Raises:
      BadImage: over the limit, and not a JPEG that fits it at 1/8.
    """
    width, height = im.size
    if max_pixels is None or width * height <= max_pixels:
        return 1
    sizes = {s: (-(-width // s), -(-height // s)) for s in JPEG_SCALES}  # libjpeg rounds up
    fits = [s for s, (w, h) in sizes.items() if w * h <= max_pixels]
    jpeg = isinstance(im, JpegImagePlugin.JpegImageFile)  # MPO (camera JPEGs) too
    if jpeg and fits:
        # PIL's draft picks the largest scale s with width // s >= the width asked for.
        im.draft(im.mode, (max(1, width // fits[0]), max(1, height // fits[0])))
        if im.width * im.height <= max_pixels:
            warn(
                f"{name}: {width}x{height} pixels, over the limit of {max_pixels} pixels "
                f"(--max_image_pixels); decoded at 1/{fits[0]} scale, {im.width}x{im.height}"
            )
            return fits[0]
    needed = math.prod(sizes[JPEG_SCALES[-1]]) if jpeg else width * height
    raise BadImage(
        f"{name}: {width}x{height} pixels, over the limit of {max_pixels} pixels; pass "
        f"--max_image_pixels={needed} to decode it, or make the file smaller"
    )


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB, by its mode's value range:

    * 8-bit modes (1, L, P, RGB, CMYK, YCbCr, ...): PIL's conversion (1: 0/1 -> 0/255; CMYK:
      R = round((255 - C) * (255 - K) / 255), G and B alike; YCbCr: JPEG's full-range BT.601).
    * Alpha (LA, PA, RGBA, and P with a transparent index or per-entry transparency): dropped,
      keeping the colour stored under each pixel, as PIL's `convert("RGB")` and the official
      code's loaders (torchvision's `pil_loader`) do.
    * I;16 (16-bit grayscale PNG and TIFF): from 0..65535, v -> round(v * 255 / 65535).
    * I (32-bit integers; 16-bit PGM/PPM): from 0..65535 when every value lies there, else from
      the image's own min..max.
    * F (32-bit float; float TIFF): from 0..1 when every finite value lies there, else from the
      finite values' min..max; NaN and infinities become 0.

    Scaled values are rounded to the nearest integer; a gray result fills all three channels,
    and a min..max range of a single value maps to 0.
    """
    if im.mode in SIXTEEN_BIT_MODES:
        return _gray_rgb(np.asarray(im, np.float32), 0.0, 65535.0)
    if im.mode in DECLARED_RANGE:
        values = np.asarray(im, np.float32)
        finite = np.isfinite(values)
        lo, hi = DECLARED_RANGE[im.mode]
        seen = values[finite]
        if seen.size and (seen.min() < lo or seen.max() > hi):
            lo, hi = float(seen.min()), float(seen.max())
        return _gray_rgb(np.where(finite, values, np.float32(lo)), lo, hi)
    if im.mode in ("P", "PA"):
        # Through RGBA: the same colours, without the warning PIL's P -> RGB gives for
        # per-entry transparency.
        im = im.convert("RGBA")
    return im.convert("RGB")


def _gray_rgb(values: np.ndarray, lo: float, hi: float) -> Image.Image:
    """An RGB image of float32 gray `values` scaled from lo..hi to 0..255 (in place: `values`
    may be a 16-bit scan of the size limit)."""
    values -= np.float32(lo)
    values *= np.float32(255.0 / (hi - lo)) if hi > lo else np.float32(0.0)
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    gray = values.astype(np.uint8)
    return Image.fromarray(np.stack([gray, gray, gray], axis=-1))


def rgb_jpeg_bytes(
    path: str | pathlib.Path, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[bytes, tuple[int, int]]:
    """(JPEG bytes of the upright RGB image, (height, width)) for the file at `path`, under the
    size limit `max_pixels` and `to_rgb` (module docstring).

    Raises:
      BadImage: missing, unreadable, not an image, or over the limit.
    """
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadImage(f"{path}: image file not found") from None
    except OSError as e:
        raise BadImage(f"{path}: cannot read image file ({e.strerror or e})") from None
    with opened(raw, str(path), max_pixels) as (im, scale):
        im.load()
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        if im.format == "JPEG" and im.mode == "RGB" and orientation == 1 and scale == 1:
            return raw, (im.height, im.width)
        rgb = to_rgb(ImageOps.exif_transpose(im) if orientation != 1 else im)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=95)
        return out.getvalue(), (rgb.height, rgb.width)


def read_rgb(path: str | pathlib.Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """uint8 [H, W, 3]: the pixels a built data set holds for the image file at `path`
    (`rgb_jpeg_bytes`, decoded as the pipeline decodes), for predict and viz.

    Raises:
      BadImage: missing, unreadable, not an image, or over the limit.
    """
    data, _ = rgb_jpeg_bytes(path, max_pixels)
    return decode_rgb(data, str(path))


def decode_rgb(data: bytes, name: str = "image") -> np.ndarray:
    """uint8 [H, W, 3]: the RGB pixels of encoded image bytes, identical to `decode_rgb_pil`'s.
    `name` is the image as error messages call it (e.g. "image 391895").

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
    """uint8 [H, W, 3]: PIL's RGB pixels of encoded image bytes (the reference decoder), with
    `to_rgb`'s conversion (for 8-bit images, `Image.open(...).convert("RGB")`'s pixels). No
    size limit: stored images were held to it when built.

    Raises:
      BadImage: the bytes are not an image PIL can decode; the message names `name`.
    """
    with opened(data, name, max_pixels=None) as (im, _):
        return np.asarray(to_rgb(im))
