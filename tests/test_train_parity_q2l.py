"""Query2Label trains as its released loop does: 30 steps of mlgraph's train step, built from the
paper recipe (`recipes.q2l`: AdamW with weight decay 1e-2 on every parameter, one-cycle to 1e-4
per iteration with beta1 cycled, ASL, EMA 0.9997 from the first step, conv1, layer1 and every
batch norm frozen), against the transcription of the official `main_mlc.py`
(`mlgraph.torch_reference.q2l_train`), from the same weights (the torch model's, through
`mlgraph.convert.q2l`) on the same 10 fixed batches for 3 epochs: one-cycle's warm-up (6 steps)
and its turn to the decay, two epoch boundaries, 30 EMA updates. Only the model (ResNet
(1, 1, 1, 1) of width 8, transformer width 32 with 2 heads and FFN 48, so with the 1x1 input
projection a width other than the backbone's needs, 5 classes), the images (64 px), the batch
(4) and the run's length are shrunk; dropout is off (0.0) in both.

Every step's loss and learning rate is compared, and after the last step the parameters,
AdamW's moments and the EMA's change of the trained parameters. Left out: the attention key
projections' biases, whose gradient is zero in exact arithmetic (softmax ignores a shift shared
by all keys), so both frameworks' Adam steps on them are float noise scaled up to lr's size.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from parity_steps import measure_free
from torch_train_compare import ADAM_SLOTS

from mlgraph import recipes
from mlgraph.torch_reference import q2l_train

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, B, SIZE, BATCHES, EPOCHS = 5, 4, 64, 10, 3
NOISE = re.compile(r".*k_proj/bias")  # zero gradient in exact arithmetic (module docstring)
# Tolerances, relative: a step's loss and learning rate to torch's, a tensor's change (L2 over
# the tensor) to torch's change of it, a moment to torch's, the EMA's change of all trained
# parameters to torch's. The torch run's own float32-vs-float64 drift over these 30 steps
# (`measure(..., drift=True)`: a float64 run from the same weights and batches): losses 5.2e-7,
# parameter changes 6.5e-4, running statistics 0 (frozen), AdamW's first moments 5.4e-6,
# second 8.4e-6, the EMA's change 1.7e-2 (decay 0.9997 moves it by about 1e-5 in 30 steps,
# near float32's rounding of the weights themselves). mlgraph against the float32 run: 4.1e-7,
# 6.5e-4, 0, 5.2e-6, 2.1e-5, 4.8e-4; its learning rates (float32) 2.8e-6 from torch's.
TOL = {"loss": 1e-5, "lr": 2e-5, "params": 1e-2, "rest": 1e-6, "mu": 1e-4, "nu": 2e-4, "ema": 1e-1}


def _config():
    c = recipes.q2l(dataset="coco2014", image_size=SIZE)
    c.batch_size, c.num_epochs = B, float(EPOCHS)
    c.model.update(backbone_kwargs={"layers": (1, 1, 1, 1), "width": 8}, keep_input_proj=True)
    c.model.update(hidden_dim=32, num_heads=2, ffn_dim=48, enc_layers=1, dec_layers=2)
    c.model.dropout = 0.0
    return c


def _noise(path: str) -> bool:
    return bool(NOISE.fullmatch(path))


def measure(config, mlgraph_changes=None, drift: bool = False) -> dict:
    """`parity_steps.measure_free` of `config` with the Query2Label transcription."""
    shape = (BATCHES, B, SIZE)
    return measure_free(
        q2l_train.train, config, C, shape, EPOCHS, ADAM_SLOTS, _noise,
        mlgraph_changes=mlgraph_changes, drift=drift,
    )  # fmt: skip


def test_30_steps_follow_the_official_loop():
    errors = measure(_config())
    # One-cycle's warm-up: 4e-6 up to 1e-4 at step 5 (pct_start 0.2 of 30), then down.
    lrs = errors.pop("lrs")
    assert lrs[0] == pytest.approx(4e-6) and lrs[5] == pytest.approx(1e-4)
    assert np.all(np.diff(lrs[:6]) > 0) and np.all(np.diff(lrs[5:]) < 0)
    for kind, (error, where) in errors.items():
        assert error < TOL[kind], (kind, where, error)
