"""The Triton backend's own mechanics (the op contract itself is tests/test_ops.py, on every
backend): launches per call independent of the tensor count, the pointer-table cache, the
multi-block paths at small block sizes, the block-size setting, the clear error without the
interpreter, the kernels compiling for a real GPU target, and the `python -m sam_kernels.check`
self-check. Runs on CUDA tensors with a GPU, else on CPU tensors under TRITON_INTERPRET=1."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sam_kernels.ops import _registry

if torch.cuda.is_available() and _registry.unavailable_reason("triton", "cuda") is None:
    DEVICE = "cuda"
elif _registry.unavailable_reason("triton", "cpu") is None:
    DEVICE = "cpu"
else:
    DEVICE = None
needs_triton = pytest.mark.skipif(DEVICE is None, reason="the triton backend cannot run here "
                                  "(no GPU, and TRITON_INTERPRET=1 is not set)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Output tolerances against fp64 maths: the kernels compute in fp32/fp64 and round once on store
# (the interpreter truncates to bf16: < 1 ulp = 2^-7 relative).
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _tk():
    from sam_kernels.ops import triton_kernels
    return triton_kernels


def _subprocess(code: str, env_drop=(), env_set=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(env_set or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture
def tk():
    module = _tk()
    module.clear_cache()
    yield module
    module.set_block_size(None)


class LaunchRecorder:
    """Records every real Triton kernel launch (wraps the kernel class's `run`): kernel name and
    grid. With `execute=False` the kernels are not run (counting only; outputs are garbage)."""

    def __init__(self, monkeypatch, execute=True):
        self.calls = []
        kernel_type = type(_tk().reductions._finalize_kernel)
        original = kernel_type.run
        recorder = self

        def recording_run(kernel, *args, grid, warmup, **kwargs):
            recorder.calls.append((kernel.fn.__name__, tuple(grid)))
            if execute:
                return original(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(kernel_type, "run", recording_run)

    def counts(self):
        counts = {}
        for name, _ in self.calls:
            counts[name] = counts.get(name, 0) + 1
        return counts


def _randn(shapes, dtype=torch.float32):
    return [torch.randn(s, device=DEVICE).to(dtype) for s in shapes]


def _close(actual: torch.Tensor, expected64: torch.Tensor, dtype) -> None:
    tol = TOL[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double().cpu(), expected64.cpu(), rtol=tol, atol=tol)


def _close_sum(actual: torch.Tensor, expected64: torch.Tensor, xs) -> None:
    """A reduction of fp32 inputs: the contract's result dtype, fp32-accumulation accuracy."""
    from sam_kernels.ops import _checks
    assert actual.dtype == _checks.reduction_dtype(xs)
    torch.testing.assert_close(actual.double().cpu(), expected64.cpu(), rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------------------- launch counts
def _call_every_op(tk, xs, ys, ps):
    """Each primitive once on the lists; returns what the primitives returned."""
    s = tk.sum_sq(xs, [], 0.0)
    w = tk.sum_sq(xs, ys, 0.1)
    stats = tk.dot_sum_sq(xs, ys)
    backup = [torch.empty_like(p) for p in ps]
    tk.perturb_(ps, xs, s, 0.05, 1e-12, True, 0.01, backup)
    tk.restore_(ps, backup)
    tk.orth_combine_(ps, xs, stats, 0.3, 1e-12)
    lerp = tk.lerp_sum_sq_(ps, ys, 0.1)
    tk.axpby_(ps, xs, 0.5, 0.0)
    return s, w, stats, lerp


@needs_triton
@pytest.mark.parametrize("count", [1, 10, 300])
def test_launches_per_op_do_not_grow_with_tensor_count(tk, monkeypatch, count):
    """Counted, not run (300 tensors are 300 programs per op, slow in the interpreter): the
    launches each op makes and the grid each launch covers."""
    launches = LaunchRecorder(monkeypatch, execute=False)
    shapes = [(1 + i % 3,) for i in range(count)]  # each tensor fits one block
    xs, ys, ps = _randn(shapes), _randn(shapes), _randn(shapes)
    _call_every_op(tk, xs, ys, ps)
    # one launch per op (one dtype group) + one finalize per reduction, whatever the count
    assert launches.counts() == {
        "_sum_sq_kernel": 2, "_dot_sum_sq_kernel": 1, "_perturb_kernel": 1,
        "_restore_kernel": 1, "_orth_combine_kernel": 1, "_lerp_sum_sq_kernel": 1,
        "_axpby_kernel": 1, "_finalize_kernel": 4}
    for name, grid in launches.calls:  # ... each covering every tensor: one program apiece
        assert grid == ((1,) if name == "_finalize_kernel" else (count,)), name


@needs_triton
def test_many_tensors_in_one_launch(tk, monkeypatch):
    launches = LaunchRecorder(monkeypatch)
    shapes = [(1 + i % 5,) for i in range(300)]
    xs, ys = _randn(shapes), _randn(shapes)
    ys_before = [y.double() for y in ys]
    total = tk.sum_sq(xs, [], 0.0)
    tk.axpby_(ys, xs, 0.5, -2.0)
    assert launches.counts() == {"_sum_sq_kernel": 1, "_finalize_kernel": 1, "_axpby_kernel": 1}
    _close_sum(total, sum((x.double() ** 2).sum() for x in xs), xs)
    for y, x, y0 in zip(ys, xs, ys_before):
        _close(y, 0.5 * x.double() - 2.0 * y0, torch.float32)


# ---------------------------------------------------------------------------- table cache
@needs_triton
def test_table_cache_hit_while_storages_unchanged_rebuilt_when_they_change(tk):
    xs = _randn([(7,), (40,), (3, 5)])
    first = tk.sum_sq(xs, [], 0.0)
    assert tk.cache_info()["misses"] == 1 and tk.cache_info()["hits"] == 0
    xs[0].mul_(2.0)  # new values, same storage: the table still applies
    second = tk.sum_sq(xs, [], 0.0)
    assert tk.cache_info() == {"hits": 1, "misses": 1, "size": 1, "held_by_graphs": 0}
    _close_sum(second, sum((x.double() ** 2).sum() for x in xs), xs)
    assert second.item() > first.item()

    old = xs[1]  # kept alive, so its address cannot be reused and a stale table would read it
    xs[1] = torch.full((40,), 3.0, device=DEVICE)
    third = tk.sum_sq(xs, [], 0.0)
    assert tk.cache_info()["misses"] == 2
    _close_sum(third, sum((x.double() ** 2).sum() for x in xs), xs)
    assert old.data_ptr() != xs[1].data_ptr()


@needs_triton
def test_exact_restore_keeps_the_tables_of_a_step_cached(tk):
    params, grads = _randn([(33,), (4, 4)]), _randn([(33,), (4, 4)])
    backups = [torch.empty_like(p) for p in params]
    for step in range(3):
        s = tk.sum_sq(grads, [], 0.0)
        tk.perturb_(params, grads, s, 0.05, 1e-12, False, 0.0, backups)
        tk.restore_(params, backups)
    # three distinct list combinations (grads; params+grads+backups; params+backups), built once
    assert tk.cache_info()["misses"] == 3 and tk.cache_info()["hits"] == 6


@needs_triton
def test_table_layout(tk):
    from sam_kernels.ops.triton_kernels import utils
    a, b = _randn([(0,), (17,), (16,), (1,)]), _randn([(0,), (17,), (16,), (1,)])
    t = utils.build_table([a, b], 16)
    host = t.table.cpu().tolist()
    n = 4
    assert t.n_tensors == n and t.n_programs == 2 + 1 + 1  # ceil(17/16) + 1 + 1, none for 0
    assert host[:n] == [x.data_ptr() for x in a] and host[n:2 * n] == [x.data_ptr() for x in b]
    assert host[2 * n:3 * n] == [0, 17, 16, 1]
    assert host[3 * n:] == [1, 0, 1, 1, 2, 0, 3, 0]  # (tensor, block) per program
    assert t.aligned == all(x.data_ptr() % 16 == 0 for x in a[1:] + b[1:])


class _FakeCuda:
    """A dispatch mode that lets a CPU-only torch pretend to have a GPU for host-side code:
    CUDA allocations and pinned buffers become CPU tensors, every op is recorded (op, args,
    kwargs). Used to check what a table upload does on a GPU machine."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode
        monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)
        calls = self.calls = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = dict(kwargs or {})
                calls.append((func, args, dict(kwargs)))
                if kwargs.get("pin_memory"):
                    kwargs["pin_memory"] = False
                if getattr(kwargs.get("device"), "type", None) == "cuda":
                    kwargs["device"] = torch.device("cpu")
                if func is torch.ops.aten.copy_.default:
                    return func(args[0], args[1])
                return func(*args, **kwargs)
        self.mode = Mode()


def test_table_upload_does_not_synchronize(monkeypatch):
    """On a table-cache miss the table reaches the GPU through a pinned buffer and a
    non-blocking copy: no pageable host->device copy (`host.to(device)`, a
    cudaStreamSynchronize) and no read of a device value; the pinned buffer stays with the
    table. Checked with a faked CUDA device (the GPU tests repeat it under sync-debug mode)."""
    from sam_kernels.ops.triton_kernels import utils
    xs = [torch.randn(5), torch.randn(40)]
    fake = _FakeCuda(monkeypatch)
    with fake.mode:
        t = utils.build_table([xs], 16, device=torch.device("cuda"))
    ops_seen = [(f, kw) for f, _, kw in fake.calls]
    pinned = [kw for f, kw in ops_seen if f is torch.ops.aten.empty.memory_format
              and kw.get("pin_memory")]
    on_gpu = [kw for f, kw in ops_seen if getattr(kw.get("device"), "type", None) == "cuda"]
    copies = [(args, kw) for f, args, kw in fake.calls if f is torch.ops.aten.copy_.default]
    assert len(pinned) == 1 and len(on_gpu) == 1, ops_seen
    assert on_gpu[0] is not None and "aten._to_copy" not in str([f for f, _ in ops_seen])
    # the last copy is pinned buffer -> device table, non-blocking
    args, kw = copies[-1]
    assert args[1] is t.staging and (len(args) > 2 and args[2] is True or kw.get("non_blocking"))
    assert not any(f is torch.ops.aten._local_scalar_dense.default for f, _ in ops_seen)
    assert t.table.tolist()[:2] == [x.data_ptr() for x in xs] and t.n_programs == 1 + 3


@needs_triton
def test_tables_used_in_a_graph_capture_outlive_the_cache(tk, monkeypatch):
    """A CUDA graph replays launches that read the device tables it captured: while capturing
    (faked here), the plans used are kept alive through LRU eviction and clear_cache(), until
    release_graph_tables(). (On a GPU: test_triton_graph_survives_clear_cache.)"""
    import gc
    import weakref
    from sam_kernels.ops.triton_kernels import utils
    monkeypatch.setattr(utils, "PLAN_CACHE_SIZE", 1)
    params, grads = _randn([(33,), (4, 4)]), _randn([(33,), (4, 4)])
    tk.sum_sq(grads, [], 0.0)  # cached before the capture: a hit inside it must be held too
    monkeypatch.setattr(utils, "graph_capturing", lambda device: True)
    s = tk.sum_sq(grads, [], 0.0)
    tk.perturb_(params, grads, s, 0.05, 1e-12, False, 0.0, [])
    monkeypatch.setattr(utils, "graph_capturing", lambda device: False)
    tables = [weakref.ref(g.table.table) for p in utils._held_by_graphs.values()
              for g in p.groups]
    assert len(tables) == 2 and tk.cache_info()["held_by_graphs"] == 2
    tk.restore_(params, [torch.zeros_like(p) for p in params])  # evicts (cache size 1)
    tk.clear_cache()
    gc.collect()
    assert all(r() is not None for r in tables)
    assert tk.cache_info()["held_by_graphs"] == 2
    assert utils.release_graph_tables() == 2
    gc.collect()
    assert all(r() is None for r in tables) and tk.cache_info()["held_by_graphs"] == 0


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_misaligned_view_costs_only_its_own_group_the_vector_path(tk, dtype):
    from sam_kernels.ops.triton_kernels import utils
    base = _randn([(101,)], dtype)[0]
    xs = [_randn([(50,)], dtype)[0], base[1:], _randn([(7,)], dtype)[0]]
    ys = _randn([(50,), (100,), (7,)], dtype)
    assert xs[0].data_ptr() % 16 == 0 and xs[2].data_ptr() % 16 == 0
    groups = utils.plan("test", [xs, ys], check=lambda: None).groups
    assert [(g.table.n_tensors, g.table.aligned) for g in groups] == [(2, True), (1, False)]
    stats = tk.dot_sum_sq(xs, ys)
    expected = torch.stack([sum((a.double() * b.double()).sum() for a, b in zip(xs, ys)),
                            sum((a.double() ** 2).sum() for a in xs),
                            sum((b.double() ** 2).sum() for b in ys)])
    _close_sum(stats, expected, xs)
    before = [y.double().clone() for y in ys]  # .double() of fp64 is the tensor itself
    tk.axpby_(ys, xs, 0.5, -1.5)
    for y, x, y0 in zip(ys, xs, before):
        _close(y, 0.5 * x.double() - 1.5 * y0, dtype)


@needs_triton
def test_axpby_b_that_is_zero_in_the_accumulation_type_is_zero(tk):
    """b = 1e-50 is 0 in fp32: ys is not read (as the C++/CUDA kernels do after their cast), so
    a NaN in ys does not leak; in fp64 it is not 0 and ys is read; 2^-149 is not 0 in fp32."""
    x32, x64 = _randn([(37,)]), _randn([(37,)], torch.float64)
    ys = [torch.full((37,), float("nan"), device=DEVICE)]
    tk.axpby_(ys, x32, 2.0, 1e-50)
    _close(ys[0], 2.0 * x32[0].double(), torch.float32)
    ys = [torch.full((37,), 1e300, device=DEVICE, dtype=torch.float64)]
    tk.axpby_(ys, x64, 2.0, 1e-300)
    _close(ys[0], 2.0 * x64[0] + 1.0, torch.float64)
    ys = [torch.full((37,), float("nan"), device=DEVICE)]
    tk.axpby_(ys, x32, 2.0, 2.0 ** -149)
    assert torch.isnan(ys[0]).all()
    if "cpu" in _registry.available_backends("cpu") and DEVICE == "cpu":
        from sam_kernels import ops
        for dtype, b in ((torch.float32, 1e-50), (torch.float32, 2.0 ** -149),
                         (torch.float64, 1e-320), (torch.bfloat16, 1e-46)):
            x = _randn([(9,)], dtype)
            outs = []
            for backend in ("cpu", "triton"):
                y = [torch.full((9,), float("nan"), dtype=dtype)]
                ops.axpby_(y, x, 1.5, b, backend=backend)
                outs.append(y[0])
            assert torch.equal(outs[0].isnan(), outs[1].isnan()), (dtype, b)


# ---------------------------------------------------------------------------- GPU only
requires_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (compiled Triton); "
                                  "tools/gpu_check.sh runs it")


def _warm_kernels(tk):
    """Compile every kernel (Triton JIT) on throwaway tensors, then forget their tables: what
    follows misses the table cache but compiles nothing."""
    xs = _randn([(100,), (5000,)]) + _randn([(100,)], torch.bfloat16)
    _call_every_op(tk, xs, [x.clone() for x in xs], [x.clone() for x in xs])
    torch.cuda.synchronize()
    tk.clear_cache()


@requires_gpu
@pytest.mark.parametrize("warm", [False, True], ids=["table-miss", "table-hit"])
def test_no_host_synchronization_on_the_gpu(tk, warm):
    """Under sync-debug mode "error" every op runs, on lists whose tables are not cached yet
    (the upload path) and on cached ones."""
    _warm_kernels(tk)
    shapes = [(1000,), (70_001,), (3, 257)]
    xs = _randn(shapes) + _randn(shapes, torch.bfloat16)
    ys, ps = [x.clone() for x in xs], [x.clone() for x in xs]
    if warm:
        _call_every_op(tk, xs, ys, ps)
    torch.cuda.synchronize()
    misses = tk.cache_info()["misses"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        _call_every_op(tk, xs, ys, ps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert (tk.cache_info()["misses"] == misses) == warm


@requires_gpu
def test_triton_graph_survives_clear_cache(tk):
    """Capture on lists never seen before (tables built inside the capture), clear the cache,
    allocate and fill memory where freed tables would have been, replay, compare with float64
    maths; then release the tables the graph held."""
    import math
    _warm_kernels(tk)
    shapes = [(1000,), (3, 257), (70_001,)]
    params, grads = _randn(shapes), _randn(shapes)
    original = [p.clone() for p in params]
    backup = [torch.full_like(p, float("nan")) for p in params]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm_sq = tk.sum_sq(grads, [], 0.0)
        tk.perturb_(params, grads, norm_sq, 0.05, 1e-12, False, 0.0, backup)
    assert all(torch.equal(p, o) for p, o in zip(params, original))  # capture ran nothing
    assert tk.cache_info()["held_by_graphs"] >= 2
    tk.clear_cache()
    filler = [torch.full((4096,), -1, dtype=torch.int64, device="cuda") for _ in range(256)]
    graph.replay()
    torch.cuda.synchronize()
    g_sq = sum(float(g.double().square().sum()) for g in grads)
    scale = 0.05 / (math.sqrt(g_sq) + 1e-12)
    for p, o, g, b in zip(params, original, grads, backup):
        _close(p, o.double() + scale * g.double(), torch.float32)
        assert torch.equal(b, o)
    del graph, filler
    assert tk.release_graph_tables() >= 2


@requires_gpu
def test_triton_reductions_over_more_than_2_31_elements(tk):
    sizes = (2**30 + 3, 2**30 + 4099, 5)  # 2^31 + 4107 elements in total
    need = 2 * 2 * sum(sizes) + (4 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    xs = [torch.randn(n, device="cuda", dtype=torch.float16) for n in sizes]
    ys = [torch.randn(n, device="cuda", dtype=torch.float16) for n in sizes]
    step = 1 << 28

    def total(fn):
        return sum(fn(a[i:i + step].double(), b[i:i + step].double()).sum()
                   for a, b in zip(xs, ys) for i in range(0, a.numel(), step))
    sq_x = total(lambda a, b: a * a)
    sq_y = total(lambda a, b: b * b)
    dot, dot_abs = total(lambda a, b: a * b), total(lambda a, b: (a * b).abs())
    got = tk.sum_sq(xs, [], 0.0)
    assert abs(float(got) - float(sq_x)) <= 1e-5 * float(sq_x)
    stats = tk.dot_sum_sq(xs, ys)
    bound = 1e-5 * torch.stack([dot_abs, sq_x, sq_y])
    assert bool(((stats.double() - torch.stack([dot, sq_x, sq_y])).abs() <= bound).all())


# ---------------------------------------------------------------------------- multi-block paths
def _expected_reduction(op, xs, ys):
    """Per-tensor fp64 sums of the reducing primitives, written independently of the kernels."""
    x, y = [t.double() for t in xs], [t.double() for t in ys]
    if op == "sum_sq":
        return sum((t ** 2).sum() for t in x)
    if op == "sum_sq_w":
        return sum((((w.abs() + 0.1) * t) ** 2).sum() for t, w in zip(x, y))
    return torch.stack([sum((a * b).sum() for a, b in zip(x, y)),
                        sum((a ** 2).sum() for a in x), sum((b ** 2).sum() for b in y)])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_block_paths_every_op(tk, dtype):
    """Block of 16 elements: tensors of 0, 1, 15, 16, 17 and 100 elements span 0 to 7 programs,
    with full (unmasked) and partial (masked) blocks."""
    tk.set_block_size(16)
    shapes = [(17,), (0,), (1,), (15,), (16,), (10, 10)]
    x, y, p = _randn(shapes, dtype), _randn(shapes, dtype), _randn(shapes, dtype)
    from sam_kernels.ops import _checks
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for op, got in (("sum_sq", tk.sum_sq(x, [], 0.0)), ("sum_sq_w", tk.sum_sq(x, y, 0.1)),
                    ("dot", tk.dot_sum_sq(x, y))):
        assert got.dtype == _checks.reduction_dtype(x)
        torch.testing.assert_close(got.double().cpu(), _expected_reduction(op, x, y).cpu(),
                                   rtol=rtol, atol=rtol)

    s = torch.tensor(2.5, device=DEVICE)
    for adaptive in (False, True):
        params = [t.clone() for t in p]
        backup = [torch.full_like(t, float("nan")) for t in p]
        tk.perturb_(params, x, s, 0.2, 1e-12, adaptive, 0.01, backup)
        for new, old, d, b in zip(params, p, x, backup):
            assert torch.equal(b, old)
            t = (old.double().abs() + 0.01) ** 2 if adaptive else 1.0
            _close(new, old.double() + 0.2 / (2.5 ** 0.5 + 1e-12) * t * d.double(), dtype)
        tk.restore_(params, backup)
        assert all(torch.equal(a, b) for a, b in zip(params, p))

    stats = torch.tensor([0.7, 2.0, 3.0], device=DEVICE, dtype=torch.float64)
    d = [t.clone() for t in x]
    tk.orth_combine_(d, y, stats, 0.3, 1e-12)
    m_norm, d_norm = 2.0 ** 0.5, 3.0 ** 0.5
    c = 0.7 / (m_norm * d_norm + 1e-12) * m_norm / (d_norm + 1e-12)
    for new, old, m in zip(d, x, y):
        _close(new, old.double() - 0.3 * (m.double() - c * old.double()), dtype)

    ema = [t.clone() for t in x]
    total = tk.lerp_sum_sq_(ema, y, 0.25)
    for new, old, g in zip(ema, x, y):
        _close(new, 0.75 * old.double() + 0.25 * g.double(), dtype)
    # the sum is of the values as stored (rounded to the tensor dtype)
    torch.testing.assert_close(total.double().cpu(),
                               sum((e.double() ** 2).sum() for e in ema).cpu(),
                               rtol=rtol, atol=rtol)

    ys = [torch.full_like(t, float("nan")) for t in x]  # b == 0: never read
    tk.axpby_(ys, x, -1.5, 0.0)
    for new, old in zip(ys, x):
        _close(new, -1.5 * old.double(), dtype)
    ys = [t.clone() for t in y]
    tk.axpby_(ys, x, 0.5, 2.0)
    for new, old, xx in zip(ys, y, x):
        _close(new, 0.5 * xx.double() + 2.0 * old.double(), dtype)


@needs_triton
def test_unaligned_views_and_channels_last(tk):
    """Data pointers off 16-byte alignment take the unaligned variant; a channels_last tensor
    is processed in memory order with its paired tensor of the same layout."""
    tk.set_block_size(16)
    base = torch.randn(101, device=DEVICE)
    view = base[1:]  # 4-byte offset
    cl = torch.randn(2, 3, 4, 5, device=DEVICE).to(memory_format=torch.channels_last)
    cl2 = torch.randn(2, 3, 4, 5, device=DEVICE).to(memory_format=torch.channels_last)
    from sam_kernels.ops.triton_kernels import utils
    assert not utils.build_table([[view]], 16).aligned
    stats = tk.dot_sum_sq([view, cl], [view, cl2])
    expected = [sum((a.double() * b.double()).sum() for a, b in ((view, view), (cl, cl2))),
                (view.double() ** 2).sum() + (cl.double() ** 2).sum(),
                (view.double() ** 2).sum() + (cl2.double() ** 2).sum()]
    _close_sum(stats, torch.stack(expected), [view, cl])
    before, view_old, cl_old = base[0].item(), view.double(), cl.double()
    tk.axpby_([view, cl], [view, cl2], 0.5, 2.0)  # y <- 0.5 x + 2 y
    assert base[0].item() == before  # the element in front of the view is untouched
    _close(view, 2.5 * view_old, torch.float32)
    _close(cl, 0.5 * cl2.double() + 2.0 * cl_old, torch.float32)


@needs_triton
def test_reductions_are_bitwise_reproducible(tk):
    tk.set_block_size(64)
    xs, ys = _randn([(300,), (133,), (7,)]), _randn([(300,), (133,), (7,)])
    first = [tk.sum_sq(xs, [], 0.0), tk.dot_sum_sq(xs, ys)]
    for _ in range(2):
        again = [tk.sum_sq(xs, [], 0.0), tk.dot_sum_sq(xs, ys)]
        assert all(torch.equal(a, b) for a, b in zip(first, again))


# ---------------------------------------------------------------------------- block size
def test_block_size_setting(monkeypatch):
    from sam_kernels.ops.triton_kernels import utils
    monkeypatch.delenv(utils.BLOCK_ENV_VAR, raising=False)
    utils.set_block_size(None)
    assert utils.get_block_size() == utils.DEFAULT_BLOCK
    monkeypatch.setenv(utils.BLOCK_ENV_VAR, "64")
    assert utils.get_block_size() == 64
    with utils.block_size(256):
        assert utils.get_block_size() == 256
    assert utils.get_block_size() == 64
    utils.set_block_size(32)
    assert utils.get_block_size() == 32
    utils.set_block_size(None)
    for bad in (100, 8, 1 << 14, 1 << 16, 64.0, True):
        with pytest.raises(ValueError, match="Invalid block_size value"):
            utils.set_block_size(bad)
    monkeypatch.setenv(utils.BLOCK_ENV_VAR, "many")
    with pytest.raises(ValueError, match=f"Invalid block_size value: 'many' \\(from "
                                         f"{utils.BLOCK_ENV_VAR}\\)"):
        utils.get_block_size()


@needs_triton
def test_fp64_groups_cap_the_block_at_32_kib(tk):
    """At the largest block an fp64 group runs 4096 elements per program (8192 needed stack
    under Triton 3.6), other dtypes the setting."""
    from sam_kernels.ops.triton_kernels import utils
    xs = _randn([(20_000,)]) + _randn([(20_000,)], torch.float64) + _randn([(20_000,)],
                                                                          torch.bfloat16)
    with tk.block_size(utils.MAX_BLOCK):
        groups = utils.plan("test", [xs], check=lambda: None).groups
    assert [(g.dtype, g.block, g.table.n_programs) for g in groups] == [
        (torch.float32, 8192, 3), (torch.float64, 4096, 5), (torch.bfloat16, 8192, 3)]


@needs_triton
def test_block_size_sets_programs_per_tensor(tk):
    from sam_kernels.ops.triton_kernels import utils
    xs = _randn([(100,), (33,)])
    for block, programs in ((16, 7 + 3), (64, 2 + 1), (128, 1 + 1)):
        with tk.block_size(block):
            plan = utils.plan("test", [xs], check=lambda: None)
            assert [g.table.n_programs for g in plan.groups] == [programs]
            _close_sum(tk.sum_sq(xs, [], 0.0), sum((x.double() ** 2).sum() for x in xs), xs)


# ---------------------------------------------------------------------------- errors
def test_cpu_tensors_without_the_interpreter_raise_a_clear_error():
    code = """
        import json, torch
        from sam_kernels import ops
        from sam_kernels.ops import _registry
        out = {"reason": _registry.unavailable_reason("triton", "cpu")}
        try:
            ops.sum_sq([torch.ones(3)], backend="triton")
        except ops.BackendUnavailableError as exc:
            out["ops"] = str(exc)
        try:
            import sam_kernels.ops.triton_kernels as tk
            tk.sum_sq([torch.ones(3)], [], 0.0)
        except RuntimeError as exc:
            out["direct"] = str(exc)
        except ImportError as exc:
            out["direct"] = "import: " + str(exc)
        print(json.dumps(out))
    """
    proc = _subprocess(code, env_drop=("TRITON_INTERPRET",))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "TRITON_INTERPRET=1" in out["reason"]
    assert "TRITON_INTERPRET=1" in out["ops"] and "triton" in out["ops"]
    if not out["direct"].startswith("import:"):  # triton installed: the raw call refuses too
        assert "TRITON_INTERPRET=1" in out["direct"] and "sum_sq" in out["direct"]


@needs_triton
def test_argument_errors_match_the_contract(tk):
    with pytest.raises(ValueError, match=r"sum_sq: xs\[0\] and weights\[0\] differ in shape"):
        tk.sum_sq(_randn([(3,)]), _randn([(4,)]), 0.0)
    params, dirs = _randn([(3,)]), _randn([(3,)])
    tk.perturb_(params, dirs, torch.ones((), device=DEVICE), 0.1, 1e-12, False, 0.0, [])
    # the same lists again (a cached, validated plan): the device scalar is still checked
    with pytest.raises(ValueError, match="perturb_: sum_sq must have 1 element"):
        tk.perturb_(params, dirs, torch.zeros(2, device=DEVICE), 0.1, 1e-12, False, 0.0, [])
    with pytest.raises(ValueError,
                       match="orth_combine_: stats must be (a dense )?float32 or float64"):
        tk.orth_combine_(params, dirs, torch.zeros(3, device=DEVICE, dtype=torch.float16),
                         0.1, 1e-12)
    ys = _randn([(3,)])
    before = ys[0].clone()
    with pytest.raises(ValueError, match=r"axpby_: ys\[0\] and xs\[0\] differ in dtype"):
        tk.axpby_(ys, _randn([(3,)], torch.float64), 1.0, 1.0)
    assert torch.equal(ys[0], before)


@needs_triton
def test_torch_compile_traces_the_custom_ops(tk):
    params, grads = _randn([(5,), (40,)]), _randn([(5,), (40,)])
    eager_params = [p.clone() for p in params]

    def step(ps, gs):
        s = tk.sum_sq(gs, [], 0.0)
        tk.perturb_(ps, gs, s, 0.05, 1e-12, False, 0.0, [])
        return s

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1 = compiled(params, grads)
    s2 = step(eager_params, grads)
    assert torch.equal(s1, s2)
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))
    assert not torch.equal(params[0], eager_params[0] * 0)  # perturbed, not zeroed


# ---------------------------------------------------------------------------- GPU compilation
_COMPILE_SCRIPT = """
    import json, re
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sam_kernels.ops.triton_kernels import elementwise, reductions

    POINTERS = {"table": "*i64", "partials": "*fp64", "out": "*fp32", "sum_sq_ptr": "*fp32",
                "stats_ptr": "*fp32"}
    N_LISTS = {"_perturb_kernel": 3}
    EXTRA = dict(WEIGHTED=True, ADAPTIVE=True, HAS_BACKUP=True, B_IS_ZERO=False, N_OUT=3,
                 FBLOCK=1024)
    kernels = [reductions._sum_sq_kernel, reductions._dot_sum_sq_kernel,
               reductions._lerp_sum_sq_kernel, reductions._finalize_kernel,
               elementwise._perturb_kernel, elementwise._restore_kernel,
               elementwise._orth_combine_kernel, elementwise._axpby_kernel]
    results = {}
    for kernel in kernels:
        for dtype in (tl.float32, tl.bfloat16, tl.float64):
            name = kernel.fn.__name__
            if name == "_finalize_kernel" and dtype != tl.float32:
                continue
            acc = tl.float64 if dtype == tl.float64 else tl.float32
            meta = dict(EXTRA, N_LISTS=N_LISTS.get(name, 2), DTYPE=dtype, ACC=acc,
                        ALIGNED=True, BLOCK=4096)
            signature, constexprs = {}, {}
            for p in kernel.params:
                if p.is_constexpr:
                    signature[p.name] = "constexpr"
                    constexprs[p.name] = meta[p.name]
                else:
                    signature[p.name] = p.annotation or POINTERS.get(p.name, "i32")
            compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 8, "enable_fp_fusion": True})
            ptx = compiled.asm["ptx"]
            results[f"{name}/{dtype}"] = sorted(set(re.findall(r"ld\\.global\\.v4|st\\.global\\.v4",
                                                             ptx)))
    # The largest block of each dtype (utils.group_block(MAX_BLOCK)) must not spill registers
    # to local memory: the stack size of the compiled kernel, from Triton's cuobjdump.
    import os, subprocess, tempfile, torch
    from sam_kernels.ops.triton_kernels import utils
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    stacks = {}
    for kernel in (elementwise._perturb_kernel, reductions._dot_sum_sq_kernel,
                   reductions._lerp_sum_sq_kernel):
        for dtype, tdtype in ((tl.float32, torch.float32), (tl.float64, torch.float64)):
            if not os.path.exists(cuobjdump):
                break
            name = kernel.fn.__name__
            block = utils.group_block(utils.MAX_BLOCK, tdtype)
            acc = tl.float64 if dtype == tl.float64 else tl.float32
            meta = dict(EXTRA, N_LISTS=N_LISTS.get(name, 2), DTYPE=dtype, ACC=acc,
                        ALIGNED=True, BLOCK=block)
            signature = {p.name: "constexpr" if p.is_constexpr else
                         (p.annotation or POINTERS.get(p.name, "i32")) for p in kernel.params}
            constexprs = {p.name: meta[p.name] for p in kernel.params if p.is_constexpr}
            compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": utils.num_warps(block),
                                               "enable_fp_fusion": True})
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
            os.unlink(f.name)
            stacks[f"{name}/{dtype}/{block}"] = [int(x) for x in re.findall(r"STACK:(\\d+)",
                                                                           usage)]
    print(json.dumps({"vector": results, "stack": stacks}))
"""


def test_kernels_compile_for_a_gpu_target_with_vector_accesses():
    """The interpreter runs Python, not the compiler: compile every kernel for sm_90 (no GPU
    needed, Triton ships ptxas) and check full blocks of aligned tensors use 16-byte accesses."""
    pytest.importorskip("triton")
    proc = _subprocess(_COMPILE_SCRIPT, env_drop=("TRITON_INTERPRET",),
                       env_set={"TRITON_DEFAULT_FP_FUSION": "1"})
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's CUDA toolchain (ptxas) is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = json.loads(proc.stdout.strip().splitlines()[-1])
    results = both["vector"]
    # no spills at the largest blocks (fp64 capped at 4096; 65536 spilled KiBs)
    assert all(stack == [0] for stack in both["stack"].values()), both["stack"]
    assert len(both["stack"]) in (0, 6)
    assert len(results) == 7 * 3 + 1
    for name, accesses in results.items():
        if name.startswith("_finalize_kernel"):
            continue
        if "float64" in name or "fp64" in name:
            continue  # 8-byte elements: v2.b64 rather than v4
        assert "ld.global.v4" in accesses, name
        if name.split("/")[0] in ("_perturb_kernel", "_restore_kernel", "_orth_combine_kernel",
                                  "_lerp_sum_sq_kernel", "_axpby_kernel"):
            assert "st.global.v4" in accesses, name


# ---------------------------------------------------------------------------- self-check
@pytest.fixture(params=[False, True], ids=["no-gpu", "fake-gpu"])
def gpu_visible(request, monkeypatch):
    """The self-check as it runs here and as it runs on a GPU machine: `torch.cuda` claims a
    device (the checks below ask only for the CPU backend, which must still run on CPU)."""
    if request.param:
        import types
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
            name="Fake GPU", major=9, minor=0, total_memory=80 * 2**30))
    return request.param


def test_self_check_passes_for_the_cpu_backend(capsys, gpu_visible, tmp_path):
    if "cpu" not in _registry.available_backends("cpu"):
        pytest.skip("the compiled CPU backend is not built")
    from sam_kernels.check import main
    assert main(["--backend", "cpu", "--no-timing", "--json", str(tmp_path / "c.json")]) == 0
    stdout = capsys.readouterr().out
    assert ("Fake GPU" in stdout) == gpu_visible
    rows = [line.split() for line in stdout.splitlines() if line.startswith("cpu ")]
    checks = {row[2] for row in rows}
    assert {"sum_sq", "dot_sum_sq", "perturb_(backup)", "restore_", "orth_combine_",
            "lerp_sum_sq_", "axpby_", "SAM"} <= checks
    for row in rows:
        assert row[1] == "cpu" and "FAIL" not in row and "PASS" in row, row
    assert "checks passed" in stdout and "FAIL" not in stdout
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["passed"] and report["rows"]
    assert {r["device"] for r in report["rows"]} == {"cpu"} and all(
        r["passed"] for r in report["rows"])


def test_self_check_fails_for_a_broken_backend(monkeypatch, gpu_visible):
    if "cpu" not in _registry.available_backends("cpu"):
        pytest.skip("the compiled CPU backend is not built")
    from sam_kernels import check
    from sam_kernels.ops import compiled
    real = compiled.dot_sum_sq
    monkeypatch.setattr(compiled, "dot_sum_sq", lambda a, b: real(a, b) * 1.001)
    lines = []
    status = check.run(["cpu"], timing=False, out=lines.append)
    assert status == 1
    table = {(line.split()[0], line.split()[2]): line.split()[3:]
             for line in lines if line.startswith("cpu ")}
    assert table[("cpu", "dot_sum_sq")] == ["FAIL"] * 5
    assert table[("cpu", "sum_sq")] == ["PASS"] * 5
    assert any(line.startswith("FAIL cpu dot_sum_sq") for line in lines)


def test_self_check_reports_a_requested_backend_that_cannot_run(gpu_visible):
    """`--backend cuda` with no CUDA kernels (or no GPU): exit status 1 and the reason, no
    KeyError and no silent pass."""
    if _registry.unavailable_reason("cuda", "cuda") is None:
        pytest.skip("the CUDA backend runs here")
    from sam_kernels import check
    lines = []
    assert check.run(["cuda"], timing=False, out=lines.append) == 1
    assert any(line.startswith("backend 'cuda' cannot run here: ") for line in lines), lines
