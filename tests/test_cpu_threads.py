"""The CPU kernels' thread choice (csrc/cpu/multi_tensor_cpu.h): small calls run on the calling
thread alone, larger ones may take helpers, and every op gives bitwise the same result on 1, 2
or 4 threads and on the single- and multi-threaded paths (odd sizes, chunk boundaries, empty
tensors, several dtypes). No timing is asserted."""
import multiprocessing
import os

import pytest
import torch

from sam_kernels import ops
from test_ops import CPU_CHUNK

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends("cpu"),
                                reason="the cpu backend is not built")

NEVER = 1 << 62  # a threshold no call reaches: always the single-threaded path
SIZES = (0, 1, 7, CPU_CHUNK - 1, CPU_CHUNK, 0, CPU_CHUNK + 1, 3, 2 * CPU_CHUNK + 5, 1023)


def knob(value=-1):
    return torch.ops.sam_kernels._cpu_parallel_min_bytes(value)


def threads_for(nbytes, items):
    return torch.ops.sam_kernels._cpu_threads_for(nbytes, items)


def last_call_threads():
    return torch.ops.sam_kernels._cpu_last_call_threads()


@pytest.fixture(autouse=True)
def restore_settings():
    threads, min_bytes = torch.get_num_threads(), knob()
    yield
    torch.set_num_threads(threads)
    knob(min_bytes)


def test_small_calls_run_single_threaded_and_large_ones_may_use_threads():
    torch.set_num_threads(2)
    min_bytes = knob()
    assert min_bytes > 0
    assert threads_for(min_bytes - 1, 1000) == 1
    assert threads_for(2 * min_bytes, 1000) == 2
    assert threads_for(100 * min_bytes, 1) == 1  # one work item: nothing to share
    torch.set_num_threads(4)
    assert threads_for(3 * min_bytes, 1000) == 3  # each thread gets at least min_bytes
    assert threads_for(100 * min_bytes, 1000) == 4
    torch.set_num_threads(1)
    assert threads_for(100 * min_bytes, 1000) == 1

    torch.set_num_threads(2)
    small = [torch.randn(1000) for _ in range(3)]
    ops.sum_sq(small, backend="cpu")
    assert last_call_threads() == 1
    knob(0)  # every call may use every thread
    large = [torch.randn(8 * CPU_CHUNK)]
    for _ in range(3):
        ops.sum_sq(large, backend="cpu")
        assert 1 <= last_call_threads() <= 2  # a late helper may find nothing left to take


def _lists(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in SIZES]


def _run_every_op(dtype):
    """Every op on fresh copies of the same inputs; returns all outputs and written lists."""
    a, b, c = _lists(dtype, 1), _lists(dtype, 2), _lists(dtype, 3)
    clone = lambda xs: [x.clone() for x in xs]  # noqa: E731
    out = {"sum_sq": ops.sum_sq(a, backend="cpu"),
           "sum_sq weighted": ops.sum_sq(a, b, 0.01, backend="cpu"),
           "dot_sum_sq": ops.dot_sum_sq(a, b, backend="cpu")}
    s = ops.sum_sq(b, backend="cpu")
    for adaptive in (False, True):
        p, backup = clone(a), [torch.empty_like(x) for x in a]
        ops.perturb_(p, b, s, 0.05, 1e-12, adaptive=adaptive, eta=0.01, backup=backup,
                     backend="cpu")
        out[f"perturb_ adaptive={adaptive}"] = p + backup
        p = clone(a)
        ops.perturb_(p, b, s, 0.05, 1e-12, adaptive=adaptive, backend="cpu")
        out[f"perturb_ no backup adaptive={adaptive}"] = p
    p = clone(c)
    ops.restore_(p, a, backend="cpu")
    out["restore_"] = p
    d = clone(a)
    ops.orth_combine_(d, b, ops.dot_sum_sq(b, a, backend="cpu"), 0.3, 1e-12, backend="cpu")
    out["orth_combine_"] = d
    e = clone(c)
    out["lerp_sum_sq_ total"] = ops.lerp_sum_sq_(e, a, 0.9, backend="cpu")
    out["lerp_sum_sq_"] = e
    for beta in (0.0, 0.7):
        y = clone(c)
        ops.axpby_(y, a, 1.5, beta, backend="cpu")
        out[f"axpby_ b={beta}"] = y
    return out


def _bits(x):
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.view(ints[x.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_op_is_bitwise_identical_across_threads_and_paths(dtype):
    results = {}
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        for path, min_bytes in (("single", NEVER), ("multi", 0)):
            knob(min_bytes)
            results[(threads, path)] = _run_every_op(dtype)
    first_key, first = next(iter(results.items()))
    for key, got in results.items():
        for name, want in first.items():
            want = want if isinstance(want, list) else [want]
            have = got[name] if isinstance(got[name], list) else [got[name]]
            for i, (w, h) in enumerate(zip(want, have)):
                assert torch.equal(_bits(w), _bits(h)), f"{name}[{i}]: {key} vs {first_key}"


def _child_sum(queue, x):
    # Only our op here: torch's own OpenMP regions hang in a child forked after the parent used
    # them (libgomp), which is why DataLoader workers avoid them.
    total = float(ops.sum_sq(x, backend="cpu"))
    queue.put((total, torch.ops.sam_kernels._cpu_threads_for(8 * CPU_CHUNK * 4, 8)))


def test_a_forked_child_can_use_the_threads_its_parent_started():
    # The parent's helper threads do not exist in a forked child (a DataLoader worker): the
    # child must start its own pool instead of waiting for them.
    torch.set_num_threads(2)
    knob(0)
    x = [torch.ones(8 * CPU_CHUNK)]
    ops.sum_sq(x, backend="cpu")  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_sum, args=(queue, x))
    child.start()
    child.join(120)
    if child.is_alive():
        os.kill(child.pid, 9)
        pytest.fail("the forked child hung in a multi-threaded call")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == (8 * CPU_CHUNK, 2)  # it took the multi-threaded path
