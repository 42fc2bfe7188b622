"""The device mesh and the movement of process-local data to global arrays.

Data parallel only: a 1-D ('data',) mesh over every device of every process, train state
replicated, batches sharded on their leading axis.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A ('data',) mesh over all devices (Auto axis type: the compiler places collectives)."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of state that every device holds whole."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of batches: leading axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble each process's part of a batch into global arrays sharded on 'data'."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host, batch-sharded) array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_batch_size(batch_size: int, what: str = "batch_size") -> None:
    """The global batch must split evenly over processes and devices."""
    n = jax.device_count()
    if batch_size % n or batch_size % jax.process_count():
        from mlgraph.errors import ConfigError

        raise ConfigError(
            f"config.{what}={batch_size}: must be a multiple of the device count ({n})"
        )
