"""The graph methods' demo configs train, end to end from an empty cache, to well above chance.

Each `configs/<method>_demo.py` runs as it is (frozen offline MobileNetV2, MiniLM label vectors,
'train_labels' co-occurrence, its own head and loss) except for the length and size knobs
(`demo_config_worker.py`: 25 steps of 16 images at 96 px), on a smaller embedded demo set
(320 train / 120 test) written into a fresh cache, so the first run also covers writing and
building the data, converting the shipped MobileNetV2 and embedding the class names. The full
demos' figures are in the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from demo_config_worker import NUM_TEST, STEPS

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("ssgrl_demo", "mlgcn_demo", "q2l_demo")
# slow: three trainings from an empty cache.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    """Metrics of the three shortened demo runs (one subprocess, one device)."""
    root = tmp_path_factory.mktemp("demo_configs")
    out = root / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "demo_config_worker.py"),
            str(root / "cache"),
            str(out),
            *NAMES,
        ],
        env=env,
        cwd=os.path.dirname(HERE),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", NAMES)
def test_demo_config_trains_well_above_chance(name, demo_results, capsys):
    result = demo_results[name]
    metrics, chance = result["metrics"], result["chance_mAP"]
    with capsys.disabled():
        got = metrics["eval/mAP"]
        print(f"\n{name}: {STEPS} steps -> test mAP {got:.2f} (chance {chance:.1f})")
    assert metrics["eval/images"] == NUM_TEST
    assert chance < 30
    assert metrics["eval/mAP"] > 60
