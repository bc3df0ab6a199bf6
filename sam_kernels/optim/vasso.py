"""VaSSO (Li & Giannakis, NeurIPS 2023; BingcongLi/VaSSO) and its computation-saving variants
VaSSORe / VaSSOReMu (lk-eg/Computationally-Efficient-SAM), which skip the inner (pass-1)
gradient whenever a reuse criterion says the perturbation can be kept.

A criterion is a small object with `vote(t)` (host decision for step t, a device flag to read
once, or None for "no information yet") and `observe(...)` (device statistics of the outer
gradient after pass 2 of every step). The optimizers are one class each on top of VaSSO; the
arithmetic is the primitives `lerp_sum_sq_`, `perturb_`, `restore_`, `sum_sq`, `dot_sum_sq`.
"""
import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from .base import (GradSlots, SharpnessAwareOptimizer, StepVar, Tensors, _all_params,
                   check_nonnegative, check_positive)
from .closure import ClosureMixin
from .seed_compat import (ReadOnlyAlias, check_state_shape, check_step_arguments,
                          from_seed_args)

CRITERIA = ("naive", "random", "gSAMflat", "gSAMsharp", "gSAMratio", "cosSim")
#: seed of the private generator the `random` criterion uses when none is given; the same on
#: every rank, so DDP ranks take the same decisions by default
DEFAULT_RANDOM_SEED = 0


# ----------------------------------------------------------------------------- validation
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def check_unit_interval(name: str, value: Any, open_low: bool = False) -> None:
    """value in [0, 1] (in (0, 1] with open_low)."""
    low_ok = _is_number(value) and (value > 0 if open_low else value >= 0)
    if not (low_ok and value <= 1):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a number in "
                         f"{'(0, 1]' if open_low else '[0, 1]'})")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value!r} (must be an integer >= {minimum})")


def _check_finite(name: str, value: Any) -> None:
    if not _is_number(value):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number)")


# ----------------------------------------------------------------------------- criteria
class ReuseCriterion:
    """Decides, from earlier steps only, whether step t computes the inner gradient.

    `vote(t)` runs once per step before its passes: a bool, a 0-d bool device tensor (the
    optimizer reads it, the step's one host read, only after warm-up), or None (no
    information yet: recompute). `observe(params, grads, state, backend, mean_over_ranks)`
    runs after pass 2 of every step with the outer gradients, on the device; statistics that
    decide go through `mean_over_ranks` so that every DDP rank decides alike."""
    name = ""
    default_warmup = 1

    def vote(self, t: int) -> Union[bool, torch.Tensor, None]:
        raise NotImplementedError

    def observe(self, params: Tensors, grads: Tensors, state: Dict, backend,
                mean_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, sd: Dict[str, Any], device: Optional[torch.device]) -> None:
        pass

    def commit(self, state: Dict) -> None:
        """The step that called observe() completes: keep what it has to keep (after this
        nothing of the step is undone)."""

    def snapshot(self) -> Any:
        """What vote()/observe() change, cheaply (references: they replace their tensors
        rather than write into them), for restore() when a step fails."""
        return None

    def restore(self, snap: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class NaiveCriterion(ReuseCriterion):
    """Recompute every k-th step: t % k == 0."""
    name = "naive"

    def __init__(self, k: int) -> None:
        self.k = k

    def vote(self, t: int) -> bool:
        return t % self.k == 0


class RandomCriterion(ReuseCriterion):
    """Recompute with probability p: u < p, u ~ U[0, 1) drawn from a CPU torch.Generator every
    step (a host draw, no device read). Seed it identically on every rank."""
    name = "random"

    def __init__(self, p: float, generator: Optional[torch.Generator]) -> None:
        self.p = p
        self.generator = generator if generator is not None else \
            torch.Generator().manual_seed(DEFAULT_RANDOM_SEED)

    def vote(self, t: int) -> bool:
        # tolist() of a CPU tensor: no device synchronisation
        u = torch.rand((), generator=self.generator, dtype=torch.float64).tolist()
        return u < self.p

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, sd, device) -> None:
        if "generator" in sd:
            self.generator.set_state(sd["generator"])

    def snapshot(self) -> torch.Tensor:
        return self.generator.get_state()  # ~5 KB on the host: a failed step draws again

    def restore(self, snap: torch.Tensor) -> None:
        self.generator.set_state(snap)


class _DeviceFlagCriterion(ReuseCriterion):
    """A criterion whose decision is a device flag computed in `observe`."""

    def __init__(self) -> None:
        self.flag: Optional[torch.Tensor] = None

    def vote(self, t: int) -> Optional[torch.Tensor]:
        return self.flag

    def _tensors(self) -> Dict[str, Optional[torch.Tensor]]:
        return {"flag": self.flag}

    def state_dict(self) -> Dict[str, Any]:
        return {k: (v.clone() if v is not None else None) for k, v in self._tensors().items()}

    def load_state_dict(self, sd, device) -> None:
        for k, v in sd.items():
            setattr(self, k, v.to(device=device, copy=True) if v is not None else None)

    def snapshot(self) -> Dict[str, Optional[torch.Tensor]]:
        return dict(self._tensors())

    def restore(self, snap: Dict[str, Optional[torch.Tensor]]) -> None:
        for k, v in snap.items():
            setattr(self, k, v)


class GradNormEMACriterion(_DeviceFlagCriterion):
    """gSAMflat / gSAMsharp / gSAMratio on the outer-gradient norm n and its running mean
    τ ← (1−λ)·τ + λ·n (τ starts at 0, no bias correction; fp64 on the device):
    flat recomputes when τ > φ·n with φ = (1−λ)·z + λ; sharp when τ < φ′·n with
    φ′ = (1−λ)/z + λ; ratio when either holds, with z_two in φ′."""
    default_warmup = 100

    def __init__(self, name: str, lam: float, z: float, z_two: float) -> None:
        super().__init__()
        self.name = name
        self.lam = lam
        self.phi = (1 - lam) * z + lam if name in ("gSAMflat", "gSAMratio") else None
        z_sharp = z_two if name == "gSAMratio" else z
        self.phi_prime = (1 - lam) / z_sharp + lam if name in ("gSAMsharp", "gSAMratio") \
            else None
        self.tau: Optional[torch.Tensor] = None

    def observe(self, params, grads, state, backend, mean_over_ranks) -> None:
        norm = mean_over_ranks(backend.sum_sq(list(grads), [], 0.0)).to(torch.float64).sqrt()
        if self.tau is None:
            self.tau = torch.zeros_like(norm)
        self.tau = self.tau.mul(1 - self.lam).add_(norm, alpha=self.lam)
        flag = None
        if self.phi is not None:
            flag = self.tau > self.phi * norm
        if self.phi_prime is not None:
            sharp = self.tau < self.phi_prime * norm
            flag = sharp if flag is None else flag.logical_or_(sharp)
        self.flag = flag

    def _tensors(self):
        return {"flag": self.flag, "tau": self.tau}


class CosSimCriterion(_DeviceFlagCriterion):
    """Recompute when cos(g_out,t−1, g_out,t−2) ≤ c over all parameters (0/0 is NaN: no
    trigger). Keeps a copy of the last outer gradient in state[p]['g_out_prev']."""
    name = "cosSim"

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c
        self._pending: Optional[Tuple[Tensors, Tensors, List[Tuple[Any, torch.Tensor]]]] = None

    def observe(self, params, grads, state, backend, mean_over_ranks) -> None:
        prevs, fresh = [], []
        for p, g in zip(params, grads):
            buf = state[p].get("g_out_prev")
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or \
                    buf.stride() != g.stride():
                # first step of this parameter, or its .data was replaced: it restarts from
                # zeros (no contribution to this step's cosine), kept only at commit()
                buf = torch.zeros_like(g)
                fresh.append((p, buf))
            prevs.append(buf)
        stats = mean_over_ranks(backend.dot_sum_sq(list(grads), prevs)).to(torch.float64)
        cos = stats[0] / (stats[1].sqrt() * stats[2].sqrt())
        self.flag = cos <= self.c
        self._pending = (prevs, list(grads), fresh)

    def commit(self, state) -> None:
        if self._pending is not None:
            prevs, grads, fresh = self._pending
            self._pending = None
            for p, buf in fresh:
                state[p]["g_out_prev"] = buf
            torch._foreach_copy_(prevs, grads)  # a copy: p.grad may be zeroed in place

    def restore(self, snap) -> None:
        super().restore(snap)
        self._pending = None


def make_criterion(criterion: str, *, k: int = 2, p: float = 0.5, lam: float = 0.1,
                   z: float = 1.0, z_two: float = 0.5, c: float = 0.0,
                   generator: Optional[torch.Generator] = None) -> ReuseCriterion:
    """Validate every criterion hyper-parameter and build the named criterion."""
    if criterion not in CRITERIA:
        hint = {"baseline": " (the seed's 'baseline' is plain VaSSO: use sam_kernels.VaSSO)",
                "schedule": " (the seed's 'schedule' alternates VaSSO and the base optimizer "
                            "by epoch: switch optimizers in your loop)"}.get(criterion, "")
        raise ValueError(f"Invalid criterion: {criterion!r}; choose one of {CRITERIA}{hint}")
    _check_int("k", k, 1)
    check_unit_interval("p", p)
    check_unit_interval("lam", lam, open_low=True)
    check_positive("z", z)
    check_positive("z_two", z_two)
    _check_finite("c", c)
    if generator is not None and not (isinstance(generator, torch.Generator)
                                      and generator.device.type == "cpu"):
        raise TypeError(f"generator must be a CPU torch.Generator (seeded identically on every "
                        f"rank), got {generator!r}")
    if criterion == "naive":
        return NaiveCriterion(k)
    if criterion == "random":
        return RandomCriterion(p, generator)
    if criterion == "cosSim":
        return CosSimCriterion(c)
    if criterion == "gSAMratio" and lam < 1 and z * z_two <= 1:
        warnings.warn(f"gSAMratio with z_two={z_two} <= 1/z={1 / z:.6g}: the band of outer-"
                      "gradient norms that skips the inner pass is empty, so every step "
                      "recomputes it; choose z_two > 1/z", UserWarning, stacklevel=3)
    return GradNormEMACriterion(criterion, lam, z, z_two)


# ----------------------------------------------------------------------------- optimizers
Plan = Tuple[List[Tuple[Dict[str, Any], Tensors]], torch.Tensor]


class VaSSO(ClosureMixin, SharpnessAwareOptimizer):
    r"""Variance-suppressed sharpness-aware optimization around any base optimizer.

    Per step: pass 1 at w gives g; ``d ← (1−θ)·d + θ·g`` (``d = g`` on a parameter's first
    step), fused with ``‖d‖²``; ``e = ρ·d / (‖d‖ + eps)``; ``w ← w + e`` (weights kept);
    pass 2 at w + e gives g_p; w restored exactly; the base optimizer steps with g_p.
    With ``adaptive=True`` the neighbourhood is ASAM's: ``e = ρ·T²·d / (‖T·d‖ + eps)``,
    ``T = |w| + eta``.

    Args:
        params: parameters or param-group dicts (per-group keys: ``rho``, ``theta``,
            ``adaptive``, ``eta``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``**base_kwargs``) or an
            instance over the same parameters.
        rho: neighbourhood radius (>= 0).
        theta: EMA weight of the new gradient, in [0, 1] (1 gives SAM).
        eps: added to ``‖d‖`` (> 0).
        adaptive, eta: ASAM's scale-invariant neighbourhood and its offset (>= 0).
        model: optional module: BatchNorm running statistics are frozen in the pass at w + e
            when the step also ran the pass at w; needed by ``set_closure``.
        backend: 'auto', 'reference', 'cpu', 'cuda' or 'triton'.
        args, logger: the seeds' argparse namespace (supplies ``rho``, ``theta``; VaSSORe also
            lk-eg's ``crt``, ``crt_k``, ``crt_p``, ``crt_z``, ``z_two``, ``lam``, ``crt_c``)
            and logger (not used), so that their scripts build it unchanged.

    A step that raises leaves weights and state as they were (see ``step``); a parameter whose
    ``.data`` gets another shape restarts its EMA. ``iteration_step_counter``,
    ``inner_gradient_calculation_counter`` and ``inner_fwp_calculation_counter`` are lk-eg's
    (read-only) names for ``steps`` and ``inner_steps``; ``load_state_dict`` converts the
    seeds' checkpoints (docs/vasso.md).

    Example::

        optimizer = VaSSO(model.parameters(), torch.optim.SGD, rho=0.1, theta=0.4, lr=0.05,
                          momentum=0.9, model=model)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)   # loss at w
    """

    _nonnegative_group_keys = ("rho", "eta")
    # changed before a step knows whether a GradScaler pass found inf/NaN
    _amp_guarded_state = ("ema", "g_out_prev")
    # changed by steps: kept in a dict for torch.compile
    steps = StepVar(0)
    inner_steps = StepVar(0)
    _plan = StepVar()
    _undo = StepVar()  # what the step in progress changed, to undo it if it fails
    #: the seeds' counter names (lk-eg); read-only
    iteration_step_counter = ReadOnlyAlias("steps")
    inner_gradient_calculation_counter = ReadOnlyAlias("inner_steps")
    inner_fwp_calculation_counter = ReadOnlyAlias("inner_steps")
    #: seed checkpoints of this algorithm family are converted by load_state_dict
    _seed_family = "vasso"

    def __init__(self, params, base_optimizer: Any, rho: float = 0.05, theta: float = 0.9,
                 eps: float = 1e-7, adaptive: bool = False, eta: float = 0.0,
                 model: Optional[torch.nn.Module] = None, backend: str = "auto",
                 args: Any = None, logger: Any = None, **base_kwargs: Any) -> None:
        # the seeds' argparse namespace (BingcongLi, lk-eg: `args=args`) supplies rho, theta;
        # their `logger=` is accepted and not used
        rho = from_seed_args("rho", rho, 0.05, args, "rho")
        theta = from_seed_args("theta", theta, 0.9, args, "theta")
        check_nonnegative("rho", rho)
        check_unit_interval("theta", theta)
        check_nonnegative("eta", eta)
        check_positive("eps", eps)
        self.eps = float(eps)
        #: completed steps, and how many of them computed the inner (pass-1) gradient
        self.steps = 0
        self.inner_steps = 0
        # what the next perturbation applies: (group, params) pairs with directions
        # state[p]['ema'], and Σd² of the stored d (the norm of the last EMA update)
        self._plan: Optional[Plan] = None
        defaults = dict(rho=rho, theta=theta, adaptive=bool(adaptive), eta=eta)
        super().__init__(params, base_optimizer, defaults, backend=backend, model=model,
                         base_kwargs=base_kwargs)

    def _check_groups(self) -> None:
        super()._check_groups()
        for group in self.param_groups:
            check_unit_interval("theta", group["theta"])

    # ------------------------------------------------------------------ the decision
    def needs_inner_pass(self) -> bool:
        """Whether the current step computes the gradient at w (pass 1). Always True for
        VaSSO; ask it before the forward pass at w in a manual first_step/second_step loop."""
        return True

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e. When the step recomputes (see needs_inner_pass) the current gradients
        (taken at w) update the EMA d first; otherwise the stored d is used and no gradient is
        read. If it raises, the step is undone (weights, EMA, counters, decision)."""
        self._require_unperturbed("first_step()")
        try:
            self._check_groups()
            self._begin_step()
            if self.needs_inner_pass():
                slots = self._slots_with_grads()
                self._unscale_grads()
                self._fold_into_ema(slots)
                self.inner_steps += 1
                self._apply_plan()
            else:
                self._apply_stored_plan()
        except BaseException:
            self._abort_step()
            raise
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly, record what the next step's decision needs from the gradient at
        w + e, and step the base optimizer with it. Until the base optimizer's step, a failure
        undoes the whole step."""
        self._require_perturbed("second_step()")
        try:
            self._unscale_grads()
            self._restore()
            self._end_of_step(self._slots_with_grads())
            self._commit_step()
        except BaseException:
            self._abort_step()
            raise
        self._base_step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None, *args: Any,
             **seed_kwargs: Any) -> Any:
        """Run ``closure`` (zero grads, forward, backward, return the loss) at w when the step
        recomputes, then at w + e; returns what ``_step_result`` picks (VaSSO: the call at w).
        Without a closure, runs the one from ``set_closure(loss_fn, inputs, targets)``, which
        returns ``(outputs, loss)``. lk-eg's ``closure(computeForward, computeBackprop)`` is
        called as ``closure(True, True)``; the keywords the seeds' loops pass (``epoch=``,
        ``step=``, ``batch_idx=``, ``model=``, ...) are ignored.

        A step that raises (in the closure, on an invalid group value, on sparse gradients)
        leaves weights, EMA, counters, the plan, the reuse decision and the random criterion's
        generator as they were: running it again gives what an uninterrupted run gives. (What
        the closure itself changed — BatchNorm statistics of a pass at w, RNG draws — is the
        closure's.)"""
        check_step_arguments(self, args, seed_kwargs)
        closure = self._closure_for_step(closure)
        self._require_unperturbed("step()")
        self._check_groups()  # before any pass runs
        try:
            inner = self.needs_inner_pass()
            at_w = closure() if inner else None
            self.first_step(zero_grad=inner)
            with self.pass_context():
                at_w_plus_e = closure()
            self.second_step()
        except BaseException:
            self._abort_step()
            raise
        self._record_gap(at_w, at_w_plus_e)  # None on a step that reused (no pass at w)
        return self._step_result(at_w, at_w_plus_e)

    def _step_result(self, at_w: Any, at_w_plus_e: Any) -> Any:
        return at_w

    def pass_context(self, freeze_bn: Optional[bool] = None):
        """As for every optimizer of the family (wrap each forward+backward of a hand-written
        step in it), except that by default BatchNorm running statistics are frozen at w + e
        only when the step also ran the pass at w: a step that skipped it lets its only
        forward pass update them, so they move once per step."""
        if freeze_bn is None and self.perturbed:
            freeze_bn = self.needs_inner_pass()
        return super().pass_context(freeze_bn=freeze_bn)

    # ------------------------------------------------------------------ building blocks
    def _fold_into_ema(self, slots: List[GradSlots]) -> None:
        """d ← (1−θ)·d + θ·g for every slot (d = g where none exists yet, or where the
        parameter's .data was replaced by one of another shape: its EMA restarts), fused with
        Σd²; the result becomes the plan the next perturbation applies."""
        buckets: Dict[float, Tuple[Tensors, Tensors]] = defaultdict(lambda: ([], []))
        kept_keys, kept = [], []  # EMAs written in place: copied first (see _guard)
        new_keys, new = [], []
        fresh = self._undo["fresh"]
        for s in slots:
            group_theta = float(s.group["theta"])
            for p, w, g in zip(s.params, self._slot_locals(s), s.grads):
                state = self.state[p]
                ema = state.get("ema")
                theta = group_theta
                if ema is None or ema.shape != w.shape:
                    # zeros, so that the update with θ = 1 below gives exactly d = g
                    ema = torch.zeros_like(w, memory_format=torch.preserve_format)
                    self._set_entry(p, "ema", ema)
                    new_keys.append(p)
                    new.append(ema)
                    theta = 1.0
                elif ema.dtype != w.dtype or ema.stride() != w.stride():
                    ema = self._converted(p, "ema", w)  # same values, the new layout
                elif p not in fresh:
                    kept_keys.append(p)
                    kept.append(ema)
                buckets[theta][0].append(ema)
                buckets[theta][1].append(g)
        self._guard(kept_keys, kept)
        if new:  # the buffers that will keep their copies, allocated with them
            self._scratch("ema_undo", new_keys, new)
        backend = self._ops()
        total = None
        for theta, (emas, grads) in buckets.items():
            part = backend.lerp_sum_sq_(emas, grads, theta)
            total = part if total is None else total + part
        if total is None:
            total = torch.zeros((), device=self._device)
        self._plan = ([(s.group, s.params) for s in slots], self._global_sum(total))

    def _apply_plan(self) -> None:
        """w ← w + ρ·d/(‖d‖ + eps) with the stored d and ‖d‖² (weights kept). In adaptive
        groups ‖T·d‖ is taken here, at the current weights."""
        pairs, sum_sq = self._plan
        slots = [GradSlots(group, params, [self.state[p]["ema"] for p in params])
                 for group, params in pairs]
        dirs = [s.grads for s in slots]
        if any(s.group["adaptive"] for s in slots):
            sum_sq = self._weighted_sum_sq(slots, dirs)
        self._perturb(slots, sum_sq, self.eps, dirs=dirs)

    def _apply_stored_plan(self) -> None:
        """_apply_plan() in a step that reuses the stored d. The kernels check every argument
        before they write, so a parameter whose .data was replaced since (another shape,
        dtype or layout) is found by their ValueError, at no cost otherwise: such a
        parameter's EMA restarts (another shape: it is left out of this perturbation, as a
        parameter without a gradient at the last recompute, and ‖d‖² is taken again over the
        others) or follows the new dtype/layout, and the plan is applied again."""
        try:
            self._apply_plan()
        except ValueError:
            if not self._repair_plan():
                raise
            self._apply_plan()

    def _repair_plan(self) -> bool:
        pairs, sum_sq = self._plan
        new_pairs, changed = [], False
        for group, params in pairs:
            kept = []
            for p, w in zip(params, self._locals(params)):
                state = self.state[p]
                ema = state.get("ema")
                if ema is None or ema.shape != w.shape:
                    if ema is not None:
                        self._set_entry(p, "ema", None)
                    changed = True
                    continue
                if ema.dtype != w.dtype or ema.stride() != w.stride():
                    self._converted(p, "ema", w)
                    changed = True
                kept.append(p)
            if kept:
                new_pairs.append((group, kept))
        if not changed:
            return False
        emas = [self.state[p]["ema"] for _, params in new_pairs for p in params]
        sum_sq = self._global_sum(self._ops().sum_sq(emas, [], 0.0)) if emas else \
            torch.zeros((), device=self._device)
        self._plan = (new_pairs, sum_sq)
        return True

    def _end_of_step(self, slots: List[GradSlots]) -> None:
        """After the restore, with the outer gradients of this step."""
        self.steps += 1

    # ------------------------------------------------------------------ failed steps
    # A step changes state in place (the EMA) and by replacement (counters, plan, decision,
    # criterion). _begin_step() records the replaced values (references), _guard() copies
    # tensors before they are written in place, _set_entry() records the per-parameter entries
    # it creates or replaces; _abort_step() puts all of it back, _commit_step() forgets it.
    def _record(self) -> Dict[str, Any]:
        return {"steps": self.steps, "inner_steps": self.inner_steps, "plan": self._plan}

    def _restore_record(self, record: Dict[str, Any]) -> None:
        self.steps = record["steps"]
        self.inner_steps = record["inner_steps"]
        self._plan = record["plan"]

    def _begin_step(self) -> None:
        if self._undo is None:
            # dicts keyed by the parameters (not id(): torch.compile cannot trace that)
            self._undo = {"record": self._record(), "copies": [], "copied": {},
                          "entries": [], "fresh": {}}

    def _guard(self, keys: Tensors, tensors: Tensors) -> None:
        """Copy `tensors` (the EMAs of the parameters `keys`) before this step writes them in
        place, once per step, in one fused pass into persistent buffers."""
        undo = self._undo
        copied = undo["copied"]
        todo = [(k, t) for k, t in zip(keys, tensors) if k not in copied]
        if not todo:
            return
        keys, tensors = [k for k, _ in todo], [t for _, t in todo]
        copies = self._scratch("ema_undo", keys, tensors)
        self._ops().restore_(copies, tensors)  # copies ← tensors
        undo["copies"].append((tensors, copies))
        for k in keys:
            copied[k] = True

    def _set_entry(self, p: torch.Tensor, key: str, value: Optional[torch.Tensor]) -> None:
        """state[p][key] = value (None: delete it), undone if the step fails."""
        state = self.state[p]
        undo = self._undo
        if undo is not None:
            undo["entries"].append((state, key, state.get(key)))
            undo["fresh"][p] = True
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value

    def _converted(self, p: torch.Tensor, key: str, like: torch.Tensor) -> torch.Tensor:
        new = torch.empty_like(like, memory_format=torch.preserve_format)
        new.copy_(self.state[p][key])
        self._set_entry(p, key, new)
        return new

    def _commit_step(self) -> None:
        self._undo = None

    def _rollback_step(self) -> None:
        undo = self._undo
        if undo is None:
            return
        self._undo = None
        for tensors, copies in undo["copies"]:
            self._ops().restore_(tensors, copies)
        for state, key, old in reversed(undo["entries"]):
            if old is None:
                state.pop(key, None)
            else:
                state[key] = old
        self._restore_record(undo["record"])

    def _abort_step(self) -> None:
        super()._abort_step()
        self._rollback_step()

    # ------------------------------------------------------------------ checkpointing
    def _extra_state(self) -> Dict[str, Any]:
        plan = None
        if self._plan is not None:
            index = {id(p): i for i, p in enumerate(_all_params(self.param_groups))}
            pairs, sum_sq = self._plan
            plan = {"params": [index[id(p)] for _, params in pairs for p in params],
                    "sum_sq": sum_sq.clone()}
        return {"steps": self.steps, "inner_steps": self.inner_steps, "plan": plan}

    def _from_seed(self, index: int, seed_state: Dict[str, Any]
                   ) -> Dict[str, Tuple[str, torch.Tensor]]:
        """load_state_dict() of a seed's checkpoint (BingcongLi's VASSO, lk-eg's
        VASSO/VASSORE/VASSOREMU; see docs/vasso.md): its 'ema' becomes ours, lk-eg's last
        outer gradient 'g_t' cosSim's 'g_out_prev'."""
        out = {}
        if "ema" in seed_state:
            out["ema"] = ("ema", check_state_shape(self, index, "ema", seed_state["ema"]))
        if "g_t" in seed_state and isinstance(getattr(self, "criterion", None),
                                              CosSimCriterion):
            out["g_out_prev"] = ("g_t", check_state_shape(self, index, "g_t",
                                                          seed_state["g_t"]))
        return out

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        self._undo = None
        self.steps = int(extra.get("steps", 0))
        self.inner_steps = int(extra.get("inner_steps", 0))
        plan = extra.get("plan")
        self._plan = None
        if plan is not None:
            params = _all_params(self.param_groups)
            group_of = {id(p): g for g in self.param_groups for p in g["params"]}
            pairs: Dict[int, Tuple[Dict[str, Any], Tensors]] = {}
            for i in plan["params"]:
                p = params[int(i)]
                group = group_of[id(p)]
                pairs.setdefault(id(group), (group, []))[1].append(p)
            sum_sq = plan["sum_sq"].to(device=self._device or "cpu", copy=True)
            self._plan = (list(pairs.values()), sum_sq)


class VaSSORe(VaSSO):
    r"""VaSSO that reuses its perturbation when a criterion says the inner gradient can be
    skipped (lk-eg/Computationally-Efficient-SAM, ``solver/vassore.py``).

    At the start of step t (t = completed steps, from 0) the criterion decides, from earlier
    steps only, whether to compute the gradient at w. Steps with ``t <= warmup_steps`` and the
    first step always do. Recompute: pass 1, EMA update, ``e = ρ·d/(‖d‖+eps)``. Reuse: no
    pass 1; the stored d and ‖d‖ give the same e (no EMA update, no renormalisation). Then
    ``w ← w + e``, pass 2, exact restore, criterion statistics of the outer gradient, base
    step.

    lk-eg's keyword names ``crt``, ``crt_k``, ``crt_p``, ``crt_z``, ``crt_c`` are aliases of
    ``criterion``, ``k``, ``p``, ``z``, ``c``.

    Criteria (``criterion=``): ``naive`` (t % k == 0), ``random`` (u < p, u from
    ``generator``), ``gSAMflat`` / ``gSAMsharp`` / ``gSAMratio`` (outer-gradient norm against
    its running mean, weights ``lam``, thresholds ``z``, ``z_two``), ``cosSim`` (cosine of the
    last two outer gradients <= c); see docs/vasso.md. Under torch.distributed the criterion
    statistics are averaged over ranks, so every rank decides alike; the ``random`` criterion
    needs a generator seeded identically on every rank (the default one is).

    ``steps`` / ``inner_steps`` count completed steps and computed inner passes;
    ``needs_inner_pass()`` tells a manual loop whether to run pass 1; ``step(closure)`` skips
    that call of the closure and returns the result of the call at w + e (every step has one).
    The data-dependent criteria read one device scalar per step after warm-up; ``naive`` and
    ``random`` none.
    """

    _decision = StepVar()  # changed by steps: kept in a dict for torch.compile
    #: lk-eg's keyword names (its constructor and argparse namespace) → ours
    _keyword_aliases = {"crt": "criterion", "crt_k": "k", "crt_p": "p", "crt_z": "z",
                        "crt_c": "c"}

    def __init__(self, params, base_optimizer: Any, rho: float = 0.05, theta: float = 0.9,
                 eps: float = 1e-7, adaptive: bool = False, eta: float = 0.0,
                 criterion: str = "naive", k: int = 2, p: float = 0.5, lam: float = 0.1,
                 z: float = 1.0, z_two: float = 0.5, c: float = 0.0,
                 warmup_steps: Optional[int] = None,
                 generator: Optional[torch.Generator] = None,
                 model: Optional[torch.nn.Module] = None, backend: str = "auto",
                 args: Any = None, logger: Any = None, **base_kwargs: Any) -> None:
        # lk-eg's names: keywords crt, crt_k, crt_p, crt_z, crt_c, or its argparse namespace
        # `args` (which also has z_two, lam, rho, theta)
        given = dict(criterion=criterion, k=k, p=p, z=z, c=c, lam=lam, z_two=z_two)
        defaults = dict(criterion="naive", k=2, p=0.5, z=1.0, c=0.0, lam=0.1, z_two=0.5)
        for seed_name, ours in self._keyword_aliases.items():
            if seed_name in base_kwargs:
                value = base_kwargs.pop(seed_name)
                if given[ours] != defaults[ours] and given[ours] != value:
                    raise ValueError(f"Invalid {ours} value: {given[ours]!r} given as {ours}= "
                                     f"but {value!r} as {seed_name}= (the seed's name for it); "
                                     "give it once")
                given[ours] = value
        seed_names = {v: k for k, v in self._keyword_aliases.items()}
        for ours in given:
            given[ours] = from_seed_args(ours, given[ours], defaults[ours], args,
                                         seed_names.get(ours, ours))
        self.criterion = make_criterion(given.pop("criterion"), generator=generator, **given)
        if warmup_steps is not None:
            _check_int("warmup_steps", warmup_steps, 0)
        self.warmup_steps = self.criterion.default_warmup if warmup_steps is None \
            else warmup_steps
        self._decision: Optional[bool] = None  # the current step's, once taken
        super().__init__(params, base_optimizer, rho=rho, theta=theta, eps=eps,
                         adaptive=adaptive, eta=eta, model=model, backend=backend,
                         args=args, logger=logger, **base_kwargs)

    def needs_inner_pass(self) -> bool:
        """Whether the current step computes the gradient at w (pass 1). Taken once per step
        (the `random` criterion draws then) and cached until second_step(); a step that fails
        takes it again (the same way)."""
        self._begin_step()
        if self._decision is None:
            self._snapshot_guarded_state()  # a skipped (AMP) step undoes the decision too
            t = self.steps
            vote = self.criterion.vote(t)
            if t == 0 or t <= self.warmup_steps or self._plan is None or vote is None:
                self._decision = True
            else:
                # a device flag costs the step's one host read
                self._decision = vote if isinstance(vote, bool) else bool(vote)
        return self._decision

    def _end_of_step(self, slots: List[GradSlots]) -> None:
        self.criterion.observe([p for s in slots for p in s.params],
                               [g for s in slots for g in s.grads], self.state, self._ops(),
                               self._mean_over_ranks)
        super()._end_of_step(slots)
        self._decision = None

    def _commit_step(self) -> None:
        self.criterion.commit(self.state)
        super()._commit_step()

    def _record(self) -> Dict[str, Any]:
        record = super()._record()
        record.update(decision=self._decision, criterion=self.criterion.snapshot())
        return record

    def _restore_record(self, record: Dict[str, Any]) -> None:
        super()._restore_record(record)
        self._decision = record["decision"]
        self.criterion.restore(record["criterion"])

    def _mean_over_ranks(self, stats: torch.Tensor) -> torch.Tensor:
        """Criterion statistics made global and identical on every rank (averaged over DDP
        ranks, summed over shards), so that every rank derives the same decision from the
        same numbers: ranks that disagree would hang, one of them running a backward pass the
        others skip."""
        return self._agreed_sum(stats)

    def _step_result(self, at_w: Any, at_w_plus_e: Any) -> Any:
        return at_w_plus_e

    def _extra_state(self) -> Dict[str, Any]:
        extra = super()._extra_state()
        extra.update(decision=self._decision, criterion=self.criterion.state_dict())
        return extra

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._decision = extra.get("decision")
        self.criterion.load_state_dict(extra.get("criterion", {}), self._device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(criterion={self.criterion.name!r}, " \
               f"base_optimizer={self.base_optimizer!r}, backend={self.backend!r})"


class VaSSOReMu(VaSSORe):
    r"""VaSSORe that renormalises every step (lk-eg ``solver/vassoremu.py``): the EMA is
    updated each step, ``d ← (1−θ)·d + θ·(g at w if the step recomputes, else the previous
    step's outer gradient)``, and e = ρ·d/(‖d‖+eps) is formed anew; pass 1 is skipped when
    the criterion says so. Same arguments and criteria as VaSSORe.

    The reuse update is applied at the end of the previous step, with that step's outer
    gradient still in ``p.grad``: the same arithmetic, without keeping a copy of it. That
    needs the next step's decision there, so the data-dependent criteria's one read per step
    happens in second_step().
    """

    def _end_of_step(self, slots: List[GradSlots]) -> None:
        super()._end_of_step(slots)
        if not self.needs_inner_pass():
            self._fold_into_ema(slots)
