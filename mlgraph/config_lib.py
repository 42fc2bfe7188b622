"""Helpers shared by the configs in `configs/` (kept in the package so configs load anywhere)."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from mlgraph.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse a `key=value,key=value` config argument (big_vision style) over typed defaults.

    `python -m mlgraph.main --config configs/x.py:runlocal=True,size=224`. Values take the type of
    their default; an unknown key is an error that lists the known ones.
    """
    result = ml_collections.ConfigDict(defaults)
    if not arg:
        return result
    for item in arg.split(","):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"config argument '{item}': expected key=value")
        if key not in defaults:
            raise ValueError(
                f"config argument '{key}': unknown; known: {', '.join(sorted(defaults))}"
            )
        kind = type(defaults[key])
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument '{key}={raw}': expected true or false")
            value = raw.lower() in ("true", "1")
        else:
            value = kind(raw)
        result[key] = value
    return result


def base_config() -> ml_collections.ConfigDict:
    """The fields every experiment has; configs override what they need. No method is named
    here: the recipes (`mlgraph.recipes`) fill `model` and `loss` with a method's fields."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.image_size = 224
    c.batch_size = 64  # global, over all devices and hosts
    c.eval_batch_size = 64
    c.num_epochs = 10.0  # used when total_steps == 0
    c.total_steps = 0
    c.stop_at_step = 0  # stop (checkpointed) after this step, as a preemption would; 0 = never
    c.eval_every_steps = 500
    c.eval_every_epochs = 0.0  # > 0: evaluate every this many epochs instead
    # A checkpoint every this many steps (and at each evaluation); 0 = only at evaluations.
    # SIGTERM or SIGINT also writes one, at the step reached (mlgraph.preemption).
    c.checkpoint_every_steps = 0
    # How many of the newest checkpoints are kept, besides the best one: a resume falls back to
    # the next older one when the newest fails to read.
    c.keep_checkpoints = 2
    # The logged metric the kept best checkpoint is chosen by: 'eval/...' on the evaluation
    # split, 'val/...' on the held-out part of the training split (data.val_fraction > 0).
    c.best_metric = "eval/ema_mAP"
    # Stop at the first evaluation whose best_metric does not improve.
    c.early_stop = False
    c.log_every_steps = 50
    c.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.init_from = ""  # a weights checkpoint written by `python -m mlgraph.convert`, or a workdir
    c.data = data_config()
    c.optimizer = optimizer_config()
    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.9997
    c.ema.live = ()  # regexes of state paths the EMA model takes live (not averaged)
    # The method's constructor arguments, which the recipes fill in with their defaults
    # (`recipes.model_config(NAME, ...)`, the method's `Model` fields, `config.model.name` = NAME).
    c.model = ml_collections.ConfigDict()
    # The training objective's settings, which the recipes fill in (`recipes.loss_config(NAME,
    # ...)`, the method's `Loss` fields); training completes them with the method's defaults
    # (`mlgraph.models.loss_settings`).
    c.loss = ml_collections.ConfigDict()
    return c


def data_config() -> ml_collections.ConfigDict:
    """`config.data`: the data set, its input pipeline and the label protocol."""
    d = ml_collections.ConfigDict()
    # A row of mlgraph.data.registry ('demo' and 'digits_mosaic' are built on first use).
    d.name = "coco2014"
    d.builder_config = ""  # e.g. 'all' for coco2014; '' = the data set's own
    d.data_dir = ""  # where built datasets live ('' = $MLGRAPH_DATA or ~/mlgraph_data)
    d.train_split = "train"
    d.eval_split = "val"
    d.worker_count = 0  # grain worker processes; 0 = in the main process
    d.prefetch = 2
    # The training chain, by name: one row of `mlgraph.data.augment.CHAINS` ('resize',
    # 'resize_flip', 'salgl', 'q2l', 'ssgrl', 'mlgcn', 'timm'), each defined there once.
    d.augment = "resize_flip"
    # Test transform: resize to this side, then centre-crop image_size (timm's crop_pct rule
    # gives floor(image_size / crop_pct)); 0 = a plain resize to image_size.
    d.eval_center_crop_from = 0
    # 'square': that resize makes a square; 'shorter': the shorter side, aspect kept (timm's
    # test transform).
    d.eval_resize = "square"
    d.eval_interpolation = "bilinear"  # or 'bicubic'
    # VOC training labels of classes present only as difficult objects: 'positive' or
    # 'negative'. Evaluation always leaves such pairs out.
    d.train_difficult = "positive"
    # Training labels: '' = the data set's full labels; 'cole' or 'scob' = one observed positive
    # per image (single-positive protocols, mlgraph.data.observed), the rest unknown.
    d.observed = ""
    # A part of the training split held out (with its full labels) for model selection, logged
    # as 'val/...' (Cole et al.: 0.2, cut with RandomState(1200)); 0 = none.
    d.val_fraction = 0.0
    # Classes held out of training for zero-shot evaluation (names); () = the data set's own
    # split if it has one (nuswide_ov), else none.
    d.unseen_classes = ()
    d.mean = IMAGENET_MEAN
    d.std = IMAGENET_STD
    return d


def optimizer_config() -> ml_collections.ConfigDict:
    """`config.optimizer`: `mlgraph.optim.make_optimizer`'s settings (a method with its own
    optimizer reads the ones it uses)."""
    o = ml_collections.ConfigDict()
    o.name = "adamw"  # or 'adam', 'sgd' (torch semantics: L2 decay, momentum)
    o.lr = 1e-4
    o.weight_decay = 1e-2
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.momentum = 0.9  # SGD only (cycled like beta1 under one-cycle)
    o.clip_grad_norm = 0.0  # global gradient-norm clip; 0 = off
    # A step whose loss or updated parameters are not finite stops the run (exit 2, naming the
    # last good checkpoint); True instead skips such updates, counted as train/skipped.
    o.skip_nonfinite = False
    o.schedule = "onecycle"  # or 'constant', 'warmup_cosine', 'multistep' (milestones, step_gamma)
    # 'warmup_cosine': linear warm-up from 0 over this share of the steps, then a half cosine
    # from lr to min_lr, per step.
    o.warmup_fraction = 0.0
    o.min_lr = 0.0
    # Layer-wise lr decay: a layer with id i of n trains at lr x decay^(n - i); 1 = none. Read
    # by the methods that define layer ids.
    o.layer_decay = 1.0
    o.pct_start = 0.2
    o.div_factor = 25.0
    o.final_div_factor = 1e4
    o.cycle_momentum = True  # PyTorch OneCycleLR also cycles Adam's beta1
    o.base_momentum = 0.85
    o.max_momentum = 0.95
    o.frozen = ()  # regexes of parameter paths that are not trained
    o.lr_mults = ()  # (regex, multiplier) pairs, e.g. (('backbone/.*', 0.1),)
    return o


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """`config.total_steps` if set, else `num_epochs` epochs of the global batch (rounded up)."""
    if config.total_steps:
        return int(config.total_steps)
    return max(1, math.ceil(config.num_epochs * num_train_examples / config.batch_size))


# ---------------------------------------------------------------------------------------------
# The values a numeric field may take
# ---------------------------------------------------------------------------------------------
Bound = float | str | None  # a number, another field's dotted name, or None: unbounded


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config field may take: `low`..`high`, each bound included unless
    marked open; `off` is accepted besides (a field whose 0 means off). A tuple value is
    checked element by element."""

    low: Bound = None
    high: Bound = None
    low_open: bool = False
    high_open: bool = False
    off: float | None = None

    def describe(self, flat: Mapping[str, Any]) -> str:
        """The range in words, a bound that is another field shown with its value."""
        low, high = (_bound_text(b, flat) for b in (self.low, self.high))
        if high is None:
            text = f"{'>' if self.low_open else '>='} {low}"
        elif low is None:
            text = f"{'<' if self.high_open else '<='} {high}"
        else:
            left, right = "(["[not self.low_open], ")]"[not self.high_open]
            text = f"in {left}{low}, {high}{right}"
        return text if self.off is None else f"{text} (or {self.off:g}: off)"

    def holds(self, value: float, flat: Mapping[str, Any]) -> bool:
        """Whether `value` is in the range (a NaN or infinity never is)."""
        if self.off is not None and value == self.off:
            return True
        if not math.isfinite(value):
            return False
        low, high = (_bound_value(b, flat) for b in (self.low, self.high))
        above = low is None or (value > low if self.low_open else value >= low)
        below = high is None or (value < high if self.high_open else value <= high)
        return above and below


def _bound_value(bound: Bound, flat: Mapping[str, Any]) -> float | None:
    return flat.get(bound) if isinstance(bound, str) else bound


def _bound_text(bound: Bound, flat: Mapping[str, Any]) -> str | None:
    if isinstance(bound, str):
        return f"config.{bound} ({flat.get(bound)})"
    return None if bound is None else f"{bound:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # a share or a probability
DECAY = Range(0, 1, high_open=True)  # an average's decay, Adam's betas: 1 never moves

# Every numeric field with a range, by dotted name (fnmatch patterns; a field a config does not
# have is skipped): checked at the start of a run (`check_ranges`), before anything is written.
RANGES: dict[str, Range] = {
    "image_size": POSITIVE,
    "batch_size": POSITIVE,
    "eval_batch_size": POSITIVE,
    "num_epochs": POSITIVE,
    "total_steps": NON_NEGATIVE,  # 0: from num_epochs
    "stop_at_step": NON_NEGATIVE,
    "eval_every_steps": POSITIVE,
    "eval_every_epochs": NON_NEGATIVE,
    "checkpoint_every_steps": NON_NEGATIVE,
    "keep_checkpoints": Range(1),
    "log_every_steps": POSITIVE,
    "ema.decay": DECAY,
    "data.worker_count": NON_NEGATIVE,
    "data.prefetch": NON_NEGATIVE,
    "data.eval_center_crop_from": Range("image_size", off=0),
    "data.val_fraction": Range(0, 1, high_open=True),
    "data.std": POSITIVE,
    "optimizer.lr": NON_NEGATIVE,  # 0 is a run that only evaluates; < 0 climbs the loss
    "optimizer.group_lr.*": NON_NEGATIVE,
    "optimizer.min_lr": Range(0, "optimizer.lr"),
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.b1": DECAY,
    "optimizer.b2": DECAY,
    "optimizer.eps": NON_NEGATIVE,
    "optimizer.momentum": DECAY,
    "optimizer.base_momentum": Range(0, "optimizer.max_momentum"),
    "optimizer.max_momentum": DECAY,
    "optimizer.clip_grad_norm": NON_NEGATIVE,  # 0: off
    "optimizer.warmup_fraction": Range(0, 1, high_open=True),  # the warm-up within the run
    "optimizer.pct_start": FRACTION,
    "optimizer.div_factor": POSITIVE,
    "optimizer.final_div_factor": POSITIVE,
    "optimizer.layer_decay": Range(0, 1, low_open=True),
    "optimizer.step_epochs": POSITIVE,
    "optimizer.milestones": NON_NEGATIVE,  # epochs counted from 0
    "optimizer.step_gamma": Range(0, 1, low_open=True),
    "model.*dropout": Range(0, 1, high_open=True),
    "model.cam_threshold": FRACTION,
    "model.momentum": DECAY,
    "model.tau": FRACTION,  # ML-GCN's threshold of P(j | i)
    "model.p": FRACTION,  # ML-GCN's re-weighting
    "loss.gamma_pos": NON_NEGATIVE,
    "loss.gamma_neg": NON_NEGATIVE,
    "loss.clip": Range(0, 1, high_open=True),
    "loss.eps": POSITIVE,
    "loss.ls_coef": Range(0, 1, high_open=True),
    "loss.expected_num_pos": POSITIVE,
    "loss.neg_proportion": FRACTION,
    "loss.warmup_epochs": NON_NEGATIVE,
    "loss.label_lr_mult": NON_NEGATIVE,
    "loss.alpha": NON_NEGATIVE,
    "loss.beta": NON_NEGATIVE,
    "loss.lamda": NON_NEGATIVE,
    "loss.*_weight": NON_NEGATIVE,
    "loss.*temperature": POSITIVE,
}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict (or ConfigDict) as {dotted name: leaf value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """Check every field of `config` that `RANGES` names against its range.

    Raises:
      ConfigError: the first field out of range, naming it, its value and the range.
    """
    flat = flatten(config)
    for pattern, allowed in RANGES.items():
        for name in fnmatch.filter(flat, pattern):
            value = flat[name]
            values = value if isinstance(value, tuple | list) else (value,)
            numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            if all(allowed.holds(v, flat) for v in numbers):
                continue
            each = "each " if len(values) > 1 else ""
            raise ConfigError(
                f"config.{name}={value}: out of range; expected {each}{allowed.describe(flat)}"
            )
