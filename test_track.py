"""track.py: the metrics mirrored to TensorBoard and W&B (offline), resume without duplicate or lost steps (also
after a real SIGKILL, read back from W&B's own files), and --no-eval. No network: W&B runs in offline mode."""

import glob
import importlib.util
import json
import os
import pathlib
import signal
import struct
import subprocess
import time
import zlib

import pytest

import tcod
import track
from test_faults import cli
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
    assert "kl_by_turn/0" in full and {"curves", "curves-heatmap", "curves-telemetry"} <= set(full["_images"])

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
    tcod.main(small_args(tmp_path, student, teacher, steps=3, resume=True, track=("wandb",)))
    assert json.load(open(out / "track.json")) == {"wandb_id": run_id}  # the same run, continued
    # one offline run in wandb/, the one `wandb sync` sees; the first process's is kept in wandb.replaced/
    assert len(glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))) == 1
    assert len(glob.glob(str(out / "wandb.replaced" / f"offline-run-*-{run_id}"))) == 1


# --------------------------------------------------------------------------------------------------
# a SIGKILL at each point of a step, then --resume: what W&B and TensorBoard hold, read back from their own files

LOG_HEADER, BLOCK = b":W&B\xe1\xbe\x00", 32768  # W&B's transaction log: a LevelDB-style log of protobuf Records


def wandb_records(path: str):
    """The Records of a .wandb file, as `wandb sync` reads them: 32 KiB blocks of chunks (crc32, length, type: full,
    first, middle, last); a torn or corrupt chunk ends the file, like a kill mid-write."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:7] == LOG_HEADER, path
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        if kind not in (1, 2, 3, 4) or len(body) < length or zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            return
        pos += 7 + length
        parts = body if kind in (1, 2) else parts + body
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_synced_rows(wandb_dir: str) -> list[dict]:
    """The history rows `wandb sync <wandb_dir>` would upload: the files wandb's own sync command picks there (offline,
    not yet synced), each history record as {name: value}."""
    from wandb.cli.beta_sync import _find_wandb_files

    files = _find_wandb_files([pathlib.Path(wandb_dir)], skip_synced=True, skip_online=True, verbose=False)
    rows = []
    for path in sorted(files):
        for _ in range(300):  # the offline writer is a process of its own: wait (up to a minute) for it to close the log
            if any(r.HasField("exit") for r in wandb_records(str(path))):
                break
            time.sleep(0.2)
        for r in wandb_records(str(path)):
            if r.HasField("history"):
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows


@needs_wandb
def test_resume_writes_one_offline_run_from_metrics_jsonl_and_warns_of_a_part_already_synced(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    old = out / "wandb" / "offline-run-20260101_000000-abc"
    os.makedirs(old)
    open(old / "run-abc.wandb.synced", "w").close()  # `wandb sync` ran on the killed process's part
    with open(out / "track.json", "w") as f:
        json.dump({"wandb_id": "abc", "last_step": 1}, f)  # as the old track.py wrote it
    rows = [{"step": -1, "eval_success": 0.25}, {"step": 0, "traj_kl": 1.5, "kl_by_turn": [0.5, None]}]
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.warns(UserWarning, match="synced already"):
        tracker = track.Tracker(("wandb",), str(out), {}, resume=True, start=1)
    tracker.log({"step": 1, "traj_kl": 0.5})
    tracker.close()
    assert os.listdir(out / "wandb.replaced") == [old.name] and json.load(open(out / "track.json")) == {"wandb_id": "abc"}
    synced = wandb_synced_rows(str(out / "wandb"))
    assert [(r["_step"], r["step"]) for r in synced] == [(0, -1), (1, 0), (2, 1)]
    assert synced[1]["traj_kl"] == 1.5 and synced[1]["kl_by_turn/0"] == 0.5 and "kl_by_turn/1" not in synced[1]


@needs_wandb
@needs_tb
@pytest.mark.parametrize("point", ["checkpoint:0", "checkpoint:1", "logged:1", "eval:3"])
def test_sigkill_then_resume_leaves_every_row_once_in_wandb_and_tensorboard(model_dirs, tmp_path, point):  # noqa: F811
    """checkpoint:n: killed just after the checkpoint of step n; logged:n: after step n's row went to metrics.jsonl
    and the trackers, before its checkpoint; eval:3: during the final evaluation (after step 2), before its row."""
    student, teacher = model_dirs
    args = small_args(tmp_path, student, teacher, steps=3, track=("wandb", "tensorboard"))
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # not the W&B process of a test run here
    env |= dict(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    killed = subprocess.run(cli(args), env=env | {"TCOD_KILL_AT": point}, capture_output=True, text=True,
                            start_new_session=True)  # a group of its own: the kill takes the run's processes
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = subprocess.run(cli(args) + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [-1, 0, 1, 2]

    synced = wandb_synced_rows(str(out / "wandb"))
    assert sorted(r["step"] for r in synced if "step" in r) == [-1, 0, 1, 2], done.stderr[-3000:]  # each row, once
    by_step = {r["step"]: r for r in synced if "step" in r}
    for row in rows:
        for key, value in track.scalars(row).items():
            assert by_step[row["step"]][key] == pytest.approx(value), (row["step"], key)
        assert by_step[row["step"]]["_step"] == row["step"] + 1
    assert "curves/_type" in by_step[2]  # the figures go with the last row (an image is a nested value)

    tb = tb_scalars(str(out / "tb"))
    assert [s for s, _ in tb["traj_kl"]] == [1, 2, 3] and [s for s, _ in tb["eval_success"]] == [0, 3]
    assert [v for _, v in tb["traj_kl"]] == pytest.approx([r["traj_kl"] for r in rows[1:]])
    assert [v for _, v in tb["eval_success"]] == pytest.approx([rows[0]["eval_success"], rows[-1]["eval_success"]])


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
