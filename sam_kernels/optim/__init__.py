"""SAM-family optimizers: one file per algorithm family, each a composition of the primitives."""
from .base import SharpnessAwareOptimizer
from .sam import SAM

__all__ = ["SharpnessAwareOptimizer", "SAM"]
