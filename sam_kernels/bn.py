"""Freeze BatchNorm running statistics during the perturbed passes of a SAM-family step.

The perturbed forward passes must not move the running mean/var (davda54/sam #17, #30): they
see weights the model will never have. While disabled, every `_BatchNorm` module (BatchNorm1d/
2d/3d, SyncBatchNorm, lazy variants) in training mode normalises with batch statistics as usual
but neither updates `running_mean`/`running_var` nor advances `num_batches_tracked` — exactly,
for `momentum=None` (cumulative averaging) too — by clearing `track_running_stats`, which is
how `_BatchNorm.forward` decides whether to pass the running buffers to `F.batch_norm`.
"""
import torch
from torch.nn.modules.batchnorm import _BatchNorm

_SAVED = "_sam_kernels_track_running_stats"


def disable_running_stats(model: torch.nn.Module) -> None:
    """Stop BatchNorm running-stat updates in `model` until enable_running_stats(model).

    Idempotent: calling it twice keeps the original setting saved by the first call."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not hasattr(m, _SAVED):
            setattr(m, _SAVED, m.track_running_stats)
            m.track_running_stats = False


def enable_running_stats(model: torch.nn.Module) -> None:
    """Undo disable_running_stats(model): every module gets back its own setting."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and hasattr(m, _SAVED):
            m.track_running_stats = getattr(m, _SAVED)
            delattr(m, _SAVED)
