"""Printed tables, the goals check and the log-log plot of a results dict (see run.py)."""
from typing import Any, Dict, List, Optional

GOALS = (
    # (issue, algo, suite, what, threshold, "min" | "max"), judged on the quiet rows
    ("2", "sam", "small2000", "speedup_extra", 4.0, "min"),
    ("2", "sam", "small2000", "floor_ratio", 1.3, "max"),
    ("2", "sam", "resnet50", "speedup_extra", 1.15, "min"),
    ("5", "gsam", "resnet50", "speedup_extra", 3.0, "min"),
)
#: Judged on every suite timed under contention (--contention N).
CONTENDED_GOALS = (
    ("20", "sam", "speedup_extra", 1.5, "min"),
)
#: The goals are about the fused kernels: the reference backend (torch's foreach ops, the
#: oracle) is not judged.
KERNEL_BACKENDS = ("cpu", "cuda", "triton")
E2E_GOALS = (
    ("6/8", "SAM", 2.0, "about"),
    ("6", "VaSSORe(gSAMflat)", 1.35, "max"),
)


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _x(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def suite_table(suite: Dict[str, Any]) -> str:
    busy = suite.get("contention", 0)
    head = (f"suite {suite['suite']}"
            + (f" CONTENDED ({busy} busy processes)" if busy else "") +
            f": {suite['tensors']} tensors, {suite['params']:,} params "
            f"({suite['dtype']}); copy_ {suite['copy_bandwidth_GBps']:.2f} GB/s; "
            f"load {suite['load_before']} -> {suite['load_after']}; {suite['seconds']} s")
    cols = ["algo", "implementation", "extra ms (min-max)", "whole ms", "x seed extra",
            "x seed whole", "MB moved", "floor ms", "x floor", "ops/step", "host reads"]
    lines: List[List[str]] = []
    for r in suite["rows"]:
        e = r["extra_s"]
        lines.append([r["algo"], r["impl"],
                      f"{_ms(e['median'])} ({_ms(e['min'])}-{_ms(e['max'])})",
                      _ms(r["whole_s"]["median"]), _x(r.get("speedup_extra")),
                      _x(r.get("speedup_whole")), f"{r['bytes'] / 1e6:.0f}", _ms(r["floor_s"]),
                      _x(r["floor_ratio"]), str(r.get("ops_per_step", "-")),
                      str(r.get("host_reads_per_step", "-"))])
    out = [head, _format(cols, lines)]
    for algo, notes in suite.get("notes", {}).items():
        out += [f"  note ({algo}): {n}" for n in notes]
    return "\n".join(out)


def e2e_table(e2e: Dict[str, Any]) -> str:
    head = (f"end-to-end: {e2e['model']} on {e2e['data']}, batch {e2e['batch']}, "
            f"{e2e['timed_steps']} timed steps after {e2e['warmup_steps']} warm-up steps "
            f"({e2e['criteria_warmup_steps']} for gSAM criteria), base {e2e['base']}, "
            f"{e2e['torch_threads']} threads")
    cols = ["algorithm", "mean ms/step", "median ms", "/ SGD", "passes/step", "inner-pass ratio"]
    lines = [[r["algo"], _ms(r["mean_s"]), _ms(r["median_s"]),
              "-" if r["ratio_to_sgd"] is None else f"{r['ratio_to_sgd']:.2f}",
              f"{r['passes_per_step']:.2f}", _ratio(r.get("inner_pass_ratio"))]
             for r in e2e["rows"]]
    out = [head, _format(cols, lines)]
    out += [f"  note: {n}" for n in e2e.get("notes", [])]
    return "\n".join(out)


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def _format(cols: List[str], lines: List[List[str]]) -> str:
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c)
              for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*cols)] + [fmt.format(*line) for line in lines])


def markdown_suite_table(suite: Dict[str, Any]) -> str:
    rows = ["| algo | implementation | extra ms (min–max) | whole ms | × seed (extra) | "
            "× seed (whole) | × byte floor | ops/step |", "|" + "---|" * 8]
    for r in suite["rows"]:
        e = r["extra_s"]
        rows.append(f"| {r['algo']} | {r['impl']} | {_ms(e['median'])} ({_ms(e['min'])}–"
                    f"{_ms(e['max'])}) | {_ms(r['whole_s']['median'])} | "
                    f"{_x(r.get('speedup_extra'))} | {_x(r.get('speedup_whole'))} | "
                    f"{_x(r['floor_ratio'])} | {r.get('ops_per_step', '-')} |")
    return "\n".join(rows)


def markdown_e2e_table(e2e: Dict[str, Any]) -> str:
    rows = ["| algorithm | mean ms/step | ÷ SGD | fwd/bwd passes per step | inner-pass ratio |",
            "|---|---|---|---|---|"]
    for r in e2e["rows"]:
        rows.append(f"| {r['algo']} | {_ms(r['mean_s'])} | {_ratio(r['ratio_to_sgd'])} | "
                    f"{r['passes_per_step']:.2f} | {_ratio(r.get('inner_pass_ratio'))} |")
    return "\n".join(rows)


def goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The issues' performance goals against this run's numbers, for every sam_kernels kernel
    backend measured (reported, never asserted)."""
    out = []

    def judge(issue, algo, suite, what, threshold, kind):
        busy = suite.get("contention", 0)
        for r in suite["rows"]:
            if r["algo"] != algo or r["kind"] != "ours" or r.get(what) is None or \
                    r["backend"] not in KERNEL_BACKENDS:
                continue
            value = r[what]
            met = value >= threshold if kind == "min" else value <= threshold
            out.append({"issue": issue, "goal": f"{algo} {what} on {suite['suite']}"
                        + (f" with {busy} busy processes" if busy else "")
                        + f" {'>=' if kind == 'min' else '<='} {threshold}",
                        "backend": r["backend"], "value": round(value, 3), "met": met,
                        "contention": busy})

    for issue, algo, suite_name, what, threshold, kind in GOALS:
        for suite in results.get("suites", []):
            if suite["suite"] == suite_name and not suite.get("contention"):
                judge(issue, algo, suite, what, threshold, kind)
    for issue, algo, what, threshold, kind in CONTENDED_GOALS:
        for suite in results.get("suites", []):
            if suite.get("contention"):
                judge(issue, algo, suite, what, threshold, kind)
    e2e = results.get("e2e") or {}
    for issue, label, threshold, kind in E2E_GOALS:
        for r in e2e.get("rows", []):
            if r["algo"] != label or r["ratio_to_sgd"] is None:
                continue
            value = r["ratio_to_sgd"]
            met = value <= threshold * (1.1 if kind == "about" else 1.0)
            out.append({"issue": issue, "goal": f"e2e {label} step / SGD step "
                        f"{'~' if kind == 'about' else '<='} {threshold}", "backend": "auto",
                        "value": round(value, 3), "met": met,
                        "passes_per_step": r["passes_per_step"]})
    return out


def goals_table(items: List[Dict[str, Any]]) -> str:
    lines = [[g["issue"], g["goal"], g["backend"], f"{g['value']}", "yes" if g["met"] else "NO"]
             for g in items]
    return _format(["issue", "goal", "backend", "measured", "met"], lines)


_COLOURS = {"seed": "tab:gray", "pytorch-optimizer": "tab:blue",
            "pytorch-optimizer foreach": "tab:orange", "sam_kernels[reference]": "tab:red",
            "sam_kernels[cpu]": "tab:green", "sam_kernels[cuda]": "tab:purple",
            "sam_kernels[triton]": "tab:brown"}


def _colour(impl: str) -> str:
    """One colour per kind of implementation, the same in every panel."""
    return _COLOURS.get("seed" if impl.startswith("seed") else impl, "black")


def plot(results: Dict[str, Any], path: str) -> Optional[str]:
    """Extra-work time vs total parameters (log-log), one panel per algorithm, one colour per
    implementation; sweep suites joined by lines, named suites as labelled markers.
    Returns None on success, or why no plot was made."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    points: Dict[str, Dict[str, List]] = {}
    for suite in results["suites"]:
        busy = suite.get("contention", 0)
        for r in suite["rows"]:
            label = r["impl"] + (f" +{busy} busy" if busy else "")
            points.setdefault(r["algo"], {}).setdefault(label, []).append(
                (suite["params"], r["extra_s"]["median"], suite["suite"]))
    if not points:
        return "no rows to plot"
    algos = list(points)
    ncols = min(3, len(algos))
    nrows = (len(algos) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.flat[len(algos):]:
        ax.set_visible(False)
    for ax, algo in zip(axes.flat, algos):
        for impl, pts in points[algo].items():
            sweep = sorted((n, t) for n, t, s in pts if s.startswith("sweep"))
            named = [(n, t, s) for n, t, s in pts if not s.startswith("sweep")]
            contended = " busy" in impl
            colour = _colour(impl.split(" +")[0])
            if sweep:
                ax.plot(*zip(*sweep), "--^" if contended else "-o", ms=3, color=colour,
                        label=impl)
            for n, t, s in named:
                ax.plot(n, t, "^" if contended else "s", ms=6, color=colour,
                        label=None if sweep else impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
        for n, s in sorted({(n, s) for pts in points[algo].values() for n, _, s in pts
                            if not s.startswith("sweep")}):
            ax.annotate(s, (n, ax.get_ylim()[0]), textcoords="offset points", xytext=(2, 4),
                        fontsize=7, rotation=90)
        ax.set_title(f"{algo}: extra work per step")
        ax.set_xlabel("total parameters (lines: sweep of 128 equal tensors; "
                      "squares: model suites;\ndashed lines, triangles: with busy processes)",
                      fontsize=8)
        ax.set_ylabel("seconds (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    meta = results["meta"]
    fig.suptitle(f"{meta['machine']['cpu']} ({meta['machine']['cpu_count']} cores), torch "
                 f"{meta['machine']['torch']}, device {meta['machine']['device']}, "
                 f"{meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None
