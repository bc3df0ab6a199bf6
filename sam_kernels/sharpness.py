"""Measuring sharpness: the largest Hessian eigenvalue of the training loss (power iteration on
Hessian-vector products by double backward, as PyHessian) and SAM's sharpness L(w + e) − L(w)
with its one-step ascent (and the m-sharpness average over sub-batches). Both leave the model
exactly as they found it (weights, BatchNorm buffers, train/eval mode).

`loss_fn(outputs, targets)` gives the scalar loss of a batch; batches are `(inputs, targets)`.
`bn` chooses how BatchNorm (and dropout) behave while measuring: ``"eval"`` (default) puts the
model in eval mode — running statistics, no dropout: the loss is a function of the weights
alone —; ``"train"`` keeps train mode with batch statistics and the running statistics frozen.
"""
import contextlib
import math
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from . import bn as _bn

Batch = Tuple[Any, Any]
LossFn = Callable[[Any, Any], torch.Tensor]
_BN_MODES = ("eval", "train")


class TopEigenvalue(NamedTuple):
    """The eigenvalue of largest magnitude, the power iterations used, and whether the
    relative change fell below `tol` before `iters` ran out."""
    value: float
    iterations: int
    converged: bool


def _check_bn(bn: str) -> None:
    if bn not in _BN_MODES:
        raise ValueError(f"Invalid bn value: {bn!r}; choose 'eval' (running statistics) or "
                         "'train' (batch statistics, running statistics frozen)")


@contextlib.contextmanager
def _measuring(model: nn.Module, bn: str):
    """The model in the chosen mode; weights-independent state (mode, BN buffers) restored."""
    _check_bn(bn)
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if bn == "eval":
            model.eval()
        else:
            model.train()
            _bn.disable_running_stats(model)
        yield
    finally:
        if bn == "train":
            _bn.enable_running_stats(model)
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _params(model: nn.Module, params: Optional[Sequence[torch.Tensor]]) -> List[torch.Tensor]:
    ps = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not ps:
        raise ValueError("no parameters with requires_grad=True to measure over")
    return ps


def _batches(batches: Any) -> List[Batch]:
    if isinstance(batches, tuple) and len(batches) == 2 and torch.is_tensor(batches[0]):
        return [batches]  # one (inputs, targets) pair
    out = list(batches)
    if not out:
        raise ValueError("batches is empty; pass (inputs, targets) or a list of such pairs")
    return out


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _grad(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
          grad_outputs: Optional[Sequence[torch.Tensor]] = None, create_graph: bool = False,
          retain_graph: Optional[bool] = None) -> List[torch.Tensor]:
    """torch.autograd.grad with a zero block wherever the outputs do not depend on an input: a
    parameter the loss does not use has no gradient (None), and the gradient of a parameter the
    loss is linear in is a constant not connected to the graph; both are zero blocks of the
    Hessian, not errors."""
    gos = list(grad_outputs) if grad_outputs is not None else [None] * len(outputs)
    keep = [(o, g) for o, g in zip(outputs, gos) if o.requires_grad]
    got: Sequence[Optional[torch.Tensor]] = [None] * len(inputs)
    if keep:
        got = torch.autograd.grad([o for o, _ in keep], inputs,
                                  grad_outputs=None if grad_outputs is None
                                  else [g for _, g in keep],
                                  create_graph=create_graph, retain_graph=retain_graph,
                                  allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, got)]


def hessian_top_eigenvalue(model: nn.Module, loss_fn: LossFn, batches: Any, iters: int = 100,
                           tol: float = 1e-4, bn: str = "eval",
                           params: Optional[Sequence[torch.Tensor]] = None,
                           generator: Optional[torch.Generator] = None) -> TopEigenvalue:
    """Largest-magnitude eigenvalue of the Hessian of the mean loss over `batches` (each batch
    weighted equally) with respect to `params` (default: every parameter with
    requires_grad), by power iteration: v ← Hv/‖Hv‖, λ = ⟨v, Hv⟩, stopping when
    |λ − λ_prev| ≤ tol·|λ| or after `iters` products. One product costs a forward and two
    backward passes per batch (one batch: the gradient graph is built once and reused).
    `generator` seeds the start vector (CPU generator; default seed 0)."""
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"Invalid iters value: {iters!r} (must be an integer >= 1)")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"Invalid tol value: {tol!r} (must be a finite number >= 0)")
    _check_bn(bn)
    ps = _params(model, params)
    data = _batches(batches)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in ps]
    norm = _dot(v, v).sqrt()
    v = [t / norm.to(t.dtype) for t in v]
    with _measuring(model, bn):
        cached = None
        if len(data) == 1:
            x, y = data[0]
            cached = _grad([loss_fn(model(x), y)], ps, create_graph=True)

        def hvp(vec):
            if cached is not None:
                return _grad(cached, ps, grad_outputs=vec, retain_graph=True)
            total = None
            for x, y in data:
                grads = _grad([loss_fn(model(x), y)], ps, create_graph=True)
                part = _grad(grads, ps, grad_outputs=vec)
                total = list(part) if total is None else [a + b for a, b in zip(total, part)]
            return [t / len(data) for t in total]

        value, prev = 0.0, None
        for it in range(1, iters + 1):
            hv = [t.detach() for t in hvp(v)]
            value = float(_dot(hv, v))
            norm = float(_dot(hv, hv).sqrt())
            if prev is not None and abs(value - prev) <= tol * abs(value):
                return TopEigenvalue(value, it, True)
            if norm == 0.0:  # H v = 0: v is in the null space; λ = 0 is exact for it
                return TopEigenvalue(0.0, it, True)
            v = [t / norm for t in hv]
            prev = value
    return TopEigenvalue(value, iters, False)


def sam_sharpness(model: nn.Module, loss_fn: LossFn, batch: Batch, rho: float,
                  m: Optional[int] = None, bn: str = "eval",
                  params: Optional[Sequence[torch.Tensor]] = None) -> float:
    """SAM's sharpness of `batch`: L(w + e) − L(w) with e = rho·g/‖g‖, g = ∇L(w) (global
    norm over `params`). With `m`, the m-sharpness of Foret et al.: the batch split into
    consecutive sub-batches of m samples (the last may be smaller), each with its own e,
    and the mean of their L_i(w + e_i) − L_i(w). The weights are restored exactly."""
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and math.isfinite(rho)
            and rho >= 0):
        raise ValueError(f"Invalid rho value: {rho!r} (must be a finite number >= 0)")
    if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
        raise ValueError(f"Invalid m value: {m!r} (an integer >= 1, or None for the whole batch)")
    ps = _params(model, params)
    x, y = batch
    n = len(x)
    if n == 0:
        raise ValueError("the batch is empty")
    chunks = [(x, y)] if m is None else [(x[i:i + m], y[i:i + m]) for i in range(0, n, m)]
    saved = [p.detach().clone() for p in ps]
    gaps = []
    with _measuring(model, bn):
        try:
            for xc, yc in chunks:
                loss = loss_fn(model(xc), yc)
                grads = torch.autograd.grad(loss, ps, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads)]
                scale = rho / (float(_dot(grads, grads).sqrt()) + 1e-12)
                with torch.no_grad():
                    for p, g in zip(ps, grads):
                        p.add_(g, alpha=scale)
                    perturbed = loss_fn(model(xc), yc)
                    for p, s in zip(ps, saved):
                        p.copy_(s)
                gaps.append(float(perturbed) - float(loss.detach()))
        finally:
            with torch.no_grad():
                for p, s in zip(ps, saved):
                    p.copy_(s)
    return sum(gaps) / len(gaps)
