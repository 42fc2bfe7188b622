"""Scob's released training loop in plain PyTorch, in the official order of operations: the
`BasicRecipe` of iCVTEAM/Scob `main.py` as its `chinopie` framework runs it
(`TrainBootstrap._wrapper_train`, `ModuleRecipe.run_train_phase`; docs/scob_spml.md §3.3-§3.8).
Written from the official code, not from mlgraph's JAX step, so that a parity test of the two
checks mlgraph's training against the official recipe.

Per epoch: `before_epoch` (a new prototype bank `IPT` of `bank_size` entries per class, the
label estimator's correlation matrix, and chinopie's `set_train`, which only puts the frozen
backbone's batch norms in eval mode and never calls `train()`); then each iteration
(`run_train_iter`):

1. `move_k(alpha)` (a no-op in the official code: it rebinds a loop variable);
2. the classification forward without masks (`Scob.forward`: probabilities, projected
   features, estimated labels sigmoid(Phi[idx])) in whatever modes the model is in, the
   ROLE-style loss (`loss`), `zero_grad`, backward, one Adam step over the five groups (the
   projector has no gradient and is skipped, as torch skips a `None` grad);
3. Grad-CAM++ (pytorch-grad-cam 1.4.8's `GradCAMPlusPlus` at `fb.backbone.layer4[-1]`) of
   each image's observed class probability with the model in eval mode, scaled and resized as
   the library does; patch masks by average pooling (stride-32 and stride-16 grids: 14 and 28
   at 448 px), corners off, >= 0.5 salient;
4. `model.train()` (every module, the frozen backbone's batch norms included), the keys
   `forward_k` on the clean images with the masks (no gradient), `zero_grad`, the queries on
   `hard_augment(images)` with the same masks, and when the batch has a salient patch at both
   scales, the InfoNCE against the bank's most confident key per class with the hard-thresholded
   correlation, x lambda_cl; if it is finite and >= 0 (`validate_loss`), backward and a second
   Adam step (fm1 and the projector: the classifier and Phi have no gradient);
5. the bank takes each image's key (unless NaN) with the confidence of step 2 (before its
   update).

After the training phase the validation phase calls `model.eval()` (`after_train_phase`), and
`after_epoch` steps StepLR. So the first iteration of every epoch classifies with the backbone's
batch norms on their running statistics, and from the second epoch on without dropout: the
modes the previous phase left.

Not transcribed (no effect on the trained state): the AP probes, the validation forward (eval
mode, no gradient), checkpoints and optuna. The CAM's gradient is taken at layer4's output
directly (the official backward also runs through the frozen backbone to the pixels and fills
`.grad` fields that the next `zero_grad` clears); the official grids 14/28 become
image_size/32 and image_size/16.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from collections.abc import Sequence

import numpy as np

from mlgraph.torch_reference import require_torch
from mlgraph.torch_reference.scob import TorchScob

torch = require_torch()
nn = torch.nn
F = torch.nn.functional

EPS = 1e-5  # Scob's losses.py
GRADCAM_EPS = 1e-6  # pytorch-grad-cam's Grad-CAM++ denominator
SCALE_EPS = 1e-7  # pytorch-grad-cam's `scale_cam_image`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNDO_STD = (0.229, 0.224, 0.255)  # the official hard augmentation's typo for blue
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclasses.dataclass(frozen=True)
class ScobSettings:
    """The official hyper-parameters (`main.py`'s `reg_*` defaults; docs/scob_spml.md §3.8).

    Attributes:
      lr_linear, lr_tf, lr_pj, lr_es: the learning rates of the linear parts and classifier,
        the transformers, the projector and the label estimator.
      step_size, gamma: StepLR's epochs per step and factor.
      expected_num_pos: K of the EPR terms (1.5 VOC, 3.9 COCO).
      lambda_cl, cl_temperature: the contrastive loss's weight and temperature.
      bank_size: the IPT's entries per class.
      cam_threshold: the salient-patch threshold.
      strong_augment: the hard augmentation's random stages (ColorJitter, grayscale, blur);
        False keeps only its two normalisations (the stages that always run).
      augment_seed: the seed of the hard augmentation's gates (the official one is unseeded).
    """

    lr_linear: float = 1e-3
    lr_tf: float = 4e-5
    lr_pj: float = 1e-2
    lr_es: float = 1e-2
    step_size: int = 16
    gamma: float = 0.1
    expected_num_pos: float = 1.5
    lambda_cl: float = 0.1
    cl_temperature: float = 1.0
    bank_size: int = 2
    cam_threshold: float = 0.5
    strong_augment: bool = True
    augment_seed: int = 0

    @classmethod
    def from_config(cls, config) -> ScobSettings:
        """The settings of an mlgraph `scob` config (`config.optimizer.group_lr`, StepLR,
        `config.loss`, the bank, the CAM threshold), for timing the same recipe.

        Raises:
          ValueError: settings the official loop cannot take: a schedule other than StepLR, or
            a classifier learning rate other than the linear parts' (one `lr_linear`).
        """
        opt, loss, model = config.optimizer, config.loss, config.model
        lrs = opt.group_lr
        if opt.schedule != "step" or lrs.classifier != lrs.linear:
            raise ValueError(
                "the official Scob loop steps StepLR and trains the classifier at lr_linear: "
                "config.optimizer.schedule='step' and group_lr.classifier == group_lr.linear"
            )
        return cls(
            lr_linear=lrs.linear,
            lr_tf=lrs.transformer,
            lr_pj=lrs.projector,
            lr_es=lrs.label_estimator,
            step_size=opt.step_epochs,
            gamma=opt.step_gamma,
            expected_num_pos=loss.expected_num_pos,
            lambda_cl=loss.cl_weight,
            cl_temperature=loss.cl_temperature,
            bank_size=model.bank_size,
            cam_threshold=model.cam_threshold,
            strong_augment=model.strong_augment,
        )


# ---------------------------------------------------------------------------------------------
# losses.py
# ---------------------------------------------------------------------------------------------
def soft_bce(pred, labels):
    """`loss_bce` per image: -(1/C) sum_c [t log(u + eps) + (1 - t + eps) log(1 - u + eps)]."""
    terms = (pred + EPS).log() * labels + (1.0 + EPS - pred).log() * (1.0 + EPS - labels)
    return -terms.sum(dim=1) / labels.shape[1]


def positive_bce(pred, labels):
    """`loss_bce(only_pos=True)` per image: the observed positives' -log(u + eps) / C."""
    terms = ((pred + EPS).log() * labels).masked_fill(labels != 1, 0.0)
    return -terms.sum(dim=1) / labels.shape[1]


def epr(pred, observed, expected_num_pos: float):
    """`loss_epr`: the batch mean of `positive_bce` plus ((sum p / B - K) / C)^2."""
    first = positive_bce(pred, observed).sum(0) / pred.shape[0]
    second = ((pred.sum(1).mean(0) - expected_num_pos) / pred.shape[1]) ** 2
    return first + second


def classification_loss(probs, estimated, observed, expected_num_pos: float):
    """`loss`: 1/2 [BCE(p, sg(q)) + EPR(p) + BCE(q, sg(p)) + EPR(q)]."""
    b = probs.shape[0]
    loss_p = soft_bce(probs, estimated.detach()).sum(0) / b + epr(probs, observed, expected_num_pos)
    loss_q = soft_bce(estimated, probs.detach()).sum(0) / b + epr(
        estimated, observed, expected_num_pos
    )
    return (loss_p + loss_q) / 2


def infonce(queries, keys, targets, correlations, prototypes, tau: float):
    """`loss_contrastive_infonce` with `hard_correlation=True`: the query against its key and
    every class prototype [C, K, D], the prototype logits weighted by 1 - R~[y_b, c]^2, where
    R~ is R with the entries < 1 set to 0 (in place, as the official code does)."""
    b = queries.shape[0]
    num_labels, per_class, dim = prototypes.shape
    q = F.normalize(queries, dim=1)
    k = F.normalize(keys, dim=1)
    protos = F.normalize(prototypes, dim=2)
    positive = (q * k).sum(dim=1)
    correlations[correlations < 1] = 0
    possible = correlations[targets].unsqueeze(-1).repeat(1, 1, per_class).view(b, -1)
    negative = torch.mm(q, protos.view(num_labels * per_class, dim).T)
    sim = torch.zeros((b, num_labels * per_class + 1), dtype=q.dtype)
    sim[:, 0] = positive
    sim[:, 1:] = negative
    sim += 1
    weights = torch.zeros_like(sim)
    weights[:, 0] = 1
    weights[:, 1:] = 1 - possible.pow(2)
    sim = sim * weights.detach() / tau
    return F.cross_entropy(sim, torch.zeros(b, dtype=torch.long))


def label_correlation(logits):
    """`LabelEstimator.calculate_correlation`: R_ij = mean(q_i q_j) / mean(q_i), R_ii = 1."""
    with torch.no_grad():
        x = torch.sigmoid(logits.detach())
        joint = (x.T @ x) / x.shape[0]
        r = joint / x.mean(0)[:, None]
        return torch.where(torch.eye(x.shape[1], dtype=torch.bool), torch.ones_like(r), r)


# ---------------------------------------------------------------------------------------------
# The prototype bank (`IPT`)
# ---------------------------------------------------------------------------------------------
class PrototypeBank:
    """`IPT`: per class a min-heap of at most `size` entries ((confidence, image id), key);
    a full class takes a new entry only if it is more confident than its minimum and its image
    is in no class's heap; `prototypes()` is `get_most_confident_feats(1)`."""

    def __init__(self, num_classes: int, size: int, dim: int):
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.heaps: list[list] = [[] for _ in range(num_classes)]
        self.ids: set[int] = set()

    def update(self, label: int, confidence: float, image_id: int, key) -> None:
        """Offer one image's key to its class."""
        heap = self.heaps[label]
        entry = ((confidence, image_id), {"key": key})
        if len(heap) >= self.size:
            if heap[0][0][0] < confidence and image_id not in self.ids:
                old = heapq.heappushpop(heap, entry)
                self.ids.remove(old[0][1])
                self.ids.add(image_id)
        else:
            heapq.heappush(heap, entry)
            self.ids.add(image_id)

    def prototypes(self, dtype):
        """[C, 1, D]: each class's most confident key, zeros for a class without entries."""
        out = torch.zeros((self.num_classes, 1, self.dim), dtype=dtype)
        for label, heap in enumerate(self.heaps):
            for k, (_, entry) in enumerate(heapq.nlargest(1, heap, key=lambda e: e[0])):
                out[label, k] = entry["key"]
        return out

    def as_arrays(self) -> dict[str, np.ndarray]:
        """The entries per class as numpy, ordered by (confidence, image id) descending:
        `confidence` [C, size] (0 where empty), `image` [C, size] (-1), `key` [C, size, D],
        `filled` [C]."""
        conf = np.zeros((self.num_classes, self.size))
        ids = np.full((self.num_classes, self.size), -1)
        keys = np.zeros((self.num_classes, self.size, self.dim))
        filled = np.zeros(self.num_classes, np.int64)
        for c, heap in enumerate(self.heaps):
            entries = sorted(heap, key=lambda e: e[0], reverse=True)
            filled[c] = len(entries)
            for s, ((confidence, image), entry) in enumerate(entries):
                conf[c, s], ids[c, s] = confidence, image
                keys[c, s] = entry["key"].double().numpy()
        return {"confidence": conf, "image": ids, "key": keys, "filled": filled}


# ---------------------------------------------------------------------------------------------
# Grad-CAM++ (pytorch-grad-cam 1.4.8) and the patch masks (cam.py)
# ---------------------------------------------------------------------------------------------
def _scale(cams):
    shifted = cams - cams.amin(dim=(1, 2), keepdim=True)
    return shifted / (SCALE_EPS + shifted.amax(dim=(1, 2), keepdim=True))


def gradcam_plus_plus(model: TorchScob, images, targets):
    """The library's `GradCAMPlusPlus(model, [fb.backbone.layer4[-1]])(images, targets)` for
    the class probabilities of an eval-mode model: [B, S, S] maps in [0, 1)."""
    x14, x28 = model.fb(images)
    acts = x14.detach().requires_grad_(True)
    probs = torch.sigmoid(model.fh(model.online(acts, x28)))
    score = probs[torch.arange(len(targets)), targets].sum()
    (grads,) = torch.autograd.grad(score, acts)
    a, g = acts.detach(), grads
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum(dim=(2, 3))[:, :, None, None] * g2 * g + GRADCAM_EPS)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = (torch.clamp(g, min=0) * alpha).sum(dim=(2, 3))
    cam = torch.clamp((weights[:, :, None, None] * a).sum(dim=1), min=0)
    size = images.shape[-1]
    # cv2.resize INTER_LINEAR of a float map upsampled = bilinear with half-pixel centres.
    full = F.interpolate(
        _scale(cam)[:, None], size=(size, size), mode="bilinear", align_corners=False
    )[:, 0]
    return _scale(torch.clamp(full, min=0))


def patch_scores(full_cams, grid: int):
    """`crop_corner(resize_mask(masks, grid))`: the map's mean over each patch of a grid x grid
    token map [B, grid, grid], the four corners 0; `generate_binary_mask` thresholds it."""
    pooled = F.avg_pool2d(full_cams, full_cams.shape[-1] // grid).clone()
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        pooled[:, y, x] = 0
    return pooled


# ---------------------------------------------------------------------------------------------
# The hard augmentation (main.py `hard_augment`: data/aug.py `Preprocess` of torchvision ops)
# ---------------------------------------------------------------------------------------------
def _blend(img, other, ratio):
    return (ratio * img + (1.0 - ratio) * other).clamp(0.0, 1.0)


def _grayscale(img):
    w = torch.tensor(GRAY, dtype=img.dtype)[:, None, None]
    return (img * w).sum(dim=0, keepdim=True)


def _adjust_hue(img, factor):
    r, g, b = img
    maxc, minc = img.amax(dim=0), img.amin(dim=0)
    equal = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(equal, torch.ones_like(maxc), maxc)
    div = torch.where(equal, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + factor, 1.0)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    sector = i.to(torch.int64) % 6
    v = maxc
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    table = torch.stack(
        [
            torch.stack([v, q, p, p, t, v]),
            torch.stack([t, v, v, q, p, p]),
            torch.stack([p, p, t, v, v, q]),
        ]
    )  # [3, 6, H, W]
    return table.gather(1, sector[None, None].expand(3, 1, *sector.shape))[:, 0]


def _color_jitter(img, gen):
    """torchvision ColorJitter(0.8, 0.8, 0.8, 0.2): the order, then the four factors."""
    order = torch.randperm(4, generator=gen)
    b, c, s = (float(torch.empty(1).uniform_(0.2, 1.8, generator=gen)) for _ in range(3))
    h = float(torch.empty(1).uniform_(-0.2, 0.2, generator=gen))
    for fn in order.tolist():
        if fn == 0:
            img = _blend(img, torch.zeros_like(img), b)
        elif fn == 1:
            img = _blend(img, _grayscale(img).mean(), c)
        elif fn == 2:
            img = _blend(img, _grayscale(img), s)
        else:
            img = _adjust_hue(img, h)
    return img


def _gaussian_blur(img, gen):
    """torchvision GaussianBlur((3, 3), (1.0, 2.0)): reflect padding, separable kernel."""
    sigma = float(torch.empty(1).uniform_(1.0, 2.0, generator=gen))
    x = torch.linspace(-1.0, 1.0, 3, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    padded = F.pad(img[None], (1, 1, 1, 1), mode="reflect")
    kernel = (k[:, None] * k[None, :]).expand(img.shape[0], 1, 3, 3)
    return F.conv2d(padded, kernel, groups=img.shape[0])[0]


class HardAugment:
    """`hard_augment.forward_batch`: per image five gates from one `random.Random` (undo the
    normalisation with the blue typo p=1, ColorJitter 0.3, RandomGrayscale(0.1) 0.2,
    GaussianBlur 0.2, normalise p=1); `photometric=False` sets the three random stages'
    probabilities to 0."""

    def __init__(self, photometric: bool, seed: int):
        self.p = (1.0, 0.3, 0.2, 0.2, 1.0) if photometric else (1.0, 0.0, 0.0, 0.0, 1.0)
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, images):
        out = images.clone()
        mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype)[:, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=images.dtype)[:, None, None]
        undo = torch.tensor(UNDO_STD, dtype=images.dtype)[:, None, None]
        for i in range(len(out)):
            img = out[i]
            stages = (
                lambda x: (x + mean / std) * undo,
                lambda x: _color_jitter(x, self.gen),
                lambda x: (
                    _grayscale(x).expand(3, -1, -1)
                    if float(torch.rand(1, generator=self.gen)) < 0.1
                    else x
                ),
                lambda x: _gaussian_blur(x, self.gen),
                lambda x: (x - mean) / std,
            )
            for stage, p in zip(stages, self.p, strict=True):
                if self.rng.random() <= p:
                    img = stage(img)
            out[i] = img
        return out


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def set_train(model: nn.Module) -> None:
    """chinopie's `set_train`: batch norms without a trainable parameter go to eval mode;
    nothing is set to training mode."""
    for module in model.modules():
        trainable = any(p.requires_grad for p in module.parameters())
        if not trainable and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class ScobTrainer:
    """The official recipe around a `TorchScob` `model` (its weights are the starting point)
    on the observed single positives `observed` [N_train, C] (0/1).

    `before_epoch()`, `train_iter(images, indices)` per batch, `after_train_phase()`,
    `after_epoch()` are the official loop's hooks; `run` drives them over given batches.
    """

    def __init__(self, model: TorchScob, observed, settings: ScobSettings):
        self.model, self.settings = model, settings
        self.observed = torch.as_tensor(np.asarray(observed)).long()
        self.num_classes = self.observed.shape[1]
        for p in model.fb.parameters():  # chinopie.freeze_model(model.fb)
            p.requires_grad_(False)
        s = settings
        self.optimizer = torch.optim.Adam(
            [
                {
                    "params": nn.ModuleList(
                        [model.fm1_14.linear_parts, model.fm1_28.linear_parts]
                    ).parameters(),
                    "lr": s.lr_linear,
                },
                {
                    "params": nn.ModuleList(
                        [model.fm1_14.transformer_parts, model.fm1_28.transformer_parts]
                    ).parameters(),
                    "lr": s.lr_tf,
                },
                {"params": model.projector.parameters(), "lr": s.lr_pj},
                {"params": model.fh.parameters(), "lr": s.lr_linear},
                {"params": model.g.parameters(), "lr": s.lr_es},
            ]
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=s.step_size, gamma=s.gamma
        )
        self.hard_augment = HardAugment(s.strong_augment, s.augment_seed)
        self.bank: PrototypeBank | None = None
        self.correlation = None

    @property
    def dtype(self):
        return self.model.fh.classifier.weight.dtype

    def before_epoch(self) -> None:
        """The recipe's `before_epoch` (a new bank, the correlation of Phi) and
        `run_train_phase`'s `set_train`."""
        feat_dim = 2 * self.model.fm1_14.dim
        self.bank = PrototypeBank(self.num_classes, self.settings.bank_size, feat_dim)
        self.correlation = label_correlation(self.model.g.logits)
        set_train(self.model)

    def train_iter(self, images, indices) -> dict[str, float]:
        """One `run_train_iter` on images [B, 3, S, S] of training rows `indices` [B]; returns
        the classification and contrastive losses (0 when skipped), the salient fraction of
        the patches, and the smallest distance of a patch score to the threshold."""
        s, model, opt = self.settings, self.model, self.optimizer
        images = images.to(self.dtype)
        target = self.observed[indices]
        # 1. model.move_k(alpha): the official EMA rebinds a loop variable, a no-op.
        # 2. Classification and label estimation, then the first Adam step.
        probs, _, estimated = model.heads(images, indices)
        loss = classification_loss(probs, estimated, target, s.expected_num_pos)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # 3. Grad-CAM++ of the observed class with the updated network, in eval mode.
        _, labels = target.max(dim=1)
        confidences = probs.detach()[torch.arange(len(labels)), labels]
        model.eval()
        opt.zero_grad()
        cams = gradcam_plus_plus(model, images, labels)
        size = images.shape[-1]
        scores14, scores28 = patch_scores(cams, size // 32), patch_scores(cams, size // 16)
        salient14, salient28 = scores14 >= s.cam_threshold, scores28 >= s.cam_threshold
        # How near a patch came to flipping (for comparing two runs' masks).
        margin = min(
            float((scores14 - s.cam_threshold).abs().min()),
            float((scores28 - s.cam_threshold).abs().min()),
        )
        # 4. Contrastive step in training mode (the frozen backbone's batch norms too).
        model.train()
        keys = model.keys(images, ~salient14, ~salient28)
        opt.zero_grad()
        _, queries, _ = model.heads(self.hard_augment(images), indices, ~salient14, ~salient28)
        contrastive = 0.0
        if salient14.any() and salient28.any():
            cl = infonce(
                queries,
                keys.detach(),
                labels.detach(),
                self.correlation.detach(),
                self.bank.prototypes(self.dtype),
                s.cl_temperature,
            )
            cl = cl * s.lambda_cl
            if bool(torch.isfinite(cl)) and float(cl.detach()) >= 0:  # `validate_loss`
                cl.backward()
                opt.step()
                contrastive = float(cl.detach())
        # 5. The bank takes this batch's keys with the pre-update confidences.
        for i in range(len(labels)):
            if not keys[i].isnan().any():
                self.bank.update(
                    int(labels[i]), float(confidences[i]), int(indices[i]), keys[i].detach()
                )
        salient = 0.5 * (salient14.double().mean() + salient28.double().mean())
        return {
            "classification": float(loss.detach()),
            "contrastive": contrastive,
            "salient_fraction": float(salient),
            "threshold_margin": margin,
        }

    def after_train_phase(self) -> None:
        """The validation phase's `set_eval` (its forward changes nothing else)."""
        self.model.eval()

    def after_epoch(self) -> None:
        """`after_epoch`: StepLR's step."""
        self.scheduler.step()

    def run(self, epochs: Sequence[Sequence[tuple]]) -> list[dict[str, float]]:
        """Train over `epochs`, each a list of (images [B, 3, S, S], indices [B]) batches;
        returns each iteration's `train_iter` record."""
        records = []
        for batches in epochs:
            self.before_epoch()
            for images, indices in batches:
                records.append(self.train_iter(images, indices))
            self.after_train_phase()
            self.after_epoch()
        return records
