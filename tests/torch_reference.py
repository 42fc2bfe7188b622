"""Plain-torch pieces shared by the parity tests' reference models: the torchvision v1.5
bottleneck and ResNet trunk, DETR's post-norm encoder layer and normalised sine table (from
`mlgraph.torch_reference.layers`), the random batch-norm statistics every parity test sets so
that eval-mode BN is not the identity, and Python 2 pickles (`PYTHON2`) for the files the
official Python 2.7 code wrote."""

from __future__ import annotations

import pickle
import struct
import types

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

# The shared parts live in the package, where `mlgraph.bench --against torch` uses them too.
from mlgraph.torch_reference.layers import (  # noqa: E402, F401
    TorchBottleneck,
    TorchEncoderLayer,
    TorchResNetTrunk,
    torch_sine_table,
)


def randomize_batch_norms(model: nn.Module, generator) -> None:
    """Random BN affine parameters and running statistics (in place, no gradient)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.2, generator=generator)
                m.running_mean.normal_(0, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)


class Python2Pickler(pickle._Pickler):
    """Pickles as Python 2.7 did for the types that differ: `bytes` and ASCII `str` become
    Python 2 `str` (SHORT_BINSTRING / BINSTRING), so numpy's array and scalar bytes are raw
    8-bit strings that Python 3 reads only with encoding='latin1'."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("ascii")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    def _save_str(self, obj):
        if obj.isascii():
            Python2Pickler._save_py2_str(self, obj)
        else:
            pickle._Pickler.save_str(self, obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_str


def _dump_python2(obj, file, protocol=2):
    Python2Pickler(file, protocol=protocol).dump(obj)


# A pickle module for `torch.save(..., pickle_module=PYTHON2, pickle_protocol=2,
# _use_new_zipfile_serialization=False)`: the legacy format PyTorch 0.4.1 wrote under
# Python 2.7; `PYTHON2.dump(obj, file)` for plain pickles.
PYTHON2 = types.ModuleType("python2_pickle")
PYTHON2.Pickler, PYTHON2.dump = Python2Pickler, _dump_python2
