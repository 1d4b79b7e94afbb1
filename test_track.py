"""track.py: the metrics mirrored to TensorBoard and W&B (offline), resume without duplicate or lost steps, and
--no-eval. No network: W&B runs in offline mode."""

import glob
import importlib.util
import json
import os
import time

import pytest

import tcod
import track
from test_tcod import model_dirs, small_args, tok  # noqa: F401  (fixtures)

needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")


def test_scalars_flatten_lists_and_drop_what_is_not_a_number():
    row = {"step": 3, "traj_kl": 1.5, "skipped": False, "kl_by_turn": [0.1, None, 0.3], "note": "x"}
    assert track.scalars(row) == {"step": 3, "traj_kl": 1.5, "skipped": 0.0, "kl_by_turn/0": 0.1, "kl_by_turn/2": 0.3}


def test_unknown_or_missing_tracker_is_refused_before_any_model_loads(monkeypatch):
    with pytest.raises(ValueError, match="--track 'mlflow'"):
        track.check(["mlflow"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="pip install wandb"):
        tcod.resolve_args(tcod.Args(track=("wandb",)))


def tb_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]} | {
        "_images": acc.Tags()["images"]}


@needs_tb
def test_tensorboard_gets_every_metric_and_a_resume_has_no_duplicate_step(model_dirs, tmp_path):  # noqa: F811
    student, teacher = model_dirs
    tcod.main(small_args(tmp_path / "a", student, teacher, steps=3, track=("tensorboard",)))
    full = tb_scalars(str(tmp_path / "a" / "run" / "tb"))
    rows = [json.loads(line) for line in open(tmp_path / "a" / "run" / "metrics.jsonl")]
    assert [s for s, _ in full["traj_kl"]] == [1, 2, 3]  # metrics step n at n + 1
    assert [s for s, _ in full["eval_success"]] == [0, 3]  # before training, and at the end
    assert [v for _, v in full["loss"]] == pytest.approx([r["loss"] for r in rows[1:]])
    assert "kl_by_turn/0" in full and {"curves", "curves-heatmap"} <= set(full["_images"])

    # killed after its step-1 checkpoint, when it had already logged step 1 and 2 (step 2 with a value of its own)
    tcod.main(small_args(tmp_path / "b", student, teacher, steps=2, track=("tensorboard",)))
    out = tmp_path / "b" / "run"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tb")) as w:
        w.add_scalar("traj_kl", 999.0, 3)  # a row of step 2 that its checkpoint does not hold
    resumed = tcod.main(small_args(tmp_path / "b", student, teacher, steps=3, resume=True, track=("tensorboard",)))
    again = tb_scalars(str(out / "tb"))
    assert [s for s, _ in again["traj_kl"]] == [1, 2, 3]  # no step twice, none lost
    assert [v for _, v in again["traj_kl"]] == pytest.approx([v for _, v in full["traj_kl"]])  # and exact
    assert resumed["traj_kl"] == pytest.approx(full["traj_kl"][-1][1])


@needs_wandb
def test_wandb_offline_run_files_and_resume_keeps_the_run_id(model_dirs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    student, teacher = model_dirs
    tcod.main(small_args(tmp_path, student, teacher, steps=2, track=("wandb",)))
    out = tmp_path / "run"
    run_id = json.load(open(out / "track.json"))["wandb_id"]
    files = glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1
    names = ("traj_kl", "eval_success", "kl_by_turn/0", "decode_tokens_per_s")
    for _ in range(50):  # the offline writer is a separate process: give it a moment to flush after finish()
        missing = [n for n in names if n.encode() not in open(files[0], "rb").read()]
        if not missing:
            break
        time.sleep(0.2)
    assert not missing, missing
    assert json.load(open(out / "track.json"))["last_step"] == 1
    tcod.main(small_args(tmp_path, student, teacher, steps=3, resume=True, track=("wandb",)))
    assert json.load(open(out / "track.json")) == {"wandb_id": run_id, "last_step": 2}  # the same run, continued
    assert len(glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))) == 2  # one offline log per process


@needs_tb
def test_a_restarted_run_does_not_append_to_the_old_tracked_run(model_dirs, tmp_path):  # noqa: F811
    student, teacher = model_dirs
    out = tmp_path / "run"
    os.makedirs(out / "tb")
    args = small_args(tmp_path, student, teacher, steps=1, track=("tensorboard",))
    with open(out / "args.json", "w") as f:  # a run that started and never saved a checkpoint
        json.dump(tcod.resolve_args(small_args(tmp_path, student, teacher, steps=1)).__dict__, f)
    open(out / "tb" / "old-events", "w").close()
    tcod.main(args)
    assert glob.glob(str(out / "tb.*.old" / "old-events")) and not os.path.exists(out / "tb" / "old-events")


def test_no_eval_runs_without_eval_rows(model_dirs, tmp_path):  # noqa: F811
    student, teacher = model_dirs
    row = tcod.main(small_args(tmp_path, student, teacher, steps=2, eval=False, eval_tasks=0))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1] and not any(k.startswith("eval_") for r in rows for k in r)
    assert "traj_kl" in row and os.path.exists(tmp_path / "run" / "curves.png")
    with pytest.raises(ValueError, match="--eval-tasks 0"):
        tcod.resolve_args(small_args(tmp_path / "x", student, teacher, eval_tasks=0))
