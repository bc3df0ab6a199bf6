"""Primitives of sam_kernels: fused multi-tensor passes over lists of tensors.

Every function takes Python lists of tensors on one device (any mix of fp32/fp64/fp16/bf16;
paired lists match tensor by tensor in dtype and shape; a list the op only reads may have
another memory layout, it is then copied into its partner's), computes element-wise in fp32
(fp64 for fp64), squares and sums reductions in fp64 and returns them as float64 device tensors,
and never reads a tensor value on the host. A tensor an op writes may not share memory with
another argument. See docs/ops.md.
`backend` picks the implementation: 'auto' (default), 'reference', 'cpu', 'cuda' or 'triton'.
"""
from typing import Optional, Sequence

import torch

from . import _checks
from ._registry import (BACKENDS, ENV_VAR, BackendUnavailableError, available_backends,
                        backend_status, resolve)

Tensors = Sequence[torch.Tensor]

__all__ = [
    "sum_sq", "dot_sum_sq", "perturb_", "restore_", "orth_combine_", "lerp_sum_sq_", "axpby_",
    "scale_", "add_scaled_", "sum_sq_per_tensor",
    "available_backends", "backend_status", "BackendUnavailableError", "BACKENDS", "ENV_VAR",
]


def _backend(backend: str, xs: list):
    return resolve(backend, xs[0].device if len(xs) and isinstance(xs[0], torch.Tensor)
                   else "cpu")


def _lists(op: str, **lists) -> list:
    """The list arguments as lists (None for an optional one: empty); a bare Tensor or a str
    raises TypeError rather than being iterated."""
    return [[] if xs is None else _checks.as_list(op, name, xs) for name, xs in lists.items()]


def sum_sq(xs: Tensors, weights: Optional[Tensors] = None, eta: float = 0.0, *,
           backend: str = "auto") -> torch.Tensor:
    """Σ x² over every element of every tensor; with `weights`, Σ ((|w| + eta) · x)². A float64
    0-d tensor whatever the input dtypes (the terms are squared and summed in float64)."""
    xs, weights = _lists("sum_sq", xs=xs, weights=weights)
    return _backend(backend, xs).sum_sq(xs, weights, float(eta))


def dot_sum_sq(a: Tensors, b: Tensors, *, backend: str = "auto") -> torch.Tensor:
    """[Σ a·b, Σ a², Σ b²] as one float64 tensor of 3 values, in one pass."""
    a, b = _lists("dot_sum_sq", a=a, b=b)
    return _backend(backend, a).dot_sum_sq(a, b)


def perturb_(params: Tensors, dirs: Tensors, sum_sq: torch.Tensor, rho: float, eps: float, *,
             adaptive: bool = False, eta: float = 0.0, backup: Optional[Tensors] = None,
             backend: str = "auto") -> None:
    """p ← p + s · (|p| + eta)² · d if adaptive else p + s · d, with s = rho / (√sum_sq + eps)
    read from the device scalar `sum_sq`; copies p into `backup` first when given."""
    params, dirs, backup = _lists("perturb_", params=params, dirs=dirs, backup=backup)
    _backend(backend, params).perturb_(params, dirs, sum_sq, float(rho), float(eps),
                                       bool(adaptive), float(eta), backup)


def restore_(params: Tensors, backup: Tensors, *, backend: str = "auto") -> None:
    """p ← backup, exactly (a copy; storages and data_ptr unchanged)."""
    params, backup = _lists("restore_", params=params, backup=backup)
    _backend(backend, params).restore_(params, backup)


def orth_combine_(d: Tensors, m: Tensors, stats: torch.Tensor, gamma: float, eps: float, *,
                  backend: str = "auto") -> None:
    """d ← d − gamma · (m − c · d) with c = cos · ‖m‖ / (‖d‖ + eps) and
    cos = ⟨m, d⟩ / (‖m‖ ‖d‖ + eps), where stats = dot_sum_sq(m, d) = [⟨m,d⟩, ‖m‖², ‖d‖²]."""
    d, m = _lists("orth_combine_", d=d, m=m)
    _backend(backend, d).orth_combine_(d, m, stats, float(gamma), float(eps))


def lerp_sum_sq_(ema: Tensors, g: Tensors, theta: float, *, backend: str = "auto") -> torch.Tensor:
    """ema ← (1 − theta) · ema + theta · g, and returns Σ ema² of the stored result (float64)."""
    ema, g = _lists("lerp_sum_sq_", ema=ema, g=g)
    return _backend(backend, ema).lerp_sum_sq_(ema, g, float(theta))


def axpby_(ys: Tensors, xs: Tensors, a: float, b: float, *, backend: str = "auto") -> None:
    """ys ← a · xs + b · ys (ys is not read when b == 0)."""
    ys, xs = _lists("axpby_", ys=ys, xs=xs)
    _backend(backend, ys).axpby_(ys, xs, float(a), float(b))


def scale_(xs: Tensors, factor: torch.Tensor, *, backend: str = "auto") -> None:
    """xs[i] ← factor · xs[i] in place. `factor` is a float32/float64 tensor on the tensors'
    device, read there (never on the host): 0-d, one factor for every tensor (e.g. gradient
    clipping's min(1, max_norm / (‖g‖ + 1e-6))), or 1-d of length len(xs), one per tensor."""
    (xs,) = _lists("scale_", xs=xs)
    _backend(backend, xs).scale_(xs, factor)


def add_scaled_(ys: Tensors, xs: Tensors, alpha: torch.Tensor, *,
                backend: str = "auto") -> None:
    """ys[i] ← ys[i] + alpha · xs[i] in place (xs is only read). `alpha` is a float32/float64
    tensor on the tensors' device: 0-d (one for every pair) or 1-d of length len(ys)."""
    ys, xs = _lists("add_scaled_", ys=ys, xs=xs)
    _backend(backend, ys).add_scaled_(ys, xs, alpha)


def sum_sq_per_tensor(xs: Tensors, *, backend: str = "auto") -> torch.Tensor:
    """[Σ x² of each tensor] as a float64 1-d tensor of length len(xs) (squares and sums in
    float64, in a fixed order: the same result whatever the thread count)."""
    (xs,) = _lists("sum_sq_per_tensor", xs=xs)
    return _backend(backend, xs).sum_sq_per_tensor(xs)
