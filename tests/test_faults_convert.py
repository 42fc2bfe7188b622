"""Converter faults (issue 32, items 10 and 12): every setting a converter assumes is named in
its warning line with the value the conversion used, and `--strict` refuses it; overrides given
to `load_converted` are applied or refused in one line; a checkpoint file cut short is called
truncated. Each fault leaves what was written before it as it was.

The checkpoints are tiny and synthetic: the package's plain-torch models of the methods
(`mlgraph.torch_reference`, tests/sigrl_reference.py) at one block per
ResNet stage and width 4, and shape-only state dicts for the backbone sources.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from flax import nnx

from mlgraph import models
from mlgraph.convert import SOURCES, assumed_settings, convert_file, core, io, mlgcn
from mlgraph.convert.__main__ import main
from mlgraph.torch_reference.layers import TorchResNetTrunk

torch = pytest.importorskip("torch")

C, E = 3, 6


def _numpy(model) -> dict[str, np.ndarray]:
    return core.to_numpy_state_dict(model.state_dict())


def _words(tmp_path) -> str:
    """Word vectors [C, E] in a .npy, as the SSGRL and ML-GCN options take them."""
    path = tmp_path / "vectors.npy"
    np.save(path, np.random.default_rng(0).normal(size=(C, E)).astype(np.float32))
    return str(path)


# ------------------------------------------------------------------ one tiny checkpoint a source
def _salgl(tmp_path):
    from mlgraph.torch_reference import salgl

    torch.manual_seed(0)
    cfg = models.model_config(
        "salgl",
        backbone="resnet50",
        backbone_kwargs={"layers": (1, 1, 1, 1), "width": 4},
        num_scenes=2,
        embed_dim=E,
        num_steps=1,
        pos=False,
        ffn_dim=16,
        att_dim=8,
    )
    model = salgl.from_config(cfg, C, 64)
    return {f"module.{k}": v for k, v in _numpy(model).items()}, {}


def _ssgrl(tmp_path):
    from mlgraph.torch_reference import ssgrl

    torch.manual_seed(0)
    words = np.load(_words(tmp_path))
    graph = np.full((C, C), 0.5, np.float32)
    np.save(tmp_path / "graph.npy", graph)
    model = ssgrl.TorchSSGRL(ssgrl.TorchResNet((1, 1, 1, 1), 4), words, graph, att_dim=8)
    options = {
        "embed_path": str(tmp_path / "vectors.npy"),
        "graph_path": str(tmp_path / "graph.npy"),
    }
    return _numpy(model), options


def _mlgcn(tmp_path):
    torch.manual_seed(0)
    trunk = _numpy(TorchResNetTrunk((1, 1, 1, 1), 4))
    sd = {mlgcn.official_key(k): v for k, v in trunk.items()}
    rng = np.random.default_rng(0)
    sd["gc1.weight"] = rng.normal(size=(E, 8)).astype(np.float32)
    sd["gc2.weight"] = rng.normal(size=(8, 128)).astype(np.float32)
    sd["A"] = np.eye(C, dtype=np.float32)
    return sd, {"embed_path": _words(tmp_path)}


def _q2l(tmp_path):
    from mlgraph.torch_reference.q2l import TorchQ2L

    torch.manual_seed(0)
    model = TorchQ2L(
        (1, 1, 1, 1),
        4,
        num_classes=C,
        image_size=64,
        d=16,
        heads=2,
        ffn=16,
        enc=1,
        dec=1,
        keep_input_proj=True,
        keep_first=True,
        keep_other=False,
    )
    return _numpy(model), {}


def _scob(tmp_path):
    from mlgraph.torch_reference.scob import TorchScob

    torch.manual_seed(0)
    model = TorchScob(
        layers=(1, 1, 1, 1), width=8, dim=16, heads=2, ffn=16, num_classes=C, num_train=4
    )
    return _numpy(model), {}


def _sigrl(tmp_path):
    from sigrl_reference import random_clipvit

    model = random_clipvit(
        0, image=32, patch=16, width=64, layers=1, heads=1, embed=16, gat_hidden=8, gat_heads=2
    )
    return _numpy(model), {}


def _timm_vit(tmp_path, width: int = 96):
    """The keys `timm_vit.infer_settings` reads, of a ViT `width` wide (not a timm width)."""
    return {
        "patch_embed.proj.weight": np.zeros((width, 3, 8, 8), np.float32),
        "pos_embed": np.zeros((1, 5, width), np.float32),
        "cls_token": np.zeros((1, 1, width), np.float32),
        "blocks.0.mlp.fc1.weight": np.zeros((4 * width, width), np.float32),
    }, {}


def _bert(tmp_path, hidden: int = 96):
    """The keys `bert.infer_settings` reads, of an encoder `hidden` wide (not a standard one)."""
    return {
        "embeddings.word_embeddings.weight": np.zeros((50, hidden), np.float32),
        "embeddings.position_embeddings.weight": np.zeros((16, hidden), np.float32),
        "embeddings.token_type_embeddings.weight": np.zeros((2, hidden), np.float32),
        "encoder.layer.0.intermediate.dense.weight": np.zeros((4 * hidden, hidden), np.float32),
    }, {}


# source -> (checkpoint builder, what the conversion must list as assumed, with the values).
ASSUMED = {
    "salgl": (
        _salgl,
        {
            "clip": 0.0,
            "comat_ema": True,
            "embed_type": "bert",  # get_args' default; the build field is "checkpoint"
            "gamma_neg": 2.0,
            "gamma_pos": 0.0,
            "ignore_self": False,
            "image_size": 448,
            "lamda": 1.0,
            "loss": "asl",
            "normalize": True,
            "num_steps": 3,
            "soft": False,
        },
    ),
    "ssgrl": (_ssgrl, {"image_size": 576}),
    "mlgcn": (_mlgcn, {"image_size": 448}),
    "q2l": (_q2l, {"num_heads": 4}),
    "scob": (_scob, {"image_size": 448}),
    "sigrl": (_sigrl, {"num_classes": 1006, "topk": 16}),
    "timm_vit": (_timm_vit, {"num_heads": 1}),
    "bert": (_bert, {"num_heads": 1}),
}
# The sources that assume nothing: every setting is in their weights.
NOTHING_ASSUMED = {"torchvision_resnet", "torchvision_mobilenet_v2", "openai_clip"}


def _used(settings: dict, field: str):
    """The value the converted settings hold for `field` (top level, model, build or loss)."""
    if field == "loss":
        return settings["loss"]["name"]
    for part in ("model", "build", "loss"):
        if field in settings.get(part, {}):
            return settings[part][field]
    return settings[field]


def _settings(source: str, state_dict, options) -> dict:
    """The settings `source` gives `state_dict`: its `convert` for a method, else (shape-only
    backbones) its `infer_settings`, which is what its `convert` returns."""
    table = importlib.import_module(SOURCES[source])
    if source in ("timm_vit", "bert"):
        return table.infer_settings(state_dict)
    return table.convert(state_dict, options)[1]


def test_every_source_is_in_the_table():
    assert set(ASSUMED) | NOTHING_ASSUMED == set(SOURCES)


@pytest.mark.parametrize("source", sorted(ASSUMED))
def test_each_assumed_setting_is_listed_with_the_value_used(source, tmp_path):
    build, expected = ASSUMED[source]
    state_dict, options = build(tmp_path)
    settings = _settings(source, state_dict, options)
    assert settings["assumed"] == expected
    if source == "salgl":
        # The official 'bert' table is a fixed buffer, kept as the checkpoint's own.
        assert settings["build"]["embed_type"] == "checkpoint"
        expected = {k: v for k, v in expected.items() if k != "embed_type"}
    assert {field: _used(settings, field) for field in expected} == expected
    assert assumed_settings(settings) == [
        f"{f}={json.dumps(v)}" for f, v in sorted(ASSUMED[source][1].items())
    ]


@pytest.mark.parametrize("source", ["ssgrl", "mlgcn", "q2l", "scob", "sigrl", "timm_vit", "bert"])
def test_the_assumed_settings_given_as_options_leave_nothing_assumed(source, tmp_path):
    """Each assumed setting of a source without a config file is an option of that name (what
    the warning tells the user to pass), and passing it assumes nothing."""
    build, expected = ASSUMED[source]
    table = importlib.import_module(SOURCES[source])
    assert set(expected) <= set(table.OPTIONS)
    state_dict, options = build(tmp_path)
    if source in ("timm_vit", "bert"):
        settings = table.infer_settings(state_dict, **expected)
    else:
        settings = table.convert(state_dict, options | expected)[1]
    assert not settings.get("assumed")
    assert {field: _used(settings, field) for field in expected} == expected


def _save(state_dict, path) -> None:
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path)


@pytest.mark.parametrize(
    "source, named, fix",
    [
        (
            "salgl",
            'clip=0.0, comat_ema=true, embed_type="bert", gamma_neg=2.0, gamma_pos=0.0, '
            'ignore_self=false, image_size=448, lamda=1.0, loss="asl", normalize=true, '
            "num_steps=3, soft=false",
            "pass --option config_yaml=FILE (the official config.yaml)",
        ),
        ("mlgcn", "image_size=448", "pass --option image_size=VALUE"),
        ("scob", "image_size=448", "pass --option image_size=VALUE"),
        (
            "sigrl",
            "num_classes=1006, topk=16",
            "pass --option num_classes=VALUE --option topk=VALUE",
        ),
    ],
    ids=["salgl", "mlgcn", "scob", "sigrl"],
)
def test_strict_refuses_and_the_warning_names_the_values(source, named, fix, tmp_path, capsys):
    state_dict, options = ASSUMED[source][0](tmp_path)
    ckpt = tmp_path / "checkpoint.pth"
    _save(state_dict, ckpt)
    what = f"{ckpt}: settings that neither the weights nor a config file give: {named}"
    argv = ["--source", source, "--input", str(ckpt)]
    for key, value in options.items():
        argv += ["--option", f"{key}={value}"]

    assert main([*argv, "--output", str(tmp_path / "strict"), "--strict"]) == 2
    assert capsys.readouterr().err == f"error: {what}; {fix} (--strict)\n"
    assert not (tmp_path / "strict").exists()

    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err == (
        f"warning: {what} (assumed: the defaults); {fix}, or --strict to refuse\n"
    )
    saved = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert saved["assumed"] == ASSUMED[source][1]


def test_a_448_ssgrl_checkpoint_is_not_silently_converted_for_576(tmp_path, capsys):
    """Official SSGRL files hold neither the size nor anything that implies it: without the
    option the 576 taken is named (and refused with --strict); with it, the settings that
    `predict` and `evaluate` size their images by say 448."""
    state_dict, options = _ssgrl(tmp_path)
    ckpt = tmp_path / "model_best_448.pth.tar"
    _save(state_dict, ckpt)
    argv = ["--source", "ssgrl", "--input", str(ckpt)]
    argv += ["--option", f"embed_path={options['embed_path']}"]
    argv += ["--option", f"graph_path={options['graph_path']}"]
    what = f"{ckpt}: settings that neither the weights nor a config file give: image_size=576"

    assert main([*argv, "--output", str(tmp_path / "strict"), "--strict"]) == 2
    assert capsys.readouterr().err == (
        f"error: {what}; pass --option image_size=VALUE (--strict)\n"
    )
    assert not (tmp_path / "strict").exists()

    assert main([*argv, "--output", str(tmp_path / "assumed")]) == 0
    assert capsys.readouterr().err == (
        f"warning: {what} (assumed: the defaults); pass --option image_size=VALUE, or --strict "
        "to refuse\n"
    )
    settings = json.loads((tmp_path / "assumed" / "settings.json").read_text())
    assert (settings["image_size"], settings["assumed"]) == (576, {"image_size": 576})

    assert main([*argv, "--output", str(tmp_path / "448"), "--option", "image_size=448"]) == 0
    assert capsys.readouterr().err == ""
    settings = json.loads((tmp_path / "448" / "settings.json").read_text())
    assert (settings["image_size"], settings["assumed"]) == (448, {})
    # The conversions before are kept as written.
    assert json.loads((tmp_path / "assumed" / "settings.json").read_text())["image_size"] == 576


# ------------------------------------------------------------------------------ load_converted
@pytest.fixture(scope="module")
def converted_salgl(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("salgl")
    state_dict, _ = _salgl(tmp_path)
    ckpt = tmp_path / "ema_best_model.pth"
    _save(state_dict, ckpt)
    (tmp_path / "config.yaml").write_text("comat_ema: False\n")
    out = tmp_path / "converted"
    convert_file("salgl", ckpt, out)
    return out


def test_load_converted_applies_overrides_of_build_fields(converted_salgl):
    settings = json.loads((converted_salgl / "settings.json").read_text())
    assert (settings["build"]["dropout"], settings["build"]["comat_ema"]) == (0.1, False)
    module = core.load_converted(converted_salgl)
    assert (module.dropout_rate, module.comat_ema) == (0.1, False)
    module = core.load_converted(converted_salgl, dropout=0.0, comat_ema=True, normalize=False)
    assert (module.dropout_rate, module.comat_ema, module.normalize) == (0.0, True, False)
    assert isinstance(module.embeddings, nnx.Variable) and not isinstance(
        module.embeddings, nnx.Param
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"embed_path": "other.npy"},
            "{out}: embed_path='other.npy' cannot be overridden: the checkpoint holds the values "
            "that file would give (its settings.json has embed_path=''); leave it out, or "
            "convert again with the other file",
        ),
        (
            {"embed_dim": 5},
            "{out}: the checkpoint has no attention/linear2/kernel of shape (5, 8) (found "
            "(6, 8)); overriding embed_dim=5 changes the model's variables: leave it out",
        ),
        (
            {"att_dim": 4, "dropout": 0.0},
            "{out}: the checkpoint has no attention/hidden_linear/bias of shape (4,) (found "
            "(8,)); overriding att_dim=4, dropout=0.0 changes the model's variables: leave them "
            "out",
        ),
        (
            {"dropuot": 0.0},
            "{out}: config.model: unknown salgl field(s) dropuot; valid fields: {valid}",
        ),
    ],
    ids=["file-held-by-the-checkpoint", "shape", "shapes", "unknown"],
)
def test_load_converted_refuses_in_one_line(converted_salgl, fields, message):
    before = (converted_salgl / "settings.json").read_text()
    with pytest.raises(core.ConversionError) as e:
        core.load_converted(converted_salgl, **fields)
    valid = ", ".join(sorted(set(models.field_defaults("salgl")) - {"name"}))
    assert str(e.value) == message.format(out=converted_salgl, valid=valid)
    # Nothing of the checkpoint changed: it still loads as converted.
    assert (converted_salgl / "settings.json").read_text() == before
    assert core.load_converted(converted_salgl).dropout_rate == 0.1


def test_load_converted_refuses_an_override_that_leaves_weights_unused(tmp_path):
    state_dict, _ = _q2l(tmp_path)
    ckpt = tmp_path / "checkpoint.pkl"
    _save(state_dict, ckpt)
    out = tmp_path / "converted"
    convert_file("q2l", ckpt, out, {"num_heads": 2})
    with pytest.raises(core.ConversionError) as e:
        core.load_converted(out, keep_first_self_attn_dec=False)
    assert str(e.value) == (
        f"{out}: the model built has no variable for the checkpoint's decoder/0/norm1/bias, "
        "decoder/0/norm1/scale, decoder/0/self_attn/k_proj/bias, "
        "decoder/0/self_attn/k_proj/kernel, decoder/0/self_attn/out_proj/bias, ...; overriding "
        "keep_first_self_attn_dec=False changes the model's variables: leave it out"
    )
    # A field that changes no weight is applied.
    assert core.load_converted(out, num_heads=4).decoder[0].multihead_attn.num_heads == 4


# ------------------------------------------------------------------------------- truncated files
def _cut(path, fraction: float):
    data = path.read_bytes()
    cut = path.with_name(f"cut-{path.name}")
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut, int(len(data) * fraction)


def _writers(tmp_path, state_dict):
    """One file of each format `read_checkpoint` reads, holding `state_dict`."""
    from safetensors.numpy import save_file

    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}
    torch.save(tensors, tmp_path / "zip.pth")
    torch.save(tensors, tmp_path / "legacy.pth.tar", _use_new_zipfile_serialization=False)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp_path / "w.safetensors"
    )
    np.savez(tmp_path / "w.npz", **state_dict)
    return {
        "zip.pth": "torch.save",
        "legacy.pth.tar": "torch.save",
        "w.safetensors": "safetensors",
        "w.npz": "numpy",
    }


@pytest.mark.parametrize("fraction", [0.0, 0.002, 0.5, 0.999])
def test_a_truncated_checkpoint_is_called_truncated(tmp_path, capsys, fraction):
    state_dict, options = _mlgcn(tmp_path)
    for name, writer in _writers(tmp_path, state_dict).items():
        good = tmp_path / name
        cut, size = _cut(good, fraction)
        argv = ["--source", "mlgcn", "--option", f"embed_path={options['embed_path']}"]
        argv += ["--option", "image_size=448", "--input", str(cut)]
        out = tmp_path / f"out-{name}"
        assert main([*argv, "--output", str(out)]) == 2, name
        assert capsys.readouterr().err == (
            f"error: {cut}: truncated: the file ends after {size:,} bytes, before the end of "
            f"what {writer} wrote; copy or download it again\n"
        )
        assert not out.exists()
        assert good.stat().st_size > size  # the whole file is still there, and converts
        assert io.read_state_dict(good).keys() == state_dict.keys()


def test_a_truncated_array_file_is_called_truncated(tmp_path):
    """`read_array` (SigRL's `label_emb.pt`): a torch file or .npy cut short."""
    np.save(tmp_path / "labels.npy", np.ones((C, E), np.float32))
    torch.save(torch.ones(C, E), tmp_path / "labels.pt")
    for name, writer in (("labels.npy", "numpy"), ("labels.pt", "torch.save")):
        cut, size = _cut(tmp_path / name, 0.7)
        with pytest.raises(core.ConversionError) as e:
            io.read_array(cut)
        assert str(e.value) == (
            f"{cut}: truncated: the file ends after {size:,} bytes, before the end of what "
            f"{writer} wrote; copy or download it again"
        )


def test_a_damaged_file_of_full_length_is_not_called_truncated(tmp_path):
    state_dict, _ = _mlgcn(tmp_path)
    _writers(tmp_path, state_dict)
    data = bytearray((tmp_path / "legacy.pth.tar").read_bytes())
    data[100] = 0xFF
    (tmp_path / "damaged.pth").write_bytes(bytes(data))
    with pytest.raises(core.ConversionError) as e:
        io.read_state_dict(tmp_path / "damaged.pth")
    assert str(e.value).startswith(f"{tmp_path / 'damaged.pth'}: not a torch checkpoint (")
    assert not io.cut_short(tmp_path / "damaged.pth")
    for name in ("zip.pth", "legacy.pth.tar", "w.safetensors", "w.npz"):
        assert not io.cut_short(tmp_path / name), name


def test_a_cut_label_file_is_one_line(tmp_path):
    """Word vectors given to a converter (and to `config.model.embed_path`) in a `.npz` cut
    short: a one-line error, not numpy's BadZipFile traceback."""
    from mlgraph.errors import ConfigError
    from mlgraph.labels.embeddings import load_embeddings

    np.savez(tmp_path / "vectors.npz", np.ones((C, E), np.float32))
    cut, _ = _cut(tmp_path / "vectors.npz", 0.5)
    with pytest.raises(ConfigError) as e:
        load_embeddings(str(cut), C, E)
    assert str(e.value) == (
        f"config.model.embed_path={cut}: not a readable .npz file (File is not a zip file)"
    )
    assert load_embeddings(str(tmp_path / "vectors.npz"), C, E).shape == (C, E)
