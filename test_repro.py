"""repro.py: the grid's bookkeeping (a summary per finished run, refusal of other settings), its paired statistics and
its report, and one real run of the smallest cell."""

from __future__ import annotations

import json
import math
import os
import random
import statistics

import pytest

import repro


def t_cdf(x: float, df: int, n: int = 20_000) -> float:
    """Student's t CDF at x > 0 by Simpson's rule on the density (brute force for the table)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    pdf = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)
    h = x / n
    s = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


@pytest.mark.parametrize("df", sorted(repro.T975))
def test_t_quantiles_are_the_97_5_percent_points(df):
    q = repro.T975[df]  # given to 3 decimals: the true quantile lies within half a unit of the last one
    assert t_cdf(q - 0.0005, df) < 0.975 < t_cdf(q + 0.0005, df)


def test_paired_interval_covers_the_true_mean_at_its_stated_rate():
    """Simulated pairs: differences ~ N(0.1, 0.2); the 95 % interval from 5 pairs covers 0.1 in about 95 % of draws."""
    rng, hits, n = random.Random(0), 0, 4000
    for _ in range(n):
        m, lo, hi = repro.paired_ci([rng.gauss(0.1, 0.2) for _ in range(5)])
        hits += lo <= 0.1 <= hi
    assert abs(hits / n - 0.95) < 0.012
    m, lo, hi = repro.paired_ci([0.1, 0.3, 0.2])
    half = 4.303 * statistics.stdev([0.1, 0.3, 0.2]) / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert math.isnan(repro.paired_ci([0.4])[1])


def summary(tmp_path, world, teacher, curriculum, seed, success, kl, steps=40):
    cmd = repro.command(world, teacher, curriculum, seed, steps, str(tmp_path / "runs" / "x"), "")
    rows = [{"step": -1, "eval_success": 0.2, "eval_traj_kl": 9.0, "eval_kl_by_turn": [0.1]},
            {"step": 0, "traj_kl": 3.0, "k": 1, "kl_by_turn": [0.2], "eval_success": success, "eval_traj_kl": kl, "eval_kl_by_turn": [0.1], "teacher_off_path": 0.25}]
    path = tmp_path / "results" / (repro.run_name(world, teacher, curriculum, seed) + ".json")
    os.makedirs(path.parent, exist_ok=True)
    path.write_text(json.dumps({"command": " ".join(cmd), "args": repro.requested_args(cmd), "rows": rows,
                                "wall_seconds": 60.0 * (seed + 1), "commit": "x"}))
    return path


def grid_args(tmp_path, **kw) -> repro.Args:
    return repro.Args(**{"worlds": ("tinyworld",), "teachers": ("recovery",), "curricula": ("opd", "f2b"),
                         "seeds": (0, 1, 2), "runs": str(tmp_path / "runs"), "results": str(tmp_path / "results"), **kw})


def test_report_pairs_each_curriculum_with_opd_seed_by_seed(tmp_path):
    for s, (a, b) in enumerate([(0.5, 0.7), (0.4, 0.5), (0.6, 0.9)]):
        summary(tmp_path, "tinyworld", "recovery", "opd", s, a, 10.0 + s)
        summary(tmp_path, "tinyworld", "recovery", "f2b", s, b, 8.0)
    results = repro.main(grid_args(tmp_path, report=True))
    f2b = results["tinyworld / recovery / f2b"]
    assert f2b["minus_opd"]["seeds"] == [0, 1, 2]
    assert f2b["minus_opd"]["eval_success"] == pytest.approx(repro.paired_ci([0.2, 0.1, 0.3]))
    assert f2b["minus_opd"]["eval_traj_kl"][0] == pytest.approx(-3.0)
    assert f2b["wall"] == pytest.approx(120.0) and f2b["teacher_off_path"] == (0.25, 0.0)
    assert "minus_opd" not in results["tinyworld / recovery / opd"]
    table = (tmp_path / "results" / "table.md").read_text()
    assert "| tinyworld / recovery / f2b | 3 | 0.20 ± 0.00 → 0.70 ± 0.20 |" in table and "+0.20 [" in table
    assert os.path.getsize(tmp_path / "results" / "curves-tinyworld-recovery.png") > 10_000


def test_a_summary_with_other_settings_is_refused_not_relabelled(tmp_path):
    summary(tmp_path, "tinyworld", "recovery", "opd", 0, 0.5, 10.0, steps=40)
    with pytest.raises(ValueError, match=r"opd-s0\.json was made with other settings than asked \(--steps: 40 there, 80 asked"):
        repro.main(grid_args(tmp_path, curricula=("opd",), seeds=(0,), steps=80))
    with pytest.raises(ValueError, match="--eta: 2 there, 4 asked"):
        repro.main(grid_args(tmp_path, curricula=("opd",), seeds=(0,), extra="--eta 4"))
    # settings that do not change what a run computes are not differences
    assert repro.differences({"steps": 40, "device": "cpu", "eval_every": 10}, {"steps": 40, "device": "cuda", "eval_every": 10}) == []


def test_one_real_run_lands_as_a_summary_and_is_reused(tmp_path):
    args = grid_args(tmp_path, curricula=("opd",), seeds=(0,), steps=1, jobs=1,
                     extra="--tasks-per-step 2 --eval-tasks 2 --max-turns 3 --eval-every 1")
    repro.main(args)
    got = json.loads((tmp_path / "results" / "tinyworld-recovery-opd-s0.json").read_text())
    assert got["args"]["steps"] == 1 and got["args"]["teacher"] == "tiny-teacher" and got["wall_seconds"] > 0
    assert [r["step"] for r in got["rows"] if "eval_success" in r] == [-1, 0]
    assert got["command"].startswith("python tcod.py --env tinyworld --student tiny-student") and len(got["commit"]) >= 40
    mtime = os.path.getmtime(tmp_path / "results" / "tinyworld-recovery-opd-s0.json")
    repro.main(args)  # nothing is missing: nothing runs, the summary stays
    assert os.path.getmtime(tmp_path / "results" / "tinyworld-recovery-opd-s0.json") == mtime
