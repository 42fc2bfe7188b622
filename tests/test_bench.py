"""`python -m mlgraph.bench`: errors end the command with one line naming the fix."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_a_config_that_needs_an_unbuilt_data_set_says_how_to_bench_without_it(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlgraph.bench",
            "memory",
            "--config",
            "configs/salgl_coco.py",
            f"--config.data.data_dir={tmp_path}",
        ],
        cwd=os.path.dirname(HERE),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        f"error: data set 'coco2014' is not built: looked in {tmp_path}/coco2014/nonempty/1.0.0; "
        f"build it once with: python -m mlgraph.data.build coco2014 --manual_dir RAW "
        f"--data_dir {tmp_path} (the bench reads it for config.model.embed_path='minilm'; "
        "without the data set, point them at .npy files or, for SALGL, give "
        "--config.model.embed_type=checkpoint --config.model.embed_path= "
        "--config.model.embed_dim=768, with --num_classes)"
    )
