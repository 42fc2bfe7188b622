"""`python -m mlgraph.predict`: labels for image files from a workdir, through the evaluation
transform, with unreadable files reported and skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_helpers import tiny_config

from mlgraph import evaluation, predict, train

STEPS = 2


@pytest.fixture(scope="module")
def workdir(tiny_coco_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("predict") / "w"
    config = tiny_config(tiny_coco_dir, total_steps=STEPS)
    config.ema.decay = 0.5  # an EMA unlike the model
    train.run(config, path)
    return path


def eval_scores(config, workdir) -> dict[int, np.ndarray]:
    """The EMA's scores of every evaluation image by image id, as training's evaluation
    computes them (the data set's stored pixels, the pipeline's transform)."""
    from mlgraph import models
    from mlgraph.workdir import open_run

    run = open_run(workdir, STEPS)
    mod = models.method_module(run.config.model.name)
    scorer = evaluation.Scorer(
        mod, run.config, run.graphdef, run.mesh, run.state, run.dataset.num_classes
    )
    source = run.dataset.sources[config.data.eval_split]
    result = scorer.scores(run.state, source)
    ids = [int(source[i]["image_id"]) for i in range(len(source))]
    return dict(zip(ids, result["scores"][1], strict=True))


def test_cli_labels_folders_and_skips_unreadable_files(workdir, tiny_coco_dir, tmp_path, capsys):
    folder = tiny_coco_dir.parent / "raw" / "val2014"
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "preds.jsonl"
    status = predict.main(
        ["--workdir", str(workdir), str(folder), str(bad), "--top_k", "2"]
        + ["--output", str(out), "--batch_size", "5"]
    )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert f"warning: {bad}: cannot decode image (not a known image format); skipped" in (
        printed.err.splitlines()
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    files = sorted(folder.glob("*.jpg"))
    assert [r["file"] for r in records] == [str(f) for f in files]  # 13, in 3 batches of 5
    lines = printed.out.strip().splitlines()
    assert lines[-1] == f"wrote 13 predictions to {out}"
    assert lines[:-1] == [predict.format_line(r) for r in records]

    # The scores are those of the evaluation of the EMA model on the same images.
    want = eval_scores(tiny_config(tiny_coco_dir, total_steps=STEPS), workdir)
    names = list(records[0]["scores"])
    for r in records:
        image_id = int(r["file"].rsplit("_", 1)[1].split(".")[0])
        got = np.array([r["scores"][n] for n in names])
        np.testing.assert_allclose(got, want[image_id], rtol=1e-5, atol=1e-6)
        order = np.argsort(-got, kind="stable")
        assert r["top"] == [[names[c], r["scores"][names[c]]] for c in order[:2]]
        assert r["labels"] == [names[c] for c in order if got[c] >= 0.5]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--workdir", "{w}", "{tmp}/nothere.jpg"],
            "error: {tmp}/nothere.jpg: no such file or folder",
        ),
        (
            ["--workdir", "{w}", "--checkpoint", "{w}", "x.jpg"],
            "error: give exactly one of --workdir DIR or --checkpoint PATH",
        ),
        (
            ["--workdir", "{w}", "{tmp}", "--output", "{tmp}/p.txt"],
            "error: --output {tmp}/p.txt: expected a .jsonl or .csv file",
        ),
        (["--workdir", "{tmp}/missing", "{tmp}"], "error: --workdir {tmp}/missing: does not exist"),
        (
            ["--workdir", "{w}", "{tmp}", "--class_names", "{tmp}/names.txt"],
            "error: {tmp}/names.txt:2: not UTF-8 text (byte 0xe9 at offset 10); save the file "
            "as UTF-8",
        ),
    ],
    ids=["missing-image", "both-sources", "output-suffix", "missing-workdir", "latin1-names"],
)
def test_cli_errors_are_one_line(workdir, tmp_path, capsys, args, message):
    (tmp_path / "a.png").write_bytes(b"")  # the folder has an image file
    (tmp_path / "names.txt").write_bytes("person\ncaf\xe9\ntrain\ncat\n".encode("latin1"))
    fill = {"w": str(workdir), "tmp": str(tmp_path)}
    status = predict.main([a.format(**fill) for a in args])
    assert status == 2
    assert capsys.readouterr().err.strip() == message.format(**fill)
