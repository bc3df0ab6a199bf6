"""Argument checks for the Python backends (reference, triton) and the fake kernels, plus the
layout alignment every backend applies before its checks. Same rules, order and message
template as csrc/include/sam_kernels/list_checks.h, which the compiled backends use.

Order of the checks of one call (the first failure is reported, before anything is written):
1. types: every list a list/tuple of Tensors, the device scalar a Tensor (TypeError);
2. every tensor strided, on the call's device type, of a supported dtype, dense in memory;
   every other list paired with the first (length, dtype, shape, memory order);
3. the device scalar (`sum_sq`: 1 element, shape () or (1,); `stats`: shape (3,)), contiguous,
   float32/float64, on the same device type;
4. aliasing: a tensor the op writes shares memory with no other argument, except with the very
   same tensor at the same position of a list the op only reads (`axpby_([p], [p], ...)`).
"""
import bisect
from typing import List, Optional, Sequence, Tuple

import torch

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = "float32, float64, float16 and bfloat16"

# The lists each primitive writes (the others are only read); see csrc/register.cpp's schemas.
WRITTEN = {"perturb_": ("params", "backup"), "restore_": ("params",), "orth_combine_": ("d",),
           "lerp_sum_sq_": ("ema",), "axpby_": ("ys",), "scale_": ("xs",),
           "add_scaled_": ("ys",)}


# ---------------------------------------------------------------------------- 1. types
def as_list(op: str, name: str, xs) -> list:
    """`xs` as a list, for the public functions: a bare Tensor or str is refused (list() would
    silently iterate its rows / characters)."""
    if isinstance(xs, (torch.Tensor, str, bytes)) or not hasattr(xs, "__iter__"):
        raise TypeError(f"{op}: {name} must be a list or tuple of Tensors, got "
                        f"{type(xs).__name__}")
    return list(xs)


def check_types(op: str, lists: Sequence[Tuple[str, Sequence[torch.Tensor]]],
                scalar: Optional[Tuple[str, torch.Tensor, int]] = None) -> None:
    for name, xs in lists:
        if isinstance(xs, (torch.Tensor, str, bytes)) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list or tuple of Tensors, got "
                            f"{type(xs).__name__}")
        for i, t in enumerate(xs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, expected a Tensor")
    if scalar is not None and not isinstance(scalar[1], torch.Tensor):
        raise TypeError(f"{op}: {scalar[0]} must be a Tensor, got {type(scalar[1]).__name__}")


# ---------------------------------------------------------------------------- 2. lists
def check_tensor_list(op: str, name: str, xs: Sequence[torch.Tensor], device_type: str) -> None:
    for i, t in enumerate(xs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, expected a Tensor")
        if t.layout != torch.strided:
            raise ValueError(f"{op}: {name}[{i}] is not a dense (strided) tensor; sparse tensors "
                             "are not supported")
        if t.device.type != device_type:
            raise ValueError(f"{op}: {name}[{i}] is on {t.device} but this kernel runs on "
                             f"{device_type} tensors; keep every tensor of a call on one device")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{op}: {name}[{i}] has dtype {t.dtype}; supported dtypes are "
                             f"{SUPPORTED_DTYPES}")
        if not dense(t):
            raise ValueError(f"{op}: {name}[{i}] is not dense in memory (a view with gaps or "
                             "overlaps); pass .contiguous() tensors")


def dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (torch's is_non_overlapping_and_dense): some permutation of the
    dims of size > 1 is contiguous, e.g. channels_last."""
    if t.is_contiguous() or t.numel() <= 1:
        return True
    dims = sorted((d for d in range(t.dim()) if t.size(d) != 1), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def same_memory_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two tensors of one shape store their elements in the same order: equal strides on every
    dim of size > 1 (the stride of a size-1 dim is never used, and autograd does not keep it:
    a (5, 1) parameter may get a gradient with strides (1, 5))."""
    return all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def check_paired_lists(op: str, a_name: str, a: Sequence[torch.Tensor], b_name: str,
                       b: Sequence[torch.Tensor]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{op}: {a_name} has {len(a)} tensors but {b_name} has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.dtype != y.dtype:
            raise ValueError(f"{op}: {a_name}[{i}] and {b_name}[{i}] differ in dtype "
                             f"({x.dtype} vs {y.dtype})")
        if x.shape != y.shape:
            raise ValueError(f"{op}: {a_name}[{i}] and {b_name}[{i}] differ in shape "
                             f"({list(x.shape)} vs {list(y.shape)})")
        if x.numel() > 1 and not same_memory_order(x, y):
            raise ValueError(f"{op}: {a_name}[{i}] and {b_name}[{i}] differ in memory layout "
                             f"(strides {list(x.stride())} vs {list(y.stride())}); a list the "
                             f"op writes must store its elements in {a_name}'s order (create "
                             "it with torch.empty_like)")


def aligned(first: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """`xs` (a list the op only reads, paired with `first`) with every tensor whose elements are
    stored in another order than its partner's, or with gaps, replaced by a copy in the
    partner's layout: such gradients are valid (autograd produces them), the kernels walk
    memory in order. Anything else that is wrong is left for the checks to report."""
    out = None
    for i, (f, x) in enumerate(zip(first, xs)):
        if not (isinstance(f, torch.Tensor) and isinstance(x, torch.Tensor)) or \
                f.layout != torch.strided or x.layout != torch.strided or \
                f.dtype != x.dtype or f.shape != x.shape or f.device != x.device or \
                f.dtype not in _DTYPES or f.numel() <= 1 or not dense(f):
            continue
        if same_memory_order(f, x) and dense(x):
            continue
        if out is None:
            out = list(xs)
        out[i] = torch.empty_like(f, requires_grad=False).copy_(x.detach())
    return list(xs) if out is None else out


# ---------------------------------------------------------------------------- 3. scalars
def _check_device_float(op: str, name: str, t: torch.Tensor, device_type: str) -> None:
    """What every device scalar/factor argument must be: a dense float32/float64 tensor on the
    tensors' device, contiguous."""
    if t.layout != torch.strided or t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: {name} must be a dense float32 or float64 tensor, got "
                         f"{t.dtype}" + ("" if t.layout == torch.strided else " (sparse)"))
    if t.device.type != device_type:
        raise ValueError(f"{op}: {name} is on {t.device} but the tensors are on {device_type}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; pass {name}.contiguous()")


def check_scalar_tensor(op: str, name: str, t: torch.Tensor, numel: int, device_type: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    shapes = ((), (1,)) if numel == 1 else ((numel,),)
    if tuple(t.shape) not in shapes:
        wanted = "shape () or (1,)" if numel == 1 else f"shape ({numel},)"
        raise ValueError(f"{op}: {name} must have {numel} element(s) ({wanted}), got shape "
                         f"{list(t.shape)}")
    _check_device_float(op, name, t, device_type)


def check_factor_tensor(op: str, name: str, t: torch.Tensor, n: int, device_type: str) -> None:
    """A device factor of scale_/add_scaled_: 0-d (one factor for every tensor) or shape (n,)
    (one per tensor of the n-tensor list); float32/float64, on the tensors' device, contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}; pass a 0-d "
                        "tensor (one factor) or a 1-d tensor with one factor per tensor, on "
                        "the tensors' device")
    if not (t.dim() == 0 or (t.dim() == 1 and t.shape[0] == n)):
        raise ValueError(f"{op}: {name} must be a 0-d tensor (one factor for every tensor) or "
                         f"have one factor per tensor (shape ({n},)), got shape {list(t.shape)}")
    _check_device_float(op, name, t, device_type)


# ---------------------------------------------------------------------------- 4. aliasing
def _span(t: torch.Tensor) -> Tuple[int, int]:
    """Bytes [lo, hi) the elements of a strided tensor with elements lie in."""
    lo = t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return lo, lo + (last + 1) * t.element_size()


def _real(t: torch.Tensor) -> bool:
    """Whether t has real memory to compare (not a fake/meta tensor of torch.compile)."""
    return t.device.type != "meta" and not isinstance(t, torch._subclasses.FakeTensor)


def overlap_message(op: str, a: str, b: str, written: str) -> str:
    return (f"{op}: {a} and {b} overlap in memory; {op} writes {written} in place, so a tensor "
            "it writes may share memory with no other argument (only with itself at the same "
            "position of a list the op only reads); pass distinct tensors: deduplicate the "
            "list, or .clone() one of them")


def check_no_overlap(op: str, lists: Sequence[Tuple[str, Sequence[torch.Tensor]]],
                     scalar: Optional[Tuple[str, torch.Tensor]] = None) -> None:
    """Check 4 (see the module docstring). Same algorithm as list_checks.h check_no_overlap, so
    both report the same pair: written spans sorted by (start, list, index) and swept; then
    each read tensor in argument order, then the scalar, against the written spans."""
    written_names = WRITTEN.get(op, ())
    if not written_names or torch.compiler.is_compiling():
        return
    spans = []  # (lo, hi, list position, index)
    reads = []
    for pos, (name, xs) in enumerate(lists):
        for i, t in enumerate(xs):
            if t.numel() == 0 or not _real(t):
                continue
            lo, hi = _span(t)
            (spans if name in written_names else reads).append((lo, hi, pos, i))
    if not spans:
        return

    def label(entry) -> str:
        return f"{lists[entry[2]][0]}[{entry[3]}]"

    def fail(w, other, other_label=None) -> None:
        pair = sorted([w, other], key=lambda e: (e[2], e[3])) if other_label is None else [w]
        labels = [label(e) for e in pair] + ([other_label] if other_label else [])
        raise ValueError(overlap_message(op, labels[0], labels[1], lists[w[2]][0]))

    spans.sort()
    widest = spans[0]
    for e in spans[1:]:
        if e[0] < widest[1]:
            fail(widest, e)
        if e[1] > widest[1]:
            widest = e
    starts = [e[0] for e in spans]
    for r in reads:
        k = bisect.bisect_left(starts, r[1]) - 1
        if k < 0 or spans[k][1] <= r[0]:
            continue
        w = spans[k]
        t_w, t_r = lists[w[2]][1][w[3]], lists[r[2]][1][r[3]]
        if not (w[3] == r[3] and w[0] == r[0] and same_memory_order(t_w, t_r)):
            fail(w, r)
    if scalar is not None and scalar[1].numel() and _real(scalar[1]):
        lo, hi = _span(scalar[1])
        k = bisect.bisect_left(starts, hi) - 1
        if k >= 0 and spans[k][1] > lo:
            fail(spans[k], None, scalar[0])


def overlaps_any(lists: Sequence[Sequence[torch.Tensor]], t: torch.Tensor) -> bool:
    """Whether `t` shares bytes with a tensor of `lists` (a cheap per-call look for backends
    whose full checks are cached; they then run the full checks to report it)."""
    if torch.compiler.is_compiling() or t.numel() == 0 or not _real(t) or \
            t.layout != torch.strided:
        return False  # (traced: addresses are the runtime's, the op's own checks see them)
    lo, hi = _span(t)
    for xs in lists:
        for x in xs:
            if isinstance(x, torch.Tensor) and x.numel() and x.layout == torch.strided and \
                    _real(x) and x.device == t.device:
                x_lo, x_hi = _span(x)
                if x_lo < hi and lo < x_hi:
                    return True
    return False


def check_grad_mode(op: str, lists: Sequence[Tuple[str, Sequence[torch.Tensor]]],
                    scalar: Optional[Tuple[str, torch.Tensor]] = None) -> None:
    """The ops that write have no derivative, so with grad mode on they refuse every tensor
    argument that requires grad, before anything is written: a written leaf (or a view of one)
    with torch's own message, anything else with ours. Same rule and order (arguments in
    schema order) as the compiled ops' Autograd kernel (csrc/register.cpp). Tensors saved for
    backward that do not require grad may be written: every backend bumps their version
    counter, so backward through them raises."""
    written = WRITTEN.get(op)
    if not written or not torch.is_grad_enabled():
        return
    entries = [(name, i, t) for name, xs in lists for i, t in enumerate(xs)]
    if scalar is not None:
        entries.append((scalar[0], None, scalar[1]))
    order = {name: k for k, name in enumerate(SCHEMA_ORDER[op])}
    for name, i, t in sorted(entries, key=lambda e: order[e[0]]):
        if not t.requires_grad:
            continue
        if name in written:
            if t.is_leaf:
                raise RuntimeError("a leaf Variable that requires grad is being used in an "
                                   "in-place operation.")
            base = t._base
            if base is not None and base.is_leaf and base.requires_grad:
                raise RuntimeError("a view of a leaf Variable that requires grad is being used "
                                   "in an in-place operation.")
        label = name if i is None else f"{name}[{i}]"
        raise RuntimeError(f"{op}: {label} requires grad and grad mode is on; the sam_kernels "
                           "primitives have no derivative: call them under torch.no_grad()")


#: Tensor arguments of each op in the order of its schema (csrc/register.cpp).
SCHEMA_ORDER = {
    "sum_sq": ("xs", "weights"), "dot_sum_sq": ("a", "b"),
    "perturb_": ("params", "dirs", "sum_sq", "backup"), "restore_": ("params", "backup"),
    "orth_combine_": ("d", "m", "stats"), "lerp_sum_sq_": ("ema", "g"), "axpby_": ("ys", "xs"),
    "scale_": ("xs", "factor"), "add_scaled_": ("ys", "xs", "alpha"), "sum_sq_per_tensor": ("xs",),
}


# ---------------------------------------------------------------------------- all checks
def check_op(op: str, lists: Sequence[Tuple[str, Sequence[torch.Tensor]]],
             scalar: Optional[Tuple[str, torch.Tensor, int]] = None,
             optional: Tuple[str, ...] = (), factor: Optional[Tuple[str, torch.Tensor]] = None
             ) -> None:
    """All checks of one primitive call, in the order of the module docstring. Lists named in
    `optional` (`weights`, `backup`) are skipped when empty: the contract passes them empty when
    they are not given. `factor`: (name, tensor) of scale_/add_scaled_'s device factor, 0-d or
    one per tensor of the first list (checked in place of a device scalar)."""
    check_types(op, lists, scalar)
    if factor is not None and not isinstance(factor[1], torch.Tensor):
        check_factor_tensor(op, factor[0], factor[1], len(lists[0][1]), "cpu")  # TypeError
    lists = [(n, xs) for n, xs in lists if not (n in optional and not len(xs))]
    first_name, first = lists[0]
    device_type = first[0].device.type if len(first) else "cpu"
    if not len(first) and factor is not None:
        device_type = factor[1].device.type  # nothing to scale: any device's factor will do
    check_tensor_list(op, first_name, first, device_type)
    for name, xs in lists[1:]:
        check_tensor_list(op, name, xs, device_type)
        check_paired_lists(op, first_name, first, name, xs)
    if scalar is not None:
        check_scalar_tensor(op, *scalar, device_type)
    if factor is not None:
        check_factor_tensor(op, factor[0], factor[1], len(first), device_type)
        scalar = factor
    check_no_overlap(op, lists, scalar[:2] if scalar is not None else None)


# One entry per primitive (shared by the reference backend and the compiled ops' fake kernels).
def check_sum_sq(xs, weights) -> None:
    check_op("sum_sq", [("xs", xs), ("weights", weights)], optional=("weights",))


def check_dot_sum_sq(a, b) -> None:
    check_op("dot_sum_sq", [("a", a), ("b", b)])


def check_perturb(params, dirs, sum_sq, backup) -> None:
    check_op("perturb_", [("params", params), ("dirs", dirs), ("backup", backup)],
             ("sum_sq", sum_sq, 1), optional=("backup",))


def check_restore(params, backup) -> None:
    check_op("restore_", [("params", params), ("backup", backup)])


def check_orth_combine(d, m, stats) -> None:
    check_op("orth_combine_", [("d", d), ("m", m)], ("stats", stats, 3))


def check_lerp_sum_sq(ema, g) -> None:
    check_op("lerp_sum_sq_", [("ema", ema), ("g", g)])


def check_axpby(ys, xs) -> None:
    check_op("axpby_", [("ys", ys), ("xs", xs)])


def check_scale(xs, factor) -> None:
    check_op("scale_", [("xs", xs)], factor=("factor", factor))


def check_add_scaled(ys, xs, alpha) -> None:
    check_op("add_scaled_", [("ys", ys), ("xs", xs)], factor=("alpha", alpha))


def check_sum_sq_per_tensor(xs) -> None:
    check_op("sum_sq_per_tensor", [("xs", xs)])


#: Reductions return float64 whatever the input dtypes: every term is squared and summed in
#: float64, so finite fp32/fp16/bf16 inputs always give a finite result (Σg² of fp32 gradients
#: near 1e19 exceeds float32's range).
REDUCTION_DTYPE = torch.float64


def reduction_dtype(xs: Sequence[torch.Tensor]) -> torch.dtype:
    return REDUCTION_DTYPE


def rounds_to_zero(x: float, dtype: torch.dtype) -> bool:
    """Whether the float `x` is 0 in the element maths type of `dtype` (fp64 for fp64, else
    fp32), as the C++/CUDA kernels see it after their cast: |x| <= 2^-150 rounds to an fp32
    zero (b = 1e-50 is 0 for fp32 data, so axpby_ does not read ys)."""
    if dtype == torch.float64:
        return x == 0.0
    return abs(x) <= 2.0 ** -150
