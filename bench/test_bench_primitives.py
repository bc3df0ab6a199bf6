"""pytest-benchmark: each primitive of sam_kernels.ops on every available CPU backend, on the
ResNet-50 and 2000 × 4096 shape suites (fp32). Groups compare backends per (primitive, suite)."""
import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark")

from sam_kernels import ops

from . import harness, suites
from .algos import benchmark_backends

BACKENDS = benchmark_backends(torch.device("cpu"))
SUITE_NAMES = ("resnet50", "small2000")


@pytest.fixture(scope="module", params=SUITE_NAMES)
def lists(request):
    """Five parameter-sized fp32 lists of one suite: a, b, c (fresh random), backup, and a
    device scalar, built once per module."""
    shapes = suites.SUITES[request.param]()
    a, b, c = (harness.make_params(shapes, torch.device("cpu"), torch.float32, seed=s)
               for s in (1, 2, 3))
    a, b, c = ([t.detach() for t in xs] for xs in (a, b, c))
    backup = [torch.empty_like(t) for t in a]
    return request.param, a, b, c, backup


PRIMITIVES = {
    "sum_sq": lambda a, b, c, backup, be: ops.sum_sq(a, backend=be),
    "sum_sq_weighted": lambda a, b, c, backup, be: ops.sum_sq(a, b, 0.01, backend=be),
    "dot_sum_sq": lambda a, b, c, backup, be: ops.dot_sum_sq(a, b, backend=be),
    "perturb_backup": lambda a, b, c, backup, be: ops.perturb_(
        a, b, torch.tensor(4.0), 1e-6, 1e-12, backup=backup, backend=be),
    "restore": lambda a, b, c, backup, be: ops.restore_(c, a, backend=be),
    "orth_combine": lambda a, b, c, backup, be: ops.orth_combine_(
        c, b, torch.tensor([0.1, 2.0, 3.0]), 1e-6, 1e-12, backend=be),
    "lerp_sum_sq": lambda a, b, c, backup, be: ops.lerp_sum_sq_(c, b, 0.5, backend=be),
    "axpby": lambda a, b, c, backup, be: ops.axpby_(c, b, 1e-6, 1.0, backend=be),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("primitive", list(PRIMITIVES))
def test_primitive(benchmark, lists, primitive, backend):
    suite, a, b, c, backup = lists
    fn = PRIMITIVES[primitive]
    benchmark.group = f"{primitive} {suite}"
    benchmark.extra_info.update(suite=suite, params=sum(t.numel() for t in a), tensors=len(a))
    benchmark(fn, a, b, c, backup, backend)
