"""Runs that cannot be lost, stuck or silently changed (issue 12): one test per row of the issue's table.

Each test fails on the old behaviour: the row's input used to be accepted, crash deep inside, or lose files.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import eval as evaluation
import envs
import lock
import rundir
import rollout
import preflight
import tcod
from envs import AlfWorld
from test_tcod import chat, make_model, model_dirs, small_args, tok  # noqa: F401  (fixtures)
from tinyworld import TinyWorld

TINY = dict(student="tiny-student", teacher="tiny-teacher")


@pytest.fixture
def no_models(monkeypatch):
    """Any model load fails: a check that passes with this fixture happened before the models load."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(tcod, "load_model", refuse)


def tiny_args(tmp_path, **kw):
    return small_args(tmp_path, kw.pop("student", TINY["student"]), kw.pop("teacher", TINY["teacher"]), **kw)


def fast_args(tmp_path, model_dirs, **kw):  # noqa: F811
    """For tests that train: the random 2-layer models of test_tcod, short episodes, a small eval."""
    student, teacher = kw.pop("student", model_dirs[0]), kw.pop("teacher", model_dirs[1])
    return small_args(tmp_path, student, teacher, **{"max_turns": 4, "eval_tasks": 2, "max_new_tokens": 10, **kw})


# --------------------------------------------------------------------------------------------------
# rows: flags that ran with nonsense (no-op training, numbers about nothing, deep tracebacks) are refused up front


@pytest.mark.parametrize("kw, flag", [
    (dict(steps=0), "--steps 0"),
    (dict(save_every=0), "--save-every 0"),
    (dict(estimator="jsd", jsd_beta=0.0), "--jsd-beta 0.0"),
    (dict(estimator="jsd", jsd_beta=1.0), "--jsd-beta 1.0"),
    (dict(grad_clip=0.0), "--grad-clip 0.0"),
    (dict(kl_coef=0.0), "--kl-coef 0.0"),
    (dict(lr=float("inf")), "--lr inf"),
    (dict(lr=float("nan")), "--lr nan"),
    (dict(lr=-1e-4), "--lr -0.0001"),
    (dict(train_temperature=-1.0), "--train-temperature -1.0"),
    (dict(eval_temperature=float("nan")), "--eval-temperature nan"),
    (dict(eval_tasks=0), "--eval-tasks 0"),
    (dict(eval_every=-1), "--eval-every -1"),
    (dict(tasks_per_step=0), "--tasks-per-step 0"),
    (dict(micro_batch=0), "--micro-batch 0"),
    (dict(max_new_tokens=0), "--max-new-tokens 0"),
    (dict(max_context=10), "--max-context 10"),
    (dict(max_turns=0), "--max-turns 0"),
])
def test_every_flag_is_range_checked_before_models_load(tmp_path, no_models, kw, flag):
    with pytest.raises(ValueError, match=re.escape(flag)) as e:
        tcod.main(tiny_args(tmp_path, **kw))
    assert "must be" in str(e.value)  # what is allowed
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_max_context_must_fit_a_prompt_and_a_reply(tmp_path, no_models):
    # 40 > max_new_tokens 12 passes the plain range check, but tinyworld's first prompt alone is longer
    with pytest.raises(ValueError, match="--max-context 40: the first prompt"):
        tcod.main(tiny_args(tmp_path, max_context=40))


@pytest.mark.parametrize("kw, flag", [(dict(limit=0), "--limit 0"), (dict(limit=-3), "--limit -3"),
                                      (dict(per_type=0), "--per-type 0"), (dict(batch=0), "--batch 0"),
                                      (dict(temperature=-0.5), "--temperature -0.5")])
def test_eval_flags_are_range_checked(tmp_path, kw, flag, monkeypatch):
    monkeypatch.setattr(tcod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=re.escape(flag)):
        evaluation.main(evaluation.Args(model="tiny-teacher", out=str(tmp_path / "ev"), **kw))


# --------------------------------------------------------------------------------------------------
# row: a crash or kill before the first checkpoint left a directory that could neither resume nor restart


def started_run(tmp_path, monkeypatch, model_dirs):  # noqa: F811
    """A run killed after three steps, before its first checkpoint (save_every 10)."""
    args = fast_args(tmp_path, model_dirs, steps=3, save_every=10)

    def killed(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C at the first save: the rows of 3 steps, no checkpoint

    with monkeypatch.context() as m:
        m.setattr(tcod, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            tcod.main(args)
    assert rundir.run_state(args.out) == "started"
    return args


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, monkeypatch, resume, capsys, model_dirs):  # noqa: F811
    args = started_run(tmp_path, monkeypatch, model_dirs)
    old_rows = rundir.read_metrics(os.path.join(args.out, "metrics.jsonl"))
    assert [r["step"] for r in old_rows] == [-1, 0, 1, 2]
    again = fast_args(tmp_path, model_dirs, steps=3, save_every=10, resume=resume)
    tcod.main(again)
    assert "starting it again from step 0" in capsys.readouterr().err
    rows = rundir.read_metrics(os.path.join(args.out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [-1, 0, 1, 2] and rundir.run_state(args.out) == "resumable"
    moved = [n for n in os.listdir(args.out) if n.startswith("metrics.jsonl.") and n.endswith(".old")]
    assert len(moved) == 1  # the old rows are kept, moved aside
    assert rundir.read_metrics(os.path.join(args.out, moved[0])) == old_rows


def test_a_kill_while_the_models_load_leaves_a_run_that_starts_again(tmp_path, monkeypatch):
    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tcod, "load_model", killed)
        with pytest.raises(KeyboardInterrupt):
            tcod.main(tiny_args(tmp_path))
    out = str(tmp_path / "run")
    assert rundir.run_state(out) == "started"  # args.json is written before the models load
    assert rundir.start_mode("started", False, out) == "restart" == rundir.start_mode("started", True, out)


def test_directory_states_and_their_next_command(tmp_path):
    out = str(tmp_path / "d")
    assert rundir.run_state(out) == "empty"
    with pytest.raises(FileNotFoundError, match="no checkpoint.*without --resume"):
        rundir.start_mode("empty", True, out)
    with pytest.raises(FileExistsError, match=f"--resume --out {out}"):
        rundir.start_mode("resumable", False, out)
    with pytest.raises(FileExistsError, match="not a tcod run"):
        rundir.start_mode("foreign", False, out)


# --------------------------------------------------------------------------------------------------
# row: --resume with other experiment flags was accepted silently


@pytest.mark.parametrize("key, value", [("teacher", "other-teacher"), ("env", "webshop"), ("curriculum", "b2f"),
                                        ("lr", 0.5), ("seed", 7), ("student", "other"), ("estimator", "jsd"),
                                        ("aggregation", "seq-mean-token-mean"), ("k_start", 2), ("eta", 4),
                                        ("tasks_per_step", 8), ("train_temperature", 0.7), ("max_turns", 9)])
def test_resume_refuses_a_different_experiment(key, value):
    old = json.loads(json.dumps(tcod.asdict(tcod.Args(lr=1e-4, steps=10, max_turns=6))))
    new = dict(old, **{key: value})
    refused, allowed = rundir.resume_differences(old, new)
    assert len(refused) == 1 and refused[0].startswith(f"--{key.replace('_', '-')}:") and not allowed
    with pytest.raises(ValueError, match="would change the experiment"):
        rundir.check_resume(old, new, "runs/x")


def test_resume_allows_placement_and_more_steps_and_records_them():
    old = json.loads(json.dumps(tcod.asdict(tcod.Args(steps=10, device="cpu"))))
    new = dict(old, steps=20, device="cuda:1", env_workers=4, micro_batch=2, resume=True)
    refused, allowed = rundir.resume_differences(old, new)
    assert not refused and allowed == {"steps": [10, 20], "device": ["cpu", "cuda:1"], "env_workers": [None, 4], "micro_batch": [4, 2]}


def test_resume_through_main_compares_records_and_takes_the_runs_flags(tmp_path, model_dirs):  # noqa: F811
    args = fast_args(tmp_path, model_dirs, steps=1)
    tcod.main(args)
    with pytest.raises(ValueError, match=r"--lr: 0\.001 in the run, 0\.01 now"):
        tcod.main(fast_args(tmp_path, model_dirs, steps=2, lr=1e-2, resume=True))
    with pytest.raises(ValueError, match="--teacher"):
        tcod.main(fast_args(tmp_path, model_dirs, steps=2, teacher=model_dirs[0], resume=True))
    assert json.load(open(os.path.join(args.out, "args.json")))["steps"] == 1  # refusals change nothing
    tcod.main(fast_args(tmp_path, model_dirs, steps=2, resume=True))
    log = [json.loads(line) for line in open(os.path.join(args.out, "resumes.jsonl"))]
    assert log[-1]["changed"] == {"steps": [1, 2]}
    assert json.load(open(os.path.join(args.out, "args.json")))["steps"] == 2
    # on the command line, --resume takes every flag not typed from args.json
    cli = tcod.cli_args(["--resume", "--out", args.out, "--steps", "5"])
    assert (cli.steps, cli.lr, cli.max_turns, cli.tasks_per_step, cli.think) == (5, 1e-3, 4, 4, False)
    assert tcod.cli_args(["--resume", "--out", args.out, "--think", "True"]).think is True


# --------------------------------------------------------------------------------------------------
# row: an unrelated --out directory had its files deleted or overwritten


@pytest.mark.parametrize("files", [{"ckpt/notes.txt": "mine"}, {"args.json": '{"lr": 1}'}, {"metrics.jsonl": '{"step": 0}\n'},
                                   {"data.csv": "a,b"}])
def test_a_directory_that_is_not_a_run_is_refused_and_untouched(tmp_path, no_models, files):
    out = tmp_path / "run"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = sorted((str(p.relative_to(out)), p.read_text() if p.is_file() else None) for p in out.rglob("*"))
    for resume in (False, True):
        with pytest.raises(FileExistsError, match="not a tcod run"):
            tcod.main(tiny_args(tmp_path, resume=resume))
    assert sorted((str(p.relative_to(out)), p.read_text() if p.is_file() else None) for p in out.rglob("*")) == before


# --------------------------------------------------------------------------------------------------
# row: two runs on one --out both ran


def test_a_lock_stops_a_second_run_and_a_stale_one_does_not(tmp_path, no_models, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "lock").write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        with pytest.raises(RuntimeError, match=f"in use by another tcod run \\(pid {sleeper.pid}"):
            tcod.main(tiny_args(tmp_path))
        assert not os.path.exists(out / "args.json")
    finally:
        sleeper.kill()
        sleeper.wait()
    # the process is gone: its lock is stale, and the run starts (it gets as far as loading a model)
    with pytest.raises(AssertionError, match="a model was loaded"):
        tcod.main(tiny_args(tmp_path))
    assert rundir.run_state(str(out)) == "started" and not os.path.exists(out / "lock")  # released on the way out
    path = lock.acquire_lock(str(out))
    assert lock.lock_holder(path) is None  # this process's own lock is not someone else's
    lock.release_lock(path)
    assert not os.path.exists(path)


# --------------------------------------------------------------------------------------------------
# row: resume rewrote metrics.jsonl by truncate-then-write


def test_metrics_are_rewritten_through_a_new_file(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    rows = [{"step": s, "x": s} for s in range(-1, 5)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    calls = []

    def fail_midway(obj, *a, **k):
        calls.append(obj)
        if len(calls) == 3:
            raise OSError(errno.EIO, "I/O error")
        return json.JSONEncoder().encode(obj)

    with monkeypatch.context() as m:
        m.setattr(tcod.json, "dumps", fail_midway)
        with pytest.raises(OSError):
            rundir.keep_rows_before(path, 3)
    assert rundir.read_metrics(path) == rows  # a failure in the window loses nothing
    rundir.keep_rows_before(path, 3)
    assert [r["step"] for r in rundir.read_metrics(path)] == [-1, 0, 1, 2]


# --------------------------------------------------------------------------------------------------
# rows: non-finite states are never saved; a full disk is named; a failed plot does not fail the run


def save(out, model, tok, optimizer, step=1):  # noqa: F811
    rundir.save_checkpoint(out, model, tok, optimizer, tcod.Curriculum("f2b", 1, 2, 6, 0.1, 8), step)


def test_a_non_finite_state_is_never_saved(tmp_path, tok):  # noqa: F811
    out = str(tmp_path)
    model = make_model(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save(out, model, tok, optimizer)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="not saving the step-2 checkpoint: weight .* is not finite"):
        save(out, model, tok, optimizer, 2)
    from transformers import AutoModelForCausalLM

    kept = AutoModelForCausalLM.from_pretrained(os.path.join(out, "ckpt")).state_dict()
    assert all(torch.equal(kept[k], good[k]) for k in good) and not os.path.exists(os.path.join(out, "ckpt.tmp"))
    with torch.no_grad():
        next(model.parameters())[0, 0] = 0.0
    optimizer.state[next(model.parameters())] = {"exp_avg": torch.tensor([float("nan")])}
    with pytest.raises(RuntimeError, match="optimizer state exp_avg"):
        save(out, model, tok, optimizer, 3)


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 9344 vs 9232"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_is_named_and_the_last_checkpoint_kept(tmp_path, tok, monkeypatch, error):  # noqa: F811
    out = str(tmp_path)
    model = make_model(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save(out, model, tok, optimizer)

    def full(*a, **k):
        raise error

    monkeypatch.setattr(tcod.torch, "save", full)
    with pytest.raises(OSError, match="the disk is full") as e:
        save(out, model, tok, optimizer, 2)
    assert e.value.errno == errno.ENOSPC and "--resume" in str(e.value)
    assert rundir.last_checkpoint(out) == os.path.join(out, "ckpt") and not os.path.exists(os.path.join(out, "ckpt.tmp"))
    monkeypatch.setattr(tcod.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other errors pass through unchanged
        save(out, model, tok, optimizer, 2)


def test_a_failed_final_plot_warns_and_the_run_finishes(tmp_path, monkeypatch, model_dirs):  # noqa: F811
    import plot

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plot, "plot_runs", full)
    with pytest.warns(UserWarning, match="the final plot failed .*No space left"):
        row = tcod.main(fast_args(tmp_path, model_dirs, steps=1))
    assert row["step"] == 0 and rundir.run_state(str(tmp_path / "run")) == "resumable"


# --------------------------------------------------------------------------------------------------
# row: demos files


def drawn_tasks(n=4):
    """The tasks step 0 of seed 0 draws (tcod.main's random.Random(step_seed).sample)."""
    return random.Random(0).sample(TinyWorld().tasks("train"), n)


@pytest.mark.parametrize("content, match", [
    ('{"env": "tinyworld", "demos": {', "not valid JSON"),
    ('[1, 2]', "top level is a list"),
    ('{"demos": {}}', 'no "env"'),
    ('{"env": "tinyworld", "demos": {"t": "go north"}}', "list of action strings"),
    ('{"env": "tinyworld", "demos": {"t": [1, 2]}}', "list of action strings"),
    ('{"env": "tinyworld", "demos": {}, "hard": "t"}', '"hard" must be'),
    ('{"env": "tinyworld", "demos": {}}', "holds no demonstration"),
    ('{"env": "tinyworld", "demos": {"no-such-task": ["go north"]}}', "not training tasks"),
])
def test_bad_demos_files_are_refused_naming_the_path(tmp_path, no_models, content, match):
    path = tmp_path / "demos.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        tcod.main(tiny_args(tmp_path, curriculum="b2f", demos=str(path)))
    assert str(path) in str(e.value)


def test_refused_replays_are_counted_and_a_sparse_file_warns(tmp_path, model_dirs):  # noqa: F811
    env = TinyWorld()
    tasks = drawn_tasks()
    demos = {t: ["fly to the moon"] * len(env.demo(t)) for t in tasks[:2]}  # every replayed action is refused
    path = tmp_path / "demos.json"
    path.write_text(json.dumps({"env": "tinyworld", "demos": demos}))
    with pytest.warns(UserWarning, match="covers 2 of the 5000 training tasks"):
        row = tcod.main(fast_args(tmp_path, model_dirs, curriculum="b2f", demos=str(path), steps=1, max_turns=8))
    assert row["no_demo"] == 2 and row["prefix"] > 0
    assert row["replay_refused"] == row["prefix"] * row["episodes"]  # every replayed action, counted


# --------------------------------------------------------------------------------------------------
# row: env data problems


def test_alfworld_data_that_holds_no_games_fails_plainly(tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))  # empty: used to fall back silently to other games
    with pytest.raises(FileNotFoundError, match=r"\$ALFWORLD_DATA=.*has no json_2.1.1/valid_seen"):
        AlfWorld().tasks("valid_seen")
    (tmp_path / "json_2.1.1" / "valid_seen").mkdir(parents=True)  # the layout, but no game in it
    with pytest.raises(FileNotFoundError, match="no ALFWorld games"):
        AlfWorld().tasks("valid_seen")


def test_scienceworld_without_java_fails_before_anything_loads(tmp_path, monkeypatch, model_dirs, no_models):  # noqa: F811
    monkeypatch.setattr(envs.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="ScienceWorld needs java"):
        envs.ScienceWorld()
    student, teacher = model_dirs
    with pytest.raises(RuntimeError, match="needs java"):
        tcod.main(small_args(tmp_path, student, teacher, env="scienceworld"))


def test_a_corrupt_webshop_products_file_is_named(tmp_path):
    from webshop import DATA_DIR, WebShop

    shutil.copy(os.path.join(DATA_DIR, "items_ins_v2_mini.json"), tmp_path)
    text = open(os.path.join(DATA_DIR, "items_shuffle_mini.json")).read()
    (tmp_path / "items_shuffle_mini.json").write_text(text[: len(text) // 2])  # a cut download
    with pytest.raises(ValueError, match="items_shuffle_mini.json is not valid JSON"):
        WebShop(data=str(tmp_path))
    (tmp_path / "items_shuffle_mini.json").write_text("[]")
    with pytest.raises(ValueError, match="no WebShop task"):
        WebShop(data=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# rows: eval.py on a run's checkpoint: the run's settings, arguments as used, nothing overwritten, written as it goes


def fake_run(root, name, model_dir, **run_args):
    """A tcod run directory whose checkpoint is model_dir (the run's args.json as tcod writes it)."""
    out = root / name
    shutil.copytree(model_dir, out / "ckpt")
    torch.save({"step": 1}, out / "ckpt" / "trainer.pt")
    args = tcod.asdict(tcod.Args(**{**TINY, **run_args}))
    (out / "args.json").write_text(json.dumps(args))
    return str(out)


def test_eval_of_run_checkpoints_uses_their_settings_and_never_overwrites(tmp_path, model_dirs, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    student, _ = model_dirs
    a = fake_run(tmp_path, "A", student, max_new_tokens=7, think=False, max_turns=3)
    b = fake_run(tmp_path, "B", student, max_new_tokens=7, think=False, max_turns=3)
    evaluation.main(evaluation.Args(model=os.path.join(a, "ckpt"), limit=2, batch=2))
    evaluation.main(evaluation.Args(model=os.path.join(b, "ckpt"), limit=2, batch=2))
    evaluation.main(evaluation.Args(model=a, limit=2, batch=2))  # the run directory itself: its checkpoint, again
    assert sorted(os.listdir("runs")) == ["eval-tinyworld-A-ckpt", "eval-tinyworld-A-ckpt-2", "eval-tinyworld-B-ckpt"]
    used = json.load(open("runs/eval-tinyworld-A-ckpt/eval.json"))["args"]
    assert (used["env"], used["splits"], used["max_turns"], used["max_new_tokens"], used["think"]) == ("tinyworld", ["test"], 3, 7, False)
    assert used["run"]["max_new_tokens"] == 7 and used["model_path"] == os.path.join(a, "ckpt")
    with pytest.raises(FileExistsError, match="is not empty"):
        evaluation.main(evaluation.Args(model=a, limit=2, out="runs/eval-tinyworld-B-ckpt"))


def test_a_killed_eval_keeps_its_finished_batches(tmp_path, model_dirs, monkeypatch):  # noqa: F811
    student, _ = model_dirs
    real, calls = rollout.evaluate, []

    def killed_on_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rollout, "evaluate", killed_on_the_second_batch)
    out = str(tmp_path / "ev")
    with pytest.raises(KeyboardInterrupt):
        evaluation.main(evaluation.Args(model=student, limit=4, batch=2, max_new_tokens=6, max_turns=2, think=False, out=out))
    rows = [json.loads(line) for line in open(os.path.join(out, "episodes.jsonl"))]
    assert [r["task"] for r in rows] == TinyWorld().tasks("test")[:2] and all(r["split"] == "test" for r in rows)


def test_tiny_models_are_refused_outside_their_worlds_and_the_student_plays_the_drift_world(no_models):
    """A -recall model reads another observation form: refused in TinyWorld. TinyWorld-drift reads as TinyWorld until
    the first detour, so the TinyWorld student (repro.py's drift cells) and a drift teacher may meet there."""
    with pytest.raises(ValueError, match="tiny-teacher-recall only knows tinyworld-recall"):
        tcod.resolve_args(tcod.Args(student="tiny-student", teacher="tiny-teacher-recall"))
    with pytest.raises(ValueError, match="tiny-student only knows tinyworld and tinyworld-drift"):
        tcod.resolve_args(tcod.Args(env="tinyworld-recall", student="tiny-student", teacher="tiny-teacher-recall"))
    preflight.check_args(tcod.resolve_args(tcod.Args(env="tinyworld-drift", student="tiny-student",
                                                teacher="tiny-teacher-drift-norec")))
