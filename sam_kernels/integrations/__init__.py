"""Adapters for the training loops most users run: Hugging Face ``Trainer``
(:mod:`sam_kernels.integrations.transformers`), Accelerate
(:mod:`sam_kernels.integrations.accelerate`) and Lightning mixed precision
(:mod:`sam_kernels.integrations.lightning`).

Import the submodule you need; this package imports none of them (nor the libraries they
adapt), so ``import sam_kernels`` never pulls in transformers, accelerate or lightning.
"""
__all__ = ["accelerate", "lightning", "transformers"]
