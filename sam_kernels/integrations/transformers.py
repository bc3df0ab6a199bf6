"""Hugging Face ``Trainer`` with the SAM family: :class:`SAMTrainer`.

``Trainer`` runs one forward+backward per micro-batch, clips, then calls
``optimizer.step()`` without a closure; a SAM step needs the same micro-batches again at the
perturbed weights. ``SAMTrainer`` keeps the micro-batches Trainer already prefetches for one
optimizer step (``get_batch_samples``) and, at the last of them, runs the optimizer's own
``step(closure)`` with a closure that runs Trainer's ``training_step`` over all of them — so
every algorithm (2 or 4 passes, or VaSSORe's skipped pass 1), loss scaling, ``num_items_in_batch``
normalisation, autocast and DDP behave as in Trainer, and the step is the one a hand-written
loop over the same batches takes.
"""
import contextlib
import logging
from typing import Any, Dict, List, Optional, Type, Union

import torch
from transformers import Trainer

from .. import optim
from ._common import attach_model, refresh_device, require_sam
from .accelerate import SAMAcceleratedOptimizer, enable_sam_step

__all__ = ["SAMTrainer", "ALGORITHMS"]

logger = logging.getLogger(__name__)

# the Trainer hooks SAMTrainer overrides (transformers 5.x; 4.x clipped inline in its loop)
_HOOKS = ("get_batch_samples", "training_step", "_clip_grad_norm", "_get_grad_norm",
          "create_scheduler")
if not all(hasattr(Trainer, h) for h in _HOOKS):
    import transformers as _tf
    raise ImportError(f"sam_kernels.integrations.transformers needs transformers >= 5.24 (found "
                      f"{_tf.__version__}): pip install 'sam_kernels[transformers]'")

#: names accepted by ``SAMTrainer(sam=...)``: (class, keywords it implies)
ALGORITHMS: Dict[str, tuple] = {
    "sam": (optim.SAM, {}),
    "asam": (optim.SAM, {"adaptive": True}),
    "gsam": (optim.GSAM, {}),
    "gam": (optim.GAM, {}),
    "vasso": (optim.VaSSO, {}),
    "vassore": (optim.VaSSORe, {}),
    "vassoremu": (optim.VaSSOReMu, {}),
}


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer step is a SAM-family step.

    Two ways to configure it:

    1. ``SAMTrainer(model=..., args=..., train_dataset=...,
       optimizers=(SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=...), None))`` —
       any optimizer of the family; the LR scheduler is built from ``args`` as usual;
    2. ``SAMTrainer(..., sam="sam", sam_kwargs={"rho": 0.05})`` — the base optimizer is the
       one ``args`` describes (``optim``, ``learning_rate``, ``weight_decay`` with Trainer's
       no-decay grouping, ...), built by Trainer and wrapped. ``sam`` is a name of
       :data:`ALGORITHMS` or an optimizer class of the family.

    What differs from the plain Trainer:

    - **gradient accumulation** (``gradient_accumulation_steps=k``): each pass accumulates over
      the same k micro-batches, then one optimizer step — equal to one batch k times larger.
      The k micro-batches of a step stay in memory until it ends (Trainer prefetches them
      anyway; SAMTrainer only keeps the references, on the device Trainer put them);
    - **clipping**: ``args.max_grad_norm`` becomes the optimizer's ``max_grad_norm`` (the
      final gradient is clipped, after the perturbation, as ``clip_grad_norm_`` would); Trainer's
      own clipping is bypassed because it would clip the gradient of pass 1 only, which
      cannot change the normalised perturbation, and never the gradient that is applied. An
      optimizer built with its own ``max_grad_norm`` keeps it. The logged ``grad_norm`` is the
      final gradient's norm before clipping;
    - **logged loss**: what ``step(closure)`` returns: the loss of pass 1, at w (VaSSORe and
      VaSSOReMu return the loss at w + e, the pass every step has); ``surrogate_gap`` (the last
      step's) too when the optimizer reports ``last_surrogate_gap``;
    - **fp16**: the accelerator's GradScaler becomes the optimizer's ``grad_scaler``: each pass
      is unscaled once, an inf/NaN in any pass skips the update exactly (and the LR scheduler
      step, as Trainer does), ``scaler.update()`` runs once per step;
    - **DDP**: the model Trainer wraps is given to the optimizer, so pass 1 runs per rank
      (``no_sync``) and the synchronised pass all-reduces once, after its last micro-batch.
    """

    def __init__(self, *args: Any,
                 sam: Union[str, Type[optim.SharpnessAwareOptimizer], None] = None,
                 sam_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        self._sam_spec = _resolve(sam, sam_kwargs)
        super().__init__(*args, **kwargs)
        if self._sam_spec is not None and self.optimizer is not None:
            raise ValueError("SAMTrainer got both optimizers=(optimizer, ...) and sam=...; give "
                             "one: a SAM-family optimizer instance, or sam= with sam_kwargs=")
        if self._sam_spec is None:
            if self.optimizer is None:
                raise ValueError("SAMTrainer needs a SAM-family optimizer: pass "
                                 "optimizers=(SAM(model.parameters(), torch.optim.AdamW, rho=0.05, "
                                 "lr=...), None), or sam='sam' (any of "
                                 f"{sorted(ALGORITHMS)}) with sam_kwargs={{'rho': ...}}")
            require_sam(self.optimizer, "SAMTrainer(optimizers=...)")
            self._configure_clipping(self.optimizer)
        self._sam_window: Optional[List[Any]] = None
        self._sam_last_loss: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ building
    def create_optimizer(self, model=None):
        if self.optimizer is None and self._sam_spec is not None:
            cls, hyper = self._sam_spec
            base = super().create_optimizer(model)  # exactly what args describe
            self.optimizer = cls(base.param_groups, base,
                                 model=self.model if model is None else model, **hyper)
            self._configure_clipping(self.optimizer)
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # Trainer calls this right after accelerator.prepare(): the step must be ours before
        # a torch LR scheduler wraps it (schedulers keep the step function they saw)
        self._enable_sam_step()
        return super().create_scheduler(num_training_steps, optimizer)

    def _configure_clipping(self, opt: optim.SharpnessAwareOptimizer) -> None:
        norm = self.args.max_grad_norm
        if norm and norm > 0:
            if opt.max_grad_norm is None:
                opt.max_grad_norm = float(norm)
            elif opt.max_grad_norm != norm:
                logger.warning("SAMTrainer: the optimizer clips at max_grad_norm=%s; "
                               "args.max_grad_norm=%s is not used", opt.max_grad_norm, norm)

    def _enable_sam_step(self) -> Optional[SAMAcceleratedOptimizer]:
        from accelerate.optimizer import AcceleratedOptimizer

        opt = self.optimizer
        if isinstance(opt, AcceleratedOptimizer) and not isinstance(opt, SAMAcceleratedOptimizer):
            enable_sam_step(opt)
        return opt if isinstance(opt, SAMAcceleratedOptimizer) else None

    # ------------------------------------------------------------------ the step
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator,
                                                                      num_batches, device)
        self._sam_window = batch_samples  # the micro-batches of one optimizer step
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        window = self._sam_window
        if window is None or not any(inputs is b for b in window):
            window = [inputs]  # called outside Trainer's loop: a step of one batch
        if inputs is not window[-1]:
            # the micro-batch is kept; the passes run at the last one
            return torch.zeros((), device=self.args.device)
        accelerated = self._enable_sam_step()
        if accelerated is None:
            raise RuntimeError("SAMTrainer: the optimizer was not prepared by the accelerator; "
                               "SAMTrainer supports the Trainer loop of plain, DDP and "
                               "mixed-precision runs (not DeepSpeed, FSDP or SageMaker MP)")
        sam = accelerated.optimizer
        attach_model(sam, model)  # the DDP wrapper Trainer made, for the per-rank pass 1
        refresh_device(sam)  # Trainer may have moved the model after the optimizer was built
        run_micro_batch = super().training_step

        def closure():
            sam.zero_grad()
            total = None
            for j, micro_batch in enumerate(window):
                # all but the last micro-batch without DDP sync: a synchronised pass
                # all-reduces once; inside the optimizer's no_sync (pass 1) none does
                sync = j == len(window) - 1
                with contextlib.nullcontext() if sync else self.accelerator.no_sync(model):
                    loss = run_micro_batch(model, micro_batch, num_items_in_batch)
                total = loss if total is None else total + loss
            return total

        loss = accelerated.sam_step(closure)
        accelerated._sam_step_taken = True  # Trainer's own optimizer.step() call follows
        self._sam_window = None
        return loss.detach()

    def _clip_grad_norm(self, model):
        # Trainer's clipping would act on pass 1 only; the optimizer clipped the final
        # gradient (max_grad_norm) and recorded its norm before clipping
        return self._final_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            grad_norm = self._final_grad_norm(model)
        return super()._get_grad_norm(model, grad_norm)

    def _final_grad_norm(self, model):
        sam = getattr(self.optimizer, "optimizer", self.optimizer)
        norm = getattr(sam, "last_grad_norm", None)
        if norm is not None and getattr(sam, "max_grad_norm", None) is not None:
            return norm
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return None
        return torch.nn.utils.get_total_norm(grads)

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        sam = getattr(self.optimizer, "optimizer", self.optimizer)
        gap = getattr(sam, "last_surrogate_gap", None)
        if gap is not None and "loss" in logs:
            logs["surrogate_gap"] = float(gap)
        super().log(logs, start_time)


def _resolve(sam, sam_kwargs):
    if sam is None:
        if sam_kwargs:
            raise ValueError("sam_kwargs= was given without sam=; name the algorithm too, e.g. "
                             "SAMTrainer(..., sam='sam', sam_kwargs={'rho': 0.05})")
        return None
    hyper = dict(sam_kwargs or {})
    if isinstance(sam, str):
        key = sam.lower()
        if key not in ALGORITHMS:
            raise ValueError(f"unknown SAM algorithm {sam!r}; choose one of {sorted(ALGORITHMS)} "
                             "or pass an optimizer class of the family")
        cls, implied = ALGORITHMS[key]
        return cls, {**implied, **hyper}
    if isinstance(sam, type) and issubclass(sam, optim.SharpnessAwareOptimizer):
        return sam, hyper
    raise TypeError(f"sam must be a name ({sorted(ALGORITHMS)}) or a sam_kernels optimizer "
                    f"class, got {sam!r}")
