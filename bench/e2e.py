"""End-to-end training-step time of a small CNN on this machine, each algorithm ÷ plain SGD.

The data are scikit-learn's bundled 8×8 digits (no download; synthetic digits-shaped data
when scikit-learn is missing, said in the output), one fixed stream of minibatches for every
algorithm, the same initial weights, SGD(lr, momentum) as the base optimizer. Every optimizer
first runs `warmup` untimed steps — VaSSORe with a gSAM criterion runs `criteria_warmup`,
more than its 100 warm-up steps, so its skipping is in effect — then `steps` timed steps.
Reported per algorithm: mean step time (throughput), its ratio to SGD's, and forward/backward
passes per step counted from the closure calls (VaSSORe's inner-pass ratio is passes − 1).
"""
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import sam_kernels

from . import baselines

BASE_KWARGS = dict(lr=0.05, momentum=0.9)


def digits_data(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(images N×1×8×8 standardised, labels N, source description)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1797, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (1797,), generator=gen)
        return x.to(device), y.to(device), "synthetic (scikit-learn not installed)"
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    return x.to(device), torch.tensor(digits.target).to(device), "scikit-learn digits"


def small_cnn(width: int = 16) -> nn.Module:
    """3 conv + BatchNorm layers and a linear head: 24,170 parameters in 14 tensors."""
    w1, w2, w3 = width, 2 * width, 4 * width
    return nn.Sequential(
        nn.Conv2d(1, w1, 3, padding=1), nn.BatchNorm2d(w1), nn.ReLU(),
        nn.Conv2d(w1, w2, 3, padding=1), nn.BatchNorm2d(w2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w2, w3, 3, padding=1), nn.BatchNorm2d(w3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, 10))


@dataclass
class E2EAlgo:
    label: str
    ours_class: Optional[str]  # None: built by `build` alone
    kwargs: Dict[str, Any]
    build: Optional[Callable[[nn.Module], Any]] = None
    caller_runs_first_pass: bool = False
    long_warmup: bool = False  # gSAM criteria: always recompute for the first 100 steps
    two_pass: bool = True  # one inner (pass 1) + one outer pass when nothing is skipped

    def make(self, model: nn.Module):
        if self.build is not None:
            return self.build(model)
        cls = getattr(sam_kernels, self.ours_class)
        return cls(model.parameters(), torch.optim.SGD, model=model, **self.kwargs,
                   **BASE_KWARGS)

    def available(self) -> bool:
        return self.ours_class is None or hasattr(sam_kernels, self.ours_class)


def _vassore(criterion: str, mu: bool = False, **extra) -> E2EAlgo:
    cls = "VaSSOReMu" if mu else "VaSSORe"
    return E2EAlgo(f"{cls}({criterion})", cls, dict(rho=0.05, theta=0.9, criterion=criterion,
                                                     **extra),
                   long_warmup=criterion.startswith("gSAM"))


E2E_ALGOS: List[E2EAlgo] = [
    E2EAlgo("SGD", None, {}, build=lambda m: torch.optim.SGD(m.parameters(), **BASE_KWARGS),
            two_pass=False),
    E2EAlgo("SAM seed loop (davda54)", None, {},
            build=lambda m: baselines.DavdaSAM(m.parameters(), torch.optim.SGD, rho=0.05,
                                               **BASE_KWARGS),
            caller_runs_first_pass=True),
    E2EAlgo("SAM", "SAM", dict(rho=0.05)),
    E2EAlgo("ASAM", "SAM", dict(rho=0.5, adaptive=True)),
    E2EAlgo("GSAM", "GSAM", dict(rho=0.05, gsam_alpha=0.4)),
    E2EAlgo("GAM", "GAM", {}, two_pass=False),
    E2EAlgo("VaSSO", "VaSSO", dict(rho=0.05, theta=0.9)),
    _vassore("naive", k=2),
    _vassore("random", p=0.5, generator=None),
    _vassore("gSAMflat"),
    _vassore("gSAMsharp"),
    _vassore("gSAMratio"),
    _vassore("cosSim"),
    _vassore("gSAMflat", mu=True),
    # issue 14: the variants that cut the second pass, next to SAM (passes per step tell)
    E2EAlgo("SAM(interval=5)", "SAM", dict(rho=0.05, interval=5)),
    E2EAlgo("LookSAM(k=5)", "LookSAM", dict(rho=0.05, k=5, alpha=0.7)),
    E2EAlgo("LookSAM(k=5, tensor)", "LookSAM", dict(rho=0.05, k=5, alpha=0.7,
                                                    granularity="tensor")),
    E2EAlgo("MSAM", "MomentumSAM", dict(rho=0.05), two_pass=False),
    E2EAlgo("FriendlySAM", "FriendlySAM", dict(rho=0.05, sigma=1.0, lmbda=0.9)),
    E2EAlgo("SAM-ON", "SAM", {}, build=lambda m: sam_kernels.SAM(
        sam_kernels.sam_on_param_groups(m, rho=0.5), torch.optim.SGD, model=m, **BASE_KWARGS)),
    E2EAlgo("LookSAM(k=5) pytorch-optimizer", None, {}, build=lambda m: _po().LookSAM(
        m.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=0.7, **BASE_KWARGS),
        caller_runs_first_pass=True),
    E2EAlgo("FriendlySAM pytorch-optimizer", None, {}, build=lambda m: _po().FriendlySAM(
        m.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9, **BASE_KWARGS),
        caller_runs_first_pass=True),
]


DEFAULT_E2E = ("SAM", "VaSSORe(gSAMflat)", "LookSAM(k=5)", "MSAM")  # rows with goals
#: issue 14's rows: the efficient variants next to SAM (`--e2e-algos efficient`)
EFFICIENT_E2E = ("SAM", "SAM(interval=5)", "LookSAM(k=5)", "LookSAM(k=5, tensor)", "MSAM",
                 "FriendlySAM", "SAM-ON", "LookSAM(k=5) pytorch-optimizer",
                 "FriendlySAM pytorch-optimizer")


def _po():
    """pytorch-optimizer, for the rows that compare with it (a clear error when missing)."""
    try:
        import pytorch_optimizer
    except ImportError as exc:
        raise RuntimeError("pytorch-optimizer is not installed (pip install "
                           "pytorch-optimizer)") from exc
    return pytorch_optimizer


class _Trainer:
    """One algorithm training its own copy of the CNN on the shared minibatch stream."""

    def __init__(self, algo: E2EAlgo, device: torch.device, batches) -> None:
        torch.manual_seed(0)
        self.algo, self.device, self.batches = algo, device, batches
        self.model = small_cnn().to(device)
        self.opt = algo.make(self.model)
        self.t = 0  # index of the next minibatch
        self.counting = False
        self.passes = 0
        self.times: List[float] = []
        self.inner_before = None

    def run(self, n: int, timed: bool) -> None:
        if timed and not self.counting:
            self.counting = True
            self.inner_before = getattr(self.opt, "inner_steps", None)
        for _ in range(n):
            xb, yb = self.batches[self.t]
            self.t += 1

            def closure():
                self.passes += timed
                self.opt.zero_grad()
                loss = nn.functional.cross_entropy(self.model(xb), yb)
                loss.backward()
                return loss
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if self.algo.label == "SGD":
                closure()
                self.opt.step()
            elif self.algo.caller_runs_first_pass:
                closure()
                self.opt.step(closure)
            else:
                self.opt.step(closure)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if timed:
                self.times.append(time.perf_counter() - start)


def run_e2e(device: torch.device, steps: int = 50, warmup: int = 5, criteria_warmup: int = 105,
            batch: int = 64, select: Optional[List[str]] = None, chunk: int = 5,
            log=print) -> Dict[str, Any]:
    """Times every algorithm of E2E_ALGOS (or those labelled in `select`; SGD always runs,
    as the denominator). After each one's warm-up, the timed steps run in interleaved rounds
    of `chunk` steps per algorithm, so load changes on a shared machine hit all alike."""
    x, y, source = digits_data(device)
    gen = torch.Generator().manual_seed(0)
    longest = max(warmup, criteria_warmup) + steps
    order = [torch.randint(0, len(y), (batch,), generator=gen) for _ in range(longest)]
    batches = [(x[i.to(device)], y[i.to(device)]) for i in order]
    wanted = {s.lower() for s in select or []}
    trainers: List[_Trainer] = []
    notes: List[str] = []
    for algo in E2E_ALGOS:
        if select and algo.label != "SGD" and algo.label.lower() not in wanted:
            continue
        if not algo.available():
            notes.append(f"{algo.label}: sam_kernels.{algo.ours_class} not available")
            continue
        try:
            trainer = _Trainer(algo, device, batches)
        except Exception as exc:  # an API mismatch is reported, not hidden
            notes.append(f"{algo.label}: could not be built: {type(exc).__name__}: {exc}")
            continue
        log(f"  e2e {algo.label}: warm-up")
        trainer.run(criteria_warmup if algo.long_warmup else warmup, timed=False)
        trainers.append(trainer)
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        for trainer in trainers:
            trainer.run(n, timed=True)
        done += n
    rows = []
    sgd_mean = None
    for tr in trainers:
        mean = statistics.fmean(tr.times)
        if tr.algo.label == "SGD":
            sgd_mean = mean
        rows.append({"algo": tr.algo.label, "mean_s": mean,
                     "median_s": statistics.median(tr.times),
                     "min_s": min(tr.times), "max_s": max(tr.times),
                     "passes_per_step": tr.passes / steps,
                     "inner_pass_ratio": tr.passes / steps - 1 if tr.algo.two_pass else None,
                     "inner_steps_reported": None if tr.inner_before is None else
                     (tr.opt.inner_steps - tr.inner_before) / steps})
    for row in rows:
        row["ratio_to_sgd"] = row["mean_s"] / sgd_mean if sgd_mean else None
    return {"model": "small CNN (3 conv + BN, 24k params)", "data": source, "batch": batch,
            "warmup_steps": warmup, "criteria_warmup_steps": criteria_warmup,
            "timed_steps": steps, "interleave_chunk": chunk, "base": f"SGD{BASE_KWARGS}",
            "torch_threads": torch.get_num_threads(), "rows": rows, "notes": notes}


def run_efficient(device: torch.device, runs: int = 4, steps: int = 300, chunk: int = 5,
                  labels=EFFICIENT_E2E, log=print) -> Dict[str, Any]:
    """Issue 14's table: the variants that cut SAM's second pass next to SAM, `runs`
    independent runs of `steps` interleaved timed steps each (fresh trainers, 5 warm-up
    steps). Per run and algorithm: mean step time ÷ SGD's (what `run_e2e` reports) and the
    passes of every step; the summary is the median over runs, with the range and the load
    average around each run (on a shared machine the spread is the honest error bar)."""
    x, y, source = digits_data(device)
    gen = torch.Generator().manual_seed(0)
    order = [torch.randint(0, len(y), (64,), generator=gen) for _ in range(steps + 10)]
    batches = [(x[i.to(device)], y[i.to(device)]) for i in order]
    by_label = {a.label: a for a in E2E_ALGOS}
    results = []
    for r in range(runs):
        load = [_loadavg()]
        trainers = []
        for label in ("SGD",) + tuple(lab for lab in labels if lab != "SGD"):
            tr = _Trainer(by_label[label], device, batches)
            tr.run(5, timed=False)
            tr.kinds = []
            trainers.append(tr)
        done = 0
        while done < steps:
            for tr in trainers:
                for _ in range(min(chunk, steps - done)):
                    before = tr.passes
                    tr.run(1, timed=True)
                    tr.kinds.append(tr.passes - before)
            done += min(chunk, steps - done)
        load.append(_loadavg())
        sgd = statistics.fmean(trainers[0].times)
        rows = [{"algo": tr.algo.label, "ratio_to_sgd": statistics.fmean(tr.times) / sgd,
                 "mean_ms": 1e3 * statistics.fmean(tr.times),
                 "passes_per_step": sum(tr.kinds) / len(tr.kinds)} for tr in trainers]
        results.append({"load": load, "rows": rows})
        log(f"run {r}: load {load[0]} -> {load[1]}: " +
            ", ".join(f"{row['algo']} {row['ratio_to_sgd']:.2f}" for row in rows[1:]))
    summary = []
    for i, row in enumerate(results[0]["rows"]):
        ratios = [run["rows"][i]["ratio_to_sgd"] for run in results]
        summary.append({"algo": row["algo"], "ratio_median": statistics.median(ratios),
                        "ratio_min": min(ratios), "ratio_max": max(ratios),
                        "passes_per_step": row["passes_per_step"]})
    return {"model": "small CNN (3 conv + BN, 24k params)", "data": source, "batch": 64,
            "steps_per_run": steps, "runs": runs, "interleave_chunk": chunk,
            "torch_threads": torch.get_num_threads(), "base": f"SGD{BASE_KWARGS}",
            "summary": summary, "per_run": results}


def _loadavg() -> Optional[List[str]]:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return None


if __name__ == "__main__":  # python -m bench.e2e [runs] [steps] [threads] [out.json]
    import json
    import sys
    argv = sys.argv[1:]
    if len(argv) > 2:
        torch.set_num_threads(int(argv[2]))
    out = run_efficient(torch.device("cpu"), runs=int(argv[0]) if argv else 4,
                        steps=int(argv[1]) if len(argv) > 1 else 300)
    print("| algorithm | step ÷ SGD (median of runs) | range | passes per step |")
    print("|---|---|---|---|")
    for row in out["summary"]:
        print(f"| {row['algo']} | {row['ratio_median']:.2f} | {row['ratio_min']:.2f}–"
              f"{row['ratio_max']:.2f} | {row['passes_per_step']:.2f} |")
    if len(argv) > 3:
        with open(argv[3], "w") as f:
            json.dump(out, f, indent=1)
