"""The label inputs of the graph methods: label embeddings [C, E] and co-occurrence counts [C, C].

What lives where, and at which layer (imports point down only):

* `arrays`, `cooccurrence`, `embeddings`: the files and their statistics, numpy only (besides
  `mlgraph.errors`, `mlgraph.paths`, `mlgraph.textfiles` and each other), so that both the
  models and `mlgraph.data` can read them.
  - `arrays`: reading label files (.npy, .npz, ML-GCN's pickles);
  - `cooccurrence`: counts from labels, SSGRL's and ML-GCN's graphs, counts files;
  - `embeddings`: the label-embedding table of a config (`embed_path`), checked.
* `encoders`: the text encoders (MiniLM, BERT, CLIP, GloVe) that compute label embeddings.
  They run text towers, so this sits above the models and the converters; never imports the
  command-line helpers or `mlgraph.data`.
* `__main__`: the command line, `python -m mlgraph.labels` (an entry point: it may import
  `mlgraph.cli` and `mlgraph.data`, e.g. to read a built data set's class names).

This file imports nothing, so importing one of the light modules stays light.
"""
