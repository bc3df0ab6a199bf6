"""Shared fixtures: every test that takes `backend_device` runs once per (backend, device) this
machine can run: the backends usable on CPU tensors (reference, cpu when built, triton under
TRITON_INTERPRET=1), plus the GPU backends on 'cuda' when a GPU is present."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, the Triton kernels are exercised on CPU tensors by the interpreter (must be
    # set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sam_kernels import ops  # noqa: E402

BACKEND_DEVICES = [(b, "cpu") for b in ops.available_backends("cpu")]
if torch.cuda.is_available():
    BACKEND_DEVICES += [(b, "cuda") for b in ops.available_backends("cuda")]
CPU_BACKENDS = [b for b, d in BACKEND_DEVICES if d == "cpu"]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def pytest_report_header(config):
    return [f"sam_kernels (backend, device) pairs under test: {BACKEND_DEVICES}",
            f"backend status: {ops.backend_status()}",
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda bd: f"{bd[0]}-{bd[1]}")
def backend_device(request):
    """(backend name, device string)"""
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Fresh seed per test; one intra-op thread (tiny tensors: a second thread only adds
    OpenMP wake-ups, and on a loaded machine spin-waits). Tests about threading set their own."""
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
