"""The SALGL model: parameter counts of the paper settings (abstractly, nothing materialised),
a tiny end-to-end forward, when the co-occurrence counts change, gradient routing of the hard
and soft scene assignment, the data-parallel step on 8 devices, the loss and config errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlgraph import losses, models, recipes, sharding
from mlgraph.errors import ConfigError
from mlgraph.models import graph, salgl

C, K, IMAGE = 5, 3, 16
B = 16  # one batch size for every jitted call, so compilations are shared


def _config(embed_path: str, image_size: int = IMAGE, **model) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({"image_size": image_size, "dtype": "float32"})
    c.model = recipes.model_config("salgl", embed_path=embed_path, **model)
    return c


def _num_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.fixture(scope="module")
def embed_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("embed") / "labels.npy"
    np.save(path, np.random.default_rng(0).normal(size=(C, 6)))  # float64, as bert.npy
    return str(path)


def _random_fill(model: nnx.Module, seed: int) -> None:
    """Random values for every parameter and batch statistic; buffers keep theirs."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Not(salgl.Buffer))):
        name, shape = str(path[-1]), tuple(var.shape)
        if name in ("var", "scale"):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:
            value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        else:
            value = rng.normal(0, 0.2, shape)
        var.set_value(jnp.asarray(value, var.dtype))


@pytest.fixture(scope="module")
def tiny(embed_file):
    """A tiny SALGL: 2-stage CNN (D = 16, 4x4 tokens), K = 3, C = 5, E = 6.

    Built by `create` abstractly and filled with random values: the real initialisation
    compiles one random-number program per parameter shape (truncated normals take seconds
    each on a loaded 2-core machine) and is not what these tests are about.
    """
    config = _config(
        embed_file,
        backbone="simple_cnn",
        backbone_kwargs={"widths": (8, 16)},
        num_scenes=K,
        num_steps=2,
        att_dim=8,
        ffn_dim=12,
    )
    model = nnx.eval_shape(lambda: models.create(config, num_classes=C, rngs=nnx.Rngs(0)))
    _random_fill(model, 0)
    model.embeddings.set_value(jnp.asarray(np.load(embed_file), jnp.float32))
    model.comatrix.set_value(jnp.zeros((K, C, C), jnp.float32))
    return config, model


def _images(b: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, IMAGE, IMAGE, 3)), jnp.float32)


def _labels(b: int, seed: int = 0) -> jax.Array:
    y = (np.random.default_rng(seed).random((b, C)) < 0.5).astype(np.float32)
    y[:, 0] = 1.0  # every image has a label
    return jnp.asarray(y)


_forward = nnx.jit(
    lambda m, x, y, key, train: m(x, labels=y, train=train, rngs=nnx.Rngs(dropout=key)),
    static_argnames="train",
)


# ------------------------------------------------------------------------------ parameter count
def test_parameter_count_of_the_coco_setting(tmp_path):
    """R101, K = 6, C = 80, E = 768, outmess: 117,948,561 (docs/salgl.md §1.14), part by part."""
    np.save(tmp_path / "bert.npy", np.zeros((80, 768)))
    config = _config(str(tmp_path / "bert.npy"), image_size=448)
    model = nnx.eval_shape(lambda: models.create(config, num_classes=80, rngs=nnx.Rngs(0)))
    assert _num_params(model) == 117_948_561
    parts = {
        "backbone": 42_500_160,
        "tb": 25_186_304,
        "scene_linear": 12_288,
        "ggnn": 37_761_024,
        "attention": 3_934_209,
        "fc": 8_390_656,
        "classifier": 163_920,
    }
    assert {name: _num_params(getattr(model, name)) for name in parts} == parts
    assert model.embeddings.shape == (80, 768) and not isinstance(model.embeddings, nnx.Param)
    assert model.comatrix.shape == (6, 80, 80)

    # Without outmess: 105,189,441 + 2048 K + 2049 C.
    config.model.outmess = False
    model = nnx.eval_shape(lambda: models.create(config, num_classes=80, rngs=nnx.Rngs(0)))
    assert _num_params(model) == 105_189_441 + 2048 * 6 + 2049 * 80


def test_parameter_count_of_vit_large_at_448():
    """ViT-L/16 at 448: 326,730,753 + 1024 K + 1025 C (docs/salgl.md §1.14)."""
    config = _config("", image_size=448, backbone="vit_l16", embed_type="checkpoint")
    config.model.embed_dim = 768
    model = nnx.eval_shape(lambda: models.create(config, num_classes=20, rngs=nnx.Rngs(0)))
    assert _num_params(model) == 326_730_753 + 1024 * 6 + 1025 * 20
    assert _num_params(model.backbone) == 303_903_744


# ------------------------------------------------------------------------------------- forward
def test_tiny_forward_outputs(tiny):
    config, model = tiny
    model = nnx.clone(model)
    out = _forward(model, _images(B), None, jax.random.key(0), train=False)
    shapes = {k: v.shape for k, v in out.items()}
    assert shapes == {
        "logits": (B, C),
        "scene_probs": (B, K),
        "sample_en": (),
        "batch_en": (),
        "att_weights": (B, C, 16),
        "adjacency": (B, C, C),
    }
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert np.isfinite(np.asarray(out["logits"])).all()
    np.testing.assert_allclose(np.asarray(out["att_weights"]).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["scene_probs"]).sum(-1), 1.0, rtol=1e-5)
    # Nothing counted yet: every transition matrix is zero.
    np.testing.assert_array_equal(np.asarray(out["adjacency"]), 0.0)
    assert float(out["sample_en"]) == pytest.approx(
        float(losses.sample_entropy(out["scene_probs"])), rel=1e-6
    )
    # The file embeddings are the .npy table, as float32.
    want = np.load(config.model.embed_path).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.embeddings[...]), want)


def test_comatrix_counts_the_global_batch_in_training_only(tiny):
    """The training loop's step, batch sharded over 8 devices: the counts grow by the whole
    batch's scene-assigned co-occurrences, before the adjacency is built; eval never changes
    them."""
    _, model = tiny
    model = nnx.clone(model)
    x, y = _images(B), _labels(B, 1)
    _forward(model, x, y, jax.random.key(0), train=False)
    np.testing.assert_array_equal(np.asarray(model.comatrix[...]), 0.0)  # eval, labels given

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(params, rest, x, y, key):
        m = nnx.merge(graphdef, params, rest)
        out = m(x, labels=y, train=True, rngs=nnx.Rngs(dropout=key))
        return out, nnx.state(m, nnx.Not(nnx.Param))

    mesh = sharding.make_mesh()
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sharded = jax.jit(step, in_shardings=(repl, repl, data, data, repl), out_shardings=repl)
    x8, y8 = jax.device_put(x, data), jax.device_put(y, data)
    assert {s.data.shape[0] for s in x8.addressable_shards} == {B // 8}
    # Replicated up front, as the training loop does: both steps then share one compilation.
    params, rest = jax.device_put((params, rest), repl)

    out, rest = sharded(params, rest, x8, y8, jax.random.key(1))
    counts = np.asarray(rest["comatrix"][...])
    # What one device computes from all 16 scene assignments (exact integer counts).
    want = np.asarray(graph.cooccurrence_update(out["scene_probs"], y, soft=False))
    np.testing.assert_array_equal(counts, want)
    assert counts.sum() == float((np.asarray(y).sum(1) ** 2).sum())
    # The batch's own labels are counted before its adjacency is built (docs/salgl.md §1.7).
    probs = graph.comatrix_to_prob(jnp.asarray(counts), normalize=True, ignore_self=False)
    adjacency = graph.sample_adjacency(probs, out["scene_probs"], soft=False)
    np.testing.assert_allclose(np.asarray(out["adjacency"]), np.asarray(adjacency), rtol=1e-6)
    assert np.abs(np.asarray(out["adjacency"])).max() > 0

    out2, rest = sharded(params, rest, x8, y8, jax.random.key(2))
    more = np.asarray(graph.cooccurrence_update(out2["scene_probs"], y, soft=False))
    np.testing.assert_array_equal(np.asarray(rest["comatrix"][...]), counts + more)
    nnx.update(model, rest)
    _forward(model, x, y, jax.random.key(0), train=False)
    np.testing.assert_array_equal(np.asarray(model.comatrix[...]), counts + more)


@pytest.mark.parametrize("soft", [False, True])
def test_scene_head_gets_classification_gradient_only_in_soft_mode(tiny, soft):
    """Hard assignment: the scene head learns only from the entropy terms (docs/salgl.md §1.9)."""
    _, model = tiny
    model = nnx.clone(model)
    model.soft = soft
    x, y = _images(4, 2), _labels(4, 2)

    def cls_loss(m):
        out = m(x, labels=y, train=True, rngs=nnx.Rngs(dropout=jax.random.key(0)))
        return losses.asl(out["logits"], y)

    # Gradients of the scene head and of `fc` only: a smaller backward graph to compile.
    wrt = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("scene_linear"), nnx.PathContains("fc")))
    grads = nnx.jit(nnx.grad(cls_loss, argnums=nnx.DiffState(0, wrt)))(model)
    scene = float(jnp.abs(grads["scene_linear"]["kernel"][...]).max())
    head = float(jnp.abs(grads["fc"]["kernel"][...]).max())
    assert head > 0
    assert (scene > 0) if soft else (scene == 0.0)


def test_bfloat16_compute_keeps_counts_and_outputs_in_float32(tiny):
    """Mixed precision (traced only, nothing compiled): parameters, counts and outputs stay
    float32 while the layers compute in bfloat16."""
    config, _ = tiny
    config = ml_collections.ConfigDict(config.to_dict())
    config.dtype = "bfloat16"

    def run():
        model = models.create(config, num_classes=C, rngs=nnx.Rngs(0))
        out = model(
            _images(B), labels=_labels(B), train=True, rngs=nnx.Rngs(dropout=jax.random.key(0))
        )
        return out, model.comatrix[...], model.fc.kernel[...]

    out, counts, kernel = jax.eval_shape(run)
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert counts.dtype == jnp.float32 and kernel.dtype == jnp.float32
    assert out["logits"].shape == (B, C)


# ----------------------------------------------------------------------------------------- loss
def test_loss_fn_combines_classification_and_scene_terms():
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    y = jnp.asarray([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]], jnp.float32)
    outputs = {"logits": logits, "sample_en": jnp.float32(1.25), "batch_en": jnp.float32(0.5)}
    config = ml_collections.ConfigDict(
        {"loss": recipes.loss_config("salgl", name="asl", lamda=2.0, gamma_neg=3.0)}
    )
    total, aux = salgl.loss_fn(outputs, {"labels": y}, config)
    cls = float(losses.asl(logits, y, gamma_neg=3.0))
    assert set(aux) == {"asl", "sample_en", "batch_en"}
    assert float(aux["asl"]) == pytest.approx(cls, rel=1e-6)
    assert float(total) == pytest.approx(cls + 2.0 * (1.25 + 0.5), rel=1e-6)
    config.loss.name = "bce"
    total, aux = salgl.loss_fn(outputs, {"labels": y}, config)
    assert float(total) == pytest.approx(float(losses.bce(logits, y)) + 2.0 * 1.75, rel=1e-6)
    assert set(aux) == {"bce", "sample_en", "batch_en"}


# --------------------------------------------------------------------------------------- errors
def test_config_errors(tmp_path, embed_file):
    with pytest.raises(ConfigError, match=r"unknown SALGL field\(s\) num_scene;"):
        recipes.model_config("salgl", num_scene=4)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((7, 6)))
    with pytest.raises(ConfigError, match=r"bad.npy: holds an array of shape \(7, 6\); expected"):
        salgl.load_embeddings(str(bad), C)
    with pytest.raises(ConfigError, match="embed_dim=300"):
        salgl.load_embeddings(embed_file, C, embed_dim=300)
    with pytest.raises(ConfigError, match="missing.npy: no such file"):
        salgl.load_embeddings(str(tmp_path / "missing.npy"), C)
    with pytest.raises(ConfigError, match="embed_type='file' needs a .npy file"):
        salgl.load_embeddings("", C)

    def build(**model):
        config = _config(embed_file, image_size=64, **model)
        nnx.eval_shape(lambda: models.create(config, num_classes=C, rngs=nnx.Rngs(0)))

    with pytest.raises(ConfigError, match="pos=True does not work with backbone 'vit_b16'"):
        build(backbone="vit_b16", pos=True)
    with pytest.raises(ConfigError, match="embed_type='glove': expected one of file, random"):
        build(embed_type="glove")
    with pytest.raises(ConfigError, match="loss.name='focal': expected one of asl, bce"):
        outputs = {"logits": jnp.zeros((1, C)), "sample_en": 0.0, "batch_en": 0.0}
        config = ml_collections.ConfigDict({"loss": recipes.loss_config("salgl", name="focal")})
        salgl.loss_fn(outputs, {"labels": jnp.zeros((1, C))}, config)
    with pytest.raises(ConfigError, match="image_size=80: position codes need a multiple of 32"):
        config = _config(embed_file, image_size=80, pos=True)
        models.create(config, num_classes=C, rngs=nnx.Rngs(0))
