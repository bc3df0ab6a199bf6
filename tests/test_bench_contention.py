"""The contended benchmark scenario: bench/contention.py's busy processes really start and really
stop (on exit of the block, on an exception, and by themselves when the benchmark is killed),
results files never overwrite each other, and the goals table judges only kernel backends.
No timing is asserted."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.contention import Contention  # noqa: E402
from bench.run import reserve_results_path  # noqa: E402


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids, timeout=20.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_busy_processes_run_inside_the_block_and_are_gone_after_it():
    with Contention(2) as load:
        pids = load.pids()
        assert len(pids) == 2 and all(alive(p) for p in pids)
    assert load.stopped_pids == pids
    assert wait_gone(pids, timeout=0.0) == []  # stop() waited for them


def test_busy_processes_stop_when_the_block_raises():
    with pytest.raises(KeyboardInterrupt):
        with Contention(1) as load:
            pids = load.pids()
            raise KeyboardInterrupt  # what Ctrl-C raises
    assert wait_gone(pids, timeout=0.0) == []


def test_busy_processes_exit_by_themselves_when_the_benchmark_is_killed():
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); "
            "from bench.contention import Contention; "
            "load = Contention(2).start(); print(*load.pids(), flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code, str(ROOT)], stdout=subprocess.PIPE,
                              text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)  # no atexit, no finally: the worst case
        parent.wait()
    assert wait_gone(pids) == []


def test_results_files_never_overwrite_each_other(tmp_path):
    path = tmp_path / "cpu-2core-2026-12-06T224500.json"
    first = reserve_results_path(path)
    first.write_text("{}")
    second = reserve_results_path(path)
    path.with_name("x.png").write_text("")
    assert (first, second) == (path, tmp_path / "cpu-2core-2026-12-06T224500-2.json")
    assert first.read_text() == "{}" and second.exists()
    # a PNG of that name counts as taken too
    (tmp_path / "cpu-2core-2026-12-06T224500-3.png").write_text("")
    assert reserve_results_path(path).name == "cpu-2core-2026-12-06T224500-4.json"


def _row(backend, kind, speedup, floor=1.0):
    return {"algo": "sam", "kind": kind, "backend": backend, "impl": f"x[{backend}]",
            "speedup_extra": speedup, "floor_ratio": floor}


def test_goals_judge_only_kernel_backends_and_contended_rows():
    rows = [_row(None, "seed", 1.0), _row("reference", "ours", 0.5), _row("cpu", "ours", 5.0)]
    results = {"suites": [{"suite": "small2000", "rows": rows, "contention": 0},
                          {"suite": "small2000", "rows": rows, "contention": 2}]}
    goals = report.goals(results)
    assert {g["backend"] for g in goals} == {"cpu"}
    quiet = [g for g in goals if not g["contention"]]
    busy = [g for g in goals if g["contention"]]
    assert [g["issue"] for g in quiet] == ["2", "2"] and all(g["met"] for g in quiet)
    assert [(g["issue"], g["value"], g["met"]) for g in busy] == [("20", 5.0, True)]


def test_quick_run_adds_contended_rows_and_stops_its_load(tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--threads", "2",
         "--suite", "tiny", "--algos", "sam", "--no-e2e", "--no-verify", "--no-plot",
         "--contention", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    quiet, busy = results["suites"]
    assert (quiet["suite"], quiet["contention"], busy["suite"], busy["contention"]) == \
        ("tiny", 0, "tiny", 1)
    kinds = {(r["kind"], r["backend"]) for r in busy["rows"]}
    assert ("seed", None) in kinds and ("ours", "reference") not in kinds
    assert len(busy["busy_pids"]) == 1 and wait_gone(busy["busy_pids"], timeout=0.0) == []
    assert all(g["backend"] != "reference" for g in results["goals"])
    assert "CONTENDED (1 busy processes)" in proc.stdout
