"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR
2022): the SAM gradient every k-th step, reused in between through its component orthogonal to
the plain gradient, so that k − 1 of every k steps cost one forward-backward pass."""
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from .base import GradSlots, SharpnessAwareOptimizer, StepVar, Tensors, check_nonnegative, \
    check_positive
from .closure import ClosureMixin
from .sam import PeriodicTwoPass, check_int

GRANULARITIES = ("global", "tensor")
_GV = "looksam_minus_gv"  # state[p]: −g_v (stored negated: c·g − g_s is what one axpby_ leaves)
_GV_NORM = "looksam_gv_norm"  # state[p]: ‖g_v,i‖ of the tensor (granularity 'tensor')


class LookSAM(PeriodicTwoPass, ClosureMixin, SharpnessAwareOptimizer):
    r"""LookSAM around any base optimizer.

    Notation: g = ∇L(w) on the batch; ‖·‖ the global L2 norm over every parameter with a
    gradient; T = |w| + eta in adaptive groups, else 1; e = ρ·T²·g / (‖T⊙g‖ + eps).

    - Steps t = 0, k, 2k, … (t = completed steps, ``steps``): g = ∇L(w); g_s = ∇L(w + e)
      (BatchNorm running statistics frozen); keep
      ``g_v = g_s − ‖g_s‖·cos θ · g / (‖g‖ + eps)``, ``cos θ = ⟨g, g_s⟩ / (‖g‖‖g_s‖ + eps)``;
      the base optimizer steps with g_s.
    - Other steps: **one** forward-backward, g = ∇L(w); the base optimizer steps with
      ``g + alpha · ‖g‖ / (‖g_v‖ + eps) · g_v``.

    ``granularity='tensor'`` takes the norms and the cosine of g_v and of the reuse ratio per
    parameter tensor (as pytorch-optimizer's LookSAM does); the perturbation stays global.
    The arithmetic is the primitives: ``dot_sum_sq``, one scaling, ``axpby_`` and ``sum_sq``
    on the SAM steps, ``sum_sq`` + one ``perturb_`` pass (g ← g + s·g_v with the device scalar
    s) on the others; per tensor it is torch's ``_foreach`` kernels (``_foreach_norm``; the
    per-tensor dot product from ‖g + g_s‖² − ‖g‖² − ‖g_s‖²), still a fixed number of kernels
    whatever the number of tensors.

    Args:
        params: parameters or param-group dicts (per-group keys: ``rho``, ``adaptive``,
            ``eta``, ``perturb``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``**base_kwargs``) or
            an instance over the same parameters.
        rho: neighbourhood radius (>= 0). k: SAM every k steps (integer >= 1). alpha: weight
            of the reused component (>= 0). eps: added to the norms (> 0).
        adaptive, eta: ASAM's neighbourhood T = |w| + eta for the perturbation.
        granularity: 'global' (the paper) or 'tensor'.
        model, backend, grad_scaler, max_grad_norm: as for SAM. Under DDP every pass of
            LookSAM is averaged (g, g_s and so g_v are the same on every rank, and one-pass
            steps need the averaged g anyway): the perturbation uses the global-batch g.

    Steps: ``step(closure)`` (returns the loss at w), ``set_closure(...)`` + ``step()``, or
    by hand — pass at w, ``first_step()``, the pass at w + e only if
    ``needs_perturbed_pass()`` (in ``pass_context()``), ``second_step()``.
    """

    _nonnegative_group_keys = ("rho", "eta")
    _amp_guarded_state = (_GV, _GV_NORM)
    _gv_sum_sq = StepVar()  # ‖g_v‖² over all parameters (granularity 'global')
    _gv_den_sq = StepVar()  # (‖g_v‖ + eps)², what a one-pass step divides by ‖g‖²
    _kept = StepVar(())  # the parameters whose g was kept in first_step()

    def __init__(self, params: Iterable, base_optimizer: Any, rho: float = 0.05, k: int = 5,
                 alpha: float = 0.7, adaptive: bool = False, eta: float = 0.0,
                 eps: float = 1e-12, granularity: str = "global",
                 model: Optional[torch.nn.Module] = None, backend: str = "auto",
                 grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, **base_kwargs: Any) -> None:
        check_nonnegative("rho", rho)
        check_int("k", k, 1)
        check_nonnegative("alpha", alpha)
        check_nonnegative("eta", eta)
        check_positive("eps", eps)
        if granularity not in GRANULARITIES:
            raise ValueError(f"Invalid granularity: {granularity!r}; choose one of "
                             f"{GRANULARITIES}")
        self.k, self.alpha, self.eps, self.granularity = k, float(alpha), float(eps), granularity
        self._gv_sum_sq = None
        defaults = dict(rho=rho, adaptive=bool(adaptive), eta=eta)
        super().__init__(params, base_optimizer, defaults, backend=backend, model=model,
                         base_kwargs=base_kwargs, grad_scaler=grad_scaler,
                         max_grad_norm=max_grad_norm)

    def needs_perturbed_pass(self) -> bool:
        """Whether the current step computes the SAM gradient (runs the pass at w + e): every
        k-th step, and any step before a g_v exists."""
        if self.steps % self.k == 0:
            return True
        if self.granularity == "global":
            return self._gv_sum_sq is None
        return not any(_GV in s for s in self.state.values())

    def _pass_is_per_rank(self) -> bool:
        return False  # every pass averaged by DDP (see the class doc)

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """SAM step: keep g and move to w + e. One-pass step: nothing (the gradients stay)."""
        kept = self._first_step(zero_grad, keep="looksam_g")
        if kept is not None:
            self._kept = kept

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """SAM step: keep g_v from g and g_s, restore w, base step with g_s. One-pass step:
        g ← g + alpha·‖g‖/(‖g_v‖ + eps)·g_v, base step."""
        one_pass = self._one_pass
        if not one_pass:
            self._require_perturbed("second_step()")
        slots = self._slots_with_grads()
        self._unscale_grads()
        if one_pass:
            self._one_pass = False
            self._reuse(slots)
        else:
            self._keep_gv(slots)
            self._restore()
        self._count_step(perturbed=not one_pass)
        self._base_step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Pass at w; on SAM steps perturb, pass at w + e, restore; base step. Returns what
        the call at w returned."""
        return self._run_step(self._closure_for_step(closure))

    # ------------------------------------------------------------------ building blocks
    def _both(self, slots: List[GradSlots]):
        """(parameters, g_s, kept g) of the parameters with a gradient in both passes."""
        kept = {id(p) for p in getattr(self, "_kept", [])}
        params, grads = [], []
        for s in slots:
            for p, g in zip(s.params, s.grads):
                if id(p) in kept:
                    params.append(p)
                    grads.append(g)
        return params, grads, self._scratch("looksam_g", params, grads)

    def _keep_gv(self, slots: List[GradSlots]) -> None:
        params, g_s, g = self._both(slots)
        self._kept = []
        had, had_norm = {}, {}  # g_v of this step only (a parameter may have none now);
        for p in list(self.state):  # buffers reused: stable objects for the AMP snapshot
            buf = self.state[p].pop(_GV, None)
            norm = self.state[p].pop(_GV_NORM, None)
            if buf is not None:
                had[p] = buf
            if norm is not None:
                had_norm[p] = norm
        if not params:
            self._gv_sum_sq = self._gv_den_sq = None
            return
        ops = self._ops()
        if self.granularity == "global":
            stats = self._global_sum(ops.dot_sum_sq(g, g_s))  # [⟨g, g_s⟩, ‖g‖², ‖g_s‖²]
            n_g, n_s = stats[1].sqrt(), stats[2].sqrt()
            coef = stats[0] / (n_g * n_s + self.eps) * n_s / (n_g + self.eps)  # cos θ‖g_s‖/‖g‖
            # kept g ← c·g − g_s = −g_v (orth_combine_ would leave g − g_v: g is not kept)
            torch._foreach_mul_(g, coef)
            ops.axpby_(g, g_s, -1.0, 1.0)
            self._gv_sum_sq = self._global_sum(ops.sum_sq(g, [], 0.0))
            self._gv_den_sq = (self._gv_sum_sq.sqrt() + self.eps) ** 2
        else:
            sq = self._per_tensor_sq([g, g_s, torch._foreach_add(g, g_s)])
            n_g, n_s = sq[0].sqrt(), sq[1].sqrt()
            cos = (sq[2] - sq[0] - sq[1]) / 2 / (n_g * n_s + self.eps)
            coef = cos * n_s / (n_g + self.eps)
            torch._foreach_mul_(g, list(coef.to(g[0].dtype).unbind()))
            torch._foreach_sub_(g, g_s)  # c_i·g_i − g_s,i = −g_v,i
            norms = list(self._per_tensor_sq([g])[0].sqrt().unbind())
        for i, p in enumerate(params):
            st = self.state[p]
            old = had.get(p)
            ok = old is not None and old.shape == g[i].shape and old.dtype == g[i].dtype and \
                old.stride() == g[i].stride()
            st[_GV] = old if ok else torch.empty_like(g[i], memory_format=torch.preserve_format)
            if self.granularity == "tensor":
                old = had_norm.get(p)
                st[_GV_NORM] = old if old is not None and old.dtype == norms[i].dtype else \
                    torch.empty_like(norms[i])
        torch._foreach_copy_([self.state[p][_GV] for p in params], g)
        if self.granularity == "tensor":
            torch._foreach_copy_([self.state[p][_GV_NORM] for p in params], norms)

    def _reuse(self, slots: List[GradSlots]) -> None:
        params = [p for s in slots for p in s.params]
        grads = [g for s in slots for g in s.grads]
        with_gv = [i for i, p in enumerate(params) if _GV in self.state.get(p, {})]
        if not with_gv:
            return
        ys = [grads[i] for i in with_gv]
        xs = [self.state[params[i]][_GV] for i in with_gv]
        ops = self._ops()
        if self.granularity == "global":
            g_sq = self._global_sum(ops.sum_sq(grads, [], 0.0))
            # perturb_ adds s·x with s = rho/(√X + eps) read on the device: rho = −alpha,
            # eps = 0 and X = ((‖g_v‖ + eps)/‖g‖)² give s = −alpha·‖g‖/(‖g_v‖ + eps) (the
            # stored x is −g_v); ‖g‖ = 0 gives X = inf, s = 0
            if self._gv_den_sq is None:  # after a resume
                self._gv_den_sq = (self._gv_sum_sq.sqrt() + self.eps) ** 2
            x = (self._gv_den_sq / g_sq).to(g_sq.dtype)
            ops.perturb_(ys, xs, x, -self.alpha, 0.0, False, 0.0, [])
        else:
            n_g = self._per_tensor_sq([ys])[0].sqrt()
            n_v = torch.stack([self.state[params[i]][_GV_NORM] for i in with_gv])
            coef = self.alpha * n_g / (n_v + self.eps)
            torch._foreach_sub_(ys, torch._foreach_mul(xs, list(coef.to(ys[0].dtype).unbind())))

    def _per_tensor_sq(self, lists: List[Tensors]) -> torch.Tensor:
        """Per-tensor sums of squares of each list, as one (len(lists), n) tensor summed over
        shards (one _foreach_norm per list, one reduction call)."""
        rows = [torch.stack(torch._foreach_norm(xs)).to(torch.float64) ** 2 for xs in lists]
        return self._global_sum(torch.stack(rows))

    # ------------------------------------------------------------------ checkpointing
    def _extra_state(self) -> Dict[str, Any]:
        extra = self._counters()
        extra["gv_sum_sq"] = None if self._gv_sum_sq is None else self._gv_sum_sq.clone()
        return extra

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        self._load_counters(extra)
        gv = extra.get("gv_sum_sq")
        self._gv_sum_sq = None if gv is None else gv.to(device=self._device or "cpu", copy=True)
        self._gv_den_sq = None

    def __repr__(self) -> str:
        return f"LookSAM(k={self.k}, alpha={self.alpha}, granularity={self.granularity!r}, " \
               f"base_optimizer={self.base_optimizer!r}, backend={self.backend!r})"
