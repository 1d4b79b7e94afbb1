"""The CPU reproduction of the paper's mechanism: vanilla OPD against TCOD-F2B and TCOD-B2F, with a teacher that has
recovery skill and one that has not, in TinyWorld and in the world where one early error changes every later turn
(tinyworld.TinyWorldDrift), several seeds each, all with the tiny models.

    python repro.py                      # the grid: 2 worlds x 2 teachers x 3 curricula x 5 seeds, 40 steps
    python repro.py --worlds tinyworld --teachers recovery --seeds 0 --jobs 1   # one cell, one seed
    python repro.py --report             # only the tables and figures, from what results/grid holds

Each run is a plain `tcod.py` run in <runs>/<world>-<teacher>-<curriculum>-s<seed> (its console log in <runs>/logs/),
two at a time with one thread each. When a run finishes, its summary (the command, its args.json, every metrics row,
the wall time and the commit) is written to <results>/<name>.json, a tracked folder, so that finished runs can be
committed as they land; a later call runs only what is missing (an unfinished run is resumed). A summary or a run
directory made with other settings than the ones asked for is refused, not reused.

The report (<results>/table.md, summary.json, curves-<world>-<teacher>*.png) is made from the summaries alone. Per
cell, mean ± SD over seeds; per curriculum, its difference from OPD seed by seed (seeds share task draws, so the
comparison is paired), with a 95 % paired-t confidence interval.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import tyro
from tqdm import tqdm

import cli
import plot
import rundir

CURRICULA = ("opd", "f2b", "b2f", "adaptive")
# (world, teacher) -> (student, teacher): one student everywhere (the TinyWorld student: 0.35-0.43 success on TinyWorld,
# 0.26 on TinyWorld-drift, where one detour puts it in a form it never saw), with the teacher of the world trained with
# recovery data (random actions and the expert's fixes) or on expert states only (sft.py tiny --noise 0). The drift
# recipe's own student (step 255) solves 0.72, nearly as much as its teacher's 0.76, so it is not used.
PAIRS = {
    ("tinyworld", "recovery"): ("tiny-student", "tiny-teacher"),
    ("tinyworld", "norec"): ("tiny-student", "tiny-teacher-norec"),
    ("tinyworld-drift", "recovery"): ("tiny-student", "tiny-teacher-drift"),
    ("tinyworld-drift", "norec"): ("tiny-student", "tiny-teacher-drift-norec"),
}
# args.json entries that do not change what a run computes: a summary that differs only in these is reused
NOT_THE_EXPERIMENT = (set(rundir.RESUME_FREE) - {"steps", "eval", "eval_every"}) | set(rundir.PER_INVOCATION)
# two-sided 95 % quantiles of Student's t, by degrees of freedom (test_eval checks them by integrating the density)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


@dataclass
class Args:
    worlds: tuple[str, ...] = ("tinyworld", "tinyworld-drift")
    """tiny worlds (each with its own tiny models, see PAIRS)"""
    teachers: tuple[str, ...] = ("recovery", "norec")
    """recovery: the teacher trained with random actions and the expert's fixes; norec: on expert states only"""
    curricula: tuple[str, ...] = ("opd", "f2b", "b2f")
    """curricula to compare (opd, f2b, b2f, adaptive); the paired differences are taken against opd"""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """seeds per cell (a seed fixes the task draws, so seeds pair runs across curricula)"""
    steps: int = 40
    """training steps per run"""
    jobs: int = 2
    """runs at once; each gets one thread (torch on 2 threads gains little at this model size)"""
    runs: str = "runs/grid"
    """where the run directories (checkpoints, logs) go"""
    results: str = "results/grid"
    """where each finished run's summary, the table and the figures go (tracked)"""
    deep_from: int = 5
    """turn index (0-based) from which a turn counts as deep in the KL-at-deep-turns column"""
    extra: str = ""
    """more tcod.py flags for every run, e.g. --extra='--eta 4'"""
    report: bool = False
    """run nothing: only the table and figures from the summaries already in --results"""


def run_name(world: str, teacher: str, curriculum: str, seed: int) -> str:
    return f"{world}-{teacher}-{curriculum}-s{seed}"


def command(world: str, teacher: str, curriculum: str, seed: int, steps: int, out: str, extra: str) -> list[str]:
    student, teacher_model = PAIRS[(world, teacher)]
    return ["tcod.py", "--env", world, "--student", student, "--teacher", teacher_model, "--curriculum", curriculum,
            "--seed", str(seed), "--steps", str(steps), "--out", out, *shlex.split(extra)]


def requested_args(cmd: list[str]) -> dict:
    """The args.json a tcod.py command would write (without running it)."""
    import tcod

    return json.loads(json.dumps(asdict(tcod.resolve_args(tcod.cli_args(cmd[1:])))))


def differences(old: dict, new: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}: {old.get(k)!r} there, {v!r} asked" for k, v in new.items()
            if k not in NOT_THE_EXPERIMENT and k in old and old[k] != v]


def check_reuse(name: str, summary_path: str, run: str, asked: dict) -> None:
    """Refuse a summary or a run directory of this name made with other settings (it would be labelled with these)."""
    for what, old in ((summary_path, read_summary(summary_path)), (run, rundir.read_run_args(run))):
        old = old.get("args") if what == summary_path and old else old
        if old and (diff := differences(old, asked)):
            raise ValueError(f"{what} was made with other settings than asked ({'; '.join(diff)}): ask for its "
                             f"settings, or move it away, or give another --results / --runs")


def read_summary(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished(run: str) -> bool:
    """A run is finished when its checkpoint records its last step (metrics alone may be ahead of a kill)."""
    path = os.path.join(run, "args.json")
    ckpt = rundir.last_checkpoint(run)
    if not (os.path.exists(path) and ckpt):
        return False
    with open(path) as f:
        steps = json.load(f)["steps"]
    return rundir.checkpoint_step(ckpt) >= steps


def commit() -> str:
    """The commit the code ran at, with '+changes' when its code or data differed from it (the summaries and figures
    this script writes into tracked folders do not count)."""
    def git(*a):
        done = subprocess.run(["git", *a], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        return done.stdout.strip() if done.returncode == 0 else None
    head = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.txt", "data")
    return "unknown" if head is None else head + ("+changes" if changed else "")


def train(cmd: list[str], run: str, summary_path: str) -> float | None:
    """One run: a plain tcod.py run (resumed when it has a checkpoint), then its summary, with this call's wall time
    (None when the run had finished before). Its console log goes beside the run, in <runs>/logs/, since tcod.py
    only writes into a directory that is empty or a run of its own."""
    t0, wall = time.time(), None
    if not finished(run):
        resume = ["--resume"] if rundir.last_checkpoint(run) else []
        logs = os.path.join(os.path.dirname(run) or ".", "logs")
        os.makedirs(logs, exist_ok=True)
        log_path = os.path.join(logs, os.path.basename(run) + ".txt")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log_path, "a") as log:
            done = subprocess.run([sys.executable, *cmd, *resume], stdout=log, stderr=subprocess.STDOUT, env=env)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(cmd + resume)} failed with exit code {done.returncode}; see {log_path}")
        wall = round(time.time() - t0, 1)
    rundir.write_json(summary_path, {"command": "python " + shlex.join(cmd),
                                     "args": rundir.read_run_args(run), "rows": rundir.read_metrics(os.path.join(run, "metrics.jsonl")),
                                     "wall_seconds": wall, "resumed": bool(resume), "commit": commit()})
    return wall


# --------------------------------------------------------------------------------------------------
# statistics


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95 % paired-t interval (n - 1 degrees of freedom; nan for one pair)."""
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, math.nan, math.nan
    half = T975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def deep_kl(kl_by_turn: list[float | None], deep_from: int) -> float | None:
    deep = [v for v in kl_by_turn[deep_from:] if v is not None]
    return sum(deep) / len(deep) if deep else None


COLUMNS = {
    "eval_success_start": lambda rows: rows[0]["eval_success"],
    "eval_success": lambda rows: rows[-1]["eval_success"],
    "eval_success_best": lambda rows: max(r["eval_success"] for r in rows if "eval_success" in r),
    "eval_traj_kl_start": lambda rows: rows[0]["eval_traj_kl"],
    "eval_traj_kl": lambda rows: rows[-1]["eval_traj_kl"],
    "eval_deep_kl": None,  # needs deep_from: see summarize
    "train_traj_kl": lambda rows: rows[-1]["traj_kl"],
    "train_traj_kl_peak": lambda rows: max(r["traj_kl"] for r in rows if r["step"] >= 0),
    "teacher_off_path": lambda rows: rows[-1].get("teacher_off_path"),
    "seconds": lambda rows: sum(r.get("time_step", 0) for r in rows),
}


def summarize(rows_per_run: list[list[dict]], deep_from: int) -> dict:
    """The table's numbers for one cell: per column, mean and sd over seeds."""
    out = {}
    for name, fn in COLUMNS.items():
        fn = fn or (lambda rows: deep_kl(rows[-1]["eval_kl_by_turn"], deep_from))
        values = [v for v in map(fn, rows_per_run) if v is not None]
        out[name] = mean_sd(values) if values else (None, None)
    return out | {"seeds": len(rows_per_run)}


def paired(runs: dict[int, list[dict]], base: dict[int, list[dict]]) -> dict:
    """A curriculum minus OPD, seed by seed, over the seeds both have: final eval success and eval trajectory KL."""
    seeds = sorted(set(runs) & set(base))
    out = {"seeds": seeds}
    for key in ("eval_success", "eval_traj_kl"):
        out[key] = paired_ci([runs[s][-1][key] - base[s][-1][key] for s in seeds]) if seeds else None
    return out


def f(pair, digits=2) -> str:
    m, s = pair
    return "n/a" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def ci(triple, digits=2) -> str:
    if triple is None:
        return "n/a"
    m, lo, hi = triple
    return f"{m:+.{digits}f}" + ("" if math.isnan(lo) else f" [{lo:+.{digits}f}, {hi:+.{digits}f}]")


def markdown(results: dict, deep_from: int) -> str:
    head = ["cell", "seeds", "eval success: start → end", "best eval success", "eval traj KL: start → end",
            f"eval KL/token, turns ≥ {deep_from}", "train traj KL: end", "train traj KL: peak", "teacher off path (train, end)",
            "minus OPD: success [95 % CI]", "minus OPD: eval traj KL [95 % CI]", "wall min / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        p = r.get("minus_opd") or {}
        lines.append(
            f"| {name} | {r['seeds']} | {f(r['eval_success_start'])} → {f(r['eval_success'])} | {f(r['eval_success_best'])} | "
            f"{f(r['eval_traj_kl_start'], 1)} → {f(r['eval_traj_kl'], 1)} | {f(r['eval_deep_kl'], 3)} | "
            f"{f(r['train_traj_kl'], 1)} | {f(r['train_traj_kl_peak'], 1)} | {f(r['teacher_off_path'])} | "
            f"{ci(p.get('eval_success'))} | {ci(p.get('eval_traj_kl'), 1)} | "
            f"{'n/a' if r.get('wall') is None else format(r['wall'] / 60, '.1f')} |"
        )
    return "\n".join(lines)


def report(args: Args) -> dict:
    """Tables and figures from the summaries in --results that match the asked cells."""
    results, groups = {}, {}
    for world in args.worlds:
        for teacher in args.teachers:
            per = {}
            for c in args.curricula:
                got = {s: read_summary(os.path.join(args.results, run_name(world, teacher, c, s) + ".json")) for s in args.seeds}
                per[c] = {s: g for s, g in got.items() if g}
            for c, got in per.items():
                if not got:
                    continue
                rows = {s: g["rows"] for s, g in got.items()}
                r = summarize(list(rows.values()), args.deep_from)
                walls = [g["wall_seconds"] for g in got.values() if g["wall_seconds"] is not None]
                r["wall"] = statistics.fmean(walls) if walls else None
                if c != "opd" and per.get("opd"):
                    r["minus_opd"] = paired(rows, {s: g["rows"] for s, g in per["opd"].items()})
                results[f"{world} / {teacher} / {c}"] = r
            if any(per.values()):
                groups[(world, teacher)] = {c: [g["rows"] for g in got.values()] for c, got in per.items() if got}
    table = markdown(results, args.deep_from)
    os.makedirs(args.results, exist_ok=True)
    rundir.write_json(os.path.join(args.results, "summary.json"), {"args": vars(args), "results": results})
    with open(os.path.join(args.results, "table.md"), "w") as fh:
        fh.write(table + "\n")
    for (world, teacher), by_curriculum in groups.items():
        plot.plot_groups(by_curriculum, os.path.join(args.results, f"curves-{world}-{teacher}.png"))
    print(table)
    return results


def main(args: Args) -> dict:
    unknown = set(args.curricula) - set(CURRICULA)
    if unknown:
        raise ValueError(f"unknown curricula {sorted(unknown)}; allowed: {', '.join(CURRICULA)}")
    bad = [(w, t) for w in args.worlds for t in args.teachers if (w, t) not in PAIRS]
    if bad:
        raise ValueError(f"no tiny pair for {bad}; allowed worlds {sorted({w for w, _ in PAIRS})}, teachers "
                         f"{sorted({t for _, t in PAIRS})}")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be an integer >= 1")
    if args.report:
        return report(args)
    cells = []
    for w in args.worlds:
        for t in args.teachers:
            for s in args.seeds:  # seed by seed: the runs that pair with each other land together
                for c in args.curricula:
                    name = run_name(w, t, c, s)
                    run, summary = os.path.join(args.runs, name), os.path.join(args.results, name + ".json")
                    cmd = command(w, t, c, s, args.steps, run, args.extra)
                    check_reuse(name, summary, run, requested_args(cmd))  # every cell checked before any runs
                    if not os.path.exists(summary):
                        cells.append((cmd, run, summary))
    os.makedirs(args.results, exist_ok=True)
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(cells), desc="repro runs") as bar:
        futures = [pool.submit(train, *cell) for cell in cells]
        for fut in futures:
            fut.result()
            bar.update()
    print(f"{len(cells)} runs in {(time.time() - t0) / 60:.1f} min")
    return report(args)


if __name__ == "__main__":
    cli.run(lambda: main(tyro.cli(Args)))
