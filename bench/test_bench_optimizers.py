"""pytest-benchmark: one optimizer step's extra work (the base optimizer is a no-op and the
closure only points `p.grad` at pre-made gradients) for every implementation the harness
compares — seed loop, pytorch-optimizer, sam_kernels per backend — on 2000 × 4096 tensors for
every algorithm, and on ResNet-50 shapes for SAM and GSAM."""
import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark")

from . import harness, suites
from .algos import ALGOS, BaseSpec, implementations


class NoOpOptimizer(torch.optim.Optimizer):
    """Base optimizer that does nothing, so only the SAM-family work is timed."""

    def __init__(self, params, **kwargs):
        super().__init__(params, dict(kwargs))

    def step(self, closure=None):
        return None


NO_OP = BaseSpec(NoOpOptimizer, ())
CPU = torch.device("cpu")
CASES = [(algo, "small2000") for algo in ALGOS] + [("sam", "resnet50"), ("gsam", "resnet50")]
PARAMS = [pytest.param(algo, suite, impl, id=f"{algo}-{suite}-{impl.label}")
          for algo, suite in CASES for impl in implementations(ALGOS[algo], CPU)[0]]


@pytest.mark.parametrize("algo, suite, impl", PARAMS)
def test_optimizer_step(benchmark, algo, suite, impl):
    shapes = suites.SUITES[suite]()
    params = harness.make_params(shapes, CPU, torch.float32)
    grads = harness.GradSource(params)
    opt = impl.build(params, NO_OP)
    benchmark.group = f"{algo} {suite}"
    benchmark.extra_info.update(suite=suite, params=suites.total_params(shapes),
                                tensors=len(shapes), impl=impl.label)
    benchmark.pedantic(impl.run, args=(opt, grads.assign), warmup_rounds=1, rounds=5)
    assert all(torch.isfinite(p).all() for p in params)
