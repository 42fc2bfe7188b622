"""mlgraph: graph-based multi-label image recognition in JAX/Flax NNX."""

__version__ = "0.1.0"
