"""What every Triton op shares: the block-size setting, launch heuristics, device checks, and
the cached launch plans — a call's tensors grouped by dtype, each group with a device table of
pointers / sizes / program map that lets one launch cover the whole group.

Tensors are grouped by dtype and, within a dtype, by whether every list's data pointer is 16-byte
aligned (so one offset view does not drop its whole dtype group to scalar accesses). Table
layout (one int64 device tensor per group, `n` tensors, `k` lists, `P` programs)::

    [ptr(list 0, tensor 0..n-1) | ... | ptr(list k-1, ...) | numel(0..n-1) | (tensor, block) * P]

Program `pid` handles elements [block * BLOCK, (block + 1) * BLOCK) of tensor `tensor`, counted
in memory order (tensors are dense, paired lists share a layout, so that is the same element of
every list).

Nothing here waits for the GPU: a table is filled in pinned host memory and copied with a
non-blocking copy on the current stream; the pinned buffer lives as long as its table. Tables
used while a CUDA graph is being captured are kept alive for the graph (see
`release_graph_tables`).
"""
import collections
import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import _checks, _registry

Tensors = Sequence[torch.Tensor]

BLOCK_ENV_VAR = "SAM_KERNELS_TRITON_BLOCK"
#: Elements per program. 4096 fp32 = 16 KiB per input per program: with 8 warps that is 16
#: elements (four 16-byte vector loads) per thread, the usual shape of bandwidth-bound Triton
#: kernels. Not tuned on a GPU here: `python -m sam_kernels.check` times other sizes.
DEFAULT_BLOCK = 4096
#: 8192 at most: compiled for sm_90, 65536 spilled 1-5 KiB per thread to local memory, 16384
#: spilled 56-320 bytes (fp32 data; more wherever a kernel works in fp64), 8192 none for
#: fp32/fp16/bf16 data (tests/test_triton.py checks it, Triton 3.6 and 3.9).
MIN_BLOCK, MAX_BLOCK = 16, 1 << 13
#: Bytes of one list a program covers at most: fp64 groups run at most 4096 elements per
#: program (8192 fp64 needed an 8-byte stack frame in _perturb_kernel under Triton 3.6).
MAX_PROGRAM_BYTES = 1 << 15
#: Elements of the partials buffer each finalize iteration reads.
FINALIZE_BLOCK = 1024
#: Contract a*b+c into FMAs, as nvcc does for the CUDA backend (Triton 3.9's default, set
#: explicitly so a change of Triton's default does not change results).
FP_FUSION = True
#: Launch plans kept (each a few KiB of device tables); an optimizer uses a handful per step.
PLAN_CACHE_SIZE = 256

TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
             torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ---------------------------------------------------------------------------- block size
def _check_block(value, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_BLOCK or \
            value > MAX_BLOCK or value & (value - 1):
        raise ValueError(f"Invalid block_size value: {value!r} (from {source}); it must be a "
                         f"power of two between {MIN_BLOCK} and {MAX_BLOCK}")
    return value


def _block_from_env() -> Optional[int]:
    raw = os.environ.get(BLOCK_ENV_VAR, "")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"Invalid block_size value: {raw!r} (from {BLOCK_ENV_VAR}); it must be "
                         f"a power of two between {MIN_BLOCK} and {MAX_BLOCK}") from None
    return _check_block(value, BLOCK_ENV_VAR)


_block_setting: Optional[int] = None


def get_block_size() -> int:
    """Elements per program: set_block_size() > $SAM_KERNELS_TRITON_BLOCK > DEFAULT_BLOCK."""
    if _block_setting is not None:
        return _block_setting
    env = _block_from_env()
    return env if env is not None else DEFAULT_BLOCK


def set_block_size(value: Optional[int]) -> None:
    """Set the elements per program for every later launch (None: back to env/default)."""
    global _block_setting
    _block_setting = None if value is None else _check_block(value, "set_block_size")


@contextlib.contextmanager
def block_size(value: int) -> Iterator[None]:
    """`with block_size(64): ...` runs the enclosed calls with 64 elements per program."""
    global _block_setting
    previous = _block_setting
    set_block_size(value)
    try:
        yield
    finally:
        _block_setting = previous


def num_warps(block: int) -> int:
    """Warps per program: 8-16 elements per thread, 1 to 16 warps."""
    return max(1, min(16, block // 512))


def group_block(block: int, dtype: torch.dtype) -> int:
    """Elements per program for a group of `dtype`: the setting, capped at MAX_PROGRAM_BYTES."""
    return min(block, MAX_PROGRAM_BYTES // dtype.itemsize)


#: Whether a float is 0 in a dtype's element maths type: one rule for every backend.
rounds_to_zero = _checks.rounds_to_zero


# ---------------------------------------------------------------------------- devices
# triton.jit decides at decoration (when this package is imported) whether a kernel runs in the
# interpreter, so setting TRITON_INTERPRET later changes nothing for these kernels.
_INTERPRETED = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """Whether this package's kernels run in the Triton interpreter (on CPU tensors)."""
    return _INTERPRETED


class _InterpretedHelper:
    """A device function in the interpreter, called without re-patching triton.language."""

    def __init__(self, jitted) -> None:
        self.jitted = jitted
        self.fn = jitted.fn
        self._rewritten = None

    def __call__(self, *args, **kwargs):
        if self._rewritten is None:
            self._rewritten = self.jitted.rewrite()
        return self._rewritten(*args, **kwargs)


def without_repatching(jitted):
    """A jit function as kernels should call it. Interpreted, every call of a jit function from
    a kernel re-patches the whole triton.language module (~1 ms, more than the function's work)
    although the launching kernel has patched it already; so call the interpreter's rewritten
    function directly. Compiled, the JITFunction itself."""
    if _INTERPRETED and hasattr(jitted, "rewrite"):
        return _InterpretedHelper(jitted)
    return jitted


def device_function(fn):
    """`triton.jit` for the helpers kernels call (see without_repatching)."""
    return without_repatching(triton.jit(fn))


def check_device(op: str, device: torch.device) -> None:
    """Raise a clear error when these kernels cannot run on `device`."""
    if device.type == "cuda":
        if interpreting():
            raise RuntimeError(f"{op}: the Triton kernels were loaded in interpreter mode "
                               "(TRITON_INTERPRET=1), which runs on CPU tensors only; unset "
                               "TRITON_INTERPRET to run them on CUDA tensors")
        return
    if device.type == "cpu":
        if not interpreting():
            reason = _registry.unavailable_reason("triton", "cpu") or \
                "TRITON_INTERPRET=1 was set after triton was imported"
            raise RuntimeError(f"{op}: cannot run the Triton kernels on CPU tensors: {reason}")
        return
    raise RuntimeError(f"{op}: Triton kernels do not run on {device.type} tensors")


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    if device.type == "cuda" and device.index is not None and \
            device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_same_device(op: str, lists: Sequence[Tensors], device: torch.device) -> None:
    """On CUDA, every tensor on `device` itself (_checks compares device types only)."""
    if device.type != "cuda":
        return
    for k, xs in enumerate(lists):
        for i, t in enumerate(xs):
            if t.device != device:
                raise ValueError(f"{op}: tensor {i} of argument list {k} is on {t.device} but "
                                 f"the first tensor is on {device}; keep every tensor of a call "
                                 "on one device")


def check_scalar_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the tensors are on {device}")


# ---------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class TensorTable:
    """Device table of one group; see the module docstring for the layout."""
    table: torch.Tensor
    n_tensors: int
    n_programs: int
    aligned: bool  # every data pointer is 16-byte aligned (lets the compiler vectorise)
    #: the pinned host copy the device table was copied from (CUDA; None on CPU). Kept with the
    #: table so the non-blocking copy (and a CUDA graph that captured it) never reads freed
    #: host memory.
    staging: Optional[torch.Tensor] = None


def upload(host: torch.Tensor, device: torch.device
           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`host` (an int64 CPU tensor) on `device`, without waiting for the GPU: through a pinned
    buffer and a non-blocking copy on the current stream (a pageable `host.to(device)` is a
    cudaStreamSynchronize: it blocks the host, raises under sync-debug mode "error" and breaks
    CUDA-graph capture). Returns (device tensor, pinned buffer or None)."""
    if device.type != "cuda":
        return host, None
    staging = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    staging.copy_(host)
    table = torch.empty(host.shape, dtype=host.dtype, device=device)
    table.copy_(staging, non_blocking=True)
    return table, staging


def _aligned(lists: Sequence[Tensors], i: int) -> bool:
    """Tensor i of every list starts 16-byte aligned (an empty tensor counts as aligned: it
    gets no program, so its possibly null address never counts)."""
    return lists[0][i].numel() == 0 or all(xs[i].data_ptr() % 16 == 0 for xs in lists)


def build_table(lists: Sequence[Tensors], block: int,
                device: Optional[torch.device] = None) -> TensorTable:
    """The table of paired `lists` (same length, same numels) at `block` elements per program
    on `device` (default: the tensors' device): one host tensor, one upload()."""
    numel_list = [t.numel() for t in lists[0]]
    ptr_list = [t.data_ptr() for xs in lists for t in xs]
    n = len(numel_list)
    numels = torch.tensor(numel_list, dtype=torch.int64)
    blocks = (numels + block - 1) // block
    tensor_of = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), blocks)
    first_program = torch.cumsum(blocks, 0) - blocks
    block_of = torch.arange(tensor_of.numel(), dtype=torch.int64) - first_program[tensor_of]
    program_map = torch.stack([tensor_of, block_of], 1).reshape(-1)
    host = torch.cat([torch.tensor(ptr_list, dtype=torch.int64), numels, program_map])
    aligned = all(_aligned(lists, i) for i in range(n))
    table, staging = upload(host, lists[0][0].device if device is None else device)
    return TensorTable(table, n, int(tensor_of.numel()), aligned, staging)


def dtype_groups(xs: Tensors) -> Dict[torch.dtype, List[int]]:
    """Indices of `xs` by dtype, in first-seen order."""
    groups: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(xs):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def launch_groups(lists: Sequence[Tensors]) -> Dict[Tuple[torch.dtype, bool], List[int]]:
    """Indices of the paired `lists` by (dtype, aligned), in first-seen order: each group is
    one launch, and a misaligned view costs only its own group the vector accesses."""
    groups: Dict[Tuple[torch.dtype, bool], List[int]] = {}
    for i, t in enumerate(lists[0]):
        groups.setdefault((t.dtype, _aligned(lists, i)), []).append(i)
    return groups


@dataclass(frozen=True)
class GroupLaunch:
    """One dtype group of a call, ready to launch over grid (table.n_programs,)."""
    dtype: torch.dtype
    table: TensorTable
    n_lists: int
    block: int
    #: int64 device tensor [position in the call's lists of tensor 0..n-1 | its first program]
    #: (the table's tensor index counts within the group), for the per-tensor factors of
    #: scale_ / add_scaled_ and the per-tensor sums of sum_sq_per_tensor; with its pinned
    #: staging buffer
    positions: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def launch(self, kernel, *args, **constexprs) -> None:
        """kernel[grid](table, n_tensors, *args, <shared meta-parameters>, **constexprs); every
        kernel takes the shared ones: N_LISTS, DTYPE, ACC, ALIGNED, BLOCK."""
        acc = tl.float64 if self.dtype == torch.float64 else tl.float32
        launch(kernel, self.table.n_programs, self.table.table, self.table.n_tensors, *args,
               N_LISTS=self.n_lists, DTYPE=TL_DTYPES[self.dtype], ACC=acc,
               ALIGNED=self.table.aligned, BLOCK=self.block, num_warps=num_warps(self.block),
               enable_fp_fusion=FP_FUSION, **constexprs)


@dataclass(frozen=True)
class Plan:
    """What a call on a given set of lists launches: the device and, per dtype group with
    elements, a GroupLaunch."""
    device: torch.device
    groups: Tuple[GroupLaunch, ...]


def group_launches(lists: Sequence[Tensors], block: int) -> Tuple[GroupLaunch, ...]:
    """Per (dtype, aligned) group of the paired `lists`, a freshly built table at the group's
    block size (group_block); groups with no element are left out."""
    launches = []
    for (dtype, _), idx in launch_groups(lists).items():
        group = [[xs[i] for i in idx] for xs in lists] if len(idx) < len(lists[0]) else lists
        size = group_block(block, dtype)
        table = build_table(group, size)
        if table.n_programs:
            # [position in the call of tensor 0..n-1 | first program of tensor 0..n-1]
            numels = torch.tensor([lists[0][i].numel() for i in idx], dtype=torch.int64)
            n_blocks = (numels + size - 1) // size
            positions = upload(torch.cat([torch.tensor(idx, dtype=torch.int64),
                                          torch.cumsum(n_blocks, 0) - n_blocks]),
                               lists[0][0].device)
            launches.append(GroupLaunch(dtype, table, len(lists), size, positions))
    return tuple(launches)


_plans: "collections.OrderedDict[tuple, Plan]" = collections.OrderedDict()
_plans_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0}
#: Plans launched while a CUDA graph was being captured, by id: the graph replays launches that
#: read these device tables (and copies from their pinned buffers), so neither the cache's
#: eviction nor clear_cache() may free them. Released by release_graph_tables() only.
_held_by_graphs: Dict[int, Plan] = {}


def cache_info() -> Dict[str, int]:
    """Launch-plan cache counters: hits, misses (validations + table builds), size, and the
    plans kept alive for captured CUDA graphs."""
    return {**_stats, "size": len(_plans), "held_by_graphs": len(_held_by_graphs)}


def clear_cache() -> None:
    """Forget the cached plans (not those a captured CUDA graph reads: release_graph_tables)."""
    with _plans_lock:
        _plans.clear()
        _stats["hits"] = _stats["misses"] = 0


def release_graph_tables() -> int:
    """Let go of the tables kept for CUDA graphs that captured Triton launches of this package;
    call it only once those graphs are destroyed (or will never be replayed). Returns how many
    plans were released."""
    with _plans_lock:
        count = len(_held_by_graphs)
        _held_by_graphs.clear()
    return count


def graph_capturing(device: torch.device) -> bool:
    """Whether the current stream of `device` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _hold_if_capturing(found: Plan) -> Plan:
    if graph_capturing(found.device):
        with _plans_lock:
            _held_by_graphs[id(found)] = found
    return found


def _signature(lists: Sequence[Tensors]) -> Optional[tuple]:
    """Everything the argument checks and the tables depend on, per tensor; None when some
    element is not a dense tensor (then the checks say what is wrong)."""
    try:
        return (tuple(len(xs) for xs in lists),
                tuple((t.data_ptr(), t.dtype, t.shape, t.stride(), t.device)
                      for xs in lists for t in xs))
    except (AttributeError, RuntimeError, TypeError):
        return None


def plan(op: str, lists: Sequence[Tensors], check: Callable[[], None]) -> Plan:
    """The launch plan of a call on the paired, non-empty `lists`. `check()` runs the argument
    checks of the primitive (raising on bad input); both are done once per distinct signature —
    addresses, dtypes, shapes, strides, devices of every tensor, and the block size — and found
    again while the storages stay where they are, so after the first optimizer step a call
    builds no table, copies nothing to the device and repeats no check. A hit is always
    correct: the key is everything the checks and the tables are made of (a new tensor that
    reuses a freed address with the same metadata gets an identical table)."""
    block = get_block_size()
    signature = _signature(lists)
    key = None if signature is None else (block, signature)
    if key is not None:
        with _plans_lock:
            found = _plans.get(key)
            if found is not None:
                _plans.move_to_end(key)
                _stats["hits"] += 1
        if found is not None:
            return _hold_if_capturing(found)
    check()
    device = lists[0][0].device
    check_device(op, device)
    check_same_device(op, lists, device)
    built = Plan(device, group_launches(lists, block))
    if key is not None:
        with _plans_lock:
            _stats["misses"] += 1
            _plans[key] = built
            while len(_plans) > PLAN_CACHE_SIZE:
                _plans.popitem(last=False)
    return _hold_if_capturing(built)


def launch(kernel, grid: int, *args, **kwargs) -> None:
    """Every kernel launch of the package goes through here (one place to count them)."""
    kernel[(grid,)](*args, **kwargs)
