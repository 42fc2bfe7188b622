"""Optimizer and schedules: AdamW, Adam or SGD (PyTorch's semantics) with PyTorch's OneCycleLR
(learning rate, and beta1 or momentum), gradient-norm clipping, freezing and per-group
learning-rate multipliers chosen by regexes on parameter paths."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mlgraph.errors import ConfigError


def _cos_anneal(start: float, end: float, pct):
    return end + (start - end) / 2.0 * (jnp.cos(math.pi * pct) + 1.0)


def onecycle(
    total_steps: int,
    max_value: float,
    start_value: float,
    end_value: float,
    pct_start: float,
) -> Callable:
    """A two-phase cosine one-cycle curve, step for step that of torch OneCycleLR.

    Phase 1 goes start -> max over steps [0, pct_start*total - 1], phase 2 max -> end over
    [pct_start*total - 1, total - 1]. Step i is the value used by the i-th update (PyTorch sets
    it at construction and after each `scheduler.step()`).
    """
    phase1_end = float(pct_start * total_steps) - 1.0
    phase2_end = float(total_steps - 1)

    def value(step):
        step = jnp.asarray(step, jnp.float32)
        # Guarded: very short runs can have an empty warm-up phase (phase1_end <= 0).
        pct1 = step / max(phase1_end, 1e-9)
        pct2 = (step - phase1_end) / max(phase2_end - phase1_end, 1e-9)
        return jnp.where(
            step <= phase1_end,
            _cos_anneal(start_value, max_value, pct1),
            _cos_anneal(max_value, end_value, pct2),
        )

    return value


def learning_rate_fn(
    opt: ml_collections.ConfigDict, total_steps: int, num_epochs: float | None = None
) -> Callable:
    """The learning-rate schedule of `config.optimizer` over `total_steps` updates;
    'multistep' counts epochs of the run, `num_epochs` (`config.num_epochs`) in all.

    Raises:
      ConfigError: an unknown schedule, or 'multistep' without `num_epochs` or milestones.
    """
    if opt.schedule == "constant":
        return lambda step: jnp.asarray(opt.lr, jnp.float32)
    if opt.schedule == "onecycle":
        initial = opt.lr / opt.div_factor
        return onecycle(total_steps, opt.lr, initial, initial / opt.final_div_factor, opt.pct_start)
    if opt.schedule == "warmup_cosine":
        return warmup_cosine(total_steps, opt.lr, opt.min_lr, opt.warmup_fraction)
    if opt.schedule == "multistep":
        if num_epochs is None or "milestones" not in opt:
            raise ConfigError(
                "config.optimizer.schedule='multistep' steps the rate at epochs: it needs "
                "config.optimizer.milestones (epochs) and step_gamma, and the run's num_epochs"
            )
        return multistep(total_steps, num_epochs, opt.lr, opt.milestones, opt.step_gamma)
    raise ConfigError(
        f"config.optimizer.schedule='{opt.schedule}': expected 'onecycle', 'constant', "
        "'warmup_cosine' or 'multistep'"
    )


def multistep(total_steps: int, num_epochs: float, lr: float, milestones, gamma: float) -> Callable:
    """ML-GCN's `adjust_learning_rate` (engine.py): at the start of each epoch (from 0) listed in
    `milestones` the rate is multiplied by `gamma` (a repeated entry counts once), so epoch e
    runs at lr x gamma^|{m <= e}|. The run's epochs are `total_steps / num_epochs` steps each
    (`config_lib.total_steps`); epoch m starts at step ceil(m x that)."""
    per_epoch = total_steps / num_epochs
    # The slack keeps a product that is an integer but for rounding (30 x 2565.1) on its step.
    starts = sorted({math.ceil(m * per_epoch - 1e-9) for m in milestones})

    def value(step):
        passed = sum((jnp.asarray(step) >= s).astype(jnp.float32) for s in starts)
        return jnp.asarray(lr, jnp.float32) * jnp.float32(gamma) ** passed

    return value


def warmup_cosine(total_steps: int, lr: float, min_lr: float, warmup_fraction: float) -> Callable:
    """MKT's `adjust_learning_rate` per iteration (docs/sigrl.md §3.4), in steps: lr · s / W for
    s < W = warmup_fraction · total, then min_lr + (lr − min_lr) · ½ (1 + cos(π (s − W) /
    (total − W)))."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ConfigError(
            f"config.optimizer.warmup_fraction={warmup_fraction}: expected 0 <= f < 1"
        )
    warm = warmup_fraction * total_steps

    def value(step):
        step = jnp.asarray(step, jnp.float32)
        cos = min_lr + (lr - min_lr) * 0.5 * (
            1.0 + jnp.cos(math.pi * (step - warm) / max(total_steps - warm, 1e-9))
        )
        return jnp.where(step < warm, lr * step / max(warm, 1e-9), cos)

    return value


def beta1_fn(opt: ml_collections.ConfigDict, total_steps: int) -> Callable | float:
    """Adam's beta1, or SGD's momentum: cycled inversely to the learning rate under OneCycleLR
    (cycle_momentum), as torch does for either optimizer; otherwise `b1` (Adam) or `momentum`
    (SGD)."""
    if opt.schedule == "onecycle" and opt.cycle_momentum:
        return onecycle(
            total_steps, opt.base_momentum, opt.max_momentum, opt.max_momentum, opt.pct_start
        )
    return opt.momentum if opt.name == "sgd" else opt.b1


def torch_sgd(
    learning_rate: float, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
    """`torch.optim.SGD(lr, momentum, weight_decay)` (no dampening, not Nesterov): the decay is
    added to the gradient (L2, not decoupled), the momentum buffer starts at the first
    gradient, and the step is lr times the buffer."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate),
    )


def _base_transform(
    opt: ml_collections.ConfigDict, total_steps: int, lr_scale: float, num_epochs: float | None
):
    lr = learning_rate_fn(opt, total_steps, num_epochs)
    scaled_lr = (lambda s: lr(s) * lr_scale) if lr_scale != 1.0 else lr
    if opt.name == "sgd":
        return optax.inject_hyperparams(torch_sgd)(
            learning_rate=scaled_lr,
            momentum=beta1_fn(opt, total_steps),
            weight_decay=opt.weight_decay,
        )
    kwargs = dict(learning_rate=scaled_lr, b1=beta1_fn(opt, total_steps), b2=opt.b2, eps=opt.eps)
    if opt.name == "adamw":
        return optax.inject_hyperparams(optax.adamw)(weight_decay=opt.weight_decay, **kwargs)
    if opt.name == "adam":
        return optax.inject_hyperparams(optax.adam)(**kwargs)
    raise ConfigError(f"config.optimizer.name='{opt.name}': expected 'adamw', 'adam' or 'sgd'")


def param_labels(params: nnx.State, opt: ml_collections.ConfigDict) -> nnx.State:
    """Label each parameter 'frozen', 'mult<i>' (the i-th lr_mults entry) or 'default'."""
    frozen = [re.compile(p) for p in opt.frozen]
    mults = [(re.compile(p), m) for p, m in opt.lr_mults]

    def label(path, _):
        name = "/".join(str(p) for p in path)
        if any(r.fullmatch(name) for r in frozen):
            return "frozen"
        for i, (r, _m) in enumerate(mults):
            if r.fullmatch(name):
                return f"mult{i}"
        return "default"

    return nnx.map_state(label, params)


def split_frozen(params: nnx.State, opt: ml_collections.ConfigDict) -> tuple[nnx.State, nnx.State]:
    """(frozen, trainable) parameters by `opt.frozen` (regexes over '/'-joined paths; the
    frozen part is empty when there are none)."""
    patterns = [re.compile(p) for p in opt.frozen]

    def is_frozen(path, _):
        name = "/".join(str(p) for p in path)
        return any(r.fullmatch(name) for r in patterns)

    return params.split(is_frozen, ...)


def trainable_size(params: nnx.State, opt: ml_collections.ConfigDict) -> int:
    """The number of parameter values the optimizer trains: those `param_labels` does not
    label 'frozen'."""
    labels = jax.tree.leaves(param_labels(params, opt))
    leaves = jax.tree.leaves(params)
    return sum(x.size for x, label in zip(leaves, labels, strict=True) if label != "frozen")


def make_optimizer(
    opt: ml_collections.ConfigDict,
    total_steps: int,
    params: nnx.State,
    num_epochs: float | None = None,
) -> optax.GradientTransformation:
    """The optax transformation for `config.optimizer`, with freezing, lr multipliers and
    gradient-norm clipping (`clip_grad_norm` > 0: torch's `clip_grad_norm_` over the trained
    parameters, before the update); `num_epochs` (`config.num_epochs`) for a schedule by
    epochs."""
    if not opt.frozen and not opt.lr_mults:
        tx = _base_transform(opt, total_steps, 1.0, num_epochs)
    else:
        transforms = {
            "default": _base_transform(opt, total_steps, 1.0, num_epochs),
            "frozen": optax.set_to_zero(),
        }
        for i, (_pattern, mult) in enumerate(opt.lr_mults):
            transforms[f"mult{i}"] = _base_transform(opt, total_steps, float(mult), num_epochs)
        tx = optax.multi_transform(transforms, param_labels(params, opt))
    if opt.clip_grad_norm < 0:
        raise ConfigError(
            f"config.optimizer.clip_grad_norm={opt.clip_grad_norm}: expected >= 0 (0 = off)"
        )
    if opt.clip_grad_norm == 0:
        return tx
    clip = [optax.clip_by_global_norm(opt.clip_grad_norm)]
    if opt.frozen:
        # Frozen parameters have no gradient in torch, so they must not count in the norm.
        frozen = nnx.map_state(lambda _, label: label == "frozen", param_labels(params, opt))
        clip.insert(0, optax.masked(optax.set_to_zero(), frozen))
    return optax.chain(*clip, tx)


def skipped_update(old: optax.OptState, new: optax.OptState, skipped: jax.Array) -> optax.OptState:
    """The optimizer state after an update that, where `skipped`, did not happen: Adam's
    moments and step count as in `old`, as torch leaves them when a loop skips
    `optimizer.step()` (SigRL's batch without a seen positive), while every schedule's step
    (an `optax.inject_hyperparams` count) still advances as in `new`, since the official
    schedules are set from the iteration index (MKT's `adjust_learning_rate(i / N + epoch)`)."""

    def pick(o, n):
        if isinstance(o, _SCHEDULE_STATES):
            # The schedules' own counters (optax >= 0.2.5 keeps one per scheduled value).
            counted = {f: getattr(n, f) for f in ("count", "hyperparams_states") if f in o._fields}
            kept = o._replace(**counted)
            return jax.tree.map(lambda a, b: jnp.where(skipped, a, b), kept, n)
        return jnp.where(skipped, o, n)

    is_schedule = lambda x: isinstance(x, _SCHEDULE_STATES)  # noqa: E731
    return jax.tree.map(pick, old, new, is_leaf=is_schedule)


# The states of `optax.inject_hyperparams` (the stateful one since optax 0.2.5).
_SCHEDULE_STATES = tuple(
    getattr(optax, name)
    for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    if hasattr(optax, name)
)


def path_filter(pattern: str) -> Callable[[tuple, object], bool]:
    """An nnx state filter: the variables whose '/'-joined path fully matches `pattern`."""
    regex = re.compile(pattern)
    return lambda path, _: regex.fullmatch("/".join(str(p) for p in path)) is not None


class GroupAdam:
    """`torch.optim.Adam` (no weight decay) over named parameter groups, each with its own
    moments and step count, stepped one group at a time.

    torch skips a parameter whose `.grad` is None: its moments and step count stay as they
    were. A step that several optimizer updates share (Scob's two per iteration) therefore
    calls `update` only for the groups that received a gradient; passing zeros instead would
    decay their moments and count the step. Groups are regexes over parameter paths; a
    parameter in no group is never updated (frozen), one in two groups is an error.

    Args:
      groups: group name -> regex (full match over the '/'-joined path).
      b1, b2, eps: Adam's coefficients (torch's defaults 0.9, 0.999, 1e-8).
    """

    def __init__(
        self, groups: dict[str, str], *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
    ):
        self.groups = dict(groups)
        self.adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def split(self, params: nnx.State) -> tuple[dict[str, nnx.State], nnx.State]:
        """({group: its parameters}, the parameters of no group).

        Raises:
          ConfigError: a parameter matched by two groups.
        """
        names = list(self.groups)
        flat = nnx.to_flat_state(params)
        for path, _ in flat:
            hits = [n for n in names if path_filter(self.groups[n])(path, None)]
            if len(hits) > 1:
                raise ConfigError(
                    f"optimizer groups {', '.join(hits)} both match {'/'.join(map(str, path))}"
                )
        *parts, rest = params.split(*(path_filter(self.groups[n]) for n in names), ...)
        return dict(zip(names, parts, strict=True)), rest

    def init(self, params: nnx.State) -> dict[str, optax.OptState]:
        """The Adam state of each group (zero moments, count 0) over its parameters."""
        parts, _ = self.split(params)
        return {name: self.adam.init(part) for name, part in parts.items()}

    def update(
        self,
        group: str,
        grads: nnx.State,
        opt_state: dict[str, optax.OptState],
        params: nnx.State,
        lr: jax.Array | float,
    ) -> tuple[nnx.State, dict[str, optax.OptState]]:
        """One Adam step of `group` alone with its gradients `grads` (a state of the group's
        parameters, as `split` gives) at learning rate `lr`: (the whole updated params, the
        optimizer state with only `group`'s entry changed)."""
        parts, rest = self.split(params)
        updates, new_state = self.adam.update(grads, opt_state[group], parts[group])
        parts[group] = optax.apply_updates(parts[group], jax.tree.map(lambda u: -lr * u, updates))
        return nnx.merge_state(*parts.values(), rest), dict(opt_state) | {group: new_state}
