"""sam_kernels: fused multi-tensor kernels and drop-in optimizers for sharpness-aware training."""
from . import bn, ops, schedulers, sharpness
from .optim import (GAM, GSAM, SAM, SharpnessAwareOptimizer, VaSSO, VaSSORe,
                    VaSSOReMu)
from .optim import WSAM, FriendlySAM, LookSAM, MomentumSAM, sam_on_param_groups
from .schedulers import (CosineScheduler, LinearScheduler, PolyScheduler, ProportionScheduler,
                         SchedulerBase)

__version__ = "0.1.0"

__all__ = ["SAM", "GSAM", "GAM", "WSAM", "VaSSO", "VaSSORe", "VaSSOReMu",
           "LookSAM", "FriendlySAM", "MomentumSAM", "sam_on_param_groups", "sharpness",
           "SharpnessAwareOptimizer", "bn", "ops", "schedulers",
           "SchedulerBase", "LinearScheduler", "CosineScheduler", "PolyScheduler",
           "ProportionScheduler", "__version__"]
