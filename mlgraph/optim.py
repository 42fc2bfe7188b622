"""Optimizer and schedules: AdamW with PyTorch's OneCycleLR (learning rate and beta1), freezing
and per-group learning-rate multipliers chosen by regexes on parameter paths."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

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


def learning_rate_fn(opt: ml_collections.ConfigDict, total_steps: int) -> Callable:
    """The learning-rate schedule of `config.optimizer` over `total_steps` updates."""
    if opt.schedule == "constant":
        return lambda step: jnp.asarray(opt.lr, jnp.float32)
    if opt.schedule == "onecycle":
        initial = opt.lr / opt.div_factor
        return onecycle(total_steps, opt.lr, initial, initial / opt.final_div_factor, opt.pct_start)
    raise ConfigError(
        f"config.optimizer.schedule='{opt.schedule}': expected 'onecycle' or 'constant'"
    )


def beta1_fn(opt: ml_collections.ConfigDict, total_steps: int) -> Callable | float:
    """Adam's beta1: cycled inversely to the learning rate under OneCycleLR (cycle_momentum)."""
    if opt.schedule == "onecycle" and opt.cycle_momentum:
        return onecycle(
            total_steps, opt.base_momentum, opt.max_momentum, opt.max_momentum, opt.pct_start
        )
    return opt.b1


def _base_transform(opt: ml_collections.ConfigDict, total_steps: int, lr_scale: float):
    lr = learning_rate_fn(opt, total_steps)
    scaled_lr = (lambda s: lr(s) * lr_scale) if lr_scale != 1.0 else lr
    kwargs = dict(learning_rate=scaled_lr, b1=beta1_fn(opt, total_steps), b2=opt.b2, eps=opt.eps)
    if opt.name == "adamw":
        return optax.inject_hyperparams(optax.adamw)(weight_decay=opt.weight_decay, **kwargs)
    if opt.name == "adam":
        return optax.inject_hyperparams(optax.adam)(**kwargs)
    raise ConfigError(f"config.optimizer.name='{opt.name}': expected 'adamw' or 'adam'")


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


def make_optimizer(
    opt: ml_collections.ConfigDict, total_steps: int, params: nnx.State
) -> optax.GradientTransformation:
    """The optax transformation for `config.optimizer`, with freezing and lr multipliers."""
    if not opt.frozen and not opt.lr_mults:
        return _base_transform(opt, total_steps, 1.0)
    transforms = {"default": _base_transform(opt, total_steps, 1.0), "frozen": optax.set_to_zero()}
    for i, (_pattern, mult) in enumerate(opt.lr_mults):
        transforms[f"mult{i}"] = _base_transform(opt, total_steps, float(mult))
    return optax.multi_transform(transforms, param_labels(params, opt))
