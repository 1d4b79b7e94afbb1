"""The prompt styles (prompts.py): the rendered text of a turn against the template, one token stream per episode in
either style, and the Step parts (task, scene, actions) each benchmark gives the paper template."""

import importlib.util
import re
import shutil

import pytest

import rollout
import tcod
from curriculum import Plan
from envs import EnvPool, Step, TinyWorld
from prompts import NO_ACTION, Prompter, default_style, how_to_reply, refused
from test_faults import scripted  # noqa: F401  (fixture)
from test_tcod import chat, model_dirs, tok  # noqa: F401  (fixtures)

INSTR = TinyWorld.instructions


def test_compact_style_is_the_old_text():
    """The tiny models were trained on this text: it must not change by a byte."""
    env = TinyWorld()
    p, step = Prompter("compact", env, think=False), env.reset("train-1")
    assert p.first(step) == (
        f"{INSTR}\nReply with exactly one action inside <action> </action>.\n\n"
        "task: move mug to fridge, egg to table, phone to drawer.\n"
        "actions: go sink, go shelf, go drawer, go table, open fridge. at fridge, closed. hand: empty. next: mug from sink to here.")
    assert p.after("open fridge", env.step("open fridge")) == (
        "step 1. actions: go sink, go shelf, go drawer, go table. at fridge, you see nothing. hand: empty. next: mug from sink to here.")


def test_paper_style_restates_task_count_and_last_two_steps():
    env = TinyWorld()
    p, step = Prompter("paper", env, think=True), env.reset("train-1")
    how = "First reason step by step inside <think> </think>, then give exactly one action inside <action> </action>."
    task = "Your task: move mug to fridge, egg to table, phone to drawer."
    obs0 = "at fridge, closed. hand: empty. next: mug from sink to here."
    assert p.first(step) == "\n".join([
        INSTR, task, "You have not taken any step yet.", f"Now, at step 1, you observe: {obs0}",
        "Admissible actions: go sink, go shelf, go drawer, go table, open fridge.", how])
    obs1 = "at fridge, you see nothing. hand: empty. next: mug from sink to here."
    s1 = env.step("open fridge")
    assert p.after("open fridge", s1) == "\n".join([
        INSTR, task, "You have taken 1 step(s) so far. The last 1, oldest first:",
        f"[step 1] observation: {obs0}", "[step 1] your action: open fridge",
        f"Now, at step 2, you observe: {obs1}", "Admissible actions: go sink, go shelf, go drawer, go table.", how])
    # a reply with no action: the env is not stepped, the model is told why, the history shows no action
    bad = refused(s1, "no <action>...</action> in the reply")
    assert not bad.valid and bad.actions == s1.actions and "invalid reply: no <action>" in bad.observation
    p.after(None, bad)
    third = p.after("go sink", env.step("go sink"))
    assert third == "\n".join([
        INSTR, task, "You have taken 3 step(s) so far. The last 2, oldest first:",  # only the last 2 pairs
        f"[step 2] observation: {obs1}", f"[step 2] your action: {NO_ACTION}",
        f"[step 3] observation: invalid reply: no <action>...</action> in the reply. {obs1}", "[step 3] your action: go sink",
        "Now, at step 4, you observe: at sink, you see egg, mug. hand: empty. next: mug from here to fridge.",
        "Admissible actions: go shelf, go drawer, go table, go fridge, take egg, take mug.", how])
    assert obs0 not in third  # older steps leave the text history (they stay earlier in the chat)


def test_default_styles_and_unknown_style():
    assert default_style("tinyworld") == "compact"
    assert {default_style(e) for e in ("alfworld", "webshop", "scienceworld")} == {"paper"}
    with pytest.raises(ValueError, match="unknown prompt style"):
        Prompter("verbose", TinyWorld(), False)
    assert tcod.resolve_args(tcod.Args()).prompt == "compact"  # the tinyworld demo
    assert tcod.resolve_args(tcod.Args(prompt="paper")).prompt == "paper"


def test_paper_prompt_episode_is_one_token_stream_of_the_template(tok, chat, scripted):  # noqa: F811
    """A rollout in the paper style: the stream is exactly the chat template over the Prompter's messages and the
    replies, B2F replayed turns included, and every user message restates the task."""
    env = TinyWorld()
    task = "train-3"
    demo = env.demo(task)
    replies = iter(["<action>nonsense", *[f"<action>{a}</action>" for a in demo[2:]]])
    scripted.script = staticmethod(lambda text: tok(next(replies), add_special_tokens=False)["input_ids"] + [chat.eos])
    (ep,) = rollout.rollout(None, chat, EnvPool("tinyworld", {}, 0), env, [task], [Plan(2, 20)], [demo], temperature=1.0,
                            max_new_tokens=64, max_turns=20, max_context=1 << 16, think=False, prompt="paper",
                            generator=None)
    assert ep.success and ep.prefix == 2 and ep.invalid == 1
    # rebuild the chat by hand: the same messages, rendered by the tokenizer's chat template in one go
    p, msgs, step = Prompter("paper", env, False), [], env.reset(task)
    msgs.append({"role": "user", "content": p.first(step)})
    said = [f"<action>{a}</action>" for a in demo[:2]] + ["<action>nonsense"] + [f"<action>{a}</action>" for a in demo[2:]]
    took = demo[:2] + [None] + demo[2:]
    for text, action in zip(said, took):
        msgs.append({"role": "assistant", "content": text})
        step = refused(step, "no <action>...</action> in the reply") if action is None else env.step(action)
        if step.done:
            break
        msgs.append({"role": "user", "content": p.after(action, step)})
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    rendered = rendered[: rendered.rindex(tok.eos_token) + len(tok.eos_token)]  # the stream ends at the last reply's eos
    assert tok.decode(ep.ids) == rendered
    assert rendered.count("Your task: ") == len(said)
    assert f"You have taken 2 step(s) so far. The last 2, oldest first:\n[step 1] observation: " in rendered  # after replay
    assert how_to_reply(False) in rendered


# ---- each benchmark gives the parts the paper template lays out, consistent with its compact text


def parts_agree(first: Step, later: list[Step]):
    assert first.task and first.task in first.observation
    for s in [first, *later]:
        assert s.actions, s
        scene = s.observation if s.scene is None else s.scene  # None: the observation is the scene
        assert all(piece in s.observation for piece in re.split(r"\n|\. ", scene)), s  # the scene, in pieces
        assert all(a in s.observation or s is not first and a in first.observation for a in s.actions)


needs_alfworld = pytest.mark.skipif(importlib.util.find_spec("alfworld") is None, reason="alfworld not installed")
needs_scienceworld = pytest.mark.skipif(
    importlib.util.find_spec("scienceworld") is None or shutil.which("java") is None, reason="scienceworld or java not installed")


def test_tinyworld_and_webshop_parts():
    from webshop import WebShop

    env = TinyWorld()
    demo = env.demo("test-0")  # (plays the episode to its end)
    first = env.reset("test-0")
    parts_agree(first, [env.step(a) for a in demo[:3]] + [env.step("fly")])
    assert first.task.startswith("move ") and not first.task.startswith("task:")
    shop = WebShop()
    demo = shop.demo("goal-0")
    first = shop.reset("goal-0")
    assert first.actions == ["search[...]"] and first.task == shop.goals[0]["instruction_text"]
    parts_agree(first, [shop.step(a) for a in demo[:2]] + [shop.step("click[nothing here]")])


@needs_alfworld
def test_alfworld_parts():
    from envs import AlfWorld

    env = AlfWorld()
    task = env.tasks("valid_seen")[0]
    demo, first = env.demo(task), env.reset(task)
    assert not first.task.startswith("Your task is to") and f"Your task is to: {first.task}" in first.observation
    assert "help" not in first.actions
    parts_agree(first, [env.step(a) for a in demo[:2]] + [env.step("fly")])
    env.close()


@needs_scienceworld
def test_scienceworld_parts():
    from envs import ScienceWorld

    env = ScienceWorld()
    try:
        first = env.reset("boil-21")
        assert first.task.startswith("Your task is to boil") and "teleport OBJ" in first.actions
        later = env.step("look around")
        assert later.actions == first.actions and "objects: " in later.observation
        parts_agree(first, [later])
    finally:
        env.close()
