"""The primitives of sam_kernels.ops on every (backend, device) this machine runs, against float64
per-tensor maths written here: every dtype, list shapes around the kernels' chunk and block
boundaries, NaN-poisoned outputs, determinism, argument errors, and torch.compile."""
import math

import pytest
import torch

from sam_kernels import ops
from sam_kernels.ops import _registry

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CPU_CHUNK = 65536  # csrc/cpu/multi_tensor_cpu.h kChunkElems

# Tolerances, one row per dtype: (rtol, atol, sum_rtol).
# Element-wise results must satisfy |out - ref| <= rtol * mag + atol, where `mag` is the sum of
# the absolute values of the formula's terms (so cancellation cannot shrink the bound to 0).
# The kernels compute in fp32 (fp64 for fp64) and round once on store: fp16/bf16 get 1 ulp
# (eps * |x|), which also admits the Triton interpreter's truncating fp32 -> bf16 store; the fp16
# atol is the spacing of its subnormals. Reductions accumulate in fp32 (fp64 for fp64) whatever
# the input dtype, so `sum_rtol` (relative to the sum of |terms|) depends on that only.
TOL = {
    torch.float64: (1e-12, 0.0, 1e-12),
    torch.float32: (2e-6, 0.0, 2e-5),
    torch.float16: (2.0 ** -10, 2.0 ** -24, 2e-5),
    torch.bfloat16: (2.0 ** -7, 0.0, 2e-5),
}


# ---------------------------------------------------------------------------- test data
class Spec:
    """One tensor of a test list: shape, dtype, and whether it is channels_last (dense, not
    contiguous)."""

    def __init__(self, shape, dtype, channels_last=False):
        self.shape, self.dtype, self.channels_last = tuple(shape), dtype, channels_last

    def __repr__(self):
        return f"{list(self.shape)}:{str(self.dtype)[6:]}{':cl' if self.channels_last else ''}"


SHAPES = {
    "empty-list": [],
    "empty-tensor": [(4,), (0,), (3, 0, 2), (5,)],
    "one-element": [(1,)],
    "odd-sizes": [(5, 123, 7), (3,), (11, 13)],
    "chunk-boundary": [(CPU_CHUNK + 1,), (2 * CPU_CHUNK + 3,), (3,)],
    "channels-last": [(2, 3, 5, 7), (6,)],
}


def _uniform(name, dtype):
    return [Spec(s, dtype, channels_last=(name == "channels-last" and len(s) == 4))
            for s in SHAPES[name]]


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


CASES = {f"{name}-{_dtype_name(dt)}": _uniform(name, dt) for dt in DTYPES for name in SHAPES}
# Many small tensors of varied sizes (items of the CPU kernels hold many tensors, and some
# tensors straddle two items); fp32 only, as it costs one program per tensor in the Triton
# interpreter.
CASES["many-float32"] = [Spec((i % 13 + 1, 97), torch.float32) for i in range(300)]
# Every dtype in one call, a channels_last one included.
CASES["mixed-dtypes"] = [
    Spec((5, 123, 7), torch.float32), Spec((CPU_CHUNK + 1,), torch.float16),
    Spec((31,), torch.bfloat16), Spec((7, 3), torch.float64), Spec((0,), torch.float32),
    Spec((2, 3, 5, 7), torch.bfloat16, channels_last=True), Spec((9,), torch.float16)]
CASE_IDS = list(CASES)


def make(specs, device):
    """Fresh standard-normal tensors (never zeros) for `specs` on `device`."""
    out = []
    for s in specs:
        t = torch.randn(s.shape, dtype=torch.float64).to(s.dtype)
        if s.channels_last:
            t = t.to(memory_format=torch.channels_last)
        out.append(t.to(device))
    return out


def poisoned(specs, device):
    """Outputs to be written: NaN everywhere, so an element the kernel skips cannot pass."""
    return [t.fill_(float("nan")) for t in make(specs, device)]


def clone_all(xs):
    return [x.clone() for x in xs]


def f64(xs):
    """float64 CPU copies (never aliases: the tensors may be written afterwards)."""
    return [x.detach().to("cpu", torch.float64, copy=True) for x in xs]


def reduction_dtype(specs):
    return torch.float64 if any(s.dtype == torch.float64 for s in specs) else torch.float32


def skip_unless_device_known(specs, device):
    if not specs and device != "cpu":
        pytest.skip("an empty list carries no device: its result is a CPU tensor, tested on CPU")


# ---------------------------------------------------------------------------- comparisons
def _bits(x):
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.detach().view(ints[x.element_size()]).cpu()


def assert_bitwise_equal(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{i}]: dtype/shape changed"
        if not torch.equal(_bits(a), _bits(e)):
            diff = (_bits(a) != _bits(e)).sum().item()
            raise AssertionError(f"{what}[{i}] ({a.dtype}, {list(a.shape)}): {diff} of "
                                 f"{a.numel()} elements differ bitwise")


def assert_close_list(actual, expected, mags, what):
    """Element-wise check of written tensors against float64 results; NaN/inf in the output where
    the reference is finite are reported as such."""
    assert len(actual) == len(expected)
    for i, (a, e, m) in enumerate(zip(actual, expected, mags)):
        assert a.shape == e.shape, f"{what}[{i}]: shape {list(a.shape)} != {list(e.shape)}"
        rtol, atol, _ = TOL[a.dtype]
        got = a.detach().to("cpu", torch.float64)
        tol = rtol * m + atol
        ok = (got - e).abs() <= tol  # False wherever got is NaN
        if bool(ok.all()):
            continue
        nan = int(torch.isnan(got).sum())
        inf = int(torch.isinf(got).sum())
        bad = (~ok).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}[{i}] ({a.dtype}, shape {list(a.shape)}): {int((~ok).sum())} of "
            f"{a.numel()} elements out of tolerance ({nan} NaN, {inf} inf in the output, "
            f"reference all finite: {bool(torch.isfinite(e).all())}); first at {bad}: "
            f"got {got[tuple(bad)].item()!r}, expected {e[tuple(bad)].item()!r} "
            f"± {tol[tuple(bad)].item():.3g}")


def sum_tol(specs, abs_terms):
    """Allowed error of a reduction: per tensor, the sum of |terms| times its dtype's sum_rtol
    (tensors of one call may accumulate in different precisions)."""
    return sum((TOL[s.dtype][2] * t.sum() for s, t in zip(specs, abs_terms)),
               torch.zeros((), dtype=torch.float64))


def assert_close_sum(actual, expected, tol, specs, device, what):
    """A reduction result: dtype (float64 if any input is, else float32), device, shape, and the
    value within `tol` of the float64 sums."""
    dtype = reduction_dtype(specs)
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.device.type == torch.device(device).type, f"{what}: on {actual.device}"
    expected = torch.as_tensor(expected, dtype=torch.float64)
    tol = torch.as_tensor(tol, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)}"
    got = actual.detach().to("cpu", torch.float64)
    ok = (got - expected).abs() <= tol
    assert bool(ok.all()), (f"{what}: got {got.tolist()}, expected {expected.tolist()} "
                            f"± {tol.tolist()} (finite: {torch.isfinite(got).tolist()})")


# ---------------------------------------------------------------------------- float64 maths
def ref_sum(terms):
    return sum((t.sum() for t in terms), torch.zeros((), dtype=torch.float64))


# ---------------------------------------------------------------------------- sum_sq
@pytest.mark.parametrize("eta", [None, 0.0, 0.05], ids=["plain", "weights", "weights-eta"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_sum_sq(backend_device, case, eta):
    backend, device = backend_device
    specs = CASES[case]
    skip_unless_device_known(specs, device)
    xs = make(specs, device)
    ws = make(specs, device) if eta is not None else []
    out = ops.sum_sq(xs, ws or None, eta or 0.0, backend=backend)
    if eta is None:
        terms = [x ** 2 for x in f64(xs)]
    else:
        terms = [((w.abs() + eta) * x) ** 2 for x, w in zip(f64(xs), f64(ws))]
    assert_close_sum(out, ref_sum(terms), sum_tol(specs, terms), specs, device, "sum_sq")


# ---------------------------------------------------------------------------- dot_sum_sq
@pytest.mark.parametrize("case", CASE_IDS)
def test_dot_sum_sq(backend_device, case):
    backend, device = backend_device
    specs = CASES[case]
    skip_unless_device_known(specs, device)
    a, b = make(specs, device), make(specs, device)
    out = ops.dot_sum_sq(a, b, backend=backend)
    ab = [x * y for x, y in zip(f64(a), f64(b))]
    aa, bb = [x * x for x in f64(a)], [y * y for y in f64(b)]
    expected = torch.stack([ref_sum(ab), ref_sum(aa), ref_sum(bb)])
    tol = torch.stack([sum_tol(specs, [t.abs() for t in ab]), sum_tol(specs, aa),
                       sum_tol(specs, bb)])
    assert_close_sum(out, expected, tol, specs, device, "dot_sum_sq")


# ---------------------------------------------------------------------------- perturb_
PERTURB_VARIANTS = {  # name: (adaptive, eta, with backup)
    "plain": (False, 0.0, False),
    "backup": (False, 0.0, True),
    "adaptive": (True, 0.0, False),
    "adaptive-eta-backup": (True, 0.05, True),
}
# sum_sq is an input of perturb_: a value of our choosing tests the scale formula
# rho / (sqrt(sum_sq) + eps) exactly (eps large enough to matter).
SUM_SQ, RHO, EPS = 2.25, 1.2, 0.5


@pytest.mark.parametrize("variant", list(PERTURB_VARIANTS))
@pytest.mark.parametrize("case", CASE_IDS)
def test_perturb(backend_device, case, variant):
    backend, device = backend_device
    specs = CASES[case]
    skip_unless_device_known(specs, device)
    adaptive, eta, with_backup = PERTURB_VARIANTS[variant]
    params, dirs = make(specs, device), make(specs, device)
    before = clone_all(params)
    backup = poisoned(specs, device) if with_backup else None
    sum_sq = torch.tensor(SUM_SQ, dtype=reduction_dtype(specs), device=device)
    ops.perturb_(params, dirs, sum_sq, RHO, EPS, adaptive=adaptive, eta=eta, backup=backup,
                 backend=backend)

    scale = RHO / (math.sqrt(SUM_SQ) + EPS)
    expected, mags = [], []
    for p, d in zip(f64(before), f64(dirs)):
        step = scale * ((p.abs() + eta) ** 2 if adaptive else 1.0) * d
        expected.append(p + step)
        mags.append(p.abs() + step.abs())
    assert_close_list(params, expected, mags, "perturb_ params")
    if with_backup:
        assert_bitwise_equal(backup, before, "perturb_ backup")


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
def test_perturb_zero_direction_changes_nothing(backend_device, dtype, adaptive):
    """A zero gradient (so sum_sq = 0 and scale = rho / eps, large but finite) perturbs nothing
    and writes no NaN; the backup is still an exact copy."""
    backend, device = backend_device
    specs = _uniform("odd-sizes", dtype)
    params = make(specs, device)
    before = clone_all(params)
    dirs = [torch.zeros_like(p) for p in params]
    backup = poisoned(specs, device)
    sum_sq = torch.zeros((), dtype=reduction_dtype(specs), device=device)
    ops.perturb_(params, dirs, sum_sq, 0.05, 1e-12, adaptive=adaptive, eta=0.01, backup=backup,
                 backend=backend)
    assert_bitwise_equal(params, before, "perturb_ params with a zero direction")
    assert_bitwise_equal(backup, before, "perturb_ backup")


# ---------------------------------------------------------------------------- restore_
@pytest.mark.parametrize("case", CASE_IDS)
def test_restore(backend_device, case):
    backend, device = backend_device
    specs = CASES[case]
    skip_unless_device_known(specs, device)
    params, backup = poisoned(specs, device), make(specs, device)
    ptrs = [p.data_ptr() for p in params]
    ops.restore_(params, backup, backend=backend)
    assert_bitwise_equal(params, backup, "restore_ params")
    assert [p.data_ptr() for p in params] == ptrs, "restore_ must copy, not rebind storages"


CPU_STREAMING_BYTES = 8 << 20  # csrc/cpu/multi_tensor_cpu.h kStreamingMinBytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=_dtype_name)
def test_cpu_streaming_store_path_copies_exactly(dtype):
    """Lists of >= 8 MiB take the CPU kernels' streaming-store path (backup in perturb_, params in
    restore_): exact copies, also from and to views whose data is not 16-byte aligned."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    n = CPU_STREAMING_BYTES // torch.finfo(dtype).bits * 8 + 5

    def misaligned(offset, fill=None):  # a dense view `offset` elements into its storage
        base = torch.randn(n + offset, dtype=torch.float64).to(dtype)
        return base[offset:] if fill is None else base[offset:].fill_(fill)

    params = [misaligned(1), torch.randn(CPU_CHUNK + 1).to(dtype), torch.randn(3).to(dtype)]
    dirs = [misaligned(2)] + make([Spec((CPU_CHUNK + 1,), dtype), Spec((3,), dtype)], "cpu")
    backup = [misaligned(3, float("nan"))] + poisoned(
        [Spec((CPU_CHUNK + 1,), dtype), Spec((3,), dtype)], "cpu")
    before = clone_all(params)
    sum_sq = torch.tensor(SUM_SQ, dtype=reduction_dtype([Spec((1,), dtype)]))
    ops.perturb_(params, dirs, sum_sq, RHO, EPS, backup=backup, backend="cpu")
    assert_bitwise_equal(backup, before, "streamed backup")
    scale = RHO / (math.sqrt(SUM_SQ) + EPS)
    pairs = list(zip(f64(before), f64(dirs)))
    assert_close_list(params, [p + scale * d for p, d in pairs],
                      [p.abs() + scale * d.abs() for p, d in pairs], "perturb_ params")
    for p in params:
        p.fill_(float("nan"))
    ops.restore_(params, backup, backend="cpu")
    assert_bitwise_equal(params, before, "streamed restore")


# ---------------------------------------------------------------------------- orth_combine_
GAMMA, ORTH_EPS = 0.7, 0.25


@pytest.mark.parametrize("case", CASE_IDS)
def test_orth_combine(backend_device, case):
    backend, device = backend_device
    specs = CASES[case]
    skip_unless_device_known(specs, device)
    d, m = make(specs, device), make(specs, device)
    d_before = f64(d)
    stats = ops.dot_sum_sq(m, d, backend=backend)  # as GSAM/GAM call it
    ops.orth_combine_(d, m, stats, GAMMA, ORTH_EPS, backend=backend)

    # c from the stats the op was given (dot_sum_sq's own accuracy is test_dot_sum_sq's job)
    dot, m_sq, d_sq = stats.to("cpu", torch.float64).tolist()
    m_norm, d_norm = math.sqrt(m_sq), math.sqrt(d_sq)
    cos = dot / (m_norm * d_norm + ORTH_EPS)
    c = cos * m_norm / (d_norm + ORTH_EPS)
    expected, mags = [], []
    for dd, mm in zip(d_before, f64(m)):
        expected.append(dd - GAMMA * (mm - c * dd))
        mags.append(dd.abs() + GAMMA * (mm.abs() + abs(c) * dd.abs()))
    assert_close_list(d, expected, mags, "orth_combine_ d")


# ---------------------------------------------------------------------------- lerp_sum_sq_
THETA = 0.3


@pytest.mark.parametrize("case", CASE_IDS)
def test_lerp_sum_sq(backend_device, case):
    backend, device = backend_device
    specs = CASES[case]
    skip_unless_device_known(specs, device)
    ema, g = make(specs, device), make(specs, device)
    ema_before = f64(ema)
    out = ops.lerp_sum_sq_(ema, g, THETA, backend=backend)
    pairs = list(zip(ema_before, f64(g)))
    expected = [(1 - THETA) * e + THETA * gg for e, gg in pairs]
    mags = [(1 - THETA) * e.abs() + THETA * gg.abs() for e, gg in pairs]
    assert_close_list(ema, expected, mags, "lerp_sum_sq_ ema")
    stored = [e ** 2 for e in f64(ema)]  # of the values as stored (rounded)
    assert_close_sum(out, ref_sum(stored), sum_tol(specs, stored), specs, device,
                     "lerp_sum_sq_ result")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_name)
def test_lerp_sum_sq_sums_the_rounded_values(backend_device, dtype):
    """Every lerp result lies halfway between two representable values, so the stored tensor
    differs from the fp32 lerp by half an ulp in every element; the sum must be of the stored
    tensor (the direction used afterwards)."""
    backend, device = backend_device
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    ema = [torch.ones(64, dtype=dtype, device=device)]
    g = [torch.full((64,), 1 + ulp, dtype=dtype, device=device)]
    out = ops.lerp_sum_sq_(ema, g, 0.5, backend=backend)
    stored = ema[0].double().cpu()
    assert set(stored.tolist()) <= {1.0, 1 + ulp}, "lerp of neighbours rounds to one of them"
    exact = (stored ** 2).sum().item()
    unrounded = 64 * (1 + ulp / 2) ** 2
    assert abs(out.item() - exact) <= 2e-5 * exact, (out.item(), exact)
    assert abs(exact - unrounded) > 1e-4 * exact  # the test can tell the two apart


# ---------------------------------------------------------------------------- axpby_
@pytest.mark.parametrize("ab", [(0.5, -1.5), (2.0, 0.0)], ids=["axpby", "b0-ys-not-read"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_axpby(backend_device, case, ab):
    backend, device = backend_device
    specs = CASES[case]
    skip_unless_device_known(specs, device)
    a, b = ab
    xs = make(specs, device)
    ys = make(specs, device) if b != 0 else poisoned(specs, device)  # b == 0: ys is not read
    ys_before = f64(ys)
    ops.axpby_(ys, xs, a, b, backend=backend)
    xs64 = f64(xs)
    if b == 0:
        expected = [a * x for x in xs64]
        mags = [e.abs() for e in expected]
    else:
        expected = [a * x + b * y for x, y in zip(xs64, ys_before)]
        mags = [abs(a) * x.abs() + abs(b) * y.abs() for x, y in zip(xs64, ys_before)]
    assert_close_list(ys, expected, mags, "axpby_ ys")


# ---------------------------------------------------------------------------- determinism
# Several CPU work items (one tensor spans three, small ones share one), three dtypes.
DETERMINISM_SPECS = ([Spec((2 * CPU_CHUNK + 3,), torch.float32), Spec((5, 123, 7), torch.bfloat16),
                      Spec((3, 50), torch.float16)] +
                     [Spec((i % 13 + 1, 97), torch.float32) for i in range(12)])


def _run_every_op(backend, inputs):
    """Runs every primitive on copies of `inputs` (three lists); returns all outputs."""
    a, b, c = (clone_all(x) for x in inputs)
    out = [ops.sum_sq(a, backend=backend), ops.sum_sq(a, b, 0.01, backend=backend),
           ops.dot_sum_sq(a, b, backend=backend)]
    ops.perturb_(a, b, out[0], 0.5, 1e-12, adaptive=True, eta=0.01, backup=c, backend=backend)
    out += a + c
    stats = ops.dot_sum_sq(c, b, backend=backend)
    ops.orth_combine_(b, c, stats, 0.7, 1e-12, backend=backend)
    out.append(ops.lerp_sum_sq_(a, b, 0.3, backend=backend))
    ops.axpby_(c, b, 0.5, -1.5, backend=backend)
    ops.restore_(a, c, backend=backend)
    return out + b + a


def test_results_are_bitwise_reproducible(backend_device):
    backend, device = backend_device
    inputs = [make(DETERMINISM_SPECS, device) for _ in range(3)]
    first = _run_every_op(backend, inputs)
    assert_bitwise_equal(_run_every_op(backend, inputs), first, "second run")


def test_cpu_results_do_not_depend_on_the_thread_count():
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    inputs = [make(DETERMINISM_SPECS, "cpu") for _ in range(3)]
    torch.set_num_threads(1)
    one = _run_every_op("cpu", inputs)
    torch.set_num_threads(2)
    assert_bitwise_equal(_run_every_op("cpu", inputs), one, "2 threads vs 1")


# ---------------------------------------------------------------------------- bad input
def _call(op, lists, backend):
    """Calls primitive `op` with `lists` (its tensor-list arguments in order) and fixed scalars."""
    if op == "sum_sq":
        return ops.sum_sq(lists[0], lists[1], 0.01, backend=backend)
    if op == "dot_sum_sq":
        return ops.dot_sum_sq(*lists, backend=backend)
    if op == "perturb_":
        s = torch.ones((), device=lists[0][0].device)
        return ops.perturb_(lists[0], lists[1], s, 0.05, 1e-12, backup=lists[2], backend=backend)
    if op == "restore_":
        return ops.restore_(*lists, backend=backend)
    if op == "orth_combine_":
        stats = torch.ones(3, device=lists[0][0].device)
        return ops.orth_combine_(*lists, stats, 0.5, 1e-12, backend=backend)
    if op == "lerp_sum_sq_":
        return ops.lerp_sum_sq_(*lists, 0.3, backend=backend)
    return ops.axpby_(*lists, 0.5, 0.5, backend=backend)


LIST_NAMES = {"sum_sq": ("xs", "weights"), "dot_sum_sq": ("a", "b"),
              "perturb_": ("params", "dirs", "backup"), "restore_": ("params", "backup"),
              "orth_combine_": ("d", "m"), "lerp_sum_sq_": ("ema", "g"), "axpby_": ("ys", "xs")}


def _bad_lists(kind, n_lists, device):
    """`n_lists` tensor lists for one op: the first tensor of each is valid, the problem (of
    `kind`) is in the second list. Returns the lists and the message regex, with {first} and
    {second} standing for the lists' argument names."""
    good = lambda: [torch.randn(4, 5, device=device), torch.randn(7, device=device)]  # noqa: E731
    lists = [good() for _ in range(n_lists)]
    bad = lists[1]
    if kind == "length":
        bad.append(torch.randn(3, device=device))
        return lists, "{first} has 2 tensors but {second} has 3"
    if kind == "shape":
        bad[1] = torch.randn(8, device=device)
        return lists, r"{first}\[1\] and {second}\[1\] differ in shape \(\[7\] vs \[8\]\)"
    if kind == "dtype":
        bad[1] = bad[1].double()
        return lists, r"{first}\[1\] and {second}\[1\] differ in dtype"
    if kind == "integer":
        bad[1] = torch.arange(7, device=device)
        return lists, (r"{second}\[1\] has dtype \S+; supported dtypes are float32, float64, "
                       r"float16 and bfloat16")
    if kind == "sparse":
        bad[1] = bad[1].to_sparse()
        return lists, (r"{second}\[1\] is not a dense \(strided\) tensor; sparse tensors are "
                       r"not supported")
    if kind == "meta":
        bad[1] = torch.empty(7, device="meta")
        return lists, r"{second}\[1\] is on meta but this kernel runs on \w+ tensors"
    if kind == "strided":
        bad[1] = torch.randn(14, device=device)[::2]
        return lists, r"{second}\[1\] is not dense in memory"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["length", "shape", "dtype", "integer", "sparse", "meta",
                                  "strided"])
@pytest.mark.parametrize("op", list(LIST_NAMES))
def test_bad_lists_raise_value_error_and_write_nothing(backend_device, op, kind):
    backend, device = backend_device
    names = LIST_NAMES[op]
    lists, pattern = _bad_lists(kind, len(names), device)
    snapshot = [clone_all(x) for x in lists]
    pattern = f"{op}: " + pattern.format(first=names[0], second=names[1])
    with pytest.raises(ValueError, match=pattern):
        _call(op, lists, backend)
    for name, now, before in zip(names, lists, snapshot):
        dense = [(x, y) for x, y in zip(now, before) if x.layout == torch.strided and
                 x.device.type != "meta" and x.dtype.is_floating_point]
        assert_bitwise_equal([x for x, _ in dense], [y for _, y in dense], f"{op} {name}")


@pytest.mark.parametrize("op, scalar, size", [("perturb_", "sum_sq", 1),
                                              ("orth_combine_", "stats", 3)])
def test_wrong_scalar_size_raises_and_writes_nothing(backend_device, op, scalar, size):
    backend, device = backend_device
    xs, ys = make(_uniform("odd-sizes", torch.float32), device), make(
        _uniform("odd-sizes", torch.float32), device)
    before = clone_all(xs)
    wrong = torch.ones(size + 1, device=device)
    with pytest.raises(ValueError, match=rf"{op}: {scalar} must have {size} element\(s\), got "
                                         rf"shape \[{size + 1}\]"):
        if op == "perturb_":
            ops.perturb_(xs, ys, wrong, 0.05, 1e-12, backend=backend)
        else:
            ops.orth_combine_(xs, ys, wrong, 0.5, 1e-12, backend=backend)
    assert_bitwise_equal(xs, before, f"{op} after the error")


def test_layout_mismatch_raises(backend_device):
    backend, device = backend_device
    a = [torch.randn(2, 3, 5, 7, device=device).to(memory_format=torch.channels_last)]
    b = [torch.randn(2, 3, 5, 7, device=device)]
    with pytest.raises(ValueError, match=r"restore_: params\[0\] and backup\[0\] differ in memory "
                                         r"layout"):
        ops.restore_(a, b, backend=backend)


# ---------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_matches_eager():
    """A SAM-like step (norm, perturb with backup, a reduction at the perturbed point, restore)
    compiles into one graph over the cpu backend's custom ops and matches eager. Goes through
    the backend module as the optimizers do: they resolve it once, outside the step."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    backend = _registry.resolve("cpu", "cpu")

    def step(params, grads, backup):
        norm_sq = backend.sum_sq(grads, [], 0.0)
        backend.perturb_(params, grads, norm_sq, 0.5, 1e-12, False, 0.0, backup)
        at_perturbed = torch.stack([(p * p).sum() for p in params])
        backend.restore_(params, backup)
        return norm_sq, at_perturbed

    specs = _uniform("odd-sizes", torch.float32)
    params, grads = make(specs, "cpu"), make(specs, "cpu")
    eager_params, eager_backup = clone_all(params), poisoned(specs, "cpu")
    compiled_params, compiled_backup = clone_all(params), poisoned(specs, "cpu")
    torch._dynamo.reset()
    norm_eager, mid_eager = step(eager_params, grads, eager_backup)
    norm_compiled, mid_compiled = torch.compile(step, fullgraph=True)(
        compiled_params, grads, compiled_backup)
    assert torch.equal(norm_compiled, norm_eager)
    torch.testing.assert_close(mid_compiled, mid_eager, rtol=1e-6, atol=0)
    assert_bitwise_equal(compiled_params, params, "params after the compiled step")
    assert_bitwise_equal(compiled_backup, params, "backup after the compiled step")
    unperturbed = torch.stack([(p * p).sum() for p in params])
    assert not torch.allclose(mid_eager, unperturbed, rtol=1e-3), "the step must perturb"
