"""Small pieces shared by every model: the non-trainable buffer variable type."""

from flax import nnx


class Buffer(nnx.Variable):
    """Non-trainable model state that is part of the checkpoint and of the EMA.

    Examples: SALGL's scene co-occurrence counts (updated in the training step) and fixed label
    embeddings loaded from a file. Gradients are taken with respect to `nnx.Param` only, so a
    Buffer is never touched by the optimizer.
    """
