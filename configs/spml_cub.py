"""Single-positive multi-label learning (SPML) on CUB-200-2011's 312 binary attributes: Cole et
al.'s protocol with Zhou et al.'s hyper-parameters (mlgraph.recipes.spml; docs/scob_spml.md
§1-§2), the fourth data set of both papers.

The data set is Cole's preparation of the official download (mlgraph.data.cub: every attribute,
present = `is_present`, the official train/test split, every image kept); the protocol, the loss
argument (`an`, `an_ls`, `wan`, `epr`, `role`, `em`, `em_apl`, or the full-label oracle `full`)
and the linear-init mode are described in `recipes.spml`:

    python -m mlgraph.data.build cub --manual_dir RAW --data_dir DATA
    python -m mlgraph.convert --source torchvision_resnet --input resnet50-0676ba61.pth \
        --output R50 --option include_head=false
    python -m mlgraph.main --config configs/spml_cub.py:loss=em --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=R50

RAW is the folder CUB_200_2011.tgz was unpacked into (CUB_200_2011/ and attributes.txt). Read
the test mAP `eval/spml_mAP` at the best `val/spml_mAP` (the kept checkpoint: `python -m
mlgraph.evaluate --workdir DIR`, column mAP_sp). Zhou's CUB settings (their main.py, the
`P['dataset'] == 'cub'` block): batch 8, lr 1e-4, EM alpha 0.01, APL beta 0.4 from epoch 3;
K = 31.4 expected positives (Cole's train.py), 5,994 training images of which 20 % are held out.
Images without a present attribute are training rows with no observed positive, as in Cole's
files (mlgraph.data.observed).

`runlocal=True` is a short run of the same protocol on the built data (4 steps of a small CNN
from scratch at 64 px, batch 8, no weights needed), to check the data set, the single-positive
draw and the loss before the ten-epoch run:

    python -m mlgraph.main --config configs/spml_cub.py:loss=em,runlocal=True --workdir /tmp/c \
        --config.data.data_dir=DATA

Expected, ResNet-50 at 448 px, end to end (docs/scob_spml.md §5). Cole's and Zhou's own tables
could not be checked for this config (only the papers' opening sections were at hand), so each
figure is a later paper's quotation, as the note gives it:
Cole et al.'s protocol (§5.1: Kim et al., CVPR 2022, whose baseline rows cite Cole et al.):
    full     32.90
    an       19.10
    wan      20.30
    an_ls    17.90
    epr      20.00
    role     15.00
Zhou et al.'s protocol, with early stopping (§5.2: Tran et al., ICCV 2025; the an, em and
em_apl rows also in VLPL's README table):
    full     30.90
    an       18.31
    role     13.66
    em       20.85
    em_apl   21.84
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `loss=an|an_ls|wan|epr|role|em|em_apl|full`,
    `observed=cole|scob`, `mode=end_to_end|linear` and `runlocal=True` (a 4-step run)."""
    args = config_lib.parse_arg(arg, loss="em", observed="cole", mode="end_to_end", runlocal=False)
    c = recipes.spml(dataset="cub", loss=args.loss, observed=args.observed, mode=args.mode)
    if args.runlocal:
        recipes.shorten(c)
        c.eval_every_epochs = 0.0
        c.image_size = 64
        c.eval_batch_size = 16
        c.data.worker_count = 0
        c.early_stop = False
        c.model = recipes.model_config(
            "spml", backbone="simple_cnn", backbone_kwargs={"widths": (16, 32)}
        )
    return c
