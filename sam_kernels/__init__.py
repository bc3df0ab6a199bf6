"""sam_kernels: fused multi-tensor kernels and drop-in optimizers for sharpness-aware training."""
from . import bn, ops
from .optim import SAM, SharpnessAwareOptimizer

__version__ = "0.1.0"

__all__ = ["SAM", "SharpnessAwareOptimizer", "bn", "ops", "__version__"]
