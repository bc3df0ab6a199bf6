"""Shared fixtures: every test that takes `backend` runs once per backend usable on CPU tensors
here (reference, cpu when built, triton under TRITON_INTERPRET=1)."""
import os

import pytest
import torch

from sam_kernels import ops

CPU_BACKENDS = ops.available_backends("cpu")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def pytest_report_header(config):
    return [f"sam_kernels backends on CPU tensors: {CPU_BACKENDS}",
            f"backend status: {ops.backend_status()}",
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
