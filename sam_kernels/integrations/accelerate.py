"""Accelerate: ``optimizer.step(closure)`` through Accelerate's ``AcceleratedOptimizer``.

Accelerate wraps the optimizer in ``AcceleratedOptimizer``, whose ``step(closure)`` hands the
closure to ``GradScaler.step`` in fp16 — which unscales once per step, cannot run a second
pass and refuses closures. :func:`prepare` (or :func:`enable_sam_step` on an optimizer already
prepared) makes ``step(closure)`` run the SAM step itself: fp32 and bf16 unchanged; in fp16
the optimizer gets the accelerator's GradScaler as its ``grad_scaler`` (each pass unscaled
once, the update skipped exactly on inf/NaN), and the step calls ``scaler.update()`` and
records the skip where Accelerate reports it (``accelerator.optimizer_step_was_skipped``).

Example::

    accelerator = Accelerator(mixed_precision="bf16")
    optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, model=model)
    model, optimizer, loader = sam_prepare(accelerator, model, optimizer, loader)
    for x, y in loader:
        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            return loss
        optimizer.step(closure)
"""
from typing import Any, Callable, Optional

import torch
from accelerate.optimizer import AcceleratedOptimizer

from ._common import attach_model, require_sam, update_scaler

__all__ = ["SAMAcceleratedOptimizer", "enable_sam_step", "prepare"]


class SAMAcceleratedOptimizer(AcceleratedOptimizer):
    """An ``AcceleratedOptimizer`` around a sam_kernels optimizer whose ``step(closure)`` runs
    every pass (made by :func:`enable_sam_step`; not constructed directly)."""

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if closure is None and self.__dict__.pop("_sam_step_taken", False):
            return None  # SAMTrainer already ran this step inside training_step
        if not self.gradient_state.sync_gradients:
            return None  # inside accelerator.accumulate, before the window's last batch
        return self.sam_step(closure)

    def sam_step(self, closure: Optional[Callable[[], Any]]) -> Any:
        """The step itself, whatever Accelerate's accumulation state says."""
        if closure is not None and self.gradient_state.num_steps > 1 and \
                self.optimizer.backward_since_step():
            raise RuntimeError(
                "accelerator.accumulate with gradient_accumulation_steps > 1 and a backward "
                "pass before optimizer.step(closure): the accumulated gradients are not a whole "
                "pass 1 of a SAM step (its later passes would see one micro-batch). Keep the "
                "micro-batches and run them all inside the closure (the recipe in "
                "docs/recipes.md), or use gradient_accumulation_steps=1")
        result = self.optimizer.step(closure)  # raises a clear error without a closure
        skipped = update_scaler(self.optimizer)
        self._is_overflow = bool(skipped)
        return result


def enable_sam_step(optimizer: AcceleratedOptimizer,
                    model: Optional[torch.nn.Module] = None) -> SAMAcceleratedOptimizer:
    """Make ``optimizer`` (what ``accelerator.prepare`` returned for a sam_kernels optimizer)
    run ``step(closure)`` as the SAM step; give it the prepared ``model`` (the DDP wrapper) so
    pass 1 runs per rank. Call it before building LR schedulers on the prepared optimizer
    (torch's schedulers remember the ``step`` method they saw). Returns the same object."""
    if not isinstance(optimizer, AcceleratedOptimizer):
        raise TypeError(f"enable_sam_step() takes the optimizer accelerator.prepare() returned "
                        f"(an AcceleratedOptimizer), got {type(optimizer).__name__}; or use "
                        f"sam_kernels.integrations.accelerate.prepare(accelerator, ...)")
    sam = require_sam(optimizer.optimizer, "enable_sam_step()")
    scaler = optimizer.scaler
    if scaler is not None:
        if sam.grad_scaler is None:
            sam.grad_scaler = scaler  # the loss is scaled by accelerator.backward with it
        elif sam.grad_scaler is not scaler:
            raise ValueError("the optimizer was built with its own GradScaler but the accelerator "
                             "has another (mixed_precision='fp16'); build the optimizer without "
                             "grad_scaler= and the accelerator's is used")
    attach_model(sam, model)
    if not isinstance(optimizer, SAMAcceleratedOptimizer):
        # same object (Accelerate keeps it in accelerator._optimizers), new step()
        optimizer.__class__ = SAMAcceleratedOptimizer
    return optimizer


def prepare(accelerator, *objects: Any, **kwargs: Any):
    """``accelerator.prepare(*objects)``, then :func:`enable_sam_step` on every sam_kernels
    optimizer among them, each told the prepared version of its ``model`` (or of the only
    module passed, when it was built without ``model=``)."""
    from ..optim.base import SharpnessAwareOptimizer

    prepared = accelerator.prepare(*objects, **kwargs)
    out = list(prepared) if len(objects) != 1 else [prepared]
    modules = [(o, p) for o, p in zip(objects, out) if isinstance(o, torch.nn.Module)]
    for i, (obj, result) in enumerate(zip(objects, out)):
        if isinstance(obj, SharpnessAwareOptimizer):
            model = next((p for o, p in modules if o is obj.model), None)
            if model is None and obj.model is None and len(modules) == 1:
                model = modules[0][1]
            out[i] = enable_sam_step(result, model)
    return out[0] if len(objects) == 1 else tuple(out)
