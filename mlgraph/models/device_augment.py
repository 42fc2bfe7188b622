"""Photometric augmentation on device, inside a jitted step: torchvision's tensor ColorJitter,
RandomGrayscale and GaussianBlur, and Scob's strong ("hard") augmentation built from them
(docs/scob_spml.md §3.5).

Images are float32 NHWC batches; each image draws its own randomness from a JAX key. The ops
follow torchvision's tensor functional (0.15, the version Scob ran): a blend clamps to [0, 1];
contrast blends with the mean of the image's grayscale (weights 0.2989, 0.587, 0.114);
saturation with the grayscale itself; hue shifts H in torchvision's RGB->HSV->RGB; the blur is a
separable Gaussian of the given size with reflect padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def grayscale(img: jax.Array) -> jax.Array:
    """Luma [..., H, W, 1] of RGB [..., H, W, 3] with torchvision's weights."""
    w = jnp.asarray(GRAY_WEIGHTS, img.dtype)
    return (img * w).sum(axis=-1, keepdims=True)


def blend(img: jax.Array, other: jax.Array, ratio: jax.Array) -> jax.Array:
    """ratio * img + (1 - ratio) * other, clamped to [0, 1] (torchvision's `_blend`)."""
    return jnp.clip(ratio * img + (1.0 - ratio) * other, 0.0, 1.0)


def adjust_brightness(img: jax.Array, factor: jax.Array) -> jax.Array:
    """One image [H, W, 3] scaled by `factor` and clamped."""
    return blend(img, jnp.zeros_like(img), factor)


def adjust_contrast(img: jax.Array, factor: jax.Array) -> jax.Array:
    """One image [H, W, 3] blended with the mean of its grayscale."""
    return blend(img, grayscale(img).mean(), factor)


def adjust_saturation(img: jax.Array, factor: jax.Array) -> jax.Array:
    """One image [H, W, 3] blended with its grayscale."""
    return blend(img, grayscale(img), factor)


def rgb_to_hsv(img: jax.Array) -> jax.Array:
    """torchvision's `_rgb2hsv` on channels-last images: H, S, V in [0, 1]."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc = img.max(axis=-1)
    minc = img.min(axis=-1)
    equal = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(equal, 1.0, maxc)
    divisor = jnp.where(equal, 1.0, cr)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = jnp.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(img: jax.Array) -> jax.Array:
    """torchvision's `_hsv2rgb` on channels-last images."""
    h, s, v = img[..., 0], img[..., 1], img[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    sector = i.astype(jnp.int32) % 6
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    table = jnp.stack(
        [
            jnp.stack([v, q, p, p, t, v], axis=-1),
            jnp.stack([t, v, v, q, p, p], axis=-1),
            jnp.stack([p, p, t, v, v, q], axis=-1),
        ],
        axis=-2,
    )  # [..., 3, 6]: channel x sector
    onehot = jax.nn.one_hot(sector, 6, dtype=img.dtype)
    return jnp.einsum("...cs,...s->...c", table, onehot)


def adjust_hue(img: jax.Array, factor: jax.Array) -> jax.Array:
    """One image [H, W, 3] with its hue shifted by `factor` (in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(img)
    hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + factor, 1.0))
    return hsv_to_rgb(hsv)


def color_jitter(
    img: jax.Array,
    key: jax.Array,
    brightness: float = 0.8,
    contrast: float = 0.8,
    saturation: float = 0.8,
    hue: float = 0.2,
) -> jax.Array:
    """torchvision `ColorJitter(brightness, contrast, saturation, hue)` on one image [H, W, 3]:
    factors U[1 - x, 1 + x] (hue U[-hue, hue]), the four ops in a random order."""
    k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
    order = jax.random.permutation(k_order, 4)

    def factor(k, spread):
        return jax.random.uniform(k, (), img.dtype, max(0.0, 1.0 - spread), 1.0 + spread)

    ops = (
        lambda x: adjust_brightness(x, factor(k_b, brightness)),
        lambda x: adjust_contrast(x, factor(k_c, contrast)),
        lambda x: adjust_saturation(x, factor(k_s, saturation)),
        lambda x: adjust_hue(x, jax.random.uniform(k_h, (), img.dtype, -hue, hue)),
    )
    return jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(order[i], ops, x), img)


def gaussian_kernel(size: int, sigma: jax.Array) -> jax.Array:
    """torchvision's normalised 1-D Gaussian of `size` taps at `sigma`."""
    half = (size - 1) * 0.5
    x = jnp.linspace(-half, half, size)
    pdf = jnp.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def gaussian_blur(img: jax.Array, size: int, sigma: jax.Array) -> jax.Array:
    """One image [H, W, C] blurred by a separable `size` x `size` Gaussian, reflect-padded."""
    k = gaussian_kernel(size, sigma).astype(img.dtype)
    pad = size // 2
    x = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    x = sum(k[i] * x[i : i + h] for i in range(size))
    return sum(k[j] * x[:, j : j + w] for j in range(size))


def strong_augment(
    images: jax.Array,
    key: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    undo_std: Sequence[float] | None = None,
    photometric: bool = True,
) -> jax.Array:
    """Scob's strong augmentation of a normalised batch [B, H, W, 3] (docs/scob_spml.md §3.5).

    Per image, each stage gated by its own coin: undo the normalisation with `undo_std`
    (Scob's code has 0.255 for the blue std, so blue comes back x 0.255/0.225); ColorJitter
    (0.8, 0.8, 0.8, 0.2) with probability 0.3; RandomGrayscale(p=0.1) itself gated at 0.2; a
    3x3 Gaussian blur with sigma U[1, 2] at 0.2; normalise with `mean` and `std` again. No
    clamping but inside ColorJitter. `photometric=False` keeps only the two normalisations,
    the stages that always run (`key` unused): the official pipeline with its random stages'
    probabilities at 0.
    """
    mean = jnp.asarray(mean, images.dtype)
    std = jnp.asarray(std, images.dtype)
    undo = std if undo_std is None else jnp.asarray(undo_std, images.dtype)
    if not photometric:
        return (images * undo + mean * undo / std - mean) / std

    def one(args):
        img, k = args
        k_gate, k_jitter, k_sigma = jax.random.split(k, 3)
        gates = jax.random.uniform(k_gate, (4,))
        x = img * undo + mean * undo / std
        x = jax.lax.cond(gates[0] <= 0.3, lambda x: color_jitter(x, k_jitter), lambda x: x, x)
        gray = (gates[1] <= 0.2) & (gates[2] < 0.1)
        x = jax.lax.cond(gray, lambda x: jnp.broadcast_to(grayscale(x), x.shape), lambda x: x, x)
        sigma = jax.random.uniform(k_sigma, (), images.dtype, 1.0, 2.0)
        x = jax.lax.cond(gates[3] <= 0.2, lambda x: gaussian_blur(x, 3, sigma), lambda x: x, x)
        return (x - mean) / std

    # Image by image (not vmapped), so that each gate and ColorJitter's order is a real branch:
    # only the ops an image draws run, and the step compiles each op once.
    return jax.lax.map(one, (images, jax.random.split(key, images.shape[0])))
