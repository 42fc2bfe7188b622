"""Single-positive multi-label learning (SPML): the Cole et al. (CVPR 2021) classifier and its
baselines AN, AN-LS, WAN, EPR, ROLE, and Zhou et al.'s EM and EM+APL (docs/scob_spml.md §1-§2).

    backbone (ResNet-50 in the papers) -> global average pooling -> Linear(D, C) -> logits;
    loss: `config.loss.name` over the observed labels z [B, C] (one positive per image, the
    rest unknown), read from `state["extra"]["observed"]` at each example's `batch["index"]`.

The network is the baseline's (`mlgraph.models.baseline`); this module adds what the losses need
through the method protocol:

* `init_extra`: the observed matrix [N_train, C] of the training split (`training.observed`);
  for ROLE the label estimator Φ [N_train, C] (logits, Cole's initialisation) and its own Adam
  state at `config.loss.label_lr_mult` times the learning rate (Cole trains f and g with one
  Adam whose g group has 10x the lr: the same as two Adams, since both step every iteration);
  for EM+APL the per-class pseudo-negative quotas.
* `make_train_step`: the gradient of the loss with respect to the network and, for ROLE, to
  the batch's rows of Φ (a dense gradient: the other rows get zero, as torch's dense parameter).
* `epoch_end`: EM+APL's pseudo-labelling pass after each epoch from the warm-up on: the
  lowest-scored unknown entries of each class become pseudo-negatives −p in the observed
  matrix, which the next steps read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlgraph import losses, optim, pseudo_labels
from mlgraph.errors import ConfigError
from mlgraph.models.baseline import Baseline as Model  # noqa: F401 (the protocol's Model)

# `config.loss`: the SPML loss (`losses.SPML_LOSSES`, 'an' by default) and the fields its loss,
# ROLE's estimator and EM+APL's pseudo-labelling read.
Loss = losses.SinglePositiveLoss


def loss_fn(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`config.loss.name` of the logits against the batch's observed labels (`observed`; the
    full `labels` for 'full'), ROLE with the batch's label-estimator logits `label_logits`."""
    cfg = config.loss
    loss = losses.spml_loss(
        cfg.name,
        outputs["logits"],
        batch.get("observed", batch["labels"]),
        labels=batch["labels"],
        label_logits=batch.get("label_logits"),
        cfg=cfg,
    )
    return loss, {cfg.name: loss}


def _phi_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam (torch defaults, no decay) at label_lr_mult x the learning rate, for ROLE's Φ."""
    opt = config.optimizer
    return optax.adam(opt.lr * config.loss.label_lr_mult, b1=opt.b1, b2=opt.b2, eps=opt.eps)


def init_extra(config: ml_collections.ConfigDict, training) -> dict:
    """The observed labels, and ROLE's Φ with its optimizer state or EM+APL's quotas.

    Raises:
      ConfigError: a loss other than 'full' without observed labels (`config.data.observed`),
        or an unknown loss name.
    """
    name = config.loss.name
    if name not in losses.SPML_LOSSES:
        raise ConfigError(
            f"config.loss.name={name!r}: expected one of {', '.join(losses.SPML_LOSSES)}"
        )
    if training.observed is None:
        if name != "full":
            raise ConfigError(
                f"config.loss.name={name!r} trains on single positives: set "
                "config.data.observed ('cole' or 'scob'), or use the full-label oracle 'full'"
            )
        return {}
    observed = jnp.asarray(training.observed, jnp.float32)
    extra = {"observed": observed}
    if name == "role":
        phi = losses.role_init(observed, jax.random.key(config.seed + 2))
        extra["phi"] = phi
        extra["phi_opt"] = _phi_optimizer(config).init(phi)
    if name == "em_apl":
        quotas = pseudo_labels.apl_quotas(
            np.asarray(training.observed),
            int(np.ceil(config.num_epochs)),
            config.loss.warmup_epochs,
            config.loss.neg_proportion,
        )
        extra["apl_quotas"] = jnp.asarray(quotas, jnp.int32)
    return extra


def make_train_step(ctx):
    """One Adam step of the network (the loop's optimizer) and, for ROLE, of Φ."""
    lr_fn = optim.learning_rate_fn(ctx.config.optimizer, ctx.total_steps)
    role = ctx.config.loss.name == "role"
    phi_tx = _phi_optimizer(ctx.config) if role else None

    def train_step(state, batch):
        extra = state["extra"]
        index = batch["index"]
        if "observed" in extra:
            batch = dict(batch, observed=extra["observed"][index])
        params, rest = state["params"], state["rest"]
        if role:
            rows = {"label_logits": extra["phi"][index]}
            loss, aux, rest, (grads, row_grads) = ctx.loss_and_grads(
                params, rest, batch, state["step"], trainable=rows
            )
            # Scattered back into a dense gradient: rows outside the batch get zero, and Adam's
            # moments still move them, as for torch's dense parameter.
            phi_grad = jnp.zeros_like(extra["phi"]).at[index].add(row_grads["label_logits"])
            phi_updates, phi_opt = phi_tx.update(phi_grad, extra["phi_opt"], extra["phi"])
            extra = dict(extra, phi=optax.apply_updates(extra["phi"], phi_updates), phi_opt=phi_opt)
        else:
            loss, aux, rest, grads = ctx.loss_and_grads(params, rest, batch, state["step"])
        updates, opt = ctx.tx.update(grads, state["opt"], params)
        params = optax.apply_updates(params, updates)
        new = ctx.finish(state, params, rest, opt, extra=extra)
        return new, {"loss": loss, "lr": lr_fn(state["step"]), **aux}

    return train_step


def epoch_end(ctx, state: dict, epoch: int) -> dict:
    """EM+APL: after epoch `epoch` (counted from 1) >= warm-up, the pseudo-labelling pass over
    the training split (scored with the evaluation transform: Zhou's pass keeps the random flip,
    an augmentation mlgraph leaves out of scoring)."""
    cfg = ctx.config.loss
    if cfg.name != "em_apl" or epoch < cfg.warmup_epochs:
        return state
    scores = ctx.score(state)
    extra = state["extra"]
    observed = pseudo_labels.apl_pseudo_negatives(
        np.asarray(extra["observed"]), scores, np.asarray(extra["apl_quotas"])
    )
    sharding = extra["observed"].sharding
    return dict(state, extra=dict(extra, observed=jax.device_put(observed, sharding)))
