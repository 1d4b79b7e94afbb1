"""Curves from one or more runs' metrics.jsonl: trajectory KL, success, depth k, and KL by turn over training.

    python plot.py runs/tinyworld-f2b-s0 runs/tinyworld-opd-s0 --out curves.png

Runs whose names differ only in a trailing -s<seed> are one group: a line for the mean over seeds and a band from
the lowest to the highest seed. Next to curves.png goes curves-heatmap.png: per group, the per-token KL by turn
index (y) over training (x), on the training episodes and on the full-horizon eval episodes (the paper's Fig. 2d
diagnostic, followed over time), and curves-telemetry.png: the same kind of heat map for the per-turn KL sum, the
teacher's probability of the sampled token, the student's entropy and the teacher-argmax share (opd.kl_metrics), on
training and eval episodes, when the runs logged them. matplotlib is optional: training runs without it and only the plot is skipped.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections import defaultdict

import cli
import rundir


def load(run: str) -> list[dict]:
    """A run's metrics rows, or an error saying why there are none to plot."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isdir(run):
        raise FileNotFoundError(f"{run}: no such run directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run} has no metrics.jsonl: not a tcod run, or one that has not finished its first "
                                "evaluation or step yet")
    rows = rundir.read_metrics(path)
    if not rows:
        raise ValueError(f"{path} holds no complete row yet: the run has not finished its first evaluation or step")
    return rows


def group_runs(runs: list[str]) -> dict[str, list[str]]:
    """{group label: run dirs}, a group being the runs whose names differ only in a trailing -s<seed>."""
    groups = defaultdict(list)
    for run in runs:
        groups[re.sub(r"-s\d+$", "", os.path.basename(os.path.normpath(run)))].append(run)
    return dict(groups)


def series(rows_per_run: list[list[dict]], key: str, x_of=lambda r: r["step"]) -> tuple[list, list, list, list]:
    """x, mean, low, high of a metric over the runs of a group, at the x values every run has."""
    per_run = [{x_of(r): r[key] for r in rows if r.get(key) is not None} for rows in rows_per_run]
    xs = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    vals = [[d[x] for d in per_run] for x in xs]
    return xs, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def eval_x(row: dict) -> int:
    return row["step"] + 1  # an eval after step n is at n + 1 (the first, before training, at 0)


def kl_grid(rows_per_run: list[list[dict]], key: str) -> tuple[list[int], list[list[float]]]:
    """Steps and a per-turn list metric (mean over the runs that have it, NaN where none does), for a heat map."""
    by_step = defaultdict(list)
    for rows in rows_per_run:
        for r in rows:
            if r.get(key) is not None:
                by_step[eval_x(r) if key.startswith("eval_") else r["step"]].append(r[key])
    steps = sorted(by_step)
    grid = []
    for s in steps:
        cols = by_step[s]
        turns = max(len(c) for c in cols)
        vals = [[c[t] for c in cols if t < len(c) and c[t] is not None] for t in range(turns)]
        grid.append([sum(v) / len(v) if v else math.nan for v in vals])
    return steps, grid


def plot_runs(runs: list[str], out: str) -> str:
    return plot_groups({label: [load(r) for r in members] for label, members in group_runs(runs).items()}, out)


def plot_groups(groups: dict[str, list[list[dict]]], out: str) -> str:
    """The figures of `groups` ({label: each seed's metrics rows}): out, and its -heatmap / -telemetry companions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off_path = any(r.get("teacher_off_path") is not None for rows in groups.values() for run in rows for r in run)
    fig, axes = plt.subplots(2, 3 if off_path else 2, figsize=(16 if off_path else 11, 7.5))
    panels = [
        (axes[0, 0], "traj_kl", False, "training trajectory KL (sum over an episode's student tokens)"),
        (axes[0, 1], "eval_success", True, "eval success (full horizon, from scratch, T=0.4)"),
        (axes[1, 0], "eval_traj_kl", True, "eval trajectory KL (full horizon: comparable across curricula)"),
        (axes[1, 1], "k", False, "curriculum depth k"),
    ]
    if off_path:  # support.off_path, logged at each evaluation
        panels += [(axes[0, 2], "teacher_off_path", True, "teacher off the expert's path: training episodes' states"),
                   (axes[1, 2], "eval_teacher_off_path", True, "teacher off the expert's path: eval episodes' states")]
    for label, rows_per_run in groups.items():
        train = [[r for r in rows if r["step"] >= 0] for rows in rows_per_run]
        color = None
        for ax, key, is_eval, _ in panels:
            xs, mean, low, high = series(rows_per_run if is_eval else train, key, eval_x if is_eval else lambda r: r["step"])
            if not xs:
                continue
            n = len(rows_per_run)
            (line,) = ax.plot(xs, mean, "o-" if is_eval else "-", ms=3, color=color, label=f"{label} ({n} seed{'s' * (n > 1)})")
            color = line.get_color()
            if n > 1:
                ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)
    for ax, key, _, title in panels:
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (a run with --no-eval has no eval lines)
            ax.legend(fontsize=7)
    for ax in [axes[0, 1]] + ([axes[0, 2], axes[1, 2]] if off_path else []):
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    base = os.path.splitext(out)[0]
    heatmaps(groups, base + "-heatmap.png", [("kl_by_turn", "per-token KL", None)])
    if any(r.get("teacher_p_by_turn") is not None for rows in groups.values() for run in rows for r in run):
        heatmaps(groups, base + "-telemetry.png", TELEMETRY)
    return out


# per-turn metrics of the telemetry figure: key, colour-bar label, colour range (None: the data's)
TELEMETRY = [
    ("kl_sum_by_turn", "KL summed over the turn's reply", None),
    ("teacher_p_by_turn", "teacher p(sampled token)", (0, 1)),
    ("entropy_by_turn", "student entropy (nats, T=1)", None),
    ("top1_by_turn", "share = teacher argmax", (0, 1)),
]


def heatmaps(groups: dict[str, list[list[dict]]], out: str, metrics: list[tuple]) -> str:
    """Per metric a row; per group two columns, or two rows for a single metric: training and eval episodes."""
    import matplotlib.pyplot as plt

    panels = [(m, split) for m in metrics for split in ("", "eval_")]
    n_rows, n_cols = (2, len(groups)) if len(metrics) == 1 else (len(metrics), 2 * len(groups))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols + 1, 3.25 * n_rows), squeeze=False)
    for g, (label, rows_per_run) in enumerate(groups.items()):
        for p, ((key, what, vrange), split) in enumerate(panels):
            ax = axes[p, g] if len(metrics) == 1 else axes[p // 2, 2 * g + p % 2]
            steps, grid = kl_grid(rows_per_run, split + key)
            if grid:
                turns = max(map(len, grid))
                cells = [[c[t] if t < len(c) else math.nan for c in grid] for t in range(turns)]
                im = ax.imshow(cells, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                               extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, turns - 0.5), **dict(zip(("vmin", "vmax"), vrange or ())))
                fig.colorbar(im, ax=ax, label=what)
            ax.set(title=f"{label}: {'eval' if split else 'training'} episodes", xlabel="step", ylabel="turn")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="tcod run directories (their metrics.jsonl)")
    parser.add_argument("--out", default="curves.png", help="the curves figure; -heatmap.png and -telemetry.png go beside it")
    a = parser.parse_args(argv)
    folder = os.path.dirname(a.out)
    if not a.out or os.path.isdir(a.out) or (folder and not os.path.isdir(folder)):
        raise ValueError(f"--out {a.out!r}: must be a file name in an existing directory (e.g. curves.png)")
    return plot_runs(a.runs, a.out)


if __name__ == "__main__":
    cli.run(lambda: print(main()))
