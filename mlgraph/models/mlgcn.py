"""ML-GCN: multi-label image recognition with graph convolutional networks (Chen et al., CVPR 2019).

ssgrl_mlgcn.md §3, as the official code computes it:

    image branch:  backbone layer4 map -> global max pool -> x [B, D]
    label branch:  Â = D A^T D (D = diag(rowsum(A)^-1/2)), A the stored re-weighted correlation
                   W_cls = Â LeakyReLU_0.2(Â E W1) W2   [C, D]   (two bias-free graph convolutions)
    logits = x W_cls^T;  loss: mean BCE (`MultiLabelSoftMarginLoss`).

A [C, C] (`gen_A`: P(j|i) binarised at tau, columns re-weighted to p, plus I) and the word
vectors E [C, E'] are `Buffer`s. Attribute names are the official ones (`gc1.weight`,
`gc2.weight`, `A`), so `mlgraph.convert.mlgcn` only renames the backbone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mlgraph import config_lib, losses
from mlgraph.data import cooccurrence
from mlgraph.models.common import (
    Buffer,
    check_graph_resolved,
    cnn_backbone,
    create_from_config,
    word_vectors,
)
from mlgraph.models.layers import uniform_init

DEFAULTS: dict[str, Any] = {
    "name": "mlgcn",
    "backbone": "resnet101",
    "backbone_kwargs": {},
    # Word vectors: a .npy [C, E] file, "minilm" (assets), or "" = zeros [C, embed_dim] filled
    # from a converted checkpoint.
    "embed_path": "",
    "embed_dim": 0,
    # Co-occurrence counts (.npz from mlgraph.data.cooccurrence or ML-GCN's adj .pkl),
    # "train_labels", or "" = A filled from a converted checkpoint.
    "graph_path": "",
    "tau": 0.4,  # binarisation threshold of P(j | i)
    "p": 0.25,  # re-weighting (the code's 0.25; the paper says 0.2)
    "hidden_dim": 1024,  # output width of the first graph convolution
    # True: the backbone's batch norm always uses running statistics (a frozen backbone).
    "frozen_bn": False,
}


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model` fields of ML-GCN (`DEFAULTS`), with `overrides` applied.

    Raises:
      ConfigError: for a field ML-GCN does not have.
    """
    return config_lib.model_fields("ML-GCN", DEFAULTS, overrides)


def official_config(
    *,
    data: str,
    builder_config: str = "",
    eval_split: str = "val",
    train_split: str = "train",
) -> ml_collections.ConfigDict:
    """ML-GCN's official recipe (ssgrl_mlgcn.md §3.1) on `data`, for the configs/ files.

    ResNet-101 at 448 px, the GCN over gen_A of the training labels, BCE; train images through
    MultiScaleCrop (scales 1 to 0.5 of the shorter side, max_distort 2) and flip; SGD
    (momentum 0.9, L2 1e-4) at lr 0.1 for the GCN and 0.01 (lrp 0.1) for the backbone,
    gradients clipped to norm 10, batch 32, 20 epochs at a constant rate (the official x0.1
    step is at epoch 30, after the end).
    """
    c = config_lib.base_config()
    c.data.name = data
    c.data.builder_config = builder_config
    c.data.train_split = train_split
    c.data.eval_split = eval_split
    c.data.worker_count = 8
    c.image_size = 448
    c.data.augment.multiscale_crop = (1.0, 0.875, 0.75, 0.66, 0.5)
    c.data.augment.max_distort = 2
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 20.0
    c.eval_every_steps = 2000
    c.log_every_steps = 50
    c.dtype = "bfloat16"
    c.optimizer.name = "sgd"
    c.optimizer.schedule = "constant"
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.clip_grad_norm = 10.0
    c.optimizer.lr_mults = (("backbone/.*", 0.1),)
    c.ema.decay = 0.0
    c.model = model_config(backbone="resnet101", embed_path="minilm", graph_path="train_labels")
    return c


def _field(cfg: Mapping[str, Any] | ml_collections.ConfigDict, name: str) -> Any:
    return config_lib.model_field(cfg, name, DEFAULTS)


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
    """The ML-GCN network (module docstring); build it with `create` or `build`.

    Attributes:
      backbone: CNN backbone with `feature_map` (`features.*` in torch).
      gc1, gc2: the graph convolutions, E -> hidden -> D.
      A: the re-weighted correlation matrix [C, C] (`Buffer`; `A` in torch).
      embeddings: word vectors [C, E] (`Buffer`; not in the official checkpoint).
    """

    def __init__(
        self,
        backbone: nnx.Module,
        *,
        num_classes: int,
        embeddings: np.ndarray,
        correlation: np.ndarray,
        hidden_dim: int = 1024,
        frozen_bn: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Args are the `config.model` fields; `embeddings` [C, E], `correlation` A [C, C]."""
        c = int(num_classes)
        if embeddings.ndim != 2 or embeddings.shape[0] != c:
            raise ValueError(f"ML-GCN: embeddings must be [{c}, E], got {embeddings.shape}")
        if correlation.shape != (c, c):
            raise ValueError(f"ML-GCN: correlation must be [{c}, {c}], got {correlation.shape}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.backbone = backbone
        self.frozen_bn = bool(frozen_bn)
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
        x = fmap.max(axis=(1, 2)).astype(self.dtype)  # a true global max at any resolution
        logits = x @ self.classifier_weights().T
        return {"logits": logits.astype(jnp.float32)}


def build(
    model_cfg: Mapping[str, Any] | ml_collections.ConfigDict,
    *,
    num_classes: int,
    image_size: int,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> MLGCN:
    """Build ML-GCN from `config.model`-style fields (missing ones take `DEFAULTS`).

    Raises:
      ConfigError: unusable word-vector or counts files, or an empty path without `embed_dim`.
    """
    c = int(num_classes)
    words = word_vectors(
        _field(model_cfg, "embed_path"), int(_field(model_cfg, "embed_dim")), c, "ML-GCN"
    )
    graph_path = _field(model_cfg, "graph_path")
    check_graph_resolved(graph_path)
    if graph_path:
        counts = cooccurrence.load_counts(graph_path, c, "config.model.graph_path")
        a = cooccurrence.mlgcn_correlation(
            counts, float(_field(model_cfg, "tau")), float(_field(model_cfg, "p"))
        )
    else:
        a = np.eye(c, dtype=np.float32)
    backbone = cnn_backbone(
        _field(model_cfg, "backbone"),
        _field(model_cfg, "backbone_kwargs"),
        "ML-GCN",
        image_size=image_size,
        dtype=dtype,
        rngs=rngs,
    )
    return MLGCN(
        backbone,
        num_classes=c,
        embeddings=words,
        correlation=a,
        hidden_dim=int(_field(model_cfg, "hidden_dim")),
        frozen_bn=bool(_field(model_cfg, "frozen_bn")),
        dtype=dtype,
        rngs=rngs,
    )


def create(config: ml_collections.ConfigDict, *, num_classes: int, rngs: nnx.Rngs) -> MLGCN:
    """Build the ML-GCN that `config.model` describes, for `config.image_size` images."""
    return create_from_config(build, config, num_classes=num_classes, rngs=rngs)


def loss_fn(outputs: dict, labels: jax.Array, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean binary cross-entropy (`MultiLabelSoftMarginLoss` equals it for 0/1 targets)."""
    del config
    loss = losses.bce(outputs["logits"], labels)
    return loss, {"bce": loss}
