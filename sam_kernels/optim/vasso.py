"""VaSSO (Li & Giannakis, NeurIPS 2023; BingcongLi/VaSSO) and its computation-saving variants
VaSSORe / VaSSOReMu (lk-eg/Computationally-Efficient-SAM), which skip the inner (pass-1)
gradient whenever a reuse criterion (criteria.py) says the perturbation can be kept."""
from collections import defaultdict
from typing import Any, Dict, Optional

import torch

from .base import TWO_PASS, GradSlots, Plan, SharpnessAwareOptimizer, StepVar, _all_params
from .compat import ReadOnlyAlias, check_state_shape
from .criteria import make_criterion
from .validation import check


class VaSSO(SharpnessAwareOptimizer):
    r"""Variance-suppressed sharpness-aware optimization around any base optimizer.

    Pass 1 at w gives g; ``d ← (1−θ)·d + θ·g`` (``d = g`` on a parameter's first step), fused
    with ``‖d‖²``; ``w ← w + ρ·d/(‖d‖ + eps)`` (ASAM's ``ρ·T²·d/(‖T·d‖ + eps)`` with
    ``adaptive=True``); pass 2 at w + e; w restored; base step with that gradient.
    The new d is formed in the pass-1 gradients and replaces the old one when the step
    commits (no copy of d is kept to undo a failed step). ``args=`` (the seeds' namespace)
    supplies rho and theta; ``steps``/``inner_steps`` have lk-eg's names as read-only aliases.
    """

    group_hyper = {"rho": ">=0", "theta": "[0,1]", "adaptive": "bool", "eta": ">=0"}
    _state_keys = ("ema",)
    _rule_vars = ("_stored",)
    _stored = StepVar()
    _seed_family = "vasso"
    _seed_args = {"rho": "rho", "theta": "theta"}
    iteration_step_counter = ReadOnlyAlias("steps")
    inner_gradient_calculation_counter = ReadOnlyAlias("inner_steps")
    inner_fwp_calculation_counter = ReadOnlyAlias("inner_steps")

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, theta: float = 0.9,
                 eps: float = 1e-7, adaptive: bool = False, eta: float = 0.0, **kwargs) -> None:
        #: the last d: ([(group, params, d tensors)], Σd²), what a reuse step perturbs along
        self._stored = None
        super().__init__(params, base_optimizer,
                         dict(rho=rho, theta=theta, adaptive=adaptive, eta=eta),
                         dict(eps=eps), **kwargs)

    def _own_state_like(self, p):
        return {"ema": p.new_zeros(p.shape)}

    def _stage(self, k, slots) -> None:
        if self._current.passes[0]:
            self._fold(self._perturbing(slots), steal=True)
        self._apply_stored()

    def _fold(self, slots, steal: bool, name: str = "kept") -> None:
        """d ← (1−θ)·d + θ·g in tensors the step owns (the gradients), with Σd²; staged. d is
        the latest one (this step's, where it already made one)."""
        latest = {p: t for _, ps, ds in (self._stored or ([], None))[0] for p, t in zip(ps, ds)}
        d = self._keep(slots, steal, name)
        buckets = defaultdict(lambda: ([], []))
        fresh, i = [], 0
        for s in slots:
            for p, w in zip(s.params, s.locals):
                ema = latest.get(p, self.state[p].get("ema"))
                if ema is None or ema.shape != d[i].shape:
                    fresh.append(d[i])  # first step (or .data replaced): d = g
                else:
                    buckets[float(s.group["theta"])][0].append(d[i])
                    buckets[float(s.group["theta"])][1].append(ema.to(d[i].dtype))
                i += 1
        ops = self._ops()
        total = ops.sum_sq(fresh, [], 0.0) if fresh else self._zeros()
        for theta, (ds, emas) in buckets.items():
            total = total + ops.lerp_sum_sq_(ds, emas, 1.0 - theta)  # θ·g + (1−θ)·d
        j, pairs = 0, []
        for s in slots:
            pairs.append((s.group, s.params, d[j:j + len(s.params)]))
            for p, t in zip(s.params, pairs[-1][2]):
                self._put_state(p, "ema", t)
            j += len(s.params)
        self._stored = (pairs, self._global_sum(total))

    def _apply_stored(self) -> None:
        """w ← w + ρ·d/(‖d‖ + eps) with the stored d and Σd² (‖T·d‖ taken now in adaptive
        groups). A parameter whose .data got another shape since is left out (its d
        restarts), found by the kernels' ValueError at no cost otherwise."""
        for attempt in range(2):
            pairs, sum_sq = self._stored
            slots = [GradSlots(g, ps, ds, self._locals(ps)) for g, ps, ds in pairs]
            if any(s.group.get("adaptive") for s in slots):
                sum_sq = self._weighted_sum_sq(slots)
            try:
                return self._perturb(slots, sum_sq)
            except ValueError:
                if attempt or not self._drop_stale(slots):
                    raise

    def _drop_stale(self, slots) -> bool:
        kept, dropped = [], False
        for s in slots:
            ok = [(p, d) for p, w, d in zip(s.params, s.locals, s.grads) if d.shape == w.shape]
            dropped |= len(ok) < len(s.params)
            for p in set(s.params) - {p for p, _ in ok}:
                self._put_state(p, "ema", None)
            if ok:
                kept.append((s.group, [p for p, _ in ok], [d for _, d in ok]))
        ds = [d for _, _, dd in kept for d in dd]
        self._stored = (kept, self._global_sum(self._ops().sum_sq(ds, [], 0.0) if ds
                                               else self._zeros()))
        return dropped

    def _extra_state(self) -> Dict[str, Any]:
        index = {p: i for i, p in enumerate(_all_params(self.param_groups))}
        pairs, sum_sq = self._stored if self._stored is not None else ([], self._zeros())
        return {"steps": self.steps, "inner_steps": self.inner_steps,
                "plan": {"params": [index[p] for _, ps, _ in pairs for p in ps],
                         "sum_sq": sum_sq.clone(), "valid": self._stored is not None}}

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        super()._load_extra_state({k: extra[k] for k in ("steps", "inner_steps") if k in extra})
        plan, self._stored = extra.get("plan"), None
        if plan and plan.get("valid", True):
            params = _all_params(self.param_groups)
            group_of = {id(p): g for g in self.param_groups for p in g["params"]}
            pairs: Dict[int, Any] = {}
            for i in plan["params"]:
                p = params[int(i)]
                pairs.setdefault(id(group_of[id(p)]), (group_of[id(p)], [], []))
                pairs[id(group_of[id(p)])][1].append(p)
                pairs[id(group_of[id(p)])][2].append(self.state[p]["ema"])
            self._stored = (list(pairs.values()),
                            plan["sum_sq"].to(device=self._device or "cpu", copy=True))

    def _from_seed(self, index: int, seed_state: Dict[str, Any]):
        """A seed's 'ema' becomes ours; lk-eg's last outer gradient 'g_t' cosSim's."""
        out = {}
        if "ema" in seed_state:
            out["ema"] = ("ema", check_state_shape(self, index, "ema", seed_state["ema"]))
        if "g_t" in seed_state and "g_out_prev" in self._state_keys:
            out["g_out_prev"] = ("g_t", check_state_shape(self, index, "g_t",
                                                          seed_state["g_t"]))
        return out


class VaSSORe(VaSSO):
    r"""VaSSO that reuses its perturbation when a criterion says the inner gradient can be
    skipped (lk-eg ``solver/vassore.py``). At the start of step t (completed steps) the
    criterion decides from earlier steps; steps with ``t <= warmup_steps`` and the first
    always recompute. Recompute: as VaSSO. Reuse: no pass at w; the stored d and ‖d‖ give the
    same e. Criteria: ``naive`` (t % k == 0), ``random`` (u < p), ``gSAMflat`` / ``gSAMsharp``
    / ``gSAMratio`` (outer-gradient norm against its running mean), ``cosSim`` (see
    docs/vasso.md); ``crt``, ``crt_k``, ``crt_p``, ``crt_z``, ``crt_c`` are lk-eg's names.
    ``step(closure)`` returns the result of the pass at w + e (lk-eg's); the data-dependent
    criteria read one device scalar per step after warm-up.
    """

    _rule_vars = ("_stored", "_decided")
    _decided = StepVar()
    _seed_aliases = {"crt": "criterion", "crt_k": "k", "crt_p": "p", "crt_z": "z",
                     "crt_c": "c"}
    _seed_args = {"rho": "rho", "theta": "theta", "crt": "criterion", "crt_k": "k",
                  "crt_p": "p", "crt_z": "z", "crt_c": "c", "lam": "lam", "z_two": "z_two"}

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, theta: float = 0.9,
                 eps: float = 1e-16, adaptive: bool = False, eta: float = 0.0,
                 criterion: str = "naive", k: int = 2, p: float = 0.5, lam: float = 0.1,
                 z: float = 1.0, z_two: float = 0.5, c: float = 0.0,
                 warmup_steps: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, **kwargs) -> None:
        self.criterion = make_criterion(criterion, k=k, p=p, lam=lam, z=z, z_two=z_two, c=c,
                                        generator=generator)
        self.warmup_steps = self.criterion.default_warmup if warmup_steps is None else \
            check("warmup_steps", warmup_steps, "int>=0")
        if criterion == "cosSim":
            self._state_keys = ("ema", "g_out_prev")
        self._decided = None  # VaSSOReMu: the next step's decision, taken at this one's end
        super().__init__(params, base_optimizer, rho=rho, theta=theta, eps=eps,
                         adaptive=adaptive, eta=eta, **kwargs)

    def _decide(self, t: int) -> bool:
        vote = self.criterion.vote(t)
        if t == 0 or t <= self.warmup_steps or self._stored is None or vote is None:
            return True
        return vote if isinstance(vote, bool) else bool(vote)  # the one host read

    def _plan(self) -> Plan:
        recompute = self._decide(self.steps) if self._decided is None else self._decided
        self._decided = None
        return TWO_PASS if recompute else Plan((False, True), inner=False)

    def _combine(self, slots):
        self.criterion.observe(self, [p for s in slots for p in s.params],
                               [g for s in slots for g in s.grads])
        return []

    def _step_result(self, results):
        return results[-1]

    def _vars(self) -> Dict[str, Any]:
        return {**super()._vars(), "criterion": self.criterion.snapshot()}

    def _set_vars(self, values: Dict[str, Any]) -> None:
        values = dict(values)
        self.criterion.restore(values.pop("criterion", {}))
        super()._set_vars(values)

    def _extra_state(self) -> Dict[str, Any]:
        return {**super()._extra_state(), "decided": self._decided,
                "criterion": self.criterion.state_dict()}

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._decided = extra.get("decided")
        self.criterion.load_state_dict(extra.get("criterion", {}), self._device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(criterion={self.criterion.name!r}, " \
               f"base_optimizer={self.base_optimizer!r}, backend={self.backend!r})"


class VaSSOReMu(VaSSORe):
    r"""VaSSORe that renormalises every step (lk-eg ``solver/vassoremu.py``): on a reuse step
    ``d ← (1−θ)·d + θ·g_out`` with the previous step's outer gradient, and e is formed anew.
    That update is taken at the end of the previous step, while its outer gradient is still in
    ``p.grad`` (so the next step's decision is taken there too)."""

    def _combine(self, slots):
        super()._combine(slots)
        slots = self._perturbing(slots)
        # allocated on the first step, not on the first reuse: the same ops every step
        self._scratch("ema_next", [p for s in slots for p in s.params],
                      [g for s in slots for g in s.grads])
        self._decided = self._decide(self.steps + 1)
        if not self._decided:
            self._fold(slots, steal=False, name="ema_next")
        return []
