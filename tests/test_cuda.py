"""CUDA backend specifics (csrc/cuda). The op and optimizer suites already run on the `cuda`
backend through the `backend_device` fixture when a GPU is present; this file covers what only
the CUDA multi-tensor harness has: the misaligned (scalar) path, lists longer than one launch's
argument table, int64 indexing past 2^31 elements, bitwise-deterministic reductions, the current
stream, CUDA-graph capture and the absence of host syncs. Without a GPU those tests skip with the
reason; the source-level test that both backends compile one element-maths header and the
registration test run everywhere."""
import math
import re
from pathlib import Path

import pytest
import torch

from sam_kernels import _extension, ops

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _cuda_unavailable_reason():
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return ops._registry.unavailable_reason("cuda", "cuda")


_REASON = _cuda_unavailable_reason()
requires_cuda = pytest.mark.skipif(_REASON is not None,
                                   reason=f"CUDA backend cannot run here: {_REASON}")

# Hyper-parameters of every op run below, and the device scalars they read.
ETA, RHO, EPS, GAMMA, THETA, A, B, A_COPY = 0.1, 0.05, 1e-12, 0.7, 0.3, 1.5, -0.5, 2.0
SUM_SQ = 2.5
STATS = (0.3, 2.0, 1.5)
# Elementwise outputs: |actual - float64 reference| <= tol * (1 + |reference|) (inputs are O(1)).
ELEMENT_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3,
               torch.bfloat16: 1.6e-2}
# Reductions accumulate in fp32 (fp64 for fp64): error relative to the sum of |terms|.
SUM_TOL = {True: 1e-12, False: 2e-5}  # key: every tensor is fp64


# ------------------------------------------------------------------------------------ helpers
def aligned_copy(t):
    return t.clone()


def offset_copy(t):
    """A copy of t that starts one element into its buffer: not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def random_list(shapes, dtypes, device):
    return [torch.randn(s, device=device).to(dtypes[i % len(dtypes)])
            for i, s in enumerate(shapes)]


def nan_like(t, make):
    return make(torch.full_like(t, float("nan")))


def run_every_op(x, y, make, backend, device):
    """Every primitive on fresh copies (built by `make`) of the paired lists x, y; outputs that
    a kernel writes start as NaN where the op does not read them."""
    cp = lambda ts: [make(t) for t in ts]  # noqa: E731
    xs, ys = cp(x), cp(y)
    s = torch.tensor(SUM_SQ, device=device)
    stats = torch.tensor(STATS, device=device, dtype=torch.float64)
    out = {"sum_sq": ops.sum_sq(xs, backend=backend),
           "sum_sq_weighted": ops.sum_sq(xs, ys, eta=ETA, backend=backend),
           "dot_sum_sq": ops.dot_sum_sq(xs, ys, backend=backend)}
    for adaptive in (False, True):
        p, backup = cp(x), [nan_like(t, make) for t in x]
        ops.perturb_(p, ys, s, RHO, EPS, adaptive=adaptive, eta=ETA, backup=backup,
                     backend=backend)
        out[f"perturb_adaptive={adaptive}"], out[f"backup_adaptive={adaptive}"] = p, backup
    p = cp(x)
    ops.perturb_(p, ys, s, RHO, EPS, backend=backend)  # without backup: the depth-2 kernel
    out["perturb_no_backup"] = p
    restored = [nan_like(t, make) for t in x]
    ops.restore_(restored, xs, backend=backend)
    out["restore"] = restored
    d = cp(x)
    ops.orth_combine_(d, ys, stats, GAMMA, EPS, backend=backend)
    out["orth_combine"] = d
    ema = cp(x)
    out["lerp_sum_sq"] = ops.lerp_sum_sq_(ema, ys, THETA, backend=backend)
    out["lerp"] = ema
    acc = cp(x)
    ops.axpby_(acc, ys, A, B, backend=backend)
    out["axpby"] = acc
    copy = [nan_like(t, make) for t in x]  # b == 0: ys is not read, NaN must not leak
    ops.axpby_(copy, ys, A_COPY, 0.0, backend=backend)
    out["axpby_b=0"] = copy
    out["inputs_xs"], out["inputs_ys"] = xs, ys
    return out


def reference_outputs(x, y):
    """The same ops per tensor in float64, written out from the formulas."""
    X = [t.double() for t in x]
    Y = [t.double() for t in y]
    total = lambda ts: sum((t.sum() for t in ts), torch.zeros((), dtype=torch.float64,  # noqa
                                                               device=x[0].device))
    scale = RHO / (math.sqrt(SUM_SQ) + EPS)
    m_norm, d_norm = math.sqrt(STATS[1]), math.sqrt(STATS[2])
    coef = STATS[0] / (m_norm * d_norm + EPS) * m_norm / (d_norm + EPS)
    lerp = [(1 - THETA) * e + THETA * g for e, g in zip(X, Y)]
    stored = [v.to(t.dtype).double() for v, t in zip(lerp, x)]
    return {
        "sum_sq": (total(t * t for t in X), total(t * t for t in X)),
        "sum_sq_weighted": (total(((w.abs() + ETA) * t) ** 2 for t, w in zip(X, Y)),) * 2,
        "dot_sum_sq": (torch.stack([total(a * b for a, b in zip(X, Y)),
                                    total(a * a for a in X), total(b * b for b in Y)]),
                       torch.stack([total((a * b).abs() for a, b in zip(X, Y)),
                                    total(a * a for a in X), total(b * b for b in Y)])),
        "perturb_adaptive=False": [p + scale * d for p, d in zip(X, Y)],
        "perturb_adaptive=True": [p + scale * (p.abs() + ETA) ** 2 * d for p, d in zip(X, Y)],
        "perturb_no_backup": [p + scale * d for p, d in zip(X, Y)],
        "orth_combine": [d - GAMMA * (m - coef * d) for d, m in zip(X, Y)],
        "lerp": lerp,
        "lerp_sum_sq": (total(v * v for v in stored),) * 2,
        "axpby": [A * g + B * e for e, g in zip(X, Y)],
        "axpby_b=0": [A_COPY * g for g in Y],
    }


def check_against_reference(out, x, y):
    ref = reference_outputs(x, y)
    all_fp64 = all(t.dtype == torch.float64 for t in x)
    result_dtype = torch.float64 if any(t.dtype == torch.float64 for t in x) else torch.float32
    for name, expected in ref.items():
        actual = out[name]
        if isinstance(expected, tuple):  # reduction: (value, sum of |terms| as its scale)
            value, magnitude = expected
            assert actual.dtype == result_dtype, name
            assert actual.device == x[0].device, name
            tol = SUM_TOL[all_fp64]
            if name == "lerp_sum_sq":  # of values rounded to the input dtype
                tol = max([tol] + [ELEMENT_TOL[t.dtype] for t in x])
            err = (actual.double() - value).abs()
            assert bool((err <= tol * magnitude + 1e-30).all()), (name, actual, value)
            continue
        for i, (a, e) in enumerate(zip(actual, expected)):
            tol = ELEMENT_TOL[a.dtype]
            err = (a.double() - e).abs()
            worst = float((err - tol * (1 + e.abs())).max()) if a.numel() else 0.0
            assert worst <= 0, f"{name}[{i}] ({a.dtype}, {tuple(a.shape)}): error too large"
    for adaptive in (False, True):  # backups are exact copies of the parameters
        for b, t in zip(out[f"backup_adaptive={adaptive}"], x):
            assert torch.equal(b, t)
    for r, t in zip(out["restore"], x):
        assert torch.equal(r, t)


# ------------------------------------------------------------------------- GPU runtime tests
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views_take_the_scalar_path(dtype):
    # Odd sizes, one element, a tensor over two chunks (65536 elements each), an empty one.
    shapes = [(1000,), (3, 257), (1,), (65536 + 4099,), (0,), (5,)]
    x = random_list(shapes, [dtype], "cuda")
    y = random_list(shapes, [dtype], "cuda")
    misaligned = run_every_op(x, y, offset_copy, "cuda", "cuda")
    assert all(t.data_ptr() % 16 != 0 for t in misaligned["inputs_xs"] if t.numel())
    check_against_reference(misaligned, x, y)
    aligned = run_every_op(x, y, aligned_copy, "cuda", "cuda")
    assert all(t.data_ptr() % 16 == 0 for t in aligned["inputs_xs"] if t.numel())
    check_against_reference(aligned, x, y)


# One launch's argument table holds 158 / 119 / 95 tensors at depth 1 / 2 / 3 (see
# max_tensors_per_launch in csrc/cuda/multi_tensor_apply.cuh); a launch covers every chunk of its
# tensors.
MAX_TENSORS_PER_LAUNCH = {1: 158, 2: 119, 3: 95}


def _kernel_launches(fn, name="multi_tensor_kernel"):
    """CUDA kernels whose name contains `name` that `fn()` launched (from the profiler)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if name in e.name and e.device_type.name == "CUDA")


@requires_cuda
def test_lists_longer_than_one_launch():
    # 4 dtypes x 230 tensors (~205 non-empty): every dtype group needs 2 launches at depths 1,
    # 2 and 3, for every op. Sizes cycle with period 9 and misaligned copies with period 5
    # (both coprime with the 4 dtypes), so each dtype group gets every size, multi-chunk
    # tensors (65537, 200_003, 131_073 elements) and misaligned tensors on both sides of its
    # launch boundaries.
    sizes = [1, 7, 4096, 65537, 3, 200_003, 0, 65536, 131_073]
    n = 4 * 230
    shapes = [(sizes[i % len(sizes)],) for i in range(n)]
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    x = random_list(shapes, dtypes, "cuda")
    y = random_list(shapes, dtypes, "cuda")
    index = iter(range(10**9))
    mixed = lambda t: offset_copy(t) if next(index) % 5 == 0 else t.clone()  # noqa: E731
    out = run_every_op(x, y, mixed, "cuda", "cuda")
    check_against_reference(out, x, y)
    # the launches really split: per dtype group, ceil(non-empty tensors / table size)
    per_group = [sum(1 for i in range(g, n, 4) if sizes[i % len(sizes)]) for g in range(4)]
    expect = {d: sum(-(-k // MAX_TENSORS_PER_LAUNCH[d]) for k in per_group) for d in (1, 2, 3)}
    assert min(expect.values()) >= 8
    xs, ys = out["inputs_xs"], out["inputs_ys"]
    assert _kernel_launches(lambda: ops.sum_sq(xs, backend="cuda")) == expect[1]
    assert _kernel_launches(lambda: ops.axpby_(xs, ys, 1.0, 0.5, backend="cuda")) == expect[2]
    backup = [torch.empty_like(t) for t in xs]
    s = torch.tensor(SUM_SQ, device="cuda")
    assert _kernel_launches(lambda: ops.perturb_(xs, ys, s, RHO, EPS, backup=backup,
                                                 backend="cuda")) == expect[3]


@requires_cuda
def test_one_launch_covers_more_blocks_than_the_gpu_keeps_resident():
    """200 tensors of 8 chunks (1600 blocks, more than 132 SMs x 4 blocks): one launch per
    119 tensors at depth 2, not one per 320 blocks."""
    x = random_list([(8 * 65536 - 3,)] * 200, [torch.float32], "cuda")
    y = random_list([(8 * 65536 - 3,)] * 200, [torch.float32], "cuda")
    assert _kernel_launches(lambda: ops.dot_sum_sq(x, y, backend="cuda")) == 2
    got = ops.dot_sum_sq(x, y, backend="cuda")
    expected = torch.stack([sum((a.double() * b.double()).sum() for a, b in zip(x, y)),
                            sum(a.double().square().sum() for a in x),
                            sum(b.double().square().sum() for b in y)])
    scale = torch.stack([sum((a.double() * b.double()).abs().sum() for a, b in zip(x, y)),
                         expected[1], expected[2]])
    assert bool(((got.double() - expected).abs() <= SUM_TOL[False] * scale).all())


@requires_cuda
def test_reductions_are_bitwise_deterministic():
    shapes = [(200_003,), (65536,), (777,)] * 30
    x = random_list(shapes, [torch.float32, torch.bfloat16], "cuda")
    y = random_list(shapes, [torch.float32, torch.bfloat16], "cuda")
    first = (ops.sum_sq(x, backend="cuda"), ops.sum_sq(x, y, ETA, backend="cuda"),
             ops.dot_sum_sq(x, y, backend="cuda"))
    for _ in range(10):
        again = (ops.sum_sq(x, backend="cuda"), ops.sum_sq(x, y, ETA, backend="cuda"),
                 ops.dot_sum_sq(x, y, backend="cuda"))
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    emas = [[t.clone() for t in x] for _ in range(3)]
    sums = [ops.lerp_sum_sq_(e, y, THETA, backend="cuda") for e in emas]
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])


@requires_cuda
def test_int64_indexing_past_2_31_elements():
    n = 2**31 + 4099  # the last chunks start past 2^31 elements; odd tail
    need = 2 * 2 * n + 5 * (1 << 30)  # two fp16 tensors + float64 reference scratch
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.randn(n, device="cuda", dtype=torch.float16)
    y = torch.randn(n, device="cuda", dtype=torch.float16)
    step = 1 << 28
    expected = sum(x[i:i + step].double().square().sum() for i in range(0, n, step))
    got = ops.sum_sq([x], backend="cuda")
    assert abs(float(got) - float(expected)) <= SUM_TOL[False] * float(expected)
    ends = (slice(0, 70_000), slice(n - 70_000, n))
    before = [(y[s].double(), x[s].double()) for s in ends]
    ops.axpby_([y], [x], A, B, backend="cuda")
    for s, (y0, x0) in zip(ends, before):
        expected_y = A * x0 + B * y0
        assert bool(((y[s].double() - expected_y).abs()
                     <= ELEMENT_TOL[torch.float16] * (1 + expected_y.abs())).all())


@requires_cuda
def test_kernels_run_on_the_current_stream():
    shapes = [(300_000,), (1000,), (65537,)]
    x = random_list(shapes, [torch.float32], "cuda")
    new = [t + 1 for t in x]
    p = random_list(shapes, [torch.float32], "cuda")
    d = random_list(shapes, [torch.float32], "cuda")
    expected_p = [a + B * b for a, b in zip(p, d)]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # Streams from torch's pool do not synchronize with the default stream: a kernel
        # launched there instead would run before the copies below and read the old values.
        torch.cuda._sleep(200_000_000)
        for t, v in zip(x, new):
            t.copy_(v)
        for t in d:
            t.mul_(B)
        got = ops.sum_sq(x, backend="cuda")
        ops.axpby_(p, d, 1.0, 1.0, backend="cuda")
    side.synchronize()
    expected = sum(float(t.double().square().sum()) for t in new)
    assert abs(float(got) - expected) <= SUM_TOL[False] * expected
    for a, e in zip(p, expected_p):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@requires_cuda
def test_sam_step_captures_in_a_cuda_graph():
    shapes = [(1000,), (3, 257), (70_001,)]
    params = random_list(shapes, [torch.float32], "cuda")
    grads = random_list(shapes, [torch.float32], "cuda")
    original = [t.clone() for t in params]
    backup = [torch.full_like(t, float("nan")) for t in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        ops.sum_sq(grads, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails if a kernel goes to another stream or syncs
        norm_sq = ops.sum_sq(grads, backend="cuda")
        ops.perturb_(params, grads, norm_sq, RHO, EPS, backup=backup, backend="cuda")
    assert all(torch.equal(p, o) for p, o in zip(params, original))  # capture ran nothing
    graph.replay()
    torch.cuda.synchronize()
    g_sq = sum(float(g.double().square().sum()) for g in grads)
    scale = RHO / (math.sqrt(g_sq) + EPS)
    for p, o, g, b in zip(params, original, grads, backup):
        torch.testing.assert_close(p.double(), o.double() + scale * g.double(),
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(b, o)


@requires_cuda
def test_no_host_synchronization():
    shapes = [(1000,), (70_001,)]
    x = random_list(shapes, [torch.float32, torch.bfloat16], "cuda")
    y = random_list(shapes, [torch.float32, torch.bfloat16], "cuda")
    p = [t.clone() for t in x]
    backup = [torch.empty_like(t) for t in x]
    s = torch.tensor(SUM_SQ, device="cuda")
    stats = torch.tensor(STATS, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = ops.sum_sq(y, backend="cuda")
        ops.sum_sq(y, x, ETA, backend="cuda")
        ops.dot_sum_sq(x, y, backend="cuda")
        ops.perturb_(p, y, norm, RHO, EPS, adaptive=True, eta=ETA, backup=backup,
                     backend="cuda")
        ops.perturb_(p, y, s, RHO, EPS, backend="cuda")
        ops.restore_(p, backup, backend="cuda")
        ops.orth_combine_(p, y, stats, GAMMA, EPS, backend="cuda")
        ops.lerp_sum_sq_(p, y, THETA, backend="cuda")
        ops.axpby_(p, y, A, B, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@requires_cuda
def test_scalar_on_another_device_is_rejected_and_changes_nothing():
    p = random_list([(100,), (7,)], [torch.float32], "cuda")
    d = random_list([(100,), (7,)], [torch.float32], "cuda")
    before = [t.clone() for t in p]
    with pytest.raises(ValueError, match="perturb_: sum_sq is on cpu"):
        ops.perturb_(p, d, torch.tensor(1.0), RHO, EPS, backend="cuda")
    with pytest.raises(ValueError, match="orth_combine_: stats is on cpu"):
        ops.orth_combine_(p, d, torch.tensor(STATS), GAMMA, EPS, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(p, before))


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_two_gpus_are_rejected():
    xs = [torch.randn(10, device="cuda:0"), torch.randn(10, device="cuda:1")]
    with pytest.raises(ValueError, match=r"xs\[1\] is on cuda:1 .*one device"):
        ops.sum_sq(xs, backend="cuda")


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_tensors_device_not_the_current_one():
    x = random_list([(70_001,), (33,)], [torch.float32], "cuda:1")
    with torch.cuda.device(0):
        got = ops.sum_sq(x, backend="cuda")
    assert got.device == torch.device("cuda:1")
    expected = sum(float(t.double().square().sum()) for t in x)
    assert abs(float(got) - expected) <= SUM_TOL[False] * expected


# ------------------------------------------------------------------------ tests without a GPU
def _function_names(header: Path):
    return re.findall(r"SK_HOST_DEVICE\s+\w+\s+(\w+)\s*\(", header.read_text())


def _calls(sources, name):
    return any(re.search(rf"\b{name}\s*(<[^>]*>)?\s*\(", s) for s in sources)


def test_cpu_and_cuda_compile_the_same_element_maths():
    """One header, two backends: every formula of element_math.h is called by both the CPU and
    the CUDA sources, which include it and do not re-implement the formulas' building blocks."""
    header = ROOT / "csrc" / "include" / "sam_kernels" / "element_math.h"
    formulas = [n for n in _function_names(header) if not n.startswith("sk_")]
    assert {"perturb_scale", "perturbed", "orth_coefficient", "orth_combined", "lerped",
            "axpby", "weighted_square"} <= set(formulas)
    assert "__host__ __device__" in header.read_text()
    for backend in ("cpu", "cuda"):
        files = [p for p in (ROOT / "csrc" / backend).iterdir()
                 if p.suffix in (".cpp", ".cu", ".cuh", ".h")]
        sources = [p.read_text() for p in files]
        assert any('#include "sam_kernels/element_math.h"' in s for s in sources), backend
        missing = [n for n in formulas if not _calls(sources, n)]
        assert not missing, f"csrc/{backend} does not call {missing} from element_math.h"
    cuda_sources = "\n".join(p.read_text() for p in (ROOT / "csrc" / "cuda").iterdir())
    # The formulas' square roots, absolute values and (1 - theta) live in the header only.
    for pattern in (r"\bsqrtf?\s*\(", r"\bfabsf?\s*\(", r"\babs\s*\(", r"1\s*-\s*theta"):
        assert not re.search(pattern, cuda_sources), f"csrc/cuda re-implements {pattern}"


def test_cuda_build_registers_every_op():
    if not _extension.load():
        pytest.skip(f"extension not loaded: {_extension.error()}")
    if not _extension.has_kernel("sum_sq", "CUDA"):
        pytest.skip("the extension was built without CUDA (CPU torch or no nvcc); "
                    ".ci/cuda_compile_check.sh builds and checks the CUDA variant")
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sam_kernels::")]
    assert len(names) >= 7
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"
