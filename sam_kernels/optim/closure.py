"""The seed GSAM's set_closure(loss_fn, inputs, targets) + step() API, shared by GSAM, GAM and
the VaSSO family."""
from typing import Any, Callable, Optional, Tuple

import torch



class ClosureMixin:
    """The seed's set_closure(loss_fn, inputs, targets) API, shared by GSAM and GAM: the stored
    closure zeroes the gradients, runs the model and the loss, backpropagates and returns
    (outputs, loss). step() without a closure runs it; step(closure) takes either contract —
    torch's (returns the loss) or the seed's (returns (outputs, loss)) — and returns what the
    first call at w returned."""

    model: Optional[torch.nn.Module]

    def set_closure(self, loss_fn: Callable[..., torch.Tensor], inputs: Any, targets: Any,
                    **kwargs: Any) -> None:
        """Set the forward-backward pass step() runs: ``loss_fn(model(inputs), targets,
        **kwargs)``; call it for every batch, then ``outputs, loss = optimizer.step()``."""
        if self.model is None:
            raise ValueError(f"{type(self).__name__}.set_closure() runs the model, so the "
                             f"optimizer needs it: {type(self).__name__}(..., model=model, ...)")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> loss, got "
                            f"{loss_fn!r}")
        model = self.model

        def forward_backward() -> Tuple[Any, torch.Tensor]:
            self.zero_grad()
            with torch.enable_grad():
                outputs = model(inputs)
                loss = loss_fn(outputs, targets, **kwargs)
            (self.grad_scaler.scale(loss) if self._amp_enabled() else loss).backward()
            return outputs.detach() if torch.is_tensor(outputs) else outputs, loss.detach()

        self._forward_backward = forward_backward

    def _closure_for_step(self, closure: Optional[Callable[..., Any]]) -> Callable[[], Any]:
        if closure is None:
            closure = getattr(self, "_forward_backward", None)
            if closure is None:
                raise RuntimeError(
                    f"{type(self).__name__}.step() was called without a closure and before "
                    f"set_closure(); call optimizer.set_closure(loss_fn, inputs, targets) for "
                    f"each batch first, or pass a closure: optimizer.step(closure)")
        return self._require_closure(closure, type(self).__name__)
