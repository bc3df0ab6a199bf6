"""Property-based tests of the primitives (hypothesis) on every backend this machine runs on CPU
tensors: random lists (0-50 tensors; fewer under the Triton interpreter, ~1-1.6 ms per program),
sizes 0, 1, odd and past the CPU chunk / Triton block, 1-d and 4-d shapes, channels_last,
storage offsets, size-1 dims with odd strides, mixed dtypes, read lists in another layout
(gaps, transposed, channels_last vs contiguous), aliasing, and one injected fault at a time.

Every example checks against float64 maths written here; a call that raises must raise
ValueError/TypeError with the same message as the reference backend and leave every input
byte for byte as it was. Deterministic (derandomize=True) and bounded for CI: EXAMPLES below.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sam_kernels import ops
from test_ops import CPU_CHUNK, TOL, assert_bitwise_equal
from test_ops import assert_close_list as _assert_close_list

BACKENDS = ops.available_backends("cpu")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TRITON_BLOCK = 4096  # sam_kernels.ops.triton_kernels.utils.DEFAULT_BLOCK
#: Examples per (primitive, backend): the whole file stays under ~90 s on 2 busy cores.
EXAMPLES = {"reference": 150, "cpu": 150, "triton": 30}
MAX_LEN = {"reference": 50, "cpu": 50, "triton": 6}
OPS = ("sum_sq", "dot_sum_sq", "perturb_", "restore_", "orth_combine_", "lerp_sum_sq_",
       "axpby_")
WRITES = {"perturb_", "restore_", "orth_combine_", "lerp_sum_sq_", "axpby_"}
FAULTS = ("alias", "dtype", "shape", "length", "float8", "type", "strided-first")


# ---------------------------------------------------------------------------- generation
class Gen:
    """Tensor factory for one example: values from a seeded torch generator (never zeros)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def values(self, shape, dtype):
        return torch.randn(shape, dtype=torch.float64, generator=self.g).to(dtype)

    def dense(self, shape, dtype, layout):
        """A dense tensor of `shape` in `layout`: contiguous, channels_last, at a storage offset,
        or with odd strides on its size-1 dims."""
        numel = math.prod(shape)
        if layout == "channels_last" and len(shape) == 4:
            return self.values(shape, dtype).to(memory_format=torch.channels_last)
        if layout == "offset":
            buf = self.values((numel + 3,), dtype)
            return buf[3:].view(shape)
        if layout == "size1-strides" and 1 in shape:
            strides, step = [], 1
            for n in reversed(shape):
                strides.append(step if n != 1 else 7)
                step *= max(n, 1) if n != 1 else 1
            t = torch.empty_strided(shape, tuple(reversed(strides)), dtype=dtype)
            return t.copy_(self.values(shape, dtype))
        return self.values(shape, dtype)

    def read(self, like, layout):
        """A tensor with `like`'s dtype and shape for a list the op only reads, in `layout`
        (which may differ from `like`'s: the backends copy it into `like`'s order)."""
        shape, dtype = tuple(like.shape), like.dtype
        if layout == "gaps" and len(shape) >= 1 and like.numel():
            return self.values(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]
        if layout == "transposed" and len(shape) >= 2:
            return self.values(shape[::-1], dtype).permute(*reversed(range(len(shape))))
        if layout == "same":
            return torch.empty_like(like).copy_(self.values(shape, dtype))
        return self.dense(shape, dtype, layout)


@st.composite
def examples(draw, op, backend):
    """(lists, scalars, fault): the op's tensor lists, its scalar arguments, the fault kind."""
    gen = Gen(draw(st.integers(0, 2 ** 31 - 1)))
    n = draw(st.integers(0, MAX_LEN[backend]))
    big = TRITON_BLOCK + 1 if backend == "triton" else CPU_CHUNK + 1
    uniform_dtype = draw(st.sampled_from((None,) + DTYPES))
    first, bigs = [], 0
    for _ in range(n):
        dtype = uniform_dtype or draw(st.sampled_from(DTYPES))
        kind = draw(st.sampled_from(("empty", "one", "odd", "odd", "odd", "4d", "4d", "past")))
        if kind == "past" and bigs < 2:
            bigs += 1
            shape = (big + 2 * draw(st.integers(0, 20)),)
        elif kind == "empty":
            shape = draw(st.sampled_from(((0,), (3, 0, 2))))
        elif kind == "one":
            shape = draw(st.sampled_from(((1,), (1, 1, 1, 1))))
        elif kind == "4d":
            shape = tuple(draw(st.integers(1, 5)) for _ in range(4))
        else:
            odd = 2 * draw(st.integers(1, 150)) + 1
            shape = draw(st.sampled_from(((odd,), (odd, 1), (1, odd))))
        layout = draw(st.sampled_from(("contiguous", "channels_last", "offset", "size1-strides")))
        first.append(gen.dense(shape, dtype, layout))
    n_lists = {"sum_sq": 2, "dot_sum_sq": 2, "perturb_": 3}.get(op, 2)
    lists = [first]
    for k in range(1, n_lists):
        if op == "sum_sq" and k == 1 and draw(st.booleans()):
            lists.append([])  # no weights
            continue
        if op == "perturb_" and k == 2:  # backup: written, so in the params' layout; or none
            lists.append([torch.empty_like(t).fill_(float("nan")) for t in first]
                         if draw(st.booleans()) else [])
            continue
        layouts = ("same", "same", "contiguous", "channels_last", "offset", "gaps", "transposed")
        lists.append([gen.read(t, draw(st.sampled_from(layouts))) for t in first])
    if op == "restore_":  # params are overwritten: start them as NaN
        lists[0] = [t.fill_(float("nan")) if t.numel() else t for t in first]
    # scalars away from fp32's subnormals (a·x would underflow in the fp32 element maths while
    # the float64 oracle keeps it: a rounding fact, not a kernel error)
    real = lambda lo, hi: st.floats(lo, hi).filter(lambda v: v == 0 or abs(v) > 1e-3)  # noqa
    scalars = {
        "eta": draw(st.sampled_from((0.0, 0.05))),
        "rho": draw(real(0.01, 2.0)), "eps": draw(st.sampled_from((1e-12, 0.25))),
        "adaptive": draw(st.booleans()),
        "sum_sq": torch.tensor(draw(st.floats(0.0, 50.0)),
                               dtype=draw(st.sampled_from((torch.float32, torch.float64)))
                               ).reshape(draw(st.sampled_from(((), (1,))))),
        "stats": torch.tensor([draw(real(-3.0, 3.0)), draw(real(0.5, 9.0)),
                               draw(real(0.5, 9.0))],
                              dtype=draw(st.sampled_from((torch.float32, torch.float64)))),
        "gamma": draw(real(-1.0, 1.0)), "theta": draw(real(0.0, 1.0)),
        "a": draw(real(-2.0, 2.0)), "b": draw(st.sampled_from((0.0, 1.0, -0.75))),
    }
    if op == "axpby_" and scalars["b"] == 0.0:  # ys is not read: poison it
        lists[0] = [t.fill_(float("nan")) if t.numel() else t for t in first]
    with_elems = [i for i, t in enumerate(first) if t.numel() > 0]
    if op in WRITES and with_elems and draw(st.booleans()) and \
            not (op == "restore_" or op == "axpby_" and scalars["b"] == 0.0):
        # allowed aliasing: the written tensor itself at its own position of the read list
        # (not where the written list starts as NaN: the oracle would be NaN)
        i = draw(st.sampled_from(with_elems))
        lists[1][i] = first[i]
    fault = draw(st.sampled_from((None,) * 4 + ("alias",) * 3 + FAULTS))
    fault = _inject(draw, gen, op, lists, scalars, fault)
    return lists, scalars, fault


def _inject(draw, gen, op, lists, scalars, fault):
    """Puts one fault of kind `fault` into the example; the fault that was made (or None when
    this example has no room for it)."""
    first = lists[0]
    with_elems = [i for i, t in enumerate(first) if t.numel() > 0]
    if fault is None or (not first and fault != "type"):
        return None
    other = next((k for k in range(1, len(lists)) if lists[k]), None)
    i = draw(st.sampled_from(with_elems)) if with_elems else 0
    if fault == "alias":
        if op not in WRITES or not with_elems:
            return None
        how = draw(st.sampled_from(("twice", "overlap", "other-position", "scalar")))
        t = first[i]
        if how == "twice":
            for xs in lists:
                if xs:
                    xs.append(t if xs is first else gen.read(t, "same"))
        elif how == "overlap" and t.dim() >= 1 and t.is_contiguous() and t.numel() > 1:
            view = t.view(-1)[1:]
            for xs in lists:
                if xs:
                    xs.append(view if xs is first else gen.read(view, "same"))
        elif how == "scalar" and op in ("perturb_", "orth_combine_") and \
                t.dtype in (torch.float32, torch.float64) and t.is_contiguous() and \
                t.numel() >= 3:
            key, size = ("sum_sq", 1) if op == "perturb_" else ("stats", 3)
            scalars[key] = t.view(-1)[:size].reshape(() if size == 1 else (3,))
        elif other is not None and len(with_elems) >= 2:
            j = next(k for k in with_elems if k != i)
            if first[j].shape == first[i].shape and first[j].dtype == first[i].dtype:
                lists[other][j] = first[i]
            else:
                return None
        else:
            return None
        return "alias"
    if fault == "type":
        target = lists[draw(st.integers(0, len(lists) - 1))]
        target.append(draw(st.sampled_from((1.5, None, "x"))))
        return "type"
    if fault == "float8":
        f8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                          "float8_e5m2fnuz") if hasattr(torch, n)]
        dtype = draw(st.sampled_from(f8))
        k = draw(st.integers(0, len(lists) - 1))
        if not lists[k]:
            return None
        lists[k][i] = lists[k][i].to(dtype)
        return "float8"
    if fault == "strided-first":
        if first[i].numel() < 2:
            return None
        first[i] = gen.values((2 * first[i].numel(),), first[i].dtype)[::2]
        for xs in lists[1:]:
            if xs:
                xs[i] = gen.read(first[i].contiguous(), "same")
        return "strided-first"
    if other is None:
        return None
    if fault == "dtype":
        t = lists[other][i]
        lists[other][i] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
        return "dtype"
    if fault == "shape":
        lists[other][i] = gen.values((first[i].numel() + 1,), first[i].dtype)
        return "shape"
    lists[other].append(gen.values((3,), first[i].dtype))  # length
    return "length"


# ---------------------------------------------------------------------------- calls, oracles
def _call(op, lists, s, backend):
    if op == "sum_sq":
        return ops.sum_sq(lists[0], lists[1] or None, s["eta"], backend=backend)
    if op == "dot_sum_sq":
        return ops.dot_sum_sq(lists[0], lists[1], backend=backend)
    if op == "perturb_":
        return ops.perturb_(lists[0], lists[1], s["sum_sq"], s["rho"], s["eps"],
                            adaptive=s["adaptive"], eta=s["eta"], backup=lists[2] or None,
                            backend=backend)
    if op == "restore_":
        return ops.restore_(lists[0], lists[1], backend=backend)
    if op == "orth_combine_":
        return ops.orth_combine_(lists[0], lists[1], s["stats"], s["gamma"], s["eps"],
                                 backend=backend)
    if op == "lerp_sum_sq_":
        return ops.lerp_sum_sq_(lists[0], lists[1], s["theta"], backend=backend)
    return ops.axpby_(lists[0], lists[1], s["a"], s["b"], backend=backend)


def _f64(xs):
    return [x.detach().to(torch.float64, copy=True) for x in xs]


def _bytes(t):
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().view(ints[t.element_size()]).clone()


def _memory(lists, scalars):
    """Every tensor argument's bytes (a view's whole base, so writes next to it show too)."""
    out = []
    tensors = [t for xs in lists for t in xs if isinstance(t, torch.Tensor)]
    tensors += [v for v in scalars.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        base = t._base if t._base is not None else t
        out.append((base, _bytes(base)))
    return out


def _sum_check(got, terms_by_tensor, dtypes, what):
    """A float64 reduction against Σ terms, within each tensor's sum_rtol × Σ|terms|."""
    assert got.dtype == torch.float64, f"{what}: dtype {got.dtype}"
    want = sum((t.sum() for t in terms_by_tensor), torch.zeros((), dtype=torch.float64))
    tol = sum((TOL[d][2] * t.abs().sum() for t, d in zip(terms_by_tensor, dtypes)),
              torch.zeros((), dtype=torch.float64))
    assert abs(float(got) - float(want)) <= float(tol) + 1e-300, \
        f"{what}: got {float(got)!r}, expected {float(want)!r} ± {float(tol):.3g}"


def assert_close_list(actual, expected, mags, what):
    """test_ops.assert_close_list, where a float64 result beyond the stored dtype's range must be
    stored as the infinity of its sign (a zero sum_sq with eps 1e-12 scales by 1e12)."""
    expected, mags = [e.clone() for e in expected], [m.clone() for m in mags]
    for i, (a, e, m) in enumerate(zip(actual, expected, mags)):
        big = e.abs() > torch.finfo(a.dtype).max
        if bool(big.any()):
            got = a.detach().double()[big]
            assert bool((got == e[big].sign() * math.inf).all()), f"{what}[{i}]: overflow"
            e[big], m[big] = 0.0, math.inf
    _assert_close_list(actual, expected, mags, what)


def _check_result(op, lists, before, s, out):
    """`before`: float64 copies of every list before the call."""
    dtypes = [t.dtype for t in lists[0]]
    if op == "sum_sq":
        if lists[1]:
            terms = [((w.abs() + s["eta"]) * x) ** 2 for x, w in zip(before[0], before[1])]
        else:
            terms = [x * x for x in before[0]]
        _sum_check(out, terms, dtypes, "sum_sq")
    elif op == "dot_sum_sq":
        a, b = before
        assert out.shape == (3,)
        _sum_check(out[0], [x * y for x, y in zip(a, b)], dtypes, "dot_sum_sq[0]")
        _sum_check(out[1], [x * x for x in a], dtypes, "dot_sum_sq[1]")
        _sum_check(out[2], [y * y for y in b], dtypes, "dot_sum_sq[2]")
    elif op == "perturb_":
        scale = s["rho"] / (math.sqrt(float(s["sum_sq"])) + s["eps"])
        exp, mags = [], []
        for p, d in zip(before[0], before[1]):
            step = scale * ((p.abs() + s["eta"]) ** 2 if s["adaptive"] else 1.0) * d
            exp.append(p + step)
            mags.append(p.abs() + step.abs() + 1e-30)
        assert_close_list(lists[0], exp, mags, "perturb_ params")
        if lists[2]:
            assert_bitwise_equal(lists[2], [p.to(t.dtype) for p, t in zip(before[0], lists[2])],
                                 "perturb_ backup")
    elif op == "restore_":
        assert_bitwise_equal(lists[0], [b.to(t.dtype) for b, t in zip(before[1], lists[0])],
                             "restore_ params")
    elif op == "orth_combine_":
        dot, m_sq, d_sq = s["stats"].double().tolist()
        m_norm, d_norm = math.sqrt(m_sq), math.sqrt(d_sq)
        c = dot / (m_norm * d_norm + s["eps"]) * m_norm / (d_norm + s["eps"])
        g = s["gamma"]
        exp = [d - g * (m - c * d) for d, m in zip(before[0], before[1])]
        mags = [d.abs() + abs(g) * (m.abs() + abs(c) * d.abs()) for d, m in zip(*before)]
        assert_close_list(lists[0], exp, mags, "orth_combine_ d")
    elif op == "lerp_sum_sq_":
        th = s["theta"]
        exp = [(1 - th) * e + th * gg for e, gg in zip(*before)]
        mags = [(1 - th) * e.abs() + th * gg.abs() for e, gg in zip(*before)]
        assert_close_list(lists[0], exp, mags, "lerp_sum_sq_ ema")
        _sum_check(out, [e.double() ** 2 for e in lists[0]], dtypes, "lerp_sum_sq_ result")
    else:
        a, b = s["a"], s["b"]
        if b == 0:
            exp = [a * x for x in before[1]]
            mags = [e.abs() for e in exp]
        else:
            exp = [a * x + b * y for x, y in zip(before[1], before[0])]
            mags = [abs(a) * x.abs() + abs(b) * y.abs() for x, y in zip(before[1], before[0])]
        assert_close_list(lists[0], exp, mags, "axpby_ ys")


def _run_example(op, backend, example):
    lists, scalars, fault = example
    n = len(lists[0])
    event(f"fault: {fault}")
    event(f"list length: {'0' if n == 0 else '1-5' if n <= 5 else '6-20' if n <= 20 else '21-50'}")
    event(f"elements: {sum(t.numel() for t in lists[0] if isinstance(t, torch.Tensor))}"
          .replace("elements: 0", "elements: none"))
    memory = _memory(lists, scalars)
    if fault is None:
        before = [_f64(xs) for xs in lists]
        out = _call(op, lists, scalars, backend)
        _check_result(op, lists, before, scalars, out)
        written = {t.data_ptr() for t in lists[0] if t.numel()}
        for k, xs in enumerate(lists):  # the lists the op only reads are unchanged
            if k == 0 or (op == "perturb_" and k == 2):
                continue
            for t, (base, saved) in zip(xs, memory[sum(len(x) for x in lists[:k]):]):
                if t.data_ptr() not in written:  # (the allowed same-position alias)
                    assert torch.equal(_bytes(base), saved), f"{op} wrote read list {k}"
        return
    with pytest.raises((ValueError, TypeError)) as info:
        _call(op, lists, scalars, backend)
    for base, saved in memory:
        assert torch.equal(_bytes(base), saved), f"{op} ({fault}) changed an input: {info.value}"
    if backend != "reference":  # one message on every backend
        with pytest.raises(type(info.value)) as ref:
            _call(op, lists, scalars, "reference")
        assert str(info.value) == str(ref.value)
    if fault == "alias":
        assert "overlap in memory" in str(info.value)


def _make_test(op, backend):
    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    @given(example=examples(op, backend))
    def run(example):
        _run_example(op, backend, example)
    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_primitive_properties(op, backend):
    torch.set_num_threads(1)
    _make_test(op, backend)()


# ---------------------------------------------------------------------------- non-finite input
# Issue 19: the reference backend is the definition on non-finite and extreme input too. Random
# lists with ±inf, NaN, values near the dtype's largest, subnormals and zeros injected, random
# scalars including ones that round to 0 in fp32; every other backend must give the reference's
# result: NaN where it has NaN, the same infinity, and finite values within rounding.
NONFINITE_OPS = ("sum_sq", "dot_sum_sq", "perturb_", "orth_combine_", "lerp_sum_sq_", "axpby_",
                 "scale_", "add_scaled_", "sum_sq_per_tensor")
NONFINITE_EXAMPLES = {"cpu": 40, "triton": 8}


def _special(kind, dtype, backend):
    info = torch.finfo(dtype)
    if kind == "sub" and dtype == torch.bfloat16 and backend == "triton":
        kind = "zero"  # the Triton interpreter flushes bf16 subnormals to 0 when it loads them
    # fp64: stay where squares and their sums cannot overflow fp64 (where the summation order
    # would decide between inf and a finite sum)
    big = 1e150 if dtype == torch.float64 else float(info.max) * 0.75
    return {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "big": big, "-big": -big,
            "sub": float(info.smallest_normal) / 4, "zero": 0.0}[kind]


@st.composite
def nonfinite_examples(draw, op, backend):
    gen = Gen(draw(st.integers(0, 2 ** 31 - 1)))
    n = draw(st.integers(1, 4 if backend != "triton" else 2))
    n_lists = {"sum_sq": 2, "perturb_": 2, "scale_": 1, "sum_sq_per_tensor": 1}.get(op, 2)
    kinds = st.sampled_from(("inf", "-inf", "nan", "big", "-big", "sub", "zero"))
    lists = [[] for _ in range(n_lists)]
    for _ in range(n):
        dtype = draw(st.sampled_from(DTYPES))
        size = draw(st.sampled_from((1, 3, 17, 65)))
        for xs in lists:
            t = gen.values((size,), dtype)
            for _ in range(draw(st.integers(0, 3))):
                t[draw(st.integers(0, size - 1))] = _special(draw(kinds), dtype, backend)
            xs.append(t)
    if op == "sum_sq" and draw(st.booleans()):
        lists[1] = []
    num = st.sampled_from((0.0, 1e-50, -0.75, 1.0, 2.5, 1e30, math.inf))
    scalars = {
        "eta": draw(st.sampled_from((0.0, 0.05))), "rho": draw(st.sampled_from((0.05, 1.0))),
        "eps": draw(st.sampled_from((0.0, 1e-12))), "adaptive": draw(st.booleans()),
        "sum_sq": torch.tensor(draw(st.sampled_from((1e-40, 1e-20, 1.0, 1e40, math.inf))),
                               dtype=torch.float64),
        "stats": torch.tensor([draw(st.sampled_from((-1e30, -1.0, 0.0, 2.0, 1e30))),
                               draw(st.sampled_from((1.0, 4.0, 1e60))),
                               draw(st.sampled_from((1e-30, 1.0, 9.0)))], dtype=torch.float64),
        "gamma": draw(st.sampled_from((0.0, -0.5, 0.5, 2.0))),
        "theta": draw(st.sampled_from((0.0, 0.3, 0.99999, 1.0))),
        "a": draw(num), "b": draw(num),
        "factor": torch.tensor(draw(num), dtype=torch.float64) if draw(st.booleans())
        else torch.tensor([draw(num) for _ in range(n)], dtype=torch.float64),
    }
    return lists, scalars


def _call_any(op, lists, s, backend):
    if op == "scale_":
        return ops.scale_(lists[0], s["factor"], backend=backend)
    if op == "add_scaled_":
        return ops.add_scaled_(lists[0], lists[1], s["factor"], backend=backend)
    if op == "sum_sq_per_tensor":
        return ops.sum_sq_per_tensor(lists[0], backend=backend)
    if op == "perturb_":
        lists = lists + [[]]
    return _call(op, lists, s, backend)


def _assert_same_as_reference(got, ref, rtol, what):
    g, r = got.detach().double().reshape(-1), ref.detach().double().reshape(-1)
    assert bool((torch.isnan(g) == torch.isnan(r)).all()), f"{what}: NaN differs: {g} vs {r}"
    assert bool((torch.isposinf(g) == torch.isposinf(r)).all() and
                (torch.isneginf(g) == torch.isneginf(r)).all()), f"{what}: inf differs: {g} vs {r}"
    if rtol is None:  # the classes only
        return
    fin = torch.isfinite(r)
    tiny = 2.0 ** -133  # a couple of fp32 subnormal spacings
    ok = (g[fin] - r[fin]).abs() <= rtol * r[fin].abs() + tiny
    assert bool(ok.all()), f"{what}: {g[fin][~ok].tolist()} vs {r[fin][~ok].tolist()}"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("op", NONFINITE_OPS)
def test_non_finite_input_matches_the_reference(op, backend):
    torch.set_num_threads(1)

    @settings(max_examples=NONFINITE_EXAMPLES[backend], deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    @given(example=nonfinite_examples(op, backend))
    def run(example):
        lists, s = example
        mine = [[t.clone() for t in xs] for xs in lists]
        ref = [[t.clone() for t in xs] for xs in lists]
        out = _call_any(op, mine, s, backend)
        ref_out = _call_any(op, ref, s, "reference")
        if out is not None:
            # reductions sum in different orders: cancellation leaves rounding of the terms
            terms = sum(float((t.double() ** 2).sum()) for xs in lists for t in xs
                        if bool(torch.isfinite(t).all()))
            g, r = out.double(), ref_out.double()
            _assert_same_as_reference(g, r, None, f"{op} result")
            fin = torch.isfinite(r)
            scale = r.abs() + terms
            assert bool(((g - r).abs()[fin] <= 2e-5 * scale[fin] + 1e-300).all()), \
                f"{op}: {g.tolist()} vs {r.tolist()}"
        for k in range(len(lists)):
            for a, b in zip(mine[k], ref[k]):
                rtol = 2.0 ** -7 if a.dtype == torch.bfloat16 else TOL[a.dtype][0]
                _assert_same_as_reference(a, b, rtol, f"{op} list {k}")
    run()
