"""Which backend runs a primitive: availability, `auto` selection, and the errors that say what
is missing. Selection order for `auto`: cuda > triton > reference on GPU tensors; cpu > reference
on CPU tensors. `SAM_KERNELS_BACKEND=<name>` replaces `auto` (not an explicit choice)."""
import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import Dict, List, Optional, Union

import torch

from .. import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "SAM_KERNELS_BACKEND"
_MODULES = {
    "reference": "sam_kernels.ops.reference",
    "cpu": "sam_kernels.ops.compiled",
    "cuda": "sam_kernels.ops.compiled",
    "triton": "sam_kernels.ops.triton_kernels",
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for explicitly but cannot run here."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device_type: Optional[str] = None) -> Optional[str]:
    """Why `name` cannot run (on `device_type` if given), or None when it can."""
    if name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r}; choose one of {('auto',) + BACKENDS}")
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        if device_type is not None and device_type != name:
            return (f"the {name} backend runs on {name} tensors, not {device_type} tensors; "
                    f"use backend='auto' to pick a backend from the tensors' device")
        if not _extension.load():
            return _extension.error()
        if name == "cpu" and not _extension.has_kernel("sum_sq", "CPU"):
            return "the compiled extension has no CPU kernels registered"
        if name == "cuda":
            if not _extension.has_kernel("sum_sq", "CUDA"):
                why = _extension.info().get("cuda")
                if why:  # a build on first use, for this machine
                    return f"the kernels were compiled on first use without CUDA: {why}"
                return ("the compiled extension was built without CUDA; rebuild with a CUDA "
                        "build of torch and nvcc available (FORCE_CUDA=1 pip install "
                        "--no-build-isolation .)")
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        return None
    # triton
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if importlib.util.find_spec(_MODULES["triton"]) is None:
        return "this version of sam_kernels has no Triton kernels"
    if device_type == "cpu" and not _interpreting():
        return ("Triton kernels run on CUDA tensors; on CPU tensors only under the Triton "
                "interpreter (set TRITON_INTERPRET=1 before importing triton)")
    if device_type == "cuda" and _interpreting():
        return ("TRITON_INTERPRET=1 is set: the Triton interpreter runs kernels on CPU tensors "
                "only; unset it to run the Triton kernels on the GPU")
    if device_type is None and not (torch.cuda.is_available() or _interpreting()):
        return "no CUDA device is available (and TRITON_INTERPRET=1 is not set)"
    if device_type not in (None, "cpu", "cuda"):
        return f"Triton kernels do not run on {device_type} tensors"
    return None


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """Backends this install can run, on `device` if given (e.g. 'cpu', 'cuda')."""
    device_type = torch.device(device).type if device is not None else None
    return [n for n in BACKENDS if unavailable_reason(n, device_type) is None]


def backend_status() -> Dict[str, str]:
    """Every backend with 'available' or the reason it is not (for diagnostics). The compiled
    backends say how their kernels were built: 'available (built ahead of time: <library>)' or
    'available (JIT-built on first use: <library>)'."""
    status = {}
    for n in BACKENDS:
        reason = unavailable_reason(n)
        if reason is None and n in ("cpu", "cuda"):
            info = _extension.info()
            reason = f"available ({info.get('build', '?')}: {info.get('path', '?')})"
        status[n] = reason or "available"
    return status


def module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


_warned_fallback = set()


def resolve(name: str, device: Union[str, torch.device]) -> ModuleType:
    """The backend module that runs primitives for tensors on `device`.

    An explicit name that cannot run raises BackendUnavailableError naming what is missing;
    `auto` takes the first usable backend in order and warns once when that is the slow
    reference path because a compiled one is missing."""
    device_type = torch.device(device).type
    requested = name
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
        requested = f"{ENV_VAR}={name}" if name != "auto" else "auto"
    if name != "auto":
        reason = unavailable_reason(name, device_type)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} (from {requested!r}) cannot run on {device_type} tensors: "
                f"{reason}")
        return module(name)
    order = _AUTO_ORDER.get(device_type, ("reference",))
    for candidate in order:
        if unavailable_reason(candidate, device_type) is None:
            if candidate == "reference" and device_type not in _warned_fallback:
                _warned_fallback.add(device_type)
                missing = {c: unavailable_reason(c, device_type) for c in order[:-1]}
                warnings.warn(
                    f"sam_kernels: no compiled backend for {device_type} tensors "
                    f"({'; '.join(f'{k}: {v}' for k, v in missing.items())}); using the "
                    "slower reference (torch._foreach) backend. Pass backend='reference' to "
                    "choose it deliberately (no warning).", RuntimeWarning, stacklevel=3)
            return module(candidate)
    raise AssertionError("unreachable: the reference backend is always available")


def validate_name(name: str) -> None:
    """Construction-time check of a backend argument: the name must exist, and an explicit
    choice must be usable somewhere on this machine."""
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"Invalid backend: {name!r}; choose one of {('auto',) + BACKENDS}")
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
