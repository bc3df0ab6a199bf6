"""bench/compile_anchor.py, the torch.compile baseline of the benchmark: its foreach steps
compute SAM / ASAM / GSAM (checked eagerly against float64 maths written here), and a compile
that exceeds its budget gives a "did not finish" row instead of hanging the benchmark."""
import math

import torch

from bench import compile_anchor as ca


def _lists(seed, shapes=((7,), (3, 5), (0,), (130,))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def test_sam_and_asam_first_steps_match_float64_maths():
    for adaptive in (False, True):
        w, g = _lists(1), _lists(2)
        params, backups = [t.clone() for t in w], [torch.full_like(t, math.nan) for t in w]
        ca.sam_first(params, g, backups, 0.05, adaptive)
        terms = [(a.abs() * b) if adaptive else b for a, b in zip(w, g)]
        norm = math.sqrt(sum(float((t * t).sum()) for t in terms))
        for p, w0, g0, b in zip(params, w, g, backups):
            t2 = w0 * w0 if adaptive else torch.ones_like(w0)
            torch.testing.assert_close(p, w0 + 0.05 / (norm + 1e-12) * t2 * g0)
            assert torch.equal(b, w0)
        ca.restore(params, backups)
        assert all(torch.equal(p, w0) for p, w0 in zip(params, w))


def test_gsam_second_step_matches_float64_maths():
    w, g_w, g_p = _lists(3), _lists(4), _lists(5)
    params, backups, kept = [t + 1 for t in w], [t.clone() for t in w], [t.clone() for t in g_w]
    grads = [t.clone() for t in g_p]
    ca.gsam_second(params, grads, backups, kept, 0.4)
    dot = sum(float((a * b).sum()) for a, b in zip(g_w, g_p))
    m = math.sqrt(sum(float((a * a).sum()) for a in g_w))
    d = math.sqrt(sum(float((b * b).sum()) for b in g_p))
    c = dot / (m * d + 1e-12) * m / (d + 1e-12)
    for new, gp, gw in zip(grads, g_p, g_w):
        torch.testing.assert_close(new, gp - 0.4 * (gw - c * gp))
    assert all(torch.equal(p, w0) for p, w0 in zip(params, w))


def test_a_compile_over_budget_gives_a_did_not_finish_row():
    # the child needs far more than 1 s to import torch and compile: killed while compiling
    row = ca.run_row("tiny", "sam", "cpu", compile_budget=1.0)
    assert row["status"] == "compile timeout"
    assert row["note"] == "compile did not finish in 1 s"
    assert "rows" not in row and "compile_s" not in row
    assert "did not finish" in ca.table([row])
