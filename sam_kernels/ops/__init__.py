"""Primitives of sam_kernels: fused multi-tensor passes over lists of tensors.

Every function takes Python lists of tensors on one device (any mix of fp32/fp64/fp16/bf16;
paired lists match tensor by tensor in dtype, shape and layout), accumulates in fp32 (fp64 for
fp64), returns reductions as device tensors, and never reads a tensor value on the host.
`backend` picks the implementation: 'auto' (default), 'reference', 'cpu', 'cuda' or 'triton'.
"""
from typing import Optional, Sequence

import torch

from ._registry import (BACKENDS, ENV_VAR, BackendUnavailableError, available_backends,
                        backend_status, resolve)

Tensors = Sequence[torch.Tensor]

__all__ = [
    "sum_sq", "dot_sum_sq", "perturb_", "restore_", "orth_combine_", "lerp_sum_sq_", "axpby_",
    "available_backends", "backend_status", "BackendUnavailableError", "BACKENDS", "ENV_VAR",
]


def _backend(backend: str, xs: Tensors):
    return resolve(backend, xs[0].device if len(xs) else "cpu")


def sum_sq(xs: Tensors, weights: Optional[Tensors] = None, eta: float = 0.0, *,
           backend: str = "auto") -> torch.Tensor:
    """Σ x² over every element of every tensor; with `weights`, Σ ((|w| + eta) · x)²."""
    return _backend(backend, xs).sum_sq(list(xs), list(weights or []), float(eta))


def dot_sum_sq(a: Tensors, b: Tensors, *, backend: str = "auto") -> torch.Tensor:
    """[Σ a·b, Σ a², Σ b²] as one tensor of 3 values, in one pass."""
    return _backend(backend, a).dot_sum_sq(list(a), list(b))


def perturb_(params: Tensors, dirs: Tensors, sum_sq: torch.Tensor, rho: float, eps: float, *,
             adaptive: bool = False, eta: float = 0.0, backup: Optional[Tensors] = None,
             backend: str = "auto") -> None:
    """p ← p + s · (|p| + eta)² · d if adaptive else p + s · d, with s = rho / (√sum_sq + eps)
    read from the device scalar `sum_sq`; copies p into `backup` first when given."""
    _backend(backend, params).perturb_(list(params), list(dirs), sum_sq, float(rho), float(eps),
                                       bool(adaptive), float(eta), list(backup or []))


def restore_(params: Tensors, backup: Tensors, *, backend: str = "auto") -> None:
    """p ← backup, exactly (a copy; storages and data_ptr unchanged)."""
    _backend(backend, params).restore_(list(params), list(backup))


def orth_combine_(d: Tensors, m: Tensors, stats: torch.Tensor, gamma: float, eps: float, *,
                  backend: str = "auto") -> None:
    """d ← d − gamma · (m − c · d) with c = cos · ‖m‖ / (‖d‖ + eps) and
    cos = ⟨m, d⟩ / (‖m‖ ‖d‖ + eps), where stats = dot_sum_sq(m, d) = [⟨m,d⟩, ‖m‖², ‖d‖²]."""
    _backend(backend, d).orth_combine_(list(d), list(m), stats, float(gamma), float(eps))


def lerp_sum_sq_(ema: Tensors, g: Tensors, theta: float, *, backend: str = "auto") -> torch.Tensor:
    """ema ← (1 − theta) · ema + theta · g, and returns Σ ema² of the stored result."""
    return _backend(backend, ema).lerp_sum_sq_(list(ema), list(g), float(theta))


def axpby_(ys: Tensors, xs: Tensors, a: float, b: float, *, backend: str = "auto") -> None:
    """ys ← a · xs + b · ys (ys is not read when b == 0)."""
    _backend(backend, ys).axpby_(list(ys), list(xs), float(a), float(b))
