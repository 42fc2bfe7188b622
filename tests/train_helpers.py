"""Shared set-up for the training tests: a tiny built COCO-layout data set and configs."""

from __future__ import annotations

import importlib.util
import pathlib
import random
import select
import time

from coco_fixture import write_coco

from mlgraph.data import datasets

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_config(name: str, arg: str | None = None):
    """`configs/<name>.py`'s get_config(arg), loaded as the CLI does."""
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# The sizes of the one tiny set a test session builds (conftest's `tiny_coco_dir`), chosen for
# every user: test_pipeline reads the 32 training images as 2 processes x 4 batches of 4, and
# test_multihost splits the 13 validation images unevenly (7 + 6) over 2 hosts.
TINY_COCO_TRAIN, TINY_COCO_VAL = 32, 13


def tiny_coco(root: pathlib.Path) -> pathlib.Path:
    """Write and build the tiny COCO-layout set under `root`; returns the built set's data_dir.

    Tests take it from the session fixture `tiny_coco_dir` instead of building their own.
    """
    rng = random.Random(0)
    cats = [1, 4, 7, 17]
    labels = {
        "train": [rng.sample(cats, rng.randint(1, 3)) for _ in range(TINY_COCO_TRAIN)],
        "val": [rng.sample(cats, rng.randint(1, 3)) for _ in range(TINY_COCO_VAL)],
    }
    write_coco(root / "raw", labels)
    datasets.build("coco2014", root / "raw", root / "built")
    return root / "built"


def tiny_config(data_dir: pathlib.Path, total_steps: int = 6):
    """baseline_demo shrunk to a few steps of a tiny CNN on the tiny set."""
    c = load_config("baseline_demo")
    c.data.name = "coco2014"
    c.data.data_dir = str(data_dir)
    c.image_size = 32
    c.batch_size = 16
    c.eval_batch_size = 16
    c.total_steps = total_steps
    c.eval_every_steps = 3
    c.log_every_steps = 1
    c.model.backbone_kwargs.widths = (8, 16)
    return c


def num_classes_of(c) -> int:
    """The class count of the data set `c.data` names (the configs' checks)."""
    from mlgraph.data import registry

    return registry.get(c.data.name).num_classes


def fake_assets(c, num_classes: int, tmp_path: pathlib.Path) -> None:
    """Replace `c`'s asset names ('minilm' label vectors, 'train_labels' graphs, offline
    weights) by files of the right shape, since resolving them needs the built data set."""
    import numpy as np

    from mlgraph import assets
    from mlgraph.labels import cooccurrence

    if c.model.get("embed_path") == assets.MINILM:
        np.save(tmp_path / "e.npy", np.zeros((num_classes, 384), np.float32))
        c.model.embed_path = str(tmp_path / "e.npy")
    if c.model.get("graph_path") == cooccurrence.TRAIN_LABELS:
        labels = np.eye(num_classes, dtype=np.float32)
        cooccurrence.save_counts(tmp_path / "g.npz", cooccurrence.counts_from_labels(labels))
        c.model.graph_path = str(tmp_path / "g.npz")
    c.init_from = ""


def final_state(workdir: pathlib.Path):
    """(step, state as nested numpy dicts) of a workdir's latest checkpoint."""
    from mlgraph import checkpointing

    ckpts = checkpointing.TrainCheckpoints(workdir / "checkpoints")
    step = ckpts.latest_step()
    state = ckpts.read_state(step)
    ckpts.close()
    return step, state


def final_run(workdir: pathlib.Path):
    """(the train state of `workdir`'s latest checkpoint as numpy, its metrics.jsonl lines)."""
    import json

    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return final_state(workdir)[1], lines


def wait_for(stream, text: str, timeout: float = 240) -> list[str]:
    """Lines of a subprocess's text `stream` up to and including the first that contains
    `text` (an AssertionError when it ends or `timeout` passes first)."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([stream], [], [], 1.0)
        if not ready:
            continue
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no line with {text!r}; got {lines[-5:]}")
