"""SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021), as in davda54/sam; Composer's interval
SAM (``interval=k``) and SAM-ON's norm-only groups (``perturb=False`` groups, see sam_on.py)."""
from typing import Any, Callable, Iterable, List, Optional

import torch

from .base import GradSlots, SharpnessAwareOptimizer, StepVar, check_nonnegative, check_positive
from .seed_compat import ReadOnlyAlias, check_step_arguments


def check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value!r} (must be an integer >= {minimum})")


def perturbed_slots(slots: List[GradSlots]) -> List[GradSlots]:
    """The slots of groups that take part in the perturbation: a group with ``perturb=False``
    (SAM-ON's non-normalisation parameters) is left out of the norm and of e, and still gets
    the base step."""
    for s in slots:
        if not isinstance(s.group.get("perturb", True), bool):
            raise ValueError(f"Invalid perturb value: {s.group['perturb']!r} (a param group's "
                             "'perturb' must be True or False)")
    return [s for s in slots if s.group.get("perturb", True)]


class PeriodicTwoPass:
    """What the algorithms share that run the perturbed (second) pass only on some steps
    (interval SAM, LookSAM): step counters, the decision, and the one-pass step.

    ``steps`` counts completed steps and ``inner_steps`` those that ran the pass at w + e.
    On a one-pass step the only pass is at w: it is synchronised by DDP (the final gradient),
    ``first_step()`` leaves the gradients in place (whatever ``zero_grad`` says) and
    ``second_step()`` steps with them. A manual loop asks ``needs_perturbed_pass()`` (or reads
    ``perturbed`` after first_step) to know whether to run the pass at w + e."""

    steps = StepVar(0)
    inner_steps = StepVar(0)
    _one_pass = StepVar(False)  # first_step() ran on a one-pass step; second_step() pending

    def needs_perturbed_pass(self) -> bool:
        raise NotImplementedError

    def _begin_one_pass_step(self) -> bool:
        """In first_step(): True (and the step marked) when this step has no perturbed pass."""
        if self.needs_perturbed_pass():
            return False
        self._one_pass = True
        return True

    def _first_step(self, zero_grad: bool, keep: Optional[str] = None) -> Optional[List]:
        """first_step() of these algorithms: on a SAM step move to w + e along the gradients
        of the perturbed groups (first keeping every gradient in the buffers `keep`, and
        returning their parameters); on a one-pass step nothing."""
        self._require_unperturbed("first_step()")
        self._check_groups()
        if self._begin_one_pass_step():
            return None
        slots = self._slots_with_grads()
        self._unscale_grads()
        kept = self._keep_grads(keep, slots) if keep is not None else None
        slots = perturbed_slots(slots)
        self._perturb(slots, self._weighted_sum_sq(slots), self.eps)
        if zero_grad:
            self.zero_grad()
        return kept

    def _pass_is_per_rank(self) -> bool:
        if self._one_pass or (not self.perturbed and not self.needs_perturbed_pass()):
            return False  # the step's only pass: DDP averages it
        return super()._pass_is_per_rank()

    def pass_context(self, freeze_bn: Optional[bool] = None):
        if self._one_pass:
            raise RuntimeError(f"{type(self).__name__}: this step takes one pass (at w): after "
                               "first_step() call second_step() directly (check "
                               "needs_perturbed_pass() before running a pass at w + e)")
        return super().pass_context(freeze_bn=freeze_bn)

    def _count_step(self, perturbed: bool) -> None:
        """Before _base_step(): a step it skips (GradScaler, skip_nonfinite) puts the counters
        back with the rest of the state, so the schedule resumes where it was."""
        self.steps += 1
        self.inner_steps += int(perturbed)

    def _counters(self):
        return {"steps": self.steps, "inner_steps": self.inner_steps}

    def _load_counters(self, extra) -> None:
        self.steps = int(extra.get("steps", 0))
        self.inner_steps = int(extra.get("inner_steps", 0))
        self._one_pass = False

    def _run_step(self, closure: Callable[[], Any]) -> Any:
        """pass at w; on a two-pass step perturb, pass at w + e (BatchNorm statistics frozen);
        second_step. Returns the first call's result."""
        self._require_unperturbed("step()")
        two_pass = self.needs_perturbed_pass()
        at_w = closure()
        self.first_step(zero_grad=two_pass)
        at_w_plus_e = None
        if two_pass:
            with self._perturbed_pass():
                at_w_plus_e = closure()
        self.second_step()
        self._record_gap(at_w, at_w_plus_e)
        return at_w


class SAM(PeriodicTwoPass, SharpnessAwareOptimizer):
    r"""Sharpness-aware minimization around any base optimizer; ASAM with ``adaptive=True``.

    Over every parameter with a gradient, across all groups,
    ``N = sqrt(Σ_i ‖T_i ⊙ g_i‖²)`` with ``T_i = |w_i| + eta`` in adaptive groups, else 1;
    each group perturbs ``w ← w + rho / (N + eps) · T² · g`` (weights kept for an exact restore);
    after the backward pass at the perturbed point the weights are restored and the base
    optimizer steps with that gradient.

    Args:
        params: parameters or param-group dicts (per-group keys: ``rho``, ``adaptive``, ``eta``,
            ``perturb``: ``False`` leaves the group out of N and e — SAM-ON, see
            ``sam_kernels.optim.sam_on_param_groups`` — while it still gets the base step).
        base_optimizer: a ``torch.optim.Optimizer`` class, built here on our param groups with
            ``**base_kwargs`` (davda54 style), or an instance over the same parameters.
        rho: neighbourhood radius (>= 0).
        adaptive: ASAM's scale-invariant neighbourhood.
        eta: ASAM's offset in ``T = |w| + eta`` (>= 0). ``eta=0`` is davda54's ASAM; the ASAM
            paper's recipe is ``eta=0.01`` with biases and norm layers in a non-adaptive group.
        eps: added to the norm (> 0).
        interval: Composer's interval SAM: steps t = 0, interval, 2·interval, … (t counts
            completed steps, ``steps``; checkpointed, and a step skipped for inf/NaN does not
            count) are SAM steps; the others one pass at w and a plain base step
            (``interval=1``, the default: SAM on every step).
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

    With ``interval > 1`` a hand-written loop runs the pass at w + e only when
    ``optimizer.needs_perturbed_pass()`` (on the other steps first_step() keeps the gradients
    and second_step() makes the plain base step).
    """

    _nonnegative_group_keys = ("rho", "eta")
    _seed_family = "sam"  # load_state_dict converts davda54's, BingcongLi's, lk-eg's SAM
    #: lk-eg's SAM counters (read by its train.py): every step computes the gradient at w
    inner_gradient_calculation_counter = ReadOnlyAlias("steps")
    inner_fwp_calculation_counter = ReadOnlyAlias("steps")

    def __init__(self, params: Iterable, base_optimizer: Any, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.0, eps: float = 1e-12,
                 backend: str = "auto", model: Optional[torch.nn.Module] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, interval: int = 1,
                 **base_kwargs: Any) -> None:
        check_nonnegative("rho", rho)
        check_nonnegative("eta", eta)
        check_positive("eps", eps)
        check_int("interval", interval, 1)
        self.eps = float(eps)
        self.interval = interval
        if interval > 1:
            # no tensor state, but the counters decide the schedule: a non-empty key list makes
            # a skipped step (GradScaler, skip_nonfinite) put them back (one host read then)
            self._amp_guarded_state = ("sam_interval_counters",)
        defaults = dict(rho=rho, adaptive=bool(adaptive), eta=eta)
        super().__init__(params, base_optimizer, defaults, backend=backend, model=model,
                         base_kwargs=base_kwargs, grad_scaler=grad_scaler,
                         max_grad_norm=max_grad_norm)

    def needs_perturbed_pass(self) -> bool:
        """Whether the current step is a SAM step (runs the pass at w + e)."""
        return self.steps % self.interval == 0

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e using the current gradients (the gradient at w). On an interval
        step without SAM: nothing, the gradients stay for second_step()."""
        self._first_step(zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly and step the base optimizer with the gradient taken at w + e
        (on a one-pass step: with the gradient at w)."""
        one_pass = self._one_pass
        if not one_pass:
            self._require_perturbed("second_step()")
        self._unscale_grads()
        if one_pass:
            self._one_pass = False
        else:
            self._restore()
        self._count_step(perturbed=not one_pass)
        self._base_step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None, *args: Any,
             **seed_kwargs: Any) -> Any:
        """The torch closure contract (what Lightning calls): ``closure`` zeroes the gradients,
        runs forward and backward and returns the loss. Runs it at w and at w + e and returns
        the loss of the first call (at w); ``last_surrogate_gap`` gets L(w + e) − L(w).
        The seeds' loops are accepted as they are: lk-eg's ``closure(computeForward,
        computeBackprop)`` is called as ``closure(True, True)``, and the keywords they pass
        (``epoch=``, ``step=``, ``batch_idx=``, ``model=``, ...) are ignored."""
        check_step_arguments(self, args, seed_kwargs)
        name = type(self).__name__
        closure = self._require_closure(closure, name)
        return self._run_step(closure)

    def _extra_state(self):
        # interval 1: plain SAM, whose checkpoints and skipped steps never had counters
        return self._counters() if self.interval > 1 else {}

    def _load_extra_state(self, extra) -> None:
        self._load_counters(extra)
