"""The benchmark harness itself works: `bench/run.py --quick` writes a results file with the
documented fields, the seed baselines compute what sam_kernels computes, the dispatch counter
counts what ran outside excluded segments, and the shape suites are the real models' shapes.
No timing is asserted (only the consistency of the recorded numbers)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness, suites  # noqa: E402
from bench.algos import ALGOS, benchmark_backends  # noqa: E402


def test_suites_match_the_published_parameter_counts():
    # torchvision: resnet50 25,557,032 parameters in 161 tensors; vit_b_16 86,567,656
    resnet = suites.resnet50()
    assert (len(resnet), suites.total_params(resnet)) == (161, 25_557_032)
    assert suites.total_params(suites.vit_b16()) == 86_567_656
    assert (len(suites.many_small()), suites.total_params(suites.many_small())) == \
        (2000, 2000 * 4096)
    lm = suites.lm_stack()
    sizes = sorted(suites.numel(s) for s in lm)
    assert sizes[len(sizes) // 2] <= 4096 < sizes[-1]  # mostly small, a few large


def test_dispatch_counter_skips_excluded_segments_and_views():
    x = torch.randn(10)
    probe = harness.Probe(torch.device("cpu"))
    counter = harness.DispatchCounter()
    probe.start()
    with counter:
        probe.counter = counter
        x.add_(1)
        x.view(2, 5)
        with probe.exclude("closure"):
            x.mul_(2)
            x.mul_(3)
        torch._foreach_add_([x, x], 1.0)
        x.sum().item()
        probe.counter = None
    probe.stop()
    assert counter.by_op == {"aten::add_": 1, "aten::_foreach_add_": 1, "aten::sum": 1}
    assert counter.kernels == 3
    assert counter.host_reads == 1


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--threads", "1",
         "--suite", "tiny", "--algos", "sam", "gsam", "--e2e-algos", "SAM", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out, proc.stdout


def test_quick_run_verifies_baselines_against_sam_kernels(quick_results):
    results, _, stdout = quick_results
    backends = benchmark_backends(torch.device("cpu"))
    for algo in ("sam", "gsam"):
        v = results["verification"][algo]
        assert v["reference"] == ALGOS[algo].seed.label
        assert v["errors"] == {}
        assert v["weight_change"] > 0
        for b in backends:
            assert v["rel_diff"][f"sam_kernels[{b}]"] <= 1e-9
        assert v["ok"], v
        assert f"verify {algo}: ok" in stdout


def test_quick_run_records_consistent_rows(quick_results):
    results, _, _ = quick_results
    assert {"meta", "verification", "suites", "e2e", "goals"} <= set(results)
    meta = results["meta"]
    assert meta["machine"]["torch"] == torch.__version__
    assert meta["settings"]["threads"] == 1 and meta["uptime_before"] and meta["uptime_after"]
    (suite,) = results["suites"]
    shapes = suites.SUITES["tiny"]()
    assert (suite["suite"], suite["tensors"], suite["params"]) == \
        ("tiny", len(shapes), suites.total_params(shapes))
    assert suite["copy_bandwidth_GBps"] > 0
    labels = {(r["algo"], r["impl"]) for r in suite["rows"]}
    for algo in ("sam", "gsam"):
        assert (algo, ALGOS[algo].seed.label) in labels
        for b in benchmark_backends(torch.device("cpu")):
            assert (algo, f"sam_kernels[{b}]") in labels
    for r in suite["rows"]:
        extra, whole = r["extra_s"], r["whole_s"]
        assert 0 < extra["min"] <= extra["median"] <= extra["max"]
        assert whole["median"] >= extra["median"]  # whole = extra + base, rep by rep
        assert r["bytes"] == ALGOS[r["algo"]].traffic_units * suite["params"] * 4
        assert r["floor_ratio"] == pytest.approx(extra["median"] / r["floor_s"])
        assert r["speedup_extra"] > 0 and r["finite"]
        if r["kind"] == "seed":
            assert r["speedup_extra"] == 1.0
            assert r["ops_per_step"] >= 2 * len(shapes)  # a per-tensor loop
        if r["kind"] == "ours":
            assert r["host_reads_per_step"] == 0


def test_quick_run_end_to_end_and_plot(quick_results):
    results, out, _ = quick_results
    rows = {r["algo"]: r for r in results["e2e"]["rows"]}
    assert set(rows) == {"SGD", "SAM"}
    assert rows["SGD"]["passes_per_step"] == 1.0 and rows["SAM"]["passes_per_step"] == 2.0
    assert rows["SAM"]["ratio_to_sgd"] == pytest.approx(rows["SAM"]["mean_s"] /
                                                        rows["SGD"]["mean_s"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").stat().st_size > 0
