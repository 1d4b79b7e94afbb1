"""The run directory under misuse, round two (issue 24): a failed resume changes nothing, a damaged file is named and
a good copy used, locks expire on a cluster, no writer overwrites what it did not write, nothing changes silently."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest
import torch

import lock
import rundir
import tcod
from test_tcod import make_model, model_dirs, small_args, tok  # noqa: F401  (fixtures)


def fast_args(tmp_path, model_dirs, **kw):  # noqa: F811
    return small_args(tmp_path, *model_dirs, **{"max_turns": 3, "eval_tasks": 2, "max_new_tokens": 8, "tasks_per_step": 2, "save_every": 2, **kw})


def snapshot(out) -> dict:
    """Every file of a run directory but the checkpoint's tensors, by content."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def two_steps(tmp_path, model_dirs):  # noqa: F811
    """A finished 2-step run with a checkpoint at step 2."""
    tcod.main(fast_args(tmp_path, model_dirs, steps=2))
    return tmp_path / "run"


# --------------------------------------------------------------------------------------------------
# pattern: a failed resume wrote its flags into args.json (and resumes.jsonl) first, so every later resume failed too


def test_a_failed_resume_changes_nothing(tmp_path, model_dirs, two_steps, monkeypatch):  # noqa: F811
    before = snapshot(two_steps)
    with pytest.raises(ValueError, match="already at step 2"):
        tcod.main(fast_args(tmp_path, model_dirs, steps=1, resume=True))
    assert snapshot(two_steps) == before
    with pytest.raises(ValueError, match="--device cuda:3: this machine has"):
        tcod.main(fast_args(tmp_path, model_dirs, steps=3, device="cuda:3", resume=True))
    assert snapshot(two_steps) == before
    with monkeypatch.context() as m:  # any failure before the resumed run starts, here while the models load
        m.setattr(tcod, "load_model", lambda *a, **k: (_ for _ in ()).throw(OSError("the teacher's disk went away")))
        with pytest.raises(OSError, match="went away"):
            tcod.main(fast_args(tmp_path, model_dirs, steps=3, eval_every=5, resume=True))
    assert snapshot(two_steps) == before
    tcod.main(fast_args(tmp_path, model_dirs, steps=3, resume=True))  # and the plain resume still works
    assert json.loads((two_steps / "args.json").read_text())["steps"] == 3
    assert [json.loads(line)["changed"] for line in open(two_steps / "resumes.jsonl")] == [{"steps": [2, 3]}]


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "gpu"])
def test_a_device_this_machine_lacks_is_refused_before_the_run_dir_is_written(tmp_path, device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tcod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=f"--device {device}: "):
        tcod.main(small_args(tmp_path, "tiny-student", "tiny-teacher", device=device))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("seed", [2**64, -1, 2**32])
def test_a_seed_out_of_range_is_refused_before_models_load(tmp_path, seed, monkeypatch):
    monkeypatch.setattr(tcod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=f"--seed {seed}: must be an integer in"):
        tcod.main(small_args(tmp_path, "tiny-student", "tiny-teacher", seed=seed))
    assert not os.path.exists(tmp_path / "run")


# --------------------------------------------------------------------------------------------------
# pattern: one damaged file (args.json, trainer.pt, weights, a metrics line) made a good run unrecoverable


def cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def no_models(monkeypatch):
    monkeypatch.setattr(tcod, "load_model", lambda *a, **k: pytest.fail("loaded a model before the damage was found"))


@pytest.mark.parametrize("name, says", [("trainer.pt", "trainer.pt is unreadable"), ("model.safetensors", "model.safetensors is cut short"),
                                        ("config.json", "config.json is unreadable")])
def test_a_damaged_checkpoint_is_named_before_models_load(tmp_path, model_dirs, two_steps, no_models, name, says):  # noqa: F811
    cut(two_steps / "ckpt" / name)
    before = snapshot(two_steps)
    with pytest.raises(ValueError, match=f"ckpt is damaged: {says}") as e:
        tcod.main(fast_args(tmp_path, model_dirs, steps=3, resume=True))
    assert f"python tcod.py --resume --out {two_steps}" in str(e.value)  # the command that continues
    assert snapshot(two_steps) == before


def test_a_damaged_checkpoint_falls_back_to_a_whole_ckpt_old(tmp_path, model_dirs, two_steps):  # noqa: F811
    shutil.copytree(two_steps / "ckpt", two_steps / "ckpt.old")
    cut(two_steps / "ckpt" / "model.safetensors")
    with pytest.warns(UserWarning, match="continuing from .*ckpt.old \\(step 2\\)"):
        tcod.main(fast_args(tmp_path, model_dirs, steps=3, resume=True))
    assert rundir.checkpoint_problem(str(two_steps / "ckpt")) is None and rundir.checkpoint_step(str(two_steps / "ckpt")) == 3


def test_a_damaged_args_json_uses_the_checkpoints_copy_or_says_what_to_do(tmp_path, model_dirs, two_steps, no_models):  # noqa: F811
    cut(two_steps / "args.json")
    with pytest.warns(UserWarning, match="args.json is damaged .*using the copy saved with the checkpoint"):
        assert rundir.run_state(str(two_steps)) == "resumable"  # not 'foreign'
    (two_steps / "ckpt" / "args.json").unlink()  # a run of an older version: no copy
    with pytest.raises(ValueError, match="args.json is damaged .*no checkpoint holds a copy.*--resume --out"):
        tcod.main(fast_args(tmp_path, model_dirs, steps=3, resume=True))


def test_a_damaged_metrics_line_is_named_and_kept(tmp_path, model_dirs, two_steps):  # noqa: F811
    path = two_steps / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\x00garbage}\n"  # one line in the middle, not the torn last one
    path.write_text("".join(lines))
    with pytest.warns(UserWarning, match="line 2 is damaged"):
        rows = rundir.read_metrics(str(path))
    assert [r["step"] for r in rows] == [-1, 1]
    with pytest.warns(UserWarning, match=r"damaged line \[2\] dropped"):
        tcod.main(fast_args(tmp_path, model_dirs, steps=3, resume=True))
    assert [r["step"] for r in rundir.read_metrics(str(path))] == [-1, 1, 2]
    kept = [p for p in two_steps.iterdir() if p.name.endswith(".damaged")]
    assert len(kept) == 1 and kept[0].read_text() == "".join(lines)


# --------------------------------------------------------------------------------------------------
# pattern: a lock naming another host, or a reused pid, was live forever (a requeued job could never start)


def lock_file(out, pid, host, age_s=0.0):
    out.mkdir(exist_ok=True)
    (out / "lock").write_text(f"{pid} {host}\n")
    t = time.time() - age_s
    os.utime(out / "lock", (t, t))


def test_a_lock_is_a_lease_that_expires_wherever_its_holder_ran(tmp_path, no_models):
    out = tmp_path / "run"
    for pid, host in ((12345, "node-7"), (os.getppid(), socket.gethostname())):  # another node; a live pid of this host
        lock_file(out, pid, host)
        with pytest.raises(RuntimeError, match=f"in use by another tcod run \\(pid {pid} on {host}.*--force"):
            tcod.main(small_args(tmp_path, "tiny-student", "tiny-teacher"))
        assert not (out / "args.json").exists()
        lock_file(out, pid, host, age_s=lock.LEASE_S + 60)  # not refreshed for longer than the lease: stale
        with pytest.raises(pytest.fail.Exception, match="loaded a model"):  # the run starts
            tcod.main(small_args(tmp_path, "tiny-student", "tiny-teacher"))
        shutil.rmtree(out)


def test_force_takes_a_live_lock_with_a_warning(tmp_path, no_models):
    out = tmp_path / "run"
    lock_file(out, 12345, "node-7")
    with pytest.warns(UserWarning, match="--force: taking over the lock .* from pid 12345 on node-7"):
        with pytest.raises(pytest.fail.Exception, match="loaded a model"):
            tcod.main(small_args(tmp_path, "tiny-student", "tiny-teacher", force=True))
    assert "force" in rundir.PER_INVOCATION  # never taken from args.json by a later --resume


def test_the_running_trainer_refreshes_its_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    path = lock.acquire_lock(str(tmp_path))
    old = time.time() - 3600
    os.utime(path, (old, old))
    deadline = time.time() + 10
    while os.stat(path).st_mtime < time.time() - 60 and time.time() < deadline:
        time.sleep(0.05)
    assert os.stat(path).st_mtime > time.time() - 60  # refreshed by the heartbeat
    lock.release_lock(path)
    assert not os.path.exists(path) and path not in lock._heartbeats


# --------------------------------------------------------------------------------------------------
# pattern: writers overwrote what they did not write (sft.py baseline, eval.py --out, a restarted run's transcripts)


def test_sft_baseline_never_writes_into_a_directory_that_holds_files(tmp_path, model_dirs, two_steps, monkeypatch):  # noqa: F811
    import sft

    monkeypatch.setattr(sft.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    before = snapshot(two_steps)
    with pytest.raises(FileExistsError, match="ckpt' is not empty .*config.json"):
        sft.baseline(sft.BaselineArgs(demos=str(tmp_path / "demos.json"), out=str(two_steps / "ckpt")))
    assert snapshot(two_steps) == before


def test_eval_never_writes_into_a_directory_of_the_users(tmp_path, model_dirs, monkeypatch):  # noqa: F811
    import eval as evaluation

    monkeypatch.setattr(tcod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "eval.md").write_text("my notes")
    with pytest.raises(FileExistsError, match="is not empty .*eval.md"):
        evaluation.main(evaluation.Args(model=model_dirs[0], out=str(mine)))
    assert (mine / "eval.md").read_text() == "my notes" and os.listdir(mine) == ["eval.md"]


def test_a_restarted_run_moves_every_old_file_aside(tmp_path, model_dirs, monkeypatch):  # noqa: F811
    args = fast_args(tmp_path, model_dirs, steps=1, save_every=10, transcript_every=1)
    with monkeypatch.context() as m:  # killed at its first save: transcripts and metrics, no checkpoint
        m.setattr(tcod, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            tcod.main(args)
    out = tmp_path / "run"
    old = {p.name: p.read_text() for p in (out / "transcripts").iterdir()}
    assert old and rundir.run_state(str(out)) == "started"
    tcod.main(fast_args(tmp_path, model_dirs, steps=1, save_every=10, transcript_every=1))
    aside = [p for p in out.iterdir() if p.name.startswith("transcripts.") and p.name.endswith(".old")]
    assert len(aside) == 1 and {p.name: p.read_text() for p in aside[0].iterdir()} == old  # kept, not mixed or overwritten
    assert sorted(p.name for p in (out / "transcripts").iterdir()) == sorted(old)


@pytest.mark.parametrize("script", ["tcod", "eval", "sft"])
def test_an_empty_out_is_refused(tmp_path, script, monkeypatch):
    import eval as evaluation
    import sft

    monkeypatch.chdir(tmp_path)
    run = {"tcod": lambda: tcod.main(small_args(tmp_path, "tiny-student", "tiny-teacher", out="")),
           "eval": lambda: evaluation.main(evaluation.Args(model="tiny-teacher", out="")),
           "sft": lambda: sft.baseline(sft.BaselineArgs(demos="d.json", out=""))}[script]
    with pytest.raises(ValueError, match="--out '': an empty path"):
        run()
    assert os.listdir(tmp_path) == []


def test_a_read_only_output_directory_is_named_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))  # as a read-only mount reports
    with pytest.raises(OSError, match="is on a read-only filesystem") as e:
        tcod.main(small_args(tmp_path, "tiny-student", "tiny-teacher"))
    assert "disk space" not in str(e.value) and not os.path.exists(tmp_path / "run")


# --------------------------------------------------------------------------------------------------
# pattern: silent acceptance (changed weights, an older args.json, a key given twice, a capped panel, 0600 files,
# an evaluation that does not say what it evaluated)


def test_a_resume_refuses_a_teacher_whose_weights_changed(tmp_path, model_dirs, two_steps, monkeypatch):  # noqa: F811
    recorded = json.loads((two_steps / "args.json").read_text())["weights"]
    assert recorded["teacher"].startswith("sha256:") and recorded["student"].startswith("sha256:")
    import fingerprint

    real = fingerprint.weights_id
    monkeypatch.setattr(fingerprint, "weights_id", lambda name: "sha256:other" if name == model_dirs[1] else real(name))
    monkeypatch.setattr(tcod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    before = snapshot(two_steps)
    with pytest.raises(ValueError, match="the weights of the teacher changed .*sha256:other now"):
        tcod.main(fast_args(tmp_path, model_dirs, steps=3, resume=True))
    assert snapshot(two_steps) == before


def test_a_teacher_updated_while_it_loads_is_caught(tmp_path, model_dirs, two_steps, monkeypatch):  # noqa: F811
    """Online, from_pretrained may fetch a newer hub revision than the cache held when the run was checked."""
    import fingerprint

    loads, real_load, real_id = [], tcod.load_model, fingerprint.weights_id
    monkeypatch.setattr(tcod, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(fingerprint, "weights_id", lambda name: "Qwen/x@new" if name == model_dirs[1] and loads else real_id(name))
    before = snapshot(two_steps)
    with pytest.raises(ValueError, match="the weights of the teacher changed .*Qwen/x@new now"):
        tcod.main(fast_args(tmp_path, model_dirs, steps=3, resume=True))
    assert loads and snapshot(two_steps) == before


def test_a_file_changed_in_place_changes_the_fingerprint(tmp_path):
    import fingerprint

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 100)
    first = fingerprint.weights_id(str(tmp_path))
    assert fingerprint.weights_id(str(tmp_path)) == first  # the same files: the same id (from the cache)
    (tmp_path / "model.safetensors").write_bytes(b"b" * 100)
    assert fingerprint.weights_id(str(tmp_path)) != first


def test_a_hand_edited_args_json_of_the_wrong_type_is_named(tmp_path, model_dirs, two_steps):  # noqa: F811
    old = json.loads((two_steps / "args.json").read_text())
    (two_steps / "args.json").write_text(json.dumps(old | {"save_every": "2"}))  # a string, where an integer belongs
    with pytest.raises(ValueError, match="--save-every '2': save_every must be an integer >= 1"):
        tcod.main(tcod.cli_args(["--resume", "--out", str(two_steps), "--steps", "3"]))


def test_an_older_args_json_says_which_flags_it_lacks(tmp_path, model_dirs, two_steps):  # noqa: F811
    old = json.loads((two_steps / "args.json").read_text())
    for key in ("weights", "lora_rank", "prompt"):
        del old[key]
    (two_steps / "args.json").write_text(json.dumps(old | {"flag_from_the_future": 1}))
    with pytest.warns(UserWarning) as caught:
        tcod.main(fast_args(tmp_path, model_dirs, steps=3, resume=True))
    said = " ".join(str(w.message) for w in caught)
    assert "has no --prompt, --lora-rank (written by an older version)" in said
    assert "records no weight fingerprints" in said
    assert "has flag_from_the_future, which this version does not know" in said
    assert "weights" in json.loads((two_steps / "args.json").read_text())  # recorded from now on


def test_a_key_given_twice_in_a_demos_file_is_refused(tmp_path):
    from curriculum import load_demos

    path = tmp_path / "demos.json"
    path.write_text('{"env": "tinyworld", "demos": {"t1": ["go"], "t1": ["look"]}}')
    with pytest.raises(ValueError, match=f"--demos '{path}': the key 't1' appears more than once"):
        load_demos(str(path), "tinyworld")


def test_an_eval_panel_larger_than_the_split_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tcod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="--eval-tasks 100000: tinyworld's test split has .* tasks; allowed: <="):
        tcod.main(small_args(tmp_path, "tiny-student", "tiny-teacher", eval_tasks=100_000))


def test_checkpoint_files_follow_the_umask(tmp_path, two_steps):
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (two_steps / "ckpt").iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}  # transformers wrote model.safetensors 0600 whatever the umask


def test_eval_says_which_checkpoint_step_it_evaluated(tmp_path, two_steps, capsys, monkeypatch):
    import eval as evaluation

    monkeypatch.chdir(tmp_path)
    evaluation.main(evaluation.Args(model=str(two_steps), limit=1, batch=1, out=str(tmp_path / "ev")))
    assert f"evaluating {two_steps}/ckpt: the checkpoint at step 2 of the run" in capsys.readouterr().err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["args"]["checkpoint_step"] == 2


def test_a_missing_shard_is_named(tmp_path, two_steps):
    ckpt = two_steps / "ckpt"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model.safetensors",
                                                                                  "b": "model-00002-of-00002.safetensors"}}))
    assert rundir.checkpoint_problem(str(ckpt)) == "model-00002-of-00002.safetensors, a shard model.safetensors.index.json names, is missing"
