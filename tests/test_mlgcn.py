"""ML-GCN: official-layout checkpoint -> mlgraph ML-GCN, against a plain-torch ML-GCN written from
docs/ssgrl_mlgcn.md.

The torch model (`mlgraph.torch_reference.mlgcn`, here with a reduced ResNet: width 4, one block
a stage) follows docs/ssgrl_mlgcn.md §3 with the official names: `features` (a Sequential
conv1, bn1, relu, maxpool, layer1..4 of a torchvision-style ResNet), `pooling` (MaxPool2d over
the whole map), `gc1`/`gc2` (bias-free GraphConvolution, weight (in, out)), `relu` (LeakyReLU
0.2) and the Parameter `A` from `gen_A`; `gen_adj` each forward. The
correlation statistics are checked against `gen_A`/`gen_adj` written from docs/ssgrl_mlgcn.md
§3.1. The released code's pooling is `MaxPool2d(14, 14)`, a global max at 448 px only: the
parity tests run at 448 px, and at 576 px (an 18x18 map) against that fixed window.
"""

from __future__ import annotations

import argparse
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_reference import PYTHON2, randomize_batch_norms

from mlgraph import models, recipes
from mlgraph.convert import core, io
from mlgraph.convert import mlgcn as convert_mlgcn
from mlgraph.convert.__main__ import main
from mlgraph.errors import ConfigError
from mlgraph.labels import arrays, cooccurrence
from mlgraph.labels.__main__ import main as labels_main
from mlgraph.labels.embeddings import load_embeddings
from mlgraph.models import mlgcn
from mlgraph.torch_reference.mlgcn import TorchMLGCN

torch = pytest.importorskip("torch")
nn = torch.nn

RTOL = 1e-4
C, E, HIDDEN, IMAGE = 6, 10, 24, 96
GMP_IMAGE = 448  # a 14x14 map: the released MaxPool2d(14, 14) is a global max


def gen_a(adj: np.ndarray, nums: np.ndarray, t: float, p: float = 0.25) -> np.ndarray:
    """The official `gen_A` steps (docs/ssgrl_mlgcn.md §3.1) on {'adj', 'nums'}."""
    a = adj / nums[:, None]
    a[a < t] = 0
    a[a >= t] = 1
    a = a * p / (a.sum(0, keepdims=True) + 1e-6)
    return a + np.identity(len(nums))


def _setup(seed: int, tmp_path):
    rng = np.random.default_rng(seed)
    y = (rng.random((60, C)) < 0.4).astype(np.float32)
    y[:8, 0] = y[:8, 1] = 1  # a strong pair, so that some P(j|i) pass tau
    counts = cooccurrence.counts_from_labels(y)
    a = cooccurrence.mlgcn_correlation(counts, 0.4, 0.25)
    words = rng.normal(size=(C, E)).astype(np.float32)
    np.save(tmp_path / "words.npy", words)
    torch.manual_seed(seed)
    model = TorchMLGCN((1, 1, 1, 1), 4, a, words, hidden=HIDDEN)
    randomize_batch_norms(model, torch.Generator().manual_seed(seed))
    return model.eval(), counts


def test_official_checkpoint_converts_and_matches_torch(tmp_path, capsys):
    tm, _ = _setup(0, tmp_path)
    path = tmp_path / "model_best.pth"
    torch.save(
        {"epoch": 3, "arch": "resnet101", "state_dict": tm.state_dict(), "best_score": 83.0}, path
    )
    sd = io.read_state_dict(path)
    module, settings = convert_mlgcn.convert(
        sd, {"embed_path": str(tmp_path / "words.npy"), "image_size": GMP_IMAGE}
    )
    model = core.build_fields(settings)
    assert settings["num_classes"] == C
    assert (model["embed_dim"], model["hidden_dim"]) == (E, HIDDEN)
    assert model["backbone_kwargs"] == {"layers": [1, 1, 1, 1], "width": 4}
    assert model["pool"] == "official" and settings["notes"] == [convert_mlgcn.POOL_NOTE]
    x = np.random.default_rng(1).normal(size=(3, GMP_IMAGE, GMP_IMAGE, 3)).astype(np.float32)
    with torch.no_grad():
        want = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x)["logits"])(module, jnp.asarray(x)))
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel < RTOL, f"max relative logit difference {rel:.2e}"
    with capsys.disabled():
        print(f"\nML-GCN conversion: max relative logit diff {rel:.2e}")
    rebuilt = nnx.eval_shape(
        lambda: models.build(
            model,
            num_classes=C,
            image_size=IMAGE,
            rngs=nnx.Rngs(0),
        )
    )
    spec = lambda m: {p: tuple(v.shape) for p, v in core.variable_paths(m).items()}  # noqa: E731
    assert spec(rebuilt) == spec(module)


def test_official_container_and_the_pools_at_576(tmp_path, capsys):
    """engine.py's container and the repository's word-vector pickle convert through the CLI;
    at 576 px pool='official' gives the released head (MaxPool2d(14, 14) on the 18x18 map, its
    top-left 14x14) and pool='global' a global max, on the same weights."""
    tm, _ = _setup(3, tmp_path)
    tm.pooling = nn.MaxPool2d(14, 14)
    words = tm.inp.numpy()
    with open(tmp_path / "coco_glove_word2vec.pkl", "wb") as f:
        pickle.dump(words, f)
    state = {k: t for k, t in tm.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "model_best.pth.tar"
    torch.save(  # PyTorch 0.3.1's legacy format, no num_batches_tracked
        {"epoch": 5, "arch": "resnet101", "state_dict": state, "best_score": 83.04},
        path,
        _use_new_zipfile_serialization=False,
    )
    out = tmp_path / "converted"
    argv = ["--source", "mlgcn", "--input", str(path), "--output", str(out)]
    argv += ["--option", f"embed_path={tmp_path / 'coco_glove_word2vec.pkl'}"]
    assert main([*argv, "--option", "image_size=576"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path} -> {out}: ") and '"pool": "official"' in lines[0]
    assert lines[1:] == [
        "note: container: weights under 'state_dict'; other entries: epoch=5; "
        "arch='resnet101'; best_score=83.04",
        f"note: {convert_mlgcn.POOL_NOTE}",
    ]

    x = np.random.default_rng(4).normal(size=(2, 576, 576, 3)).astype(np.float32)
    logits = {}
    for pool, torch_pool in (("official", nn.MaxPool2d(14, 14)), ("global", None)):
        tm.pooling = nn.AdaptiveMaxPool2d(1) if torch_pool is None else torch_pool
        with torch.no_grad():
            want = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        module = core.load_converted(out, pool=pool)
        logits[pool] = np.asarray(nnx.jit(lambda m, x: m(x)["logits"])(module, jnp.asarray(x)))
        rel = float(np.abs(logits[pool] - want).max() / np.abs(want).max())
        assert rel < RTOL, f"pool={pool}: max relative logit difference {rel:.2e}"
    gap = np.abs(logits["official"] - logits["global"]).max() / np.abs(logits["global"]).max()
    assert gap > 1e-3  # the two heads really differ at 576 px

    with pytest.raises(ConfigError) as e:
        core.load_converted(out)(jnp.zeros((1, IMAGE, IMAGE, 3)))
    assert str(e.value) == (
        "config.model.pool='official': the released MaxPool2d(14, 14) classifies only layer4 "
        "maps of 14 to 27 per side (448 to 895 px at stride 32), got 3x3; use pool='global' "
        "at this size"
    )
    with pytest.raises(ConfigError) as e:
        cfg = recipes.model_config("mlgcn", pool="max")
        models.build(cfg, num_classes=C, image_size=64, rngs=nnx.Rngs(0))
    assert str(e.value) == "config.model.pool='max': expected one of global, official"


def test_official_pickles_read_as_their_npy_forms(tmp_path, capsys):
    """ML-GCN's word-vector pickle (here as Python 2.7 wrote it) and adjacency pickle (Python
    3's) give the same arrays as the .npy files the label-embedding tool converts them to, and
    the same model buffers."""
    _, counts = _setup(5, tmp_path)
    words = np.random.default_rng(5).normal(size=(C, E)).astype(np.float32)
    nums = np.diag(counts).astype(np.int64)
    adj = (counts - np.diag(nums)).astype(np.int64)
    with open(tmp_path / "voc_glove_word2vec.pkl", "wb") as f:
        PYTHON2.dump(words, f)
    with open(tmp_path / "voc_adj.pkl", "wb") as f:
        pickle.dump({"adj": adj, "nums": nums}, f)
    with pytest.raises(UnicodeDecodeError):  # why the reader uses latin1
        pickle.loads((tmp_path / "voc_glove_word2vec.pkl").read_bytes())

    converted = (("voc_glove_word2vec", E, "word vectors"), ("voc_adj", C, "co-occurrence counts"))
    for name, width, what in converted:
        src, dst = tmp_path / f"{name}.pkl", tmp_path / f"{name}.npy"
        assert labels_main(["--from_file", str(src), "--output", str(dst)]) == 0
        assert capsys.readouterr().out == f"{dst}: {C} x {width} {what} from {src}\n"
    field = "config.model.embed_path"
    for path in ("voc_glove_word2vec.pkl", "voc_glove_word2vec.npy"):
        np.testing.assert_array_equal(load_embeddings(str(tmp_path / path), C, E), words)
    for path in ("voc_adj.pkl", "voc_adj.npy"):
        np.testing.assert_array_equal(cooccurrence.load_counts(tmp_path / path, C, "graph"), counts)
    np.savez(tmp_path / "words.npz", vectors=words)
    np.testing.assert_array_equal(load_embeddings(str(tmp_path / "words.npz"), C), words)

    def build(**files):
        cfg = recipes.model_config(
            "mlgcn",
            backbone="resnet50",
            backbone_kwargs={"layers": (1, 1, 1, 1), "width": 4},
            hidden_dim=8,
            **{k: str(tmp_path / v) for k, v in files.items()},
        )
        return models.build(cfg, num_classes=C, image_size=64, rngs=nnx.Rngs(0))

    from_pkl = build(embed_path="voc_glove_word2vec.pkl", graph_path="voc_adj.pkl")
    from_npy = build(embed_path="voc_glove_word2vec.npy", graph_path="voc_adj.npy")
    for buffer in ("embeddings", "A"):
        np.testing.assert_array_equal(
            getattr(from_pkl, buffer)[...], getattr(from_npy, buffer)[...]
        )

    # Shapes and contents are checked; errors name the field and the file.
    with pytest.raises(ConfigError) as e:
        load_embeddings(str(tmp_path / "voc_adj.pkl"), C)
    assert str(e.value) == (
        f"{field}={tmp_path / 'voc_adj.pkl'}: holds co-occurrence counts, not label embeddings"
    )
    with pytest.raises(ConfigError) as e:
        load_embeddings(str(tmp_path / "voc_glove_word2vec.pkl"), C + 1)
    assert str(e.value) == (
        f"{field}={tmp_path / 'voc_glove_word2vec.pkl'}: holds an array of shape ({C}, {E}); "
        f"expected [{C + 1}, E] (one row per class)"
    )
    with pytest.raises(ConfigError, match=r"graph=.*voc_adj.npy: counts of shape \(6, 6\)"):
        cooccurrence.load_counts(tmp_path / "voc_adj.npy", C - 1, "graph")
    with open(tmp_path / "args.pkl", "wb") as f:
        pickle.dump(argparse.Namespace(lr=0.1), f)
    with pytest.raises(ConfigError) as e:
        load_embeddings(str(tmp_path / "args.pkl"), C)
    assert str(e.value) == (
        f"{field}={tmp_path / 'args.pkl'}: not a readable .pkl file (refused the global "
        "argparse.Namespace (only numpy arrays are read from pickles))"
    )
    with open(tmp_path / "bad_adj.pkl", "wb") as f:
        pickle.dump({"adj": adj, "nums": nums[:-1]}, f)
    with pytest.raises(ConfigError, match=r"'adj' has shape \(6, 6\) and 'nums' 5 entries"):
        cooccurrence.load_counts(tmp_path / "bad_adj.pkl", C, "graph")
    assert arrays.read_label_file(tmp_path / "voc_adj.pkl", "f")[0] == arrays.COUNTS


def test_correlation_matches_gen_a_and_gen_adj(tmp_path):
    _, counts = _setup(1, tmp_path)
    nums = np.diag(counts).copy()
    adj = counts - np.diag(nums)
    for tau, p in ((0.4, 0.25), (0.3, 0.2)):
        want = gen_a(adj.copy(), nums, tau, p)
        got = cooccurrence.mlgcn_correlation(counts, tau, p)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_array_equal(np.diag(got), 1.0)
        off = got - np.eye(C)
        sums = off.sum(axis=0)
        assert np.all(np.isclose(sums, p, rtol=1e-5) | (sums == 0))
        # gen_adj: D A^T D, both the numpy reference and the model's version.
        d = np.diag(want.sum(1) ** -0.5)
        np.testing.assert_allclose(cooccurrence.normalize_adjacency(want), d @ want.T @ d, 1e-6)
        np.testing.assert_allclose(
            np.asarray(mlgcn.normalized_adjacency(jnp.asarray(got))), d @ want.T @ d, rtol=1e-5
        )
    # ML-GCN's own {'adj', 'nums'} pickle is read as the same counts.
    import pickle

    with open(tmp_path / "coco_adj.pkl", "wb") as f:
        pickle.dump({"adj": adj.astype(np.int64), "nums": nums.astype(np.int64)}, f)
    np.testing.assert_array_equal(
        cooccurrence.load_counts(tmp_path / "coco_adj.pkl", C, "graph"), counts
    )
    cfg = recipes.model_config(
        "mlgcn",
        backbone="resnet50",
        backbone_kwargs={"layers": (1, 1, 1, 1), "width": 4},
        embed_path=str(tmp_path / "words.npy"),
        graph_path=str(tmp_path / "coco_adj.pkl"),
        hidden_dim=8,
    )
    built = models.build(cfg, num_classes=C, image_size=64, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(built.A[...], gen_a(adj.copy(), nums, 0.4), rtol=1e-6)


def test_conversion_errors(tmp_path):
    tm, _ = _setup(2, tmp_path)
    sd = core.to_numpy_state_dict(tm.state_dict())
    with pytest.raises(core.ConversionError, match="option embed_path is required"):
        convert_mlgcn.convert(sd, {})
    opts = {"embed_path": str(tmp_path / "words.npy")}
    with pytest.raises(core.ConversionError, match="not an ML-GCN state dict: missing A"):
        convert_mlgcn.convert({k: v for k, v in sd.items() if k != "A"}, opts)
    broken = dict(sd)
    broken["gc2.weight"] = np.zeros((HIDDEN, 7), np.float32)
    with pytest.raises(core.ConversionError, match=r"wrong shapes \(1\): gc2.weight \(24, 7\)"):
        convert_mlgcn.convert(broken, opts)
