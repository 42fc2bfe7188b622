"""Image augmentations written with PIL and numpy (the old `randaugment` package does not run
with current numpy/Pillow)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def cutout(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """CutoutPIL as in SALGL/ASL: one square of side int(factor*S + 0.5), centred at a uniform
    random pixel, clipped to the image, filled with one random RGB colour (end points included,
    as PIL's rectangle draws them)."""
    w, h = img.size
    side_h, side_w = int(factor * h + 0.5), int(factor * w + 0.5)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = np.clip([cy - side_h // 2, cy + side_h // 2], 0, h)
    x1, x2 = np.clip([cx - side_w // 2, cx + side_w // 2], 0, w)
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    img = img.copy()
    ImageDraw.Draw(img).rectangle([int(x1), int(y1), int(x2), int(y2)], fill=color)
    return img
