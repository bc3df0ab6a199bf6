"""Measurement machinery: synthetic gradients, a step probe that times an optimizer step while
excluding the forward/backward passes (the closure) and the base optimizer's update, a
dispatch counter, the copy byte floor, and the machine/load description stored with results.

How a step is timed: parameters of a suite's shapes get random gradients; the "closure" stands
in for forward/backward by pointing every `p.grad` at one of two pre-made gradient sets (what
`backward` after `zero_grad(set_to_none=True)` does: a fresh gradient tensor, no copy), and its
time is excluded. The base optimizer's `step` is wrapped the same way. So, per step:
    extra = total − closure − base     (the SAM-family work: norms, perturb, restore, ...)
    whole = total − closure            (the optimizer step a training loop sees)
"""
import contextlib
import gc
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .suites import Shape

#: ops that allocate or re-view memory without running a kernel over elements
_NON_KERNEL_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::lift_fresh",
                   "aten::detach", "aten::alias", "aten::set_", "aten::_to_copy_noop"}
_HOST_READ_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero"}


class Probe:
    """Times one optimizer step (CPU wall clock, or CUDA events on the stream) with excluded
    segments, and optionally counts the ops dispatched outside them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._segments: Dict[str, list] = {}
        self.counter: Optional["DispatchCounter"] = None

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._segments = {"closure": [], "base": []}
        self._t0 = self._mark()

    def stop(self) -> Dict[str, float]:
        t1 = self._mark()
        if self.cuda:
            torch.cuda.synchronize()
        total = self._elapsed(self._t0, t1)
        out = {k: sum(self._elapsed(a, b) for a, b in v) for k, v in self._segments.items()}
        out["total"] = total
        return out

    @contextlib.contextmanager
    def exclude(self, kind: str):
        paused = self.counter.pause() if self.counter else contextlib.nullcontext()
        with paused:
            a = self._mark()
            try:
                yield
            finally:
                b = self._mark()
                self._segments.setdefault(kind, []).append((a, b))

    def wrap(self, kind: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            with self.exclude(kind):
                return fn(*args, **kwargs)
        return wrapped


class DispatchCounter(TorchDispatchMode):
    """Counts dispatched ops (ATen and sam_kernels custom ops), leaving out views and pure
    allocations, and host reads of tensor values (`_local_scalar_dense`)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.host_reads = 0
        self.by_op: Dict[str, int] = {}
        self._active = True

    @contextlib.contextmanager
    def pause(self):
        self._active = False
        try:
            yield
        finally:
            self._active = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._active:
            name = func._schema.name
            if name in _HOST_READ_OPS:
                self.host_reads += 1
            elif not (func.is_view or name in _NON_KERNEL_OPS):
                self.kernels += 1
                self.by_op[name] = self.by_op.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def make_params(shapes: Sequence[Shape], device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> List[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float32)
                               .mul_(0.1).to(device=device, dtype=dtype)) for s in shapes]


class GradSource:
    """Pre-made gradient sets; each call of `assign` points every `p.grad` at the next set.
    `closure_for(other_params)` gives the same for another list of parameters of the same
    shapes (several implementations share one source)."""

    def __init__(self, params: Sequence[torch.Tensor], sets: int = 2, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = list(params)
        self.sets = [[torch.randn(p.shape, generator=gen, dtype=torch.float32)
                      .to(device=p.device, dtype=p.dtype) for p in self.params]
                     for _ in range(sets)]
        self.loss = torch.zeros((), device=self.params[0].device)
        self.assign = self.closure_for(self.params)

    def closure_for(self, params: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor]:
        params = list(params)
        calls = 0

        def assign() -> torch.Tensor:
            nonlocal calls
            grads = self.sets[calls % len(self.sets)]
            calls += 1
            for p, g in zip(params, grads):
                p.grad = g
            return self.loss
        return assign


@dataclass
class StepTimes:
    extra: List[float] = field(default_factory=list)
    whole: List[float] = field(default_factory=list)
    base: List[float] = field(default_factory=list)


def time_steps(step: Callable[[], Any], probe: Probe, reps: int, warmup: int) -> StepTimes:
    """Run `step` warmup + reps times; per rep, the extra and whole times (see module doc).
    The cyclic garbage collector is off while timing (as in timeit); call `quiet_gc()` once
    after the imports so the collection before each row is cheap."""
    for _ in range(warmup):
        step()
    times = StepTimes()
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            probe.start()
            step()
            seg = probe.stop()
            times.extra.append(seg["total"] - seg["closure"] - seg["base"])
            times.whole.append(seg["total"] - seg["closure"])
            times.base.append(seg["base"])
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def quiet_gc() -> None:
    """Move every object alive now (torch and the other imports: ~0.5 s per full collection
    otherwise) out of the collector's reach."""
    gc.collect()
    gc.freeze()


def count_dispatch(step: Callable[[], Any], probe: Probe) -> DispatchCounter:
    """Ops dispatched by one step outside the excluded segments."""
    counter = DispatchCounter()
    probe.start()
    with counter:
        probe.counter = counter
        try:
            step()
        finally:
            probe.counter = None
    probe.stop()
    return counter


class CopyTimer:
    """One `dst.copy_(src)` of `numel` elements — it moves 2 · numel · itemsize bytes: the
    byte floor's yardstick, timed in the same rounds as the optimizers."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device,
                 warmup: int = 2) -> None:
        self.src = torch.randn(numel, device=device).to(dtype)
        self.dst = torch.empty_like(self.src)
        self.probe = Probe(torch.device(device))
        for _ in range(warmup):
            self.time_once()

    def time_once(self) -> float:
        self.probe.start()
        self.dst.copy_(self.src)
        return self.probe.stop()["total"]


def summary(values: Sequence[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_slug(device: torch.device) -> str:
    """`cpu-2core` (`cpu-2core-1thread` under --threads 1) or e.g. `cuda-nvidia-h100-80gb-hbm3`:
    the <machine> of results file names."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")
    threads = torch.get_num_threads()
    return f"cpu-{os.cpu_count()}core" + ("" if threads == os.cpu_count() else f"-{threads}thread")


def reserve_results_path(path: Path) -> Path:
    """`path`, or path-2, path-3... if a JSON or PNG of that name exists: creates the JSON
    (empty, exclusively) so that concurrent runs cannot pick the same name either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10000):
        candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        if candidate.with_suffix(".png").exists():
            continue
        try:
            with open(candidate, "x"):
                return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free results file name next to {path}")
