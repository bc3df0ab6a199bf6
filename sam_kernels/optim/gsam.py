"""GSAM — surrogate gap guided sharpness-aware minimization (Zhuang et al., ICLR 2022), as in
juntang-zhuang/GSAM, with the seed's constructor keywords and its set_closure()/step() API."""
import numbers
from typing import Any, Callable, Dict, Iterable, Optional

import torch

from .base import (SharpnessAwareOptimizer, StepVar, Tensors, check_nonnegative,
                   check_positive)
from .closure import ClosureMixin
from .seed_compat import check_step_arguments

_GRAD_REDUCE = ("mean", "sum")
_NO_ALPHA = object()


def check_grad_reduce(grad_reduce: Any) -> str:
    if not isinstance(grad_reduce, str) or grad_reduce.lower() not in _GRAD_REDUCE:
        raise ValueError(f"Invalid grad_reduce value: {grad_reduce!r}; choose 'mean' or 'sum'")
    return grad_reduce.lower()


def scheduled_value(name: str, value: Any) -> float:
    """A rho from a scheduler (Python or numpy number) as a validated float >= 0."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    check_nonnegative(name, value)
    return value


class GSAM(ClosureMixin, SharpnessAwareOptimizer):
    r"""GSAM: the SAM gradient at the perturbed point minus ``alpha`` times the component of
    the gradient at w orthogonal to it.

    One step: g = ∇L(w); ``w ← w + rho_t / (‖T⊙g‖ + eps) · T² · g`` (exact copy of w kept;
    T = |w| + eta in adaptive groups, else 1); g_p = ∇L(w+e) with BatchNorm running statistics
    frozen; then, always non-adaptively, over all parameters with a gradient,
    ``cos = ⟨g, g_p⟩ / (‖g_p‖‖g‖ + eps)``, ``v = g − cos·‖g‖·g_p / (‖g_p‖ + eps)``,
    ``g_p ← g_p − alpha · v``; w restored exactly; under DDP the final gradients averaged
    across ranks; base optimizer step. The decomposition is one ``dot_sum_sq`` pass and one
    ``orth_combine_`` pass over all gradients, whatever their number.

    Args:
        params: parameters or param-group dicts (per-group keys: ``adaptive``, ``eta``).
        base_optimizer: a ``torch.optim.Optimizer`` instance over the same parameters (as in
            the seed) or a class built here on our param groups with ``**base_kwargs``.
        model: the model; needed by ``set_closure()``, for freezing BatchNorm statistics in
            the perturbed pass and for DDP (both passes under ``no_sync``, one average of the
            final gradients).
        gsam_alpha: weight of the orthogonal component (>= 0; 0 gives SAM). Required.
        rho_scheduler: gives rho_t (``step()`` returns a float), e.g. a scheduler from
            ``sam_kernels.schedulers``; stepped once here and by every ``update_rho_t()``.
        adaptive, perturb_eps: as in the seed (ASAM-style neighbourhood; eps of the norms).
        rho: the constant rho when no scheduler is given (keyword only).
        eta: ASAM offset in T = |w| + eta (keyword only; the seed has eta = 0).
        grad_reduce: 'mean' or 'sum' of the final gradients across DDP ranks.
        backend: primitives' backend ('auto', 'reference', 'cpu', 'cuda', 'triton').
        grad_scaler, max_grad_norm: as for SAM (each pass unscaled once, inf/NaN skips the
            update; the final gradient clipped after the DDP average).

    Three ways to run a step::

        # 1. the seed's API
        optimizer.set_closure(loss_fn, inputs, targets)
        outputs, loss = optimizer.step()
        lr_scheduler.step(); optimizer.update_rho_t()

        # 2. the torch closure contract (Lightning, ...): returns the closure's loss at w
        loss = optimizer.step(closure)

        # 3. by hand; pass_context() applies DDP no_sync and the BatchNorm freeze
        with optimizer.pass_context():
            loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        with optimizer.pass_context():
            loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
    """

    _nonnegative_group_keys = ("eta",)
    _reduce_final_grads = True  # under DDP: every pass per-rank, the final gradient averaged
    _grad_params = StepVar()  # changed by steps: kept in a dict for torch.compile
    _seed_family = "gsam"  # load_state_dict converts juntang-zhuang/GSAM's checkpoints

    def __init__(self, params: Iterable, base_optimizer: Any,
                 model: Optional[torch.nn.Module] = None, gsam_alpha: Any = _NO_ALPHA,
                 rho_scheduler: Any = None, adaptive: bool = False, perturb_eps: float = 1e-12,
                 *, rho: float = 0.05, eta: float = 0.0, grad_reduce: str = "mean",
                 backend: str = "auto", grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, **base_kwargs: Any) -> None:
        if gsam_alpha is _NO_ALPHA:
            raise TypeError("GSAM needs gsam_alpha, the weight of the orthogonal gradient "
                            "component (>= 0; 0 gives SAM), e.g. GSAM(..., gsam_alpha=0.1)")
        check_nonnegative("gsam_alpha", gsam_alpha)
        check_nonnegative("rho", rho)
        check_nonnegative("eta", eta)
        check_positive("perturb_eps", perturb_eps)
        if rho_scheduler is not None and not callable(getattr(rho_scheduler, "step", None)):
            raise TypeError(f"rho_scheduler must have a step() method returning rho, got "
                            f"{rho_scheduler!r}")
        self.alpha = float(gsam_alpha)
        self.perturb_eps = float(perturb_eps)
        self.grad_reduce = check_grad_reduce(grad_reduce)
        self.rho = float(rho)
        self.rho_scheduler = rho_scheduler
        defaults = dict(adaptive=bool(adaptive), eta=eta)
        super().__init__(params, base_optimizer, defaults, backend=backend, model=model,
                         base_kwargs=base_kwargs, grad_scaler=grad_scaler,
                         max_grad_norm=max_grad_norm)
        self._grad_params: Tensors = []  # parameters whose gradient at w is kept
        self.rho_t = self.rho
        self.update_rho_t()

    @torch.no_grad()
    def update_rho_t(self) -> float:
        """Advance the rho scheduler (if any) and return the rho the next step uses."""
        if self.rho_scheduler is not None:
            self.rho_t = scheduled_value("rho_t", self.rho_scheduler.step())
        return self.rho_t

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Keep the gradient at w and move to w + e."""
        self._require_unperturbed("first_step()")
        self._check_groups()
        check_nonnegative("gsam_alpha", self.alpha)
        check_nonnegative("rho_t", self.rho_t)
        self._grad_params = self._perturb_keeping_grads("grad_at_w", self.rho_t,
                                                        self.perturb_eps)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Decompose (g_p ← g_p − alpha·v), restore w exactly, average across DDP ranks, step
        the base optimizer."""
        self._require_perturbed("second_step()")
        slots = self._slots_with_grads()
        params = [p for s in slots for p in s.params]
        grads = [g for s in slots for g in s.grads]
        kept = {id(p) for p in self._grad_params}
        if any(id(p) not in kept for p in params):
            self._abort_step()
            raise RuntimeError("a parameter has a gradient at w + e but had none at w; GSAM "
                               "needs both gradients of every parameter it updates (the "
                               "weights were restored)")
        self._unscale_grads()
        grads_at_w = self._scratch("grad_at_w", params)
        backend = self._ops()
        # [⟨g, g_p⟩, ‖g‖², ‖g_p‖²], summed over the shards when sharded
        stats = self._global_sum(backend.dot_sum_sq(grads_at_w, grads))
        backend.orth_combine_(grads, grads_at_w, stats, self.alpha, self.perturb_eps)
        self._restore()
        self._sync_grads(grads, self.grad_reduce)
        self._base_step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None, *args: Any,
             **seed_kwargs: Any) -> Any:
        """Pass at w, perturb, pass at w + e (BatchNorm statistics frozen), decompose, restore,
        base step. Without a closure runs the one from set_closure() and returns
        ``(outputs, loss)``; with one returns what its first call returned. The seeds' step
        keywords (``epoch=``, ...) are ignored, as for SAM."""
        check_step_arguments(self, args, seed_kwargs)
        closure = self._closure_for_step(closure)
        self._require_unperturbed("step()")
        result = closure()
        self.first_step(zero_grad=True)
        with self._perturbed_pass():
            at_w_plus_e = closure()
        self.second_step()
        self._record_gap(result, at_w_plus_e)
        return result

    # ------------------------------------------------------------------ checkpointing
    def _extra_state(self) -> Dict[str, Any]:
        extra = {"rho_t": self.rho_t}
        if hasattr(self.rho_scheduler, "state_dict"):
            extra["rho_scheduler"] = self.rho_scheduler.state_dict()
        return extra

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        self.rho_t = extra.get("rho_t", self.rho_t)
        if "rho_scheduler" in extra and hasattr(self.rho_scheduler, "load_state_dict"):
            self.rho_scheduler.load_state_dict(extra["rho_scheduler"])

    def __repr__(self) -> str:
        return f"GSAM(base_optimizer={self.base_optimizer!r}, gsam_alpha={self.alpha}, " \
               f"rho_t={self.rho_t}, backend={self.backend!r})"
