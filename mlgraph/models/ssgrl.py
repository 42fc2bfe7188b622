"""SSGRL: semantic-specific graph representation learning (Chen et al., ICCV 2019).

docs/ssgrl_mlgcn.md §1, with the official code's behaviour:

    ResNet layer4 map -> avgpool 2x2/s2 (`extra_pool`) -> F [B, N, D]
      -> semantic decoupling (low-rank bilinear attention of the word vectors over F) -> h0
      -> GGNN over the constant graph M (messages [M h ; M^T h], T steps, official reset gate)
      -> tanh(fc_output([hT ; h0])) -> per-class linear -> logits;  loss: mean BCE.

The word vectors [C, E] and the graph M [C, C] are `Buffer`s (fixed, checkpointed, never
optimized); the official checkpoint holds neither, so its converter takes them as files.
Attribute names follow the official ones where the structure allows (`word_semantic`,
`graph_net`, `fc_output`, `classifiers`); `mlgraph.convert.ssgrl` renames the rest.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlgraph import losses
from mlgraph.errors import ConfigError
from mlgraph.labels import arrays, cooccurrence
from mlgraph.labels.embeddings import check_graph_resolved, word_vectors
from mlgraph.models.attention import LowRankBilinearAttention
from mlgraph.models.common import NO_KWARGS, Buffer, cnn_backbone
from mlgraph.models.graph import GatedGNN
from mlgraph.models.layers import ElementWiseLinear, torch_linear

BN_MODES = ("layer4", "all", "none")


def load_graph(path: str, num_classes: int, diagonal: str = "one") -> np.ndarray:
    """The SSGRL graph M [C, C] float32 from `path` (see `SSGRL`'s `graph_path`): a `.npy` is M
    itself, any other file co-occurrence counts (`cooccurrence.load_counts`) turned into P(j | i).

    Raises:
      ConfigError: a missing or unreadable file, or a shape other than [C, C].
    """
    field = "config.model.graph_path"
    if pathlib.Path(path).suffix != ".npy":
        counts = cooccurrence.load_counts(path, num_classes, field)
        return cooccurrence.conditional_probability(counts, diagonal)
    _, graph = arrays.read_label_file(path, field)
    if graph.shape != (num_classes, num_classes):
        raise ConfigError(
            f"{field}={path}: holds an array of shape {graph.shape}; expected "
            f"[{num_classes}, {num_classes}]"
        )
    return graph.astype(np.float32)


class SSGRL(nnx.Module):
    """The SSGRL network (module docstring); `config.model` holds its arguments.

    Attributes:
      backbone: CNN backbone with `feature_map`.
      word_semantic: semantic decoupling (`fc_1`, `fc_2`, `fc_3`, `fc_a` in torch).
      graph_net: gated GNN, hidden D (`fc_eq{3,4,5}_{w,u}` in torch).
      fc_output: Linear(2D, D), followed by tanh.
      classifiers: per-class linear (C, D).
      word_features: word vectors [C, E] (`Buffer`).
      graph: the co-occurrence graph M [C, C] (`Buffer`); messages use M and M^T.
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
        extra_pool: bool = True,
        embed_path: str = "",
        embed_dim: int = 0,
        graph_path: str = "",
        graph_diagonal: str = "one",
        att_dim: int = 1024,
        num_steps: int = 3,
        reset_uses_update_u: bool = True,
        bn_train: str = "layer4",
    ):
        """The keyword arguments after `rngs` are SSGRL's `config.model` fields.

        Args:
          backbone, backbone_kwargs: a registered CNN backbone and extra arguments for it.
          extra_pool: the official AvgPool2d(2, 2) after layer4 (576 px -> 9x9 locations).
          embed_path: word vectors [C, E] (a .npy, .npz or pickled array), "minilm" (assets),
            or "" = zeros [C, embed_dim] to be filled from a converted checkpoint.
          graph_path: the graph M: a .npy [C, C] used as is (official prob_train.npy), a counts
            file (.npz from mlgraph.labels.cooccurrence, ML-GCN's adj .pkl) turned into P(j | i),
            "train_labels", or "" = zeros to be filled from a converted checkpoint.
          graph_diagonal: diagonal of P(j | i) built from counts: 'one' or 'zero'.
          att_dim: d1 = d2 of the semantic decoupling. num_steps: GGNN steps T.
          reset_uses_update_u: the official reset gate reuses the update gate's U (fc_eq3_u);
            False = the paper's gate.
          bn_train: which backbone batch norms use batch statistics in training: 'layer4'
            (official: conv1..layer3 stay in eval mode), 'all', or 'none' (a frozen backbone).

        Raises:
          ConfigError: unusable word-vector or graph files, an empty path without `embed_dim`,
            or an unknown bn_train.
        """
        if bn_train not in BN_MODES:
            raise ConfigError(
                f"config.model.bn_train={bn_train!r}: expected one of {', '.join(BN_MODES)}"
            )
        c = int(num_classes)
        word_features = word_vectors(embed_path, int(embed_dim), c, "SSGRL")
        check_graph_resolved(graph_path)
        if graph_path:
            graph = load_graph(graph_path, c, graph_diagonal)
        else:
            graph = np.zeros((c, c), np.float32)
        backbone = cnn_backbone(
            backbone, backbone_kwargs, "SSGRL", image_size=image_size, dtype=dtype, rngs=rngs
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = int(backbone.num_features)
        self.backbone = backbone
        self.extra_pool = bool(extra_pool)
        self.bn_train = bn_train
        self.dtype = dtype
        self.word_features = Buffer(jnp.asarray(word_features, jnp.float32))
        self.graph = Buffer(jnp.asarray(graph, jnp.float32))
        self.word_semantic = LowRankBilinearAttention(d, word_features.shape[1], att_dim, **kw)
        self.graph_net = GatedGNN(
            d, num_steps, outmess=True, reset_uses_update_u=reset_uses_update_u, **kw
        )
        self.fc_output = torch_linear(2 * d, d, **kw)
        self.classifiers = ElementWiseLinear(c, d, **kw)

    def features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [B, H, W, 3] -> the (pooled) feature map as locations [B, N, D].

        bn_train='layer4' runs a ResNet's conv1..layer3 with running statistics and layer4 with
        batch statistics in training, as the official code's mode switching does.
        """
        bb = self.backbone
        if self.bn_train == "layer4" and hasattr(bb, "layer4"):
            x = nnx.relu(bb.bn1(bb.conv1(images), use_running_average=True))
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
            for stage in (bb.layer1, bb.layer2, bb.layer3):
                for block in stage:
                    x = block(x, train=False)
            for block in bb.layer4:
                x = block(x, train=train)
        else:
            x = bb.feature_map(images, train=train and self.bn_train != "none")
        if self.extra_pool:
            # AvgPool2d(2, 2) without padding: a trailing odd row/column is dropped, as in torch.
            x = nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d).astype(self.dtype)

    def __call__(
        self,
        images: jax.Array,
        *,
        labels: jax.Array | None = None,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> dict[str, jax.Array]:
        """Images [B, H, W, 3] -> {'logits' [B, C], 'att_weights' [B, C, N]} (float32)."""
        del labels, rngs  # no label-dependent state, no dropout
        x = self.features(images, train=train)
        words = self.word_features[...].astype(self.dtype)
        h0, alphas = self.word_semantic(x, words)
        graph = jnp.broadcast_to(self.graph[...], (x.shape[0],) + self.graph.shape)
        ht = self.graph_net(h0, graph)
        out = jnp.tanh(self.fc_output(jnp.concatenate([ht, h0], axis=-1)))
        return {
            "logits": self.classifiers(out).astype(jnp.float32),
            "att_weights": alphas.astype(jnp.float32),
        }


# `config.loss`: the official BCE by default, or ASL (`losses.classification`).
Loss = losses.ClassificationLoss


def loss_fn(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`config.loss` (the official: mean BCE over every (image, class) entry)."""
    loss = losses.classification(outputs["logits"], batch["labels"], config.loss)
    return loss, {config.loss.name: loss}


Model = SSGRL
