"""SSGRL: semantic-specific graph representation learning (Chen et al., ICCV 2019).

ssgrl_mlgcn.md §1, with the official code's behaviour:

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
import ml_collections
import numpy as np
from flax import nnx

from mlgraph import config_lib, losses
from mlgraph.data import cooccurrence
from mlgraph.errors import ConfigError
from mlgraph.models.attention import LowRankBilinearAttention
from mlgraph.models.common import (
    Buffer,
    check_graph_resolved,
    cnn_backbone,
    create_from_config,
    word_vectors,
)
from mlgraph.models.graph import GatedGNN
from mlgraph.models.layers import ElementWiseLinear, torch_linear

BN_MODES = ("layer4", "all", "none")

DEFAULTS: dict[str, Any] = {
    "name": "ssgrl",
    "backbone": "resnet101",
    "backbone_kwargs": {},
    # The official AvgPool2d(2, 2) after layer4 (576 px -> 9x9 locations).
    "extra_pool": True,
    # Word vectors: a .npy [C, E] file, "minilm" (assets), or "" = zeros [C, embed_dim] to be
    # filled from a converted checkpoint.
    "embed_path": "",
    "embed_dim": 0,
    # The graph M: a .npy [C, C] used as is (official prob_train.npy), a counts file (.npz from
    # mlgraph.data.cooccurrence, ML-GCN .pkl) turned into P(j | i), "train_labels", or "" =
    # zeros to be filled from a converted checkpoint.
    "graph_path": "",
    "graph_diagonal": "one",  # diagonal of P(j | i) built from counts: 'one' or 'zero'
    "att_dim": 1024,  # d1 = d2 of the semantic decoupling
    "num_steps": 3,  # GGNN steps T
    # Official code: the reset gate reuses the update gate's U (fc_eq3_u); False = the paper.
    "reset_uses_update_u": True,
    # Which backbone batch norms use batch statistics in training: 'layer4' (official: conv1..
    # layer3 stay in eval mode), 'all', or 'none' (a frozen backbone).
    "bn_train": "layer4",
}


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model` fields of SSGRL (`DEFAULTS`), with `overrides` applied.

    Raises:
      ConfigError: for a field SSGRL does not have.
    """
    return config_lib.model_fields("SSGRL", DEFAULTS, overrides)


def official_config(
    *, data: str, builder_config: str, eval_split: str, train_split: str
) -> ml_collections.ConfigDict:
    """The official code's recipe (ssgrl_mlgcn.md §1.7) on `data`, for the configs/ files."""
    from mlgraph import config_lib

    c = config_lib.base_config()
    c.data.name = data
    c.data.builder_config = builder_config
    c.data.train_split = train_split
    c.data.eval_split = eval_split
    c.data.worker_count = 8
    c.data.augment.flip = False
    c.data.augment.crop_resize = 640
    c.data.augment.crop_sides = (640, 576, 512, 384, 320)
    c.data.eval_center_crop_from = 640
    c.image_size = 576
    c.batch_size = 4
    c.eval_batch_size = 16
    c.num_epochs = 200.0
    c.eval_every_steps = 20000
    c.log_every_steps = 100
    c.optimizer.name = "adam"
    c.optimizer.schedule = "constant"
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.0
    c.optimizer.frozen = ("backbone/(conv1|bn1|layer1|layer2|layer3)/.*",)
    c.ema.decay = 0.0  # no EMA in the official code (ema_mAP then equals mAP)
    c.model = model_config(
        backbone="resnet101", embed_path="minilm", graph_path="train_labels", bn_train="layer4"
    )
    return c


def _field(cfg: Mapping[str, Any] | ml_collections.ConfigDict, name: str) -> Any:
    return config_lib.model_field(cfg, name, DEFAULTS)


def load_graph(path: str, num_classes: int, diagonal: str = "one") -> np.ndarray:
    """The SSGRL graph M [C, C] float32 from `path` (see `DEFAULTS['graph_path']`).

    Raises:
      ConfigError: a missing or unreadable file, or a shape other than [C, C].
    """
    field = "config.model.graph_path"
    file = pathlib.Path(path)
    if file.suffix != ".npy":
        counts = cooccurrence.load_counts(file, num_classes, field)
        return cooccurrence.conditional_probability(counts, diagonal)
    if not file.is_file():
        raise ConfigError(f"{field}={path}: no such file")
    try:
        graph = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{field}={path}: not a readable .npy file ({e})") from e
    if graph.shape != (num_classes, num_classes):
        raise ConfigError(
            f"{field}={path}: holds an array of shape {graph.shape}; expected "
            f"[{num_classes}, {num_classes}]"
        )
    return graph.astype(np.float32)


class SSGRL(nnx.Module):
    """The SSGRL network (module docstring); build it with `create` or `build`.

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
        backbone: nnx.Module,
        *,
        num_classes: int,
        word_features: np.ndarray,
        graph: np.ndarray,
        extra_pool: bool = True,
        att_dim: int = 1024,
        num_steps: int = 3,
        reset_uses_update_u: bool = True,
        bn_train: str = "layer4",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Args are the `config.model` fields; `word_features` [C, E], `graph` [C, C]."""
        if bn_train not in BN_MODES:
            raise ConfigError(
                f"config.model.bn_train={bn_train!r}: expected one of {', '.join(BN_MODES)}"
            )
        c = int(num_classes)
        if word_features.ndim != 2 or word_features.shape[0] != c:
            raise ValueError(f"SSGRL: word_features must be [{c}, E], got {word_features.shape}")
        if graph.shape != (c, c):
            raise ValueError(f"SSGRL: graph must be [{c}, {c}], got {graph.shape}")
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


def build(
    model_cfg: Mapping[str, Any] | ml_collections.ConfigDict,
    *,
    num_classes: int,
    image_size: int,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> SSGRL:
    """Build SSGRL from `config.model`-style fields (missing ones take `DEFAULTS`).

    Raises:
      ConfigError: unusable word-vector or graph files, or an empty path without `embed_dim`.
    """
    c = int(num_classes)
    words = word_vectors(
        _field(model_cfg, "embed_path"), int(_field(model_cfg, "embed_dim")), c, "SSGRL"
    )
    graph_path = _field(model_cfg, "graph_path")
    check_graph_resolved(graph_path)
    if graph_path:
        graph = load_graph(graph_path, c, _field(model_cfg, "graph_diagonal"))
    else:
        graph = np.zeros((c, c), np.float32)
    backbone = cnn_backbone(
        _field(model_cfg, "backbone"),
        _field(model_cfg, "backbone_kwargs"),
        "SSGRL",
        image_size=image_size,
        dtype=dtype,
        rngs=rngs,
    )
    return SSGRL(
        backbone,
        num_classes=c,
        word_features=words,
        graph=graph,
        extra_pool=bool(_field(model_cfg, "extra_pool")),
        att_dim=int(_field(model_cfg, "att_dim")),
        num_steps=int(_field(model_cfg, "num_steps")),
        reset_uses_update_u=bool(_field(model_cfg, "reset_uses_update_u")),
        bn_train=_field(model_cfg, "bn_train"),
        dtype=dtype,
        rngs=rngs,
    )


def create(config: ml_collections.ConfigDict, *, num_classes: int, rngs: nnx.Rngs) -> SSGRL:
    """Build the SSGRL that `config.model` describes, for `config.image_size` images."""
    return create_from_config(build, config, num_classes=num_classes, rngs=rngs)


def loss_fn(outputs: dict, labels: jax.Array, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean binary cross-entropy over every (image, class) entry (`BCEWithLogitsLoss`)."""
    del config
    loss = losses.bce(outputs["logits"], labels)
    return loss, {"bce": loss}
