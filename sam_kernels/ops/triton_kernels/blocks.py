"""Device side of the multi-tensor mechanism (host side: utils.py): where a program's block is,
the typed pointer of a list's tensor, and loads/stores that are masked only in a tensor's last,
partial block, so full blocks compile to unmasked (vectorisable) memory accesses."""
import triton.language as tl

from .utils import device_function, without_repatching

#: tl.sum (a jit function of triton.language), called without the interpreter's re-patching.
block_sum = without_repatching(tl.sum)


@device_function
def program_block(table, n_tensors, N_LISTS: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor index, offset of the block's first element, the tensor's numel), int64."""
    pid = tl.program_id(0).to(tl.int64)
    entry = table + (N_LISTS + 1) * n_tensors + 2 * pid
    tensor = tl.load(entry)
    start = tl.load(entry + 1) * BLOCK
    numel = tl.load(table + N_LISTS * n_tensors + tensor)
    return tensor, start, numel


@device_function
def list_ptr(table, n_tensors, LIST: tl.constexpr, tensor, DTYPE: tl.constexpr,
             ALIGNED: tl.constexpr):
    """Pointer to element 0 of tensor `tensor` of list `LIST`."""
    ptr = tl.load(table + LIST * n_tensors + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # On the pointer, not the integer: the alignment analysis does not see through the cast.
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@device_function
def scalar_arg(x, ACC: tl.constexpr):
    """A float launch argument (annotated tl.float64) in ACC. Compiled, `x` is an fp64 scalar;
    interpreted, a Python float, which `.to()` cannot take and tl.cast would round via fp32: an
    addition to an ACC zero rounds it once, from its full value, in both cases."""
    return (tl.full((), 0, ACC) + x).to(ACC)


@device_function
def load(ptr, offsets, numel, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offsets, mask=offsets < numel, other=0.0)
    else:
        return tl.load(ptr + offsets)


@device_function
def store(ptr, offsets, value, numel, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offsets, value, mask=offsets < numel)
    else:
        tl.store(ptr + offsets, value)
