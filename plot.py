"""Curves from one or more runs' metrics.jsonl: trajectory KL, success, depth k, and KL by turn over training.

    python plot.py runs/tinyworld-f2b-s0 runs/tinyworld-opd-s0 --out curves.png
matplotlib is optional: training runs without it and only the plot is skipped.
"""

from __future__ import annotations

import json
import os
import sys


def load(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(runs: list[str], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_kl, ax_succ), (ax_k, ax_turn) = axes
    for run in runs:
        rows = load(run)
        train = [r for r in rows if r["step"] >= 0]
        label = os.path.basename(os.path.normpath(run))
        steps = [r["step"] for r in train]
        (line,) = ax_kl.plot(steps, [r["traj_kl"] for r in train], label=label)
        ax_succ.plot(steps, [r["success"] for r in train], color=line.get_color(), alpha=0.35, lw=1)
        evals = [(r["step"] + 1 if r["step"] >= 0 else 0, r["eval_success"]) for r in rows if "eval_success" in r]
        if evals:
            ax_succ.plot(*zip(*evals), "o-", color=line.get_color(), label=f"{label} (eval)")
        ax_k.plot(steps, [r["k"] for r in train], color=line.get_color(), label=label)
    ax_kl.set(title="trajectory KL (sum over the episode's student tokens)", xlabel="step", ylabel="nats")
    ax_succ.set(title="success: eval (dots, full horizon) and training episodes (faint)", xlabel="step", ylim=(-0.02, 1.02))
    ax_k.set(title="curriculum depth k", xlabel="step", ylabel="turns")
    # KL by turn over training for the first run: where in the episode the student and teacher disagree.
    train = [r for r in load(runs[0]) if r["step"] >= 0]
    if train:
        grid = [[v if v is not None else float("nan") for v in r["kl_by_turn"]] for r in train]
        im = ax_turn.imshow(list(map(list, zip(*grid))), aspect="auto", origin="lower", cmap="magma", interpolation="nearest")
        fig.colorbar(im, ax=ax_turn, label="per-token KL")
    ax_turn.set(title=f"KL by turn index ({os.path.basename(os.path.normpath(runs[0]))})", xlabel="step", ylabel="turn")
    for ax in (ax_kl, ax_succ, ax_k):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    out = args[args.index("--out") + 1] if "--out" in args else "curves.png"
    runs = [a for i, a in enumerate(args) if a != "--out" and (i == 0 or args[i - 1] != "--out")]
    if not runs:
        sys.exit("usage: python plot.py RUN_DIR [RUN_DIR ...] [--out curves.png]")
    print(plot_runs(runs, out))
