"""`python -m mlgraph.bench train --against torch`: the same model in plain PyTorch, with the
same weights, batch and precision, timed beside mlgraph's.

The torch model is the one the parity tests check (`mlgraph.torch_reference`): for SALGL the
official structure, its `[B, C, N, A]` attention and the co-occurrence update inside the
training forward. Its random initial weights are converted with `mlgraph.convert.salgl` into
mlgraph's train state, so both frameworks start from identical parameters. A torch train step
is what the official loop does per batch: forward with the targets, ASL + the scene-entropy
terms, backward, AdamW, and the EMA of every state entry; the eval forward runs without
gradients in eval mode. Float32 on CPU; on CUDA, bfloat16 autocast against mlgraph's
`config.dtype`.
"""

from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mlgraph import init_from, sharding, train
from mlgraph.data import datasets
from mlgraph.errors import ConfigError
from mlgraph.torch_reference import require_torch

METHODS = ("salgl",)


def build_pair(config, num_classes: int):
    """(torch model, mlgraph's (module, graphdef, tx, state, config)) with the same weights;
    the config is the one mlgraph's side was built from (float32 on CPU).

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
    from mlgraph.convert import salgl as convert_salgl
    from mlgraph.torch_reference import salgl as salgl_reference

    torch.manual_seed(config.seed)
    tm = salgl_reference.from_config(config.model, num_classes, config.image_size)
    sd = {f"module.{k}": v.detach().numpy() for k, v in tm.state_dict().items()}
    module, _ = convert_salgl.convert(
        sd,
        {
            "num_steps": config.model.num_steps,
            "num_heads": config.model.heads,
            "image_size": config.image_size,
        },
    )
    _, params, rest = nnx.split(module, nnx.Param, ...)
    b = config.batch_size
    observed = np.eye(num_classes, dtype=np.float32)[np.arange(b) % num_classes]
    training = datasets.TrainingSplit(range(b), num_classes, observed)
    mod, graphdef, tx, state = train.init_train_state(config, num_classes, 1000, training)
    state["params"] = init_from.fill_from(state["params"], params, "the torch model's weights")
    state["rest"] = init_from.fill_from(state["rest"], rest, "the torch model's buffers")
    state["opt"] = tx.init(state["params"])
    state["ema"] = jax.tree.map(jnp.copy, {"params": state["params"], "rest": state["rest"]})
    return tm, (mod, graphdef, tx, state, config)


def _timed(fn, n: int, sync) -> float:
    for _ in range(2):
        out = fn()
    sync(out)
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    sync(out)
    return (time.perf_counter() - t0) / n


def bench_against_torch(config, steps: int, num_classes: int) -> dict[str, float]:
    """Train-step and eval-forward images/s of mlgraph and of the torch model, and mlgraph's
    speed as a multiple of torch's (> 1: mlgraph is faster)."""
    torch = require_torch()
    tm, (mod, graphdef, tx, state, config) = build_pair(config, num_classes)
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
        train.make_train_step(mod, graphdef, tx, config, 1000),
        in_shardings=(state_sh, data_sh),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    holder = {"state": state}

    def jax_step():
        holder["state"], m = step(holder["state"], batch)
        return m["loss"]

    predict = jax.jit(
        train.make_predict(graphdef, lambda st: ((st["params"], st["rest"]),)),
        in_shardings=(state_sh, data_sh),
        out_shardings=(data_sh,),
    )
    ready = jax.block_until_ready
    jax_train = _timed(jax_step, steps, ready)
    jax_eval = _timed(lambda: predict(holder["state"], batch["image"]), steps, ready)

    # torch, the official loop's step
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tm = tm.to(device).train()
    ema = copy.deepcopy(tm)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    y = torch.from_numpy(labels).to(device)
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        tm.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps,
        weight_decay=opt.weight_decay,
    )  # fmt: skip
    decay = config.ema.decay
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    from mlgraph.torch_reference.salgl import salgl_loss

    def torch_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = salgl_loss(tm(x, y), y, config.loss.lamda)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for e, m in zip(ema.state_dict().values(), tm.state_dict().values(), strict=True):
                if e.dtype.is_floating_point:
                    e.mul_(decay).add_(m, alpha=1 - decay)
        return loss

    def torch_eval():
        with torch.no_grad(), autocast:
            return tm(x)["logits"]

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
