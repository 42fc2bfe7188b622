"""`python -m mlgraph.data.build` runs every builder on its fixture and prints the summary."""

import os
import subprocess
import sys

import pytest
from coco_fixture import write_coco
from custom_fixture import write_custom
from nuswide_fixture import write_nuswide
from test_custom_builder import IMAGES, LINES
from test_nuswide_builder import ENTRIES


def build_cli(name, raw, out):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    cmd = [
        sys.executable,
        "-m",
        "mlgraph.data.build",
        name,
        "--manual_dir",
        str(raw),
        "--data_dir",
        str(out),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("name", ["coco2014", "nuswide", "custom"])
def test_build_cli(tmp_path, name):
    if name == "coco2014":
        raw = write_coco(tmp_path / "raw", {"train": [[1, 4], [7]], "val": [[17]]})
        splits = ("train", "val")
    elif name == "nuswide":
        raw, _ = write_nuswide(tmp_path / "raw", ENTRIES)
        splits = ("train", "test")
    else:
        raw, _ = write_custom(tmp_path / "raw", LINES, IMAGES)
        splits = ("train", "test")
    proc = build_cli(name, raw, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name} ("))
    lines = lines[start:]
    for split in splits:
        assert any(line.startswith(f"  {split}: ") and "labels/image" in line for line in lines)
    # Building again into the same folder is safe: it reuses what is there.
    again = build_cli(name, raw, tmp_path / "out")
    assert again.returncode == 0
    assert again.stdout.splitlines()[-len(lines) :] == lines
