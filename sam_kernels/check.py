"""Self-check of this install: `python -m sam_kernels.check` — the first thing to run on a new
GPU machine.

Every available backend is checked on the device it runs on — with a CUDA GPU the GPU backends
(triton, cuda) on CUDA tensors and the `cpu` backend on CPU tensors; without one the CPU backends
(cpu; triton when TRITON_INTERPRET=1) — against the `reference` backend for every primitive and
dtype on random data, then a few SAM/ASAM steps are compared with the reference optimizer, and a
PASS/FAIL table and a small timing table are printed. The exit status is 1 when any check fails
or a backend asked for with --backend cannot run.

Options: --backend NAME (repeatable) to check only some backends, --no-timing, --quick,
--json PATH (the rows as JSON, for tools/gpu_check.sh).
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .ops import _registry

DTYPES = {"fp32": (torch.float32,), "fp64": (torch.float64,), "fp16": (torch.float16,),
          "bf16": (torch.bfloat16,),
          # one list of several dtypes: one launch per dtype group, fp64 result
          "mixed": (torch.float32, torch.bfloat16, torch.float64, torch.float16)}
# |backend - reference| <= ATOL + RTOL * |reference| (inputs are O(1)). Low-precision outputs may
# differ by an ulp or two (one rounding vs another; the Triton interpreter truncates to bf16).
TOLERANCES = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5),
              torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# Odd sizes, an empty tensor, and tensors over several Triton blocks / CPU chunks.
SHAPES = {"cuda": [(1000,), (3, 257), (0,), (64, 3, 3, 3), (1,), (70001,), (300_000,)],
          "cpu": [(1000,), (3, 257), (0,), (17,), (1,), (5000,)]}


@dataclass
class Result:
    backend: str
    check: str      # primitive (or optimizer) name
    variant: str    # dtype name
    passed: bool
    detail: str = ""
    device: str = "cpu"


# ---------------------------------------------------------------------------- op cases
@dataclass
class Inputs:
    """Fresh random lists for one case; `clone()` gives every backend identical copies."""
    x: List[torch.Tensor]
    y: List[torch.Tensor]
    p: List[torch.Tensor]
    sum_sq: torch.Tensor
    stats: torch.Tensor

    def clone(self) -> "Inputs":
        def copy(xs):
            return [t.clone() for t in xs]
        return Inputs(copy(self.x), copy(self.y), copy(self.p), self.sum_sq.clone(),
                      self.stats.clone())


def _random_inputs(dtypes: Sequence[torch.dtype], shapes, device) -> Inputs:
    def rand():
        return [torch.randn(s, device=device).to(dtypes[i % len(dtypes)])
                for i, s in enumerate(shapes)]
    x, y, p = rand(), rand(), rand()
    stats = torch.tensor([0.3, 2.0, 1.5], device=device)
    return Inputs(x, y, p, torch.tensor(7.0, device=device), stats)


def _nan_like(xs):
    return [torch.full_like(t, float("nan")) for t in xs]


def _abs_sum(xs, ys=None) -> torch.Tensor:
    """Σ |x·y| (Σ x² without ys) in fp64: the scale of a sum's rounding error."""
    ys = xs if ys is None else ys
    return sum((x.double() * y.double()).abs().sum() for x, y in zip(xs, ys))


def _case_sum_sq(m, d):
    return [m.sum_sq(d.x, [], 0.0)]


def _case_sum_sq_weighted(m, d):
    return [m.sum_sq(d.x, d.y, 0.01)]


def _case_dot_sum_sq(m, d):
    return [m.dot_sum_sq(d.x, d.y)]


def _case_perturb(m, d):
    backup = _nan_like(d.p)
    m.perturb_(d.p, d.x, d.sum_sq, 0.05, 1e-12, False, 0.0, backup)
    return d.p + backup


def _case_perturb_adaptive(m, d):
    m.perturb_(d.p, d.x, d.sum_sq, 0.5, 1e-12, True, 0.01, [])
    return d.p


def _case_restore(m, d):
    m.restore_(d.p, d.y)
    return d.p


def _case_orth_combine(m, d):
    m.orth_combine_(d.x, d.y, d.stats, 0.3, 1e-12)
    return d.x


def _case_lerp_sum_sq(m, d):
    total = m.lerp_sum_sq_(d.x, d.y, 0.1)
    return [total] + d.x


def _case_axpby(m, d):
    m.axpby_(d.x, d.y, 0.7, -0.3)
    return d.x


def _case_axpby_b0(m, d):
    ys = _nan_like(d.x)  # b == 0: ys is not read, so NaN must not leak
    m.axpby_(ys, d.y, 2.0, 0.0)
    return ys


@dataclass(frozen=True)
class OpCase:
    run: Callable  # (backend module, Inputs) -> list of outputs
    #: Σ|terms| of the reduction (output 0), whose rounding error scales with it, not with the
    #: (possibly cancelling) result; None for ops that return no reduction
    scale: Optional[Callable] = None
    #: the reduction sums stored fp16/bf16 values, which may differ by an ulp between backends
    of_stored: bool = False


OP_CASES: Dict[str, OpCase] = {
    "sum_sq": OpCase(_case_sum_sq, lambda d: _abs_sum(d.x)),
    "sum_sq(weights)": OpCase(_case_sum_sq_weighted,
                              lambda d: _abs_sum([(y.double().abs() + 0.01) * x.double()
                                                  for x, y in zip(d.x, d.y)])),
    "dot_sum_sq": OpCase(_case_dot_sum_sq, lambda d: torch.stack(
        [_abs_sum(d.x, d.y), _abs_sum(d.x), _abs_sum(d.y)])),
    "perturb_(backup)": OpCase(_case_perturb),
    "perturb_(adaptive)": OpCase(_case_perturb_adaptive),
    "restore_": OpCase(_case_restore),
    "orth_combine_": OpCase(_case_orth_combine),
    "lerp_sum_sq_": OpCase(_case_lerp_sum_sq, lambda d: 2 * _abs_sum(d.x) + 2 * _abs_sum(d.y),
                           of_stored=True),
    "axpby_": OpCase(_case_axpby),
    "axpby_(b=0)": OpCase(_case_axpby_b0),
}


def _reduction_rtol(dtypes: Sequence[torch.dtype], of_stored: bool) -> float:
    """Relative to Σ|terms|: fp32 accumulation (fp64 when every tensor is fp64), or the storage
    precision when the summed values are themselves rounded to fp16/bf16."""
    rtol = 1e-12 if all(t == torch.float64 for t in dtypes) else 1e-5
    if of_stored:
        rtol = max([rtol] + [2 * TOLERANCES[t][0] for t in dtypes if t != torch.float64])
    return rtol


def _compare(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor],
             reduction_atol: Optional[torch.Tensor] = None) -> Tuple[bool, str]:
    """Output by output: same dtype and shape, finite, |out - ref| <= atol + rtol·|ref| with the
    dtype's tolerances (output 0 against `reduction_atol` when given)."""
    if len(outs) != len(refs):
        return False, f"{len(outs)} outputs, expected {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        if o.dtype != r.dtype or o.shape != r.shape:
            return False, (f"output {i}: {o.dtype} {list(o.shape)}, expected {r.dtype} "
                           f"{list(r.shape)}")
        if not o.numel():
            continue
        o64, r64 = o.double().cpu(), r.double().cpu()
        if not torch.isfinite(o64).all():
            return False, f"output {i} has NaN/inf"
        err = (o64 - r64).abs()
        if i == 0 and reduction_atol is not None:
            bound = reduction_atol.double().cpu()
        else:
            rtol, atol = TOLERANCES[o.dtype]
            bound = atol + rtol * r64.abs()
        bad = err > bound
        if bad.any():
            j = int(bad.flatten().nonzero()[0])
            return False, (f"output {i}: max |err| {err.max().item():.3g}; element {j}: "
                           f"{o64.flatten()[j].item():.8g} vs reference "
                           f"{r64.flatten()[j].item():.8g}")
    return True, ""


def check_ops(backend: str, device: str) -> List[Result]:
    """Every op case × dtype of `backend` against the reference backend, on `device`."""
    mod, ref = _registry.module(backend), _registry.module("reference")
    results = []
    for variant, dtypes in DTYPES.items():
        data = _random_inputs(dtypes, SHAPES.get(device, SHAPES["cpu"]), device)
        for name, case in OP_CASES.items():
            atol = None
            if case.scale is not None:
                atol = _reduction_rtol(dtypes, case.of_stored) * case.scale(data)
            try:
                refs = case.run(ref, data.clone())
                ok, detail = _compare(case.run(mod, data.clone()), refs, atol)
            except Exception as exc:  # a crash is a failure of this row, not of the tool
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            results.append(Result(backend, name, variant, ok, detail, device))
    return results


# ---------------------------------------------------------------------------- optimizer steps
def _sam_steps(backend: str, device: str, adaptive: bool, steps: int = 3) -> List[torch.Tensor]:
    from . import SAM
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 5)).to(device)
    x, y = torch.randn(32, 20, device=device), torch.randint(0, 5, (32,), device=device)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive,
              eta=0.01 if adaptive else 0.0, lr=0.1, momentum=0.9, backend=backend)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def check_optimizers(backend: str, device: str) -> List[Result]:
    results = []
    for name, adaptive in (("SAM step", False), ("ASAM step", True)):
        try:
            ok, detail = _compare(_sam_steps(backend, device, adaptive),
                                  _sam_steps("reference", device, adaptive))
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results.append(Result(backend, name, "fp32", ok, detail, device))
    return results


# ---------------------------------------------------------------------------- timing
# (bytes moved per element of the list: reads + writes) for a bandwidth column
_TIMED = {
    "sum_sq": (1, lambda m, d: m.sum_sq(d.x, [], 0.0)),
    "dot_sum_sq": (2, lambda m, d: m.dot_sum_sq(d.x, d.y)),
    "perturb_(backup)": (4, lambda m, d: m.perturb_(d.p, d.x, d.sum_sq, 1e-3, 1e-12, False, 0.0,
                                                    d.y)),
    "restore_": (2, lambda m, d: m.restore_(d.p, d.y)),
    "orth_combine_": (3, lambda m, d: m.orth_combine_(d.x, d.y, d.stats, 1e-3, 1e-12)),
    "lerp_sum_sq_": (3, lambda m, d: m.lerp_sum_sq_(d.x, d.y, 0.1)),
    "axpby_": (3, lambda m, d: m.axpby_(d.x, d.y, 1.0, 1.0)),
}


def _timing_shapes(device: str) -> Tuple[str, List[Tuple[int, ...]]]:
    """Log-spaced sizes, like a CNN's mix of biases, norms and conv/linear weights."""
    count, smallest, largest = (160, 64, 2_400_000) if device == "cuda" else (48, 64, 150_000)
    ratio = (largest / smallest) ** (1 / (count - 1))
    shapes = [(int(smallest * ratio ** i),) for i in range(count)]
    total = sum(s[0] for s in shapes)
    return f"{count} fp32 tensors, {total / 1e6:.1f} M elements", shapes


def _median_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timing_table(backends: Sequence[str], device: str, reps: int, out) -> None:
    label, shapes = _timing_shapes(device)
    data = _random_inputs((torch.float32,), shapes, device)
    data.stats = torch.tensor([0.0, 1.0, 1.0], device=device)  # c = 0: repeated calls stay finite
    elements = sum(t.numel() for t in data.x)
    flat_src = torch.randn(elements, device=device)
    flat_dst = torch.empty_like(flat_src)
    copy_ms = _median_ms(lambda: flat_dst.copy_(flat_src), device, reps)
    floor_gbs = 8 * elements / copy_ms / 1e6
    out(f"\nTiming on {label} ({device}); median of {reps} calls; GB/s = bytes the op must "
        f"move / time. A plain copy of the same size: {copy_ms:.3f} ms = {floor_gbs:.1f} GB/s.")
    timed = [b for b in backends if not (b == "triton" and device == "cpu")]
    if "triton" in backends and device == "cpu":
        out("(triton runs in the interpreter on CPU: not timed)")
    header = f"{'op':<18}" + "".join(f"{b + ' ms':>14}{'GB/s':>8}" for b in timed)
    out(header)
    for name, (words, fn) in _TIMED.items():
        row = f"{name:<18}"
        for b in timed:
            mod = _registry.module(b)
            ms = _median_ms(lambda: fn(mod, data), device, reps)
            row += f"{ms:>14.3f}{4 * words * elements / ms / 1e6:>8.1f}"
        out(row)
    if "triton" in timed:
        _block_sweep(data, device, reps, out)


def _block_sweep(data: Inputs, device: str, reps: int, out) -> None:
    from .ops import triton_kernels as tk
    out(f"\nTriton elements per program (default {tk.get_block_size()}; set with "
        f"{tk.BLOCK_ENV_VAR} or triton_kernels.set_block_size), ms:")
    sizes = (1024, 2048, 4096, 8192)
    out(f"{'op':<18}" + "".join(f"{s:>10}" for s in sizes))
    for name in ("sum_sq", "perturb_(backup)", "lerp_sum_sq_"):
        fn = _TIMED[name][1]
        row = f"{name:<18}"
        for s in sizes:
            with tk.block_size(s):
                row += f"{_median_ms(lambda: fn(tk, data), device, reps):>10.3f}"
        out(row)


# ---------------------------------------------------------------------------- report
def _print_results(results: List[Result], out) -> None:
    variants = list(DTYPES)
    out(f"\n{'backend':<9}{'device':<8}{'check':<20}" + "".join(f"{v:>7}" for v in variants))
    rows: Dict[Tuple[str, str, str], Dict[str, Result]] = {}
    for r in results:
        rows.setdefault((r.backend, r.device, r.check), {})[r.variant] = r
    for (backend, device, check), by_variant in rows.items():
        cells = [("PASS" if by_variant[v].passed else "FAIL") if v in by_variant else "-"
                 for v in variants]
        out(f"{backend:<9}{device:<8}{check:<20}" + "".join(f"{c:>7}" for c in cells))
    failures = [r for r in results if not r.passed]
    for r in failures:
        out(f"FAIL {r.backend} {r.check} [{r.variant}]: {r.detail}")


def _environment(out) -> None:
    out(f"sam_kernels self-check: torch {torch.__version__}, python {sys.version.split()[0]}")
    if torch.cuda.is_available():
        try:
            props = torch.cuda.get_device_properties(0)
            out(f"GPU: {props.name} (sm_{props.major}{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
        except Exception as exc:  # the report must not die describing the machine
            out(f"GPU: (properties unavailable: {type(exc).__name__}: {exc})")
    try:
        import triton
        out(f"triton {triton.__version__}, TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET', '0')}")
    except ImportError:
        out("triton: not installed")
    for name, status in ops.backend_status().items():
        out(f"  backend {name:<10} {status}")


def _device_for(backend: str, gpu: bool) -> Optional[str]:
    """Where `backend` is checked: on the GPU when it runs there, else on CPU tensors (the `cpu`
    backend, and Triton under TRITON_INTERPRET=1), else nowhere (None)."""
    for device in (("cuda", "cpu") if gpu else ("cpu",)):
        if _registry.unavailable_reason(backend, device) is None:
            return device
    return None


def run(backends: Optional[Sequence[str]] = None, timing: bool = True, reps: int = 50,
        out: Callable[[str], None] = print, json_path: Optional[str] = None) -> int:
    """Run the checks and print the tables; returns the exit status (0: every check passed).
    Each backend is checked on the device it runs on, so `--backend cpu` checks the CPU kernels
    on a GPU machine too."""
    _environment(out)
    gpu = torch.cuda.is_available()
    if not gpu:
        out("\nNo CUDA GPU found: checking the CPU backends instead"
            + ("" if os.environ.get("TRITON_INTERPRET") == "1" else
               " (set TRITON_INTERPRET=1 to include the Triton kernels, interpreted)") + ".")
    names = [b for b in ops.BACKENDS if b != "reference"] if backends is None else list(backends)
    placed = {b: _device_for(b, gpu) for b in names}
    missing = [b for b in names if placed[b] is None]
    if backends is not None:  # only what was asked for and cannot run is an error
        for b in missing:
            natural = b if b in ("cpu", "cuda") else ("cuda" if gpu else "cpu")
            out(f"backend {b!r} cannot run here: {_registry.unavailable_reason(b, natural)}")
    else:
        missing = []
    chosen = [(b, placed[b]) for b in names if placed[b] is not None]
    if not chosen:
        out("No backend besides 'reference' is available here: nothing to check.")
        return 1
    results: List[Result] = []
    for b, device in chosen:
        results += check_ops(b, device)
        results += check_optimizers(b, device)
    _print_results(results, out)
    failed = sum(not r.passed for r in results)
    out(f"\n{len(results) - failed}/{len(results)} checks passed"
        + (f"; {len(missing)} requested backend(s) unavailable" if missing else ""))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"passed": not failed and not missing, "missing": missing,
                       "rows": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    if timing:
        for device in dict.fromkeys(d for _, d in chosen):
            timing_table(["reference"] + [b for b, d in chosen if d == device], device, reps,
                         out)
    return 1 if failed or missing else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam_kernels.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", action="append", choices=[b for b in ops.BACKENDS
                                                                 if b != "reference"],
                        help="check only this backend (repeatable); default: every available "
                             "one")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    parser.add_argument("--json", metavar="PATH", help="also write the check rows as JSON")
    args = parser.parse_args(argv)
    return run(args.backend, timing=not args.no_timing, reps=10 if args.quick else 50,
               json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
