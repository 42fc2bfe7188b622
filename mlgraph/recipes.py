"""The recipes the configs in `configs/` are made of: a data set's fields (from
`mlgraph.data.registry`), a method's `config.model` and `config.loss`, the demo settings, and the
papers' training recipes.

Configs import this module; models never do (the method protocol in `mlgraph.models`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from mlgraph import config_lib, models
from mlgraph.data import registry
from mlgraph.errors import ConfigError
from mlgraph.models import sigrl as sigrl_model


def set_data(c: ml_collections.ConfigDict, dataset: str, builder_config: str | None = None) -> None:
    """Point `c.data` at `dataset` (a row of `mlgraph.data.registry`) and its splits;
    `builder_config` overrides its default (e.g. COCO's 'all' for the recipes that keep
    unlabelled images).

    Raises:
      ConfigError: an unknown data set (the known ones listed).
    """
    row = registry.get(dataset)
    c.data.name = row.name
    c.data.builder_config = row.builder_config if builder_config is None else builder_config
    c.data.train_split = row.train_split
    c.data.eval_split = row.eval_split


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """`config.model` of method `name`: every field of its `Model` with its default, and
    `overrides` applied (`models.model_config`).

    Raises:
      ConfigError: for a field the method does not have (the valid ones are listed).
    """
    return models.model_config(name, **overrides)


def loss_config(method: str, /, **overrides: Any) -> ml_collections.ConfigDict:
    """`config.loss` of method `method`: every field of its `Loss` with its default, and
    `overrides` applied (`models.loss_config`), e.g. `loss_config("salgl", gamma_neg=4.0)` or
    `loss_config("spml", name="role", expected_num_pos=2.9)`.

    Raises:
      ConfigError: for a field the method's loss does not have (the valid ones are listed).
    """
    return models.loss_config(method, **overrides)


def demo_config(runlocal: bool = False) -> ml_collections.ConfigDict:
    """What the methods' demo configs share: the embedded demo set at 128 px, 3 epochs of
    batch 32, the offline ImageNet MobileNetV2 frozen (`init_from`, `optimizer.frozen`), EMA
    0.99; `runlocal` shortens it to a 4-step smoke run. Each config adds its head, loss and
    optimizer settings."""
    c = config_lib.base_config()
    set_data(c, "demo")
    c.image_size = 128
    c.batch_size = 32
    c.eval_batch_size = 100
    c.num_epochs = 3.0
    c.eval_every_steps = 100
    c.log_every_steps = 25
    c.init_from = "offline:mobilenet_v2"
    c.optimizer.frozen = ("backbone/.*",)
    c.ema.decay = 0.99
    if runlocal:
        shorten(c)
    return c


def shorten(c: ml_collections.ConfigDict) -> None:
    """`runlocal`: a 4-step smoke run that evaluates and checkpoints at its end."""
    c.total_steps = 4
    c.eval_every_steps = 4
    c.log_every_steps = 2


def apply_mode(c: ml_collections.ConfigDict, mode: str) -> None:
    """SALGL's `--mode`: 'full' trains everything; 'part' gives the backbone 0.1x the learning
    rate; 'layer4' trains only ResNet layer4 and the head."""
    if mode == "full":
        return
    if mode == "part":
        c.optimizer.lr_mults = (("backbone/.*", 0.1),)
    elif mode == "layer4":
        c.optimizer.frozen = ("backbone/(?!layer4/).*",)
    else:
        raise ValueError(f"mode '{mode}': expected full, part or layer4")


def _paper_base(dataset: str, builder_config: str | None, image_size: int):
    c = config_lib.base_config()
    set_data(c, dataset, builder_config)
    c.data.worker_count = 8
    c.image_size = image_size
    return c


def _asl_one_cycle(dataset: str, builder_config: str | None, image_size: int):
    """What the SALGL and Query2Label recipes share (both follow ASL's training code): batch
    128 for 80 epochs, AdamW (wd 1e-2) one-cycle to 1e-4, EMA 0.9997, Cutout 0.5 + RandAugment,
    bfloat16 compute; each recipe sets its method's loss (ASL in both)."""
    c = _paper_base(dataset, builder_config, image_size)
    c.data.augment = "salgl"
    c.batch_size = 128
    c.eval_batch_size = 128
    c.num_epochs = 80.0
    c.eval_every_steps = 1000
    c.log_every_steps = 50
    c.dtype = "bfloat16"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 1e-2
    c.ema.decay = 0.9997
    return c


def salgl(
    *, dataset: str, image_size: int, backbone: str, num_scenes: int, mode: str = "full"
) -> ml_collections.ConfigDict:
    """The recipe that reproduced SALGL's COCO numbers (docs/salgl.md §3): AdamW 1e-4, wd 1e-2,
    one-cycle (pct 0.2, beta1 cycled) over 80 epochs of batch 128, EMA 0.9997 selecting the best
    checkpoint, ASL (gamma- 2), resize + flip + Cutout 0.5 + RandAugment, hard scenes, outmess,
    normalize. Label embeddings default to the offline MiniLM ('minilm'); the paper's BERT
    vectors are a file: --config.model.embed_path=bert.npy."""
    c = _asl_one_cycle(dataset, None, image_size)
    c.loss = loss_config("salgl", name="asl")
    c.model = model_config(
        "salgl", backbone=backbone, num_scenes=num_scenes, embed_type="file", embed_path="minilm"
    )
    apply_mode(c, mode)
    return c


def ssgrl(*, dataset: str, builder_config: str | None = None) -> ml_collections.ConfigDict:
    """The official SSGRL recipe (docs/ssgrl_mlgcn.md §1.7): ResNet-101 at 576 px (resize 640,
    random side crop from {640, 576, 512, 384, 320}, no flip; test: centre crop from 640), Adam
    1e-5 at a constant rate on layer4 and the head, batch 4, 200 epochs, BCE, no EMA."""
    c = _paper_base(dataset, builder_config, 576)
    c.data.augment = "ssgrl"
    c.data.eval_center_crop_from = 640
    c.batch_size = 4
    c.eval_batch_size = 16
    c.num_epochs = 200.0
    c.eval_every_steps = 20000
    # Evaluations are 20,000 steps apart; a preemption must not lose that much.
    c.checkpoint_every_steps = 2000
    c.log_every_steps = 100
    c.optimizer.name = "adam"
    c.optimizer.schedule = "constant"
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.0
    c.optimizer.frozen = ("backbone/(conv1|bn1|layer1|layer2|layer3)/.*",)
    c.ema.decay = 0.0  # no EMA in the official code (ema_mAP then equals mAP)
    c.loss = loss_config("ssgrl", name="bce")
    c.model = model_config(
        "ssgrl",
        backbone="resnet101",
        embed_path="minilm",
        graph_path="train_labels",
        bn_train="layer4",
    )
    return c


def mlgcn(*, dataset: str) -> ml_collections.ConfigDict:
    """ML-GCN's official recipe (docs/ssgrl_mlgcn.md §3.1): ResNet-101 at 448 px, the GCN over
    gen_A of the training labels, BCE; train images through MultiScaleCrop (scales 1 to 0.5 of
    the shorter side, max_distort 2) and flip; SGD (momentum 0.9, L2 1e-4 on every parameter,
    batch norms included) at lr 0.1 for the GCN and 0.01 (lrp 0.1) for the backbone, gradients
    clipped to norm 10, batch 32, 20 epochs; the rate x0.1 at the start of each epoch in
    `milestones` (the official --epoch_step [30], after the 20th epoch: a longer run
    (--config.num_epochs) steps where the official code would).

    Pooling: pool='global', a true global max. It is the paper's global max pooling, the choice
    of docs/ssgrl_mlgcn.md §3.1 and §7 for a reimplementation, and at this recipe's 448 px (a
    14x14 layer4 map) exactly the released code's MaxPool2d(14, 14); 'official' only differs at
    other sizes, where that fixed window covers the top-left 14x14 alone, and is what converted
    official checkpoints record (`mlgraph.convert.mlgcn`)."""
    c = _paper_base(dataset, None, 448)
    c.data.augment = "mlgcn"
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 20.0
    c.eval_every_steps = 2000
    c.log_every_steps = 50
    c.dtype = "bfloat16"
    c.optimizer.name = "sgd"
    c.optimizer.schedule = "multistep"
    c.optimizer.milestones = (30,)
    c.optimizer.step_gamma = 0.1
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.clip_grad_norm = 10.0
    c.optimizer.lr_mults = (("backbone/.*", 0.1),)
    c.ema.decay = 0.0
    c.loss = loss_config("mlgcn", name="bce")
    c.model = model_config(
        "mlgcn",
        backbone="resnet101",
        embed_path="minilm",
        graph_path="train_labels",
        pool="global",
    )
    return c


# Backbone parameters the official Query2Label recipe never trains: the stem and layer1 (its
# `requires_grad_(False)` on names without layer2/3/4), and every batch-norm affine (they are
# buffers in FrozenBatchNorm2d).
Q2L_FROZEN_BACKBONE = (
    "backbone/(conv1|bn1|layer1)/.*",
    "backbone/.*/(bn[0-9]+|downsample_bn)/.*",
)


def q2l(
    *, dataset: str, image_size: int, builder_config: str | None = None
) -> ml_collections.ConfigDict:
    """The official Query2Label R101 recipe (docs/ssgrl_mlgcn.md §4.1): AdamW (wd 1e-2) under
    one-cycle to 1e-4 (pct 0.2, beta1 cycled 0.85-0.95), batch 128, 80 epochs, EMA 0.9997 (the
    best of model and EMA is kept), resize + Cutout 0.5 + RandAugment (no flip), ASL gamma- 2;
    conv1 and layer1 and every batch norm frozen."""
    c = _asl_one_cycle(dataset, builder_config, image_size)
    c.data.augment = "q2l"
    c.optimizer.frozen = Q2L_FROZEN_BACKBONE
    c.loss = loss_config("q2l", name="asl")
    c.model = model_config("q2l", backbone="resnet101")
    return c


# Zhou et al.'s hyper-parameters (docs/scob_spml.md §1.7) and the expected positives per image K
# (§1.2), by data set.
SPML_SETTINGS: dict[str, dict[str, Any]] = {
    "voc2012": dict(batch_size=8, lr=1e-5, alpha=0.2, beta=0.02, warmup_epochs=5, k=1.5),
    "coco2014": dict(batch_size=16, lr=1e-5, alpha=0.1, beta=0.9, warmup_epochs=5, k=2.9),
    "nuswide": dict(batch_size=16, lr=1e-5, alpha=0.1, beta=0.2, warmup_epochs=4, k=1.9),
    # Zhou's main.py `elif P['dataset'] == 'cub'`; K = 31.4 from Cole's train.py lookup.
    "cub": dict(batch_size=8, lr=1e-4, alpha=0.01, beta=0.4, warmup_epochs=3, k=31.4),
}


def spml(
    *, dataset: str, loss: str, observed: str = "cole", mode: str = "end_to_end"
) -> ml_collections.ConfigDict:
    """The single-positive protocol of Cole et al. (docs/scob_spml.md §1.3-§1.6) with Zhou et al.'s
    hyper-parameters (§1.7): ResNet-50 (ImageNet) + global average pooling + a linear layer at
    448 px, resize + flip only; Adam without weight decay or schedule, 10 epochs end to end; one
    observed positive per training image (`observed`: 'cole', seed 1200), 20 % of the training
    split held out with clean labels to pick the epoch (`val/spml_mAP`, evaluated every epoch),
    the official evaluation split as the test set. EM and EM+APL stop early at the first epoch
    whose validation mAP does not improve, as Zhou's code.

    `mode='linear'` is the first phase of Cole's linear-init protocol: 25 epochs training only
    the linear layer (and ROLE's label estimator) on the frozen backbone, with Cole's fixed
    settings (ROLE: lr 1e-3, batch 16, 8 on CUB; the others: lr 1e-4, batch 8, 16 on
    NUS-WIDE); its workdir is then the `init_from` of the end-to-end phase, which starts from its
    linear layer and, for ROLE, its estimated labels."""
    if mode not in ("end_to_end", "linear"):
        raise ConfigError(f"mode {mode!r}: expected end_to_end or linear")
    if dataset not in SPML_SETTINGS:
        raise ConfigError(
            f"data set {dataset!r}: the SPML recipe knows {', '.join(sorted(SPML_SETTINGS))}"
        )
    s = SPML_SETTINGS[dataset]
    c = _paper_base(dataset, None, 448)
    c.batch_size = s["batch_size"]
    c.eval_batch_size = 64
    c.num_epochs = 10.0
    c.eval_every_epochs = 1.0
    c.log_every_steps = 100
    c.optimizer.name = "adam"
    c.optimizer.schedule = "constant"
    c.optimizer.lr = s["lr"]
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.0  # none in the papers' code (the ema_ metrics then equal the model's)
    c.data.observed = observed
    c.data.val_fraction = 0.2
    c.best_metric = "val/spml_mAP"
    c.early_stop = loss in ("em", "em_apl")
    c.loss = loss_config(
        "spml",
        name=loss,
        expected_num_pos=s["k"],
        alpha=s["alpha"],
        beta=s["beta"],
        warmup_epochs=s["warmup_epochs"],
    )
    c.model = model_config("spml", backbone="resnet50")
    if mode == "linear":
        c.num_epochs = 25.0
        c.early_stop = False
        c.optimizer.frozen = ("backbone/.*",)
        c.model.frozen_bn = True  # fixed features, as a linear probe
        c.optimizer.lr = 1e-3 if loss == "role" else 1e-4
        if loss == "role":
            c.batch_size = 8 if dataset == "cub" else 16
        else:
            c.batch_size = 16 if dataset == "nuswide" else 8
    return c


# Scob's expected positives per image K (its own code: 1.5 on VOC, 3.9 on COCO, docs/scob_spml.md
# §3.4), and the official settings of its five Adam groups (those of its contrastive objective
# are the defaults of `mlgraph.models.scob.Loss`).
SCOB_K: dict[str, float] = {"voc2012": 1.5, "voc2007": 1.5, "coco2014": 3.9}
# Cole's K: docs/scob_spml.md §1.2.
COLE_K: dict[str, float] = {"voc2012": 1.5, "voc2007": 1.5, "coco2014": 2.9}
SCOB_GROUP_LR = dict(
    linear=1e-3, transformer=4e-5, projector=1e-2, classifier=1e-3, label_estimator=1e-2
)
SCOB_PROTOCOLS = ("scob", "cole")


def scob_optimizer(c: ml_collections.ConfigDict) -> None:
    """Scob's optimizer in `c.optimizer`: torch Adam (no weight decay) over five groups with
    their own learning rates (`group_lr`: the official lr_linear, lr_tf, lr_pj, lr_linear,
    lr_es) and StepLR x0.1 every 16 epochs; the backbone and the momentum branch are never
    optimized (`frozen` says so to the parameter count)."""
    c.optimizer.name = "adam"
    c.optimizer.weight_decay = 0.0
    c.optimizer.lr = SCOB_GROUP_LR["linear"]
    c.optimizer.schedule = "step"
    c.optimizer.step_epochs = 16
    c.optimizer.step_gamma = 0.1
    c.optimizer.group_lr = ml_collections.ConfigDict(SCOB_GROUP_LR)
    c.optimizer.frozen = ("backbone/.*", "fm2_(14|28)/.*")


def scob_protocol(c: ml_collections.ConfigDict, protocol: str) -> None:
    """The single-positive protocol of a Scob config: 'scob' (the official code's: Scob's draw,
    seed 114514, no held-out split, the epoch picked on the evaluation split itself) or 'cole'
    (Cole's draw, seed 1200, 20 % of the training split held out with clean labels to pick the
    epoch, as `spml`)."""
    if protocol not in SCOB_PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r}: expected one of {', '.join(SCOB_PROTOCOLS)}")
    c.data.observed = protocol
    c.data.val_fraction = 0.2 if protocol == "cole" else 0.0
    c.best_metric = "val/spml_mAP" if protocol == "cole" else "eval/spml_mAP"


def scob(*, dataset: str, protocol: str = "scob") -> ml_collections.ConfigDict:
    """The official Scob recipe (docs/scob_spml.md §3.8): frozen ImageNet ResNet-50 at 448 px
    (resize + flip), batch 8, 20 epochs, the five-group Adam (`scob_optimizer`), lambda_cl 0.1,
    tau 1, 2 bank entries per class, an evaluation each epoch, no EMA; the official code's
    behaviour in every flag. `protocol`: see `scob_protocol`; under Scob's, VOC 2007 trains on
    `train` and evaluates on `val`, as its code does (not trainval/test)."""
    if dataset not in SCOB_K:
        raise ConfigError(f"data set {dataset!r}: the Scob recipe knows {', '.join(SCOB_K)}")
    c = _paper_base(dataset, None, 448)
    if protocol == "scob" and dataset == "voc2007":
        c.data.train_split, c.data.eval_split = "train", "val"
    scob_protocol(c, protocol)
    c.batch_size = 8
    c.eval_batch_size = 64
    c.num_epochs = 20.0
    c.eval_every_epochs = 1.0
    c.log_every_steps = 100
    c.ema.decay = 0.0  # none in the official code (ema_ metrics equal the model's)
    scob_optimizer(c)
    k = SCOB_K[dataset] if protocol == "scob" else COLE_K[dataset]
    c.loss = loss_config("scob", name="scob", expected_num_pos=k)
    c.model = model_config("scob", backbone="resnet50")
    return c


# SigRL's OV recipe (docs/sigrl.md §3.3-§3.5) and its SPML mode (§4.4).
SIGRL_FIX_LAYER = 10


def sigrl_ov(*, dataset: str = "nuswide_ov") -> ml_collections.ConfigDict:
    """SigRL's open-vocabulary training on NUS-WIDE (925 seen tags, 81 unseen concepts):
    CLIP ViT-B/16 at 224 px (`config.init_from` = the converted OpenAI tower; the label
    embeddings `config.model.embed_path` = CLIP text features of "There is a {} in the scene"),
    AdamW lr 1e-4 (min 1e-7), 2 warm-up epochs of 20 then a half cosine per step, weight decay
    0.05 on matrices, layer-wise decay 0.65, blocks 0-9 and the patch embedding frozen, batch
    32, ranking loss + L1 distillation to the frozen teacher; RandomResizedCrop (0.08-1) +
    flip + timm RandAugment rand-m9-mstd0.5-inc1, bicubic; test: shorter side 256 + centre
    crop 224, bicubic; ImageNet mean/std (SigRL's, not CLIP's). No EMA, no validation split:
    the test set is evaluated every epoch, as the official code does (`eval/zsl_mAP` picks the
    kept checkpoint)."""
    c = _paper_base(dataset, None, 224)
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 20.0
    c.eval_every_epochs = 1.0
    c.log_every_steps = 100
    c.data.augment = "timm"
    c.data.eval_center_crop_from = 256
    c.data.eval_resize = "shorter"
    c.data.eval_interpolation = "bicubic"
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-4
    c.optimizer.min_lr = 1e-7
    c.optimizer.weight_decay = 0.05
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_fraction = 2.0 / 20.0
    c.optimizer.layer_decay = 0.65
    c.optimizer.frozen = sigrl_model.frozen_patterns(SIGRL_FIX_LAYER)
    c.ema.decay = 0.0
    c.best_metric = "eval/zsl_mAP"
    c.loss = loss_config("sigrl", name="sigrl", rank_weight=1.0, distill_weight=1.0)
    c.model = model_config(
        "sigrl", backbone="clip_vit_b16", distill=True, teacher_from_block=SIGRL_FIX_LAYER
    )
    return c


SIGRL_SPML_ALPHA = {"voc2012": 0.2, "coco2014": 0.1}


def sigrl_spml(*, dataset: str) -> ml_collections.ConfigDict:
    """SigRL's SPML mode (docs/sigrl.md §4): the same model fully fine-tuned (nothing frozen, no
    layer decay, no weight decay, no teacher), logits = the fused score, EM loss (alpha 0.2 VOC /
    0.1 COCO) on Cole's single positives, Adam lr 1e-5 constant, 10 epochs of batch 1, 224 px,
    20 % of the training split held out with clean labels to pick the epoch."""
    if dataset not in SIGRL_SPML_ALPHA:
        raise ConfigError(
            f"data set {dataset!r}: SigRL's SPML recipe knows {', '.join(SIGRL_SPML_ALPHA)}"
        )
    c = spml(dataset=dataset, loss="em")
    c.image_size = 224
    c.batch_size = 1
    c.early_stop = False  # SigRL trains its 10 epochs and keeps the best by val mAP
    c.loss = loss_config("sigrl", name="em", alpha=SIGRL_SPML_ALPHA[dataset])
    c.model = model_config("sigrl", backbone="clip_vit_b16", distill=False)
    return c
