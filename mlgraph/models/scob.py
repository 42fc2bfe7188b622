"""Scob: semantic contrastive bootstrapping for single-positive multi-label recognition (Chen,
Zhao and Li, IJCV 2023), as the official code runs it (docs/scob_spml.md §3, §6).

    frozen CNN -> stride-32 map (ResNet-50 layer4, 14x14x2048 at 448 px) and stride-16 map
      (layer3, 28x28x1024) -> one masked transformer `ImageMid` per scale (1x1 conv to D = 512,
      learned row/column positions, 2 post-norm encoder layers with leaky-ReLU FFN and key
      masks, LayerNorm, mean over every token) -> h = [h_32 ; h_16] (2D)
      -> classifier Linear(2D, C) (Scob's outputs are sigmoid probabilities; `logits` here are
         the pre-sigmoid scores) and projector Linear-LeakyReLU-Linear (contrastive queries);
    a second, "momentum" pair of `ImageMid`s (`fm2_*`) gives the contrastive keys, and the label
    estimator Phi [N_train, C] (the training split's latent labels) lives in `state["extra"]`.

One iteration (`make_train_step`), on a batch with one observed positive y_b per image:

1. the classification + label-estimation objective (`losses.scob_classification`, ROLE with
   Scob's eps quirk) without masks; one Adam step of the groups it reaches (linear parts,
   transformers, classifier, and Phi);
2. Grad-CAM++ of p_{b, y_b} at the stride-32 map with the updated network in eval mode
   (`mlgraph.models.cam`; one `jax.grad` for the batch, the backbone outside the gradient),
   giving the salient patches of both grids (corners off, threshold 0.5);
3. keys k = fm2 on the clean view with those masks (dropout on, no gradient); queries
   u = projector(fm1 on Scob's strong augmentation, `mlgraph.models.device_augment`, same masks);
   InfoNCE against one prototype per class from this epoch's bank (`losses.prototype_infonce`)
   x lambda_cl; one Adam step of the groups it reaches (linear parts, transformers, projector);
4. the prototype bank takes this batch's keys with their pre-update confidence p_{b, y_b}.

After each epoch (`epoch_end`) the bank is emptied and the correlation matrix is recomputed
from Phi. Adam follows torch's skip-on-None semantics per group (`mlgraph.optim.GroupAdam`);
learning rates step by epoch (StepLR).

The official code's behaviour is the default, each part behind a flag (docs/scob_spml.md §3.6, §6):
`faithful_momentum_bug` (fm2 frozen at its random init, since the code's EMA is a no-op; False:
a real EMA with `momentum` and an initial copy), `drifting_backbone_bn` (the "frozen"
backbone's batch norm uses batch statistics and updates its running ones outside the CAM pass,
except in the first classification pass of each epoch: chinopie's `set_train` puts frozen batch
norms in eval mode and never calls `train()`, so that pass runs on the running statistics, as
the previous phase left them; False: always on the running statistics),
`nan_skip_batch` (a sample with no salient patch at a scale makes torch's attention NaN and the
whole batch's contrastive step is skipped, its keys kept out of the bank; False: that sample's
keys are all unmasked instead), and in `config.loss` `hard_correlation` (R < 1 set to 0, so the
co-occurrence weighting is the identity) and `exclude_own_prototype` (False: the own class's
prototype stays in the softmax at logit 0). `strong_augment=False` keeps only the contrastive
view's two normalisations (the official pipeline's stages that always run; its random ones off),
for parity runs against torch. Not reproduced: in the official code the first classification
pass of each epoch after the first also runs without dropout (the model is still in eval mode
from the validation); a traced dropout switch would cost a second classification pass every
step for one iteration an epoch.

Names: `fm*_14` is the stride-32 scale and `fm*_28` the stride-16 one (their grids at 448 px),
as in the official checkpoints, whose keys `mlgraph.convert.scob` maps by renaming.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mlgraph import losses
from mlgraph.errors import ConfigError
from mlgraph.models import cam, device_augment
from mlgraph.models.attention import TransformerEncoderLayer
from mlgraph.models.common import NO_KWARGS, cnn_backbone
from mlgraph.models.layers import torch_linear, uniform_init
from mlgraph.optim import GroupAdam

# Adam groups, in the order of the official optimizer's param groups (docs/scob_spml.md §3.8), and
# the `config.optimizer.group_lr` key of each; `label_estimator` is Phi in `state["extra"]`.
GROUPS = {
    "linear": r"fm1_(14|28)/(feat_conv/.*|row_embed|col_embed)",
    "transformer": r"fm1_(14|28)/(layers|norm)/.*",
    "projector": r"projector/.*",
    "classifier": r"classifier/.*",
}
GROUP_LRS = ("linear", "transformer", "projector", "classifier", "label_estimator")
CLASSIFICATION_GROUPS = ("linear", "transformer", "classifier")
CONTRASTIVE_GROUPS = ("linear", "transformer", "projector")
# What the official strong augmentation undoes the normalisation with (0.255: its blue typo).
UNDO_STD = (0.229, 0.224, 0.255)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


LABEL_INIT_LOW, LABEL_INIT_HIGH = _logit(0.2), _logit(0.8)
LABEL_INIT_POSITIVE = _logit(0.995)
LABEL_INIT_NEGATIVE = _logit(0.005)


class ImageMid(nnx.Module):
    """Scob's per-scale masked transformer: 1x1 conv (in -> D, bias), learned 2-D positions
    (`col_embed[x] ; row_embed[y]`, tables U[0, 1) of `pos_table` x D/2), tokens row-major,
    `num_layers` post-norm encoder layers (identical at init, leaky-ReLU FFN, dropout), a final
    LayerNorm, and the mean over all tokens (masked ones included)."""

    def __init__(
        self,
        in_features: int,
        dim: int = 512,
        num_heads: int = 8,
        num_layers: int = 2,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        pos_table: int = 50,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % 2:
            raise ConfigError(f"config.model.dim={dim}: must be even (row and column halves)")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bound = 1.0 / math.sqrt(in_features)  # torch's Conv2d init for a 1x1 kernel
        self.feat_conv = nnx.Conv(
            in_features,
            dim,
            (1, 1),
            kernel_init=uniform_init(bound),
            bias_init=uniform_init(bound),
            **kw,
        )
        self.pos_table = int(pos_table)
        self.row_embed = nnx.Param(
            jax.random.uniform(rngs.params(), (pos_table, dim // 2), param_dtype)
        )
        self.col_embed = nnx.Param(
            jax.random.uniform(rngs.params(), (pos_table, dim // 2), param_dtype)
        )
        layer = TransformerEncoderLayer(
            dim, num_heads, ffn_dim, dropout, activation=jax.nn.leaky_relu, **kw
        )
        # torch's TransformerEncoder deep-copies one layer: every layer starts the same.
        self.layers = nnx.List([layer] + [nnx.clone(layer) for _ in range(num_layers - 1)])
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, **kw)

    def __call__(
        self,
        fmap: jax.Array,
        salient: jax.Array | None = None,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """A map [B, h, w, in] (and optional key mask `salient` [B, h, w], True = may be
        attended to) -> the pooled feature [B, D]."""
        b, h, w, _ = fmap.shape
        if max(h, w) > self.pos_table:
            raise ConfigError(
                f"Scob: a {h}x{w} feature map exceeds the {self.pos_table}-entry position "
                "tables (config.model.pos_table); use smaller images"
            )
        x = self.feat_conv(fmap)
        col = jnp.broadcast_to(self.col_embed[:w][None], (h, w, self.col_embed.shape[1]))
        row = jnp.broadcast_to(self.row_embed[:h][:, None], (h, w, self.row_embed.shape[1]))
        x = x + jnp.concatenate([col, row], axis=-1).astype(x.dtype)
        tokens = x.reshape(b, h * w, x.shape[-1])
        key_mask = None if salient is None else salient.reshape(b, h * w)
        for layer in self.layers:
            tokens = layer(tokens, key_mask=key_mask, train=train, rngs=rngs)
        return self.norm(tokens).mean(axis=1)


class Projector(nnx.Module):
    """Linear(2D, 2D) -> LeakyReLU(0.01) -> Linear(2D, 2D): the contrastive query head."""

    def __init__(self, dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.projector1 = torch_linear(dim, dim, **kw)
        self.projector2 = torch_linear(dim, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Features [B, 2D] -> queries [B, 2D]."""
        return self.projector2(jax.nn.leaky_relu(self.projector1(x)))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _pyramid(graphdef, state, images, train):
    """The backbone's (stride-32, stride-16) maps (gradient stopped) and its new state.

    A function of its own under `jax.jit`: a step runs the backbone up to four times, and each
    batch-norm update inside a large trace costs flax a walk over the whole trace (its sharding
    check on tracers); nested, the backbone is traced once and the walks stay small. XLA
    inlines it, so the compiled step is the same."""
    backbone = nnx.merge(graphdef, state)
    x16, x32 = backbone.pyramid(images, train=train)
    maps = jax.lax.stop_gradient(x32), jax.lax.stop_gradient(x16)
    return maps, nnx.state(backbone)


class Scob(nnx.Module):
    """The Scob network (see the module docstring); `config.model` holds its arguments.

    Attributes:
      backbone: the frozen CNN (its `pyramid` gives the stride-16 and stride-32 maps).
      fm1_14, fm1_28: the online `ImageMid`s of the stride-32 and stride-16 maps.
      fm2_14, fm2_28: the momentum branch (keys), never optimized.
      projector: the contrastive query head.
      classifier: Linear(2D, C).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        backbone: str = "resnet50",
        backbone_kwargs: Mapping[str, Any] = NO_KWARGS,
        dim: int = 512,
        num_heads: int = 8,
        num_layers: int = 2,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        pos_table: int = 50,
        cam_threshold: float = 0.5,
        bank_size: int = 2,
        faithful_momentum_bug: bool = True,
        momentum: float = 0.999,
        drifting_backbone_bn: bool = True,
        nan_skip_batch: bool = True,
        strong_augment: bool = True,
    ):
        """Arguments after `rngs` are the `config.model` fields: the backbone, the transformers'
        width `dim` (D, per scale), heads, layers, FFN width, dropout and position-table size,
        the CAM threshold, the prototype bank's entries per class, and the official-behaviour
        flags of the module docstring (`momentum` is the real EMA's, used only when
        `faithful_momentum_bug` is False).

        Raises:
          ConfigError: an image size that is not a multiple of 32, or a backbone without the
            two-scale `pyramid`.
        """
        if image_size % 32:
            raise ConfigError(
                f"config.image_size={image_size}: Scob needs a multiple of 32 (its CAM patches "
                "tile the image)"
            )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.backbone = cnn_backbone(
            backbone, backbone_kwargs, "Scob", image_size=image_size, dtype=dtype, rngs=rngs
        )
        if not hasattr(self.backbone, "pyramid"):
            raise ConfigError(
                f"config.model.backbone={backbone!r}: Scob needs a CNN with stride-16 and "
                "stride-32 maps (resnet50, resnet101, mobilenet_v2)"
            )
        c16, c32 = self.backbone.pyramid_features
        mid = dict(
            dim=dim,
            num_heads=num_heads,
            num_layers=num_layers,
            ffn_dim=ffn_dim,
            dropout=dropout,
            pos_table=pos_table,
        )
        self.fm1_14 = ImageMid(c32, **mid, **kw)
        self.fm1_28 = ImageMid(c16, **mid, **kw)
        if faithful_momentum_bug:
            # The official `move_k` never writes: fm2 keeps an independent random init.
            self.fm2_14 = ImageMid(c32, **mid, **kw)
            self.fm2_28 = ImageMid(c16, **mid, **kw)
        else:
            self.fm2_14, self.fm2_28 = nnx.clone(self.fm1_14), nnx.clone(self.fm1_28)
        self.projector = Projector(2 * dim, **kw)
        self.classifier = torch_linear(2 * dim, num_classes, **kw)
        self.image_size = int(image_size)
        self.feature_dim = 2 * int(dim)
        self.cam_threshold = float(cam_threshold)
        self.bank_size = int(bank_size)
        self.faithful_momentum_bug = bool(faithful_momentum_bug)
        self.momentum = float(momentum)
        self.drifting_backbone_bn = bool(drifting_backbone_bn)
        self.nan_skip_batch = bool(nan_skip_batch)
        self.strong_augment = bool(strong_augment)

    def features(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """The frozen backbone's (stride-32, stride-16) maps, outside every gradient; `train`:
        batch norm on batch statistics, updating its running ones."""
        graphdef, state = nnx.split(self.backbone)
        maps, state = _pyramid(graphdef, state, images, train)
        nnx.update(self.backbone, state)
        return maps

    def drifting_features(self, images: jax.Array, first: jax.Array):
        """(the classification pass's maps, the CAM pass's) of an iteration under
        `drifting_backbone_bn`: the classification pass on batch statistics, updating the
        running ones, except where the traced `first` holds (an epoch's first iteration), where
        it runs on the running statistics and leaves them; the CAM pass always on the running
        statistics after it.

        So the eval-mode pass serves both where `first` holds, and the step runs the backbone
        twice, as without the exception. Both passes run and a select picks: XLA:CPU's
        collectives (the batch statistics over a sharded batch) can deadlock inside a
        conditional."""
        graphdef, state = nnx.split(self.backbone)
        train_maps, trained = _pyramid(graphdef, state, images, True)
        pick = functools.partial(jnp.where, first)
        kept = jax.tree.map(pick, state, trained)
        eval_maps, _ = _pyramid(graphdef, kept, images, False)
        nnx.update(self.backbone, kept)
        return jax.tree.map(pick, eval_maps, train_maps), eval_maps

    def online(self, x32, x16, salient32=None, salient16=None, *, train=False, rngs=None):
        """h = [fm1_14(x32) ; fm1_28(x16)] [B, 2D] (key masks optional)."""
        kw = dict(train=train, rngs=rngs)
        return jnp.concatenate(
            [self.fm1_14(x32, salient32, **kw), self.fm1_28(x16, salient16, **kw)], axis=-1
        )

    def momentum_features(self, x32, x16, salient32, salient16, *, train=False, rngs=None):
        """k = [fm2_14(x32) ; fm2_28(x16)] [B, 2D] with the key masks, without gradient."""
        kw = dict(train=train, rngs=rngs)
        k = jnp.concatenate(
            [self.fm2_14(x32, salient32, **kw), self.fm2_28(x16, salient16, **kw)], axis=-1
        )
        return jax.lax.stop_gradient(k)

    def __call__(
        self, images: jax.Array, *, labels=None, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> dict[str, jax.Array]:
        """Images [B, S, S, 3] -> {'logits' [B, C] float32 (pre-sigmoid), 'features' [B, 2D]},
        without masks (the classification and evaluation forward)."""
        del labels
        x32, x16 = self.features(images, train=train and self.drifting_backbone_bn)
        h = self.online(x32, x16, train=train, rngs=rngs)
        return {"logits": self.classifier(h).astype(jnp.float32), "features": h}


Model = Scob


@dataclasses.dataclass(frozen=True)
class Loss:
    """`config.loss` of Scob (docs/scob_spml.md §3.4, §3.6): the classification objective's K and
    the contrastive objective's settings, the official code's values by default."""

    name: str = "scob"  # a label only: Scob trains its one objective
    # K, the expected positives per image of the EPR terms (Scob's code: 1.5 VOC, 3.9 COCO).
    expected_num_pos: float = 1.5
    cl_weight: float = 0.1  # lambda_cl, the weight of the contrastive loss
    cl_temperature: float = 1.0  # tau, the InfoNCE temperature
    # R < 1 set to 0, so the co-occurrence weighting of the prototypes is the identity (the
    # official code's); False: negatives weighted by 1 - R[y_b, c]^2 of the label estimator.
    hard_correlation: bool = True
    # Each image's own-class prototype left out of the softmax; False (the official code's):
    # it stays in at logit 0.
    exclude_own_prototype: bool = False


def loss_fn(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scob's classification objective (`losses.scob_classification`) of sigmoid(logits) and
    the label estimator's probabilities sigmoid(`label_logits`), the batch's rows of Phi,
    against its observed single positives `observed`.

    Raises:
      KeyError: a batch without `observed` or `label_logits` (the step adds both).
    """
    for key in ("observed", "label_logits"):
        if key not in batch:
            raise KeyError(f"Scob's loss_fn needs batch[{key!r}] (added by its train step)")
    loss = losses.scob_classification(
        jax.nn.sigmoid(outputs["logits"]),
        jax.nn.sigmoid(batch["label_logits"]),
        batch["observed"],
        config.loss.expected_num_pos,
    )
    return loss, {"classification": loss}


# ---------------------------------------------------------------------------------------------
# Label estimator, correlation, prototype bank
# ---------------------------------------------------------------------------------------------
def label_init(observed: jax.Array, rng: jax.Array) -> jax.Array:
    """Scob's initial Phi [N, C]: unknowns U[logit(0.2), logit(0.8)] = U[-1.386, 1.386]
    (wider than Cole's), observed positives logit(0.995), observed negatives logit(0.005)."""
    z = jnp.asarray(observed)
    init = jax.random.uniform(rng, z.shape, jnp.float32, LABEL_INIT_LOW, LABEL_INIT_HIGH)
    init = jnp.where(z == -1, jnp.float32(LABEL_INIT_NEGATIVE), init)
    return jnp.where(z == 1, jnp.float32(LABEL_INIT_POSITIVE), init)


def label_correlation(phi: jax.Array) -> jax.Array:
    """R [C, C] from the estimated labels q = sigmoid(Phi): R_ij = mean_n(q_ni q_nj) /
    mean_n(q_ni) off the diagonal, R_ii = 1."""
    q = jax.nn.sigmoid(phi.astype(jnp.float32))
    joint = q.T @ q / q.shape[0]
    r = joint / q.mean(axis=0)[:, None]
    return jnp.where(jnp.eye(q.shape[1], dtype=bool), 1.0, r)


def negative_weights(correlation: jax.Array, targets: jax.Array, hard: bool) -> jax.Array:
    """Scob's weights 1 - R~[y_b, c]^2 [B, C] of the prototype logits; `hard`: R~ = R with
    every entry < 1 set to 0 (the official setting, which leaves the identity)."""
    r = jnp.where(correlation < 1.0, 0.0, correlation) if hard else correlation
    return 1.0 - r[targets] ** 2


def empty_bank(num_classes: int, size: int, dim: int) -> dict[str, jax.Array]:
    """A prototype bank with no entries: per class `size` slots of (confidence, image index,
    key [dim]) and the number filled."""
    return {
        "confidence": jnp.zeros((num_classes, size), jnp.float32),
        "image": jnp.full((num_classes, size), -1, jnp.int32),
        "key": jnp.zeros((num_classes, size, dim), jnp.float32),
        "filled": jnp.zeros((num_classes,), jnp.int32),
    }


def _lexicographic(conf: jax.Array, ids: jax.Array, use: jax.Array, largest: bool) -> jax.Array:
    """The slot of the smallest (or largest) (confidence, image) pair among the slots `use`:
    the order of the official heap's ((confidence, image_id), ...) tuples."""
    sign = 1.0 if largest else -1.0
    score = jnp.where(use, sign * conf, -jnp.inf)
    tied = use & (score == score.max())
    return jnp.argmax(jnp.where(tied, sign * ids, -jnp.inf))


def bank_insert(
    bank: dict[str, jax.Array],
    labels: jax.Array,
    confidences: jax.Array,
    images: jax.Array,
    keys: jax.Array,
    valid: jax.Array,
) -> dict[str, jax.Array]:
    """The bank after the batch's entries, one after another in batch order (the official
    `IPT.update`): a class with free slots takes the entry (even an image already held); a full
    class replaces its least confident entry when the new one is more confident and its image
    is not in the bank (any class). Entries with `valid` False are skipped (NaN keys there)."""
    size = bank["confidence"].shape[1]

    def insert(bank, entry):
        c, conf, image, key, ok = entry
        filled = bank["filled"][c]
        confs, ids = bank["confidence"][c], bank["image"][c]
        lowest = _lexicographic(confs, ids, jnp.arange(size) < filled, largest=False)
        held = jnp.any(bank["image"] == image)
        free = filled < size
        replace = ~free & (confs[lowest] < conf) & ~held
        slot = jnp.where(free, filled, lowest)
        write = ok & (free | replace)
        new = {
            "confidence": bank["confidence"].at[c, slot].set(conf),
            "image": bank["image"].at[c, slot].set(image),
            "key": bank["key"].at[c, slot].set(key),
            "filled": bank["filled"].at[c].add(free.astype(jnp.int32)),
        }
        return jax.tree.map(lambda n, o: jnp.where(write, n, o), new, bank), None

    entries = (labels, confidences.astype(jnp.float32), images, keys.astype(jnp.float32), valid)
    return jax.lax.scan(insert, bank, entries)[0]


def bank_prototypes(bank: dict[str, jax.Array]) -> jax.Array:
    """P [C, dim]: each class's most confident key (largest (confidence, image)), 0 for a class
    with no entry yet."""
    size = bank["confidence"].shape[1]

    def best(conf, ids, filled, keys):
        slot = _lexicographic(conf, ids, jnp.arange(size) < filled, largest=True)
        return jnp.where(filled > 0, keys[slot], 0.0)

    return jax.vmap(best)(bank["confidence"], bank["image"], bank["filled"], bank["key"])


# ---------------------------------------------------------------------------------------------
# Optimizer, per-example state, train step, epoch hook
# ---------------------------------------------------------------------------------------------
class ScobOptimizer:
    """The official five Adam groups (docs/scob_spml.md §3.8): `groups` steps the network's four
    (`GROUPS`), `label_estimator` is Phi's Adam (its state is `state["extra"]["phi_opt"]`), each
    at `config.optimizer.group_lr[name]` times StepLR's factor gamma^(epoch // step_epochs)."""

    def __init__(self, config: ml_collections.ConfigDict):
        opt = config.optimizer
        if opt.schedule not in ("step", "constant"):
            raise ConfigError(
                f"config.optimizer.schedule={opt.schedule!r}: Scob steps its learning rates by "
                "epoch ('step': x step_gamma every step_epochs) or keeps them ('constant')"
            )
        lrs = dict(opt.group_lr)
        if sorted(lrs) != sorted(GROUP_LRS):
            raise ConfigError(
                f"config.optimizer.group_lr: expected the keys {', '.join(GROUP_LRS)}; got "
                f"{', '.join(sorted(lrs))}"
            )
        self.group_lr = {k: float(v) for k, v in lrs.items()}
        self.step_epochs = int(opt.step_epochs) if opt.schedule == "step" else 0
        self.step_gamma = float(opt.step_gamma)
        self.groups = GroupAdam(GROUPS, b1=opt.b1, b2=opt.b2, eps=opt.eps)
        self.label_estimator = GroupAdam({}, b1=opt.b1, b2=opt.b2, eps=opt.eps).adam

    def init(self, params: nnx.State) -> dict:
        """The network groups' Adam states (Phi's is made by `init_extra`)."""
        return self.groups.init(params)

    def learning_rate(self, group: str, epoch: jax.Array) -> jax.Array:
        """`group`'s learning rate in `epoch` (counted from 0)."""
        if not self.step_epochs:
            return jnp.float32(self.group_lr[group])
        return self.group_lr[group] * self.step_gamma ** (epoch // self.step_epochs)


def make_optimizer(config, total_steps: int, params) -> ScobOptimizer:
    """Scob's five-group Adam with StepLR (no weight decay)."""
    del total_steps, params
    return ScobOptimizer(config)


def init_extra(config: ml_collections.ConfigDict, training) -> dict:
    """The observed single positives, Phi with Scob's initialisation and its Adam state, the
    correlation matrix of Phi, and an empty prototype bank.

    Raises:
      ConfigError: a training split without observed single positives.
    """
    if training.observed is None:
        raise ConfigError(
            "Scob trains on single positives: set config.data.observed ('scob', Scob's own "
            "draw, or 'cole')"
        )
    observed = jnp.asarray(training.observed, jnp.float32)
    phi = label_init(observed, jax.random.key(config.seed + 2))
    dim = 2 * int(config.model.dim)
    return {
        "observed": observed,
        "phi": phi,
        "phi_opt": ScobOptimizer(config).label_estimator.init(phi),
        "correlation": label_correlation(phi),
        "bank": empty_bank(training.num_classes, int(config.model.bank_size), dim),
        # Contrastive steps skipped so far (a blank CAM under nan_skip_batch, a loss that is
        # not finite and >= 0), logged as train/contrastive_skips.
        "contrastive_skips": jnp.zeros((), jnp.int32),
    }


def _momentum_update(params: nnx.State, momentum: float) -> nnx.State:
    """fm2 <- m fm2 + (1 - m) fm1 (a MoCo EMA, what the official `move_k` meant to do)."""
    moved = {
        slow: jax.tree.map(
            lambda s, f: momentum * s + (1.0 - momentum) * f, params[slow], params[fast]
        )
        for slow, fast in (("fm2_14", "fm1_14"), ("fm2_28", "fm1_28"))
    }
    return nnx.State(dict(params.raw_mapping) | moved)


def guidance(
    model: Scob, x32: jax.Array, x16: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scob's semantic guidance (docs/scob_spml.md §3.3) from eval-mode backbone maps: the
    Grad-CAM++ map of each image's target class probability at the stride-32 map, image-sized
    [B, S, S], and the salient patches of the stride-32 and stride-16 grids [B, S/32, S/32],
    [B, S/16, S/16] (corners off, >= the model's `cam_threshold`). One gradient for the batch:
    in eval mode its images are independent."""
    rows = jnp.arange(x32.shape[0])

    def target_probability(x32):
        logits = model.classifier(model.online(x32, x16)).astype(jnp.float32)
        return jax.nn.sigmoid(logits)[rows, targets].sum()

    grads = jax.grad(target_probability)(x32)
    full = cam.guidance_cam(cam.gradcam_plus_plus(x32, grads), model.image_size)
    grid32, grid16 = model.image_size // 32, model.image_size // 16
    return (
        full,
        cam.patch_masks(full, grid32, model.cam_threshold),
        cam.patch_masks(full, grid16, model.cam_threshold),
    )


def key_masks(
    salient32: jax.Array, salient16: jax.Array, nan_skip_batch: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(the key masks of both grids, `blank` [B]: images without a salient patch at a scale).

    Under `nan_skip_batch` the masks are kept as they are (torch's attention over no key is NaN
    there, which `contrastive_runs` and the bank act on); otherwise every key of such a scale
    is unmasked."""
    any32, any16 = salient32.any(axis=(1, 2)), salient16.any(axis=(1, 2))
    blank = ~any32 | ~any16
    if not nan_skip_batch:
        salient32 = salient32 | ~any32[:, None, None]
        salient16 = salient16 | ~any16[:, None, None]
    return salient32, salient16, blank


def contrastive_runs(loss: jax.Array, blank: jax.Array, nan_skip_batch: bool) -> jax.Array:
    """Whether the contrastive update is applied: the official loss check (finite and >= 0)
    and, under `nan_skip_batch`, no blank image in the batch (its NaN keys make torch's loss
    NaN; this also covers the official batch-wide "any salient patch" guard)."""
    ok = jnp.isfinite(loss) & (loss >= 0)
    return ok & ~blank.any() if nan_skip_batch else ok


def make_train_step(ctx):
    """Scob's iteration (module docstring): two Adam steps, the CAM masks between them, the
    bank after them.

    One page on purpose: the step is the official training loop's iteration in its order, four
    phases that share a dozen intermediates (both feature maps, the masks, the keys), so that it
    reads beside the official code line by line; split, they would travel between functions.
    """
    config = ctx.config
    tx: ScobOptimizer = ctx.tx
    settings = config.model
    drifting, nan_skip = settings.drifting_backbone_bn, settings.nan_skip_batch
    cfg = config.loss
    dropout_base = jax.random.key(config.seed + 1)
    mean, std = tuple(config.data.mean), tuple(config.data.std)

    def merged(params, rest):
        return nnx.merge(ctx.graphdef, params, jax.tree.map(lambda x: x, rest))

    def train_step(state, batch):
        """(state, batch) -> (state, metrics): one iteration, one page on purpose (above)."""
        params, rest, opt, extra = state["params"], state["rest"], state["opt"], state["extra"]
        step, index, images = state["step"], batch["index"], batch["image"]
        num_train = extra["phi"].shape[0]
        epoch = step * config.batch_size // num_train
        # The epoch's first iteration classifies with the backbone's batch norm on its running
        # statistics, the mode the previous phase left it in (module docstring).
        first = epoch > (step - 1) * config.batch_size // num_train
        k_cls, k_key, k_query, k_aug = jax.random.split(jax.random.fold_in(dropout_base, step), 4)
        observed = extra["observed"][index]
        targets = jnp.argmax(observed, axis=1)
        rows = jnp.arange(images.shape[0])
        if not settings.faithful_momentum_bug:
            params = _momentum_update(params, settings.momentum)

        # 1. Classification and label estimation, without masks.
        model = merged(params, rest)
        if drifting:
            (x32, x16), (x32_eval, x16_eval) = model.drifting_features(images, first)
        else:
            x32, x16 = x32_eval, x16_eval = model.features(images)
        rest = nnx.state(model, nnx.Not(nnx.Param))
        parts, others = tx.groups.split(params)

        def classification(trainable, label_logits):
            m = merged(nnx.merge_state(*(parts | trainable).values(), others), rest)
            h = m.online(x32, x16, train=True, rngs=nnx.Rngs(dropout=k_cls))
            out = {"logits": m.classifier(h).astype(jnp.float32)}
            inputs = dict(batch, observed=observed, label_logits=label_logits)
            loss, _ = ctx.mod.loss_fn(out, inputs, config)
            return loss, jax.nn.sigmoid(out["logits"])

        (loss_cls, probs), (grads, row_grads) = jax.value_and_grad(
            classification, argnums=(0, 1), has_aux=True
        )({g: parts[g] for g in CLASSIFICATION_GROUPS}, extra["phi"][index])
        confidence = probs[rows, targets]
        for g in CLASSIFICATION_GROUPS:
            params, opt = tx.groups.update(g, grads[g], opt, params, tx.learning_rate(g, epoch))
        # Phi's gradient is dense, as torch's: rows outside the batch get 0 and Adam moves them.
        phi_grad = jnp.zeros_like(extra["phi"]).at[index].add(row_grads)
        phi_step, phi_opt = tx.label_estimator.update(phi_grad, extra["phi_opt"])
        phi = extra["phi"] - tx.learning_rate("label_estimator", epoch) * phi_step

        # 2. Semantic guidance: Grad-CAM++ of p[b, y_b] with the updated network, eval mode.
        model = merged(params, rest)
        _, salient32, salient16 = guidance(model, x32_eval, x16_eval, targets)
        salient32, salient16, blank = key_masks(salient32, salient16, nan_skip)

        # 3. Contrastive step: keys on the clean view, queries on the strong augmentation.
        if drifting:  # the key pass's own backbone forward, which moves the statistics again
            k32, k16 = model.features(images, train=True)
            rest = nnx.state(model, nnx.Not(nnx.Param))
        else:
            k32, k16 = x32, x16
        keys = model.momentum_features(
            k32, k16, salient32, salient16, train=True, rngs=nnx.Rngs(dropout=k_key)
        )
        augmented = device_augment.strong_augment(
            images, k_aug, mean, std, UNDO_STD, photometric=settings.strong_augment
        )
        xa32, xa16 = model.features(augmented, train=drifting)
        rest = nnx.state(model, nnx.Not(nnx.Param))
        prototypes = bank_prototypes(extra["bank"])
        weights = negative_weights(extra["correlation"], targets, cfg.hard_correlation)
        exclude = jax.nn.one_hot(targets, weights.shape[1], dtype=bool)
        parts, others = tx.groups.split(params)

        def contrastive(trainable):
            m = merged(nnx.merge_state(*(parts | trainable).values(), others), rest)
            h = m.online(
                xa32, xa16, salient32, salient16, train=True, rngs=nnx.Rngs(dropout=k_query)
            )
            return cfg.cl_weight * losses.prototype_infonce(
                m.projector(h),
                keys,
                prototypes,
                weights,
                temperature=cfg.cl_temperature,
                exclude=exclude if cfg.exclude_own_prototype else None,
            )

        loss_cl, grads = jax.value_and_grad(contrastive)({g: parts[g] for g in CONTRASTIVE_GROUPS})
        run = contrastive_runs(loss_cl, blank, nan_skip)
        stepped, stepped_opt = params, opt
        for g in CONTRASTIVE_GROUPS:
            lr = tx.learning_rate(g, epoch)
            stepped, stepped_opt = tx.groups.update(g, grads[g], stepped_opt, stepped, lr)
        params, opt = jax.tree.map(
            lambda new, old: jnp.where(run, new, old), (stepped, stepped_opt), (params, opt)
        )

        # 4. The bank takes this batch's keys (NaN keys, i.e. blank samples, stay out).
        valid = ~blank if nan_skip else jnp.ones_like(blank)
        bank = bank_insert(extra["bank"], targets, confidence, index, keys, valid)
        skips = extra["contrastive_skips"] + (~run).astype(jnp.int32)
        extra = dict(extra, phi=phi, phi_opt=phi_opt, bank=bank, contrastive_skips=skips)
        new = ctx.finish(state, params, rest, opt, extra=extra)
        contrastive_loss = jnp.where(run, loss_cl, 0.0)
        return new, {
            "loss": loss_cls + contrastive_loss,
            "lr": tx.learning_rate("linear", epoch),
            "classification": loss_cls,
            "contrastive": contrastive_loss,
            "contrastive_skips": skips.astype(jnp.float32),
            "salient_fraction": 0.5 * (salient32.mean() + salient16.mean()),
        }

    return train_step


def epoch_end(ctx, state: dict, epoch: int) -> dict:
    """A new epoch starts with an empty prototype bank and the correlation of the current
    Phi (the official `before_epoch`)."""
    del epoch
    extra = state["extra"]
    bank = extra["bank"]
    fresh = empty_bank(bank["key"].shape[0], bank["key"].shape[1], bank["key"].shape[2])
    update = {"bank": fresh, "correlation": label_correlation(extra["phi"])}
    sharding = extra["phi"].sharding
    return dict(state, extra=dict(extra) | jax.device_put(update, sharding))
