"""SAM-family optimizers: one file per algorithm family, each a composition of the primitives."""
from .base import SharpnessAwareOptimizer
from .sam import SAM
from .gsam import GSAM
from .gam import GAM
from .vasso import VaSSO, VaSSORe, VaSSOReMu
from .looksam import LookSAM
from .friendly_sam import FriendlySAM
from .msam import MomentumSAM
from .sam_on import sam_on_param_groups

__all__ = ["SharpnessAwareOptimizer", "SAM", "GSAM", "GAM", "VaSSO", "VaSSORe", "VaSSOReMu",
           "LookSAM", "FriendlySAM", "MomentumSAM", "sam_on_param_groups"]
