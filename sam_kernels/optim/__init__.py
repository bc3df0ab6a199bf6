"""SAM-family optimizers: the step skeleton (base.py) and one short rule file per algorithm."""
from .base import SharpnessAwareOptimizer
from .sam import SAM
from .gsam import GSAM
from .gam import GAM
from .wsam import WSAM
from .vasso import VaSSO, VaSSORe, VaSSOReMu
from .looksam import LookSAM
from .friendly_sam import FriendlySAM
from .msam import MomentumSAM
from .sam_on import sam_on_param_groups

__all__ = ["SharpnessAwareOptimizer", "SAM", "GSAM", "GAM", "WSAM", "VaSSO", "VaSSORe",
           "VaSSOReMu", "LookSAM", "FriendlySAM", "MomentumSAM", "sam_on_param_groups"]
