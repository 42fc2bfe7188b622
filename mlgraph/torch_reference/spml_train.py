"""The single-positive baselines' released training loops in plain PyTorch, in the official order
of operations (docs/scob_spml.md §1.6, §1.7, §2): Cole et al.'s `train.py`
(elijahcole/single-positive-multi-label) for AN and ROLE, and Zhou et al.'s `main.py`
(Correr-Zhou/SPML-AckTheUnknown) for EM and EM+APL. Written from the official code, not from
mlgraph's JAX step, so that a parity test of the two checks mlgraph's training against the
official recipes.

The model is Cole's `MultilabelModel`: `f` = `ImageClassifier` (a torchvision ResNet without
its `fc`, i.e. `Sequential(conv1, bn1, relu, maxpool, layer1..4, avgpool)`, then
`linear_classifier`; its modules named as torchvision's instead of the Sequential's indices)
and, in Cole's code, `g` = `LabelEstimator` (ROLE's logits Phi [N_train, C]).

One iteration (`run_train_phase`): `model.train()` (per phase), `zero_grad`, logits = f(x),
preds = sigmoid, (Cole) the estimates g(idx), the loss matrix over (image, class) divided by
B*C plus the regulariser (`compute_batch_loss`), backward, Adam step. Cole's Adam has two
groups, f at lr and g at `lr_mult` x lr (g has no gradient except under ROLE, and torch skips
it); Zhou's has f only. After the training phase of every epoch e >= `warmup_epoch` (epochs
counted from 1), EM+APL's `aysmmetric_pseudo_labeling` (sic) scores the training split in eval
mode and makes, per class, the int(neg_proportion * U_c / (E - warmup_epoch)) lowest-scored
still-unknown entries pseudo-negatives -p (U_c: the unknowns at the start).

Not transcribed (no effect on the trained state): the validation and test phases (eval mode,
no gradient), logging, best-epoch bookkeeping and early stopping. The pseudo-labelling pass
runs over the training images in index order (Zhou's loader reshuffles them, which changes
nothing but the order of ties), and it needs at least two batches: Zhou's pass labels only
when it reaches the last batch from the second on.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from mlgraph.torch_reference import require_torch
from mlgraph.torch_reference.layers import TorchResNetTrunk, resnet_stages

torch = require_torch()
nn = torch.nn

LOG_EPSILON = 1e-5
COLE_LOSSES = ("an", "role")  # trained by Cole's train.py
ZHOU_LOSSES = ("em", "em_apl")  # trained by Zhou's main.py


class TorchImageClassifier(nn.Module):
    """Cole's `ImageClassifier` (arch 'resnet50'): `feature_extractor` (the ResNet without
    `fc`, pooled) and `linear_classifier`."""

    def __init__(self, layers, width: int, num_classes: int):
        super().__init__()
        trunk = TorchResNetTrunk(layers, width)
        parts = [("conv1", trunk.conv1), ("bn1", trunk.bn1), ("relu", nn.ReLU(inplace=True))]
        parts.append(("maxpool", nn.MaxPool2d(3, 2, 1)))
        parts += [(f"layer{i}", getattr(trunk, f"layer{i}")) for i in range(1, 5)]
        parts.append(("avgpool", nn.AdaptiveAvgPool2d(1)))
        self.feature_extractor = nn.Sequential(collections.OrderedDict(parts))
        self.linear_classifier = nn.Linear(trunk.num_features, num_classes)

    def forward(self, x):
        return self.linear_classifier(torch.squeeze(self.feature_extractor(x)))


class TorchLabelEstimator(nn.Module):
    """Cole's `LabelEstimator`: `logits` Phi [N, C]; `forward(idx)` = sigmoid(Phi[idx])."""

    def __init__(self, num_examples: int, num_classes: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_examples, num_classes))

    def forward(self, indices):
        return torch.sigmoid(self.logits[indices, :])


class TorchMultilabelModel(nn.Module):
    """Cole's `MultilabelModel`: `f` and `g`."""

    def __init__(self, layers, width: int, num_classes: int, num_examples: int):
        super().__init__()
        self.f = TorchImageClassifier(layers, width, num_classes)
        self.g = TorchLabelEstimator(num_examples, num_classes)

    def forward(self, images):
        """Pre-sigmoid logits [B, C] of `f`."""
        return self.f(images)


def from_config(model_cfg, num_classes: int, num_examples: int) -> TorchMultilabelModel:
    """The torch model of an mlgraph `spml` `config.model` (a ResNet backbone), randomly
    initialised as torch does.

    Raises:
      ValueError: a backbone other than a torchvision ResNet, or `frozen_bn` (the papers'
        end-to-end runs train the batch norms).
    """
    if model_cfg.get("frozen_bn"):
        raise ValueError("config.model.frozen_bn=True: the torch SPML model trains end to end")
    layers, width = resnet_stages(model_cfg, "SPML classifier")
    return TorchMultilabelModel(layers, width, num_classes, num_examples)


# ---------------------------------------------------------------------------------------------
# losses.py (Cole's and Zhou's)
# ---------------------------------------------------------------------------------------------
def neg_log(x):
    """-log(x + 1e-5)."""
    return -torch.log(x + LOG_EPSILON)


def expected_positive_regularizer(preds, expected_num_pos: float):
    """(sum_c p summed per image, batch-averaged, minus K)^2 (norm '2')."""
    return (preds.sum(1).mean(0) - expected_num_pos) ** 2


def loss_matrix(name: str, preds, observed, estimated, settings: SpmlSettings):
    """(the loss matrix [B, C], the regulariser or None) of loss `name` ('an', 'role', 'em',
    'em_apl'), as `loss_an`, `loss_role` (Cole) and `loss_EM`, `loss_EM_APL` (Zhou).

    Raises:
      ValueError: an observed matrix with values the loss does not accept, or another loss.
    """
    num_classes = preds.shape[1]
    if name != "em_apl" and float(observed.min()) < 0:
        raise ValueError(f"loss {name!r}: observed labels must be >= 0")
    pos, unk = observed == 1, observed == 0
    mtx = torch.zeros_like(preds)
    if name == "an":
        mtx[pos] = neg_log(preds[pos])
        mtx[unk] = neg_log(1.0 - preds[unk])
        return mtx, None
    if name == "role":
        est_d, preds_d = estimated.detach(), preds.detach()
        pos_1 = torch.zeros_like(preds)
        pos_1[pos] = neg_log(preds[pos])
        cross_1 = est_d * neg_log(preds) + (1.0 - est_d) * neg_log(1.0 - preds)
        reg_1 = expected_positive_regularizer(preds, settings.expected_num_pos) / num_classes**2
        pos_2 = torch.zeros_like(preds)
        pos_2[pos] = neg_log(estimated[pos])
        cross_2 = preds_d * neg_log(estimated) + (1.0 - preds_d) * neg_log(1.0 - estimated)
        reg_2 = expected_positive_regularizer(estimated, settings.expected_num_pos) / num_classes**2
        mtx = 0.5 * (pos_1 + pos_2) + 0.5 * (cross_1 + cross_2)
        return mtx, 0.5 * (reg_1 + reg_2)
    if name in ("em", "em_apl"):
        mtx[pos] = neg_log(preds[pos])
        p = preds[unk]
        mtx[unk] = -settings.alpha * (p * neg_log(p) + (1 - p) * neg_log(1 - p))
        if name == "em_apl":
            neg = observed < 0
            soft = -observed[neg]
            p = preds[neg]
            mtx[neg] = settings.beta * (soft * neg_log(p) + (1 - soft) * neg_log(1 - p))
        return mtx, None
    raise ValueError(f"loss {name!r}: the torch SPML loops train an, role, em, em_apl")


def batch_loss(name: str, preds, observed, estimated, settings: SpmlSettings):
    """`compute_batch_loss`: sum(M / (B C)) plus the regulariser."""
    mtx, reg = loss_matrix(name, preds, observed, estimated, settings)
    main = (mtx / (preds.shape[0] * preds.shape[1])).sum()
    return main if reg is None else main + reg


# ---------------------------------------------------------------------------------------------
# The loops
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SpmlSettings:
    """The hyper-parameters of the two codes (docs/scob_spml.md §1.6, §1.7).

    Attributes:
      loss: 'an' or 'role' (Cole's loop), 'em' or 'em_apl' (Zhou's).
      lr: Adam's learning rate of f; lr_mult: g's multiple of it (Cole: 10).
      expected_num_pos: K of ROLE's regularisers.
      alpha, beta: EM's entropy weight and APL's pseudo-negative weight.
      num_epochs, warmup_epoch, neg_proportion: APL's schedule (E, its first pass, the share
        of each class's unknowns made negative overall).
    """

    loss: str
    lr: float
    lr_mult: float = 10.0
    expected_num_pos: float = 1.5
    alpha: float = 0.2
    beta: float = 0.02
    num_epochs: int = 10
    warmup_epoch: int = 5
    neg_proportion: float = 0.9

    @classmethod
    def from_config(cls, config) -> SpmlSettings:
        """The settings of an mlgraph `spml` config (`config.loss`, `config.optimizer.lr`,
        `config.num_epochs`), for timing the same recipe."""
        loss = config.loss
        return cls(
            loss=loss.name,
            lr=config.optimizer.lr,
            lr_mult=loss.label_lr_mult,
            expected_num_pos=loss.expected_num_pos,
            alpha=loss.alpha,
            beta=loss.beta,
            num_epochs=math.ceil(config.num_epochs),
            warmup_epoch=loss.warmup_epochs,
            neg_proportion=loss.neg_proportion,
        )


class SpmlTrainer:
    """The official loop of `settings.loss` around `model` (its weights are the starting
    point) on the observed matrix `observed` [N_train, C] (1 observed positive, 0 unknown),
    which EM+APL's pass rewrites in place as Zhou's dataset array.

    `train_iter(images, indices)` per batch and `end_of_train_phase(epoch, batches)` after each
    epoch's training phase are the official steps; `run` drives them over given batches.
    """

    def __init__(self, model: TorchMultilabelModel, observed, settings: SpmlSettings):
        if settings.loss not in COLE_LOSSES + ZHOU_LOSSES:
            raise ValueError(f"loss {settings.loss!r}: expected one of an, role, em, em_apl")
        self.model, self.settings = model, settings
        self.label_matrix_obs = np.array(observed, np.float64)  # Zhou: `.astype(float)`
        self.unlabel_num = [int(n) for n in (self.label_matrix_obs == 0).sum(axis=0)]
        f_params = [p for p in model.f.parameters() if p.requires_grad]
        if settings.loss in COLE_LOSSES:
            g_params = [p for p in model.g.parameters() if p.requires_grad]
            groups = [
                {"params": f_params, "lr": settings.lr},
                {"params": g_params, "lr": settings.lr_mult * settings.lr},
            ]
            self.optimizer = torch.optim.Adam(groups, lr=settings.lr)
        else:
            self.optimizer = torch.optim.Adam(f_params, lr=settings.lr)

    @property
    def dtype(self):
        return self.model.f.linear_classifier.weight.dtype

    def _preds(self, images):
        preds = torch.sigmoid(self.model.f(images.to(self.dtype)))
        return preds.unsqueeze(0) if preds.dim() == 1 else preds

    def train_iter(self, images, indices) -> float:
        """One iteration of `run_train_phase` on images [B, 3, S, S] of rows `indices` [B];
        returns the loss."""
        observed = torch.as_tensor(self.label_matrix_obs[np.asarray(indices)]).to(self.dtype)
        self.optimizer.zero_grad()
        preds = self._preds(images)
        estimated = self.model.g(indices) if self.settings.loss in COLE_LOSSES else None
        loss = batch_loss(self.settings.loss, preds, observed, estimated, self.settings)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def pseudo_label(self, batches: Sequence[tuple]) -> None:
        """Zhou's `aysmmetric_pseudo_labeling` over the training `batches` ((images,
        indices), eval mode): per class, the quota's lowest-scored unknowns become -p."""
        s = self.settings
        self.model.eval()
        total_preds = total_idx = None
        for i, (images, indices) in enumerate(batches):
            with torch.no_grad():
                preds = self._preds(images).float().numpy()
            idx = np.asarray(indices)
            if i == 0:
                total_preds, total_idx = preds, idx
                continue
            total_preds = np.vstack((preds, total_preds))
            total_idx = np.hstack((idx, total_idx))
            if i < len(batches) - 1:
                continue
            for c in range(total_preds.shape[1]):
                class_obs = self.label_matrix_obs[:, c][total_idx]
                unlabel_preds = total_preds[:, c][class_obs == 0]
                unlabel_idx = total_idx[class_obs == 0]
                quota = int(
                    s.neg_proportion * self.unlabel_num[c] / (s.num_epochs - s.warmup_epoch)
                )
                for loc in np.argsort(unlabel_preds)[:quota]:
                    self.label_matrix_obs[unlabel_idx[loc], c] = -unlabel_preds[loc]

    def end_of_train_phase(self, epoch: int, batches: Sequence[tuple]) -> None:
        """After epoch `epoch`'s training phase (counted from 1): Zhou's pass when
        `epoch >= warmup_epoch` under EM+APL (`batches`: the training split)."""
        if self.settings.loss == "em_apl" and epoch >= self.settings.warmup_epoch:
            self.pseudo_label(batches)

    def run(self, epochs: Sequence[Sequence[tuple]], split: Sequence[tuple]) -> list[float]:
        """Train over `epochs` (each a list of (images, indices) batches); `split`: the whole
        training split in batches, for the pseudo-labelling pass. Returns each step's loss."""
        losses = []
        for e, batches in enumerate(epochs, start=1):
            self.model.train()
            for images, indices in batches:
                losses.append(self.train_iter(images, indices))
            self.end_of_train_phase(e, split)
            self.model.eval()  # the validation and test phases
        return losses
