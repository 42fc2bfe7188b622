"""Query2Label: official-layout checkpoint -> mlgraph Query2Label, against a plain-torch Q2L.

The torch model follows docs/ssgrl_mlgcn.md §4.1 with the official names (§4.2): `backbone` a
Sequential of the ResNet wrapper (`.body`, FrozenBatchNorm2d) and the position module (buffer
`pe`, DETR's normalised sine table), `input_proj` (Identity or a 1x1 conv),
`transformer.encoder.layers` / `transformer.decoder.layers` (DETR post-norm layers on
`nn.MultiheadAttention`, decoder self-attention removable per layer),
`transformer.decoder.norm`, `query_embed` (nn.Embedding) and `fc` (GroupWiseLinear `W`, `b`);
batch-first where the official code is sequence-first (the same computation).
The checkpoint is written as the released `checkpoint.pkl` container with its `module.` prefix,
and the architecture is read from a `config_new.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_reference import randomize_batch_norms

from mlgraph import config_lib, models, optim, recipes, train_state, train_step
from mlgraph.convert import convert_file, core
from mlgraph.convert import q2l as convert_q2l
from mlgraph.convert.__main__ import main
from mlgraph.errors import ConfigError
from mlgraph.torch_reference.q2l import TorchQ2L, freeze_batch_norms

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

RTOL = 1e-4
K, IMAGE, WIDTH = 5, 96, 4  # ResNet width 4: layer4 has 128 channels; a 3x3 map at 96 px


VARIANTS = {
    # The released layout: hidden = channels (Identity projection), 1 + 2 layers, no decoder
    # self-attention.
    "released": dict(d=128, heads=4, ffn=96, enc=1, dec=2, proj=False, first=False, other=False),
    # Every switch the other way: a 1x1 projection, self-attention kept in every decoder layer.
    "all_switches": dict(d=64, heads=2, ffn=48, enc=2, dec=3, proj=True, first=True, other=True),
}


def _torch_model(v: dict, seed: int) -> TorchQ2L:
    torch.manual_seed(seed)
    model = TorchQ2L(
        (1, 1, 1, 1),
        WIDTH,
        num_classes=K,
        image_size=IMAGE,
        d=v["d"],
        heads=v["heads"],
        ffn=v["ffn"],
        enc=v["enc"],
        dec=v["dec"],
        keep_input_proj=v["proj"],
        keep_first=v["first"],
        keep_other=v["other"],
    )
    g = torch.Generator().manual_seed(seed)
    randomize_batch_norms(model, g)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                # torch starts these biases at zero; random ones check the q/k/v row split.
                m.in_proj_bias.normal_(0, 0.1, generator=g)
                m.out_proj.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    freeze_batch_norms(model.backbone)
    return model.eval()


def _config_json(v: dict) -> dict:
    """The released `config_new.json` fields for variant `v` (plus some it does not use)."""
    return {
        "arch": "Q2L-R101-448",
        "img_size": IMAGE,
        "num_class": K,
        "hidden_dim": v["d"],
        "dim_feedforward": v["ffn"],
        "nheads": v["heads"],
        "enc_layers": v["enc"],
        "dec_layers": v["dec"],
        "dropout": 0.1,
        "pre_norm": False,
        "position_embedding": "sine",
        "backbone": "resnet101",
        "keep_input_proj": v["proj"],
        "keep_first_self_attn_dec": v["first"],
        "keep_other_self_attn_dec": v["other"],
        "gamma_neg": 4.0,
        "gamma_pos": 0.0,
    }


def _save_release(model: TorchQ2L, v: dict, tmp_path):
    ckpt = tmp_path / "checkpoint.pkl"
    state = {f"module.{k}": t for k, t in model.state_dict().items()}
    torch.save(
        {
            "epoch": 7,
            "arch": "Q2L-R101-448",
            "state_dict": state,
            "best_mAP": 84.9,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        },
        ckpt,
    )
    cfg = tmp_path / "config_new.json"
    cfg.write_text(json.dumps(_config_json(v)))
    return ckpt, cfg


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_release_converts_and_matches_torch(variant, tmp_path, capsys):
    v = VARIANTS[variant]
    tm = _torch_model(v, 0)
    ckpt, cfg = _save_release(tm, v, tmp_path)
    out = tmp_path / "converted"
    summary = convert_file("q2l", ckpt, out, {"config": str(cfg)})
    settings = summary["settings"]
    model = core.build_fields(settings)
    assert settings["assumed"] == {}
    assert (settings["num_classes"], settings["image_size"]) == (K, IMAGE)
    assert (model["hidden_dim"], model["num_heads"], model["ffn_dim"]) == (
        v["d"],
        v["heads"],
        v["ffn"],
    )
    assert (model["enc_layers"], model["dec_layers"]) == (v["enc"], v["dec"])
    assert model["keep_input_proj"] is v["proj"]
    assert (model["keep_first_self_attn_dec"], model["keep_other_self_attn_dec"]) == (
        v["first"],
        v["other"],
    )
    assert model["backbone_kwargs"] == {"layers": [1, 1, 1, 1], "width": WIDTH}
    assert settings["loss"]["gamma_neg"] == 4.0  # the loss fields come from the json too

    rel = _relative_logit_difference(out, tm)
    assert rel < RTOL, f"max relative logit difference {rel:.2e}"
    with capsys.disabled():
        print(f"\nQuery2Label ({variant}): max relative logit diff {rel:.2e}")


def _relative_logit_difference(out, tm: TorchQ2L) -> float:
    """The largest logit difference between the converted weights in `out` and `tm`, relative
    to the largest torch logit, on three random images."""
    module = core.load_converted(out)
    x = np.random.default_rng(1).normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)
    with torch.no_grad():
        want = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x)["logits"])(module, jnp.asarray(x)))
    return float(np.abs(got - want).max() / np.abs(want).max())


def _save_as_main_mlc(model: TorchQ2L, v: dict, tmp_path, **extra):
    """The container the official `main_mlc.py` saves: epoch, arch, the DDP-wrapped state dict
    (`module.` keys), `best_mAP` as the numpy.float64 its mAP function returns, and the AdamW
    state (one step at lr 0, so that it holds moments and leaves the weights as they are)."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=1e-2)
    model(torch.ones(1, 3, IMAGE, IMAGE)).sum().backward()
    opt.step()
    model.zero_grad()
    ckpt = tmp_path / "model_best.pth.tar"
    torch.save(
        {
            "epoch": 8,
            "arch": "Q2L-R101-448",
            "state_dict": {f"module.{k}": t for k, t in model.state_dict().items()},
            "best_mAP": np.float64(84.93),
            "optimizer": opt.state_dict(),
            **extra,
        },
        ckpt,
    )
    cfg = tmp_path / "config_new.json"
    cfg.write_text(json.dumps(_config_json(v)))
    return ckpt, cfg


def test_official_container_converts_through_the_cli(tmp_path, capsys):
    v = VARIANTS["released"]
    tm = _torch_model(v, 4)
    ckpt, cfg = _save_as_main_mlc(tm, v, tmp_path)
    out = tmp_path / "converted"
    argv = ["--source", "q2l", "--input", str(ckpt), "--output", str(out)]
    assert main([*argv, "--option", f"config={cfg}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{ckpt} -> {out}: ")
    assert lines[1:] == [
        "note: container: weights under 'state_dict'; other entries: epoch=8; "
        "arch='Q2L-R101-448'; best_mAP=84.93 (numpy.float64); "
        "optimizer=mapping of 2 (state, param_groups)"
    ]
    rel = _relative_logit_difference(out, tm)
    assert rel < RTOL, f"max relative logit difference {rel:.2e}"


def test_container_with_other_objects_is_refused_unless_trusted(tmp_path, capsys, caplog):
    v = VARIANTS["released"]
    tm = _torch_model(v, 5)
    args = argparse.Namespace(lr=1e-4, img_size=IMAGE)
    ckpt, cfg = _save_as_main_mlc(tm, v, tmp_path, args=args)
    out = tmp_path / "converted"
    argv = ["--source", "q2l", "--input", str(ckpt), "--output", str(out)]
    argv += ["--option", f"config={cfg}"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {ckpt}: refused by torch.load(weights_only=True): it holds the global "
        "argparse.Namespace, which is not allowed; if you trust the file, pass --option "
        "trust_pickle=true (it then runs any code pickled in the file)\n"
    )
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger="mlgraph.convert.io"):
        assert main([*argv, "--option", "trust_pickle=true"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{ckpt}: trust_pickle=true: loading with weights_only=False, which executes any code "
        "pickled in the file"
    ]
    notes = capsys.readouterr().out.splitlines()[1:]
    assert notes == [
        "note: container: weights under 'state_dict'; other entries: epoch=8; "
        "arch='Q2L-R101-448'; best_mAP=84.93 (numpy.float64); "
        "optimizer=mapping of 2 (state, param_groups); args=argparse.Namespace"
    ]
    assert _relative_logit_difference(out, tm) < RTOL


def test_frozen_batch_norm_affine_is_never_trained():
    """FrozenBatchNorm2d keeps its scale and shift as buffers; here they are the batch norms'
    Params, which the official recipe's `optimizer.frozen` leaves out of training: a train step
    moves neither them (nor the running statistics, `frozen_bn`) but does move the rest, and
    the trainable count excludes them."""
    c = recipes.q2l(dataset="coco2014", image_size=64)
    c.dtype = "float32"
    c.model = recipes.model_config(
        "q2l",
        backbone="resnet50",
        backbone_kwargs={"layers": (1, 1, 1, 1), "width": 4},
        hidden_dim=128,
        ffn_dim=64,
    )
    assert tuple(c.optimizer.frozen) == recipes.Q2L_FROZEN_BACKBONE
    mod, graphdef, tx, state = train_state.init_train_state(c, 3, 10)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32),
        "labels": jnp.asarray(rng.random((4, 3)) < 0.5, jnp.float32),
        "index": jnp.arange(4),
    }
    new, _ = jax.jit(train_step.make_train_step(mod, graphdef, tx, c, 10))(state, batch)

    def flat(tree):
        return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(tree)}

    before, after = flat(state["params"]), flat(new["params"])
    affine = {p for p in before if re.fullmatch(r"backbone/(.*/)?(bn\d+|downsample_bn)/.*", p)}
    assert len(affine) == 2 * (1 + 4 * 4)  # scale and bias of bn1 and 4 BNs in each block
    frozen = {p for p in before if any(re.fullmatch(f, p) for f in c.optimizer.frozen)}
    assert affine <= frozen
    for p in frozen:
        np.testing.assert_array_equal(after[p], before[p], err_msg=p)
    moved = {p for p in before if not np.array_equal(after[p], before[p])}
    assert {"query_embed", "fc/weight", "backbone/layer2/0/conv1/kernel"} <= moved
    stats_before, stats_after = flat(state["rest"]), flat(new["rest"])
    for p in stats_before:
        np.testing.assert_array_equal(stats_after[p], stats_before[p], err_msg=p)
    total = sum(v.size for v in before.values())
    trainable = total - sum(before[p].size for p in frozen)
    assert optim.trainable_size(state["params"], c.optimizer) == trainable


def test_settings_from_weights_alone_and_option_overrides(tmp_path):
    v = VARIANTS["released"]
    sd = {
        f"module.{k}": t
        for k, t in core.to_numpy_state_dict(_torch_model(v, 1).state_dict()).items()
    }
    _, settings = convert_q2l.convert(sd, {})
    # The head count is not in the weights: the README recipe's 4 is taken and said so; the
    # size comes from the stored table (3x3 -> 96).
    assert settings["assumed"] == {"num_heads": 4}
    assert (settings["model"]["num_heads"], settings["image_size"]) == (4, IMAGE)
    _, settings = convert_q2l.convert(sd, {"num_heads": 8, "image_size": 576})
    assert settings["assumed"] == {}
    assert (settings["model"]["num_heads"], settings["image_size"]) == (8, 576)


def test_conversion_errors(tmp_path):
    v = VARIANTS["released"]
    tm = _torch_model(v, 2)
    sd = core.to_numpy_state_dict(tm.state_dict())
    cfg = tmp_path / "config_new.json"

    def convert(state, **fields):
        cfg.write_text(json.dumps(_config_json(v) | fields))
        return convert_q2l.convert(state, {"config": str(cfg), "prefix": ""})

    with pytest.raises(core.ConversionError) as e:
        convert(sd, hidden_dim=2048)
    assert str(e.value) == f"{cfg}: hidden_dim: 2048, but the weights imply 128"
    with pytest.raises(core.ConversionError) as e:
        convert(sd, pre_norm=True)
    assert str(e.value) == (
        f"{cfg}: pre_norm: true is not supported (only the post-norm layers of the released "
        "models are ported)"
    )
    with pytest.raises(core.ConversionError) as e:
        convert(sd, nheads=3)
    assert str(e.value) == "num_heads 3 does not divide hidden_dim 128"
    tresnet = {k.replace("backbone.0.body.", "backbone.0.body.body."): t for k, t in sd.items()}
    with pytest.raises(core.ConversionError) as e:
        convert(tresnet)
    assert str(e.value).startswith(
        "no 'backbone.0.body.conv1.weight': only ResNet backbones are supported (TResNet, Swin "
        "and CvT are not ported); backbone keys start with backbone.0.body.body"
    )
    with pytest.raises(core.ConversionError) as e:
        convert({k: t for k, t in sd.items() if k != "fc.W"})
    assert str(e.value).startswith("not a Query2Label state dict: missing fc.W")
    broken = dict(sd)
    broken["backbone.1.pe"] = sd["backbone.1.pe"] + 0.5
    with pytest.raises(core.ConversionError) as e:
        convert(broken)
    assert str(e.value) == "backbone.1.pe differs from the sine table by up to 0.5"
    broken = dict(sd)
    broken["transformer.decoder.layers.1.linear2.weight"] = np.zeros((128, 7), np.float32)
    with pytest.raises(core.ConversionError, match=r"wrong shapes \(1\): transformer.decoder"):
        convert(broken)
    extra = dict(sd) | {"transformer.decoder.layers.1.norm1.weight": np.ones(128, np.float32)}
    with pytest.raises(core.ConversionError, match=r"unexpected .*decoder.layers.1.norm1.weight"):
        convert(extra)


def test_initialisation_follows_the_official_code():
    cfg = recipes.model_config(
        "q2l",
        backbone="resnet50",
        backbone_kwargs={"layers": (1, 1, 1, 1), "width": 4},
        hidden_dim=128,
        ffn_dim=512,
        dec_layers=1,
    )
    m = models.build(cfg, num_classes=40, image_size=64, rngs=nnx.Rngs(0))
    # Transformer matrices: xavier-uniform over torch's shapes (the fused in-projection 3D x D).
    for kernel, bound in (
        (m.decoder[0].linear1.kernel, math.sqrt(6 / (128 + 512))),
        (m.encoder[0].self_attn.out_proj.kernel, math.sqrt(6 / 256)),
        (m.encoder[0].self_attn.q_proj.kernel, math.sqrt(6 / (4 * 128))),
    ):
        w = np.asarray(kernel[...])
        assert bound * 0.97 < np.abs(w).max() <= bound
    q = np.asarray(m.query_embed[...])
    assert abs(q.std() - 1.0) < 0.05 and abs(q.mean()) < 0.05  # nn.Embedding's N(0, 1)
    fc = np.asarray(m.fc.weight[...])
    assert 0.97 / math.sqrt(128) < np.abs(fc).max() <= 1 / math.sqrt(128)


def test_runs_at_any_resolution_and_rejects_a_mismatched_width():
    cfg = recipes.model_config(
        "q2l",
        backbone="resnet50",
        backbone_kwargs={"layers": (1, 1, 1, 1), "width": 4},
        hidden_dim=128,
        ffn_dim=64,
    )
    m = models.build(cfg, num_classes=3, image_size=64, rngs=nnx.Rngs(0))
    for size in (64, 160):
        out = m(jnp.ones((1, size, size, 3)))
        assert out["logits"].shape == (1, 3) and out["label_feats"].shape == (1, 3, 128)
    cfg.hidden_dim = 96
    with pytest.raises(ConfigError) as e:
        models.build(cfg, num_classes=3, image_size=64, rngs=nnx.Rngs(0))
    assert str(e.value) == (
        "config.model.hidden_dim=96 differs from the backbone's 128 channels: set "
        "config.model.keep_input_proj=True (a 1x1 projection) or hidden_dim=128"
    )


def test_training_from_a_converted_checkpoint_checks_the_architecture(tmp_path):
    v = VARIANTS["released"]
    ckpt, cfg = _save_release(_torch_model(v, 3), v, tmp_path)
    convert_file("q2l", ckpt, tmp_path / "w", {"config": str(cfg)})
    c = config_lib.base_config()
    c.image_size = IMAGE
    c.init_from = str(tmp_path / "w")
    c.model = recipes.model_config(
        "q2l",
        backbone="resnet50",
        backbone_kwargs={"layers": (1, 1, 1, 1), "width": WIDTH},
        hidden_dim=v["d"],
        num_heads=v["heads"],
        ffn_dim=v["ffn"],
    )
    _, _, params, _ = train_state.create_model(c, K)
    np.testing.assert_array_equal(
        np.asarray(params["query_embed"][...]),
        np.asarray(_torch_model(v, 3).query_embed.weight.detach()),
    )
    # Same shapes, other head count: the outputs would differ silently, so it is refused.
    c.model.num_heads = 8
    with pytest.raises(ConfigError) as e:
        train_state.create_model(c, K)
    assert str(e.value) == (
        f"config.init_from={tmp_path / 'w'}: the checkpoint's model differs from config.model in "
        "num_heads (checkpoint 4, config 8); set these config.model fields as in its settings.json"
    )
    c.model = recipes.model_config("mlgcn", embed_dim=4)
    with pytest.raises(ConfigError) as e:
        train_state.create_model(c, K)
    assert str(e.value) == (
        f"config.init_from={tmp_path / 'w'}: holds a 'q2l' model, but config.model.name='mlgcn'"
    )
