"""`python -m mlgraph.bench train --against torch`: the same model in plain PyTorch, with the
same weights, batch and precision, timed beside mlgraph's.

The torch models are the ones the parity tests check (`mlgraph.torch_reference`): SALGL with
the official `[B, C, N, A]` attention and the co-occurrence update inside the training forward;
SSGRL with the official mode switch (only layer4's batch norms in train mode); Query2Label with
FrozenBatchNorm2d; ML-GCN with its `GCNResnet` layout, timed through its transcribed official
loop (`mlgraph.torch_reference.mlgcn_train`: parameter groups, clipping). Their random
initial weights go through the method's converter (`mlgraph.convert.<method>`) into
mlgraph's train state, so both frameworks start from identical parameters, and the
parameters `config.optimizer.frozen` freezes in mlgraph (named through the converter's table)
get no gradient in torch. A torch train step is what the
official loop does per batch: forward (with the targets for SALGL), `config.loss`, backward,
the optimizer step (`config.optimizer.name`), and the EMA of every state entry when
`config.ema.decay` > 0; the eval forward runs without gradients in eval mode. Float32 on CPU;
on CUDA, bfloat16 autocast against mlgraph's `config.dtype`.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mlgraph import checkpointing, evaluation, models, sharding, train_state, train_step
from mlgraph.data import datasets
from mlgraph.errors import ConfigError
from mlgraph.torch_reference import require_torch


@dataclasses.dataclass(frozen=True)
class TorchMethod:
    """How one method's torch model is built, converted and run.

    Attributes:
      build: (config, num_classes, mlgraph's state) -> the torch model, randomly initialised
        (SSGRL takes its word vectors and graph from mlgraph's state).
      convert: (torch state dict as numpy, config, scratch folder) -> (mlgraph module, its
        conversion table: mlgraph path -> (torch key, transform)).
      train_loss: (torch model, images, targets, config) -> the training loss.
      eval_logits: (torch model, images) -> logits.
      official_step: (torch model, config) -> step(images, 0/1 targets) -> loss, one iteration
        of the method's transcribed official loop (`mlgraph.torch_reference.<method>_train`),
        timed in place of the generic step where that loop does more (ML-GCN's parameter
        groups and gradient clipping); None: the generic step.
    """

    build: Callable[..., Any]
    convert: Callable[..., tuple[nnx.Module, dict]]
    train_loss: Callable[..., Any]
    eval_logits: Callable[..., Any]
    official_step: Callable[..., Callable[[Any, Any], Any]] | None = None


def _salgl() -> TorchMethod:
    from mlgraph.convert import salgl as convert_salgl
    from mlgraph.torch_reference import salgl as reference

    def convert(sd, config, _scratch):
        opts = {
            "num_steps": config.model.num_steps,
            "num_heads": config.model.heads,
            "image_size": config.image_size,
        }
        module, _ = convert_salgl.convert({f"module.{k}": v for k, v in sd.items()}, opts)
        return module, convert_salgl.table(module)

    return TorchMethod(
        build=lambda config, c, _state: reference.from_config(config.model, c, config.image_size),
        convert=convert,
        train_loss=lambda tm, x, y, config: reference.salgl_loss(tm(x, y), y, config.loss),
        eval_logits=lambda tm, x: tm(x)["logits"],
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

    def official_step(tm, _config):
        loop = mlgcn_train.MLGCNLoop(tm)
        loop.start_epoch(0)
        return lambda x, y: loop.step(x, 2 * y - 1)  # the loaders' -1 / 1 targets

    return TorchMethod(
        build=build,
        convert=convert,
        train_loss=lambda tm, x, y, config: losses.classification(tm(x), y, config.loss),
        eval_logits=lambda tm, x: tm(x),
        official_step=official_step,
    )


METHODS: dict[str, Callable[[], TorchMethod]] = {
    "salgl": _salgl,
    "ssgrl": _ssgrl,
    "q2l": _q2l,
    "mlgcn": _mlgcn,
}


def _state_dict(tm) -> dict[str, np.ndarray]:
    """Parameters, buffers and the plain-tensor attributes SSGRL and ML-GCN keep, as numpy."""
    sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    for name in ("word_features", "in_matrix", "out_matrix", "inp"):
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


def build_pair(config, num_classes: int):
    """(torch model, mlgraph's (module, graphdef, tx, state, config)) with the same weights;
    the config is the one mlgraph's side was built from (float32 on CPU). The torch model's
    parameters that mlgraph freezes have `requires_grad` off.

    Raises:
      ConfigError: a method without a torch model, or torch not installed.
    """
    torch = require_torch()
    # The precision policy of both: float32 on CPU, the config's (bfloat16) on accelerators.
    if jax.default_backend() == "cpu" and config.get("dtype", "float32") != "float32":
        config = ml_collections.ConfigDict(config.to_dict())
        config.dtype = "float32"
    if config.model.name not in METHODS:
        raise ConfigError(
            f"--against torch: config.model.name={config.model.name!r} has no torch model; "
            f"one exists for {', '.join(METHODS)}"
        )
    method = METHODS[config.model.name]()
    b = config.batch_size
    observed = np.eye(num_classes, dtype=np.float32)[np.arange(b) % num_classes]
    training = datasets.TrainingSplit(range(b), num_classes, observed)
    # Every parameter comes from the torch model: mlgraph's are only shapes (initialising them
    # compiles the whole initialisation, minutes for a ResNet-101 on a CPU host); the buffers
    # (word vectors, graphs) are computed, which `method.build` reads.
    mod, graphdef, tx, abstract = train_state.abstract_train_state(
        config, num_classes, 1000, training
    )
    state = {"params": abstract["params"], "rest": _buffers(config, num_classes)}

    torch.manual_seed(config.seed)
    tm = method.build(config, num_classes, state)
    table = load_torch_weights(tm, method, config, state)
    freeze_like_mlgraph(tm, table, config.optimizer.frozen)
    extra = mod.init_extra(config, training) if hasattr(mod, "init_extra") else {}
    state = train_state.new_state(tx, state["params"], state["rest"], extra)
    return tm, (mod, graphdef, tx, state, config), method


def _buffers(config, num_classes: int):
    """The model's non-parameter state (buffers, batch statistics) as its constructor makes
    it, under one `jax.jit` whose parameter initialisers XLA drops as unused."""

    def rest():
        model = models.create(config, num_classes=num_classes, rngs=nnx.Rngs(config.seed))
        return nnx.split(model, nnx.Param, ...)[2]

    return jax.jit(rest)()


def load_torch_weights(tm, method: TorchMethod, config, state: dict) -> dict:
    """Fill mlgraph's train `state` (in place: params, rest, and the EMA as their copy) with the
    torch model's weights through the method's converter; returns its table (mlgraph path ->
    (torch key, transform)). The optimizer state is left for the caller to make."""
    with tempfile.TemporaryDirectory() as scratch:
        module, table = method.convert(_state_dict(tm), config, pathlib.Path(scratch))
    _, params, rest = nnx.split(module, nnx.Param, ...)
    state["params"] = checkpointing.fill_from(state["params"], params, "the torch model's weights")
    state["rest"] = checkpointing.fill_from(state["rest"], rest, "the torch model's buffers")
    state["ema"] = jax.tree.map(jnp.copy, {"params": state["params"], "rest": state["rest"]})
    return table


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
    function returning the loss: forward in train mode (bfloat16 autocast on CUDA), the loss,
    backward, the optimizer on the parameters with a gradient, and the EMA of every floating
    state entry when `config.ema.decay` > 0 (kept in a copy of the model); the method's
    `official_step` where it has one."""
    torch = require_torch()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda)
    if method.official_step is not None:
        official = method.official_step(tm, config)

        def step():
            with autocast:
                return official(x, y)

        return step
    tm.train()
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
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    b, s = config.batch_size, config.image_size
    rng = np.random.default_rng(0)
    images = rng.standard_normal((b, s, s, 3), np.float32)
    labels = (rng.random((b, num_classes)) < 0.1).astype(np.float32)
    labels[np.arange(b), np.arange(b) % num_classes] = 1.0

    # mlgraph
    state = jax.device_put(state, repl)
    state_sh = jax.tree.map(lambda _: repl, state)
    batch = jax.device_put(
        {"image": images, "labels": labels, "index": np.arange(b, dtype=np.int32)}, data_sh
    )
    step = jax.jit(
        train_step.make_train_step(mod, graphdef, tx, config, 1000),
        in_shardings=(state_sh, data_sh),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    holder = {"state": state}

    def jax_step():
        holder["state"], m = step(holder["state"], batch)
        return m["loss"]

    predict = jax.jit(
        evaluation.make_predict(graphdef, evaluation.live),
        in_shardings=(state_sh, data_sh),
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
