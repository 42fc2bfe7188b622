"""Helpers shared by the configs in `configs/` (kept in the package so configs load anywhere)."""

from __future__ import annotations

import math

import ml_collections

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
    o.schedule = "onecycle"  # or 'constant', 'warmup_cosine'
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
