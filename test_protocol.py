"""The paper's protocol: the settings where our defaults follow the paper and the authors' code (see the table "the
paper's setting, and ours" in docs/settings.md)."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

import rollout
import opd
import tcod
from envs import eval_panel
from test_tcod import chat, tok  # noqa: F401  (fixtures)
from tinyworld import TinyWorld


def test_kl_by_turn_has_per_token_means_and_per_turn_sums():
    # episode 0: turn 0 has tokens 1, 2; turn 1 has 3. episode 1: turn 0 has 5. 3 turns, the last without tokens.
    tokens = [(0, 0, 1.0), (0, 0, 2.0), (0, 1, 3.0), (1, 0, 5.0)]
    m = opd.kl_metrics(tokens, n_episodes=2, max_turns=3)
    assert m["kl_by_turn"] == [pytest.approx(8 / 3), 3.0, None]  # per token
    assert m["kl_sum_by_turn"] == [pytest.approx((3 + 5) / 2), 3.0, None]  # per turn, over the episodes that have it
    assert m["traj_kl"] == pytest.approx((6 + 5) / 2)


def test_max_reply_tokens_is_the_longest_sampled_reply():
    a, b = rollout.Episode("a"), rollout.Episode("b")
    a.add([1, 2, 3])  # prompt
    a.add([4, 5], turn=0)
    a.add([9])  # the eos added to a cut reply: not sampled
    a.add([6, 7, 8, 10], turn=1)
    b.add([1], turn=0)
    m = opd.episode_metrics([a, b])
    assert m["max_reply_tokens"] == 4


def test_logged_depth_is_capped_at_the_horizon(tmp_path):
    from test_tcod import small_args

    row = tcod.main(small_args(tmp_path, "tiny-student", "tiny-teacher", steps=1, k_start=50, max_turns=3, tasks_per_step=2, eval_tasks=2))
    assert row["k"] == 3


def test_eval_panel_is_stratified_fixed_and_seeded():
    class Typed(TinyWorld):  # 3 types of very unequal size, in blocks (as ALFWorld's folder order is)
        def tasks(self, split):
            return [f"{split}-{i}" for i in range(60)]

        def task_type(self, task):
            i = int(task.rsplit("-", 1)[1])
            return "a" if i < 50 else "b" if i < 57 else "c"

    env = Typed()
    panel = eval_panel(env, "test", 12)
    counts = Counter(env.task_type(t) for t in panel)
    assert counts == {"a": 5, "b": 4, "c": 3}  # all of c (3), then b and a share the rest in turn
    assert Counter(env.task_type(t) for t in env.tasks("test")[:12]) == {"a": 12}  # what "the first N" gave
    assert panel == eval_panel(env, "test", 12) and len(set(panel)) == 12
    assert panel != eval_panel(env, "test", 12, seed=1)
    assert eval_panel(env, "test", 100) and len(eval_panel(env, "test", 100)) == 60  # n beyond the split: all of it


@pytest.mark.parametrize("env,curriculum,expected", [
    ("alfworld", "f2b", "seq-mean-token-mean"), ("alfworld", "opd", "token-mean"), ("tinyworld", "f2b", "token-mean"),
])
def test_default_aggregation_follows_the_authors_configs(env, curriculum, expected):
    assert opd.default_aggregation(env, curriculum) == expected


def test_resolve_args_fills_the_aggregation_unless_given():
    args = dict(env="tinyworld", curriculum="f2b", student="tiny-student", teacher="tiny-teacher")
    assert tcod.resolve_args(tcod.Args(**args)).aggregation == "token-mean"
    assert tcod.resolve_args(tcod.Args(**args, aggregation="seq-mean-token-mean")).aggregation == "seq-mean-token-mean"


def test_an_episode_keeps_its_best_score():
    from envs import Step

    ep = rollout.Episode("boil-1")
    for score in (0.1, 0.45, 0.3):
        ep.saw(Step("...", score=score))
    assert ep.score == 0.45  # cut at T_max here: it keeps the points it earned (it had 0.0 before)
    ep.finish(Step("wrong focus", done=True, score=-1.0))  # ScienceWorld's -100 ends the episode as a failure
    assert ep.done and not ep.success and ep.score == 0.45  # the authors log the best score / 100 (we had -1.0)


@pytest.mark.parametrize("env", ["scienceworld", "tinyworld"])
def test_env_data_is_refused_where_an_env_has_none(env, tmp_path):
    student = "tiny-student" if env == "tinyworld" else "Qwen2.5-1.5B"
    with pytest.raises(ValueError, match="--env-data is for alfworld and webshop"):
        tcod.resolve_args(tcod.Args(env=env, student=student, teacher=student.replace("student", "teacher"), env_data=str(tmp_path)))


def test_split_by_turns_keeps_episodes_whole_and_balances_turns():
    keys = [f"t{i}" for i in range(16)]
    turns = [30] * 8 + [20] * 8  # an OPD-like rollout: 400 turns
    groups = opd.split_by_turns(keys, turns, 64)
    assert len(groups) == 7  # ceil(400 / 64)
    assert sorted(i for g in groups for i in g) == list(range(16))  # every episode once, whole
    assert all(20 <= sum(turns[i] for i in g) <= 90 for g in groups)
    # F2B at depth 1: 16 one-turn episodes are one step; 0 means one step per rollout
    assert opd.split_by_turns(keys, [1] * 16, 64) == [sorted(range(16), key=lambda i: keys[i])]
    assert len(opd.split_by_turns(keys, turns, 0)) == 1
    # the groups depend on the task ids, not on the order the episodes come in (ranks see them in another order)
    perm = list(reversed(range(16)))
    regrouped = [sorted(perm[i] for i in g) for g in opd.split_by_turns([keys[p] for p in perm], [turns[p] for p in perm], 64)]
    assert regrouped == [sorted(g) for g in groups]


def test_several_optimizer_steps_per_rollout(tok, chat):
    from test_tcod import make_model, play

    teacher = make_model(tok, 1).requires_grad_(False)
    episodes = play(make_model(tok, 0), chat, [f"train-{i}" for i in range(4)], max_new_tokens=6, max_turns=3)
    groups = opd.split_by_turns([e.task for e in episodes], [e.student_turns for e in episodes], 4)
    assert len(groups) > 1
    results = []
    for per_update in (0, 4):
        student = make_model(tok, 0)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        steps = []
        opt.step = (lambda step: lambda *a, **k: (steps.append(1), step(*a, **k))[1])(opt.step)
        out = opd.update(student, teacher, episodes, opt, tcod.update_config(tcod.Args(turns_per_update=per_update, grad_clip=1e9, aggregation="token-mean")))
        results.append((out, len(steps), torch.cat([p.detach().flatten() for p in student.parameters()])))
    (one, n_one, w_one), (many, n_many, w_many) = results
    assert (n_one, one["updates"]) == (1, 1) and (n_many, many["updates"]) == (len(groups), len(groups))
    # brute force: the groups' steps taken one after another by hand on a fresh student
    student = make_model(tok, 0)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for g in groups:
        opd.score_and_update(student, teacher, [episodes[i] for i in g], opt, tcod.update_config(tcod.Args(grad_clip=1e9, aggregation="token-mean")))
    torch.testing.assert_close(w_many, torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert not torch.equal(w_one, w_many)
    assert sorted(i for i, *_ in many["kl_tokens"]) == sorted(i for i, *_ in one["kl_tokens"])  # indices remapped


def test_transcripts_are_written_and_printed(tmp_path):
    import transcripts
    from test_tcod import small_args

    args = small_args(tmp_path, "tiny-student", "tiny-teacher", steps=1, tasks_per_step=2, eval_tasks=2, max_turns=3, transcript_every=1, transcript_episodes=2)
    tcod.main(args)
    files = sorted(os.listdir(os.path.join(args.out, "transcripts")))
    assert files == ["eval-step-0.jsonl", "eval-step-1.jsonl", "train-step-0.jsonl"]
    rows = [json.loads(line) for line in open(os.path.join(args.out, "transcripts", "train-step-0.jsonl"))]
    assert len(rows) == 2 and all(r["turns"] for r in rows)
    first = rows[0]["turns"][0]
    assert "Move each object" in first["context"] and first["reply"] and first["kl"] is not None
    assert first["turn"] == 0 and [t["turn"] for t in rows[0]["turns"]] == list(range(len(rows[0]["turns"])))
    text = transcripts.show(args.out)
    assert "--- turn 0: seen" in text and "--- reply (KL" in text


def test_transcript_segments_and_turn_kl():
    import transcripts

    assert transcripts.segments([-1, -1, 0, 0, -1, 1, -1]) == [(-1, 0, 2), (0, 2, 4), (-1, 4, 5), (1, 5, 6), (-1, 6, 7)]

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids)) if not skip_special_tokens else "<action>go " + str(ids[0]) + "</action>"

    ep = rollout.Episode("t")
    ep.add([1, 2])
    ep.add([3, 4], turn=0)
    ep.add([5])
    ep.add([6], turn=1)
    row = transcripts.transcript(ep, Tok(), {0: 0.5, 1: -0.1})
    assert [(t["turn"], t["action"], t["kl"]) for t in row["turns"]] == [(0, "go 3", 0.5), (1, "go 6", -0.1)]
    assert row["turns"][1]["context"] == "5"


# --------------------------------------------------------------------------------------------------
# the authors' trainer on the real benchmarks: update buffer, prompt cap, weight decay, eval reply cap


def test_real_benchmarks_default_to_the_authors_trainer_and_tinyworld_keeps_its_own():
    real = tcod.resolve_args(tcod.Args(env="webshop", student="random:Qwen2.5-1.5B@2"))
    assert (real.update_from, real.turns_per_update, real.max_prompt_tokens, real.weight_decay, real.eval_max_new_tokens) \
        == ("buffer", 64, 10_240, 0.01, 512)
    tiny = tcod.resolve_args(tcod.Args(student="tiny-student", teacher="tiny-teacher"))
    assert (tiny.update_from, tiny.turns_per_update, tiny.max_prompt_tokens, tiny.weight_decay, tiny.eval_max_new_tokens) \
        == ("rollout", 0, 0, 0.0, 32)
    given = tcod.resolve_args(tcod.Args(env="webshop", student="random:Qwen2.5-1.5B@2", max_new_tokens=300, max_prompt_tokens=0))
    assert (given.eval_max_new_tokens, given.max_prompt_tokens) == (300, 0)  # the eval cap follows the training one
    # the memory plan counts streams of at most a capped prompt and a reply, not the model's 32,768 tokens
    assert tcod.stream_cap(real, 32_768, 512) == 10_752 and tcod.stream_cap(given, 32_768, 300) == 32_768


def test_the_prompt_cap_ends_an_episode_as_truncated(tok, chat):
    from test_tcod import make_model, play

    model = make_model(tok)
    (free,) = play(model, chat, ["train-3"], max_new_tokens=12, max_turns=6)
    first = free.turn_of.index(0)  # the first prompt's length: the stream before the first reply
    assert free.turns >= 2 and not free.truncated
    for cap, turns in ((first, 1), (first - 1, 0)):  # room for one prompt, then none
        args = tcod.Args(max_prompt_tokens=cap)
        (ep,) = play(model, chat, ["train-3"], max_new_tokens=12, max_turns=6, max_context=tcod.stream_cap(args, 4096, 12))
        assert ep.truncated and ep.done and ep.student_turns == turns and not ep.success
        assert all(ep.turn_of.index(t) <= cap for t in range(turns))  # every prompt the student read fits the cap


def test_the_loop_applies_the_prompt_cap_weight_decay_and_eval_reply_cap(tmp_path):
    from test_tcod import small_args

    kw = dict(curriculum="opd", steps=1, tasks_per_step=4, eval_tasks=4)
    capped = small_args(tmp_path / "cap", "tiny-student", "tiny-teacher", max_prompt_tokens=120, weight_decay=0.5,
                        eval_max_new_tokens=3, **kw)
    row = tcod.main(capped)
    # a first prompt is 92-100 tokens here: the second one never fits, in training and in evaluation
    assert row["truncated"] == row["eval_truncated"] == 1.0 and row["turns"] == row["eval_turns"] == 1
    assert row["eval_max_reply_tokens"] <= 3 < row["max_reply_tokens"]  # eval replies cut at 3 tokens, training's at 12
    state = torch.load(os.path.join(capped.out, "ckpt", "trainer.pt"), weights_only=False)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.5
    free = tcod.main(small_args(tmp_path / "free", "tiny-student", "tiny-teacher", **kw))
    assert free["truncated"] == 0 and free["turns"] > 1


@pytest.mark.parametrize("kw,match", [
    (dict(update_from="buffer", turns_per_update=0), "turns_per_update must be >= 1 with --update-from buffer"),
    (dict(max_prompt_tokens=-1), "max_prompt_tokens must be an integer >= 0"),
    (dict(max_prompt_tokens=20), "--max-prompt-tokens 20: the first prompt is"),
    (dict(weight_decay=float("nan")), "weight_decay must be finite and >= 0"),
    (dict(eval_max_new_tokens=0), "eval_max_new_tokens must be an integer >= 1"),
    (dict(max_context=30, eval_max_new_tokens=40), "max_context must be more than a reply"),
])
def test_bad_update_settings_are_refused_before_any_model_loads(tmp_path, monkeypatch, kw, match):
    from test_tcod import small_args

    def no_models(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(tcod, "load_model", no_models)
    with pytest.raises(ValueError, match=match):
        tcod.main(small_args(tmp_path, "tiny-student", "tiny-teacher", **kw))
    assert not os.path.exists(tmp_path / "run" / "args.json")


def test_the_help_gives_the_schedule_as_the_code_runs_it(capsys):
    with pytest.raises(SystemExit):
        tcod.cli_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "depth at the first step: k = k_start + n // eta with the step n counted from 1" in text
    assert "depth at step 0" not in text and "depth at step 0" not in tcod.__doc__
    from curriculum import depth

    assert [depth(n - 1, 1, 2) for n in (1, 2, 3, 4, 5)] == [1 + n // 2 for n in (1, 2, 3, 4, 5)]  # the logged step is n - 1


def test_the_settings_table_the_readme_links_to_says_what_the_code_does():
    import models
    import prompts

    here = os.path.dirname(os.path.abspath(__file__))
    assert "(docs/settings.md#the-papers-setting-and-ours)" in open(os.path.join(here, "README.md")).read()
    text = open(os.path.join(here, "docs", "settings.md")).read()
    table = text.split("## The paper's setting, and ours")[1].split("\n## ")[0]
    rows = {r.split("|")[1].strip(): r.split("|")[2:] for r in table.splitlines() if r.startswith("| ") and not r.startswith("| setting")}
    real = tcod.resolve_args(tcod.Args(env="alfworld", student="random:Qwen2.5-1.5B@2"))
    ours = lambda setting: rows[setting][2]  # noqa: E731  (the "our default" column)
    assert "`--update-from`" in rows["update size"][1] and "`buffer`, 64" in ours("update size") and real.update_from == "buffer"
    assert "staleness is not bounded" in ours("update size")
    assert "10,240" in ours("context cap") and "the episode ends" in ours("context cap") and real.max_prompt_tokens == 10_240
    assert "= authors" in ours("weight decay") and "0.01" in rows["weight decay"][0] and real.weight_decay == 0.01
    assert "512" in ours("reply cap in evaluation") and real.eval_max_new_tokens == 512
    assert "not the paper's teacher" in ours("teacher") and models.resolve_model(models.default_teacher("Qwen2.5-1.5B")) == "Qwen/Qwen2.5-7B-Instruct"
    assert f"at most {prompts.MAX_ACTION_CHARS} characters" in ours("invalid reply")
    assert "n counts rollouts" in ours("depth schedule") and "250 rollouts" in ours("training steps")
    for setting in ("B2F replayed turns", "earlier reasoning (Qwen3)", "ScienceWorld split", "WebShop split"):
        assert setting in rows
    assert "not reachable from the command line" in ours("ScienceWorld split")
