"""SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021), as in davda54/sam."""
from typing import Any, Callable, Iterable, Optional

import torch

from .base import SharpnessAwareOptimizer, check_nonnegative, check_positive


class SAM(SharpnessAwareOptimizer):
    r"""Sharpness-aware minimization around any base optimizer; ASAM with ``adaptive=True``.

    Over every parameter with a gradient, across all groups,
    ``N = sqrt(Σ_i ‖T_i ⊙ g_i‖²)`` with ``T_i = |w_i| + eta`` in adaptive groups, else 1;
    each group perturbs ``w ← w + rho / (N + eps) · T² · g`` (weights kept for an exact restore);
    after the backward pass at the perturbed point the weights are restored and the base
    optimizer steps with that gradient.

    Args:
        params: parameters or param-group dicts (per-group keys: ``rho``, ``adaptive``, ``eta``).
        base_optimizer: a ``torch.optim.Optimizer`` class, built here on our param groups with
            ``**base_kwargs`` (davda54 style), or an instance over the same parameters.
        rho: neighbourhood radius (>= 0).
        adaptive: ASAM's scale-invariant neighbourhood.
        eta: ASAM's offset in ``T = |w| + eta`` (>= 0). ``eta=0`` is davda54's ASAM; the ASAM
            paper's recipe is ``eta=0.01`` with biases and norm layers in a non-adaptive group.
        eps: added to the norm (> 0).
        backend: 'auto', 'reference', 'cpu', 'cuda' or 'triton' (see ``sam_kernels.ops``).
        model: optional module; when ``step(closure)`` runs the passes, its BatchNorm running
            statistics are frozen during the pass at the perturbed weights, and if it is a
            ``DistributedDataParallel`` module pass 1 runs under ``model.no_sync()`` (each rank
            perturbs with its own gradient) while pass 2 is averaged by DDP. Hand-written
            loops get the same by wrapping each pass in ``with optimizer.pass_context():``.
        grad_scaler: a ``torch.amp.GradScaler``; scale the loss of both passes
            (``scaler.scale(loss).backward()``) and call ``scaler.update()`` after each step.
            Each pass is unscaled once; inf/NaN in either pass skips the update and leaves
            weights and optimizer state exactly as they were.
        max_grad_norm: clip the final gradient (the one taken at w + e) to this global L2 norm
            before the base step, as ``torch.nn.utils.clip_grad_norm_`` would.

    Example::

        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)   # pass at w, perturb, pass at w+e, restore, base step
    """

    _nonnegative_group_keys = ("rho", "eta")

    def __init__(self, params: Iterable, base_optimizer: Any, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.0, eps: float = 1e-12,
                 backend: str = "auto", model: Optional[torch.nn.Module] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, **base_kwargs: Any) -> None:
        check_nonnegative("rho", rho)
        check_nonnegative("eta", eta)
        check_positive("eps", eps)
        self.eps = float(eps)
        defaults = dict(rho=rho, adaptive=bool(adaptive), eta=eta)
        super().__init__(params, base_optimizer, defaults, backend=backend, model=model,
                         base_kwargs=base_kwargs, grad_scaler=grad_scaler,
                         max_grad_norm=max_grad_norm)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e using the current gradients (the gradient at w)."""
        self._require_unperturbed("first_step()")
        self._check_groups()
        slots = self._slots_with_grads()
        self._unscale_grads()
        self._perturb(slots, self._weighted_sum_sq(slots), self.eps)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly and step the base optimizer with the gradient taken at w + e."""
        self._require_perturbed("second_step()")
        self._unscale_grads()
        self._restore()
        self._base_step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """The torch closure contract (what Lightning calls): ``closure`` zeroes the gradients,
        runs forward and backward and returns the loss. Runs it at w and at w + e and returns
        the loss of the first call (at w)."""
        closure = self._require_closure(closure, type(self).__name__)
        self._require_unperturbed("step()")
        loss = closure()
        self.first_step(zero_grad=True)
        with self._perturbed_pass():
            closure()
        self.second_step()
        return loss
