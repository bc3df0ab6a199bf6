"""What the integrations share; imports nothing but torch and the optimizers."""
from typing import Optional

import torch

from ..optim.base import SharpnessAwareOptimizer


def require_sam(optimizer, where: str) -> SharpnessAwareOptimizer:
    if not isinstance(optimizer, SharpnessAwareOptimizer):
        raise TypeError(f"{where} needs a sam_kernels optimizer (SAM, GSAM, GAM, VaSSO, VaSSORe, "
                        f"VaSSOReMu), got {type(optimizer).__name__}")
    return optimizer


def attach_model(optimizer: SharpnessAwareOptimizer, model: Optional[torch.nn.Module]) -> None:
    """Point `optimizer.model` at the module the training loop actually runs (e.g. the DDP
    wrapper a framework made after the optimizer was built), so that pass 1 runs per rank
    and BatchNorm statistics freeze at w + e."""
    if model is None or optimizer.model is model:
        return
    optimizer.set_model(model)


def refresh_device(optimizer: SharpnessAwareOptimizer) -> None:
    """Trainer moves the model to its device after a user built the optimizer (way 1 of
    SAMTrainer, on a GPU): the parameters are the same objects, but the optimizer resolved
    its device and backend at construction, so resolve them again when they moved."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if params and optimizer._device is not None and params[0].device != optimizer._device:
        optimizer.set_model(optimizer.model)


def update_scaler(optimizer: SharpnessAwareOptimizer) -> Optional[bool]:
    """After a step with a GradScaler: `scaler.update()`, and whether the step was skipped
    (the scale backs off exactly when some pass had inf/NaN). None without a scaler."""
    scaler = optimizer.grad_scaler
    if scaler is None or not scaler.is_enabled():
        return None
    before = scaler.get_scale()
    scaler.update()
    return scaler.get_scale() < before
