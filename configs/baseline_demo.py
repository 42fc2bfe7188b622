"""Plain multi-label baseline on the embedded demo data (photo collages, COCO-2014 layout).

A small from-scratch CNN, global average pooling, a linear head and BCE; AdamW with the
one-cycle schedule, 8 epochs of batch 32 at 96 px.

    python -m mlgraph.main --config configs/baseline_demo.py --workdir /tmp/baseline_demo

Expected (measured 2026-12-07, README): test mAP 99.28 (EMA 98.96), CF1 95.79, OF1 96.24.
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `runlocal=True` for a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    c = config_lib.base_config()
    recipes.set_data(c, "demo")
    c.data.worker_count = 0
    c.image_size = 96
    c.batch_size = 32
    c.eval_batch_size = 100
    c.num_epochs = 8.0
    c.eval_every_steps = 250
    c.log_every_steps = 25
    c.optimizer.lr = 3e-3
    c.optimizer.weight_decay = 1e-4
    c.ema.decay = 0.99
    c.loss = recipes.loss_config("baseline", name="bce")
    c.model = recipes.model_config(
        "baseline", backbone="simple_cnn", backbone_kwargs={"widths": (32, 64, 128, 256)}
    )
    if args.runlocal:
        recipes.shorten(c)
    return c
