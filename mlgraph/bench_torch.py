"""`python -m mlgraph.bench train --against torch`: the same model in plain PyTorch, with the
same weights, batch and precision, timed beside mlgraph's.

The torch models are the ones the parity tests check (`mlgraph.torch_reference`): SALGL with
the official `[B, C, N, A]` attention and the co-occurrence update inside the training forward;
SSGRL with the official mode switch (only layer4's batch norms in train mode); Query2Label with
FrozenBatchNorm2d; SigRL's CLIPVIT (its label table and frozen CLIP teacher beside it); ML-GCN
with its `GCNResnet` layout; Scob and the single-positive baselines (Cole et al.'s AN and ROLE,
Zhou et al.'s EM and EM+APL). Their random initial weights go through the method's converter
(`mlgraph.convert.<method>`) into mlgraph's train state, so both frameworks start from
identical parameters, and the parameters `config.optimizer.frozen` freezes in mlgraph (named
through the converter's table) get no gradient in torch. A torch train step is what the
official loop does per batch: forward (with the targets for SALGL), `config.loss`, backward,
the optimizer step (`config.optimizer.name`), and the EMA of every state entry when
`config.ema.decay` > 0. SALGL, SigRL, ML-GCN, Scob and the single-positive baselines time
their training transcriptions' step instead (`mlgraph.torch_reference.salgl_train`: AdamW,
OneCycle and the EMA per step; `sigrl_train`: the layer-decay AdamW groups, the per-iteration
schedule, the teacher's forward and the ranking + distillation loss; `mlgcn_train`: the
parameter groups and the gradient clipping; `scob_train`: Scob's two updates with the
Grad-CAM++ masks between them and the bank after them; `spml_train`: Cole's and Zhou's loops,
with the label matrix). The eval forward runs without gradients in eval mode. Float32 on CPU;
on CUDA, bfloat16 autocast against mlgraph's `config.dtype`.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from mlgraph import (
    bench_compile,
    evaluation,
    sharding,
    train_state,
    train_step,
)
from mlgraph.data import datasets
from mlgraph.errors import ConfigError
from mlgraph.torch_reference import require_torch

# The run length both sides' schedules are built for (longer than any timed run).
BENCH_TOTAL = 1000


@dataclasses.dataclass(frozen=True)
class TorchMethod:
    """How one method's torch model is built, converted and run.

    Attributes:
      build: (config, num_classes, mlgraph's state) -> the torch model, randomly initialised
        (SSGRL takes its word vectors and graph from mlgraph's state).
      convert: (torch state dict as numpy, config, scratch folder) -> (mlgraph module, its
        conversion table: mlgraph path -> (torch key, transform)).
      train_loss: (torch model, images, targets, config) -> the training loss (None for a
        method whose loss only its `make_step` computes).
      eval_logits: (torch model, images) -> logits.
      make_step: (torch model, config, images, targets) -> a function running one step of the
        method's training transcription (`mlgraph.torch_reference.<method>_train`) and
        returning its loss; None: the generic step of `make_torch_step`.
    """

    build: Callable[..., Any]
    convert: Callable[..., tuple[nnx.Module, dict]]
    train_loss: Callable[..., Any] | None
    eval_logits: Callable[..., Any]
    make_step: Callable[..., Callable[[], Any]] | None = None


def _salgl() -> TorchMethod:
    from mlgraph.convert import salgl as convert_salgl
    from mlgraph.torch_reference import salgl as reference
    from mlgraph.torch_reference import salgl_train

    def convert(sd, config, _scratch):
        opts = {
            "num_steps": config.model.num_steps,
            "num_heads": config.model.heads,
            "image_size": config.image_size,
        }
        module, _ = convert_salgl.convert({f"module.{k}": v for k, v in sd.items()}, opts)
        return module, convert_salgl.table(module)

    def make_step(tm, _config, x, y):
        # The transcription's OneCycle must outlast the timed steps: one epoch of BENCH_TOTAL.
        trainer = salgl_train.Trainer(tm, BENCH_TOTAL, salgl_train.Args(max_epochs=1))
        return lambda: trainer.step(x, y)

    return TorchMethod(
        build=lambda config, c, _state: reference.from_config(config.model, c, config.image_size),
        convert=convert,
        train_loss=lambda tm, x, y, config: reference.salgl_loss(tm(x, y), y, config.loss),
        eval_logits=lambda tm, x: tm(x)["logits"],
        make_step=make_step,
    )


def _ssgrl() -> TorchMethod:
    from mlgraph.convert import ssgrl as convert_ssgrl
    from mlgraph.torch_reference import losses
    from mlgraph.torch_reference import ssgrl as reference

    def build(config, c, state):
        rest = state["rest"]
        words, graph = np.asarray(rest["word_features"][...]), np.asarray(rest["graph"][...])
        return reference.from_config(config.model, c, words, graph)

    def convert(sd, config, scratch: pathlib.Path):
        # The official checkpoints hold neither: the converter reads them from files.
        np.save(scratch / "vectors.npy", sd.pop("word_features"))
        np.save(scratch / "graph.npy", sd.pop("in_matrix"))
        sd.pop("out_matrix")
        opts = {
            "embed_path": str(scratch / "vectors.npy"),
            "graph_path": str(scratch / "graph.npy"),
            "image_size": config.image_size,
            "reset_uses_update_u": config.model.reset_uses_update_u,
        }
        module, _ = convert_ssgrl.convert(sd, opts)
        return module, convert_ssgrl.table(module)

    return TorchMethod(
        build=build,
        convert=convert,
        train_loss=lambda tm, x, y, config: losses.classification(tm(x), y, config.loss),
        eval_logits=lambda tm, x: tm(x),
    )


def _q2l() -> TorchMethod:
    from mlgraph.convert import q2l as convert_q2l
    from mlgraph.torch_reference import losses
    from mlgraph.torch_reference import q2l as reference

    def convert(sd, config, _scratch):
        opts = {"num_heads": config.model.num_heads, "image_size": config.image_size}
        module, _ = convert_q2l.convert(sd, opts)
        return module, convert_q2l.table(module)

    return TorchMethod(
        build=lambda config, c, _state: reference.from_config(config.model, c, config.image_size),
        convert=convert,
        train_loss=lambda tm, x, y, config: losses.classification(tm(x), y, config.loss),
        eval_logits=lambda tm, x: tm(x),
    )


def _sigrl() -> TorchMethod:
    from mlgraph import models
    from mlgraph.convert import sigrl as convert_sigrl
    from mlgraph.torch_reference import sigrl as reference
    from mlgraph.torch_reference import sigrl_train

    torch = require_torch()

    def build(config, _c, state):
        tm = reference.from_config(config.model, config.image_size)
        # The label table rides along as a plain attribute (SigRL reads label_emb.pt apart),
        # the seen labels first, as NUS-WIDE's; `_state_dict` hands it to `convert`.
        tm.label_emb = torch.from_numpy(np.array(state["rest"]["label_embeddings"][...]))
        tm.num_seen = int(np.asarray(state["extra"]["seen_ids"]).size)
        return tm

    def convert(sd, config, scratch: pathlib.Path):
        np.save(scratch / "labels.npy", sd.pop("label_emb"))
        opts = {
            "label_embeddings": str(scratch / "labels.npy"),
            "num_heads": dict(config.model.backbone_kwargs).get("num_heads", 0),
            "topk": config.model.topk,
            "image_size": config.image_size,
        }
        module, _ = convert_sigrl.convert(sd, opts)
        # The converted model has no teacher; mlgraph's is filled from the loaded tower, as
        # `config.init_from` does (`Model.fill_teacher`), in a model built abstractly.
        c = module.label_embeddings.shape[0]
        model = nnx.eval_shape(lambda: models.create(config, num_classes=c, rngs=nnx.Rngs(0)))
        nnx.update(model, nnx.state(module))
        model.fill_teacher()
        return model, convert_sigrl.table(module)

    teachers = weakref.WeakKeyDictionary()

    def teacher_of(tm):
        # The frozen CLIP teacher: the student's weights before its first step.
        if tm not in teachers:
            teachers[tm] = sigrl_train.frozen_copy(tm)
        return teachers[tm]

    def seen_labels(tm, y):
        # SigRL's labels: +1 / -1 over the seen tags.
        return 2 * y[:, : tm.num_seen] - 1

    def train_loss(tm, x, y, _config):
        logits, _, glob = tm(x, tm.label_emb[: tm.num_seen].to(x.device))
        with torch.no_grad():
            target = teacher_of(tm).encode_image(x)[1]
        rank = reference.ranking_lossT(logits, seen_labels(tm, y))
        return rank + torch.nn.functional.l1_loss(glob, target)

    def make_step(tm, config, x, y):
        args = sigrl_train.Args(
            epochs=1, warmup_epochs=0, fix_layer=config.model.teacher_from_block,
            num_seen=tm.num_seen,
        )  # fmt: skip
        teacher = teacher_of(tm)
        optimizer = sigrl_train.build_optimizer(args, tm)
        batch, table = [(x, seen_labels(tm, y))], tm.label_emb.to(x.device)

        def step():
            losses, _ = sigrl_train.train_one_epoch(tm, teacher, args, optimizer, batch, table, 0)
            return losses[0]

        return step

    return TorchMethod(
        build=build,
        convert=convert,
        train_loss=train_loss,
        eval_logits=lambda tm, x: tm(x, tm.label_emb.to(x.device))[0],
        make_step=make_step,
    )


def _mlgcn() -> TorchMethod:
    from mlgraph.convert import mlgcn as convert_mlgcn
    from mlgraph.torch_reference import losses, mlgcn_train
    from mlgraph.torch_reference import mlgcn as reference

    def build(config, _c, state):
        rest = state["rest"]
        a, words = np.asarray(rest["A"][...]), np.asarray(rest["embeddings"][...])
        return reference.from_config(config.model, a, words)

    def convert(sd, config, scratch: pathlib.Path):
        # The official checkpoints hold no word vectors: the converter reads them from a file.
        np.save(scratch / "words.npy", sd.pop("inp"))
        opts = {"embed_path": str(scratch / "words.npy"), "image_size": config.image_size}
        module, _ = convert_mlgcn.convert(sd, opts)
        return module, convert_mlgcn.table(module)

    def make_step(tm, _config, x, y):
        loop = mlgcn_train.MLGCNLoop(tm)
        loop.start_epoch(0)
        return lambda: loop.step(x, 2 * y - 1)  # the loaders' -1 / 1 targets

    return TorchMethod(
        build=build,
        convert=convert,
        train_loss=lambda tm, x, y, config: losses.classification(tm(x), y, config.loss),
        eval_logits=lambda tm, x: tm(x),
        make_step=make_step,
    )


def _with_label_matrix(tm, extra: dict):
    """`tm` with its label estimator `g.logits` set to mlgraph's Phi (`extra["phi"]`, when the
    method keeps one), so that both start from the matrix mlgraph initialised."""
    if "phi" in extra:
        torch = require_torch()
        with torch.no_grad():
            tm.g.logits.copy_(torch.from_numpy(np.array(extra["phi"])))
    return tm


def _loop_iteration(trainer, x, loss_of=lambda out: out) -> Callable[[], Any]:
    """One iteration of an official loop (`trainer.train_iter`) on the timed batch `x`, whose
    images are the training rows 0..B-1; returns its loss (`loss_of` its record)."""
    indices = require_torch().arange(x.shape[0])
    return lambda: loss_of(trainer.train_iter(x, indices))


def _scob() -> TorchMethod:
    from mlgraph.convert import scob as convert_scob
    from mlgraph.torch_reference import scob as reference
    from mlgraph.torch_reference import scob_train

    def build(config, c, state):
        n = len(state["extra"]["observed"])
        return _with_label_matrix(reference.from_config(config.model, c, n), state["extra"])

    def convert(sd, config, _scratch):
        opts = {"image_size": config.image_size, "num_heads": config.model.num_heads}
        module, _, _ = convert_scob.convert(sd, opts)
        return module, convert_scob.table(module, config.model.num_layers)

    def make_step(tm, config, x, _y):
        observed = bench_compile.synthetic_training(
            x.shape[0], tm.fh.classifier.out_features
        ).observed
        settings = scob_train.ScobSettings.from_config(config)
        trainer = scob_train.ScobTrainer(tm, observed, settings)
        trainer.before_epoch()
        return _loop_iteration(trainer, x, lambda out: out["classification"])

    return TorchMethod(
        build=build,
        convert=convert,
        train_loss=None,
        eval_logits=lambda tm, x: tm(x),
        make_step=make_step,
    )


def _spml() -> TorchMethod:
    from mlgraph import models
    from mlgraph.convert import core, torchvision_resnet
    from mlgraph.torch_reference import spml_train

    def build(config, c, state):
        n = len(state["extra"]["observed"])
        return _with_label_matrix(spml_train.from_config(config.model, c, n), state["extra"])

    def convert(sd, config, _scratch):
        c = sd["f.linear_classifier.weight"].shape[0]
        module = nnx.eval_shape(lambda: models.create(config, num_classes=c, rngs=nnx.Rngs(0)))
        trunk = torchvision_resnet.table(module.backbone, prefix="f.feature_extractor.")
        table = {f"backbone/{k}": v for k, v in trunk.items()}
        table |= core.linear("head", "f.linear_classifier")
        ignored = [r".*num_batches_tracked", r"g\.logits"]
        core.load_into(module, sd, table, ignored=ignored, source="the torch SPML model")
        return module, table

    def make_step(tm, config, x, _y):
        c = tm.f.linear_classifier.out_features
        observed = bench_compile.synthetic_training(x.shape[0], c).observed
        settings = spml_train.SpmlSettings.from_config(config)
        trainer = spml_train.SpmlTrainer(tm, observed, settings)
        tm.train()  # the loop's `run_train_phase`
        return _loop_iteration(trainer, x)

    return TorchMethod(
        build=build,
        convert=convert,
        train_loss=None,
        eval_logits=lambda tm, x: tm(x),
        make_step=make_step,
    )


METHODS: dict[str, Callable[[], TorchMethod]] = {
    "salgl": _salgl,
    "ssgrl": _ssgrl,
    "q2l": _q2l,
    "sigrl": _sigrl,
    "mlgcn": _mlgcn,
    "scob": _scob,
    "spml": _spml,
}


def _state_dict(tm) -> dict[str, np.ndarray]:
    """Parameters, buffers and the plain-tensor attributes SSGRL, SigRL and ML-GCN keep, as
    numpy."""
    sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    for name in ("word_features", "in_matrix", "out_matrix", "label_emb", "inp"):
        if hasattr(tm, name):
            sd[name] = getattr(tm, name).numpy().copy()
    return sd


def freeze_like_mlgraph(tm, table: dict, frozen_patterns) -> int:
    """Turn off the gradient of every torch parameter whose mlgraph path (through the
    converter's `table`) matches `config.optimizer.frozen`; returns the number of values left
    trainable."""
    patterns = [re.compile(p) for p in frozen_patterns]
    frozen_keys = {
        key for path, (key, _) in table.items() if any(r.fullmatch(path) for r in patterns)
    }
    for name, p in tm.named_parameters():
        p.requires_grad_(name not in frozen_keys)
    return sum(p.numel() for p in tm.parameters() if p.requires_grad)


def _precision(config):
    """The precision policy of both sides: float32 on CPU, the config's (bfloat16) on
    accelerators."""
    if jax.default_backend() == "cpu" and config.get("dtype", "float32") != "float32":
        config = ml_collections.ConfigDict(config.to_dict())
        config.dtype = "float32"
    return config


def torch_method(config) -> TorchMethod:
    """The `TorchMethod` of `config.model.name`.

    Raises:
      ConfigError: a method without a torch model, or torch not installed.
    """
    require_torch()
    if config.model.name not in METHODS:
        raise ConfigError(
            f"--against torch: config.model.name={config.model.name!r} has no torch model; "
            f"one exists for {', '.join(METHODS)}"
        )
    return METHODS[config.model.name]()


def build_pair(
    config,
    num_classes: int,
    total: int = BENCH_TOTAL,
    training: datasets.TrainingSplit | None = None,
):
    """(torch model, mlgraph's (module, graphdef, tx, state, config)) with the same weights
    (`mlgraph_side`), the torch model randomly initialised (seed `config.seed`); `training`
    defaults to the batch as the training set (`bench_compile.synthetic_training`).

    Raises:
      ConfigError: a method without a torch model, or torch not installed.
    """
    torch = require_torch()
    config = _precision(config)
    method = torch_method(config)
    if training is None:
        training = bench_compile.synthetic_training(config.batch_size, num_classes)
    # A freshly initialised state: SSGRL's torch model takes its word vectors and graph from it.
    _, _, _, state = train_state.init_train_state(config, num_classes, total, training)
    torch.manual_seed(config.seed)
    tm = method.build(config, num_classes, state)
    return tm, mlgraph_side(tm, method, config, num_classes, total, training), method


def converted(tm, method: TorchMethod, config) -> tuple[nnx.Module, dict]:
    """The torch model `tm`'s weights through the method's converter: (mlgraph module, its
    table: mlgraph path -> (torch key, transform))."""
    with tempfile.TemporaryDirectory() as scratch:
        return method.convert(_state_dict(tm), config, pathlib.Path(scratch))


def mlgraph_side(tm, method: TorchMethod, config, num_classes: int, total: int, training):
    """mlgraph's (module, graphdef, tx, state, config) starting from the torch model `tm`'s
    weights through the method's converter (nothing initialised), its optimizer built for a
    run of `total` steps on `training`; the config is the one it was built from (float32 on
    CPU). The torch model's parameters that mlgraph freezes get `requires_grad` off."""
    config = _precision(config)
    module, table = converted(tm, method, config)
    freeze_like_mlgraph(tm, table, config.optimizer.frozen)
    _, params, rest = nnx.split(module, nnx.Param, ...)
    mod, graphdef, tx, state = train_state.init_train_state(
        config, num_classes, total, training, weights=(params, rest)
    )
    return mod, graphdef, tx, state, config


def _timed(fn, n: int, sync) -> float:
    for _ in range(2):
        out = fn()
    sync(out)
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    sync(out)
    return (time.perf_counter() - t0) / n


def torch_optimizer(torch, params, opt):
    """The torch optimizer of `config.optimizer` ('adamw', 'adam' or 'sgd'; learning-rate
    schedules and multipliers do not change a step's cost and are left out).

    Raises:
      ConfigError: another optimizer name.
    """
    if opt.name == "adamw":
        return torch.optim.AdamW(
            params, lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps, weight_decay=opt.weight_decay
        )
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps)
    if opt.name == "sgd":
        return torch.optim.SGD(
            params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
    raise ConfigError(
        f"--against torch: config.optimizer.name={opt.name!r}: expected adamw, adam or sgd"
    )


def make_torch_step(tm, method: TorchMethod, config, x, y) -> Callable[[], Any]:
    """One official training step of `tm` on images `x` [B, 3, H, W] and targets `y`, as a
    function returning the loss (bfloat16 autocast on CUDA): the method's training
    transcription's step where it has one (`TorchMethod.make_step`), else forward in train
    mode, the loss, backward, the optimizer on the parameters with a gradient, and the EMA of
    every floating state entry when `config.ema.decay` > 0 (kept in a copy of the model)."""
    torch = require_torch()
    tm.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda)
    if method.make_step is not None:
        transcribed = method.make_step(tm, config, x, y)

        def step():
            with autocast:
                return transcribed()

        return step
    optimizer = torch_optimizer(
        torch, [p for p in tm.parameters() if p.requires_grad], config.optimizer
    )
    decay = config.ema.decay
    ema = copy.deepcopy(tm) if decay > 0 else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = method.train_loss(tm, x, y, config)
        loss.backward()
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for e, m in zip(ema.state_dict().values(), tm.state_dict().values(), strict=True):
                    if e.dtype.is_floating_point:
                        e.mul_(decay).add_(m, alpha=1 - decay)
        return loss

    return step


def bench_against_torch(config, steps: int, num_classes: int) -> dict[str, float]:
    """Train-step and eval-forward images/s of mlgraph and of the torch model, and mlgraph's
    speed as a multiple of torch's (> 1: mlgraph is faster)."""
    torch = require_torch()
    tm, (mod, graphdef, tx, state, config), method = build_pair(config, num_classes)
    mesh = sharding.make_mesh()
    data_sh = sharding.batch_sharded(mesh)
    b, s = config.batch_size, config.image_size
    rng = np.random.default_rng(0)
    images = rng.standard_normal((b, s, s, 3), np.float32)
    labels = (rng.random((b, num_classes)) < 0.1).astype(np.float32)
    labels[np.arange(b), np.arange(b) % num_classes] = 1.0

    # mlgraph
    state = jax.device_put(state, sharding.state_shardings(mesh, state))
    batch = jax.device_put(
        {"image": images, "labels": labels, "index": np.arange(b, dtype=np.int32)}, data_sh
    )
    step = train_step.jit_train_step(mod, graphdef, tx, config, BENCH_TOTAL, mesh, state)
    holder = {"state": state}

    def jax_step():
        holder["state"], m = step(holder["state"], batch)
        return m["loss"]

    predict = jax.jit(
        evaluation.make_predict(graphdef, evaluation.live),
        in_shardings=(sharding.shardings_of(state), data_sh),
        out_shardings=(data_sh,),
    )
    ready = jax.block_until_ready
    jax_train = _timed(jax_step, steps, ready)
    jax_eval = _timed(lambda: predict(holder["state"], batch["image"]), steps, ready)

    # torch, the official loop's step
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tm = tm.to(device)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    y = torch.from_numpy(labels).to(device)
    torch_step = make_torch_step(tm, method, config, x, y)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def torch_eval():
        with torch.no_grad(), autocast:
            return method.eval_logits(tm, x)

    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    torch_train = _timed(torch_step, steps, sync)
    tm.eval()
    torch_eval_s = _timed(torch_eval, steps, sync)
    return {
        "batch": b,
        "image_size": s,
        "torch_threads": torch.get_num_threads(),
        "mlgraph_train_images_per_s": b / jax_train,
        "torch_train_images_per_s": b / torch_train,
        "train_speedup": torch_train / jax_train,
        "mlgraph_eval_images_per_s": b / jax_eval,
        "torch_eval_images_per_s": b / torch_eval_s,
        "eval_speedup": torch_eval_s / jax_eval,
    }
