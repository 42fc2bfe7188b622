"""SigRL through the training loop, evaluate and the CLI: the open-vocabulary run logs ZSL and
GZSL tables, `evaluate` reproduces them and scores a label file, the batch filter, the
schedule, the label-set errors, `python -m mlgraph.labels --prompt`."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from train_helpers import tiny_config

from mlgraph import evaluate, evaluation, optim, recipes, train, train_state, train_step
from mlgraph.data import datasets
from mlgraph.errors import ConfigError
from mlgraph.models import sigrl

UNSEEN = ("motorcycle", "cat")
EMBED = 16


def _config(data_dir, tmp_path, steps=4):
    c = tiny_config(data_dir, total_steps=steps)
    c.eval_every_steps = steps
    c.data.unseen_classes = UNSEEN
    c.ema.decay = 0.0
    c.best_metric = "eval/zsl_mAP"
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_fraction = 0.25
    c.optimizer.lr = 1e-3
    c.loss = recipes.loss_config("sigrl", name="sigrl", distill_weight=0.0)
    table = np.random.default_rng(0).standard_normal((4, EMBED)).astype(np.float32)
    np.save(tmp_path / "emb.npy", table)
    c.model = recipes.model_config(
        "sigrl",
        backbone="simple_cnn",
        backbone_kwargs={"widths": (8, 16)},
        embed_path=str(tmp_path / "emb.npy"),
        embed_dim=EMBED,
        gat_hidden=8,
        gat_heads=2,
        distill=False,
        topk=2,
        class_chunk=3,
    )
    return c, table


# slow: a full open-vocabulary run and its evaluation
@pytest.mark.slow
def test_open_vocabulary_run_logs_zsl_and_gzsl_and_evaluate_reproduces_them(
    tiny_coco_dir, tmp_path, capsys
):
    c, table = _config(tiny_coco_dir, tmp_path)
    workdir = tmp_path / "run"
    last = train.run(c, workdir)
    names = datasets.open_dataset(c.data).class_names
    unseen = [names.index(n) for n in UNSEEN]
    for view in ("zsl", "gzsl"):
        for key in ("mAP", "P_at3", "R_at3", "F1_at3", "P_at5", "R_at5", "F1_at5"):
            assert f"eval/{view}_{key}" in last
    logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval/zsl_mAP" in r]
    assert [r["step"] for r in evals] == [4]
    # With 2 unseen classes every image predicts both at K = 3: recall is 100 %.
    assert evals[0]["eval/zsl_R_at3"] == pytest.approx(100.0)

    results = evaluate.evaluate_workdir(workdir)
    assert sorted(results["unseen_classes"]) == sorted(UNSEEN)
    for view in ("zsl", "gzsl"):
        for key, value in results["views"][view].items():
            assert value == pytest.approx(evals[0][f"eval/{view}_{key}"], abs=1e-9), (view, key)
    table_text = evaluation.format_views(results["views"])
    assert table_text.splitlines()[0].split() == [
        "view", "mAP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5",
    ]  # fmt: skip
    assert [line.split()[0] for line in table_text.splitlines()[1:]] == ["ZSL", "GZSL"]

    # The unseen classes queried by name, in class order, with their own embeddings: exactly
    # the ZSL view. A label without ground truth joins the set and changes the scores.
    labels = tmp_path / "labels.txt"
    ordered = [names[i] for i in sorted(unseen)]
    labels.write_text("\n".join(ordered) + "\n")
    np.save(tmp_path / "q.npy", table[sorted(unseen)])
    same = evaluate.evaluate_labels(workdir, str(labels), str(tmp_path / "q.npy"))
    assert same["with_ground_truth"] == ordered
    for key, value in same["views"]["labels"].items():
        assert value == pytest.approx(results["views"]["zsl"][key], abs=1e-9), key
    labels.write_text("\n".join([*ordered, "zebra"]) + "\n")
    extra = np.concatenate([table[sorted(unseen)], np.ones((1, EMBED), np.float32)])
    np.save(tmp_path / "q3.npy", extra)
    more = evaluate.evaluate_labels(workdir, str(labels), str(tmp_path / "q3.npy"))
    assert more["labels"] == [*ordered, "zebra"]
    assert more["with_ground_truth"] == ordered

    with pytest.raises(ConfigError) as e:
        evaluate.evaluate_labels(workdir, str(labels), str(tmp_path / "q.npy"))
    assert str(e.value) == (
        f"--label_embeddings={tmp_path / 'q.npy'}: holds an array of shape (2, 16); "
        "expected [3, E] (one row per class)"
    )
    with pytest.raises(ConfigError, match=r"--labels .*: give --label_embeddings FILE.npy"):
        evaluate.evaluate_labels(workdir, str(labels), None)


def _parts(opt_state, cls) -> list:
    """The nodes of type `cls` in an optax state."""
    is_part = lambda x: isinstance(x, cls)  # noqa: E731
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_part) if is_part(x)]


def _state(data_dir, tmp_path):
    c, _ = _config(data_dir, tmp_path)
    c.optimizer.schedule = "constant"  # the warm-up's first step has lr 0
    c.optimizer.frozen = sigrl.frozen_patterns(0, cnn=True)
    dataset = datasets.open_dataset(c.data)
    training = datasets.training_split(dataset, c.data)
    mod, graphdef, tx, state = train_state.init_train_state(c, 4, 10, training)
    step = jax.jit(train_step.make_train_step(mod, graphdef, tx, c, 10))
    return c, dataset, state, step, tx


def test_batch_without_seen_positive_is_no_step_and_frozen_parameters_never_move(
    tiny_coco_dir, tmp_path
):
    c, dataset, state, step, tx = _state(tiny_coco_dir, tmp_path)
    names = dataset.class_names
    unseen = [names.index(n) for n in UNSEEN]
    assert np.asarray(state["extra"]["unseen_ids"]).tolist() == sorted(unseen)
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
    only_unseen = np.zeros((4, 4), np.float32)
    only_unseen[:, unseen] = 1.0
    batch = {"image": images, "labels": only_unseen, "index": np.arange(4, dtype=np.int32)}
    before = jax.tree.map(np.asarray, state)
    after, m = step(jax.tree.map(jnp.copy, state), batch)
    assert float(m["kept_images"]) == 0.0
    for name in ("params", "rest"):
        jax.tree.map(
            np.testing.assert_array_equal, before[name], jax.tree.map(np.asarray, after[name])
        )
    # No optimizer step: Adam's moments and count as they were; the learning-rate schedules,
    # which the official loop sets from the iteration index, moved on by one.
    jax.tree.map(
        np.testing.assert_array_equal,
        _parts(before["opt"], optax.ScaleByAdamState),
        _parts(after["opt"], optax.ScaleByAdamState),
    )
    schedules = [_parts(s["opt"], optax.InjectStatefulHyperparamsState) for s in (before, after)]
    assert schedules[0] and [int(x.count) + 1 for x in schedules[0]] == [
        int(x.count) for x in schedules[1]
    ]

    seen_pos = only_unseen.copy()
    seen_pos[0, [i for i in range(4) if i not in unseen][0]] = 1.0
    after, m = step(jax.tree.map(jnp.copy, state), dict(batch, labels=seen_pos))
    assert float(m["kept_images"]) == 1.0
    assert float(m["rank"]) > 0
    trainable, frozen = tx.split(nnx.State(before["params"]))
    frozen_paths = [p for p, _ in nnx.to_flat_state(frozen)]
    assert frozen_paths and all(p[0] == "backbone" for p in frozen_paths)
    new_trainable, new_frozen = tx.split(after["params"])
    jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, new_frozen))
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(new_trainable), strict=True)
    ]
    assert all(moved)  # every trainable parameter gets a gradient in SigRL's heads


def test_warmup_cosine_schedule_matches_mkt_per_iteration():
    lr_fn = optim.warmup_cosine(total_steps=20, lr=1e-4, min_lr=1e-7, warmup_fraction=0.1)
    # MKT: lr·t/2 over the first 2 "epochs" (here 2 steps of 20), then the half cosine.
    assert float(lr_fn(0)) == 0.0
    assert float(lr_fn(1)) == pytest.approx(0.5e-4)
    assert float(lr_fn(2)) == pytest.approx(1e-4)
    expected = 1e-7 + (1e-4 - 1e-7) * 0.5 * (1 + math.cos(math.pi * 9 / 18))
    assert float(lr_fn(11)) == pytest.approx(expected, rel=1e-6)
    assert float(lr_fn(20)) == pytest.approx(1e-7, rel=1e-4)
    with pytest.raises(ConfigError, match=r"warmup_fraction=1.0: expected 0 <= f < 1"):
        optim.warmup_cosine(10, 1e-4, 0.0, 1.0)


def test_unseen_class_names_are_checked_and_the_ov_loss_needs_them(tiny_coco_dir, tmp_path):
    c, _ = _config(tiny_coco_dir, tmp_path)
    dataset = datasets.open_dataset(c.data)
    c.data.unseen_classes = ("cat", "zebra")
    with pytest.raises(ConfigError) as e:
        datasets.training_split(dataset, c.data)
    assert str(e.value) == (
        "config.data.unseen_classes: 'zebra' not among the classes of coco2014 "
        f"({', '.join(dataset.class_names)})"
    )
    c.data.unseen_classes = ()
    training = datasets.training_split(dataset, c.data)
    with pytest.raises(ConfigError) as e:
        sigrl.init_extra(c, training)
    assert str(e.value).startswith(
        "config.loss.name='sigrl' trains on the seen classes and tests on the unseen ones: "
        "set config.data.unseen_classes"
    )
    c.loss.name = "an"
    with pytest.raises(ConfigError, match=r"SigRL trains with 'sigrl' \(open vocabulary\) or 'em'"):
        sigrl.init_extra(c, training)


def test_label_embed_prompt_is_the_template(tmp_path):
    from mlgraph.labels import encoders
    from mlgraph.labels.__main__ import main

    out = tmp_path / "e.npy"
    status = main(["--classes", "cat,horse", "--prompt", "a photo of a {}", "--output", str(out)])
    assert status == 0
    expected = encoders.embed_labels(["cat", "horse"], "minilm", template="a photo of a {}")
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-6)
    assert not np.allclose(expected, encoders.embed_labels(["cat", "horse"], "minilm"))


CLIP_TINY = dict(variant=None, width=32, depth=3, num_heads=2, patch_size=16, embed_dim=EMBED)


def test_clip_weights_fill_the_teacher_and_it_shares_the_frozen_trunk(tmp_path):
    from mlgraph import checkpointing, init_from
    from mlgraph.models.backbones import clip

    tower = clip.create(image_size=32, rngs=nnx.Rngs(5), **CLIP_TINY)
    weights = tmp_path / "clip"
    checkpointing.save_weights(weights, nnx.to_pure_dict(nnx.state(tower)), {"kind": "backbone"})
    np.save(tmp_path / "e.npy", np.ones((3, EMBED), np.float32))
    kw = dict(backbone="clip_vit_b16", backbone_kwargs=CLIP_TINY, embed_dim=EMBED, gat_hidden=8)
    kw["embed_path"] = str(tmp_path / "e.npy")
    model = sigrl.Model(num_classes=3, image_size=32, rngs=nnx.Rngs(0), teacher_from_block=1, **kw)
    init_from.init_from_weights(model, str(weights))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    out = model(images, teacher=True)
    # Before any training step the teacher is the student's own tower: same CLS embedding,
    # equal to OpenAI's encode_image of the loaded tower.
    np.testing.assert_allclose(out["teacher"], out["global"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["global"], tower.encode_image(images), rtol=1e-5, atol=1e-5)
    # Changing a student block past the shared trunk leaves the teacher where it was.
    block = model.backbone.transformer.resblocks[2].mlp.c_proj
    block.kernel[...] = block.kernel[...] + jax.random.normal(jax.random.key(1), block.kernel.shape)
    moved = model(images, teacher=True)
    np.testing.assert_allclose(moved["teacher"], out["teacher"], rtol=1e-6, atol=1e-6)
    assert not np.allclose(moved["global"], out["global"], atol=1e-3)
    assert sigrl.frozen_patterns(1, depth=3) == (
        "backbone/(conv1|class_embedding|positional_embedding|ln_pre)(/.*)?",
        "backbone/transformer/resblocks/(0)/.*",
        "teacher/.*",
    )


def test_spml_mode_trains_on_single_positives_with_em(tiny_coco_dir, tmp_path):
    c, _ = _config(tiny_coco_dir, tmp_path, steps=2)
    c.data.unseen_classes = ()
    c.data.observed = "cole"
    c.best_metric = "eval/spml_mAP"
    c.loss = recipes.loss_config("sigrl", name="em", alpha=0.2)
    c.optimizer.name = "adam"
    c.optimizer.schedule = "constant"
    c.optimizer.weight_decay = 0.0
    last = train.run(c, tmp_path / "spml")
    assert "eval/spml_mAP" in last and "eval/zsl_mAP" not in last
    logged = [json.loads(x) for x in (tmp_path / "spml" / "metrics.jsonl").read_text().splitlines()]
    em = [r["train/em"] for r in logged if "train/em" in r]
    assert len(em) == 2 and all(np.isfinite(em))


def test_converted_weights_take_the_configs_label_embeddings(tmp_path):
    from mlgraph import checkpointing, init_from

    kw = dict(backbone="simple_cnn", backbone_kwargs={"widths": (8,)}, embed_dim=EMBED)
    kw |= dict(gat_hidden=8, gat_heads=2, distill=False)
    source = sigrl.Model(num_classes=3, image_size=32, rngs=nnx.Rngs(0), **kw)
    weights = tmp_path / "w"  # a converted SigRL file: its label table is zeros
    checkpointing.save_weights(weights, nnx.to_pure_dict(nnx.state(source)), {"kind": "model"})
    table = np.arange(3 * EMBED, dtype=np.float32).reshape(3, EMBED)
    np.save(tmp_path / "e.npy", table)
    model = sigrl.Model(
        num_classes=3, image_size=32, rngs=nnx.Rngs(1), embed_path=str(tmp_path / "e.npy"), **kw
    )
    init_from.init_from_weights(model, str(weights))
    np.testing.assert_array_equal(model.label_embeddings[...], table)
    np.testing.assert_array_equal(model.sda.kernel[...], source.sda.kernel[...])
    bare = sigrl.Model(num_classes=3, image_size=32, rngs=nnx.Rngs(1), **kw)
    with pytest.raises(ConfigError, match=r"^config.model.embed_path: the loaded weights hold no"):
        init_from.init_from_weights(bare, str(weights))
