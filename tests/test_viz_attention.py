"""mlgraph.viz.attention: the attention maps of Query2Label, SSGRL, SALGL and SigRL are the
weights each model computed in its own forward pass, normalised as the method defines, drawn
one PNG per image; the command's output and error lines."""

from __future__ import annotations

import io
import json
import math
import pathlib
import types

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from train_helpers import tiny_config

from mlgraph import checkpointing, models, recipes
from mlgraph import workdir as workdirs
from mlgraph.errors import ConfigError
from mlgraph.models.attention import sine_position_encoding
from mlgraph.viz import __main__ as viz_cli
from mlgraph.viz import attention

# The tiny COCO set's classes, in category-id order.
NAMES = ["person", "motorcycle", "train", "cat"]
SIZE = 32  # px; simple_cnn (8, 16) has stride 4: an 8x8 map
E = 8  # label-vector width
# float32 forward passes against float64 numpy on the same weights: differences are rounding
# (about 1e-7 on weights of 1/64); attention over the wrong axis, layer or label is off by 1e-2
# or more.
RTOL, ATOL = 1e-4, 1e-6

TINY_CNN = dict(backbone="simple_cnn", backbone_kwargs={"widths": (8, 16)})
TINY_VIT = dict(
    backbone="vit_b16",
    backbone_kwargs={"variant": None, "width": 16, "depth": 1, "num_heads": 2, "patch_size": 8},
)


def vectors(tmp_path: pathlib.Path) -> str:
    """A .npy of random label vectors [4, E] (not zeros: zeros make every map uniform)."""
    path = tmp_path / "vectors.npy"
    np.save(path, np.random.default_rng(0).normal(size=(len(NAMES), E)).astype(np.float32))
    return str(path)


def method_config(method: str, tmp_path: pathlib.Path, data_dir="unused", **extra):
    """A tiny config of `method` on the tiny set (32 px, simple_cnn)."""
    c = tiny_config(pathlib.Path(data_dir))
    c.init_from = ""
    c.optimizer.frozen = ()
    c.loss = recipes.loss_config(method)
    embed = vectors(tmp_path)
    fields = {
        "q2l": dict(TINY_CNN, hidden_dim=16, num_heads=2, ffn_dim=32, dropout=0.0),
        "ssgrl": dict(TINY_CNN, embed_path=embed, att_dim=8, num_steps=1, bn_train="none"),
        "salgl": dict(
            TINY_CNN,
            num_scenes=2,
            num_steps=1,
            att_dim=8,
            ffn_dim=16,
            heads=2,
            dropout=0.0,
            embed_type="file",
            embed_path=embed,
        ),
        "sigrl": dict(
            TINY_CNN,
            embed_path=embed,
            embed_dim=E,
            gat_hidden=8,
            gat_heads=2,
            topk=2,
            class_chunk=3,
            distill=False,
        ),
    }[method]
    c.model = recipes.model_config(method, **(fields | extra))
    return c


def fake_run(config) -> workdirs.Run:
    """A `Run` held in memory: the model of `config`, freshly initialised, as its EMA too."""
    # Eagerly: tiny models initialise faster op by op than compiled whole.
    model = models.create(config, num_classes=len(NAMES), rngs=nnx.Rngs(config.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = {"params": params, "rest": rest, "ema": {"params": params, "rest": rest}}
    dataset = types.SimpleNamespace(class_names=NAMES, num_classes=len(NAMES))
    return workdirs.Run(pathlib.Path("tiny"), config, dataset, graphdef, state, 3, None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run in memory per method, built once."""
    folder = tmp_path_factory.mktemp("vectors")
    return {m: fake_run(method_config(m, folder)) for m in attention.METHODS}


def image(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(SIZE, SIZE, 3)).astype(np.float32)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def probe(method: str, run, x: np.ndarray, queries=None) -> dict[str, np.ndarray]:
    """One compiled program over the model of `run` and image `x`: 'plain' (the logits of the
    normal forward), 'logits' and 'weights' [layers, heads, C, N] of a forward whose attention
    is read off as a user of the model reads it (the sown intermediates, or the returned
    weights), and the inputs the numpy references start from."""

    def forward(state, x):
        model = nnx.merge(run.graphdef, state)
        kw = {} if queries is None else {"label_embeddings": queries}
        out = {"plain": model(x, **kw)["logits"][0]}
        if method in ("q2l", "sigrl"):
            read = model(x, sow_weights=True, **kw)
            sown = nnx.pop(model, nnx.Intermediate)
            if method == "q2l":
                layers = [sown["decoder"][i]["multihead_attn"]["attention_weights"] for i in (0, 1)]
                out["weights"] = jnp.stack([v.get_value()[0][0] for v in layers])
            else:
                out["weights"] = sown["sda_weights"].get_value()[0][0][None, None]
        else:
            read = model(x)
            out["weights"] = read["att_weights"][0][None, None]
        out["logits"] = read["logits"][0]
        # The references' inputs, from the model's own parts.
        if method == "q2l":
            fmap = model.backbone.feature_map(x)
            _, h, w, c = fmap.shape
            memory = fmap.reshape(1, h * w, c)
            pos = jnp.asarray(sine_position_encoding(c, (h, w)))[None]
            for layer in model.encoder:
                memory = layer(memory, pos)
            queries_in = model.query_embed[...][None]
            targets = [jnp.zeros_like(queries_in)]
            targets.append(model.decoder[0](targets[0], memory, pos=pos, query_pos=queries_in))
            out["keys"] = (memory + pos)[0]
            out["queries"] = jnp.stack([(t + queries_in)[0] for t in targets])
        elif method == "ssgrl":
            out["tokens"] = model.features(x)[0]
        elif method == "salgl":
            out["tokens"] = model.tb(model.backbone(x))[0]
        else:
            out["tokens"] = model.features(x)[1][0]
        return out

    state = nnx.merge_state(run.state["ema"]["params"], run.state["ema"]["rest"])
    return jax.tree.map(np.asarray, jax.jit(forward)(state, jnp.asarray(x)[None]))


# ---------------------------------------------------------------------------- references
def q2l_reference(model, got: dict) -> np.ndarray:
    """Each decoder layer's cross-attention [layers, heads, K, N], written out from its query
    and key projections (docs/ssgrl_mlgcn.md §4.1): per head, softmax over the positions n of
    (t + q_embed) W_q . (m_n + pos_n) W_k / sqrt(d_head)."""
    out = []
    for layer, queries in zip(model.decoder, got["queries"], strict=True):
        attn = layer.multihead_attn
        q = f64(queries) @ f64(attn.q_proj.kernel[...]) + f64(attn.q_proj.bias[...])
        k = f64(got["keys"]) @ f64(attn.k_proj.kernel[...]) + f64(attn.k_proj.bias[...])
        d = q.shape[-1] // attn.num_heads
        heads = (-1, attn.num_heads, d)
        logits = np.einsum("qhd,khd->hqk", q.reshape(heads), k.reshape(heads))
        out.append(softmax(logits / math.sqrt(d), -1))
    return np.stack(out)


def bilinear_reference(att, tokens, labels) -> np.ndarray:
    """Low-rank bilinear attention [C, N] as the official module computes it, its four layers
    unfolded (docs/salgl.md §1.6, docs/ssgrl_mlgcn.md §1.2): softmax over the tokens n of
    w_t (W_h tanh(W1 x_n ⊙ W2 l_c) + b_h) + b_t."""
    u = f64(tokens) @ f64(att.linear1.kernel[...])  # [N, A]
    v = f64(labels) @ f64(att.linear2.kernel[...])  # [C, A]
    z = np.tanh(v[:, None, :] * u[None, :, :])  # [C, N, A]
    hidden = z @ f64(att.hidden_linear.kernel[...]) + f64(att.hidden_linear.bias[...])
    t = hidden @ f64(att.target_linear.kernel[...])[:, 0] + f64(att.target_linear.bias[...])[0]
    return softmax(t, -1)


def sda_reference(model, tokens, labels) -> np.ndarray:
    """SigRL's SDA weights [C, P] (docs/sigrl.md §2.4a): softmax over the patches p of
    W_s tanh(F_p ⊙ H_c) + b_s for every channel, averaged over the channels."""
    a = np.tanh(f64(tokens)[:, None, :] * f64(labels)[None]) @ f64(model.sda.kernel[...])
    a = softmax(a + f64(model.sda.bias[...]), 0)  # [P, C, E]: over the patches
    return a.mean(-1).T


def reference(method: str, model, got: dict) -> np.ndarray:
    """The method's attention [layers, heads, C, N] from the numpy references."""
    if method == "q2l":
        return q2l_reference(model, got)
    if method == "ssgrl":
        att, labels = model.word_semantic, model.word_features[...]
    elif method == "salgl":
        att, labels = model.attention, model.embeddings[...]
    else:
        return sda_reference(model, got["tokens"], model.label_embeddings[...])[None, None]
    return bilinear_reference(att, got["tokens"], labels)[None, None]


# ---------------------------------------------------------------------------- the maps
@pytest.mark.parametrize("method, grid", [("q2l", 8), ("ssgrl", 4), ("salgl", 8), ("sigrl", 8)])
def test_maps_are_the_attention_of_the_models_forward(method, grid, runs):
    run = runs[method]
    x = image()
    found = attention.maps(run, x, classes=NAMES)
    layers = 2 if method == "q2l" else 1
    assert found.labels == NAMES and len(found.layers) == layers
    assert found.maps.shape == (len(NAMES), layers, grid, grid)

    got = probe(method, run, x)
    # Reading the attention leaves the forward pass as it is.
    np.testing.assert_array_equal(got["logits"], got["plain"])
    # The maps are the weights read off the model, on the grid row-major. (Another compiled
    # program than `maps`' forward: equal up to float32 rounding.)
    per_head = np.moveaxis(got["weights"], 2, 0).reshape(len(NAMES), layers, -1, grid, grid)
    np.testing.assert_allclose(found.scores, 1 / (1 + np.exp(-got["plain"])), rtol=1e-6)
    if method == "q2l":
        np.testing.assert_allclose(found.heads, per_head, rtol=1e-6, atol=1e-9)
    else:
        assert found.heads is None
    np.testing.assert_allclose(found.maps, per_head.mean(axis=2), rtol=1e-6, atol=1e-9)
    # They are what the method defines, and sum to 1 over the positions (each head too).
    want = np.moveaxis(reference(method, run.model(), got), 2, 0).reshape(per_head.shape)
    np.testing.assert_allclose(per_head, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(per_head.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(found.outside, np.zeros((len(NAMES), layers)))
    # The maps tell positions apart by far more than the tolerance, so that a map of the
    # wrong label, layer or axis could not pass for the right one.
    spread = found.maps.max(axis=(-2, -1)) - found.maps.min(axis=(-2, -1))
    assert (spread > 20 * (ATOL + RTOL / grid**2)).all()


def test_a_class_token_is_kept_out_of_the_map(tmp_path):
    """SALGL over a ViT attends over the class token too (first); the map holds the image
    positions and `outside` the rest (made weights)."""
    weights = np.arange(2 * 17, dtype=np.float32).reshape(2, 17)
    maps, outside = attention.grid_maps(weights, 1)
    np.testing.assert_array_equal(maps, weights[:, 1:].reshape(2, 4, 4))
    np.testing.assert_array_equal(outside, weights[:, 0])
    maps, outside = attention.grid_maps(weights[:, 1:], 0)
    np.testing.assert_array_equal(maps[1, 2], [26, 27, 28, 29])  # row-major: row 2 of image 1
    np.testing.assert_array_equal(outside, [0, 0])
    with pytest.raises(ValueError, match="17 image positions are no square grid"):
        attention.grid_maps(weights, 0)

    # Which models have such a token: built abstractly, nothing initialised.
    def lead(method: str, **extra) -> int:
        config = method_config(method, tmp_path, **extra)
        model = nnx.eval_shape(lambda: models.create(config, num_classes=4, rngs=nnx.Rngs(0)))
        return attention.leading_tokens(model, method)

    assert [lead("salgl", **TINY_VIT), lead("salgl"), lead("q2l")] == [1, 0, 0]


def test_sigrl_maps_any_label_name_through_the_embedding_path(runs, tmp_path):
    run = runs["sigrl"]
    x = image(3)
    unseen = np.random.default_rng(7).normal(size=(2, E)).astype(np.float32)
    np.save(tmp_path / "unseen.npy", unseen)
    classes = ["giraffe", "cat", "zebra"]
    found = attention.maps(run, x, classes, label_embeddings=str(tmp_path / "unseen.npy"))
    assert found.labels == classes
    model = run.model()
    # The queried set: the run's classes, then the new names (class_chunk=3: two chunks).
    queried = np.concatenate([np.asarray(model.label_embeddings[...]), unseen])
    got = probe("sigrl", run, x, jnp.asarray(queried))
    picked = [4, 3, 5]
    np.testing.assert_allclose(
        found.maps[:, 0].reshape(3, -1), got["weights"][0, 0, picked], rtol=1e-6, atol=1e-9
    )
    want = sda_reference(model, got["tokens"], queried)[picked]
    np.testing.assert_allclose(found.maps[:, 0].reshape(3, -1), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(found.maps.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(found.scores, 1 / (1 + np.exp(-got["plain"][picked])), rtol=1e-6)
    # A known class's map does not depend on what else is queried (SDA weighs labels alone).
    alone = attention.maps(run, x, ["cat"])
    np.testing.assert_allclose(alone.maps[0], found.maps[1], rtol=1e-5, atol=1e-9)

    # A run whose label vectors are no MiniLM ones needs the embeddings of new names.
    with pytest.raises(ConfigError) as e:
        attention.maps(run, x, ["giraffe"])
    assert str(e.value) == (
        "--classes giraffe (not classes of the run): give --label_embeddings FILE.npy, the "
        f"names embedded as the training labels were ({run.config.model.embed_path}), e.g. "
        "python -m mlgraph.labels --encoder clip --weights CLIP_TEXT --vocab "
        "bpe_simple_vocab_16e6.txt.gz --classes NAMES.txt --output FILE.npy"
    )
    with pytest.raises(ConfigError) as e:
        attention.maps(run, x, ["cat"], label_embeddings="e.npy")
    assert str(e.value) == (
        "--label_embeddings e.npy: every --classes name is a class of the run, queried with "
        "the run's own embeddings; leave it out"
    )
    with pytest.raises(ConfigError) as e:
        attention.maps(run, x, ["giraffe"], label_embeddings=str(tmp_path / "unseen.npy"))
    assert str(e.value) == (
        f"--label_embeddings={tmp_path / 'unseen.npy'}: holds an array of shape (2, 8); "
        "expected [1, E] (one row per class)"
    )


# ---------------------------------------------------------------------------- figures
def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size


def write_images(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    rng = np.random.default_rng(0)
    a, b, bad = folder / "a.jpg", folder / "b.png", folder / "bad.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 255, (50, 30, 3), np.uint8)).save(b)
    bad.write_bytes(b"not an image")
    return a, b, bad


def test_figures_one_png_per_image(runs, tmp_path):
    run = runs["q2l"]
    a, b, _ = write_images(tmp_path)
    made = attention.figures(run, [a, b], top_k=2)
    assert [title for title, _ in made] == ["a.jpg: step 3 of tiny", "b.png: step 3 of tiny"]
    # Two labels (rows) by two decoder layers (columns), 3.2 x 3.0 inches each, at 100 dpi.
    assert [png_size(png) for _, png in made] == [(640, 650)] * 2
    # One layer, one label: a single column, widened to 4.4 inches for its title.
    ((_, png),) = attention.figures(runs["ssgrl"], [a], top_k=1)
    assert png_size(png) == (440, 350)
    assert attention.supports(run.config)
    for method in ("mlgcn", "baseline", "spml", "scob"):
        assert not attention.supports(ml_collections.ConfigDict({"model": {"name": method}}))
    # The pixels drawn are the model's input, un-normalised: the evaluation transform's resize.
    pixels, x = attention.read_image(a, run.config, len(NAMES))
    mean, std = np.asarray(run.config.data.mean), np.asarray(run.config.data.std)
    assert pixels.shape == x.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels / 255.0, x * std + mean, atol=0.5 / 255 + 1e-6)


# ---------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def q2l_workdir(runs, tiny_coco_dir, tmp_path_factory):
    """A Q2L workdir as training leaves it (config.json, a checkpoint at step 5) on the tiny
    set, holding the model of `runs['q2l']`."""
    folder = tmp_path_factory.mktemp("q2l")
    config = method_config("q2l", folder, tiny_coco_dir)
    state = dict(runs["q2l"].state, step=jnp.asarray(5, jnp.int32))
    workdir = folder / "run"
    workdir.mkdir()
    ckpts = checkpointing.TrainCheckpoints(workdir / "checkpoints")
    ckpts.save(5, state, iter(grain.MapDataset.range(4).to_iter_dataset()), {"ema_mAP": 1.0})
    ckpts.close()
    (workdir / "config.json").write_text(json.dumps(workdirs.config_record(config)))
    return workdir


def test_cli_writes_one_png_per_image(q2l_workdir, runs, tmp_path, capsys):
    a, b, _ = write_images(tmp_path)
    out = tmp_path / "figures"
    args = ["attention", "--workdir", str(q2l_workdir), str(a), str(b), "--output", str(out)]
    assert viz_cli.main([*args, "--classes", "cat,person"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The scores printed are the model's (the workdir holds `runs['q2l']`'s weights).
    want = []
    for path in (a, b):
        found = attention.maps(runs["q2l"], attention.read_image(path, runs["q2l"].config, 4)[1])
        scores = dict(zip(found.labels, found.scores, strict=True))
        found = attention.maps(
            runs["q2l"], attention.read_image(path, runs["q2l"].config, 4)[1], ["cat", "person"]
        )
        cat, person = found.scores
        want.append(
            f"{path}: Query2Label, 2 decoder layers, 8x8 positions: cat ({cat:.2f}), person "
            f"({person:.2f}) -> {out / f'attention_{path.stem}.png'}"
        )
        assert len(scores) == 3  # --top_k's default
    assert lines == want
    for name in ("attention_a.png", "attention_b.png"):
        assert png_size((out / name).read_bytes()) == (640, 650)
    # --top_k 1: one row a figure.
    assert viz_cli.main([*args[:4], "--output", str(out), "--top_k", "1"]) == 0
    assert png_size((out / "attention_a.png").read_bytes()) == (640, 350)
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_cli_error_lines(q2l_workdir, tmp_path, capsys):
    a, _, bad = write_images(tmp_path)
    base = ["attention", "--workdir", str(q2l_workdir)]

    def error(args) -> str:
        assert viz_cli.main(args) == 2
        return capsys.readouterr().err

    assert error([*base, str(a), "--classes", "cat,dog"]) == (
        "error: --classes: unknown class name(s) 'dog'; known: person, motorcycle, train, cat\n"
    )
    assert (
        error([*base, str(bad)])
        == f"error: {bad}: cannot decode image (not a known image format)\n"
    )
    assert error(base) == (
        "error: attention: no IMAGE given (python -m mlgraph.viz attention --workdir DIR "
        "IMAGE...)\n"
    )
    assert error(["heatmap", "--workdir", str(q2l_workdir), "--top_k", "2"]) == (
        "error: --top_k: only for attention\n"
    )
    assert error([*base, str(a), "--label_embeddings", "e.npy", "--classes", "cat"]) == (
        "error: --label_embeddings e.npy: a q2l run scores its own classes only; label names "
        "are queried by sigrl runs\n"
    )
    # Methods without attention over positions: one line, naming the ones with maps.
    for method in ("mlgcn", "scob"):
        workdir = tmp_path / method
        workdir.mkdir()
        config = tiny_config(tmp_path)
        config.model = recipes.model_config(method)
        config.loss = recipes.loss_config(method)
        (workdir / "config.json").write_text(json.dumps(workdirs.config_record(config)))
        hint = ""
        if method == "scob":
            hint = (
                " (Scob's Grad-CAM++ guidance: python -m mlgraph.viz cam --workdir "
                f"{workdir} IMAGE...)"
            )
        assert error(["attention", "--workdir", str(workdir), str(a)]) == (
            f"error: --workdir {workdir}: trained '{method}', which does not predict from "
            "attention over image positions; attention maps are drawn for q2l, ssgrl, salgl, "
            f"sigrl runs{hint}\n"
        )


def test_the_report_embeds_the_attention_figures(runs, tmp_path):
    from mlgraph.viz import report

    run = runs["q2l"]
    a, b, _ = write_images(tmp_path)
    notes = report.Notes()
    found = report.attention_figures(run, run.config, [str(a), str(b)], notes)
    assert found == attention.figures(run, [a, b])
    assert notes.drawn == ["attention maps"] and notes.missing == []
    section = report.attention_section(found)
    assert section.body.count("data:image/png;base64,") == 2
    # A method without attention maps has no such section, and says nothing of it.
    no_maps = ml_collections.ConfigDict({"model": {"name": "mlgcn"}})
    assert report.attention_figures(run, no_maps, [str(a)], notes) is None
    assert notes.drawn == ["attention maps"] and notes.missing == []
