"""WSAM — weighted sharpness as a regularization term (Yue et al., KDD 2023)."""
from .base import SharpnessAwareOptimizer, _on_params
from .gsam import matched


class WSAM(SharpnessAwareOptimizer):
    r"""WSAM around any base optimizer, with alpha = gamma / (1 − gamma).

    g = ∇L(w); ``w ← w + rho/(‖T⊙g‖ + eps) · T² · g`` as SAM; g_s = ∇L(w + e); w restored.
    Coupled (``decouple=False``): the base optimizer steps with ``alpha·g_s + (1 − alpha)·g``.
    Decoupled (default): it steps with g, then ``w ← w − lr·alpha·(g_s − g)``. Under DDP both
    passes stay per rank and what the step uses is averaged once.
    """

    hyper = {"eps": ">0", "gamma": "[0,1)", "decouple": "bool"}
    sync = "none"

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, gamma: float = 0.9,
                 decouple: bool = True, adaptive: bool = False, eta: float = 0.0,
                 eps: float = 1e-12, **kwargs) -> None:
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive, eta=eta),
                         dict(eps=eps, gamma=gamma, decouple=decouple), **kwargs)
        self._exact_counters = self.decouple  # its own update follows the base step

    def _stage(self, k, slots) -> None:
        self._perturb(slots, self._weighted_sum_sq(slots))
        self._held["g"] = ([p for s in slots for p in s.params], self._keep(slots))

    def _combine(self, slots):
        alpha = self.gamma / (1.0 - self.gamma)
        g, g_s = matched(self, slots, "WSAM")
        if not self.decouple:
            self._ops().axpby_(g_s, g, 1.0 - alpha, alpha)  # α·g_s + (1 − α)·g
            return []
        self._ops().axpby_(g, g_s, 1.0, -1.0)  # kept: g_s − g
        self._ops().axpby_(g_s, g, -1.0, 1.0)  # the base step's gradient: g
        self._held["diff"] = [(s.group, s.locals, g[i:i + len(s.params)]) for s, i in
                              zip(slots, _offsets(slots))]
        return g

    def _after_base_step(self) -> None:
        alpha = self.gamma / (1.0 - self.gamma)
        for group, params, diff in self._held.get("diff", ()):
            _on_params(self._ops().axpby_, params, diff, -float(group["lr"]) * alpha, 1.0)


def _offsets(slots):
    out, i = [], 0
    for s in slots:
        out.append(i)
        i += len(s.params)
    return out
