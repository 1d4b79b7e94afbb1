"""The scripts as a user meets them (issue 24): a mistake is one line and exit 2, a bug a traceback; plot.py and
transcripts.py have a parser, --help and a clear word on an empty or half-written run; the design card's command
offline names both models it needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import cli
import models
import plot
import transcripts

HERE = os.path.dirname(os.path.abspath(__file__))


def script(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TCOD_TRACEBACK", None)
    return subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True, env=env, timeout=300)


# --------------------------------------------------------------------------------------------------
# pattern: every user error printed a full traceback (exit 1)


@pytest.mark.parametrize("argv, says", [
    (["tcod.py", "--lr", "-1", "--out", "{tmp}/run"], "--lr -1.0"),
    (["tcod.py", "--resume", "--out", "{tmp}/none"], "no checkpoint"),
    (["eval.py", "--limit", "0"], "--limit 0"),
    (["eval.py", "--model", "{tmp}/no-such-model"], "no such directory"),  # not taken for a hub id
    (["sft.py", "baseline", "--demos", "{tmp}/missing.json"], "no such file"),
    (["repro.py", "--curricula", "bogus", "--runs", "{tmp}/repro"], "unknown curricula"),
    (["repro.py", "--teachers", "bogus", "--runs", "{tmp}/repro"], "no tiny pair"),
    (["repro.py", "--jobs", "0", "--runs", "{tmp}/repro"], "--jobs 0"),
    (["sft.py", "baseline", "--demos", "{tmp}/d.json", "--epochs", "0"], "--epochs 0.0"),
    (["plot.py", "{tmp}/none"], "no such run directory"),
    (["transcripts.py", "{tmp}"], "no transcripts"),
    (["lora.py", "merge", "{tmp}", "{tmp}/merged"], "not a LoRA checkpoint"),
    (["fsdp.py", "export", "{tmp}", "{tmp}/model"], "not a sharded checkpoint"),
    (["fsdp.py", "plan", "--gpus", "0"], "--gpus 0"),
])
def test_a_user_error_is_one_line_and_exit_2_in_every_script(tmp_path, argv, says):
    done = script(*(a.replace("{tmp}", str(tmp_path)) for a in argv))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and says in last


def test_a_bug_keeps_its_traceback():
    with pytest.raises(TypeError):  # a bug in our code: not a user error
        cli.run(lambda: len(None))
    with pytest.raises(ValueError):  # raised by a builtin, not by a `raise` of ours: the message was not written for a user
        cli.run(lambda: int("x"))

    def refuse():
        raise ValueError("--x 1: must be 2")

    with pytest.raises(SystemExit) as e:
        cli.run(refuse)
    assert e.value.code == 2

    def write_to_a_full_disk():
        with open("/dev/full", "w") as f:  # the system's ENOSPC, from no raise of ours: the machine, not a bug
            f.write("x")

    if os.path.exists("/dev/full"):
        with pytest.raises(SystemExit) as e:
            cli.run(write_to_a_full_disk)
        assert e.value.code == 2

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:  # Ctrl-C is no bug either: no traceback
        cli.run(interrupted)
    assert e.value.code == 130


# --------------------------------------------------------------------------------------------------
# pattern: plot.py and transcripts.py read sys.argv by hand: no --help, raw errors on an empty or half-written run


@pytest.mark.parametrize("name", ["plot.py", "transcripts.py"])
def test_plot_and_transcripts_have_help(name):
    done = script(name, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout
    assert ("--out" if name == "plot.py" else "--episodes") in done.stdout


def test_plot_says_why_a_run_has_nothing_to_plot(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        plot.main([str(run)])
    (run / "metrics.jsonl").write_text('{"step": -1, "eval_succ')  # killed while writing its first row
    with pytest.raises(ValueError, match="holds no complete row yet"):
        plot.main([str(run), "--out", str(tmp_path / "c.png")])
    with pytest.raises(ValueError, match="--out"):
        plot.main([str(run), "--out", str(tmp_path / "no" / "c.png")])


def test_transcripts_say_why_there_is_nothing_to_show(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a run directory nor a transcript file"):
        transcripts.main([str(tmp_path / "nothing")])
    with pytest.raises(FileNotFoundError, match="no transcripts in"):
        transcripts.main([str(tmp_path)])
    path = tmp_path / "transcripts" / "train-step-0.jsonl"
    path.parent.mkdir()
    path.write_text('{"task": "t", "tu')  # half-written
    with pytest.raises(ValueError, match="no complete transcript"):
        transcripts.main([str(tmp_path)])
    row = {"task": "t", "success": True, "score": 1.0, "prefix": 0, "end": "", "turns": [
        {"turn": 0, "context": "seen", "reply": "<action>go</action>", "action": "go", "kl": 0.5}]}
    path.write_text(json.dumps(row) + "\n" + '{"task": "t2", "tu')  # one whole episode, one being written
    assert "## t: success True" in transcripts.main([str(tmp_path), "--episodes", "3"])
    assert "## t: success True" in transcripts.main([str(path.parent)])  # the transcripts/ folder itself
    with pytest.raises(ValueError, match="--episodes 0"):
        transcripts.main([str(tmp_path), "--episodes", "0"])


# --------------------------------------------------------------------------------------------------
# pattern: the design card's command offline named only the student; the 15 GB teacher came up one download later


def test_offline_the_design_cards_command_names_both_models_and_one_command(tmp_path, monkeypatch):
    import tcod

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(tcod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(models.ModelUnavailable) as e:
        tcod.main(tcod.Args(env="webshop", student="Qwen2.5-1.5B", out=str(tmp_path / "run")))
    msg = str(e.value)
    assert "\n" not in msg and "the student 'Qwen2.5-1.5B' (Qwen/Qwen2.5-1.5B-Instruct, about 3 GB" in msg
    assert "the teacher 'Qwen2.5-7B' (Qwen/Qwen2.5-7B-Instruct, about 15 GB" in msg
    assert ("the default for qwen2.5 students (a stand-in for the paper's teacher, a GRPO-trained Qwen2.5-7B that was not "
            "released), picked as no --teacher was given") in msg
    assert "hf download Qwen/Qwen2.5-1.5B-Instruct && hf download Qwen/Qwen2.5-7B-Instruct" in msg
    # a teacher the user named is not explained, and a student that is at hand is not listed
    with pytest.raises(models.ModelUnavailable) as e:
        models.check_models("tiny-student", "Qwen2.5-7B")
    assert "picked" not in str(e.value) and "tiny" not in str(e.value)
