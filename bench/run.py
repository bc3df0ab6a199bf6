"""Benchmark of the SAM family's per-step optimizer work: sam_kernels vs the seeds' per-tensor
loops vs pytorch-optimizer, on real models' parameter shapes, plus an end-to-end training-step
comparison on a small CNN.

    python bench/run.py                        # CPU: SAM + GSAM, ResNet-50, 2000x4096, sweep
    python bench/run.py --device cuda          # the same on a GPU
    python bench/run.py --algos all --e2e-algos all --reps 20 --budget 6   # everything
    python bench/run.py --suite all --algos sam gsam
    python bench/run.py --quick                # tiny shapes, seconds (smoke test)
    python bench/run.py --suite resnet50 --compile-anchor   # + the torch.compile anchor
    python bench/run.py --sharded SAM GSAM     # + FSDP2 on 2 gloo ranks (bench/sharded.py)
    python bench/run.py --algos sam --contention 2   # + each suite again with 2 busy processes

Writes bench/results/<machine>-<date>T<time>.json (never over an earlier run's file) and a PNG
plot next to it; prints the tables.
See docs/bench.md for what each column means.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import contention, e2e, harness, micro, report, suites  # noqa: E402
from bench.algos import ALGOS, DEFAULT_ALGOS, implementations  # noqa: E402
from bench.harness import reserve_results_path  # noqa: E402,F401  (re-exported)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--suite", nargs="+", default=None,
                    help=f"shape suites: {', '.join(suites.SUITES)}, 'all' "
                         f"(default: {' '.join(suites.DEFAULT_SUITES)})")
    ap.add_argument("--algos", nargs="+", default=None,
                    help=f"algorithms: {', '.join(ALGOS)} or all (default: "
                         f"{' '.join(DEFAULT_ALGOS)})")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per row (max)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps per row (plus one that sizes the number of reps)")
    ap.add_argument("--budget", type=float, default=1.0,
                    help="seconds of timed steps per implementation; fewer reps when a "
                         "step is slow (at least 3)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end CNN benchmark")
    ap.add_argument("--e2e-algos", nargs="+", default=None,
                    help="end-to-end rows to run, by label, or all: "
                         f"{', '.join(a.label for a in e2e.E2E_ALGOS)} (default: "
                         f"{' '.join(e2e.DEFAULT_E2E)}; SGD always runs)")
    ap.add_argument("--e2e-steps", type=int, default=50, help="timed end-to-end steps")
    ap.add_argument("--e2e-warmup", type=int, default=5,
                    help="untimed steps first (VaSSORe with a gSAM criterion: at least 105, "
                         "past its 100 warm-up steps)")
    ap.add_argument("--compile-anchor", action="store_true",
                    help="also time the torch.compile anchor (foreach SAM/ASAM/GSAM step "
                         "compiled with inductor) in child processes; see bench/compile_anchor.py")
    ap.add_argument("--compile-budget", type=float, default=300.0,
                    help="seconds a compile may take before its row says it did not finish")
    ap.add_argument("--compile-suites", nargs="+", default=None,
                    help="suites of the anchor rows (default: those of --suite)")
    ap.add_argument("--compile-algos", nargs="+", default=None,
                    help="algorithms of the anchor rows (default: those of --algos it "
                         "expresses: sam, asam, gsam)")
    ap.add_argument("--sharded", nargs="*", default=None, metavar="ALGO",
                    help="also the sharded-training run (FSDP2, 2 gloo ranks on CPU; "
                         "bench/sharded.py) for these algorithms (default: SAM)")
    ap.add_argument("--contention", type=int, default=0, metavar="N",
                    help="also time every suite with N busy-loop processes competing for the "
                         "cores (bench/contention.py): the seed loop, pytorch-optimizer foreach "
                         "and sam_kernels' kernel backend, right after the quiet rows")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the check that every implementation computes the same result")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes and few steps: checks the harness in seconds")
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/results/<machine>-<date>T<time>.json); "
                         "an existing file is never overwritten (a -2, -3... suffix instead)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="only redraw the PNG of an earlier results file, next to it")
    args = ap.parse_args(argv)
    if args.quick:
        args.suite = args.suite or ["tiny", "sweep4"]
        args.reps, args.warmup, args.budget = 3, 1, 0.2
        args.e2e_steps, args.e2e_warmup = 3, 1
        args.e2e_algos = args.e2e_algos or ["SAM", "VaSSORe(naive)"]
        args.algos = args.algos or ["all"]
    if args.suite is None:
        args.suite = list(suites.DEFAULT_SUITES)
    elif args.suite == ["all"]:
        args.suite = list(suites.ALL_SUITES)
    if args.algos is None:
        args.algos = list(DEFAULT_ALGOS)
    elif args.algos == ["all"]:
        args.algos = list(ALGOS)
    if args.e2e_algos is None:
        args.e2e_algos = list(e2e.DEFAULT_E2E)
    elif args.e2e_algos == ["all"]:
        args.e2e_algos = [a.label for a in e2e.E2E_ALGOS]
    for name in args.suite:
        if name not in suites.SUITES:
            ap.error(f"unknown suite {name!r}; choose from {', '.join(suites.SUITES)} or all")
    for name in args.algos:
        if name not in ALGOS:
            ap.error(f"unknown algorithm {name!r}; choose from {', '.join(ALGOS)}")
    e2e_labels = {a.label.lower() for a in e2e.E2E_ALGOS}
    for label in args.e2e_algos:
        if label.lower() not in e2e_labels:
            ap.error(f"unknown end-to-end algorithm {label!r}; choose from "
                     f"{', '.join(a.label for a in e2e.E2E_ALGOS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        why_not = report.plot(results, str(Path(args.replot).with_suffix(".png")))
        print(why_not or f"wrote {Path(args.replot).with_suffix('.png')}")
        return results
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    harness.quiet_gc()
    algos = [ALGOS[a] for a in args.algos]
    started = time.time()
    from sam_kernels import ops
    results = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "machine": harness.machine_info(device),
            "uptime_before": harness.uptime(),
            "backends": ops.backend_status(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "packages": _package_versions(),
        },
        "verification": {}, "suites": [], "e2e": None,
    }
    print(f"sam_kernels benchmark on {results['meta']['machine']['cpu']} "
          f"({os.cpu_count()} cores), torch {torch.__version__}, device {device}; "
          f"{results['meta']['uptime_before']}")

    if not args.no_verify:
        for algo in algos:
            impls, _ = implementations(algo, device)
            v = micro.verify(algo, impls, device)
            results["verification"][algo.name] = v
            worst = max(v["rel_diff"].values(), default=float("nan"))
            print(f"verify {algo.name}: {'ok' if v['ok'] else 'MISMATCH'} (largest relative "
                  f"difference from {v['reference']}: {worst:.1e}"
                  + (f"; errors: {v['errors']}" if v["errors"] else "") + ")")

    for name in args.suite:
        suite = micro.measure_suite(name, algos, device, dtype, args.reps, args.warmup,
                                    args.budget)
        suite["contention"] = 0
        results["suites"].append(suite)
        print(report.suite_table(suite) + "\n")
        if args.contention:
            with contention.Contention(args.contention) as load:
                busy = micro.measure_suite(name, algos, device, dtype, args.reps, args.warmup,
                                           args.budget, select=contended_impl)
            busy["contention"] = args.contention
            busy["busy_pids"] = load.stopped_pids
            results["suites"].append(busy)
            print(report.suite_table(busy) + "\n")

    if args.compile_anchor:
        from bench import compile_anchor
        results["compile_anchor"] = compile_anchor.run_all(
            args.compile_suites or args.suite, args.compile_algos or args.algos, str(device),
            args.dtype, args.reps, args.budget, args.compile_budget, args.threads)
        print(compile_anchor.table(results["compile_anchor"]) + "\n")

    if not args.no_e2e:
        results["e2e"] = e2e.run_e2e(
            device, steps=args.e2e_steps, warmup=args.e2e_warmup,
            criteria_warmup=args.e2e_warmup if args.quick else max(args.e2e_warmup, 105),
            select=args.e2e_algos)
        print(report.e2e_table(results["e2e"]) + "\n")

    if args.sharded is not None:
        from bench import sharded
        results["sharded"] = sharded.run(args.sharded or ["SAM"], quick=args.quick)
        print(sharded.table(results["sharded"]) + "\n")

    results["goals"] = report.goals(results)
    if results["goals"]:
        print("goals (reported, not asserted):\n" + report.goals_table(results["goals"]))
    results["meta"]["uptime_after"] = harness.uptime()
    results["meta"]["seconds"] = round(time.time() - started, 1)

    out = harness.reserve_results_path(Path(args.out) if args.out else RESULTS_DIR / (
        f"{harness.machine_slug(device)}-{datetime.datetime.now():%Y-%m-%dT%H%M%S}.json"))
    why_not = None
    if not args.no_plot:
        why_not = report.plot(results, str(out.with_suffix(".png")))
        results["meta"]["plot"] = why_not or out.with_suffix(".png").name
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    plotted = "" if args.no_plot else (
        f" and {results['meta']['plot']}" if not why_not else f" (no plot: {why_not})")
    print(f"wrote {out}{plotted} in {results['meta']['seconds']} s; "
          f"{results['meta']['uptime_after']}")
    return results


def contended_impl(impl) -> bool:
    """The rows timed again under contention: the seed loop, pytorch-optimizer's foreach path
    and sam_kernels' kernel backends (the reference backend is torch's own foreach ops)."""
    return impl.kind == "seed" or impl.label == "pytorch-optimizer foreach" or (
        impl.kind == "ours" and impl.backend != "reference")


def _package_versions() -> dict:
    from importlib import metadata
    versions = {}
    for name in ("sam_kernels", "torch", "triton", "pytorch_optimizer", "numpy", "matplotlib",
                 "scikit-learn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


if __name__ == "__main__":
    main()
