"""Grad-CAM++ class-activation maps and the patch masks Scob draws from them
(docs/scob_spml.md §3.3).

The computation is `pytorch-grad-cam` 1.4.8's `GradCAMPlusPlus` (the version Scob used) on one
target layer, written for NHWC maps:

    S_k   = sum_ij A_kij
    a_kij = G^2 / (2 G^2 + S_k G^3 + 1e-6),  0 where G_kij = 0
    w_k   = sum_ij relu(G_kij) a_kij
    cam   = relu(sum_k w_k A_k)                                   [h, w]

with A the layer's activations and G the gradient of the target score with respect to them.
`guidance_cam` scales it as the library does: shift by the minimum and divide by 1e-7 + the
maximum at the layer's resolution, bilinear resize to the image (half-pixel centres, clamped
borders: OpenCV's INTER_LINEAR, which `jax.image.resize` equals when upsampling), ReLU, and the
same scaling again. `patch_masks` averages it over the patches of a token grid, zeroes the four
corner cells and thresholds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRADCAM_EPS = 1e-6  # in the denominator of the Grad-CAM++ coefficients
SCALE_EPS = 1e-7  # in the denominator of the min-max scaling


def gradcam_plus_plus_weights(activations: jax.Array, grads: jax.Array) -> jax.Array:
    """The Grad-CAM++ channel weights w [B, K] of activations and gradients [B, h, w, K]."""
    a = activations.astype(jnp.float32)
    g = grads.astype(jnp.float32)
    g2 = g * g
    sums = a.sum(axis=(1, 2), keepdims=True)
    alpha = g2 / (2.0 * g2 + sums * g2 * g + GRADCAM_EPS)
    alpha = jnp.where(g != 0, alpha, 0.0)
    return jnp.sum(jax.nn.relu(g) * alpha, axis=(1, 2))


def gradcam_plus_plus(activations: jax.Array, grads: jax.Array) -> jax.Array:
    """The unscaled Grad-CAM++ map relu(sum_k w_k A_k) [B, h, w] of [B, h, w, K] inputs."""
    weights = gradcam_plus_plus_weights(activations, grads)
    return jax.nn.relu(jnp.einsum("bhwk,bk->bhw", activations.astype(jnp.float32), weights))


def scale_cam(cam: jax.Array) -> jax.Array:
    """Each map [B, h, w] shifted by its minimum and divided by 1e-7 + its new maximum (maps
    in [0, 1); an all-zero map stays zero)."""
    shifted = cam - cam.min(axis=(1, 2), keepdims=True)
    return shifted / (SCALE_EPS + shifted.max(axis=(1, 2), keepdims=True))


def guidance_cam(cam: jax.Array, image_size: int) -> jax.Array:
    """The layer map [B, h, w] scaled, resized to [B, image_size, image_size] (bilinear),
    rectified and scaled again, as pytorch-grad-cam returns it."""
    scaled = scale_cam(cam)
    full = jax.image.resize(scaled, (cam.shape[0], image_size, image_size), "linear")
    return scale_cam(jax.nn.relu(full))


def patch_scores(full_cam: jax.Array, grid: int) -> jax.Array:
    """The image-sized map [B, S, S] averaged over the S/grid-sided patches of a grid x grid
    token map, the four corner cells set to 0 (Scob's `resize_mask` + `crop_corner`).

    Raises:
      ValueError: when `grid` does not divide the image side.
    """
    b, size, _ = full_cam.shape
    if size % grid:
        raise ValueError(f"patch_scores: a {grid}x{grid} grid does not tile a {size}-pixel map")
    f = size // grid
    pooled = full_cam.reshape(b, grid, f, grid, f).mean(axis=(2, 4))
    ends = jnp.array([0, grid - 1])
    corners = jnp.zeros((grid, grid), bool).at[ends[:, None], ends[None, :]].set(True)
    return jnp.where(corners, 0.0, pooled)


def patch_masks(full_cam: jax.Array, grid: int, threshold: float = 0.5) -> jax.Array:
    """Salient patches [B, grid, grid] (bool): `patch_scores` >= `threshold`."""
    return patch_scores(full_cam, grid) >= threshold
