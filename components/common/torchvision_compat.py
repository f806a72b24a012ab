"""Lets `import torchvision` (and so `import open_clip`) work where torchvision's C extension cannot
load against the installed torch, as with the registry's CUDA torchvision next to a CPU torch.

torchvision registers fake-tensor kernels for its `nms`/`qnms` ops at import time, and fails when the
op schemas are missing because its extension did not load. Defining the two schemas first through
`torch.library` lets the pure-Python parts (transforms, models) import; the ops themselves stay
unavailable. Call `ensure_torchvision_importable()` before importing torchvision or open_clip. On a
machine where the extension loads, it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys

_LIBRARY = None  # keeps the torch.library fragment alive for the life of the process


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision at all: nothing to fix
    import torch

    for location in spec.submodule_search_locations:
        for name in ("_C.so",) + tuple(f"_C{suffix}" for suffix in (".abi3.so",)):
            candidate = f"{location}/{name}"
            try:
                torch.ops.load_library(candidate)
                return True
            except (OSError, RuntimeError):
                continue
    return False


def ensure_torchvision_importable() -> bool:
    """Define torchvision's op schemas if its extension cannot load; True when it had to."""
    global _LIBRARY
    if "torchvision" in sys.modules or _LIBRARY is not None:
        return _LIBRARY is not None
    import torch

    if _extension_loads() or hasattr(torch.ops.torchvision, "nms"):
        return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor qdets, Tensor scores, float iou_threshold, float scale, "
                    "float zero_point) -> Tensor")
    return True
