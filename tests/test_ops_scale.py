"""scale_, add_scaled_ and sum_sq_per_tensor (the primitives that let an optimizer step run
without torch._foreach_* of its own) on every (backend, device) this machine runs, against
float64 maths written here on fresh random data: every dtype, odd sizes, empty tensors and lists,
the CPU chunk boundary, channels_last, 0-d and per-tensor factors, non-finite values, aliasing,
factor errors, determinism, and torch.compile(fullgraph=True)."""
import math

import pytest
import torch

from sam_kernels import ops
from sam_kernels.ops import _registry
from test_ops import (CASE_IDS, CASES, TOL, Spec, assert_bitwise_equal, assert_close_list,
                      clone_all, f64, make, skip_unless_device_known)
from test_ops_nonfinite import assert_matches

FACTOR_KINDS = ("one", "per-tensor")
FACTOR_DTYPES = (torch.float64, torch.float32)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _factor(kind, n, dtype, device, low=-2.0, high=2.0):
    """A fresh random factor: 0-d, or one per tensor (shape (n,))."""
    shape = () if kind == "one" else (n,)
    return (torch.rand(shape, dtype=torch.float64) * (high - low) + low).to(dtype).to(device)


def _per_tensor(factor, specs):
    """The factor each tensor sees, as a Python float rounded to its element maths type."""
    values = [factor.item()] * len(specs) if factor.dim() == 0 else factor.tolist()
    return [float(torch.tensor(v, dtype=torch.float64).to(_acc(s.dtype))) for v, s in
            zip(values, specs)]


# ---------------------------------------------------------------------------- scale_
@pytest.mark.parametrize("fdtype", FACTOR_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", FACTOR_KINDS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_scale(backend_device, case, kind, fdtype):
    backend, device = backend_device
    specs = CASES[case]
    skip_unless_device_known(specs, device)
    xs = make(specs, device)
    factor = _factor(kind, len(specs), fdtype, device)
    before = f64(xs)
    ops.scale_(xs, factor, backend=backend)
    fs = _per_tensor(factor, specs)
    expected = [f * x for f, x in zip(fs, before)]
    assert_close_list(xs, expected, [e.abs() for e in expected], "scale_ xs")
    for x, s in zip(xs, specs):  # in place: dtype, shape and layout kept
        assert x.dtype == s.dtype and tuple(x.shape) == s.shape


# ---------------------------------------------------------------------------- add_scaled_
@pytest.mark.parametrize("fdtype", FACTOR_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", FACTOR_KINDS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_add_scaled(backend_device, case, kind, fdtype):
    backend, device = backend_device
    specs = CASES[case]
    skip_unless_device_known(specs, device)
    ys, xs = make(specs, device), make(specs, device)
    alpha = _factor(kind, len(specs), fdtype, device)
    ys_before, xs_before = f64(ys), f64(xs)
    ops.add_scaled_(ys, xs, alpha, backend=backend)
    al = _per_tensor(alpha, specs)
    expected = [y + a * x for y, a, x in zip(ys_before, al, xs_before)]
    mags = [y.abs() + abs(a) * x.abs() for y, a, x in zip(ys_before, al, xs_before)]
    assert_close_list(ys, expected, mags, "add_scaled_ ys")
    assert_bitwise_equal(xs, [x.to(s.dtype) for x, s in zip(xs_before, specs)],
                         "add_scaled_ xs (only read)")


# ---------------------------------------------------------------------------- sum_sq_per_tensor
@pytest.mark.parametrize("case", CASE_IDS)
def test_sum_sq_per_tensor(backend_device, case):
    backend, device = backend_device
    specs = CASES[case]
    skip_unless_device_known(specs, device)
    xs = make(specs, device)
    before = f64(xs)
    got = ops.sum_sq_per_tensor(xs, backend=backend)
    assert got.dtype == torch.float64 and got.shape == (len(specs),)
    assert got.device.type == torch.device(device).type
    want = torch.stack([(x * x).sum() for x in before]) if specs else torch.zeros(0)
    # squares of fp32/fp16/bf16 values are exact in fp64; only the summation order rounds
    tol = torch.tensor([TOL[s.dtype][2] * float((x * x).sum()) for s, x in zip(specs, before)],
                       dtype=torch.float64)
    err = (got.cpu() - want).abs()
    assert bool((err <= tol).all()), f"got {got.tolist()}, expected {want.tolist()}"
    assert_bitwise_equal(xs, [x.to(s.dtype) for x, s in zip(before, specs)], "xs (only read)")


def test_sum_sq_per_tensor_of_huge_and_non_finite_values(backend_device):
    """Each tensor's sum is its own: an inf or NaN in one tensor does not leak into the others;
    finite fp32 values near 1e19 (squares beyond fp32's range) give finite sums."""
    backend, device = backend_device
    xs = [torch.tensor([3e19, -3e19], device=device),
          torch.tensor([1.0, math.inf], device=device),
          torch.tensor([math.nan, 1.0], device=device), torch.tensor([2.0, 0.5], device=device),
          torch.tensor([-math.inf], device=device, dtype=torch.float64)]
    got = ops.sum_sq_per_tensor(xs, backend=backend).cpu()
    assert got[0].item() == pytest.approx(2 * 9e38, rel=1e-6)
    assert got[1].item() == math.inf and math.isnan(got[2].item())
    assert got[3].item() == 4.25 and got[4].item() == math.inf


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu")
                                     if b in ops.available_backends("cpu")])
def test_sum_sq_per_tensor_does_not_depend_on_the_thread_count(backend):
    specs = [Spec((2 * 65536 + 3,), torch.float32), Spec((5, 123, 7), torch.bfloat16),
             Spec((40_000,), torch.float64)] + [Spec((i % 13 + 1, 97), torch.float32)
                                                 for i in range(12)]
    xs = make(specs, "cpu")
    torch.set_num_threads(1)
    one = ops.sum_sq_per_tensor(xs, backend=backend)
    torch.set_num_threads(2)
    two = ops.sum_sq_per_tensor(xs, backend=backend)
    assert_bitwise_equal([two], [one], "2 threads vs 1")
    assert_bitwise_equal([ops.sum_sq_per_tensor(xs, backend=backend)], [two], "second run")


# ---------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_scale_and_add_scaled_on_non_finite_values(backend_device, dtype):
    """IEEE on every backend: factor · inf = ±inf, 0 · inf = NaN, NaN stays NaN; a factor that is
    inf or 0 multiplies every element."""
    backend, device = backend_device
    vals = [1.5, -math.inf, math.inf, math.nan, 0.0, -2.0]
    rtol = TOL[dtype][0]
    for factor in (0.0, -2.0, math.inf):
        x = torch.tensor(vals, dtype=torch.float64).to(dtype).to(device)
        want = factor * torch.tensor(vals, dtype=torch.float64)
        ops.scale_([x], torch.tensor(factor, dtype=torch.float64, device=device), backend=backend)
        assert_matches(x, want.to(dtype).double(), rtol, f"scale_ by {factor}")
        y = torch.tensor([1.0] * 6, dtype=dtype, device=device)
        xs = torch.tensor(vals, dtype=torch.float64).to(dtype).to(device)
        ops.add_scaled_([y], [xs], torch.tensor([factor], device=device), backend=backend)
        assert_matches(y, (1.0 + factor * torch.tensor(vals, dtype=torch.float64)).to(dtype).double(),
              rtol, f"add_scaled_ by {factor}")


# ---------------------------------------------------------------------------- argument errors
def _calls(op, xs, other, factor, backend):
    if op == "scale_":
        return ops.scale_(xs, factor, backend=backend)
    return ops.add_scaled_(xs, other, factor, backend=backend)


FACTOR_ERRORS = [
    ("length", lambda d: torch.ones(3, device=d),
     ValueError, r"{op}: {name} must be a 0-d tensor \(one factor for every tensor\) or have one "
                 r"factor per tensor \(shape \(2,\)\), got shape \[3\]"),
    ("shape-1-of-2", lambda d: torch.ones(1, device=d), ValueError, r"got shape \[1\]"),
    ("2d", lambda d: torch.ones(2, 1, device=d), ValueError, r"got shape \[2, 1\]"),
    ("device", lambda d: torch.ones((), device="meta"), ValueError,
     r"{op}: {name} is on meta but the tensors are on cpu"),
    ("integer", lambda d: torch.ones((), dtype=torch.int64, device=d), ValueError,
     r"{op}: {name} must be a dense float32 or float64 tensor, got torch.int64"),
    ("half", lambda d: torch.ones((), dtype=torch.float16, device=d), ValueError,
     r"must be a dense float32 or float64 tensor, got torch.float16"),
    ("strided", lambda d: torch.ones(4, device=d)[::2], ValueError,
     r"{op}: {name} must be contiguous"),
    ("float", lambda d: 0.5, TypeError, r"{op}: {name} must be a Tensor, got float"),
]


@pytest.mark.parametrize("error", FACTOR_ERRORS, ids=[e[0] for e in FACTOR_ERRORS])
@pytest.mark.parametrize("op", ["scale_", "add_scaled_"])
def test_bad_factors_raise_and_write_nothing(backend_device, op, error):
    backend, device = backend_device
    if error[0] == "device" and device != "cpu":
        pytest.skip("the meta-device factor case is written for CPU tensors")
    name = "factor" if op == "scale_" else "alpha"
    _, make_factor, exc, pattern = error
    xs = [torch.randn(4, 5, device=device), torch.randn(7, device=device)]
    other = [torch.randn(4, 5, device=device), torch.randn(7, device=device)]
    before = clone_all(xs) + clone_all(other)
    with pytest.raises(exc, match=pattern.format(op=op, name=name)) as info:
        _calls(op, xs, other, make_factor(device), backend)
    assert_bitwise_equal(xs + other, before, "after the error")
    if backend != "reference":  # one message on every backend
        with pytest.raises(exc) as ref:
            _calls(op, xs, other, make_factor(device), "reference")
        assert str(info.value) == str(ref.value)


def test_bad_lists_raise_the_same_errors(backend_device):
    backend, device = backend_device
    one = torch.ones((), device=device)
    with pytest.raises(ValueError, match=r"add_scaled_: ys has 1 tensors but xs has 2"):
        ops.add_scaled_([torch.ones(3, device=device)], [torch.ones(3, device=device)] * 2, one,
                        backend=backend)
    with pytest.raises(ValueError, match=r"add_scaled_: ys\[0\] and xs\[0\] differ in dtype"):
        ops.add_scaled_([torch.ones(3, device=device)], [torch.ones(3, device=device).double()],
                        one, backend=backend)
    with pytest.raises(ValueError, match=r"scale_: xs\[0\] has dtype torch.int64"):
        ops.scale_([torch.ones(3, dtype=torch.int64, device=device)], one, backend=backend)
    with pytest.raises(ValueError, match=r"sum_sq_per_tensor: xs\[1\] is not dense in memory"):
        ops.sum_sq_per_tensor([torch.ones(3, device=device), torch.ones(8, device=device)[::2]],
                              backend=backend)
    with pytest.raises(TypeError, match=r"sum_sq_per_tensor: xs must be a list or tuple"):
        ops.sum_sq_per_tensor(torch.ones(3, device=device), backend=backend)
    with pytest.raises(TypeError, match=r"scale_: xs\[1\] is a float, expected a Tensor"):
        ops.scale_([torch.ones(3, device=device), 1.0], one, backend=backend)


def test_empty_lists(backend_device):
    backend, device = backend_device
    out = ops.sum_sq_per_tensor([], backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float64
    ops.scale_([], torch.ones((), device=device), backend=backend)  # nothing to do, no error
    ops.scale_([], torch.ones(0, device=device), backend=backend)
    ops.add_scaled_([], [], torch.ones((), device=device), backend=backend)
    with pytest.raises(ValueError, match=r"scale_: factor must be a 0-d tensor .*got shape \[1\]"):
        ops.scale_([], torch.ones(1, device=device), backend=backend)


# ---------------------------------------------------------------------------- aliasing
def _alias_cases(device):
    """(op, xs, other, factor, message regex): a written tensor sharing memory with another
    argument."""
    base = torch.randn(20, device=device)
    fresh = lambda: torch.randn(4, device=device)  # noqa: E731
    one = torch.ones((), device=device)
    msg = lambda op, a, b: rf"{op}: {a} and {b} overlap in memory; {op} writes \w+ in place"  # noqa
    yield "scale_", [base[:4], base[:4]], None, one, msg("scale_", r"xs\[0\]", r"xs\[1\]")
    yield "scale_", [base[:4], base[2:6]], None, one, msg("scale_", r"xs\[0\]", r"xs\[1\]")
    yield "scale_", [base[:4], fresh()], None, base[3], msg("scale_", r"xs\[0\]", "factor")
    yield "scale_", [base[:4], fresh()], None, base[2:4], msg("scale_", r"xs\[0\]", "factor")
    yield "add_scaled_", [base[:4], base[:4]], [fresh(), fresh()], one, \
        msg("add_scaled_", r"ys\[0\]", r"ys\[1\]")
    yield "add_scaled_", [base[:4], fresh()], [fresh(), base[:4]], one, \
        msg("add_scaled_", r"ys\[0\]", r"xs\[1\]")
    yield "add_scaled_", [base[:4], fresh()], [base[1:5], fresh()], one, \
        msg("add_scaled_", r"ys\[0\]", r"xs\[0\]")
    yield "add_scaled_", [base[:4], fresh()], [fresh(), fresh()], base[0], \
        msg("add_scaled_", r"ys\[0\]", "alpha")


def test_aliased_arguments_are_refused_before_any_write(backend_device):
    backend, device = backend_device
    for op, xs, other, factor, pattern in _alias_cases(device):
        tensors = xs + (other or []) + [factor]
        snapshot = [(t._base if t._base is not None else t).clone() for t in tensors]
        with pytest.raises(ValueError, match=pattern) as info:
            _calls(op, xs, other, factor, backend)
        now = [t._base if t._base is not None else t for t in tensors]
        assert_bitwise_equal(now, snapshot, f"{op}: memory after the error")
        if backend != "reference":
            with pytest.raises(ValueError) as ref:
                _calls(op, xs, other, factor, "reference")
            assert str(info.value) == str(ref.value)


def test_add_scaled_of_a_tensor_onto_itself_is_allowed(backend_device):
    """The very same tensor at the same position of the read list: y ← y + alpha·y."""
    backend, device = backend_device
    y = torch.randn(37, device=device)
    expected = y.double() * 1.5
    ops.add_scaled_([y], [y], torch.tensor(0.5, device=device), backend=backend)
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=0)


def test_writes_bump_the_version_counter_and_refuse_grad(backend_device):
    backend, device = backend_device
    p = torch.randn(4, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        ops.scale_([p], torch.ones((), device=device), backend=backend)
    x = torch.randn(4, device=device)
    factor = torch.ones((), device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"scale_: factor requires grad and grad mode is on"):
        ops.scale_([x], factor, backend=backend)
    version = x._version
    ops.add_scaled_([x], [torch.randn(4, device=device)], torch.ones((), device=device),
                    backend=backend)
    assert x._version > version


# ---------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_clipping_step_matches_eager():
    """Gradient clipping and an SGD update with the new primitives only, through the cpu
    backend module (resolved outside the step, as the optimizers do), in one graph."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    backend = _registry.resolve("cpu", "cpu")

    def step(params, grads, lrs):
        per_tensor = backend.sum_sq_per_tensor(grads)
        total = backend.sum_sq(grads, [], 0.0)
        factor = torch.clamp(1.0 / (total.sqrt() + 1e-6), max=1.0)  # max_norm = 1
        backend.scale_(grads, factor)
        backend.add_scaled_(params, grads, -lrs)
        return per_tensor, total

    specs = [Spec((5, 13), torch.float32), Spec((7,), torch.float32),
             Spec((3, 3), torch.float64)]
    params, grads = make(specs, "cpu"), make(specs, "cpu")
    lrs = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    eager_p, eager_g = clone_all(params), clone_all(grads)
    comp_p, comp_g = clone_all(params), clone_all(grads)
    torch._dynamo.reset()
    out_eager = step(eager_p, eager_g, lrs)
    out_comp = torch.compile(step, fullgraph=True)(comp_p, comp_g, lrs)
    for a, b in zip(out_comp, out_eager):
        assert torch.equal(a, b)  # the kernels' own sums: bitwise
    # the factor is computed by inductor's code in the graph: equal to rounding
    torch.testing.assert_close(comp_g, eager_g, rtol=1e-6, atol=0)
    torch.testing.assert_close(comp_p, eager_p, rtol=1e-6, atol=1e-7)
    norm = float(out_eager[1].sqrt())
    assert norm > 1.0  # the clipping did something
    clipped = math.sqrt(sum(float((g.double() ** 2).sum()) for g in eager_g))
    assert abs(clipped - 1.0) < 1e-5


def test_reference_op_count_does_not_grow_with_the_tensor_count():
    """The reference backend runs a constant number of torch ops for small tensors, per-tensor
    factors included (the optimizers' op-count tests rely on it)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    def count(n):
        specs = [Spec((i % 5 + 1, 3), torch.float32) for i in range(n)]
        xs, ys = make(specs, "cpu"), make(specs, "cpu")
        per_tensor = torch.rand(n, dtype=torch.float64)
        with Count() as c:
            ops.scale_(xs, per_tensor, backend="reference")
            ops.scale_(xs, per_tensor[0], backend="reference")
            ops.add_scaled_(ys, xs, per_tensor, backend="reference")
            ops.sum_sq_per_tensor(xs, backend="reference")
        return c.ops

    small, large = count(2), count(20)
    assert small == large, (small, large)
    assert sum(small.values()) > 0
