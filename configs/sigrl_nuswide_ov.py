"""SigRL (ICME 2025), open vocabulary on NUS-WIDE: train on the 925 seen tags, test zero-shot
on the 81 concepts (ZSL) and on all 1,006 labels (GZSL), with the official code's defaults
(docs/sigrl.md §3.5; mlgraph.recipes.sigrl_ov).

    python -m mlgraph.data.build nuswide --config ov --manual_dir RAW --data_dir DATA
    python -m mlgraph.convert --source openai_clip --input ViT-B-16.pt --output CLIP_VIS
    python -m mlgraph.convert --source openai_clip --input ViT-B-16.pt --output CLIP_TEXT \\
        --option tower=text
    python -m mlgraph.labels --encoder clip --weights CLIP_TEXT \\
        --vocab bpe_simple_vocab_16e6.txt.gz --prompt "There is a {} in the scene" \\
        --dataset nuswide --builder_config ov --data_dir DATA --output label_emb.npy
    python -m mlgraph.main --config configs/sigrl_nuswide_ov.py --workdir DIR \\
        --config.data.data_dir=DATA --config.init_from=CLIP_VIS \\
        --config.model.embed_path=label_emb.npy
    python -m mlgraph.evaluate --workdir DIR

RAW holds NUS-WIDE's Flickr/, ImageList/, Groundtruth/AllLabels/, Concepts81.txt and
NUS_WID_Tags/ (TagList1k.txt, AllTags1k.txt), or BiAM's features/nus_wide_{train,test}.h5
label files with img_names.pkl / test_img_names.pkl. `ViT-B-16.pt` is OpenAI's JIT archive
(SHA-256 5806e77c...), read directly by the converter.

Logged per evaluation (every epoch, on the test split as the official code does): eval/zsl_mAP,
eval/zsl_{P,R,F1}_at{3,5}, and the same for gzsl (BiAM's AP: a class without positives counts
0; overall P/R/F1 over each image's top K). The kept checkpoint is the best eval/zsl_mAP.
Expected: SigRL's tables were not retrievable (docs/sigrl.md §7.1); none is claimed here.
Memory: SDA and VFR run as scans over `config.model.class_chunk` (64) labels with rematerialised
chunk bodies; `python -m mlgraph.bench memory --config configs/sigrl_nuswide_ov.py
--num_classes 1006 --eval_batch 64` prints what the train step and a GZSL eval step need.
"""

from mlgraph import recipes


def get_config(arg=None):
    """The config (no arguments)."""
    del arg
    return recipes.sigrl_ov()
