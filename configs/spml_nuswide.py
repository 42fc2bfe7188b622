"""Single-positive multi-label learning (SPML) on NUS-WIDE: Cole et al.'s protocol with
Zhou et al.'s hyper-parameters (mlgraph.recipes.spml; docs/scob_spml.md §1-§2).

The protocol, the loss argument (`an`, `an_ls`, `wan`, `epr`, `role`, `em`, `em_apl`, or the
full-label oracle `full`) and the linear-init mode are described in `recipes.spml`:

    python -m mlgraph.data.build nuswide --manual_dir RAW --data_dir DATA
    python -m mlgraph.convert --source torchvision_resnet --input resnet50-0676ba61.pth \
        --output R50 --option include_head=false
    python -m mlgraph.main --config configs/spml_nuswide.py:loss=em --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=R50

Read the test mAP `eval/spml_mAP` at the best `val/spml_mAP` (the kept checkpoint:
`python -m mlgraph.evaluate --workdir DIR`, column mAP_sp). Batch 16, lr 1e-5 (Zhou's).
NUS-WIDE: Cole re-crawled the images in 2020 and Zhou used the official release; the two are
different subsets, so compare with the row of the protocol whose images you have.

Expected (Cole et al. protocol, end to end, §5.1):
    full     54.50
    an       42.00
    wan      46.30
    an_ls    44.90
    epr      46.00
    role     43.10
Expected (Zhou et al., with early stopping, §5.2):
    full     52.08
    an       42.27
    role     41.63
    em       47.15
    em_apl   47.59
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `loss=an|an_ls|wan|epr|role|em|em_apl|full`,
    `observed=cole|scob` and `mode=end_to_end|linear`."""
    args = config_lib.parse_arg(arg, loss="em", observed="cole", mode="end_to_end")
    return recipes.spml(dataset="nuswide", loss=args.loss, observed=args.observed, mode=args.mode)
