"""The run directory under misuse, round two (issue 24): a failed resume changes nothing, a damaged file is named and
a good copy used, locks expire on a cluster, no writer overwrites what it did not write, nothing changes silently."""

from __future__ import annotations

import json
import os

import pytest
import torch

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
