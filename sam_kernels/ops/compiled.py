"""The compiled backends (`cpu`, `cuda`): thin calls into the `torch.ops.sam_kernels` custom ops
defined in csrc/register.cpp. The dispatcher picks the CPU or CUDA kernel from the tensors'
device; the fake (meta) implementations below let torch.compile trace through them."""
from typing import Sequence

import torch

from .. import _extension
from . import _checks

Tensors = Sequence[torch.Tensor]


def _ops():
    return torch.ops.sam_kernels


def sum_sq(xs: Tensors, weights: Tensors, eta: float) -> torch.Tensor:
    return _ops().sum_sq(xs, weights, eta)


def dot_sum_sq(a: Tensors, b: Tensors) -> torch.Tensor:
    return _ops().dot_sum_sq(a, b)


def perturb_(params: Tensors, dirs: Tensors, sum_sq: torch.Tensor, rho: float, eps: float,
             adaptive: bool, eta: float, backup: Tensors) -> None:
    _ops().perturb_(params, dirs, sum_sq, rho, eps, adaptive, eta, backup)


def restore_(params: Tensors, backup: Tensors) -> None:
    _ops().restore_(params, backup)


def orth_combine_(d: Tensors, m: Tensors, stats: torch.Tensor, gamma: float, eps: float) -> None:
    _ops().orth_combine_(d, m, stats, gamma, eps)


def lerp_sum_sq_(ema: Tensors, g: Tensors, theta: float) -> torch.Tensor:
    return _ops().lerp_sum_sq_(ema, g, theta)


def axpby_(ys: Tensors, xs: Tensors, a: float, b: float) -> None:
    _ops().axpby_(ys, xs, a, b)


def _register_fakes() -> None:
    def reduction(xs, shape):
        device = xs[0].device if len(xs) else torch.device("cpu")
        return torch.empty(shape, dtype=_checks.reduction_dtype(xs), device=device)

    torch.library.register_fake("sam_kernels::sum_sq")(
        lambda xs, weights, eta: reduction(xs, ()))
    torch.library.register_fake("sam_kernels::dot_sum_sq")(lambda a, b: reduction(a, (3,)))
    torch.library.register_fake("sam_kernels::lerp_sum_sq_")(
        lambda ema, g, theta: reduction(ema, ()))
    for name in ("perturb_", "restore_", "orth_combine_", "axpby_"):
        torch.library.register_fake(f"sam_kernels::{name}")(lambda *args: None)


if _extension.load():
    _register_fakes()
