"""mlgraph: graph-based multi-label image recognition in JAX/Flax NNX."""

from mlgraph import xla_options as _xla_options

__version__ = "0.1.0"

# Before any mlgraph module runs JAX code: XLA reads its flags when the first backend starts.
_xla_options.apply_cpu_fusion_option()
