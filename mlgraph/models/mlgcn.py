"""ML-GCN: multi-label image recognition with graph convolutional networks (Chen et al., CVPR 2019).

docs/ssgrl_mlgcn.md §3, as the official code computes it:

    image branch:  backbone layer4 map -> max pool (`pool`) -> x [B, D]
    label branch:  Â = D A^T D (D = diag(rowsum(A)^-1/2)), A the stored re-weighted correlation
                   W_cls = Â LeakyReLU_0.2(Â E W1) W2   [C, D]   (two bias-free graph convolutions)
    logits = x W_cls^T;  loss: mean BCE (`MultiLabelSoftMarginLoss`).

A [C, C] (`gen_A`: P(j|i) binarised at tau, columns re-weighted to p, plus I) and the word
vectors E [C, E'] are `Buffer`s. Attribute names are the official ones (`gc1.weight`,
`gc2.weight`, `A`), so `mlgraph.convert.mlgcn` only renames the backbone.

The pooling (`pool`): the released code's `MaxPool2d(14, 14)` is a global max only for a
14x14 map (448 px). At other sizes its fixed window covers the map's top-left 14x14 (at 576 px,
14x14 of 18x18), it fails for maps under 14, and from 28 on it yields several windows that the
classifier cannot take. 'global' is a true global max at any size (the paper's GMP, and the
choice of docs/ssgrl_mlgcn.md §7 for training); 'official' is the fixed window, kept so that
converted official checkpoints give the official outputs at every size the released model runs
at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlgraph import losses
from mlgraph.errors import ConfigError
from mlgraph.labels import cooccurrence
from mlgraph.labels.embeddings import check_graph_resolved, word_vectors
from mlgraph.models.common import NO_KWARGS, Buffer, cnn_backbone
from mlgraph.models.layers import uniform_init

POOLS = ("global", "official")
OFFICIAL_WINDOW = 14  # the released code's nn.MaxPool2d(14, 14)


def pool_features(fmap: jax.Array, pool: str) -> jax.Array:
    """The layer4 map [B, H, W, D] -> [B, D]: a global max ('global'), or the max over the
    released code's fixed 14x14 window at the top left ('official').

    Raises:
      ConfigError: 'official' on a map the released model cannot classify (a side under 14
        or of 28 and more: `MaxPool2d(14, 14)` then fails or gives several windows).
    """
    if pool == "global":
        return fmap.max(axis=(1, 2))
    k = OFFICIAL_WINDOW
    h, w = fmap.shape[1:3]
    if not (k <= h < 2 * k and k <= w < 2 * k):
        raise ConfigError(
            f"config.model.pool='official': the released MaxPool2d({k}, {k}) classifies only "
            f"layer4 maps of {k} to {2 * k - 1} per side (448 to 895 px at stride 32), got "
            f"{h}x{w}; use pool='global' at this size"
        )
    return fmap[:, :k, :k].max(axis=(1, 2))


def normalized_adjacency(a: jax.Array) -> jax.Array:
    """`gen_adj`: Â = D A^T D with D = diag(rowsum(A)^-1/2), float32 [C, C]."""
    a = a.astype(jnp.float32)
    d = jax.lax.rsqrt(a.sum(axis=1))
    return d[:, None] * a.T * d[None, :]


class GraphConvolution(nnx.Module):
    """ML-GCN's bias-free `GraphConvolution`: adj @ (x @ weight), weight stored (in, out).

    Initialised like the official `reset_parameters`: U(±1/sqrt(out_features)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = uniform_init(1.0 / math.sqrt(out_features))
        self.dtype = dtype
        self.weight = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))

    def __call__(self, x: jax.Array, adj: jax.Array) -> jax.Array:
        """Node features x [C, in], adjacency [C, C] -> [C, out]."""
        return adj.astype(self.dtype) @ (x.astype(self.dtype) @ self.weight[...].astype(self.dtype))


class MLGCN(nnx.Module):
    """The ML-GCN network (module docstring); `config.model` holds its arguments.

    Attributes:
      backbone: CNN backbone with `feature_map` (`features.*` in torch).
      gc1, gc2: the graph convolutions, E -> hidden -> D.
      A: the re-weighted correlation matrix [C, C] (`Buffer`; `A` in torch).
      embeddings: word vectors [C, E] (`Buffer`; not in the official checkpoint).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        backbone: str = "resnet101",
        backbone_kwargs: Mapping[str, Any] = NO_KWARGS,
        embed_path: str = "",
        embed_dim: int = 0,
        graph_path: str = "",
        tau: float = 0.4,
        p: float = 0.25,
        hidden_dim: int = 1024,
        frozen_bn: bool = False,
        pool: str = "global",
    ):
        """The keyword arguments after `rngs` are ML-GCN's `config.model` fields.

        Args:
          backbone, backbone_kwargs: a registered CNN backbone and extra arguments for it.
          embed_path: word vectors [C, E] (a .npy, .npz or pickled array such as ML-GCN's
            *_glove_word2vec.pkl), "minilm" (assets), or "" = zeros [C, embed_dim] filled from
            a converted checkpoint.
          graph_path: co-occurrence counts (.npz from mlgraph.labels.cooccurrence, ML-GCN's adj
            .pkl, or a .npy of the counts), "train_labels", or "" = A filled from a converted
            checkpoint.
          tau: binarisation threshold of P(j | i). p: re-weighting (the code's 0.25; the paper
            says 0.2). hidden_dim: output width of the first graph convolution.
          frozen_bn: the backbone's batch norm always uses running statistics.
          pool: 'global' (a true global max) or 'official' (the released code's fixed 14x14
            window; see the module docstring).

        Raises:
          ConfigError: unusable word-vector or counts files, an empty path without
            `embed_dim`, or an unknown pool.
        """
        if pool not in POOLS:
            raise ConfigError(f"config.model.pool={pool!r}: expected one of {', '.join(POOLS)}")
        c = int(num_classes)
        embeddings = word_vectors(embed_path, int(embed_dim), c, "ML-GCN")
        check_graph_resolved(graph_path)
        if graph_path:
            counts = cooccurrence.load_counts(graph_path, c, "config.model.graph_path")
            correlation = cooccurrence.mlgcn_correlation(counts, float(tau), float(p))
        else:
            correlation = np.eye(c, dtype=np.float32)
        backbone = cnn_backbone(
            backbone, backbone_kwargs, "ML-GCN", image_size=image_size, dtype=dtype, rngs=rngs
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.backbone = backbone
        self.frozen_bn = bool(frozen_bn)
        self.pool = pool
        self.dtype = dtype
        self.embeddings = Buffer(jnp.asarray(embeddings, jnp.float32))
        self.A = Buffer(jnp.asarray(correlation, jnp.float32))
        self.gc1 = GraphConvolution(embeddings.shape[1], hidden_dim, **kw)
        self.gc2 = GraphConvolution(hidden_dim, int(backbone.num_features), **kw)

    def classifier_weights(self) -> jax.Array:
        """W_cls [C, D] from the label graph (input-independent; no gradient through Â)."""
        adj = jax.lax.stop_gradient(normalized_adjacency(self.A[...]))
        x = nnx.leaky_relu(self.gc1(self.embeddings[...], adj), negative_slope=0.2)
        return self.gc2(x, adj)

    def __call__(
        self,
        images: jax.Array,
        *,
        labels: jax.Array | None = None,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> dict[str, jax.Array]:
        """Images [B, H, W, 3] -> {'logits' [B, C]} (float32)."""
        del labels, rngs  # no label-dependent state, no dropout
        fmap = self.backbone.feature_map(images, train=train and not self.frozen_bn)
        x = pool_features(fmap, self.pool).astype(self.dtype)
        logits = x @ self.classifier_weights().T
        return {"logits": logits.astype(jnp.float32)}


# `config.loss`: the official BCE by default, or ASL (`losses.classification`).
Loss = losses.ClassificationLoss


def loss_fn(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`config.loss` (the official: mean BCE; `MultiLabelSoftMarginLoss` equals it for 0/1
    targets)."""
    loss = losses.classification(outputs["logits"], batch["labels"], config.loss)
    return loss, {config.loss.name: loss}


Model = MLGCN
