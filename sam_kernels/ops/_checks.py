"""Argument checks for the Python backends (reference, triton). Same rules and message template
as csrc/include/sam_kernels/list_checks.h, which the compiled backends use."""
from typing import Optional, Sequence, Tuple

import torch

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


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
                             "float32, float64, float16 and bfloat16")
        if not _dense(t):
            raise ValueError(f"{op}: {name}[{i}] is not dense in memory (a view with gaps or "
                             "overlaps); pass .contiguous() tensors")


def _dense(t: torch.Tensor) -> bool:
    if t.is_contiguous() or t.numel() <= 1:
        return True
    # non-overlapping and dense: some permutation of the dims is contiguous (e.g. channels_last)
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.size(d) == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


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
        if x.numel() > 1 and x.stride() != y.stride():
            raise ValueError(f"{op}: {a_name}[{i}] and {b_name}[{i}] differ in memory layout "
                             f"(strides {list(x.stride())} vs {list(y.stride())})")


def check_scalar_tensor(op: str, name: str, t: torch.Tensor, numel: int, device_type: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.numel() != numel:
        raise ValueError(f"{op}: {name} must have {numel} element(s), got shape {list(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
    if t.device.type != device_type:
        raise ValueError(f"{op}: {name} is on {t.device} but the tensors are on {device_type}")


def check_op(op: str, lists: Sequence[Tuple[str, Sequence[torch.Tensor]]],
             scalar: Optional[Tuple[str, torch.Tensor, int]] = None,
             optional: Tuple[str, ...] = ()) -> None:
    """All checks of one primitive call, in the order the compiled kernels run them: every list
    valid and on the first list's device type, every other list paired with the first, then the
    device scalar (name, tensor, number of elements) when the op takes one. Lists named in
    `optional` (`weights`, `backup`) are skipped when empty: the contract passes them empty when
    they are not given."""
    first_name, first = lists[0]
    device_type = first[0].device.type if len(first) else "cpu"
    check_tensor_list(op, first_name, first, device_type)
    for name, xs in lists[1:]:
        if name in optional and not len(xs):
            continue
        check_tensor_list(op, name, xs, device_type)
        check_paired_lists(op, first_name, first, name, xs)
    if scalar is not None:
        check_scalar_tensor(op, *scalar, device_type)


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


def reduction_dtype(xs: Sequence[torch.Tensor]) -> torch.dtype:
    """Reductions return float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in xs) else torch.float32
