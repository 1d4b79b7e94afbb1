"""The CPU reproduction of the paper's central claim: vanilla OPD against TCOD-F2B, TCOD-B2F and the adaptive
curriculum, several seeds each, with the tiny models on the built-in world.

    python repro.py                      # 4 curricula x 3 seeds; two runs at a time, one thread each
    python repro.py --seeds 0 --jobs 1   # one seed

Each run is a plain `tcod.py` run in <out>/<curriculum>-s<seed> (its console log in <out>/logs/). Finished runs are
kept and unfinished ones resumed, so the command can be interrupted and run again. At the end it writes
<out>/results.json, <out>/results.md (the table) and <out>/curves.png + curves-heatmap.png (plot.py).

Table columns, mean ± standard deviation over seeds: final eval success and eval trajectory KL (full horizon,
from scratch, so comparable across curricula), the same at the step-0 student, the training trajectory KL at the
end and at its peak, and the eval per-token KL at deep turns (turn index >= --deep-from).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tyro
from tqdm import tqdm

import cli
import plot
import rundir


@dataclass
class Args:
    curricula: tuple[str, ...] = ("opd", "f2b", "b2f", "adaptive")
    """curricula to compare"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds per curriculum"""
    jobs: int = 2
    """runs at once; each gets one thread (torch on 2 threads gains little at this model size)"""
    out: str = "runs/repro"
    """where the runs, the table and the figures go"""
    deep_from: int = 5
    """turn index (0-based) from which a turn counts as deep in the KL-at-deep-turns column"""
    extra: str = ""
    """more tcod.py flags for every run, e.g. --extra='--steps 20 --eta 4'"""


def finished(run: str) -> bool:
    """A run is finished when its checkpoint records its last step (metrics alone may be ahead of a kill)."""
    path = os.path.join(run, "args.json")
    ckpt = rundir.last_checkpoint(run)
    if not (os.path.exists(path) and ckpt):
        return False
    import torch

    with open(path) as f:
        steps = json.load(f)["steps"]
    return torch.load(os.path.join(ckpt, "trainer.pt"), weights_only=False)["step"] >= steps


def train(run: str, curriculum: str, seed: int, extra: str) -> float:
    """One cell: a plain tcod.py run, resumed when it has a checkpoint. Its console log goes beside the run, in
    <out>/logs/, since tcod.py only writes into a directory that is empty or a run of its own."""
    if finished(run):
        return 0.0
    cmd = [sys.executable, "tcod.py", "--curriculum", curriculum, "--seed", str(seed), "--out", run, *shlex.split(extra)]
    if rundir.last_checkpoint(run):
        cmd.append("--resume")  # a run killed before its first checkpoint is restarted by tcod.py itself
    logs = os.path.join(os.path.dirname(run) or ".", "logs")
    os.makedirs(logs, exist_ok=True)
    log_path = os.path.join(logs, os.path.basename(run) + ".txt")
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {done.returncode}; see {log_path}")
    return time.time() - t0


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def deep_kl(kl_by_turn: list[float | None], deep_from: int) -> float | None:
    deep = [v for v in kl_by_turn[deep_from:] if v is not None]
    return sum(deep) / len(deep) if deep else None


def summarize(rows_per_run: list[list[dict]], deep_from: int) -> dict:
    """The table's numbers for one curriculum: per column, mean and sd over seeds."""
    cols = {
        "eval_success_start": lambda rows: rows[0]["eval_success"],
        "eval_success": lambda rows: rows[-1]["eval_success"],
        "eval_success_best": lambda rows: max(r["eval_success"] for r in rows if "eval_success" in r),
        "eval_traj_kl_start": lambda rows: rows[0]["eval_traj_kl"],
        "eval_traj_kl": lambda rows: rows[-1]["eval_traj_kl"],
        "eval_deep_kl": lambda rows: deep_kl(rows[-1]["eval_kl_by_turn"], deep_from),
        "train_traj_kl": lambda rows: rows[-1]["traj_kl"],
        "train_traj_kl_peak": lambda rows: max(r["traj_kl"] for r in rows if r["step"] >= 0),
        "seconds": lambda rows: sum(r.get("time_step", 0) for r in rows),
    }
    out = {}
    for name, fn in cols.items():
        values = [v for v in map(fn, rows_per_run) if v is not None]
        out[name] = mean_sd(values) if values else (None, None)
    return out | {"seeds": len(rows_per_run)}


def markdown(results: dict, deep_from: int) -> str:
    head = ["curriculum", "seeds", "eval success: start → end", "best eval success", "eval traj KL: start → end",
            f"eval KL/token, turns ≥ {deep_from}", "train traj KL: end", "train traj KL: peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(pair, digits=2):
        m, s = pair
        return "n/a" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"

    for name, r in results.items():
        lines.append(
            f"| {name} | {r['seeds']} | {f(r['eval_success_start'])} → {f(r['eval_success'])} | {f(r['eval_success_best'])} | "
            f"{f(r['eval_traj_kl_start'], 1)} → {f(r['eval_traj_kl'], 1)} | {f(r['eval_deep_kl'], 3)} | "
            f"{f(r['train_traj_kl'], 1)} | {f(r['train_traj_kl_peak'], 1)} |"
        )
    return "\n".join(lines)


def main(args: Args) -> dict:
    unknown = set(args.curricula) - set(("opd", "f2b", "b2f", "adaptive"))
    if unknown:
        raise ValueError(f"unknown curricula {sorted(unknown)}")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be an integer >= 1")
    runs = [(c, s, os.path.join(args.out, f"{c}-s{s}")) for c in args.curricula for s in args.seeds]
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(runs), desc="repro runs") as bar:
        futures = [pool.submit(train, run, c, s, args.extra) for c, s, run in runs]
        for fut in futures:
            fut.result()
            bar.update()
    wall = time.time() - t0
    results = {c: summarize([rundir.read_metrics(os.path.join(args.out, f"{c}-s{s}", "metrics.jsonl")) for s in args.seeds], args.deep_from) for c in args.curricula}
    table = markdown(results, args.deep_from)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "wall_seconds_this_call": wall, "results": results}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    plot.plot_runs([run for _, _, run in runs], os.path.join(args.out, "curves.png"))
    print(table)
    print(f"wall time of this call: {wall / 60:.1f} min")
    return results


if __name__ == "__main__":
    cli.run(lambda: main(tyro.cli(Args)))
