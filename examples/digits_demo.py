"""SAM-family optimizers on real data: scikit-learn's bundled 8×8 digits (no download) with 20%
of the training labels flipped to a wrong class, a small MLP, several seeds.

For each of SGD, SAM, ASAM, GSAM, VaSSO, VaSSORe and the variants that cut SAM's second pass
(interval SAM, LookSAM, MSAM) plus F-SAM, it reports the test accuracy (clean test labels), the
accuracy on the noisy training labels (how much noise was memorised), the largest eigenvalue of
the training-loss Hessian at the end (`sam_kernels.sharpness.hessian_top_eigenvalue`: power
iteration with Hessian-vector products, a sharpness measure), forward/backward passes per step,
wall time and time per step. Prints a table and writes a JSON file and a plot (accuracy, λ_max,
and accuracy against time per step). SAM-ON is not in the list: this MLP has no normalisation
layers for it to perturb.

    pip install scikit-learn matplotlib
    python examples/digits_demo.py                 # ~2-3 minutes on 2 CPU cores
    python examples/digits_demo.py --seeds 10 --epochs 60
    python examples/digits_demo.py --out examples/results/digits.json   # refresh the published

Writes to examples/out/ (untracked) unless --out says otherwise.

Nothing here decides a winner: read the spread across seeds before reading the means.
"""
import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

import sam_kernels
from sam_kernels.sharpness import hessian_top_eigenvalue

HERE = Path(__file__).resolve().parent


def load_noisy_digits(seed: int, noise: float, test_fraction: float = 0.2):
    """Standardised 64-feature digits, a stratification-free random split, and `noise` of the
    training labels replaced by a different class chosen uniformly."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    y_train = y[train].clone()
    flip = torch.rand(len(train), generator=gen) < noise
    offset = torch.randint(1, 10, (len(train),), generator=gen)
    y_train[flip] = (y_train[flip] + offset[flip]) % 10  # always a different class
    return x[train], y_train, y[train], x[test], y[test], flip.float().mean().item()


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


BASE = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
# name -> factory(model) -> optimizer; every one but SGD takes step(closure)
ALGORITHMS: Dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "SGD": lambda m: torch.optim.SGD(m.parameters(), **BASE),
    "SAM": lambda m: sam_kernels.SAM(m.parameters(), torch.optim.SGD, rho=0.1, **BASE),
    "ASAM": lambda m: sam_kernels.SAM(m.parameters(), torch.optim.SGD, rho=1.0, adaptive=True,
                                      **BASE),
    "GSAM": lambda m: sam_kernels.GSAM(m.parameters(), torch.optim.SGD, rho=0.1,
                                       gsam_alpha=0.2, **BASE),
    "VaSSO": lambda m: sam_kernels.VaSSO(m.parameters(), torch.optim.SGD, rho=0.1, theta=0.4,
                                         **BASE),
    "VaSSORe": lambda m: sam_kernels.VaSSORe(m.parameters(), torch.optim.SGD, rho=0.1,
                                             theta=0.4, criterion="gSAMflat", **BASE),
    "SAM(interval=5)": lambda m: sam_kernels.SAM(m.parameters(), torch.optim.SGD, rho=0.1,
                                                 interval=5, **BASE),
    "LookSAM(k=5)": lambda m: sam_kernels.LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=5,
                                                  alpha=0.7, **BASE),
    "MSAM": lambda m: sam_kernels.MomentumSAM(m.parameters(), torch.optim.SGD, rho=0.1, **BASE),
    "F-SAM": lambda m: sam_kernels.FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1,
                                               sigma=1.0, lmbda=0.9, **BASE),
}


def top_hessian_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of ∇²L(w) of the mean training loss (power iteration on
    Hessian-vector products, to a relative change of 1e-4)."""
    res = hessian_top_eigenvalue(model, nn.functional.cross_entropy, (x, y), iters=100,
                                 tol=1e-4, generator=torch.Generator().manual_seed(seed))
    return res.value


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _step(name, opt, closure):
    """One training step: SGD runs the closure once itself; the SAM family takes it."""
    if name == "SGD":
        closure()
        opt.step()
    else:
        opt.step(closure)


def train_one(name: str, seed: int, args) -> Dict[str, float]:
    x_tr, y_tr, y_tr_clean, x_te, y_te, flipped = load_noisy_digits(seed, args.noise)
    torch.manual_seed(seed)
    model = mlp(args.width)
    opt = ALGORITHMS[name](model)
    steps_per_epoch = (len(y_tr) + args.batch - 1) // args.batch
    # The scheduler may be attached to the SAM-family object: it shares the base's groups.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(1000 + seed)
    passes = 0
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(perm), args.batch):
            idx = perm[i:i + args.batch]
            xb, yb = x_tr[idx], y_tr[idx]

            def closure():
                nonlocal passes
                passes += 1
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            _step(name, opt, closure)
            sched.step()
    wall = time.perf_counter() - start
    steps = args.epochs * steps_per_epoch
    return {"test_acc": accuracy(model, x_te, y_te),
            "train_acc_noisy_labels": accuracy(model, x_tr, y_tr),
            "train_acc_clean_labels": accuracy(model, x_tr, y_tr_clean),
            "top_hessian_eigenvalue": top_hessian_eigenvalue(model, x_tr, y_tr, seed=seed),
            "passes_per_step": passes / steps, "wall_s": wall, "ms_per_step": 1e3 * wall / steps,
            "flipped_fraction": flipped}


def summarise(runs: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values}
    return out


def table(summary: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    cols = ("algorithm", "test acc %", "train acc (noisy labels) %", "top Hessian eig",
            "passes/step", "wall s", "ms/step")
    lines = []
    for name, s in summary.items():
        lines.append((name,
                      f"{100 * s['test_acc']['mean']:.2f} ± {100 * s['test_acc']['std']:.2f}",
                      f"{100 * s['train_acc_noisy_labels']['mean']:.1f} ± "
                      f"{100 * s['train_acc_noisy_labels']['std']:.1f}",
                      f"{s['top_hessian_eigenvalue']['mean']:.2f} ± "
                      f"{s['top_hessian_eigenvalue']['std']:.2f}",
                      f"{s['passes_per_step']['mean']:.2f}", f"{s['wall_s']['mean']:.1f}",
                      f"{s['ms_per_step']['mean']:.2f}"))
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols)] + [fmt.format(*line) for line in lines])


def plot(summary, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(summary)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, key, label, scale in (
            (axes[0], "test_acc", "test accuracy (%)", 100),
            (axes[1], "top_hessian_eigenvalue", "top Hessian eigenvalue (train loss)", 1),
            (axes[2], "wall_s", "wall time per run (s)", 1)):
        for i, n in enumerate(names):
            values = [scale * v for v in summary[n][key]["values"]]
            ax.bar(i, statistics.fmean(values), color=plt.cm.tab10(i), alpha=0.6)
            ax.plot([i] * len(values), values, "k.", ms=5)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    lo = min(min(summary[n]["test_acc"]["values"]) for n in names) * 100
    axes[0].set_ylim(max(0, lo - 3), 100)
    ax = axes[3]  # what a step costs against what it buys
    for i, n in enumerate(names):
        acc, ms = summary[n]["test_acc"], summary[n]["ms_per_step"]
        ax.errorbar(ms["mean"], 100 * acc["mean"], xerr=ms["std"], yerr=100 * acc["std"],
                    fmt="o", color=plt.cm.tab10(i % 10), capsize=3, label=n)
        ax.annotate(n, (ms["mean"], 100 * acc["mean"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("time per step (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs time per step (mean ± std)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.suptitle("digits, 20% label noise: bars = mean over seeds, dots = single seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_average():
    """1/5/15-minute load averages (timings on a shared machine need them), if known."""
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.exists() else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--algos", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    ap.add_argument("--threads", type=int, default=None)
    # default: the untracked examples/out/ (.gitignore); the published results in
    # examples/results/ are refreshed only on purpose: --out examples/results/digits.json
    ap.add_argument("--out", default=str(HERE / "out" / "digits.json"),
                    help="JSON path (the plot goes next to it as .png); default %(default)s")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("sklearn") is None:
        raise SystemExit("digits_demo needs scikit-learn for its bundled data set: "
                         "pip install scikit-learn")
    if args.threads:
        torch.set_num_threads(args.threads)
    # seeds outer, algorithms inner: a change of machine load during the run hits every
    # algorithm alike (the results themselves do not depend on the order)
    for name in args.algos:  # first calls (kernel libraries, lazy inits) outside the timing
        model = mlp(args.width)
        opt = ALGORITHMS[name](model)
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(torch.randn(8, 64)),
                                                   torch.randint(0, 10, (8,)))
                loss.backward()
                return loss
            _step(name, opt, closure)
    load_at_start = _load_average()
    runs: Dict[str, List[Dict[str, float]]] = {name: [] for name in args.algos}
    for seed in range(args.seeds):
        for name in args.algos:
            runs[name].append(train_one(name, seed, args))
            print(f"{name:15s} seed {seed}: test {100 * runs[name][-1]['test_acc']:.2f}%  "
                  f"λmax {runs[name][-1]['top_hessian_eigenvalue']:.2f}  "
                  f"{runs[name][-1]['wall_s']:.1f} s", flush=True)
    summary = {name: summarise(r) for name, r in runs.items()}
    print()
    print(table(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["load_average"] = {"start": load_at_start, "end": _load_average()}
    out.write_text(json.dumps({"settings": settings, "base": BASE,
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "summary": summary}, indent=1) + "\n")
    try:
        plot(summary, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    except ImportError:
        print(f"wrote {out} (pip install matplotlib for the plot)")


if __name__ == "__main__":
    main()
