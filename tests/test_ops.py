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
# atol is the spacing of its subnormals. Reductions square and sum in fp64 whatever the input
# dtype: their terms are exact (x² of an fp32 x fits fp64), only weighted sum_sq rounds its
# product (|w| + eta) · x in fp32 first, hence `sum_rtol` (relative to the sum of |terms|).
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
    return torch.float64  # every reduction, whatever the input dtypes


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
    """A reduction result: dtype (float64), device, shape, and the value within `tol` of the
    float64 sums."""
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


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu")
                                     if b in ops.available_backends("cpu")])
def test_cpu_results_do_not_depend_on_the_thread_count(backend):
    inputs = [make(DETERMINISM_SPECS, "cpu") for _ in range(3)]
    torch.set_num_threads(1)
    one = _run_every_op(backend, inputs)
    torch.set_num_threads(2)
    assert_bitwise_equal(_run_every_op(backend, inputs), one, "2 threads vs 1")


def test_reference_dot_sum_sq_does_not_depend_on_the_thread_count():
    """The issue's case: two 100,000-element vectors gave different sums with 1 and 2 threads
    (torch splits one large reduction across threads); the reference now sums fixed rows."""
    a, b = [torch.randn(100_000)], [torch.randn(100_000)]
    torch.set_num_threads(1)
    one = ops.dot_sum_sq(a, b, backend="reference")
    torch.set_num_threads(2)
    assert_bitwise_equal([ops.dot_sum_sq(a, b, backend="reference")], [one], "2 threads vs 1")


# ---------------------------------------------------------------------------- bad input
@pytest.fixture(params=ops.available_backends("cpu"))
def backend(request):
    """A backend that runs on CPU tensors (the autograd tests use CPU tensors)."""
    return request.param


def _dev(lists):
    """The device of the first tensor found in `lists` (which may hold wrong types)."""
    for xs in lists:
        for t in (xs if isinstance(xs, list) else []):
            if isinstance(t, torch.Tensor):
                return t.device
    return "cpu"


def _call(op, lists, backend):
    """Calls primitive `op` with `lists` (its tensor-list arguments in order) and fixed scalars."""
    if op == "sum_sq":
        return ops.sum_sq(lists[0], lists[1], 0.01, backend=backend)
    if op == "dot_sum_sq":
        return ops.dot_sum_sq(*lists, backend=backend)
    if op == "perturb_":
        s = torch.ones((), device=_dev(lists))
        return ops.perturb_(lists[0], lists[1], s, 0.05, 1e-12, backup=lists[2], backend=backend)
    if op == "restore_":
        return ops.restore_(*lists, backend=backend)
    if op == "orth_combine_":
        stats = torch.ones(3, device=_dev(lists))
        return ops.orth_combine_(*lists, stats, 0.5, 1e-12, backend=backend)
    if op == "lerp_sum_sq_":
        return ops.lerp_sum_sq_(*lists, 0.3, backend=backend)
    return ops.axpby_(*lists, 0.5, 0.5, backend=backend)


LIST_NAMES = {"sum_sq": ("xs", "weights"), "dot_sum_sq": ("a", "b"),
              "perturb_": ("params", "dirs", "backup"), "restore_": ("params", "backup"),
              "orth_combine_": ("d", "m"), "lerp_sum_sq_": ("ema", "g"), "axpby_": ("ys", "xs")}
WRITING_OPS = ("perturb_", "restore_", "orth_combine_", "lerp_sum_sq_", "axpby_")
FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                      "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)]


def _bad_lists(kind, n_lists, device):
    """`n_lists` tensor lists for one op: the first tensor of each is valid, the problem (of
    `kind`) is in the second list (in the first for "strided": a list the op only reads is
    copied into its partner's layout, a first list is not). Returns the lists and the message
    regex, with {first} and {second} standing for the lists' argument names."""
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
    if kind.startswith("float8"):
        bad[1] = bad[1].to(getattr(torch, kind))
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
        lists[0][1] = torch.randn(14, device=device)[::2]
        return lists, r"{first}\[1\] is not dense in memory"
    raise AssertionError(kind)


def _snapshot_equal(lists, snapshot, what):
    for now, before in zip(lists, snapshot):
        pairs = [(x, y) for x, y in zip(now, before) if x.layout == torch.strided and
                 x.device.type != "meta" and x.dtype in DTYPES]
        assert_bitwise_equal([x for x, _ in pairs], [y for _, y in pairs], what)


@pytest.mark.parametrize("kind", ["length", "shape", "dtype", "integer", "sparse", "meta",
                                  "strided"] + [str(d)[6:] for d in FLOAT8])
@pytest.mark.parametrize("op", list(LIST_NAMES))
def test_bad_lists_raise_value_error_and_write_nothing(backend_device, op, kind):
    backend, device = backend_device
    names = LIST_NAMES[op]
    lists, pattern = _bad_lists(kind, len(names), device)
    snapshot = [clone_all(x) for x in lists]
    pattern = f"{op}: " + pattern.format(first=names[0], second=names[1])
    with pytest.raises(ValueError, match=pattern):
        _call(op, lists, backend)
    _snapshot_equal(lists, snapshot, f"{op} after the error")


@pytest.mark.parametrize("dtype", FLOAT8, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", list(LIST_NAMES))
def test_float8_in_every_list_is_refused_before_any_write(backend_device, op, dtype):
    """Every float8 variant (fnuz included) in any position, restore_ too: refused with the list
    of supported dtypes, nothing written (the issue: cpu accepted fnuz and then failed after
    writing, and restore_ copied them silently)."""
    backend, device = backend_device
    names = LIST_NAMES[op]
    for pos in range(len(names)):
        lists = [[torch.randn(6, device=device)] for _ in names]
        lists[pos] = [lists[pos][0].to(dtype)]
        snapshot = [[x.clone()] for (x,) in lists]
        with pytest.raises(ValueError, match=rf"{op}: {names[pos]}\[0\] has dtype \S+; "
                                             r"supported dtypes are float32, float64, "
                                             r"float16 and bfloat16"):
            _call(op, lists, backend)
        for (now,), (before,) in zip(lists, snapshot):
            assert torch.equal(now.view(torch.uint8), before.view(torch.uint8)), \
                f"{op} wrote {names[pos]}"


@pytest.mark.parametrize("op, scalar, size", [("perturb_", "sum_sq", 1),
                                              ("orth_combine_", "stats", 3)])
@pytest.mark.parametrize("shape", ["more", "2d", "empty"])
def test_wrong_scalar_shape_raises_and_writes_nothing(backend_device, op, scalar, size, shape):
    """One rule on every backend: sum_sq has shape () or (1,), stats exactly (3,)."""
    backend, device = backend_device
    xs, ys = make(_uniform("odd-sizes", torch.float32), device), make(
        _uniform("odd-sizes", torch.float32), device)
    before = clone_all(xs)
    wrong = {"more": (size + 1,), "2d": (1, size), "empty": (0,)}[shape]
    shown = str(list(wrong)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=rf"{op}: {scalar} must have {size} element\(s\) "
                                         rf"\(shape .*\), got shape {shown}"):
        if op == "perturb_":
            ops.perturb_(xs, ys, torch.ones(wrong, device=device), 0.05, 1e-12, backend=backend)
        else:
            ops.orth_combine_(xs, ys, torch.ones(wrong, device=device), 0.5, 1e-12,
                              backend=backend)
    assert_bitwise_equal(xs, before, f"{op} after the error")


def test_non_contiguous_stats_is_refused_on_every_backend(backend_device):
    backend, device = backend_device
    d, m = [torch.randn(5, device=device)], [torch.randn(5, device=device)]
    before = clone_all(d)
    stats = torch.ones(6, device=device)[::2]
    with pytest.raises(ValueError, match=r"orth_combine_: stats must be contiguous; pass "
                                         r"stats.contiguous\(\)"):
        ops.orth_combine_(d, m, stats, 0.5, 1e-12, backend=backend)
    assert_bitwise_equal(d, before, "d after the error")
    ops.orth_combine_(d, m, stats.contiguous(), 0.5, 1e-12, backend=backend)  # the advice works


def _type_cases(op, device):
    """(lists, scalar) variants with one argument of a wrong type, and the message regex."""
    names = LIST_NAMES[op]
    good = lambda: [torch.randn(3, device=device)]  # noqa: E731
    for pos, name in enumerate(names):
        for bad, shown in ((1.5, "float"), (None, "NoneType"), ("ab", "str")):
            lists = [good() for _ in names]
            lists[pos] = [lists[pos][0], bad]
            lists = [x if k == pos else x + [torch.randn(1, device=device)]
                     for k, x in enumerate(lists)]
            yield lists, None, rf"{op}: {name}\[1\] is a {shown}, expected a Tensor"
        lists = [good() for _ in names]
        lists[pos] = "abc"
        yield lists, None, rf"{op}: {name} must be a list or tuple of Tensors, got str"
        lists = [good() for _ in names]
        lists[pos] = torch.randn(3, device=device)
        yield lists, None, rf"{op}: {name} must be a list or tuple of Tensors, got Tensor"
    scalar = {"perturb_": "sum_sq", "orth_combine_": "stats"}.get(op)
    if scalar:
        yield [good() for _ in names], 0.5, rf"{op}: {scalar} must be a Tensor, got float"


@pytest.mark.parametrize("op", list(LIST_NAMES))
def test_wrong_types_raise_type_error_naming_the_argument(backend_device, op):
    """Non-tensor items, a str or a bare Tensor for a list, a float for the device scalar:
    TypeError naming the argument on every backend (the compiled ops' schema parser raised a
    RuntimeError naming none; a str gave AttributeError), nothing written."""
    backend, device = backend_device
    for lists, scalar, pattern in _type_cases(op, device):
        tensors = [[t for t in xs if isinstance(t, torch.Tensor)] if isinstance(xs, list)
                   else [] for xs in lists]
        snapshot = [clone_all(x) for x in tensors]
        with pytest.raises(TypeError, match=pattern):
            if scalar is None:
                _call(op, lists, backend)
            elif op == "perturb_":
                ops.perturb_(lists[0], lists[1], scalar, 0.05, 1e-12, backup=lists[2],
                             backend=backend)
            else:
                ops.orth_combine_(*lists, scalar, 0.5, 1e-12, backend=backend)
        for now, before in zip(tensors, snapshot):
            assert_bitwise_equal(now, before, f"{op} after the TypeError")


@pytest.mark.parametrize("op", list(LIST_NAMES))
def test_backend_modules_raise_the_same_type_errors(backend_device, op):
    """The optimizers call the backend module directly (no ops.* front): same TypeError."""
    backend, device = backend_device
    mod = _registry.resolve(backend, device)
    lists = [[torch.randn(3, device=device), "x"] for _ in LIST_NAMES[op]]
    name = LIST_NAMES[op][0]
    args = {"sum_sq": lambda: mod.sum_sq(lists[0], lists[1], 0.0),
            "dot_sum_sq": lambda: mod.dot_sum_sq(*lists),
            "perturb_": lambda: mod.perturb_(lists[0], lists[1], torch.ones(()), 0.1, 0.0, False,
                                             0.0, lists[2]),
            "restore_": lambda: mod.restore_(*lists),
            "orth_combine_": lambda: mod.orth_combine_(*lists, torch.ones(3), 0.5, 0.0),
            "lerp_sum_sq_": lambda: mod.lerp_sum_sq_(*lists, 0.5),
            "axpby_": lambda: mod.axpby_(*lists, 1.0, 1.0)}[op]
    with pytest.raises(TypeError, match=rf"{op}: {name}\[1\] is a str, expected a Tensor"):
        args()


# ---------------------------------------------------------------------------- layouts
def _paired_calls(op, first, second, backend, device):
    """Runs `op` with its first list `first` and its read list `second` (other lists fresh);
    returns what it produced (results and written lists) as float64 CPU copies."""
    if op == "sum_sq":
        return [ops.sum_sq(first, second, 0.05, backend=backend)]
    if op == "dot_sum_sq":
        return [ops.dot_sum_sq(first, second, backend=backend)]
    if op == "perturb_":
        backup = [torch.empty_like(t) for t in first]
        ops.perturb_(first, second, torch.full((), 4.0, device=device), 0.5, 1e-12,
                     backup=backup, backend=backend)
        return f64(first) + f64(backup)
    if op == "restore_":
        ops.restore_(first, second, backend=backend)
        return f64(first)
    if op == "orth_combine_":
        ops.orth_combine_(first, second, torch.tensor([0.5, 2.0, 3.0], device=device), 0.7,
                          1e-12, backend=backend)
        return f64(first)
    if op == "lerp_sum_sq_":
        return [ops.lerp_sum_sq_(first, second, 0.3, backend=backend)] + f64(first)
    ops.axpby_(first, second, 0.5, -1.5, backend=backend)
    return f64(first)


def _layout_variants(device):
    """(name, first, second): a read list whose memory order differs from the first list's."""
    w = torch.randn(5, 1, device=device)
    g = torch.randn(1, 5, device=device).t()  # strides (1, 5): autograd's (5, 1) gradient
    yield "size-1-dims", [w], [g]
    x = torch.randn(2, 3, 5, 7, device=device)
    yield "channels-last-vs-contiguous", [x], [torch.randn(2, 3, 5, 7, device=device)
                                               .to(memory_format=torch.channels_last)]
    yield "contiguous-vs-channels-last", [x.to(memory_format=torch.channels_last)], \
        [torch.randn(2, 3, 5, 7, device=device)]
    yield "transposed", [torch.randn(6, 4, device=device)], [torch.randn(4, 6, device=device).t()]
    yield "gaps", [torch.randn(4, 5, device=device)], [torch.randn(4, 10, device=device)[:, ::2]]
    yield "expanded", [torch.randn(3, 4, device=device)], [torch.randn(4, device=device)
                                                          .expand(3, 4)]


@pytest.mark.parametrize("op", list(LIST_NAMES))
def test_a_read_list_in_another_layout_gives_the_contiguous_result(backend_device, op):
    """Item 2: a list the op only reads may be laid out differently from its partner (autograd
    gives a (5, 1) parameter a (1, 5)-strided gradient; channels_last vs contiguous; views):
    the result equals the one with a contiguous copy in the partner's layout, and the read list
    is unchanged."""
    backend, device = backend_device
    for name, first, second in _layout_variants(device):
        same = [torch.empty_like(f).copy_(s) for f, s in zip(first, second)]
        second_before = clone_all(second)
        expected = _paired_calls(op, clone_all(first), same, backend, device)
        got = _paired_calls(op, clone_all(first), second, backend, device)
        assert_bitwise_equal(got, expected, f"{op} {name}")
        assert_bitwise_equal(second, second_before, f"{op} {name}: the read list")


def test_size_one_dims_need_no_copy():
    """The (5, 1) case is the same memory order (torch's rule ignores size-1 dims): the layout
    check passes it, so the kernels read the gradient in place."""
    from sam_kernels.ops import _checks
    w, g = torch.randn(5, 1), torch.randn(1, 5).t()
    assert _checks.same_memory_order(w, g)
    assert _checks.aligned([w], [g])[0] is g
    x = torch.randn(2, 3, 5, 7)
    assert not _checks.same_memory_order(x, x.to(memory_format=torch.channels_last))


def test_a_written_list_in_another_layout_raises(backend_device):
    """perturb_'s backup is written: it must have the params' memory order (the optimizers make
    it with empty_like); refused before anything is written."""
    backend, device = backend_device
    p = [torch.randn(2, 3, 5, 7, device=device).to(memory_format=torch.channels_last)]
    d = [torch.randn(2, 3, 5, 7, device=device)]
    backup = [torch.randn(2, 3, 5, 7, device=device)]
    before = clone_all(p) + clone_all(backup)
    with pytest.raises(ValueError, match=r"perturb_: params\[0\] and backup\[0\] differ in "
                                         r"memory layout \(strides .*\); a list the op writes "
                                         r"must store its elements in params's order"):
        ops.perturb_(p, d, torch.ones((), device=device), 0.1, 0.0, backup=backup,
                     backend=backend)
    assert_bitwise_equal(p + backup, before, "after the error")


# ---------------------------------------------------------------------------- aliasing
def _alias_cases(op, device):
    """(lists, scalar_or_None, message regex): a written tensor sharing memory with another
    argument, for a writing op."""
    names = LIST_NAMES[op]
    base = torch.randn(20, device=device)
    fresh = lambda n=4: torch.randn(n, device=device)  # noqa: E731

    def lists_with(pos, value):
        out = [[fresh(), fresh()] for _ in names]
        out[pos] = value
        return out

    w = names[0]
    msg = lambda a, b: rf"{op}: {a} and {b} overlap in memory; {op} writes \w+ in place"  # noqa
    yield lists_with(0, [base[:4], base[:4]]), None, msg(rf"{w}\[0\]", rf"{w}\[1\]")
    yield lists_with(0, [base[:4], base[2:6]]), None, msg(rf"{w}\[0\]", rf"{w}\[1\]")
    r = names[1]
    if op != "perturb_" or True:
        out = [[fresh(), fresh()] for _ in names]
        out[0], out[1] = [base[:4], fresh()], [fresh(), base[:4]]
        yield out, None, msg(rf"{w}\[0\]", rf"{r}\[1\]")
        out = [[fresh(), fresh()] for _ in names]
        out[0], out[1] = [base[:4], fresh()], [base[1:5], fresh()]
        yield out, None, msg(rf"{w}\[0\]", rf"{r}\[0\]")
    if op == "perturb_":
        out = [[fresh(), fresh()] for _ in names]
        out[0], out[2] = [base[:4], fresh()], [fresh(), base[:4]]
        yield out, None, msg(r"params\[0\]", r"backup\[1\]")
        out = [[base[:4], fresh()], [fresh(), fresh()], [fresh(), fresh()]]
        yield out, base[3], msg(r"params\[0\]", "sum_sq")
    if op == "orth_combine_":
        out = [[base[:4], fresh()], [fresh(), fresh()]]
        yield out, base[2:5], msg(r"d\[0\]", "stats")


def _call_with_scalar(op, lists, scalar, backend):
    if scalar is None:
        return _call(op, lists, backend)
    if op == "perturb_":
        return ops.perturb_(lists[0], lists[1], scalar, 0.05, 1e-12, backup=lists[2],
                            backend=backend)
    return ops.orth_combine_(*lists, scalar, 0.5, 1e-12, backend=backend)


@pytest.mark.parametrize("op", WRITING_OPS)
def test_aliased_arguments_are_refused_before_any_write(backend_device, op):
    """Item 3: the same tensor twice in a written list, overlapping views, a written tensor
    shared with another position of a read list or with the device scalar: one message on every
    backend, nothing written."""
    backend, device = backend_device
    for lists, scalar, pattern in _alias_cases(op, device):
        storages = {t.untyped_storage().data_ptr(): t for xs in lists for t in xs}
        snapshot = {k: t._base.clone() if t._base is not None else t.clone()
                    for k, t in storages.items()}
        with pytest.raises(ValueError, match=pattern):
            _call_with_scalar(op, lists, scalar, backend)
        for k, t in storages.items():
            now = t._base if t._base is not None else t
            assert_bitwise_equal([now], [snapshot[k]], f"{op}: memory after the error")


def test_aliasing_messages_are_the_same_on_every_backend():
    messages = {}
    for backend in ops.available_backends("cpu"):
        for op in WRITING_OPS:
            for k, (lists, scalar, _) in enumerate(_alias_cases(op, "cpu")):
                with pytest.raises(ValueError) as info:
                    _call_with_scalar(op, lists, scalar, backend)
                messages.setdefault((op, k), {})[backend] = str(info.value)
    for key, by_backend in messages.items():
        assert len(set(by_backend.values())) == 1, (key, by_backend)


@pytest.mark.parametrize("op", WRITING_OPS)
def test_the_same_tensor_at_the_same_position_of_a_read_list_is_allowed(backend_device, op):
    """Element-wise well defined (each element read before it is written, by one thread):
    `axpby_([p], [p])` is p ← (a + b)·p on every backend, equal to the call with a copy."""
    backend, device = backend_device
    specs = _uniform("odd-sizes", torch.float32)
    x = make(specs, device)
    copy = clone_all(x)
    expected = _paired_calls(op, clone_all(x), copy, backend, device)
    got = _paired_calls(op, x, x, backend, device)
    assert_bitwise_equal(got, expected, f"{op}(x, x) vs {op}(x, copy of x)")


def test_read_only_ops_accept_repeated_tensors(backend_device):
    backend, device = backend_device
    p = torch.randn(7, device=device)
    got = ops.sum_sq([p, p, p[:3]], backend=backend)
    want = 2 * p.double().square().sum() + p[:3].double().square().sum()
    assert abs(float(got) - float(want)) <= 1e-12 * float(want)


# ---------------------------------------------------------------------------- autograd
def _write_once(op, target, backend):
    """Calls writing primitive `op` with `target` (one tensor) as the written list."""
    other = torch.randn_like(target, requires_grad=False)
    if op == "perturb_":
        return ops.perturb_([target], [other], torch.ones(()), 0.1, 1e-12, backend=backend)
    if op == "restore_":
        return ops.restore_([target], [other], backend=backend)
    if op == "orth_combine_":
        return ops.orth_combine_([target], [other], torch.tensor([0.1, 1.0, 2.0]), 0.5, 1e-12,
                                 backend=backend)
    if op == "lerp_sum_sq_":
        return ops.lerp_sum_sq_([target], [other], 0.3, backend=backend)
    return ops.axpby_([target], [other], 0.5, 0.5, backend=backend)


@pytest.mark.parametrize("op", WRITING_OPS)
def test_writes_bump_the_version_counter_so_backward_raises(op, backend):
    """Item 4: a tensor saved for backward and then written by a primitive makes backward
    raise, as for torch's own in-place ops (cpu gave a silently wrong gradient)."""
    p = torch.randn(4, requires_grad=True)
    x = torch.randn(4)
    loss = (p * x).sum()  # saves x
    version = x._version
    _write_once(op, x, backend)
    assert x._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("op", WRITING_OPS)
def test_writing_a_leaf_that_requires_grad_raises_like_torch(op, backend):
    p = torch.randn(4, requires_grad=True)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in "
                                           "an in-place operation"):
        _write_once(op, p, backend)
    assert torch.equal(p.detach(), before) and p._version == 0
    with pytest.raises(RuntimeError, match="a view of a leaf Variable that requires grad"):
        _write_once(op, p[:2], backend)
    assert torch.equal(p.detach(), before)
    with torch.no_grad():  # as the optimizers call them
        _write_once(op, p, backend)
    assert p._version > 0


def test_a_refused_perturb_writes_no_backup(backend):
    """The reference backend used to copy params into the backup and then fail on the leaf."""
    p = torch.randn(6, requires_grad=True)
    backup = [torch.full((6,), float("nan"))]
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        ops.perturb_([p], [torch.randn(6)], torch.ones(()), 0.1, 1e-12, backup=backup,
                     backend=backend)
    assert bool(torch.isnan(backup[0]).all()), "the backup was written before the error"


@pytest.mark.parametrize("op", WRITING_OPS)
def test_any_argument_that_requires_grad_is_refused_with_grad_mode_on(op, backend):
    """The primitives have no derivative: a written non-leaf, or a read tensor, that requires
    grad would silently lose its gradient path; refused on every backend, nothing written."""
    w = torch.randn(4, requires_grad=True)
    y = w * 2.0
    with pytest.raises(RuntimeError, match=rf"{op}: \w+\[0\] requires grad and grad mode is on"):
        _write_once(op, y, backend)
    x = torch.randn(4)
    before = x.clone()
    with pytest.raises(RuntimeError, match=rf"{op}: \w+\[0\] requires grad and grad mode is on"):
        if op == "axpby_":
            ops.axpby_([x], [y], 1.0, 1.0, backend=backend)
        elif op == "restore_":
            ops.restore_([x], [y], backend=backend)
        elif op == "lerp_sum_sq_":
            ops.lerp_sum_sq_([x], [y], 0.5, backend=backend)
        elif op == "orth_combine_":
            ops.orth_combine_([x], [y], torch.ones(3), 0.5, 0.0, backend=backend)
        else:
            ops.perturb_([x], [y], torch.ones(()), 0.1, 0.0, backend=backend)
    assert torch.equal(x, before)


# ---------------------------------------------------------------------------- fp32 overflow
def _huge(shape, scale, dtype, device):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e37])
def test_huge_finite_fp32_values_give_finite_sums(backend_device, scale):
    """Σg² of fp32 gradients near 1e19 exceeds fp32's range: every backend squares and sums in
    fp64 and returns float64, so the sums are finite and accurate; perturb_ and orth_combine_
    read those float64 scalars and compute their scale/coefficient in fp64."""
    backend, device = backend_device
    specs = [Spec((1000,), torch.float32), Spec((3, 7), torch.float32)]
    a = [_huge(s.shape, scale, torch.float32, device) for s in specs]
    b = [_huge(s.shape, scale, torch.float32, device) for s in specs]
    a64, b64 = f64(a), f64(b)
    want_sq = ref_sum([x * x for x in a64])
    got = ops.sum_sq(a, backend=backend)
    assert got.dtype == torch.float64 and torch.isfinite(got)
    assert abs(float(got) - float(want_sq)) <= 1e-12 * float(want_sq)
    got3 = ops.dot_sum_sq(a, b, backend=backend).cpu()
    want3 = torch.stack([ref_sum([x * y for x, y in zip(a64, b64)]), want_sq,
                         ref_sum([y * y for y in b64])])
    mag = torch.stack([ref_sum([(x * y).abs() for x, y in zip(a64, b64)]), want_sq, want3[2]])
    # Σa·b: the reference backend forms the products in fp32 after scaling each tensor by its
    # largest |value| (rounding ~1e-7 relative); the kernels multiply in fp64
    assert bool(torch.isfinite(got3).all())
    assert bool(((got3 - want3).abs() <= torch.tensor([1e-6, 1e-12, 1e-12]) * mag).all())
    # perturb_ with that sum: scale = rho / ‖a‖, p moves by rho · a / ‖a‖ (finite, non-zero)
    p = make(specs, device)
    p64 = f64(p)
    ops.perturb_(p, a, got, 0.5, 1e-12, backend=backend)
    step = [0.5 * x / float(want_sq) ** 0.5 for x in a64]
    assert_close_list(p, [x + s for x, s in zip(p64, step)],
                      [x.abs() + s.abs() for x, s in zip(p64, step)], "perturb_ at 1e19+")
    # orth_combine_ from those stats: d - gamma (m - c d), c = <m,d> / |d|^2 (eps negligible)
    d, m = clone_all(a), clone_all(b)
    stats = ops.dot_sum_sq(m, d, backend=backend)
    ops.orth_combine_(d, m, stats, 0.5, 1e-12, backend=backend)
    c = float(want3[0]) / float(want3[1])
    expect = [x - 0.5 * (y - c * x) for x, y in zip(a64, b64)]
    mags = [x.abs() + 0.5 * (y.abs() + abs(c) * x.abs()) for x, y in zip(a64, b64)]
    assert_close_list(d, expect, mags, "orth_combine_ at 1e19+")
    ema = clone_all(a)
    got_l = ops.lerp_sum_sq_(ema, b, 0.25, backend=backend)
    want_l = ref_sum([x.double() ** 2 for x in f64(ema)])
    assert torch.isfinite(got_l) and abs(float(got_l) - float(want_l)) <= 1e-12 * float(want_l)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_largest_half_values_give_exact_sums(backend_device, dtype):
    backend, device = backend_device
    big = torch.finfo(dtype).max
    x = [torch.full((301,), big, dtype=dtype, device=device)]
    got = ops.sum_sq(x, backend=backend)
    want = 301 * float(big) ** 2  # each square and the sum in fp64 (the reference takes an
    assert abs(float(got) - want) <= 1e-14 * want  # fp64 norm and squares it: ~1 ulp)


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
