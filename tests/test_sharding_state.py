"""The train state's layout over the devices: the model whole on each, the optimizer's state
and the EMA split (ZeRO stage 1), and a step over 8 devices equal to the step on one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from train_helpers import load_config

from mlgraph import bench_compile, sharding, train_state, train_step


def _spec(s) -> PartitionSpec:
    return s.spec


def test_large_arrays_split_on_their_largest_divisible_dimension():
    mesh = sharding.make_mesh(jax.devices()[:8])
    split = sharding.sharded_over_data
    assert _spec(split(mesh, (3, 3, 32, 64))) == PartitionSpec(None, None, None, "data")
    assert _spec(split(mesh, (2048, 1000))) == PartitionSpec("data")
    # Of equal dimensions the first; no dimension divisible by 8, or too small: whole.
    assert _spec(split(mesh, (512, 512))) == PartitionSpec("data")
    assert _spec(split(mesh, (1001, 999))) == PartitionSpec()
    assert _spec(split(mesh, (64, 64))) == PartitionSpec()  # 4,096 < MIN_SHARDED_SIZE
    assert _spec(split(mesh, ())) == PartitionSpec()
    one = sharding.make_mesh(jax.devices()[:1])
    assert _spec(split(one, (2048, 1000))) == PartitionSpec()


def test_the_optimizer_state_and_ema_are_split_and_the_model_is_whole():
    mesh = sharding.make_mesh(jax.devices()[:8])
    big = jnp.zeros((256, 128))
    state = {
        "params": {"w": big},
        "rest": {"mean": jnp.zeros((128,))},
        "opt": ({"mu": {"w": big}, "count": jnp.zeros((), jnp.int32)},),
        "ema": {"params": {"w": big}, "rest": {"mean": jnp.zeros((128,))}},
        "step": jnp.zeros((), jnp.int32),
    }
    specs = jax.tree.map(_spec, sharding.state_shardings(mesh, state))
    assert specs == {
        "params": {"w": PartitionSpec()},
        "rest": {"mean": PartitionSpec()},
        "opt": ({"mu": {"w": PartitionSpec("data")}, "count": PartitionSpec()},),
        "ema": {"params": {"w": PartitionSpec("data")}, "rest": {"mean": PartitionSpec()}},
        "step": PartitionSpec(),
    }


def _run(devices: int, steps: int = 3):
    config = load_config("baseline_demo")
    config.image_size = 32
    config.batch_size = 8
    num_classes = 16
    mesh = sharding.make_mesh(jax.devices()[:devices])
    training = bench_compile.synthetic_training(8, num_classes)
    mod, graphdef, tx, state = train_state.init_train_state(config, num_classes, 100, training)
    state = jax.device_put(state, sharding.state_shardings(mesh, state))
    step = train_step.jit_train_step(mod, graphdef, tx, config, 100, mesh, state)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((8, 32, 32, 3), np.float32),
        "labels": (rng.random((8, num_classes)) < 0.3).astype(np.float32),
        "index": np.arange(8, dtype=np.int32),
    }
    batch = jax.device_put(batch, sharding.batch_sharded(mesh))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_a_step_over_eight_devices_holds_an_eighth_of_the_optimizer_and_equals_one_device():
    one, one_losses = _run(1)
    eight, eight_losses = _run(8)
    split = [
        x
        for x in jax.tree.leaves(eight["opt"])
        if x.size >= sharding.MIN_SHARDED_SIZE and any(d % 8 == 0 for d in x.shape)
    ]
    assert split, "no optimizer array is large enough to be split"
    for x in split:
        assert x.addressable_shards[0].data.size == x.size // 8
    for x in jax.tree.leaves(eight["params"]):
        assert x.addressable_shards[0].data.shape == x.shape
    # Float32 sums over 8 partial batches in another order: a few ulps per step in the loss.
    # Adam divides each gradient by its running RMS, so that noise in gradients near zero
    # reaches about 1 % of one step's update (measured: 2.8e-5 of updates ~3e-3 after 3 steps).
    np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5)
    for part in ("params", "ema"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4),
            eight[part],
            one[part],
        )
