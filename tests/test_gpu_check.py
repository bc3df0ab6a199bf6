"""tools/gpu_check.sh, the GPU verification kit: its dry run (no GPU needed) checks that every
step's command, file and named gap-check test exists and that the budgets fit in 8 minutes."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path, python=sys.executable):
    env = dict(os.environ, PYTHON=python)
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_dry_run_checks_every_step(tmp_path):
    proc = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in ("environment", "build", "self_check", "gpu_tests", "ops_contract", "bench",
                 "compile_anchor"):
        assert f"  {step} " in out, step
    total = [line for line in out.splitlines() if "total budget" in line][0]
    assert int(total.split("total budget ")[1].split("s")[0]) <= 480
    assert "dry run OK" in out and "FAIL" not in out
    assert (tmp_path / "gpu_check.log").read_text().count("dry run OK") == 1


def test_dry_run_fails_without_the_python_it_needs(tmp_path):
    proc = _dry_run(tmp_path, python="/nonexistent/python3")
    assert proc.returncode != 0
    assert "FAIL: /nonexistent/python3 not found" in proc.stdout
