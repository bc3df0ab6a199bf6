"""SAM-family optimizers: one file per algorithm family, each a composition of the primitives."""
from .base import SharpnessAwareOptimizer
from .sam import SAM
from .gsam import GSAM
from .gam import GAM
from .vasso import VaSSO, VaSSORe, VaSSOReMu

__all__ = ["SharpnessAwareOptimizer", "SAM", "GSAM", "GAM", "VaSSO", "VaSSORe", "VaSSOReMu"]
