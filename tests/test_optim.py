"""The one-cycle schedule (lr and Adam beta1 / SGD momentum) equals PyTorch's OneCycleLR step for
step; SGD with groups, clipping and freezing equals torch.optim.SGD."""

import ml_collections
import numpy as np
import pytest

from mlgraph import config_lib, optim, recipes, train_state, train_step

torch = pytest.importorskip("torch")


def torch_onecycle(total, max_lr, pct_start):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=total, pct_start=pct_start
    )
    lrs, b1s = [], []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        b1s.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    return np.array(lrs), np.array(b1s)


@pytest.mark.parametrize("total,pct", [(1000, 0.2), (51360, 0.2), (37, 0.3)])
def test_onecycle_matches_torch(total, pct):
    opt = config_lib.base_config().optimizer
    opt.lr, opt.pct_start = 1e-4, pct
    want_lr, want_b1 = torch_onecycle(total, 1e-4, pct)
    steps = np.unique(np.linspace(0, total - 1, 60).astype(int))
    steps = np.union1d(steps, [0, 1, int(pct * total) - 1, int(pct * total), total - 1])
    lr = np.array([float(optim.learning_rate_fn(opt, total)(s)) for s in steps])
    b1 = np.array([float(optim.beta1_fn(opt, total)(s)) for s in steps])
    np.testing.assert_allclose(lr, want_lr[steps], rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(b1, want_b1[steps], rtol=1e-6)
    # Spot values: 4e-6 at the start (div_factor 25), 4e-10 at the end (final_div_factor 1e4).
    assert lr[0] == pytest.approx(4e-6, rel=1e-5)
    assert lr[-1] == pytest.approx(4e-10, rel=1e-3)


def test_injected_b1_follows_schedule():
    """The optax state carries the scheduled beta1, as torch's param_groups do."""
    import jax.numpy as jnp
    from flax import nnx

    opt = config_lib.base_config().optimizer
    params = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optim.make_optimizer(opt, 100, params)
    state = tx.init(params)
    import jax

    grads = jax.tree.map(jnp.zeros_like, params)
    _, want_b1 = torch_onecycle(100, 1e-4, 0.2)
    for step in range(3):
        _, state = tx.update(grads, state, params)
        assert float(state.hyperparams["b1"]) == pytest.approx(want_b1[step], rel=1e-6)


def test_frozen_and_lr_mults():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Two(nnx.Module):
        def __init__(self):
            self.backbone = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
            self.head = nnx.Linear(2, 2, rngs=nnx.Rngs(1))

    params = nnx.state(Two(), nnx.Param)
    opt = ml_collections.ConfigDict(config_lib.base_config().optimizer.to_dict())
    opt.schedule, opt.weight_decay = "constant", 0.0
    opt.frozen = ("backbone/bias",)
    opt.lr_mults = (("backbone/kernel", 0.1),)
    tx = optim.make_optimizer(opt, 10, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    u = nnx.to_pure_dict(updates)
    np.testing.assert_allclose(u["backbone"]["bias"], 0.0)
    # Adam's first step moves every coordinate by lr (sign of the gradient).
    np.testing.assert_allclose(u["backbone"]["kernel"], -1e-5, rtol=1e-4)
    np.testing.assert_allclose(u["head"]["kernel"], -1e-4, rtol=1e-4)


def test_salgl_modes_select_parameters():
    """mode=part scales the backbone's lr by 0.1; mode=layer4 trains only layer4 and the head."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, seed):
            self.conv = nnx.Linear(2, 2, rngs=nnx.Rngs(seed))

    class Backbone(nnx.Module):
        def __init__(self):
            self.layer3 = Block(0)
            self.layer4 = Block(1)

    class Model(nnx.Module):
        def __init__(self):
            self.backbone = Backbone()
            self.classifier = nnx.Linear(2, 2, rngs=nnx.Rngs(2))

    params = nnx.state(Model(), nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    moved = {}
    for mode in ("full", "part", "layer4"):
        c = config_lib.base_config()
        c.optimizer.schedule, c.optimizer.weight_decay = "constant", 0.0
        recipes.apply_mode(c, mode)
        tx = optim.make_optimizer(c.optimizer, 10, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        u = nnx.to_pure_dict(updates)
        moved[mode] = {
            "layer3": float(np.abs(u["backbone"]["layer3"]["conv"]["kernel"]).max()),
            "layer4": float(np.abs(u["backbone"]["layer4"]["conv"]["kernel"]).max()),
            "head": float(np.abs(u["classifier"]["kernel"]).max()),
        }
    assert moved["full"] == pytest.approx({"layer3": 1e-4, "layer4": 1e-4, "head": 1e-4})
    assert moved["part"] == pytest.approx({"layer3": 1e-5, "layer4": 1e-5, "head": 1e-4})
    assert moved["layer4"] == pytest.approx({"layer3": 0.0, "layer4": 1e-4, "head": 1e-4})
    with pytest.raises(ValueError, match="mode 'all': expected full, part or layer4"):
        recipes.apply_mode(config_lib.base_config(), "all")


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_sgd_with_groups_clipping_and_freezing_matches_torch(schedule):
    """ML-GCN's optimizer: SGD (momentum 0.9, L2 1e-4), backbone at 0.1x, gradients clipped
    to norm 10 over the trained parameters (a frozen one is left out), five steps."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    class Two(nnx.Module):
        def __init__(self):
            self.backbone = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
            self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(1))

    model = Two()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=(8, 2)).astype(np.float32) * 5

    tb, th = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    with torch.no_grad():
        for t, m in ((tb, model.backbone), (th, model.head)):
            t.weight.copy_(torch.from_numpy(np.array(m.kernel[...]).T))
            t.bias.copy_(torch.from_numpy(np.array(m.bias[...])))
    tb.bias.requires_grad_(False)  # frozen
    total = 5
    topt = torch.optim.SGD(
        [{"params": [tb.weight], "lr": 0.01}, {"params": th.parameters(), "lr": 0.1}],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
    )
    sched = None
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            topt, max_lr=[0.01, 0.1], total_steps=total, pct_start=0.4
        )
    norms = []
    for _ in range(total):
        topt.zero_grad()
        loss = 100 * ((th(torch.relu(tb(torch.from_numpy(x)))) - torch.from_numpy(y)) ** 2).mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_([tb.weight, *th.parameters()], 10.0)))
        topt.step()
        if sched is not None:
            sched.step()
    assert max(norms) > 10  # the clip is active

    opt = ml_collections.ConfigDict(config_lib.base_config().optimizer.to_dict())
    opt.name, opt.lr, opt.weight_decay, opt.momentum = "sgd", 0.1, 1e-4, 0.9
    opt.schedule, opt.pct_start, opt.clip_grad_norm = schedule, 0.4, 10.0
    opt.frozen = ("backbone/bias",)
    opt.lr_mults = (("backbone/.*", 0.1),)
    params = nnx.state(model, nnx.Param)
    graphdef = nnx.graphdef(model)
    tx = optim.make_optimizer(opt, total, params)
    state = tx.init(params)

    def loss_fn(p):
        m = nnx.merge(graphdef, p)
        return 100 * jnp.mean((m.head(jax.nn.relu(m.backbone(x))) - y) ** 2)

    for _ in range(total):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    got = nnx.to_pure_dict(params)
    np.testing.assert_allclose(got["backbone"]["kernel"], tb.weight.detach().numpy().T, rtol=2e-5)
    np.testing.assert_allclose(got["backbone"]["bias"], tb.bias.detach().numpy(), rtol=0)
    np.testing.assert_allclose(got["head"]["kernel"], th.weight.detach().numpy().T, rtol=2e-5)
    np.testing.assert_allclose(got["head"]["bias"], th.bias.detach().numpy(), rtol=2e-5)


def test_only_trainable_parameters_are_differentiated_with_the_same_updates():
    """The default step differentiates the unfrozen parameters only: the same update as the
    full gradient through the masked optimizer, for less compute (no backbone backward)."""
    import jax
    import optax
    from flax import nnx

    c = recipes.demo_config()
    c.image_size, c.batch_size = 32, 4
    c.optimizer.frozen = ("backbone/.*",)
    c.loss = recipes.loss_config("baseline")
    c.model = recipes.model_config(
        "baseline", backbone="simple_cnn", backbone_kwargs={"widths": (8, 16, 32)}
    )
    c.init_from = ""
    mod, graphdef, tx, state = train_state.init_train_state(c, 5, 10)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
        "labels": (rng.random((4, 5)) < 0.4).astype(np.float32),
        "index": np.arange(4, dtype=np.int32),
    }
    step = jax.jit(train_step.make_train_step(mod, graphdef, tx, c, 10))
    new, _ = step(state, batch)

    def full_gradient_step(state, batch):  # what the step did before: grads of every param
        def loss_of(params):
            model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, state["rest"]))
            out = model(batch["image"], labels=batch["labels"], train=True)
            return mod.loss_fn(out, batch, c)[0]

        grads = jax.grad(loss_of)(state["params"])
        updates, _ = tx.update(grads, state["opt"], state["params"])
        return optax.apply_updates(state["params"], updates)

    old = jax.jit(full_gradient_step)(state, batch)
    leaves = zip(jax.tree.leaves(old), jax.tree.leaves(new["params"]), strict=True)
    for want, got in leaves:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-8)
    frozen, _ = optim.split_frozen(state["params"], c.optimizer)
    new_frozen, _ = optim.split_frozen(new["params"], c.optimizer)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(new_frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # No backward is traced through the frozen backbone, where the full gradient traces its
    # input and weight gradients too (XLA then drops the unused frozen ones, so the compiled
    # FLOPs were already the same: what changes is the traced program, not the work).
    def convolutions(jaxpr) -> int:
        count = 0
        for eqn in jaxpr.eqns:
            count += eqn.primitive.name == "conv_general_dilated"
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                count += convolutions(sub)
        return count

    step_fn = train_step.make_train_step(mod, graphdef, tx, c, 10)
    # simple_cnn (8, 16, 32): 3 stages of 2 convolutions; the full gradient adds 6 weight
    # gradients and 5 input gradients (the first layer's input is the image).
    assert convolutions(jax.make_jaxpr(step_fn)(state, batch).jaxpr) == 6
    assert convolutions(jax.make_jaxpr(full_gradient_step)(state, batch).jaxpr) == 6 + 6 + 5
