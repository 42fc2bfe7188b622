"""mlgraph: graph-based multi-label image recognition in JAX/Flax NNX."""

from mlgraph import platforms as _platforms
from mlgraph import xla_options as _xla_options

__version__ = "0.1.0"

# Before any mlgraph module runs JAX code: which backends start (and quietly), and the XLA
# options, which XLA reads when the first backend starts.
_platforms.choose_platforms()
_platforms.import_jax_quietly()
_xla_options.apply_cpu_fusion_option()
