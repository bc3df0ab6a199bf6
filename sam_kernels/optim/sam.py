"""SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021) as in davda54/sam; Composer's interval
SAM (``interval=k``); SAM-ON's norm-only groups (``perturb=False``, see sam_on.py)."""
from .base import TWO_PASS, Plan, SharpnessAwareOptimizer
from .compat import ReadOnlyAlias


class SAM(SharpnessAwareOptimizer):
    r"""Sharpness-aware minimization around any base optimizer; ASAM with ``adaptive=True``.

    ``N = sqrt(Σ_i ‖T_i ⊙ g_i‖²)`` over every parameter with a gradient (T = |w| + eta in
    adaptive groups, else 1); ``w ← w + rho/(N + eps) · T² · g`` (w kept for an exact
    restore); the gradient at w + e; w restored; the base optimizer steps with that gradient.

    Args:
        params: parameters or param groups (per-group keys ``rho``, ``adaptive``, ``eta``,
            ``perturb``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with the remaining keywords)
            or an instance over the same parameters.
        rho: radius (>= 0). adaptive, eta: ASAM's neighbourhood (``eta=0``: davda54's ASAM).
        eps: added to N (> 0).
        interval: steps t = 0, k, 2k, … (t = completed steps) are SAM steps, the others one
            pass at w and a plain base step (Composer's interval SAM).
        backend, model, grad_scaler, max_grad_norm, skip_nonfinite: see the README (every
            algorithm takes them).

    Example::

        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss = optimizer.step(closure)   # closure: zero_grad, forward, backward, return loss
    """

    hyper = {"eps": ">0", "interval": "int>=1"}
    _seed_family = "sam"
    _seed_args = {"rho": "rho"}  # lk-eg's/BingcongLi's SAM.from_config
    #: lk-eg's counters (its train.py reads them): every step computes the gradient at w
    inner_gradient_calculation_counter = ReadOnlyAlias("steps")
    inner_fwp_calculation_counter = ReadOnlyAlias("steps")

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, adaptive: bool = False,
                 eta: float = 0.0, eps: float = 1e-12, interval: int = 1, **kwargs) -> None:
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive, eta=eta),
                         dict(eps=eps, interval=interval), **kwargs)
        self._exact_counters = self.interval > 1

    def _plan(self) -> Plan:
        return TWO_PASS if self.steps % self.interval == 0 else Plan((True, False), inner=False)

    def _stage(self, k, slots) -> None:
        if self._current.passes[1]:  # a one-pass step keeps its gradients for the base step
            self._perturb(slots, self._weighted_sum_sq(slots))
