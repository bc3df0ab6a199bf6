"""Lightning mixed precision with automatic optimization: :class:`SAMMixedPrecision`.

Lightning's ``MixedPrecision.optimizer_step`` (``precision="16-mixed"``) runs the closure
once, unscales, and calls ``scaler.step(optimizer)`` without the closure: a second pass at
w + e cannot run. This plugin keeps everything else of ``MixedPrecision`` (autocast, the loss
scaled in ``pre_backward``, the scaler's checkpoint state) and steps a sam_kernels optimizer
with ``optimizer.step(closure)`` and the plugin's scaler as its ``grad_scaler``: each pass
unscaled once, an inf/NaN in any pass skips the update exactly, ``scaler.update()`` once per
step. Other optimizers take Lightning's usual path. The user's ``training_step`` is unchanged::

    trainer = lightning.Trainer(plugins=[SAMMixedPrecision("16-mixed", "cuda")], ...)

``"bf16-mixed"`` needs no scaler and works with plain ``precision="bf16-mixed"`` already; the
plugin accepts it too.
"""
from typing import Any, Callable

from lightning.pytorch.plugins.precision import MixedPrecision

from ._common import update_scaler
from ..optim.base import SharpnessAwareOptimizer

__all__ = ["SAMMixedPrecision"]


class SAMMixedPrecision(MixedPrecision):
    """``MixedPrecision`` whose optimizer step runs every pass of a SAM-family optimizer.

    Args: as ``lightning.pytorch.plugins.precision.MixedPrecision``: ``precision``
    (``"16-mixed"`` or ``"bf16-mixed"``), ``device`` (``"cuda"``, ``"cpu"``, ...), ``scaler``
    (a ``torch.amp.GradScaler``; made for ``"16-mixed"`` when omitted). ``"16-mixed"`` on CPU
    is allowed here (torch has fp16 autocast on CPU), although ``Trainer(precision="16-mixed")``
    turns into bf16 there.
    """

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any],
                       **kwargs: Any) -> Any:
        if self.scaler is None or not isinstance(optimizer, SharpnessAwareOptimizer):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if model.trainer.gradient_clip_val:
            raise ValueError("gradient_clip_val would clip the scaled gradient of each pass; "
                             "with a SAM-family optimizer use its max_grad_norm= instead (it "
                             "clips the final, unscaled gradient)")
        if optimizer.grad_scaler is None:
            optimizer.grad_scaler = self.scaler  # the loss is scaled with it in pre_backward
        elif optimizer.grad_scaler is not self.scaler:
            raise ValueError("the optimizer has its own grad_scaler; with SAMMixedPrecision build "
                             "it without grad_scaler= (the plugin's scaler is used), or pass that "
                             "scaler to the plugin: SAMMixedPrecision('16-mixed', device, scaler)")
        # each pass is followed by Lightning's on_before_optimizer_step hooks, as in 32-bit
        # training (they see the scaled gradients of that pass)
        wrapped = lambda: self._wrap_closure(model, optimizer, closure)  # noqa: E731
        result = optimizer.step(closure=wrapped, **kwargs)
        update_scaler(optimizer)
        return result
