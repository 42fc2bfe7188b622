"""The step's FLOPs by part (`mlgraph.step_cost`, `bench --profile`): the parts of a SALGL
train step sum to XLA's count of the whole step (that a frozen backbone traces no backward is
in test_optim)."""

from __future__ import annotations

import numpy as np
import pytest

from mlgraph import recipes, step_cost, train_state, train_step


def test_part_of_reads_the_scope_and_the_direction():
    assert step_cost.part_of("jvp(backbone)") == "backbone forward"
    assert step_cost.part_of("transpose(jvp(ggnn))/fc1") == "ggnn backward"
    assert step_cost.part_of("optimizer") == "optimizer"
    assert step_cost.part_of("") == "other"


def _salgl():
    c = recipes.salgl(dataset="coco2014", backbone="simple_cnn", image_size=64, num_scenes=3)
    c.batch_size = 2
    c.model.backbone_kwargs = {"widths": (16, 32, 64)}
    c.model.update(num_steps=1, embed_type="random", embed_path="", att_dim=16, ffn_dim=32)
    c.init_from = ""
    mod, graphdef, tx, state = train_state.init_train_state(c, 5, 10)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((2, 64, 64, 3)).astype(np.float32),
        "labels": (rng.random((2, 5)) < 0.4).astype(np.float32),
        "index": np.arange(2, dtype=np.int32),
    }
    return train_step.make_train_step(mod, graphdef, tx, c, 10), state, batch


def test_parts_of_a_salgl_step_sum_to_the_whole_step():
    step, state, batch = _salgl()
    parts, total = step_cost.cost_by_part(step, state, batch)
    for scope in ("backbone", "encoder", "attention", "ggnn", "classifier", "loss"):
        assert parts[f"{scope} forward"] > 0, scope
        assert parts[f"{scope} backward"] > 0, scope
    assert parts["optimizer"] > 0 and parts["ema"] > 0
    assert sum(parts.values()) == pytest.approx(total, rel=0.05)
    # A convolution's backward costs about twice its forward (input and weight gradients;
    # the first layer needs no input gradient).
    ratio = parts["backbone backward"] / parts["backbone forward"]
    assert 1.2 < ratio < 2.2, ratio
    table = step_cost.format_table(parts, total)
    assert table.splitlines()[0].split() == ["part", "GFLOP", "share"]
    assert table.splitlines()[-1].startswith("step (XLA)")
