"""eval.py, demo files into B2F and the SFT baseline, plot.py and repro.py's table, on policies with known answers."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

import eval as evaluation
import plot
import repro
import sft
import rollout
import tcod
from curriculum import Plan
from envpool import EnvPool
from test_faults import ScriptedDecoder, scripted  # noqa: F401  (fixture)
from test_tcod import chat, model_dirs, small_args, tok  # noqa: F401  (fixtures)
from tinyworld import TinyWorld


def test_oracle_scores_every_tinyworld_task_and_types_add_up(tmp_path):
    results = evaluation.main(evaluation.Args(model="oracle", limit=20, out=str(tmp_path)))
    r = results["test"]
    assert r["tasks"] == 20 and r["success"] == 1.0 and r["invalid"] == 0.0 and r["errors"] == 0
    assert 10 <= r["rounds"] <= 20
    saved = json.load(open(tmp_path / "eval.json"))["results"]["test"]
    assert saved["success"] == 1.0 and os.path.getsize(tmp_path / "eval.md") > 0


def test_oracle_on_webshop_and_per_type_breakdown_adds_up(tmp_path):
    r = evaluation.main(evaluation.Args(env="webshop", model="oracle", limit=12, out=str(tmp_path)))["test"]
    types = r["by_type"]
    assert len(types) > 1 and sum(v["tasks"] for v in types.values()) == r["tasks"] == 12
    assert sum(v["success"] * v["tasks"] for v in types.values()) == pytest.approx(r["success"] * r["tasks"])
    assert r["success"] >= 11 / 12  # the expert misses one known product (see webshop.py)


def test_oracle_on_alfworld_splits(tmp_path):
    pytest.importorskip("alfworld")
    results = evaluation.main(evaluation.Args(env="alfworld", model="oracle", limit=2, env_workers=0, out=str(tmp_path)))
    assert set(results) == {"valid_seen", "valid_unseen"}
    assert all(r["success"] == 1.0 and r["tasks"] == 2 for r in results.values())


def test_per_type_panel_keeps_order_and_covers_every_type():
    tasks = ["a1", "b1", "a2", "a3", "c1", "b2"]
    assert evaluation.panel(tasks, lambda t: t[0], 1) == ["a1", "b1", "c1"]
    assert evaluation.panel(tasks, lambda t: t[0], 2) == ["a1", "b1", "a2", "c1", "b2"]
    assert evaluation.panel(tasks, lambda t: t[0], None) == tasks


def test_a_policy_of_invalid_actions_scores_zero(tok, chat, scripted):  # noqa: F811
    scripted.script = staticmethod(lambda text: tok("<action>fly to the moon</action>", add_special_tokens=False)["input_ids"] + [chat.eos])
    env = TinyWorld()
    tasks = env.tasks("test")[:5]
    episodes = rollout.evaluate(None, chat, EnvPool("tinyworld", {}, 0), env, tasks, batch=5, temperature=0.4, max_new_tokens=16,
                                think=False, prompt="compact", max_turns=6, max_context=4096, seed=0)
    r = evaluation.summarize(episodes, {t: env.task_type(t) for t in tasks})
    assert r["success"] == 0.0 and r["invalid"] == 1.0 and r["rounds"] == 6 and r["by_type"]["move3"]["tasks"] == 5


def test_samples_write_demos_that_b2f_replays_and_sft_trains_on(model_dirs, tmp_path):  # noqa: F811
    out = str(tmp_path / "ev")
    r = evaluation.main(evaluation.Args(model="tiny-teacher", splits=("train",), limit=6, samples=2, out=out, batch=6))
    data = json.load(open(os.path.join(out, "demos.json")))
    assert data["env"] == "tinyworld" and r["train"]["pass_at_k"] >= r["train"]["success"]
    assert len(data["demos"]) + len(data["hard"]) == 6 and len(data["demos"]) == round(r["train"]["pass_at_k"] * 6)
    env = TinyWorld()
    for task, actions in data["demos"].items():  # each saved demo replays to success
        env.reset(task)
        assert [env.step(a) for a in actions][-1].success
    # B2F with --demos: the drawn tasks with a demo get a replayed prefix, the others play from scratch, counted
    student, teacher = model_dirs
    drawn = random.Random(0).sample(env.tasks("train"), 4)  # step 0 of seed 0 draws these (tcod.main)
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"env": "tinyworld", "demos": {t: env.demo(t) for t in drawn[:2]}}))
    row = tcod.main(small_args(tmp_path / "b2f", student, teacher, curriculum="b2f", demos=str(path), steps=1, max_turns=8))
    assert row["no_demo"] == 2 and row["prefix"] > 0
    # the hard split is exactly the unsolved tasks
    if data["hard"]:
        h = evaluation.main(evaluation.Args(model="tiny-teacher", splits=("hard",), demos=os.path.join(out, "demos.json"), out=str(tmp_path / "h")))
        assert h["hard"]["tasks"] == len(data["hard"])
    # the SFT baseline rebuilds each saved trajectory and trains on its replies only
    tok = tcod.load_tokenizers("tiny-student", "tiny-student")
    chat = rollout.Chat(tok)
    task, actions = next(iter(data["demos"].items()))
    ep = sft.replayed_stream(env, chat, task, actions, data["replies"][task], think=False, prompt="compact")
    trained = [i for i, t in enumerate(ep.turn_of) if t >= 0]
    assert tok.decode([ep.ids[i] for i in trained]).count("<action>") == len(actions)
    model_out = sft.baseline(sft.BaselineArgs(demos=os.path.join(out, "demos.json"), epochs=1, out=str(tmp_path / "sft")))
    assert os.path.isfile(os.path.join(model_out, "config.json"))


def test_b2f_plan_with_a_file_demo_replays_its_prefix(tok, chat, scripted):  # noqa: F811
    env = TinyWorld()
    task = env.tasks("train")[0]
    demo = env.demo(task)
    scripted.script = staticmethod(lambda text: tok("<action>look</action>", add_special_tokens=False)["input_ids"] + [chat.eos])
    (ep,) = rollout.rollout(None, chat, EnvPool("tinyworld", {}, 0), env, [task], [Plan(len(demo) - 1, 1)], [demo],
                         temperature=1.0, max_new_tokens=8, max_turns=20, max_context=4096, think=False, prompt="compact", generator=torch.Generator())
    assert ep.actions[: len(demo) - 1] == demo[:-1] and ep.prefix == len(demo) - 1 and ep.student_turns == 1


# --------------------------------------------------------------------------------------------------
# plots and the reproduction table


def fake_run(path, seed: int, kl_scale: float):
    os.makedirs(path)
    rows = [{"step": -1, "eval_success": 0.2, "eval_traj_kl": 10.0, "eval_kl_by_turn": [0.1, 0.2, None]}]
    for n in range(6):
        rows.append({"step": n, "traj_kl": kl_scale * (n + seed), "success": 0.1 * n, "k": 1 + n // 2, "kl_by_turn": [0.1 * n, None, 0.3]})
        if n % 3 == 2:
            rows[-1].update(eval_success=0.3 + 0.1 * seed, eval_traj_kl=5.0 + seed, eval_kl_by_turn=[0.1, 0.2 + seed, 0.4])
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def test_plot_writes_curves_and_heat_maps_with_seed_bands(tmp_path):
    runs = []
    for name, scale in (("opd", 2.0), ("f2b", 1.0)):
        for seed in (0, 1):
            runs.append(str(tmp_path / f"{name}-s{seed}"))
            fake_run(runs[-1], seed, scale)
    assert plot.group_runs(runs) == {"opd": runs[:2], "f2b": runs[2:]}
    xs, mean, low, high = plot.series([plot.load(r) for r in runs[:2]], "eval_success", plot.eval_x)
    assert xs == [0, 3, 6] and mean == pytest.approx([0.2, 0.35, 0.35]) and low == pytest.approx([0.2, 0.3, 0.3]) and high == pytest.approx([0.2, 0.4, 0.4])
    steps, grid = plot.kl_grid([plot.load(r) for r in runs[:2]], "eval_kl_by_turn")
    assert steps == [0, 3, 6] and grid[1] == pytest.approx([0.1, 0.7, 0.4]) and math.isnan(grid[0][2])
    out = plot.plot_runs(runs, str(tmp_path / "curves.png"))
    for png in (out, str(tmp_path / "curves-heatmap.png")):
        assert os.path.getsize(png) > 10_000


def test_repro_table_means_and_spreads(tmp_path):
    rows = [fake_run(str(tmp_path / f"f2b-s{s}"), s, 1.0) for s in (0, 1)]
    r = repro.summarize(rows, deep_from=1)
    assert r["seeds"] == 2
    assert r["eval_success"] == pytest.approx((0.35, 0.1 / math.sqrt(2)))  # final evals 0.3 and 0.4
    assert r["train_traj_kl_peak"][0] == pytest.approx((5 + 6) / 2)
    assert r["eval_deep_kl"][0] == pytest.approx(((0.2 + 0.4) / 2 + (1.2 + 0.4) / 2) / 2)
    assert repro.deep_kl([0.1, None, None], 1) is None
    table = repro.markdown({"f2b": r}, 1)
    assert "| f2b | 2 | 0.20 ± 0.00 → 0.35 ± 0.07 |" in table


def test_eval_shows_batches_turns_and_active_episodes(tok, chat, scripted, capsys):  # noqa: F811
    """A long eval must not sit at 0/N: the bar names the batch and counts turns and the episodes still playing."""
    scripted.script = staticmethod(lambda text: tok("<action>fly</action>", add_special_tokens=False)["input_ids"] + [chat.eos])
    env = TinyWorld()
    rollout.evaluate(None, chat, EnvPool("tinyworld", {}, 0), env, env.tasks("test")[:3], batch=2, temperature=0.4,
                     max_new_tokens=8, think=False, prompt="compact", max_turns=4, max_context=4096, seed=0, desc="eval")
    err = capsys.readouterr().err
    assert "eval batch 1/2" in err and "eval batch 2/2" in err and "active=2/2" in err and "active=1/1" in err
    rollout.evaluate(None, chat, EnvPool("tinyworld", {}, 0), env, env.tasks("test")[:1], batch=2, temperature=0.4,
                     max_new_tokens=8, think=False, prompt="compact", max_turns=4, max_context=4096, seed=0)
    assert capsys.readouterr().err == ""  # no desc: no bar
