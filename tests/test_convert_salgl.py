"""Official SALGL checkpoint -> mlgraph SALGL, against a plain-torch SALGL written from
docs/salgl.md.

The torch model below follows docs/salgl.md §1 and the checkpoint layout of §7.2 (the official
module names: `backbone` a torchvision-style ResNet, `tb.layers.0` a DETR post-norm layer around
`nn.MultiheadAttention`, `position_embedding.pe`, `embeddings`, `comatrix`, `scene_linear`,
`ggnn.fc{1,2,3}_{w,u}`, `attention.*`, `fc.0`, `classifier`). Its backbone is reduced (one or
two blocks per stage, width 4, so D = 128) and every weight, BatchNorm statistic and
co-occurrence count is random. Its `state_dict()` with the `module.` prefix of `ModelEma` is
converted, the inferred settings are checked, and the eval-mode outputs are compared.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_reference import (
    randomize_batch_norms,
)

from mlgraph import evaluation, models, train_state
from mlgraph.convert import core
from mlgraph.convert import salgl as convert_salgl
from mlgraph.torch_reference import salgl as salgl_reference

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

RTOL = 1e-4  # relative to the largest |logit|
C, K, E, IMAGE = 6, 3, 10, 96
# What a conversion without config.yaml takes for the training run's loss and EMA (get_args').
LOSS_ASSUMED = {
    "loss": "asl",
    "gamma_pos": 0.0,
    "gamma_neg": 2.0,
    "clip": 0.0,
    "lamda": 1.0,
    "comat_ema": True,
}


# ----------------------------------------------------------------------------- torch reference
def TorchSALGL(backbone, **kwargs) -> salgl_reference.TorchSALGL:  # noqa: N802
    """The package's torch SALGL at this file's sizes (C classes, K scenes, E-wide embeddings,
    a small encoder and attention)."""
    sizes = dict(num_classes=C, num_scenes=K, embed_dim=E, heads=8, ffn_dim=32, att_dim=16)
    return salgl_reference.TorchSALGL(backbone, **sizes, **kwargs)


TorchResNet = salgl_reference.TorchResNet


def _randomize_buffers(model: nn.Module, seed: int) -> None:
    """Random BN affine/statistics and scene counts (as an EMA of counts: not integers)."""
    g = torch.Generator().manual_seed(seed)
    randomize_batch_norms(model, g)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.num_batches_tracked.fill_(17)
        for k in range(K):
            y = (torch.rand(30, C, generator=g) < 0.4).float()
            if k == 1:
                y[:, 2] = 0  # a label never seen in scene 1: an all-zero row
            model.comatrix[k] = 0.93 * (y.T @ y)


def _torch_model(seed: int, *, layers, **kwargs) -> TorchSALGL:
    torch.manual_seed(seed)
    model = TorchSALGL(TorchResNet(layers, 4), **kwargs)
    _randomize_buffers(model, seed)
    return model.eval()


def _checkpoint(model: nn.Module) -> dict[str, np.ndarray]:
    """What `torch.load(ema_best_model.pth)` gives, as numpy: every key under `module.`."""
    return core.to_numpy_state_dict({f"module.{k}": v for k, v in model.state_dict().items()})


def _images(b: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, IMAGE, IMAGE, 3)).astype(np.float32)


def _compare(tm: TorchSALGL, module: nnx.Module) -> float:
    """Eval outputs of both on the same images; returns the max |dlogit| / max |logit|."""
    x = _images(3, 0)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).items()}
    got = nnx.jit(lambda m, x: m(x, train=False))(module, jnp.asarray(x))
    got = {k: np.asarray(v) for k, v in got.items()}
    np.testing.assert_allclose(got["scene_probs"], want["scene_probs"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["att_weights"], want["att_weights"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got["adjacency"], want["adjacency"], rtol=1e-4, atol=1e-6)
    rel = float(np.abs(got["logits"] - want["logits"]).max() / np.abs(want["logits"]).max())
    assert rel < RTOL, f"max relative logit difference {rel:.2e}"
    return rel


def _yaml(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


# A model without GGNN steps, position table or outmess, soft scenes, self-loops ignored.
SOFT_MODEL = dict(
    layers=(1, 1, 1, 1),
    steps=0,
    outmess=False,
    pos_grid=None,
    normalize=False,
    ignore_self=True,
    soft=True,
    random=True,
)

# ----------------------------------------------------------------------------------------- tests
CONFIG_A = """\
model: salgl
backbone: resnet50
data: mscoco
num_classes: 6
num_scenes: 3
num_steps: 2
outmess: True
normalize: True
ignore_self: False
soft: False
pos: True
embed_type: bert
embed_path: data/mscoco/bert.npy
img_size: 96
lr: 5e-05
weight_decay: 0.01
loss: asl
gamma_pos: 0.0
gamma_neg: 2.0
clip: 0.0
lamda: 0.5
comat_ema: False
pretrained_model: None
"""


def test_convert_outmess_pos_hard_matches_torch(tmp_path, capsys):
    tm = _torch_model(
        0,
        layers=(1, 2, 1, 1),
        steps=2,
        outmess=True,
        pos_grid=IMAGE // 32,
        normalize=True,
        ignore_self=False,
        soft=False,
        random=False,
    )
    sd = _checkpoint(tm)
    assert all(k.startswith("module.") for k in sd) and "module.position_embedding.pe" in sd
    module, settings = convert_salgl.convert(sd, {"config_yaml": _yaml(tmp_path, CONFIG_A)})
    assert settings == {
        "kind": "model",
        "model": {
            "name": "salgl",
            "backbone": "resnet50",
            "backbone_kwargs": {"layers": [1, 2, 1, 1], "width": 4},
            "num_scenes": K,
            "num_steps": 2,
            "outmess": True,
            "normalize": True,
            "ignore_self": False,
            "soft": False,
            "pos": True,
            "att_dim": 16,
            "ffn_dim": 32,
            "heads": 8,
        },
        "build": {
            "embed_type": "checkpoint",
            "embed_path": "",
            "embed_dim": E,
            "dropout": 0.1,
            "comat_ema": False,
        },
        "loss": {"name": "asl", "gamma_pos": 0.0, "gamma_neg": 2.0, "clip": 0.0, "lamda": 0.5},
        "num_classes": C,
        "image_size": IMAGE,
        "assumed": {},
    }
    json.dumps(settings)  # stored as settings.json
    np.testing.assert_array_equal(np.asarray(module.comatrix[...]), sd["module.comatrix"])
    np.testing.assert_array_equal(np.asarray(module.embeddings[...]), sd["module.embeddings"])
    rel = _compare(tm, module)
    with capsys.disabled():
        print(f"\nSALGL conversion (outmess, pos, hard): max relative logit diff {rel:.2e}")

    # Round trip: the settings rebuild the same tree (paths, shapes, variable types).
    rebuilt = nnx.eval_shape(
        lambda: models.build(
            core.build_fields(settings),
            num_classes=settings["num_classes"],
            image_size=settings["image_size"],
            rngs=nnx.Rngs(0),
        )
    )
    spec = lambda m: {  # noqa: E731
        p: (tuple(v.shape), type(v).__name__) for p, v in core.variable_paths(m).items()
    }
    assert spec(rebuilt) == spec(module)

    # Without the yaml, what the weights cannot tell is assumed (and listed).
    _, guessed = convert_salgl.convert(sd, {})
    assert guessed["assumed"] == LOSS_ASSUMED | {
        "normalize": True,
        "ignore_self": False,
        "soft": False,
        "num_steps": 3,
        "embed_type": "bert",
    }
    assert guessed["image_size"] == IMAGE  # from the position table
    assert guessed["model"]["num_steps"] == 3 and guessed["loss"]["lamda"] == 1.0


def test_convert_plain_soft_random_embeddings_matches_torch(tmp_path, capsys):
    tm = _torch_model(1, **SOFT_MODEL)
    yaml = _yaml(tmp_path, "embed_type: random\nnormalize: False\nignore_self: True\nsoft: True\n")
    module, settings = convert_salgl.convert(_checkpoint(tm), {"config_yaml": yaml})
    model = core.build_fields(settings)
    assert (model["num_steps"], model["outmess"], model["pos"]) == (0, False, False)
    assert (model["embed_type"], model["embed_dim"]) == ("random", 128)
    assert settings["assumed"] == LOSS_ASSUMED | {"image_size": 448}
    assert isinstance(module.embeddings, nnx.Param)  # trainable, as in the original
    rel = _compare(tm, module)
    with capsys.disabled():
        print(f"\nSALGL conversion (soft, ignore_self, T=0): max relative logit diff {rel:.2e}")


def test_convert_vit_backbone_layout():
    """A timm ViT backbone is recognised by its keys; sizes come from the shapes."""
    torch.manual_seed(2)
    d, patch, grid = 32, 8, 4

    class NoBackbone(nn.Module):
        num_features = d

    head = TorchSALGL(
        NoBackbone(),
        steps=1,
        outmess=True,
        pos_grid=None,
        normalize=True,
        ignore_self=False,
        soft=False,
        random=False,
    )
    sd = {f"module.{k}": v.numpy() for k, v in head.state_dict().items()}
    rng = np.random.default_rng(0)
    vit = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "patch_embed.proj.weight": (d, 3, patch, patch),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for name, shape in {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d),
        "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d),
        "attn.proj.bias": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        "mlp.fc1.weight": (4 * d, d),
        "mlp.fc1.bias": (4 * d,),
        "mlp.fc2.weight": (d, 4 * d),
        "mlp.fc2.bias": (d,),
    }.items():
        vit[f"blocks.0.{name}"] = shape
    sd |= {f"module.backbone.{k}": rng.normal(size=s).astype(np.float32) for k, s in vit.items()}
    module, settings = convert_salgl.convert(sd, {"num_heads": 4, "num_steps": 1})
    assert settings["model"]["backbone"] == "vit_b16"
    assert settings["model"]["backbone_kwargs"] == {
        "width": d,
        "depth": 1,
        "num_heads": 4,
        "patch_size": patch,
    }
    assert settings["image_size"] == grid * patch
    assert "image_size" not in settings["assumed"] and "num_steps" not in settings["assumed"]
    np.testing.assert_array_equal(
        np.asarray(module.backbone.pos_embed[...]), sd["module.backbone.pos_embed"]
    )


def test_conversion_errors(tmp_path):
    tm = _torch_model(
        3,
        layers=(1, 1, 1, 1),
        steps=0,
        outmess=True,
        pos_grid=None,
        normalize=True,
        ignore_self=False,
        soft=False,
        random=False,
    )
    sd = _checkpoint(tm)
    broken = {k: v for k, v in sd.items() if k != "module.ggnn.fc2_u.bias"}
    broken["module.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(
        core.ConversionError,
        match=r"missing keys \(1\): ggnn.fc2_u.bias \| unexpected keys \(1\): extra.weight",
    ):
        convert_salgl.convert(broken, {})
    with pytest.raises(core.ConversionError, match="num_scenes: 4, but the weights imply 3"):
        convert_salgl.convert(sd, {"config_yaml": _yaml(tmp_path, "num_scenes: 4\n")})
    with pytest.raises(core.ConversionError, match=r"option num_steps=2, but fc.0.weight"):
        convert_salgl.convert(sd, {"num_steps": 2})
    with pytest.raises(core.ConversionError, match="backbone: 'resnet101', but the weights"):
        convert_salgl.convert(sd, {"config_yaml": _yaml(tmp_path, "backbone: resnet101\n")})
    with pytest.raises(core.ConversionError, match=r"config.yaml:2: expected a top-level"):
        convert_salgl.convert(sd, {"config_yaml": _yaml(tmp_path, "soft: True\n  nested\n")})
    with pytest.raises(core.ConversionError, match="not a SALGL state dict: missing comatrix"):
        convert_salgl.convert({k: v for k, v in sd.items() if "comatrix" not in k}, {})
    with pytest.raises(core.ConversionError, match="unknown options steps"):
        convert_salgl.convert(sd, {"steps": 2})


def test_read_config_yaml_types(tmp_path):
    path = _yaml(tmp_path, "lr: 5e-05\npretrained_model: None\nouts: True\nk: 6\nname: salgl\n")
    assert convert_salgl.read_config_yaml(path) == {
        "lr": 5e-05,
        "pretrained_model": None,
        "outs": True,
        "k": 6,
        "name": "salgl",
    }


# ----------------------------------------------------------------------- as the user runs it
def _experiment(tmp_path, tm, config_text: str | None):
    """The official layout: expN/config.yaml and expN/checkpoints/ema_best_model.pth."""
    exp = tmp_path / "experiments" / "salgl_resnet50_mscoco" / "exp1"
    (exp / "checkpoints").mkdir(parents=True)
    ckpt = exp / "checkpoints" / "ema_best_model.pth"
    torch.save({k: torch.from_numpy(v) for k, v in _checkpoint(tm).items()}, ckpt)
    if config_text is not None:
        (exp / "config.yaml").write_text(config_text)
    return ckpt


SOFT_YAML = (  # every setting the weights leave open, as an official config.yaml has them
    "embed_type: random\nnormalize: False\nignore_self: True\nsoft: True\nimg_size: 96\n"
    "loss: asl\ngamma_pos: 0.0\ngamma_neg: 2.0\nclip: 0.0\nlamda: 1.0\ncomat_ema: False\n"
)


def test_convert_file_finds_config_yaml_or_names_what_it_assumed(tmp_path, capsys):
    from mlgraph.convert import convert_file
    from mlgraph.convert.__main__ import main

    tm = _torch_model(1, **SOFT_MODEL)
    ckpt = _experiment(tmp_path, tm, SOFT_YAML)
    summary = convert_file("salgl", ckpt, tmp_path / "found")
    yaml = ckpt.parent.parent / "config.yaml"
    assert (
        f"settings read from {yaml} (--option config_yaml=FILE for another)" in (summary["notes"])
    )
    model = summary["settings"]["model"]
    assert (model["soft"], model["ignore_self"], model["normalize"]) == (True, True, False)
    assert "warning" not in capsys.readouterr().err

    yaml.unlink()
    summary = convert_file("salgl", ckpt, tmp_path / "assumed")
    named = (
        f"{ckpt}: settings that neither the weights nor a config file give: clip=0.0, "
        'comat_ema=true, embed_type="bert", gamma_neg=2.0, gamma_pos=0.0, '
        'ignore_self=false, image_size=448, lamda=1.0, loss="asl", normalize=true, soft=false'
    )
    assert capsys.readouterr().err == (
        f"warning: {named} (assumed: the defaults); pass --option config_yaml=FILE (the "
        "official config.yaml), or --strict to refuse\n"
    )
    with pytest.raises(core.ConversionError) as e:
        convert_file("salgl", ckpt, tmp_path / "strict", strict=True)
    assert str(e.value) == (
        f"{named}; pass --option config_yaml=FILE (the official config.yaml) (--strict)"
    )
    assert not (tmp_path / "strict").exists()

    args = ["--source", "salgl", "--input", str(ckpt), "--output", str(tmp_path / "s2")]
    assert main([*args, "--strict"]) == 2
    with pytest.raises(SystemExit) as done:
        main(["--source", "salgl", "--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    assert "Options of --source salgl (--option KEY=VALUE, repeatable):\n  num_steps: int" in listed
    assert "  config_yaml: str, default" in listed


def test_predict_on_a_converted_checkpoint_scores_as_evaluate(tmp_path):
    """`mlgraph.predict` on a converted SALGL gives the scores of the model `evaluate
    --checkpoint` builds, with the scene probabilities."""
    from PIL import Image

    from mlgraph import config_lib, predict, recipes
    from mlgraph.convert import convert_file

    ckpt = _experiment(tmp_path, _torch_model(1, **SOFT_MODEL), SOFT_YAML)
    out = tmp_path / "salgl"
    settings = convert_file("salgl", ckpt, out)["settings"]
    config = config_lib.base_config()
    fields = {k: v for k, v in core.build_fields(settings).items() if k != "name"}
    config.model = recipes.model_config("salgl", **fields)
    config.image_size = settings["image_size"]
    config.init_from = str(out)
    _, graphdef, params, rest = train_state.create_model(config, C)
    images = _images(5, 1)
    (want,) = jax.jit(evaluation.make_predict(graphdef, lambda s: ((s[0], s[1]),)))(
        (params, rest), images
    )
    names = [f"class {i}" for i in range(C)]
    for predictor in (
        predict.Predictor.from_checkpoint(out, config, class_names=names, batch_size=2),
        predict.Predictor.from_checkpoint(out, class_names=names, batch_size=2),  # no config
    ):
        got = predictor.scores(images)
        np.testing.assert_allclose(got["scores"], want, rtol=1e-5, atol=1e-6)
        assert got["scene_probs"].shape == (5, K)
        np.testing.assert_allclose(got["scene_probs"].sum(1), 1.0, rtol=1e-5)

    rng = np.random.default_rng(0)
    for i in range(2):
        pixels = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"photo{i}.png")
    records = predictor.predict([tmp_path], top_k=2)
    assert [r["file"] for r in records] == [str(tmp_path / f"photo{i}.png") for i in range(2)]
    assert all(len(r["scene_probs"]) == K and len(r["top"]) == 2 for r in records)
