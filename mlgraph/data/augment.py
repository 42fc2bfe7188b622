"""Image augmentations written with PIL and numpy (the old `randaugment` package does not run
with current numpy/Pillow).

Two augmentations of the SALGL/ASL training chain (spec salgl.md §3.4) live here:

* `cutout`: ASL's `CutoutPIL`, one large square of a random colour.
* `rand_augment`: the `RandAugment()` class of the PyPI package `randaugment==1.0.2`.

and the methods' crops: ML-GCN's `MultiScaleCrop` (ssgrl_mlgcn.md §3.1, `multiscale_crop`) and
SSGRL's resize -> random crop of a chosen side -> resize (§1.7, `random_side_crop`), with its
test-time resize -> centre crop (`center_crop`).

Reference for `rand_augment`: the source of the wheel `randaugment-1.0.2-py3-none-any.whl`
(module `randaugment/randaugment.py`, read via `pip download randaugment==1.0.2 --no-deps`; its
`SubPolicy` op table is the DeepVoltaire/AutoAugment one). What it does, per image:

1. Build the list of 135 (op, level) entries: the 15 ops below x levels 1..9, each with p=0.5.
2. Pick one ordered pair of entries uniformly from the 135 x 135 pairs.
3. Apply the first op with probability 0.5, then the second with probability 0.5.

An op's magnitude is entry `level` of a 10-point `np.linspace` table (index 0 is never used,
since levels start at 1); see `rand_augment_magnitude`. Details the spec leaves open, taken
from that source:

* Shear is about the image origin (top-left corner), not its centre, with bicubic
  resampling; translation uses nearest-neighbour resampling. Both fill with (128, 128, 128).
* Rotate turns counter-clockwise only (positive PIL angle), nearest-neighbour, about the
  centre; the package rotates an RGBA copy and composites it over grey, which is exactly a
  rotation with fill (128, 128, 128).
* The spec calls RandAugment's Cutout "grey": the package actually paints (125, 122, 113).
  Its square is centred at a uniform pixel (x in [0, W), y in [0, H)) and covers the
  half-open ranges [c - s//2, c + s//2), clipped to the image, so its side is 2*(s//2).
* The sign of shear, translation and the enhancement factors is one fair coin per applied op.

Randomness comes only from the numpy Generator passed in (grain derives one per example), so
results are reproducible. The package draws from Python's global `random`/`np.random` state,
so its exact stream cannot be reproduced; only the distribution is. Our draw order: pair
index, both op coins, then each applied op's own parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

# The package's `RandAugment.get_trans_list()` order: the pair index decodes through it.
RAND_AUGMENT_OPS: tuple[str, ...] = (
    "Invert",
    "Cutout",
    "Sharpness",
    "AutoContrast",
    "Posterize",
    "ShearX",
    "TranslateX",
    "TranslateY",
    "ShearY",
    "Rotate",
    "Equalize",
    "Contrast",
    "Color",
    "Solarize",
    "Brightness",
)
LEVELS = 9  # magnitude levels 1..9 of the package's 10-point tables
NUM_ENTRIES = len(RAND_AUGMENT_OPS) * LEVELS  # 135
OP_PROB = 0.5
AFFINE_FILL = (128, 128, 128)
CUTOUT_FILL = (125, 122, 113)

# Ops whose magnitude gets a random sign (the package's `random.choice([-1, 1])`).
SIGNED_OPS = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast", "Sharpness", "Brightness"}
)
_ENHANCERS = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Sharpness": ImageEnhance.Sharpness,
    "Brightness": ImageEnhance.Brightness,
}
# The package's `SubPolicy` ranges; the rounded integer tables (`np.int`) are why it no longer
# imports cleanly with numpy >= 1.24.
_TABLES: dict[str, np.ndarray] = {
    "ShearX": np.linspace(0, 0.3, 10),
    "ShearY": np.linspace(0, 0.3, 10),
    "TranslateX": np.linspace(0, 150 / 331, 10),
    "TranslateY": np.linspace(0, 150 / 331, 10),
    "Rotate": np.linspace(0, 30, 10),
    "Color": np.linspace(0.0, 0.9, 10),
    "Posterize": np.round(np.linspace(8, 4, 10), 0).astype(np.int64),
    "Solarize": np.linspace(256, 0, 10),
    "Contrast": np.linspace(0.0, 0.9, 10),
    "Sharpness": np.linspace(0.0, 0.9, 10),
    "Brightness": np.linspace(0.0, 0.9, 10),
    "AutoContrast": np.zeros(10),
    "Equalize": np.zeros(10),
    "Invert": np.zeros(10),
    "Cutout": np.round(np.linspace(0, 20, 10), 0).astype(np.int64),
}


class RandAugmentStep(NamedTuple):
    """One op that `rand_augment` applies, with all its random parameters already drawn.

    `sign` is +1/-1 for `SIGNED_OPS` (1 otherwise); `center` is the (x, y) pixel of a Cutout
    square (None otherwise).
    """

    op: str
    level: int
    sign: int = 1
    center: tuple[int, int] | None = None


def rand_augment_magnitude(op: str, level: int) -> float | int:
    """The package's magnitude of `op` at `level` (1..9): e.g. shear 0.3*level/9, rotation
    30*level/9 degrees, enhancement offset 0.9*level/9, posterize bits, Cutout side in px."""
    if op not in _TABLES:
        raise ValueError(f"unknown RandAugment op {op!r}; expected one of {RAND_AUGMENT_OPS}")
    if not 1 <= level <= LEVELS:
        raise ValueError(f"RandAugment level {level} for {op}: expected an integer in 1..{LEVELS}")
    value = _TABLES[op][level]
    return int(value) if op in ("Posterize", "Cutout") else float(value)


def rand_augment_plan(rng: np.random.Generator, size: tuple[int, int]) -> list[RandAugmentStep]:
    """Draw one image's RandAugment: the (op, level) pair, the two p=0.5 coins, and the
    parameters of the ops that fire. `size` is the image's PIL (width, height)."""
    pair = int(rng.integers(NUM_ENTRIES * NUM_ENTRIES))
    entries = divmod(pair, NUM_ENTRIES)
    fires = rng.random(2) < OP_PROB
    steps = []
    for entry, fire in zip(entries, fires, strict=True):
        if not fire:
            continue
        op, level = RAND_AUGMENT_OPS[entry // LEVELS], entry % LEVELS + 1
        sign, center = 1, None
        if op in SIGNED_OPS:
            sign = 1 if rng.integers(2) else -1
        elif op == "Cutout":
            center = (int(rng.integers(size[0])), int(rng.integers(size[1])))
        steps.append(RandAugmentStep(op, level, sign, center))
    return steps


def apply_rand_augment_op(img: Image.Image, step: RandAugmentStep) -> Image.Image:
    """Apply one RandAugment op with fixed parameters (no randomness), as the package does."""
    op = step.op
    mag = rand_augment_magnitude(op, step.level)
    if op in _ENHANCERS:
        return _ENHANCERS[op](img).enhance(1 + step.sign * mag)
    if op in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
        w, h = img.size
        coeffs = {
            "ShearX": (1, step.sign * mag, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, step.sign * mag, 1, 0),
            "TranslateX": (1, 0, step.sign * mag * w, 0, 1, 0),
            "TranslateY": (1, 0, 0, 0, 1, step.sign * mag * h),
        }[op]
        resample = Image.Resampling.BICUBIC if op.startswith("Shear") else Image.Resampling.NEAREST
        return img.transform(
            img.size, Image.Transform.AFFINE, coeffs, resample, fillcolor=AFFINE_FILL
        )
    if op == "Rotate":
        return img.rotate(mag, resample=Image.Resampling.NEAREST, fillcolor=AFFINE_FILL)
    if op == "Posterize":
        return ImageOps.posterize(img, mag)
    if op == "Solarize":
        return ImageOps.solarize(img, mag)
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Invert":
        return ImageOps.invert(img)
    if op == "Cutout":
        if step.center is None:
            raise ValueError("RandAugment Cutout step needs a center (x, y)")
        w, h = img.size
        (cx, cy), half = step.center, mag // 2
        x0, x1 = max(0, cx - half), min(w, cx + half)
        y0, y1 = max(0, cy - half), min(h, cy + half)
        img = img.copy()
        # PIL's rectangle includes its end points; the package's square is half-open.
        ImageDraw.Draw(img).rectangle([x0, y0, x1 - 1, y1 - 1], fill=CUTOUT_FILL)
        return img
    raise ValueError(f"unknown RandAugment op {op!r}; expected one of {RAND_AUGMENT_OPS}")


def rand_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """RandAugment as in `randaugment==1.0.2`: one uniformly drawn ordered pair of
    (op, level 1..9) entries out of 135, each applied with probability 0.5."""
    if img.mode != "RGB":
        raise ValueError(f"rand_augment expects an RGB image, got mode {img.mode!r}")
    for step in rand_augment_plan(rng, img.size):
        img = apply_rand_augment_op(img, step)
    return img


def cutout(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """CutoutPIL as in SALGL/ASL: one square of side int(factor*S + 0.5), centred at a uniform
    random pixel, clipped to the image, filled with one random RGB colour (end points included,
    as PIL's rectangle draws them, so an unclipped square paints 2*(side//2) + 1 pixels a side).

    The original reads `h, w = img.size`, i.e. swaps width and height; on the square images of
    the training chain (resized to S x S first) that makes no difference, and here the axes are
    the right way round.
    """
    w, h = img.size
    side_h, side_w = int(factor * h + 0.5), int(factor * w + 0.5)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = np.clip([cy - side_h // 2, cy + side_h // 2], 0, h)
    x1, x2 = np.clip([cx - side_w // 2, cx + side_w // 2], 0, w)
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    img = img.copy()
    ImageDraw.Draw(img).rectangle([int(x1), int(y1), int(x2), int(y2)], fill=color)
    return img


def multiscale_crop_box(
    width: int,
    height: int,
    output_size: int,
    scales: tuple[float, ...],
    max_distort: int,
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """The (left, top, crop_w, crop_h) that ML-GCN's `MultiScaleCrop` (from TSN; fix_crop and
    more_fix_crop on) picks in a `width` x `height` image.

    Candidate sides are int(min(width, height) * scale), snapped to `output_size` when within
    2 pixels of it; a (w, h) pair of candidates i, j is allowed when |i - j| <= max_distort,
    and one pair is drawn uniformly. The position is drawn uniformly from 13 fixed offsets on a
    4 x 4 grid of steps ((image - crop) // 4): the corners, the centre, the edge middles and
    the four quarter points (duplicates kept, as in the original list).
    """
    base = min(width, height)
    sides = [int(base * s) for s in scales]
    snap = [output_size if abs(x - output_size) < 3 else x for x in sides]
    pairs = [
        (w, h) for i, h in enumerate(snap) for j, w in enumerate(snap) if abs(i - j) <= max_distort
    ]
    crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    grid = (
        (0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2),
        (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3),
    )  # fmt: skip
    gx, gy = grid[int(rng.integers(len(grid)))]
    return gx * ws, gy * hs, crop_w, crop_h


def multiscale_crop(
    img: Image.Image,
    output_size: int,
    scales: tuple[float, ...],
    max_distort: int,
    rng: np.random.Generator,
) -> Image.Image:
    """ML-GCN's `MultiScaleCrop(output_size, scales, max_distort)`: the `multiscale_crop_box`
    crop of the original image, resized bilinearly to output_size x output_size."""
    x, y, w, h = multiscale_crop_box(*img.size, output_size, scales, max_distort, rng)
    return img.crop((x, y, x + w, y + h)).resize((output_size, output_size), Image.BILINEAR)


def random_side_crop(
    img: Image.Image,
    output_size: int,
    resize_to: int,
    sides: tuple[int, ...],
    rng: np.random.Generator,
) -> Image.Image:
    """SSGRL's train crop: resize to resize_to x resize_to (bilinear), `RandomCrop` a square of
    a side drawn uniformly from `sides` at a uniform position (end points included, as
    torchvision's `randint(0, S - side)`), then resize to output_size (bilinear)."""
    side = int(sides[int(rng.integers(len(sides)))])
    if not 0 < side <= resize_to:
        raise ValueError(f"crop side {side} does not fit the {resize_to} px resize")
    img = img.resize((resize_to, resize_to), Image.BILINEAR)
    top = int(rng.integers(resize_to - side + 1))
    left = int(rng.integers(resize_to - side + 1))
    img = img.crop((left, top, left + side, top + side))
    return img.resize((output_size, output_size), Image.BILINEAR)


def center_crop(img: Image.Image, output_size: int, resize_to: int) -> Image.Image:
    """SSGRL's test transform: resize to resize_to x resize_to (bilinear), then torchvision's
    `CenterCrop(output_size)` (offsets rounded: int(round((S - size) / 2)))."""
    img = img.resize((resize_to, resize_to), Image.BILINEAR)
    offset = int(round((resize_to - output_size) / 2.0))
    return img.crop((offset, offset, offset + output_size, offset + output_size))
