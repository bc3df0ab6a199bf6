"""The install provides the backends CI expects, so no backend's tests are silently skipped."""
import os

import pytest

from sam_kernels import ops


def test_expected_backends_are_available():
    expected = [b for b in os.environ.get("SAM_KERNELS_EXPECT_BACKENDS", "").split(",") if b]
    if not expected:
        pytest.skip("SAM_KERNELS_EXPECT_BACKENDS not set (CI sets it)")
    status = ops.backend_status()
    missing = {b: status[b] for b in expected if b not in ops.available_backends("cpu")}
    assert not missing, f"backends expected on CPU tensors but unavailable: {missing}"


def test_explicit_unavailable_backend_names_the_missing_piece():
    import torch

    from sam_kernels import SAM

    p = torch.nn.Parameter(torch.randn(3))
    for name in ops.BACKENDS:
        reason = ops._registry.unavailable_reason(name)
        if reason is None:
            continue
        with pytest.raises(ops.BackendUnavailableError, match=name):
            SAM([p], torch.optim.SGD, lr=0.1, backend=name)
    with pytest.raises(ValueError, match="Invalid backend"):
        SAM([p], torch.optim.SGD, lr=0.1, backend="fast")
