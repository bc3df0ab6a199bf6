"""Loads the compiled kernels (`sam_kernels._C`) once, remembering why when it cannot."""
import importlib.util
import os

import torch

_loaded = None  # None: not tried yet; True / False afterwards
_error = ""


def load() -> bool:
    """Load the extension library (registers the `torch.ops.sam_kernels` ops). Never raises."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    if os.environ.get("SAM_KERNELS_DISABLE_EXTENSION", "0") == "1":
        _loaded, _error = False, "SAM_KERNELS_DISABLE_EXTENSION=1 is set"
        return _loaded
    spec = importlib.util.find_spec("sam_kernels._C")
    if spec is None or spec.origin is None:
        _loaded = False
        _error = ("the compiled extension sam_kernels._C is not built; install the package with "
                  "`pip install --no-build-isolation .` (torch must be installed first)")
        return _loaded
    try:
        torch.ops.load_library(spec.origin)
    except OSError as exc:  # e.g. built against a different torch
        _loaded = False
        _error = (f"the compiled extension {spec.origin} failed to load ({exc}); rebuild it "
                  "against the installed torch with `pip install --no-build-isolation .`")
        return _loaded
    _loaded, _error = True, ""
    return _loaded


def error() -> str:
    """Why the extension is not available ('' when it is)."""
    load()
    return _error


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `sam_kernels::<op>` has a kernel registered for `dispatch_key` (e.g. 'CUDA')."""
    if not load():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_kernels::{op}", dispatch_key)
