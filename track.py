"""Experiment tracking: the rows of metrics.jsonl, mirrored to Weights & Biases and/or TensorBoard (`--track`).

metrics.jsonl stays the source of truth; a tracker gets the same rows under the same names. Scalars go as they are;
a list-valued metric (`kl_by_turn`, ...) goes as one scalar per turn, `kl_by_turn/0`, `kl_by_turn/1`, ... (None
skipped); the run's args are the config, and the run's figures (plot.py) are logged at the end.

Resume: <out>/track.json records the W&B run id and the last step logged. A resumed run continues the same W&B run
(resume="allow") and TensorBoard log directory. The steps after the checkpoint run again (a kill may have come
after their rows were logged): TensorBoard drops its events from there (purge_step) and gets them again; W&B, which
cannot drop a row, skips the rows it already has (resume is exact, so they would be the same rows). A run started again from step 0 (no checkpoint) has its old track.json,
tb/ and wandb/ moved aside by tcod.py, so it never appends to the old tracked run.

    W&B: `pip install wandb`; online after `wandb login`, or WANDB_MODE=offline (then `wandb sync <out>/wandb/...`).
         Project: $WANDB_PROJECT (default "tcod"), run name: the output directory's name.
    TensorBoard: `pip install tensorboard`; `tensorboard --logdir <out>/tb`. Its x axis is the number of training
         steps done: metrics step n (the row written after step n) at n + 1, the eval before training at 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid

KINDS = ("wandb", "tensorboard")
FILES = ("track.json", "tb", "wandb")  # what a tracked run writes in its output directory


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
        """start: the step the run continues from (its checkpoint's); rows of steps >= start are logged again."""
        self.kinds, self.out, self.path = tuple(kinds), out, os.path.join(out, "track.json")
        state = {}
        if resume and os.path.exists(self.path):
            with open(self.path) as f:
                state = json.load(f)
        self.last = state.get("last_step", -2)  # W&B holds the rows of steps <= last
        self.wandb = self.tb = None
        if "wandb" in self.kinds:
            import wandb

            state.setdefault("wandb_id", uuid.uuid4().hex[:12])
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "tcod"), id=state["wandb_id"],
                                    name=os.path.basename(os.path.normpath(out)), dir=out, config=config, resume="allow")
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")
        if "tensorboard" in self.kinds:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: the events of the steps that run again (TensorBoard step = metrics step + 1) are dropped
            self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=start + 1 if resume else None)
            if not resume:
                self.tb.add_text("args", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
        self.state = state
        self._save()

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state | {"last_step": self.last}, f)
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        step, flat = row["step"], scalars(row)
        if self.wandb is not None and step > self.last:  # W&B already has a row logged before a kill
            self.wandb.log(flat)
        if self.tb is not None:
            for key, value in flat.items():
                if key != "step":
                    self.tb.add_scalar(key, value, step + 1)
            self.tb.flush()
        self.last = max(self.last, step)
        self._save()

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
