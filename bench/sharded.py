"""Sharded training benchmark (FSDP2 `fully_shard`, 2 gloo ranks on CPU): what a SAM-family step
costs over a plain SGD step on the same sharded model — time, collectives, memory per rank.

    python bench/sharded.py                    # SAM, ~1-2 min on 2 cores
    python bench/sharded.py --algos SAM GSAM VaSSO --reps 40
    python bench/sharded.py --quick            # tiny model, seconds (smoke test)

Writes bench/results/sharded-<machine>-<date>T<time>.json (or --out; never over an existing file) and prints a table.

Method (per rank; each rank is one process with one intra-op thread):
- time: one model per optimizer, each wrapped alike; every repetition runs one SGD step and one
  step of each algorithm in turn (the order rotates), each after a barrier, timed with
  perf_counter; reported are medians over repetitions and their ratio to SGD's (both include
  the forward/backward passes: SAM's floor is ~2x, two passes).
- collectives: every collective dispatched during one step (after warm-up), counted with a
  TorchDispatchMode that lets DTensor desugar first (so collectives DTensor issues itself are
  seen too), by op, group size and elements.
- memory: a separate 2-rank job per optimizer, after one warm-up step (persistent state
  exists). Persistent: the exact bytes of the tensors the optimizer holds between steps (its
  state, its base optimizer's state, its persistent buffers; unique storages), next to the
  rank's local parameter shards. Transient: the torch profiler's memory events
  (`profile_memory=True`: every CPU tensor allocation and free, with its size) over five
  steps; the largest peak of their running sum within a step (the first left out) above its
  value at the step's start is the most a step holds on top of what was live before it
  (all-gathered weights, activations, gradients, the optimizer's temporaries). It varies by
  several MiB between runs (when FSDP's asynchronous reduce-scatter buffers are freed), so
  compare persistent bytes exactly and transient ones only coarsely. Peak per rank = local
  parameters + persistent + the gradients left by the previous step + transient. Also
  recorded: the kernel's peak RSS over those steps (VmHWM after
  `echo 5 > /proc/self/clear_refs`) above the RSS before them, a coarser cross-check.
- timing, above: "x SGD" is the ratio of medians (slower rank); "paired" the median over
  repetitions of each step's time over the SGD step next to it (less sensitive to drift).
"""
import argparse
import contextlib
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

WORLD = 2
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# what each algorithm is given (besides SGD's lr/momentum); None: plain SGD, the baseline
ALGO_KWARGS = {
    "SGD": None,
    "SAM": dict(rho=0.05),
    "ASAM": dict(rho=0.5, adaptive=True),
    "GSAM": dict(gsam_alpha=0.1, rho=0.05),
    "GAM": dict(grad_rho=0.03, grad_norm_rho=0.05),
    "VaSSO": dict(rho=0.05, theta=0.4),
}
ALGO_CLASS = {"ASAM": "SAM"}
PASSES = {"SGD": 1, "GAM": 4}  # forward+backward passes per step (others: 2)


def build_model(width, depth, n_in, n_out):
    layers, d = [], n_in
    for _ in range(depth):
        layers += [torch.nn.Linear(d, width), torch.nn.ReLU()]
        d = width
    layers.append(torch.nn.Linear(d, n_out))
    return torch.nn.Sequential(*layers)


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_optimizer(name, model):
    import sam_kernels
    kwargs = ALGO_KWARGS[name]
    if kwargs is None:
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cls = getattr(sam_kernels, ALGO_CLASS.get(name, name))
    return cls(model.parameters(), torch.optim.SGD, lr=0.01, momentum=0.9, model=model,
               **kwargs)


def make_step(name, model, opt, x, y):
    loss_fn = torch.nn.functional.cross_entropy

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    if ALGO_KWARGS[name] is None:
        def step():
            closure()
            opt.step()
        return step
    return lambda: opt.step(closure)


class Collectives(TorchDispatchMode):
    """(op, group size, elements) of every collective while active; DTensor ops return
    NotImplemented so that the collectives DTensor issues come back through here."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        name = str(func)
        if "c10d" in func.namespace and not name.startswith(
                ("_c10d_functional.wait_tensor", "_c10d_functional._wrap_tensor_autograd")):
            first = args[0] if args else None
            numel = sum(t.numel() for t in first) if isinstance(first, (list, tuple)) \
                else (first.numel() if torch.is_tensor(first) else None)
            self.ops.append(f"{name.split('.')[-2]}[{numel}]")
        return func(*args, **(kwargs or {}))


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _transient_peak(events):
    """The largest, over the profiled steps but the first, peak of live allocated bytes during
    a step above what was live when it began (the running sum of the profiler's [memory]
    events; from the second step on every freed block was allocated inside the profile, so
    frees are counted too). The maximum over steps, because when FSDP's asynchronous
    reduce-scatter buffers are freed varies from step to step (by about a layer's gradient)."""
    steps = sorted((e for e in events if e.name() == "sharded_bench_step"),
                   key=lambda e: e.start_ns())[1:]
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    peak = 0
    for s in steps:
        live, base = 0, None
        for e in memory:
            if e.start_ns() > s.end_ns():
                break
            if e.start_ns() >= s.start_ns() and base is None:
                base = live
            live += e.nbytes()
            if base is not None:
                peak = max(peak, live - base)
    return peak


def held_bytes(opt):
    """Bytes of the distinct storages of every tensor the optimizer keeps between steps."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if hasattr(t, "to_local"):
            t = t.to_local()
        if torch.is_tensor(t) and t.numel():
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    def walk(obj, depth=0):
        if depth > 4:
            return
        if torch.is_tensor(obj):
            add(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)

    for o in (opt, getattr(opt, "base_optimizer", None)):
        if o is not None:
            walk(dict(o.state))
    walk(getattr(opt, "_scratch_buffers", {}))
    return total


def _init(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)


def _data(cfg, rank):
    g = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(cfg["batch"], cfg["n_in"], generator=g),
            torch.randint(0, cfg["n_out"], (cfg["batch"],), generator=g))


def _model(cfg):
    torch.manual_seed(0)
    return shard(build_model(cfg["width"], cfg["depth"], cfg["n_in"], cfg["n_out"]))


def _time_worker(rank, init_file, out, cfg, names):
    _init(rank, init_file)
    try:
        x, y = _data(cfg, rank)
        steps = {}
        for name in names:
            model = _model(cfg)
            steps[name] = make_step(name, model, make_optimizer(name, model), x, y)
        for _ in range(cfg["warmup"]):
            for name in names:
                steps[name]()
        collectives = {}
        for name in names:
            dist.barrier()
            with Collectives() as mode:
                steps[name]()
            collectives[name] = mode.ops
        times = {name: [] for name in names}
        for rep in range(cfg["reps"]):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                dist.barrier()
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
        torch.save({"times": times, "collectives": collectives}, os.path.join(out, f"t{rank}.pt"))
    finally:
        dist.destroy_process_group()


# What the profiler logs to stderr from C++/Kineto on every rank (not Python warnings, so a
# warnings filter cannot catch them): it buried the table. Known lines only; the rest passes.
_PROFILER_NOISE = re.compile(r"CPUAllocator\.cpp.*allocated before the profiling started"
                             r"|USDT:.*profiler_(start|stop)")


@contextlib.contextmanager
def _profiler_noise_filtered():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", module=r"torch\.profiler.*")
                yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _PROFILER_NOISE.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def _memory_worker(rank, init_file, out, cfg, name):
    _init(rank, init_file)
    try:
        x, y = _data(cfg, rank)
        model = _model(cfg)
        rss_model = _status_kb("VmRSS")
        opt = make_optimizer(name, model)
        step = make_step(name, model, opt, x, y)
        step()  # persistent state (momentum, backups) now exists
        dist.barrier()
        # live at the start of each measured step besides parameters and optimizer state: the
        # gradients the previous step left (every step here ends the same way)
        grad_bytes = sum(p.grad.to_local().numel() * p.grad.element_size()
                         for p in model.parameters() if p.grad is not None)
        rss_before = _status_kb("VmRSS")
        reset = _reset_peak()
        from torch.profiler import ProfilerActivity, profile, record_function
        with _profiler_noise_filtered(), \
                profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(cfg["mem_steps"]):
                with record_function("sharded_bench_step"):
                    step()
        peak_rss = _status_kb("VmHWM")
        transient = _transient_peak(prof.profiler.kineto_results.events())
        torch.save({"held_bytes": held_bytes(opt),
                    "local_param_bytes": sum(p.to_local().numel() * p.element_size()
                                             for p in model.parameters()),
                    "step_transient_bytes": transient,
                    "grad_bytes_at_step_start": grad_bytes,
                    "rss_growth_first_step_kb": rss_before - rss_model,
                    "rss_step_peak_kb": (peak_rss - rss_before) if reset else None},
                   os.path.join(out, f"m{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args):
    out = tempfile.mkdtemp(prefix="sam_sharded_")
    mp.spawn(fn, args=(os.path.join(out, "store"), out) + args, nprocs=WORLD, join=True)
    return out


def run(algos=("SAM",), reps=30, warmup=3, quick=False):
    """Runs the three jobs; returns the results dict (also what main() writes)."""
    cfg = dict(width=1024, depth=4, n_in=512, n_out=10, batch=64, reps=reps, warmup=warmup,
               mem_steps=5)  # memory: profiled steps (the first one is not measured)
    if quick:
        cfg.update(width=64, depth=2, n_in=32, batch=8, reps=3, warmup=1, mem_steps=2)
    load_before = _loadavg()
    unknown = [a for a in algos if a not in ALGO_KWARGS]
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; choose from {sorted(ALGO_KWARGS)}")
    names = ["SGD"] + [a for a in algos if a != "SGD"]
    out = _spawn(_time_worker, cfg, names)
    timing = [torch.load(os.path.join(out, f"t{r}.pt")) for r in range(WORLD)]
    rows = {}
    for name in names:
        medians = [statistics.median(t["times"][name]) for t in timing]
        rows[name] = {"median_s_per_rank": medians,
                      "collectives_per_step": len(timing[0]["collectives"][name]),
                      "collectives": _summarise(timing[0]["collectives"][name])}
    base = rows["SGD"]["median_s_per_rank"]
    for name in names:
        # ratio of medians (the slower rank), and the median of per-repetition ratios (each
        # repetition's step against the SGD step next to it: less sensitive to load drift)
        rows[name]["ratio_to_sgd"] = max(a / b for a, b in zip(rows[name]["median_s_per_rank"],
                                                                 base))
        rows[name]["paired_ratio_to_sgd"] = max(
            statistics.median(a / b for a, b in zip(t["times"][name], t["times"]["SGD"]))
            for t in timing)
        rows[name]["times_s_per_rank"] = [t["times"][name] for t in timing]
        # beyond FSDP's own: passes x what SGD's one forward+backward costs
        rows[name]["passes"] = PASSES.get(name, 2)
        rows[name]["extra_collectives"] = rows[name]["collectives_per_step"] - \
            rows[name]["passes"] * rows["SGD"]["collectives_per_step"]
    for name in names:
        mout = _spawn(_memory_worker, cfg, name)
        mem = [torch.load(os.path.join(mout, f"m{r}.pt")) for r in range(WORLD)]
        rows[name]["memory_per_rank"] = mem
    n_params = sum(p.numel() for p in build_model(cfg["width"], cfg["depth"], cfg["n_in"],
                                                  cfg["n_out"]).parameters())
    return {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "torch": torch.__version__, "cpu_count": os.cpu_count(),
                     "world": WORLD, "threads_per_rank": 1, "model_params": n_params,
                     "config": cfg, "load_before": load_before},
            "rows": rows}


def _summarise(ops):
    counts = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return counts


def _loadavg():
    try:
        return open("/proc/loadavg").read().strip()
    except OSError:
        return None


def _peak_bytes(m):
    """A rank's peak of live tensor bytes in a step: what is live when it starts (parameter
    shards, the optimizer's state, the gradients the last step left) + the step's transient
    peak above that."""
    return m["local_param_bytes"] + m["held_bytes"] + m["grad_bytes_at_step_start"] + \
        m["step_transient_bytes"]


def table(results):
    rows = results["rows"]
    mib = 2 ** 20
    lines = [f"{'optimizer':10} {'ms/step r0':>10} {'ms/step r1':>10} {'x SGD':>6} {'paired':>6} "
             f"{'coll/step':>9} {'extra':>5} {'held MiB':>9} {'transient MiB':>13} "
             f"{'peak MiB':>9} {'x SGD':>6}   (memory: rank 0)"]
    peaks = {}
    for name, row in rows.items():
        m = row["memory_per_rank"][0]
        peaks[name] = _peak_bytes(m)
    for name, row in rows.items():
        m = row["memory_per_rank"][0]
        lines.append(
            f"{name:10} {row['median_s_per_rank'][0] * 1e3:10.2f} "
            f"{row['median_s_per_rank'][1] * 1e3:10.2f} {row['ratio_to_sgd']:6.2f} "
            f"{row['paired_ratio_to_sgd']:6.2f} "
            f"{row['collectives_per_step']:9d} {row['extra_collectives']:5d} "
            f"{m['held_bytes'] / mib:9.2f} {m['step_transient_bytes'] / mib:13.2f} "
            f"{peaks[name] / mib:9.2f} {peaks[name] / peaks['SGD']:6.2f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algos", nargs="+", default=["SAM"], choices=sorted(ALGO_KWARGS))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = time.time()
    results = run(args.algos, args.reps, args.warmup, args.quick)
    results["meta"]["seconds"] = round(time.time() - started, 1)
    results["meta"]["load_after"] = _loadavg()
    print(table(results))
    from bench.harness import reserve_results_path
    out = reserve_results_path(Path(args.out) if args.out else RESULTS_DIR / (
        f"sharded-cpu-{os.cpu_count()}core-{datetime.datetime.now():%Y-%m-%dT%H%M%S}.json"))
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {out} in {results['meta']['seconds']} s")
    return results


if __name__ == "__main__":
    main()
