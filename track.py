"""Experiment tracking: the rows of metrics.jsonl, mirrored to Weights & Biases and/or TensorBoard (`--track`).

metrics.jsonl stays the source of truth; a tracker gets the same rows under the same names. Scalars go as they are;
a list-valued metric (`kl_by_turn`, ...) goes as one scalar per turn, `kl_by_turn/0`, `kl_by_turn/1`, ... (None
skipped); the run's args are the config, and the run's figures (plot.py) are logged at the end.

Resume: metrics.jsonl decides what the trackers hold, not what a tracker said it had received (a SIGKILL can come
after `wandb.log` returned and before W&B's writer put the row on disk). On --resume, metrics.jsonl holds exactly the
rows of the steps before the checkpoint (tcod.py drops the rest: those steps run again), and:
  W&B: the run keeps its id (<out>/track.json, written before W&B starts) and is written again from metrics.jsonl.
       W&B's step is the metrics step + 1 (the eval before training at 0), given explicitly, so a row is idempotent:
       online, W&B resumes the server's run at the step after the last one it has, and only the rows from there are
       sent (the server cannot drop a row, so a row of a step that runs again keeps its first values: resume is
       exact, so they differ only in timings). Offline, W&B knows nothing of the earlier processes: a resumed offline
       run starts at step 0 in a folder of its own, and a killed process's folder holds an unknown part of its rows
       (none, in test_track.py's kills), so every earlier `offline-run-*` folder is moved from <out>/wandb to
       <out>/wandb.replaced and the new one gets every row of metrics.jsonl: <out>/wandb holds one offline run,
       complete, and syncing it does not depend on how W&B would merge several.
  TensorBoard: the same log directory; its events from the checkpoint's step on are dropped (purge_step) and come again.
A run started again from step 0 (no checkpoint) has its old track.json, tb/ and wandb/ moved aside by tcod.py, so it
never appends to the old tracked run.

    W&B: `pip install wandb`; online after `wandb login`, or WANDB_MODE=offline and, once the run has ended (after its
         last --resume), `wandb sync <out>/wandb/offline-run-*` (there is one). Syncing before a --resume uploads a
         part that the resumed run's offline folder holds again (tcod.py warns): delete that run on W&B first.
         Project: $WANDB_PROJECT (default "tcod"), run name: the output directory's name.
    TensorBoard: `pip install tensorboard`; `tensorboard --logdir <out>/tb`. Its x axis is the number of training
         steps done: metrics step n (the row written after step n) at n + 1, the eval before training at 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import uuid
import warnings

from rundir import read_metrics

KINDS = ("wandb", "tensorboard")
FILES = ("track.json", "tb", "wandb", "wandb.replaced")  # what a tracked run writes in its output directory
KILL_POINTS = ("logged", "checkpoint", "eval")


def check(kinds) -> None:
    """Refuse an unknown tracker, or one whose package is missing, before any model loads."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"--track {kind!r}: use one or both of {KINDS}")
        package = "tensorboard" if kind == "tensorboard" else "wandb"
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"--track {kind} needs the {package} package: pip install {package} (or drop --track {kind})")


def scalars(row: dict) -> dict[str, float]:
    """A metrics row as flat scalars: lists become one entry per index, None and non-numbers are left out."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = value
        elif isinstance(value, list):
            out |= {f"{key}/{i}": v for i, v in enumerate(value) if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


class Tracker:
    def __init__(self, kinds, out: str, config: dict, resume: bool, start: int = 0):
        """start: the step the run continues from (its checkpoint's); on resume, <out>/metrics.jsonl holds the rows
        of the steps before it, and the rows of steps >= start are logged again as they run."""
        self.kinds, self.out, self.path = tuple(kinds), out, os.path.join(out, "track.json")
        state = {}
        if resume and os.path.exists(self.path):
            with open(self.path) as f:
                state = json.load(f)
        self.state = {"wandb_id": state.get("wandb_id") or uuid.uuid4().hex[:12]}
        self._save()  # before W&B writes anything under the id: a kill from here on resumes this W&B run
        rows = read_metrics(os.path.join(out, "metrics.jsonl")) if resume else []
        self.last = -1  # the step of the last row logged (the figures go with it)
        self.wandb = self.tb = None
        if "wandb" in self.kinds:
            import wandb

            replaced = replace_offline_runs(out)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "tcod"), id=self.state["wandb_id"],
                                    name=os.path.basename(os.path.normpath(out)), dir=out, config=config, resume="allow")
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")
            # online: the step after the last one the server has (W&B would drop a row below it, with a warning);
            # offline: 0, W&B knowing nothing of the earlier processes
            self.wandb_first = self.wandb.starting_step
            if any(os.path.exists(os.path.join(p, f"run-{self.state['wandb_id']}.wandb.synced")) for p in replaced):
                warnings.warn(f"W&B: an earlier part of this offline run was synced already ({', '.join(replaced)}); "
                              f"{out}/wandb now holds every row again: delete the partial run on the server before "
                              "syncing it, or its first rows may be sent twice")
        if "tensorboard" in self.kinds:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: the events of the steps that run again (TensorBoard step = metrics step + 1) are dropped
            self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=start + 1 if resume else None)
            if not resume:
                self.tb.add_text("args", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
        for row in rows:  # W&B from metrics.jsonl; TensorBoard kept its events of these steps
            self._log_wandb(row)

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)

    def _log_wandb(self, row: dict) -> None:
        if self.wandb is not None and row["step"] + 1 >= self.wandb_first:
            self.wandb.log(scalars(row), step=row["step"] + 1)
        self.last = max(self.last, row["step"])

    def log(self, row: dict) -> None:
        self._log_wandb(row)
        if self.tb is not None:
            for key, value in scalars(row).items():
                if key != "step":
                    self.tb.add_scalar(key, value, row["step"] + 1)
            self.tb.flush()
        kill_point("logged", row["step"])

    def figures(self, paths: list[str]) -> None:
        """The run's figures (PNG files), logged once at the end."""
        paths = [p for p in paths if os.path.exists(p)]
        if self.wandb is not None and paths:
            import wandb

            self.wandb.log({os.path.splitext(os.path.basename(p))[0]: wandb.Image(p) for p in paths} | {"step": self.last})
        if self.tb is not None:
            import matplotlib.image

            for p in paths:
                image = matplotlib.image.imread(p)[..., :3]
                self.tb.add_image(os.path.splitext(os.path.basename(p))[0], image, self.last + 1, dataformats="HWC")
            self.tb.flush()

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def finish(out: str, tracker: Tracker | None) -> None:
    """A run's end (its lead process): the curves figure in <out> (plot.py), sent to the tracker, which is closed."""
    try:
        import plot

        curves = plot.plot_runs([out], os.path.join(out, "curves.png"))
        if tracker:
            tracker.figures([curves] + [os.path.splitext(curves)[0] + f"-{kind}.png" for kind in ("heatmap", "telemetry")])
    except ImportError as e:  # matplotlib is optional
        print(f"no plot: {e}")
    except Exception as e:  # a full disk or a plotting bug must not turn a finished run into a failure
        warnings.warn(f"the final plot failed ({type(e).__name__}: {e}); the run finished and is saved in {out}: "
                      f"plot it later with `python plot.py {out}`")
    if tracker:
        tracker.close()


def replace_offline_runs(out: str) -> list[str]:
    """Move the offline W&B runs of earlier processes from <out>/wandb to <out>/wandb.replaced (kept, never deleted;
    `wandb sync <out>/wandb` no longer sees them); returns their new paths."""
    src, dst, moved = os.path.join(out, "wandb"), os.path.join(out, "wandb.replaced"), []
    for name in sorted(os.listdir(src)) if os.path.isdir(src) else []:
        if name.startswith("offline-run-") and os.path.isdir(os.path.join(src, name)):
            os.makedirs(dst, exist_ok=True)
            target = os.path.join(dst, name)
            while os.path.exists(target):  # the same folder name twice: a run started twice in one second
                target += "+"
            shutil.move(os.path.join(src, name), target)
            moved.append(target)
    return moved


def kill_point(name: str, step: int) -> None:
    """A test hook, the only one: with TCOD_KILL_AT=<name>:<step> in the environment, the run SIGKILLs itself (and
    its process group when it leads one, env workers included, as a scheduler would; W&B's wandb-core runs in a
    session of its own and is left to find its parent gone) at that point of that step:
    'logged' (step's metrics row went to metrics.jsonl and the trackers, its checkpoint is not saved yet),
    'checkpoint' (the checkpoint after step was just saved), 'eval' (the evaluation at `step` steps done has played
    its episodes; nothing of it is scored or written yet)."""
    assert name in KILL_POINTS, name
    if os.environ.get("TCOD_KILL_AT") == f"{name}:{step}":
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
