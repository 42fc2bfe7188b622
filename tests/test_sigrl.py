"""SigRL (`mlgraph.models.sigrl`, its losses, `--source sigrl`) against the plain-torch SigRL of
`mlgraph.torch_reference.sigrl` (written from docs/sigrl.md §2) on the same random weights, in
float32: max|jax - torch| / max|torch| < 1e-4. Also: SDA/VFR chunked over classes equal unchunked
(values and gradients), the layer-wise lr groups and frozen set of §3.4 on the full-size
model (abstract), and OpenAI's TorchScript archive read by `--source openai_clip`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
F = torch.nn.functional

from sigrl_reference import random_clipvit  # noqa: E402
from test_backbones_transformers import TorchCLIP, randomize, rel_err  # noqa: E402

from mlgraph import checkpointing, losses, recipes  # noqa: E402
from mlgraph.convert import (  # noqa: E402
    assumed_settings,
    convert_file,
    core,
    openai_clip,
    option_help,
)
from mlgraph.convert import sigrl as convert_sigrl  # noqa: E402
from mlgraph.convert.io import read_checkpoint  # noqa: E402
from mlgraph.models import sigrl  # noqa: E402
from mlgraph.torch_reference import sigrl as sigrl_reference  # noqa: E402
from mlgraph.torch_reference.sigrl import (  # noqa: E402
    DecouplingSemantic,
    GATv2,
    SemanticDecoupling,
    channel_mixing,
    fused_score,
    ranking_lossT,
)

RTOL = 1e-4  # relative to the largest |output|
CHUNK_RTOL = 1e-5  # the same computation, scanned over class chunks
B, P, C, E = 2, 16, 7, 16  # images, patches, classes, embedding width of the SVFR tests
CHUNK = 3  # 7 classes in chunks of 3: the last chunk padded
TOWER = dict(image=64, patch=16, width=64, layers=3, heads=2, embed=32)  # 16 patches
GMC_SIZES = dict(gat_hidden=16, gat_heads=4)  # layer 1: 4 heads x 4
TOPK = 5


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float32))


def _j(x) -> jax.Array:
    return jnp.asarray(x.detach().numpy() if hasattr(x, "detach") else x)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- GMC (GATv2)
def _fill_gat_layer(ours: sigrl.GATv2Layer, ref) -> None:
    ours.linear.kernel.set_value(_j(ref.linear_l.weight.T))
    ours.attn.set_value(_j(ref.attn.weight[0]))


def test_gatv2_layer_and_gmc_parity():
    dim = 32
    ref = GATv2(dim, GMC_SIZES["gat_hidden"], dim, GMC_SIZES["gat_heads"], dropout=0.3).eval()
    randomize(ref, 1, scale=0.5)
    ours = sigrl.GMC(dim, GMC_SIZES["gat_hidden"], GMC_SIZES["gat_heads"], 0.3, rngs=nnx.Rngs(0))
    _fill_gat_layer(ours.layer1, ref.layer1)
    _fill_gat_layer(ours.output, ref.output)
    h = _rng(0).normal(size=(C, dim)).astype(np.float32)
    adj = torch.ones(C, C, 1)
    with torch.no_grad():
        want_layer1 = ref.layer1(_t(h), adj)
        want = ref(_t(h), adj)
    got_layer1 = ours.layer1(jnp.asarray(h), deterministic=True)
    got = ours(jnp.asarray(h), deterministic=True)
    assert got_layer1.shape == (C, GMC_SIZES["gat_hidden"]) and got.shape == (C, dim)
    assert rel_err(got_layer1, want_layer1) < RTOL
    assert rel_err(got, want) < RTOL
    # The shared matrix makes e_ij symmetric, so the 1-head output layer on its own matches too.
    x = _rng(1).normal(size=(C, GMC_SIZES["gat_hidden"])).astype(np.float32)
    with torch.no_grad():
        want_out = ref.output(_t(x), adj)
    assert rel_err(ours.output(jnp.asarray(x), deterministic=True), want_out) < RTOL
    # Dropout acts in training mode only (rngs given) and is the identity in eval.
    trained = ours(jnp.asarray(h), deterministic=False, rngs=nnx.Rngs(dropout=3))
    assert not np.allclose(trained, got)


# ----------------------------------------------------------------------------- SVFR pieces
def _linear(ref) -> tuple[jax.Array, jax.Array]:
    """torch Linear -> (kernel [in, out], bias)."""
    return _j(ref.weight.T), _j(ref.bias)


def _svfr_inputs(seed: int):
    rng = _rng(seed)
    feats = rng.normal(size=(B, P, E)).astype(np.float32)
    words = rng.normal(size=(C, E)).astype(np.float32)
    queries = rng.normal(size=(B, C, E)).astype(np.float32)
    return feats, words, queries


def test_semantic_decoupling_parity():
    ref = SemanticDecoupling(E)
    randomize(ref, 2, scale=0.5)
    feats, words, _ = _svfr_inputs(0)
    with torch.no_grad():
        want = ref(_t(feats), _t(words))
    kernel, bias = _linear(ref.fc3)
    for chunk in (0, CHUNK):
        got = sigrl.semantic_decoupling(jnp.asarray(feats), jnp.asarray(words)[None], kernel,
                                        bias, chunk)  # fmt: skip
        assert got.shape == (B, C, E)
        assert rel_err(got, want) < RTOL, chunk


def test_channel_mixing_parity_with_the_official_frobenius_division():
    rng = _rng(3)
    m = rng.normal(size=(B + 1, C, E)).astype(np.float32)
    h = rng.normal(size=(C, E)).astype(np.float32)
    with torch.no_grad():
        want = channel_mixing(_t(m), _t(h))
        want_alone = channel_mixing(_t(m[:1]), _t(h))  # another batch, other Frobenius norms
    got = sigrl.channel_mixing(jnp.asarray(m), jnp.asarray(h))
    assert rel_err(got, want) < RTOL
    # The batch-level division cancels in the row normalisation: T is per image, and Q does
    # not change when M is rescaled.
    assert rel_err(want[:1], want_alone) < RTOL
    assert rel_err(sigrl.channel_mixing(3 * jnp.asarray(m), jnp.asarray(h)), 3 * want) < RTOL


def test_feature_reconstruction_parity():
    ref = DecouplingSemantic(E)
    randomize(ref, 4, scale=0.5)
    feats, _, queries = _svfr_inputs(1)
    with torch.no_grad():
        want = ref.reconstruct(_t(feats), _t(queries))
    kernel, bias = _linear(ref.fc3)
    for chunk in (0, CHUNK):
        got = sigrl.feature_reconstruction(jnp.asarray(feats), jnp.asarray(queries), kernel,
                                           bias, chunk)  # fmt: skip
        assert got.shape == (B, P, E)
        assert rel_err(got, want) < RTOL, chunk


def test_fused_scores_parity():
    rng = _rng(5)
    rebuilt = rng.normal(size=(B, P, E)).astype(np.float32)
    glob = rng.normal(size=(B, E)).astype(np.float32)
    h = rng.normal(size=(C, E)).astype(np.float32)
    with torch.no_grad():
        want = fused_score(_t(rebuilt), _t(glob), _t(h), TOPK)
    got = sigrl.fused_scores(jnp.asarray(rebuilt), jnp.asarray(glob), jnp.asarray(h), TOPK)
    assert got.shape == (B, C) and got.dtype == jnp.float32
    assert rel_err(got, want) < RTOL
    # Each half is a unit vector over the classes, so |s| <= 1.
    assert float(jnp.abs(got).max()) <= 1.0


@pytest.mark.parametrize("part", ["sda", "vfr"])
def test_chunked_equals_unchunked_with_gradients(part):
    feats, words, queries = _svfr_inputs(6)
    rng = _rng(7)
    kernel = jnp.asarray(rng.normal(size=(E, E)).astype(np.float32) * 0.3)
    bias = jnp.asarray(rng.normal(size=(E,)).astype(np.float32) * 0.3)
    if part == "sda":
        fn, q = sigrl.semantic_decoupling, jnp.asarray(words)[None]
        cot = jnp.asarray(rng.normal(size=(B, C, E)).astype(np.float32))
    else:
        fn, q = sigrl.feature_reconstruction, jnp.asarray(queries)
        cot = jnp.asarray(rng.normal(size=(B, P, E)).astype(np.float32))

    def objective(chunk):
        return lambda f, q, k, b: jnp.sum(fn(f, q, k, b, chunk) * cot)

    args = (jnp.asarray(feats), q, kernel, bias)
    whole = jax.value_and_grad(objective(0), argnums=(0, 1, 2, 3))(*args)
    chunked = jax.jit(jax.value_and_grad(objective(CHUNK), argnums=(0, 1, 2, 3)))(*args)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=CHUNK_RTOL)
    names = ("F", "queries", "kernel")
    for name, got, want in zip(names, chunked[1][:3], whole[1][:3], strict=True):
        assert rel_err(got, want) < CHUNK_RTOL, name
    # The softmax over patches cancels a per-channel bias, so its gradient is 0 (rounding).
    scale = float(jnp.abs(whole[1][2]).max())
    assert max(float(jnp.abs(g[3]).max()) for g in (chunked[1], whole[1])) < 1e-5 * scale
    out = fn(*args, CHUNK)
    assert rel_err(out, fn(*args, 0)) < CHUNK_RTOL
    assert out.shape == ((B, C, E) if part == "sda" else (B, P, E))


# ----------------------------------------------------------------------------- the whole model
@pytest.fixture(scope="module")
def torch_sigrl():
    """(the torch CLIPVIT, its numpy state dict, label embeddings [C, E], images NHWC)."""
    model = random_clipvit(0, **TOWER, **GMC_SIZES, topk=TOPK)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = _rng(8)
    labels = rng.normal(size=(C, TOWER["embed"])).astype(np.float32)
    images = rng.normal(size=(B, TOWER["image"], TOWER["image"], 3)).astype(np.float32)
    return model, sd, labels, images


def _torch_outputs(model, images, labels):
    with torch.no_grad():
        return model(_t(images.transpose(0, 3, 1, 2)), _t(labels))


EXPECTED_MODEL = {
    "name": "sigrl",
    "backbone": "clip_vit_b16",
    "backbone_kwargs": {
        "variant": None, "width": 64, "depth": 3, "num_heads": 2, "patch_size": 16,
        "embed_dim": 32,
    },
    "embed_dim": 32,
    "gat_hidden": 16,
    "gat_heads": 4,
    "topk": TOPK,
    "distill": False,
}  # fmt: skip


def test_state_dict_layout_of_the_reference(torch_sigrl):
    _, sd, _, _ = torch_sigrl
    assert list(sd)[:3] == ["class_embedding", "positional_embedding", "projection_dist"]
    for key in (
        "conv1.weight",
        "ln_pre.weight",
        "transformer.resblocks.2.attn.in_proj_weight",
        "transformer.resblocks.0.mlp.c_fc.bias",
        "ln_post.bias",
        "projection.fc1.weight",
        "projection.fc2.bias",
        "SemanticDecoupling.fc3.bias",
        "DecouplingSemantic.fc1.weight",
        "DecouplingSemantic.fc3.weight",
        "GATv2_1.layer1.linear_l.weight",
        "GATv2_1.layer1.linear_r.weight",
        "GATv2_1.output.attn.weight",
    ):
        assert key in sd, key
    assert "DecouplingSemantic.fc1.bias" not in sd and sd["projection.fc1.weight"].shape == (32, 64)
    np.testing.assert_array_equal(
        sd["GATv2_1.layer1.linear_l.weight"], sd["GATv2_1.layer1.linear_r.weight"]
    )
    assert sd["GATv2_1.layer1.attn.weight"].shape == (1, 4)


def test_whole_model_parity(torch_sigrl):
    model, sd, labels, images = torch_sigrl
    module, settings = convert_sigrl.convert(sd, {"num_heads": 2, "topk": TOPK, "num_classes": C})
    assert settings["model"] == EXPECTED_MODEL
    assert settings["build"] == {"embed_path": ""}
    assert settings["num_classes"] == C and settings["image_size"] == 64
    assert settings["assumed"] == {}
    np.testing.assert_array_equal(module.label_embeddings[...], np.zeros((C, 32)))
    want, want_local, want_global = _torch_outputs(model, images, labels)
    out = module(jnp.asarray(images), label_embeddings=jnp.asarray(labels))
    assert out["logits"].shape == (B, C) and set(out) == {"logits", "global"}
    assert rel_err(out["logits"], want) < RTOL
    assert rel_err(out["global"], want_global) < RTOL
    glob, local, teacher = module.features(jnp.asarray(images))
    assert teacher is None and local.shape == (B, P, 32)
    assert rel_err(local, want_local) < RTOL
    assert rel_err(glob, want_global) < RTOL


def test_converter_cli_round_trip(torch_sigrl, tmp_path, capsys):
    from mlgraph.convert.__main__ import main

    model, sd, labels, images = torch_sigrl
    # A DataParallel run's checkpoint, nested as MKT's save_model does.
    wrapped = {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}
    torch.save({"model": wrapped, "epoch": 7}, tmp_path / "model_epoch_7.pth")
    torch.save(_t(labels), tmp_path / "label_emb.pt")
    out = tmp_path / "converted"
    args = ["--source", "sigrl", "--input", str(tmp_path / "model_epoch_7.pth")]
    args += ["--output", str(out), "--option", f"label_embeddings={tmp_path / 'label_emb.pt'}"]
    assert main([*args, "--option", "num_heads=2", "--option", f"topk={TOPK}"]) == 0
    printed = capsys.readouterr().out
    assert "note: container: weights under 'model'; other entries: epoch=7" in printed
    assert f"note: label embeddings: [{C}, 32] from {tmp_path / 'label_emb.pt'}" in printed
    unused = 32 * 64 + 32 + 32 * 32 + 32
    assert f"note: ignored on purpose: projection.fc1/fc2.* ({unused:,} values)" in printed
    settings = json.loads((out / "settings.json").read_text())
    assert settings["kind"] == "model" and settings["source"] == "sigrl"
    assert settings["model"] == EXPECTED_MODEL and settings["num_classes"] == C

    want, _, want_global = _torch_outputs(model, images, labels)
    for chunk in (64, CHUNK):  # the default (unchunked at 7 classes), then padded chunks
        converted = core.load_converted(out, class_chunk=chunk)
        got = converted(jnp.asarray(images))
        assert rel_err(got["logits"], want) < RTOL, chunk
        assert rel_err(got["global"], want_global) < RTOL
    # A queried subset of the table: the scores of that label set (they depend on it).
    subset = [4, 0, 2]
    want_subset, _, _ = _torch_outputs(model, images, labels[subset])
    got_subset = converted(jnp.asarray(images), label_ids=jnp.asarray(subset))["logits"]
    assert rel_err(got_subset, want_subset) < RTOL
    assert not np.allclose(np.asarray(got_subset), np.asarray(got["logits"])[:, subset])


def test_converter_without_label_embeddings_and_errors(torch_sigrl, tmp_path):
    _, sd, labels, _ = torch_sigrl
    module, settings = convert_sigrl.convert(sd, {"num_heads": 2})
    assert settings["num_classes"] == 1006
    assert settings["assumed"] == {"num_classes": 1006, "topk": 16}
    assert settings["model"]["topk"] == 16
    assert module.label_embeddings.shape == (1006, 32)
    assert assumed_settings(settings) == ["num_classes=1006", "topk=16"]
    assert "label_embeddings: str" in option_help("sigrl")

    unequal = dict(sd)
    unequal["GATv2_1.output.linear_r.weight"] = sd["GATv2_1.output.linear_r.weight"] + 1
    with pytest.raises(core.ConversionError) as e:
        convert_sigrl.convert(unequal, {"num_heads": 2})
    assert str(e.value) == (
        "SigRL's GATv2 layers share one matrix between source and target (share_weights=True), "
        "but GATv2_1.output.linear_l.weight and GATv2_1.output.linear_r.weight differ"
    )
    np.savez(tmp_path / "unequal.npz", **unequal)
    with pytest.raises(core.ConversionError) as e:
        convert_file("sigrl", tmp_path / "unequal.npz", tmp_path / "o", {"num_heads": 2})
    assert str(e.value).startswith(f"{tmp_path / 'unequal.npz'}: SigRL's GATv2 layers share")

    np.save(tmp_path / "wide.npy", np.zeros((C, 48), np.float32))
    with pytest.raises(core.ConversionError) as e:
        convert_sigrl.convert(sd, {"num_heads": 2, "label_embeddings": str(tmp_path / "wide.npy")})
    assert str(e.value) == (
        f"option label_embeddings={tmp_path / 'wide.npy'}: holds an array of shape (7, 48); "
        "expected [C, 32] (E = projection_dist's width)"
    )
    np.save(tmp_path / "labels.npy", labels)
    with pytest.raises(core.ConversionError, match="holds 7 rows, but the option num_classes=5"):
        convert_sigrl.convert(
            sd, {"num_heads": 2, "label_embeddings": str(tmp_path / "labels.npy"), "num_classes": 5}
        )
    clip_only = {k: v for k, v in sd.items() if not k.startswith("GATv2_1.")}
    with pytest.raises(core.ConversionError, match="not a SigRL state dict: missing GATv2_1"):
        convert_sigrl.convert(clip_only, {"num_heads": 2})


def test_full_size_reference_layout_and_settings():
    """The full-size reference has the parameter count of docs/sigrl.md §2.6; its settings are
    the registered CLIP ViT-B/16 tower with SigRL's GMC (128 = 4 heads x 32), E = 512."""
    sd = {
        k: v.detach().numpy()
        for k, v in sigrl_reference.CLIPVIT(
            image=224, patch=16, width=768, layers=12, heads=12, embed=512
        )
        .state_dict()
        .items()
    }
    assert sum(v.size for k, v in sd.items() if "linear_r" not in k) == 88_030_240
    module, settings = convert_sigrl.convert(sd, {})
    assert settings["model"] == {
        "name": "sigrl", "backbone": "clip_vit_b16", "backbone_kwargs": {}, "embed_dim": 512,
        "gat_hidden": 128, "gat_heads": 4, "topk": 16, "distill": False,
    }  # fmt: skip
    assert settings["image_size"] == 224 and len(module.backbone.transformer.resblocks) == 12
    assert "projection.fc1/fc2.* (656,384 values)" in settings["notes"][1]


# ----------------------------------------------------------------------------- losses
def test_ranking_loss_matches_biam():
    # Hand-computed (margin 1): image 0: one pair (0, 1), 1 + 0.2 - 0.5 = 0.7 -> r = 0.7;
    # image 1: no positive -> 0; image 2: pairs (0, 1) 1 - 0.5 - 0.8 < 0 and (2, 1)
    # 1 - 0.5 - 0.4 = 0.1 -> r = 0.1; image 3: pairs (0, 1) 1.1 and (0, 2) 1.2 -> r = 1.15.
    # Mean (0.7 + 0 + 0.1 + 1.15) / 4 = 0.4875; class 3 is unlabelled everywhere (ignored).
    scores = np.array(
        [[0.5, 0.2, -0.1, 3.0], [0.3, 0.9, 0.0, 3.0], [0.8, -0.5, 0.4, 3.0], [0.1, 0.2, 0.3, 3.0]],
        np.float32,
    )
    labels = np.array([[1, -1, 0, 0], [-1, -1, -1, 0], [1, -1, 1, 0], [1, -1, -1, 0]], np.float32)
    pos, neg = jnp.asarray(labels > 0), jnp.asarray(labels < 0)
    got = losses.ranking(jnp.asarray(scores), pos, neg)
    assert float(ranking_lossT(_t(scores), _t(labels))) == pytest.approx(0.4875, abs=1e-6)
    assert float(got) == pytest.approx(0.4875, abs=1e-6)
    # weights 0 leave an image out (SigRL drops images without a seen positive from the batch).
    kept = np.array([1, 0, 1, 1], np.float32)
    got = losses.ranking(jnp.asarray(scores), pos, neg, jnp.asarray(kept))
    want = ranking_lossT(_t(scores[kept > 0]), _t(labels[kept > 0]))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(got) == pytest.approx((0.7 + 0.1 + 1.15) / 3, abs=1e-6)
    # Random scores and labels, some all-zero classes and an image without any label.
    rng = _rng(9)
    scores = rng.normal(size=(6, 11)).astype(np.float32)
    labels = rng.choice([-1.0, 0.0, 1.0], size=(6, 11), p=[0.5, 0.3, 0.2]).astype(np.float32)
    labels[:, 4], labels[5] = 0.0, 0.0
    got = losses.ranking(jnp.asarray(scores), jnp.asarray(labels > 0), jnp.asarray(labels < 0))
    want = ranking_lossT(_t(scores), _t(labels))
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_l1_distillation_matches_torch():
    rng = _rng(10)
    student = rng.normal(size=(5, 32)).astype(np.float32)
    teacher = rng.normal(size=(5, 32)).astype(np.float32)
    got = losses.l1_distillation(jnp.asarray(student), jnp.asarray(teacher))
    assert float(got) == pytest.approx(float(F.l1_loss(_t(student), _t(teacher))), rel=1e-6)
    kept = np.array([1, 0, 1, 1, 0], np.float32)
    got = losses.l1_distillation(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(kept))
    want = F.l1_loss(_t(student[kept > 0]), _t(teacher[kept > 0]))
    assert float(got) == pytest.approx(float(want), rel=1e-6)


# ----------------------------------------------------------------- docs/sigrl.md §3.4 groups
def _path(p) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in p)


def test_layer_decay_groups_and_frozen_set_of_the_full_model():
    """docs/sigrl.md §3.4 on CLIP ViT-B/16 (abstract): frozen = patch conv, class/positional
    embeddings, ln_pre, blocks 0-9 and the teacher; lr scale 0.65^2 for block 10, 0.65 for
    block 11, 1 for ln_post, proj and the heads; weight decay 0.05 on matrices (SigRL's a1, a2
    are [1, h] matrices), none on vectors."""
    model = nnx.eval_shape(lambda: sigrl.SigRL(num_classes=925, image_size=224, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    config = recipes.sigrl_ov()
    assert tuple(config.optimizer.frozen) == sigrl.frozen_patterns(10)
    config.optimizer.schedule, config.optimizer.lr = "constant", 1.0
    opt = sigrl.LayerDecayAdamW(config, 100, params)
    assert opt.scales == {
        "l11_decay": pytest.approx(0.4225), "l11_no_decay": pytest.approx(0.4225),
        "l12_decay": pytest.approx(0.65), "l12_no_decay": pytest.approx(0.65),
        "l13_decay": 1.0, "l13_no_decay": 1.0,
    }  # fmt: skip
    trainable, frozen = opt.split(params)
    frozen_paths = {_path(p) for p, _ in nnx.to_flat_state(frozen)}
    embedding = {"conv1/kernel", "class_embedding", "positional_embedding", "ln_pre/scale",
                 "ln_pre/bias"}  # fmt: skip
    for path in frozen_paths:
        parts = path.split("/")
        if parts[0] == "teacher":
            continue
        assert parts[0] == "backbone", path
        rest = "/".join(parts[1:])
        assert rest in embedding or (parts[1] == "transformer" and int(parts[3]) < 10), path
    assert {f"backbone/{p}" for p in embedding} <= frozen_paths
    assert any(p.startswith("teacher/") for p in frozen_paths)
    assert sum(p.startswith("backbone/transformer/resblocks/") for p in frozen_paths) == 10 * 12

    # 15.75 M trainable (docs/sigrl.md §3.4: 16.41 M with the unused projection MLP, 656,384
    # values, that mlgraph does not build).
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(trainable))
    assert count == 15_751_712
    assert round(count / 1e6, 2) == 15.75 and round((count + 656_384) / 1e6, 2) == 16.41

    # One AdamW step from ones with gradient ones: the update is -lr·scale·(1 + wd) for a
    # decayed parameter and -lr·scale for the others (Adam's first normalised step is 1).
    ones = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), trainable)
    updates, _ = opt.update(ones, opt.tx.init(ones), ones)
    seen = set()
    for p, value in nnx.to_flat_state(updates):
        path, value = _path(p), np.asarray(value[...] if hasattr(value, "get_value") else value)
        seen.add(path)
        if path.startswith("backbone/transformer/resblocks/10/"):
            scale = 0.65**2
        elif path.startswith("backbone/transformer/resblocks/11/"):
            scale = 0.65
        else:
            assert path.split("/")[0] in ("gmc", "sda", "fuse", "vfr") or path in (
                "backbone/ln_post/scale", "backbone/ln_post/bias", "backbone/proj"
            ), path  # fmt: skip
            scale = 1.0
        decayed = value.ndim >= 2 or path.endswith("/attn")
        want = -scale * (1 + (0.05 if decayed else 0.0))
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=path)
    assert "gmc/layer1/attn" in seen and "backbone/proj" in seen and len(seen) == 2 * 12 + 12


# ----------------------------------------------------------------------------- JIT archive
class ScriptedCLIP(TorchCLIP):
    """A tiny CLIP with OpenAI's key layout, scriptable, holding the archive's extra int
    entries as buffers (OpenAI's loader drops them)."""

    def __init__(self):
        super().__init__()
        for name, value in (("input_resolution", 16), ("context_length", 12), ("vocab_size", 50)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image):
        return self.visual(image)[1]


def test_openai_clip_reads_the_torchscript_archive(tmp_path):
    torch.manual_seed(0)
    model = ScriptedCLIP().eval()
    sd = randomize(model, 11)
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    ckpt = read_checkpoint(path)
    assert ckpt.torchscript and ckpt.container is None
    assert sorted(ckpt.state_dict) == sorted(sd) and "input_resolution" in sd
    np.testing.assert_array_equal(ckpt.state_dict["visual.proj"], sd["visual.proj"])
    assert ckpt.note() == (
        "TorchScript archive: weights from its module's state_dict() (torch.jit.load)"
    )

    summary = convert_file("openai_clip", path, tmp_path / "tower", {"num_heads": 4})
    assert summary["notes"] == [ckpt.note()]
    tree, settings = checkpointing.load_weights(tmp_path / "tower")
    assert settings["kind"] == "backbone" and settings["width"] == 32
    tower = nnx.eval_shape(lambda: openai_clip.build(settings))
    state = nnx.state(tower)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(tower, state)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        want = model(x)
    got = tower.encode_image(jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    assert rel_err(got, want) < RTOL
