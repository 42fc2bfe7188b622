"""Scob (mlgraph.models.scob): parity of its transformers and heads with plain torch, its
Grad-CAM++ against numpy, the prototype bank's rules and the InfoNCE against hand-computed
values, torch Adam's skip-on-None semantics per group, the official checkpoint converter, the
parameter counts of docs/scob_spml.md §3.2, and a tiny run that stops and resumes exactly."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgraph import losses, optim, train_state
from mlgraph.convert import core
from mlgraph.convert import scob as convert_scob
from mlgraph.models import cam, scob

torch = pytest.importorskip("torch")
from scob_reference import official_checkpoint  # noqa: E402
from train_helpers import final_run  # noqa: E402

from mlgraph.torch_reference.scob import (  # noqa: E402
    TorchClassifier,
    TorchImageMid,
    TorchProjector,
    TorchScob,
)

D, HEADS, FFN = 32, 4, 64


def _to_torch(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x))


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def _fill(module: nnx.Module, state_dict, table) -> None:
    sd = {k: v.detach().numpy() for k, v in state_dict.items()}
    core.load_into(module, sd, table, ignored=[r".*(linear_parts|transformer_parts)\..*"])


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "masked"])
def test_image_mid_projector_classifier_match_torch(masked):
    torch.manual_seed(0)
    t32, t16 = TorchImageMid(48, D, HEADS, FFN).eval(), TorchImageMid(24, D, HEADS, FFN).eval()
    t_proj, t_cls = TorchProjector(2 * D).eval(), TorchClassifier(5, 2 * D).eval()
    rngs = nnx.Rngs(1)
    m32 = scob.ImageMid(48, D, HEADS, 2, FFN, rngs=rngs)
    m16 = scob.ImageMid(24, D, HEADS, 2, FFN, rngs=rngs)
    proj = scob.Projector(2 * D, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    cls = nnx.Linear(2 * D, 5, rngs=rngs)
    _fill(m32, t32.state_dict(), _mid(2))
    _fill(m16, t16.state_dict(), _mid(2))
    _fill(
        proj,
        t_proj.state_dict(),
        core.linear("projector1", "projector1") | core.linear("projector2", "projector2"),
    )
    _fill(cls, t_cls.state_dict(), {k[2:]: v for k, v in core.linear("X", "classifier").items()})

    rng = np.random.default_rng(0)
    x32 = rng.normal(size=(3, 48, 4, 4)).astype(np.float32)
    x16 = rng.normal(size=(3, 24, 8, 8)).astype(np.float32)
    s32 = s16 = None
    if masked:  # every image keeps at least one key at each scale
        s32 = rng.random((3, 4, 4)) < 0.4
        s16 = rng.random((3, 8, 8)) < 0.4
        s32[:, 1, 1] = s16[:, 2, 3] = True
    with torch.no_grad():
        ignore = lambda s: None if s is None else _to_torch(~s)
        h_t = torch.cat([t32(_to_torch(x32), ignore(s32)), t16(_to_torch(x16), ignore(s16))], 1)
        logits_t, proj_t = t_cls(h_t).numpy(), t_proj(h_t).numpy()
    nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1))  # noqa: E731
    h = jnp.concatenate([m32(nhwc(x32), s32), m16(nhwc(x16), s16)], axis=-1)
    assert _rel(cls(h), logits_t) < 1e-4
    assert _rel(proj(h), proj_t) < 1e-4
    assert _rel(h, h_t.numpy()) < 1e-4


def _mid(num_layers: int):
    """An ImageMid table over keys without a prefix (the module itself)."""
    t = convert_scob.mid_table("X", "X", num_layers)
    return {k[2:]: (v[0][2:], v[1]) for k, v in t.items()}


def test_fully_masked_image_is_nan_in_torch_and_uniform_here():
    torch.manual_seed(0)
    t = TorchImageMid(8, D, HEADS, FFN).eval()
    m = scob.ImageMid(8, D, HEADS, 2, FFN, rngs=nnx.Rngs(0))
    _fill(m, t.state_dict(), _mid(2))
    x = np.random.default_rng(1).normal(size=(1, 8, 3, 3)).astype(np.float32)
    salient = np.zeros((1, 3, 3), bool)
    with torch.no_grad():
        assert torch.isnan(t(_to_torch(x), _to_torch(~salient))).all()
    out = m(jnp.asarray(x.transpose(0, 2, 3, 1)), salient)
    assert np.isfinite(np.asarray(out)).all()


# ------------------------------------------------------------------------------ Grad-CAM++
def _numpy_resize_linear(img: np.ndarray, size: int) -> np.ndarray:
    """OpenCV INTER_LINEAR upsampling of [h, w] to [size, size]: half-pixel centres, borders
    clamped."""

    def weights(n_in):
        x = (np.arange(size) + 0.5) * n_in / size - 0.5
        x = np.clip(x, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, x - lo

    ylo, yhi, fy = weights(img.shape[0])
    xlo, xhi, fx = weights(img.shape[1])
    top = img[ylo][:, xlo] * (1 - fx) + img[ylo][:, xhi] * fx
    bottom = img[yhi][:, xlo] * (1 - fx) + img[yhi][:, xhi] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def _numpy_gradcam_pp(a: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """docs/scob_spml.md §3.3 steps 3-4 on one image's [K, h, w] activations and gradients."""
    s = a.sum(axis=(1, 2))
    alpha = g**2 / (2 * g**2 + s[:, None, None] * g**3 + 1e-6)
    alpha = np.where(g != 0, alpha, 0)
    w = (np.maximum(g, 0) * alpha).sum(axis=(1, 2))
    return w, np.maximum((w[:, None, None] * a).sum(0), 0)


def _numpy_scale(x):
    x = x - x.min()
    return x / (1e-7 + x.max())


def test_gradcam_plus_plus_and_masks_match_numpy():
    # A linear head over the flattened layer4 map: score_b = sigmoid(<V_y, A_b> + c_y), so
    # dp/dA = p (1 - p) V_y, with both signs across positions and channels.
    rng = np.random.default_rng(0)
    b, h, k, size = 3, 4, 6, 128
    acts = np.maximum(rng.normal(size=(b, h, h, k)), 0).astype(np.float32)
    acts[:, 0, 0, 0] = 0.0  # a zero gradient entry below (V = 0 there)
    v = (0.1 * rng.normal(size=(2, h, h, k))).astype(np.float32)
    v[:, 0, 0, 0] = 0.0
    c = np.array([0.3, -0.2], np.float32)
    y = np.array([0, 1, 1])

    def total(a):
        score = jnp.einsum("bhwk,bhwk->b", a, jnp.asarray(v[y])) + c[y]
        return jax.nn.sigmoid(score).sum()

    grads = np.asarray(jax.grad(total)(jnp.asarray(acts)))
    full = np.asarray(cam.guidance_cam(cam.gradcam_plus_plus(acts, grads), size))
    weights = np.asarray(cam.gradcam_plus_plus_weights(acts, grads))
    masks8 = np.asarray(cam.patch_masks(full, 8))
    scores4 = np.asarray(cam.patch_scores(full, 4))
    for i in range(b):
        score = float((acts[i] * v[y[i]]).sum() + c[y[i]])
        p = 1 / (1 + math.exp(-score))
        g = (p * (1 - p) * v[y[i]]).transpose(2, 0, 1)  # [K, h, w]
        np.testing.assert_allclose(grads[i].transpose(2, 0, 1), g, rtol=1e-5, atol=1e-8)
        w, raw = _numpy_gradcam_pp(acts[i].transpose(2, 0, 1), g)
        np.testing.assert_allclose(weights[i], w, rtol=1e-4, atol=1e-9)
        expected = _numpy_scale(np.maximum(_numpy_resize_linear(_numpy_scale(raw), size), 0))
        np.testing.assert_allclose(full[i], expected, atol=1e-5)
        pooled4 = expected.reshape(4, 32, 4, 32).mean(axis=(1, 3))
        pooled8 = expected.reshape(8, 16, 8, 16).mean(axis=(1, 3))
        for grid in (pooled4, pooled8):
            grid[0, 0] = grid[0, -1] = grid[-1, 0] = grid[-1, -1] = 0.0
        np.testing.assert_allclose(scores4[i], pooled4, atol=1e-5)
        np.testing.assert_array_equal(masks8[i], pooled8 >= 0.5)
    assert masks8.any() and not masks8.all()


def test_blank_cam_gives_no_salient_patch():
    full = cam.guidance_cam(jnp.zeros((1, 4, 4)), 128)
    assert float(jnp.abs(full).max()) == 0.0
    assert not bool(cam.patch_masks(full, 4).any())


def test_blank_images_skip_the_batch_or_are_unmasked():
    s32 = np.zeros((2, 4, 4), bool)
    s16 = np.zeros((2, 8, 8), bool)
    s32[:, 1, 2] = True
    s16[0, 3, 3] = True  # image 1 has no salient patch at the stride-16 scale
    kept32, kept16, blank = scob.key_masks(jnp.asarray(s32), jnp.asarray(s16), True)
    np.testing.assert_array_equal(blank, [False, True])
    np.testing.assert_array_equal(kept16, s16)
    _, open16, _ = scob.key_masks(jnp.asarray(s32), jnp.asarray(s16), False)
    assert bool(open16[1].all()) and int(open16[0].sum()) == 1
    loss = jnp.float32(0.3)
    assert not bool(scob.contrastive_runs(loss, blank, True))
    assert bool(scob.contrastive_runs(loss, blank, False))
    assert not bool(scob.contrastive_runs(jnp.float32(jnp.nan), jnp.zeros(2, bool), False))
    assert not bool(scob.contrastive_runs(jnp.float32(-1e-3), jnp.zeros(2, bool), False))


# ------------------------------------------------------------------------------ bank, InfoNCE
def _bank(size=2, classes=2, dim=2):
    return scob.empty_bank(classes, size, dim)


def _insert(bank, label, conf, image, key, valid=True):
    return scob.bank_insert(
        bank,
        jnp.array([label]),
        jnp.array([conf], jnp.float32),
        jnp.array([image]),
        jnp.array([key], jnp.float32),
        jnp.array([valid]),
    )


def test_bank_follows_the_official_heap_rules():
    bank = _bank()
    bank = _insert(bank, 0, 0.6, 10, [1, 0])
    bank = _insert(bank, 0, 0.4, 10, [0, 1])  # not full yet: the same image again is taken
    np.testing.assert_array_equal(bank["image"][0], [10, 10])
    assert int(bank["filled"][0]) == 2
    bank = _insert(bank, 0, 0.3, 11, [5, 5])  # full, less confident than the minimum: dropped
    np.testing.assert_array_equal(bank["image"][0], [10, 10])
    bank = _insert(bank, 1, 0.9, 12, [3, 3])
    bank = _insert(bank, 0, 0.7, 12, [7, 7])  # more confident, but image 12 is in the bank
    np.testing.assert_array_equal(bank["image"][0], [10, 10])
    bank = _insert(bank, 0, 0.7, 13, [7, 7], valid=False)  # a NaN key: skipped
    np.testing.assert_array_equal(bank["image"][0], [10, 10])
    bank = _insert(bank, 0, 0.7, 13, [7, 7])  # replaces the minimum (0.4) in its slot
    np.testing.assert_array_equal(bank["image"][0], [10, 13])
    np.testing.assert_allclose(bank["confidence"][0], [0.6, 0.7])
    np.testing.assert_allclose(bank["key"][0, 1], [7, 7])
    # Prototype: the most confident entry; a class without entries gets zeros.
    np.testing.assert_allclose(scob.bank_prototypes(bank), [[7, 7], [3, 3]])
    np.testing.assert_allclose(scob.bank_prototypes(_bank()), np.zeros((2, 2)))
    # Ties on confidence go by image index, as the heap's (confidence, image_id) tuples.
    tied = _insert(_insert(_bank(), 0, 0.5, 4, [1, 1]), 0, 0.5, 9, [2, 2])
    np.testing.assert_allclose(scob.bank_prototypes(tied)[0], [2, 2])
    tied = _insert(tied, 0, 0.6, 5, [3, 3])  # replaces the smaller tuple (0.5, 4)
    np.testing.assert_array_equal(tied["image"][0], [5, 9])


def test_batch_entries_go_in_one_after_another():
    bank = scob.bank_insert(
        _bank(size=1, classes=1),
        jnp.array([0, 0, 0]),
        jnp.array([0.2, 0.5, 0.4], jnp.float32),
        jnp.array([1, 2, 3]),
        jnp.array([[1, 0], [0, 1], [1, 1]], jnp.float32),
        jnp.array([True, True, True]),
    )
    np.testing.assert_array_equal(bank["image"], [[2]])


def test_infonce_against_hand_computed_values():
    # u . k = 0.6 (cos), the prototypes: own class (weight 0, logit 0), one at cos -1, one zero.
    u = jnp.array([[1.0, 0.0]])
    k = jnp.array([[0.6, 0.8]])
    protos = jnp.array([[0.0, 5.0], [-2.0, 0.0], [0.0, 0.0]])
    weights = scob.negative_weights(jnp.eye(3), jnp.array([0]), hard=True)
    np.testing.assert_allclose(weights, [[0.0, 1.0, 1.0]])
    loss = losses.prototype_infonce(u, k, protos, weights, temperature=0.5)
    logits = np.array([1.6, 0.0, 0.0, 1.0]) / 0.5
    expected = np.log(np.exp(logits).sum()) - logits[0]
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    own = jax.nn.one_hot(jnp.array([0]), 3, dtype=bool)
    excluded = losses.prototype_infonce(u, k, protos, weights, temperature=0.5, exclude=own)
    kept = logits[[0, 2, 3]]
    np.testing.assert_allclose(float(excluded), np.log(np.exp(kept).sum()) - kept[0], rtol=1e-6)


def test_correlation_and_its_hard_threshold():
    phi = jnp.log(jnp.array([[0.5, 0.25], [1.0, 3.0]]))  # q = [[1/3, 0.2], [0.5, 0.75]]
    r = np.asarray(scob.label_correlation(phi))
    q = np.array([[1 / 3, 0.2], [0.5, 0.75]])
    np.testing.assert_allclose(r[0, 1], (q[:, 0] * q[:, 1]).mean() / q[:, 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(r[1, 0], (q[:, 0] * q[:, 1]).mean() / q[:, 1].mean(), rtol=1e-6)
    np.testing.assert_allclose(np.diag(r), 1.0)
    soft = scob.negative_weights(jnp.asarray(r), jnp.array([1]), hard=False)
    np.testing.assert_allclose(soft, [[1 - r[1, 0] ** 2, 0.0]], rtol=1e-6)
    hard = scob.negative_weights(jnp.asarray(r), jnp.array([1]), hard=True)
    np.testing.assert_allclose(hard, [[1.0, 0.0]])


def test_classification_loss_has_the_eps_quirk():
    p = np.array([[0.7, 0.2]], np.float32)
    q = np.array([[0.9, 0.4]], np.float32)
    z = np.array([[1.0, 0.0]], np.float32)
    eps, k = 1e-5, 1.5

    def bce(u, t):
        return -np.mean(t * np.log(u + eps) + (1 - t + eps) * np.log(1 - u + eps))

    def epr(u):
        return -np.log(u[0, 0] + eps) / 2 + ((u.sum() - k) / 2) ** 2

    expected = 0.5 * (bce(p, q) + epr(p) + bce(q, p) + epr(q))
    got = losses.scob_classification(p, q, z, k)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


# ------------------------------------------------------------------------------ Adam groups
def test_group_adam_skips_groups_without_gradient_as_torch_adam():
    params = nnx.State({"a": {"w": jnp.array([1.0, -2.0])}, "b": {"w": jnp.array([0.5])}})
    tx = optim.GroupAdam({"a": r"a/.*", "b": r"b/.*"})
    state = tx.init(params)
    ta, tb = torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([0.5]))
    topt = torch.optim.Adam([{"params": [ta], "lr": 0.1}, {"params": [tb], "lr": 0.01}])
    grads = [
        ({"a": [0.3, -0.1], "b": [2.0]}),
        ({"a": [-0.2, 0.4]}),
        ({"a": [0.1, 0.1], "b": [-1.0]}),
    ]
    for g in grads:
        topt.zero_grad()  # set_to_none: a parameter without gradient is skipped
        for name, p in (("a", ta), ("b", tb)):
            if name in g:
                p.grad = torch.tensor(g[name])
        topt.step()
        before = state["b"]
        for name, lr in (("a", 0.1), ("b", 0.01)):
            if name in g:
                part = nnx.State({name: {"w": jnp.array(g[name])}})
                params, state = tx.update(name, part, state, params, lr)
        if "b" not in g:  # b's moments and count untouched by a's step
            jax.tree.map(np.testing.assert_array_equal, state["b"], before)
            assert int(state["b"].count) == 1
    assert int(state["a"].count) == 3 and int(state["b"].count) == 2
    np.testing.assert_allclose(params["a"]["w"][...], ta.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(params["b"]["w"][...], tb.detach().numpy(), rtol=1e-6)
    assert topt.state[tb]["step"] == 2


# ------------------------------------------------------------------------------ sizes
def test_parameter_counts_of_the_paper_model():
    model = nnx.eval_shape(lambda: scob.Scob(num_classes=20, image_size=448, rngs=nnx.Rngs(0)))

    def count(m):
        return sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))

    layer = model.fm1_14.layers[0]
    assert count(layer) == 3_152_384
    assert count(layer) * 2 + count(model.fm1_14.norm) == 6_305_792
    assert count(model.fm1_14) == count(model.fm2_14) == 7_380_480
    assert count(model.fm1_28) == count(model.fm2_28) == 6_856_192
    assert count(model.projector) == 2_099_200
    assert count(model.classifier) == 1025 * 20
    # ResNet-50 without its fc (25,557,032 with it).
    assert count(model.backbone) + 2048 * 1000 + 1000 == 25_557_032


# ------------------------------------------------------------------------------ converter
def _torch_scob(num_train=12):
    torch.manual_seed(0)
    return TorchScob(
        layers=(1, 1, 1, 1),
        width=8,
        dim=D,
        heads=HEADS,
        ffn=FFN,
        num_classes=5,
        num_train=num_train,
    )


def test_official_checkpoint_converts_and_gives_the_torch_logits(tmp_path, capsys):
    from mlgraph.checkpointing import load_extra
    from mlgraph.convert.__main__ import main

    model = _torch_scob()
    official_checkpoint(model, tmp_path / "best.pth", torch.Generator().manual_seed(1))
    out = tmp_path / "converted"
    assert (
        main(
            [
                "--source",
                "scob",
                "--input",
                str(tmp_path / "best.pth"),
                "--output",
                str(out),
                "--option",
                "image_size=64",
                "--option",
                "num_heads=4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "note: container: weights under 'model'; other entries: optimizer=mapping of 2" in printed
    )
    assert "extra=mapping of 2 (cur_epochi, best_score); scheduler=tuple of 1" in printed
    assert "label estimator g.logits [12, 5] kept as the extra state 'phi' (rows in" in printed
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == {
        "name": "scob",
        "backbone": "resnet50",
        "backbone_kwargs": {"layers": [1, 1, 1, 1], "width": 8},
        "dim": D,
        "num_heads": HEADS,
        "num_layers": 2,
        "ffn_dim": FFN,
        "pos_table": 50,
    }
    assert settings["num_train_examples"] == 12
    np.testing.assert_array_equal(load_extra(out)["phi"], model.g.logits.detach().numpy())

    converted = core.load_converted(out)
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model.eval()(_to_torch(images.transpose(0, 3, 1, 2))).numpy()
    got = converted(jnp.asarray(images))["logits"]
    assert _rel(got, expected) < 1e-4
    # The momentum branch and the projector came over too.
    np.testing.assert_allclose(
        converted.fm2_28.layers[1].linear2.kernel[...],
        model.fm2_28.encoder.layers[1].linear2.weight.detach().numpy().T,
    )


def test_alias_that_differs_from_its_module_is_an_error():
    sd = {k: v.detach().numpy().copy() for k, v in _torch_scob().state_dict().items()}
    sd["fm1_28.transformer_parts.norm.bias"] = sd["fm1_28.transformer_parts.norm.bias"] + 1
    with pytest.raises(core.ConversionError) as e:
        convert_scob.convert(sd, {"num_heads": HEADS})
    assert str(e.value) == (
        "duplicate registrations that do not match their modules: "
        "fm1_28.transformer_parts.norm.bias differs from fm1_28.encoder.norm.bias"
    )
    del sd["fm1_28.encoder.norm.bias"]
    with pytest.raises(core.ConversionError, match=r"transformer_parts.norm.bias \(no fm1_28"):
        convert_scob.convert(sd, {"num_heads": HEADS})


# ------------------------------------------------------------------------------ training
def _run_config(data_dir, **changes):
    from train_helpers import tiny_config

    from mlgraph import recipes

    c = tiny_config(data_dir, total_steps=6)
    c.image_size = 128  # a 4x4 stride-32 grid: 12 patches that can be salient
    c.batch_size = 8
    c.eval_every_steps = 6
    recipes.scob_protocol(c, "cole")
    c.ema.decay = 0.0
    recipes.scob_optimizer(c)
    c.loss = recipes.loss_config("scob", expected_num_pos=2.0)
    c.model = recipes.model_config(
        "scob",
        backbone="resnet50",
        backbone_kwargs={"layers": (1, 1, 1, 1), "width": 8},
        dim=16,
        num_heads=2,
        num_layers=1,
        ffn_dim=32,
        nan_skip_batch=False,
    )
    c.update(changes)
    return c


@pytest.fixture(scope="module")
def scob_workdir(tiny_coco_dir, tmp_path_factory):
    """A tiny Scob run of 6 steps, uninterrupted."""
    from mlgraph import train

    workdir = tmp_path_factory.mktemp("scob") / "once"
    train.run(_run_config(tiny_coco_dir), workdir)
    return workdir


# slow: two more Scob runs; exact resume is in CI through test_method_protocol and test_spml
@pytest.mark.slow
def test_scob_run_stops_and_resumes_exactly(scob_workdir, tiny_coco_dir, tmp_path):
    from mlgraph import train

    # 26 training images in batches of 8: the epoch hook (empty bank, new correlation) runs
    # after step 4, between the stop at step 3 and the end.
    train.run(_run_config(tiny_coco_dir, stop_at_step=3), tmp_path / "twice")
    train.run(_run_config(tiny_coco_dir), tmp_path / "twice")
    once, once_lines = final_run(scob_workdir)
    twice, twice_lines = final_run(tmp_path / "twice")
    jax.tree.map(np.testing.assert_array_equal, once, twice)
    assert [x for x in once_lines if x["step"] == 6] == [x for x in twice_lines if x["step"] == 6]
    # nan_skip_batch=False: every contrastive step runs (blank samples are unmasked).
    assert int(once["extra"]["contrastive_skips"]) == 0
    assert [x["train/contrastive_skips"] for x in once_lines if "train/loss" in x] == [0.0] * 6
    # Per-group Adam counts: two updates an iteration for the ImageMids, one for the rest.
    counts = {g: int(s["count"]) for g, s in once["opt"].items()}
    assert counts == {"linear": 12, "transformer": 12, "classifier": 6, "projector": 6}
    assert int(once["extra"]["phi_opt"]["count"]) == 6
    # The bank was emptied after step 4: steps 5 and 6 put 16 images in (at most 2 a class).
    filled = once["extra"]["bank"]["filled"]
    assert 0 < filled.sum() <= min(16, 2 * 4)
    # The momentum branch never moves under the faithful bug; the online branch does.
    _, _, init, _ = train_state.create_model(_run_config(tiny_coco_dir), num_classes=4)
    for branch, moved in (("fm2_14", False), ("fm1_14", True)):
        saved = once["params"][branch]["feat_conv"]["kernel"]["value"]
        assert (not np.array_equal(saved, init[branch]["feat_conv"]["kernel"][...])) == moved


def test_viz_cam_draws_the_map_and_both_masks(scob_workdir, tmp_path, capsys):
    from PIL import Image

    from mlgraph.viz.__main__ import main

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "figures"
    args = ["cam", "--workdir", str(scob_workdir), str(tmp_path / "a.jpg"), "--output", str(out)]
    assert main([*args, "--classes", "cat,person"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" (p = ")[0] for line in printed] == ["cat", "person"]
    for name in ("cat", "person"):
        with Image.open(out / f"cam_a_{name}.png") as figure:
            assert figure.size[0] > 800 and figure.mode in ("RGB", "RGBA")
    assert main([*args[:-2], str(tmp_path / "b.jpg")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'b.jpg'}: cannot decode image (not a known image format)\n"
    )
    assert main(["cam", "--workdir", str(scob_workdir)]) == 2
    assert "cam: no IMAGE given" in capsys.readouterr().err
