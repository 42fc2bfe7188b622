"""Small image files of every awkward kind a raw data set holds, made from scikit-image photos.

`write_image(path, kind, index)` writes one file and returns the upright RGB array a builder
should store for it (None for a corrupt file). Kinds:

* "rgb": a plain RGB JPEG (stored byte for byte);
* "gray": a single-channel JPEG;
* "cmyk": a CMYK JPEG;
* "png": PNG data behind a .jpg name;
* "exif": a JPEG whose pixels are stored sideways with EXIF orientation 6 (rotate 90 degrees
  clockwise to display), so that the upright image is taller than the stored one;
* "corrupt": bytes that are no image.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
from PIL import Image
from skimage import data as skdata

HEIGHT, WIDTH = 40, 56


@functools.cache
def photos() -> list[np.ndarray]:
    """Four distinct HEIGHT x WIDTH RGB crops of real photographs."""
    sources = [skdata.chelsea(), skdata.astronaut(), skdata.coffee(), skdata.rocket()]
    return [np.ascontiguousarray(p[60 : 60 + HEIGHT, 80 : 80 + WIDTH, :3]) for p in sources]


def write_image(path: pathlib.Path, kind: str, index: int = 0) -> np.ndarray | None:
    """Write an image of `kind` at `path`; return the upright RGB array it should decode to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = photos()[index % len(photos())]
    im = Image.fromarray(rgb)
    if kind == "rgb":
        im.save(path, format="JPEG", quality=95)
        with Image.open(path) as saved:
            return np.asarray(saved)
    if kind == "gray":
        gray = im.convert("L")
        gray.save(path, format="JPEG", quality=95)
        return np.repeat(np.asarray(gray)[:, :, None], 3, axis=2)
    if kind == "cmyk":
        im.convert("CMYK").save(path, format="JPEG", quality=95)
        return rgb
    if kind == "png":
        im.save(path, format="PNG")
        return rgb
    if kind == "exif":
        # Stored pixels are the upright image turned 90 degrees counter-clockwise.
        sideways = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1)))
        exif = Image.Exif()
        exif[0x0112] = 6
        sideways.save(path, format="JPEG", quality=95, exif=exif)
        return rgb
    if kind == "corrupt":
        path.write_bytes(b"\xff\xd8 this is not a JPEG")
        return None
    raise ValueError(f"unknown image kind {kind!r}")


def assert_image(stored: np.ndarray, expected: np.ndarray, kind: str) -> None:
    """A stored image equals the expected upright RGB one (exactly for untouched JPEGs)."""
    assert stored.shape == expected.shape, (kind, stored.shape, expected.shape)
    assert stored.dtype == np.uint8
    if kind == "rgb":
        np.testing.assert_array_equal(stored, expected)
    else:
        # Re-encoded at quality 95: close, while a wrong conversion (inverted CMYK, a missed
        # rotation) is off by tens of levels.
        diff = np.abs(stored.astype(np.int16) - expected.astype(np.int16))
        assert diff.mean() < 4.0, (kind, diff.mean())
