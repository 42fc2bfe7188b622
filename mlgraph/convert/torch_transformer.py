"""Table pieces for PyTorch transformer parts: the fused `nn.MultiheadAttention` in-projection,
DETR's post-norm encoder and decoder layers, and the check of a stored DETR sine position table.
SALGL and Query2Label both map through these."""

from __future__ import annotations

import math

import numpy as np

from mlgraph.convert import core
from mlgraph.models.attention import sine_position_encoding

Entries = dict[str, tuple[str, core.Transform]]


def in_proj_rows(i: int) -> core.Transform:
    """Rows [iD, (i+1)D) of a fused [3D, ...] in-projection; a weight block is transposed."""

    def transform(w: np.ndarray) -> np.ndarray:
        d = w.shape[0] // 3
        block = w[i * d : (i + 1) * d]
        return block.T if block.ndim == 2 else block

    return transform


def attention(path: str, key: str) -> Entries:
    """`nn.MultiheadAttention` at `key` -> `attention.MultiheadAttention` at `path`."""
    t: Entries = {}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        t[f"{path}/{name}/kernel"] = (f"{key}.in_proj_weight", in_proj_rows(i))
        t[f"{path}/{name}/bias"] = (f"{key}.in_proj_bias", in_proj_rows(i))
    return t | core.linear(f"{path}/out_proj", f"{key}.out_proj")


def encoder_layer(path: str, key: str) -> Entries:
    """DETR `TransformerEncoderLayer` -> `attention.TransformerEncoderLayer`."""
    t = attention(f"{path}/self_attn", f"{key}.self_attn")
    for fc in ("linear1", "linear2"):
        t |= core.linear(f"{path}/{fc}", f"{key}.{fc}")
    for norm in ("norm1", "norm2"):
        t |= core.layer_norm(f"{path}/{norm}", f"{key}.{norm}")
    return t


def decoder_layer(path: str, key: str, *, self_attn: bool) -> Entries:
    """DETR `TransformerDecoderLayer` (without `self_attn`/`norm1` when `self_attn` is False)
    -> `attention.TransformerDecoderLayer`."""
    t = attention(f"{path}/multihead_attn", f"{key}.multihead_attn")
    if self_attn:
        t |= attention(f"{path}/self_attn", f"{key}.self_attn")
        t |= core.layer_norm(f"{path}/norm1", f"{key}.norm1")
    for fc in ("linear1", "linear2"):
        t |= core.linear(f"{path}/{fc}", f"{key}.{fc}")
    for norm in ("norm2", "norm3"):
        t |= core.layer_norm(f"{path}/{norm}", f"{key}.{norm}")
    return t


def check_position_table(pe: np.ndarray, dim: int, image_size: int, key: str) -> None:
    """A checkpoint's stored sine table `key` [1, dim, S/32, S/32] must be the one the models
    recompute (`sine_position_encoding`).

    Raises:
      ConversionError: another shape, or values that differ by more than 1e-4.
    """
    grid = image_size // 32
    if pe.shape != (1, dim, grid, grid):
        raise core.ConversionError(
            f"{key} has shape {pe.shape}; expected (1, {dim}, {grid}, {grid}) "
            f"for image size {image_size}"
        )
    ours = sine_position_encoding(dim, grid)
    theirs = pe[0].transpose(1, 2, 0).reshape(grid * grid, dim)
    err = float(np.max(np.abs(ours - theirs)))
    if not math.isfinite(err) or err > 1e-4:
        raise core.ConversionError(f"{key} differs from the sine table by up to {err:.3g}")
