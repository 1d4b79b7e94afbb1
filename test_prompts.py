"""The prompt styles (prompts.py): the rendered text of a turn against the template, one token stream per episode in
either style, and the Step parts (task, scene, actions) each benchmark gives the paper template."""

import importlib.util
import re
import shutil

import pytest

import rollout
import tcod
from curriculum import Plan
from envpool import EnvPool
from envs import Step
from prompts import NO_ACTION, Prompter, default_style, how_to_reply, refused
from test_faults import scripted  # noqa: F401  (fixture)
from test_tcod import chat, model_dirs, tok  # noqa: F401  (fixtures)
from tinyworld import TinyWorld

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


def test_paper_style_reduced_then_full_message():
    """TinyWorld has no template of the authors': it gets WebShop's field order with its own instructions. Fewer than
    2 steps taken: the reduced message (no count, no history); then count, the last 2 pairs, the step number."""
    env = TinyWorld()
    p, step = Prompter("paper", env, think=True), env.reset("train-1")
    how = "First reason step by step inside <think> </think>, then give exactly one action inside <action> </action>."
    task = "Your task: move mug to fridge, egg to table, phone to drawer."
    close = ["", "It is your turn to act. Pick one of the listed actions.", how]
    obs0 = "at fridge, closed. hand: empty. next: mug from sink to here."
    assert p.first(step) == "\n".join([
        INSTR, task, f"What you observe now: {obs0}",
        "The actions you can take now: ['go sink'\n 'go shelf'\n 'go drawer'\n 'go table'\n 'open fridge']", *close])
    obs1 = "at fridge, you see nothing. hand: empty. next: mug from sink to here."
    s1 = env.step("open fridge")
    assert p.after("open fridge", s1) == "\n".join([
        INSTR, task, f"What you observe now: {obs1}",
        "The actions you can take now: ['go sink'\n 'go shelf'\n 'go drawer'\n 'go table']", *close])
    # a reply with no action: the env is not stepped, the model is told why, the history shows no action
    bad = refused(s1, "no <action>...</action> in the reply")
    assert not bad.valid and bad.actions == s1.actions and "invalid reply: no <action>" in bad.observation
    p.after(None, bad)
    third = p.after("go sink", env.step("go sink"))
    assert third == "\n".join([
        INSTR, task,
        "You have taken 3 step(s) so far. The last 2 observations and the action you took after each: "  # only 2 pairs
        f"[Observation 2: '{obs1}', Action 2: '{NO_ACTION}']",
        f"[Observation 3: 'invalid reply: no <action>...</action> in the reply. {obs1}', Action 3: 'go sink']",
        "Now, at step 4, you observe: at sink, you see egg, mug. hand: empty. next: mug from here to fridge.",
        "The actions you can take now: ['go shelf'\n 'go drawer'\n 'go table'\n 'go fridge'\n 'take egg'\n 'take mug']",
        *close])
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
    assert "You have taken 2 step(s) so far. The last 2 observations and the action you took after each: " \
        "[Observation 1: '" in rendered  # after the replayed turns
    assert how_to_reply(False) in rendered


@pytest.mark.parametrize("style", ["paper", "compact"])
def test_prompt_cost_counts_the_rollouts_stream(tok, chat, scripted, style):  # noqa: F811
    """prompt_cost.py (the context-cost figures in docs/benchmarks.md) counts exactly the tokens of the stream a rollout makes."""
    import prompt_cost

    env, task = TinyWorld(), "train-3"
    demo = env.demo(task)
    replies = iter(demo)
    scripted.script = staticmethod(lambda text: tok(f"<action>{next(replies)}</action>", add_special_tokens=False)
                                   ["input_ids"] + [chat.eos])
    (ep,) = rollout.rollout(None, chat, EnvPool("tinyworld", {}, 0), env, [task], [Plan(0, 20)], [None],
                            temperature=1.0, max_new_tokens=64, max_turns=20, max_context=1 << 16, think=True,
                            prompt=style, generator=None)
    assert ep.success and prompt_cost.stream_tokens(tok, env, task, demo, style, think=True) == (len(ep.ids), ep.turns)


# ---- each benchmark gives the parts the paper template lays out, consistent with its compact text

RICH_MARKS = re.compile(r"^You have clicked .*\n|\[(?:clicked )?button\] | \[(?:clicked )?button_\]", re.M)


def parts_agree(first: Step, later: list[Step]):
    assert first.task and first.task in first.observation
    for s in [first, *later]:
        assert s.actions, s
        scene = s.observation if s.scene is None else s.scene  # None: the observation is the scene
        scene = RICH_MARKS.sub("", scene)  # WebShop's scene is the rich text: the same strings, marked
        assert all(piece in s.observation for piece in re.split(r"\n|\. ", scene)), s  # the scene, in pieces
        assert all(a in s.observation or s is not first and a in first.observation for a in s.actions)
        assert all(o in s.observation for o in s.objects or [])


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
    parts_agree(first, [shop.step(a) for a in demo[:3]] + [shop.step("click[nothing here]")])


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


# ---- the paper style against the authors' templates: a fixed state of each benchmark, its messages' fields,
# their order and the lists' format

# The spec, written from the authors' templates (kokolerk/TCOD, trinity/common/workflows/envs/TCOD/alfworld/utils.py
# ALFWORLD_TEMPLATE_NO_HIS / ALFWORLD_TEMPLATE, webshop/utils.py WEBSHOP_TEMPLATE_NO_HIS / WEBSHOP_TEMPLATE,
# scienceworld/utils.py SCIWORLD_TEMPLATE_NO_HIS / SCIWORLD_TEMPLATE; the OPD_workflow.py beside each picks the reduced
# one while len(history) < 2): each message's fields in their order, (reduced, full).
THEIRS = {
    "alfworld": (("intro", "observation", "actions", "turn", "reply"),
                 ("intro", "task", "count", "history", "step", "observation", "actions", "turn", "reply")),
    "webshop": (("intro", "task", "observation", "actions", "turn", "reply"),
                ("intro", "task", "count", "history", "step", "observation", "actions", "turn", "reply")),
    "scienceworld": (("task", "observation", "actions", "objects", "turn", "reply"),
                     ("task", "count", "history", "step", "observation", "actions", "objects", "turn", "reply")),
}
# where each field opens, in our wording
OURS = {
    "intro": r"^You are an agent ",
    "task": r"Your task(?: in ScienceWorld)?: ",
    "count": r"^You have taken \d+ step\(s\) so far",
    "history": r"\[Observation \d+: '",
    "step": r"^Now, at step \d+, ",
    "observation": r"(?:^What you observe now|you observe): ",
    "actions": r"^(?:The actions you can take now|Action commands): \[",
    "objects": r"^Objects you can act on: \[",
    "turn": r"(?<=\n\n)It is your turn to act\. ",  # after a blank line, as theirs
    "reply": r"inside <action> </action>\.\Z",
}


def fields(message: str) -> tuple[str, ...]:
    found = [(m.start(), name) for name, rx in OURS.items() if (m := re.search(rx, message, re.M))]
    return tuple(name for _, name in sorted(found))


def records(pairs: list[tuple[str, str]], first: int) -> str:
    """Their history: one "[Observation t: '...', Action t: '...']" per pair, a line each, after the count's colon."""
    return "\n".join(f"[Observation {t}: '{o}', Action {t}: '{a}']" for t, (o, a) in enumerate(pairs, start=first))


def play(env, task: str, actions: list[str], think: bool = True) -> tuple[list[str], list[Step]]:
    p, steps = Prompter("paper", env, think), [env.reset(task)]
    messages = [p.first(steps[0])]
    for a in actions:
        steps.append(env.step(a))
        assert steps[-1].valid and not steps[-1].done, a
        messages.append(p.after(a, steps[-1]))
    return messages, steps


@needs_alfworld
def test_alfworld_paper_prompt_is_the_authors_template():
    from envs import AlfWorld

    env = AlfWorld()
    task = "valid_seen/look_at_obj_in_light-AlarmClock-None-DeskLamp-323/trial_T20190909_044715_250790"
    try:
        acts = env.demo(task)[:2]  # go to desk 1, use desklamp 1
        messages, steps = play(env, task, acts)
    finally:
        env.close()
    reduced, full = THEIRS["alfworld"]
    assert [fields(m) for m in messages] == [reduced, reduced, full]
    goal = "Your task is to: look at alarmclock under the desklamp."
    # the task is inside the first raw observation (the room, then the task line) and nowhere else before step 3
    assert steps[0].scene.startswith("You are in the middle of a room.") and steps[0].scene.endswith(f"\n\n{goal}")
    assert steps[0].observation.split("\n")[:2] == [goal, steps[0].scene.split("\n\n")[0]]  # compact: unchanged
    assert f"What you observe now: {steps[0].scene}\n" in messages[0] and "Your task: " not in messages[0]
    assert "task" not in messages[1].lower()
    assert messages[2].split("\n")[0] == (
        "You are an agent in an ALFWorld household, acting through text commands. "
        "Your task: look at alarmclock under the desklamp.")  # the full one: intro and task on one line
    history = records([(steps[0].scene, acts[0]), (steps[1].scene, acts[1])], 1)
    assert f"You have taken 2 step(s) so far. The last 2 observations and the action you took after each: {history}\n" \
        in messages[2] and goal in history
    assert f"\nNow, at step 3, you observe: {steps[2].scene}\n" in messages[2]
    for m, s in zip(messages, steps):  # admissible actions: quoted, one per line, in brackets
        assert "\nThe actions you can take now: [" + "\n ".join(f"'{a}'" for a in s.actions) + "]\n" in m
        assert "'help'" not in m


def test_webshop_paper_prompt_is_the_authors_template():
    from webshop import WebShop

    env = WebShop()
    acts = ["search[sweatyrocks oversized sweater]", "click[b09krlgsc5]", "click[mocha brown]"]
    messages, steps = play(env, "goal-2", acts)
    reduced, full = THEIRS["webshop"]
    assert [fields(m) for m in messages] == [reduced, reduced, full, full]
    intro, task = "You are an agent shopping on the WebShop web store.", f"Your task: {env.goals[2]['instruction_text']}"
    assert all(m.startswith(f"{intro}\n{task}\n") for m in messages)
    assert all(env.instructions not in m and "Buy Now;" not in m and "[SEP]" not in m for m in messages)  # no advice
    # the page is the rich text: the option just picked is marked, and the history keeps each page on one line
    assert "\n[clicked button] mocha brown [clicked button_]\n" in messages[3]
    assert f"Now, at step 4, you observe: {steps[3].scene}\n" in messages[3]
    flat = lambda page: " ".join(page.split("\n"))  # noqa: E731
    history = records([(flat(steps[1].scene), acts[1]), (flat(steps[2].scene), acts[2])], 2)
    assert f"You have taken 3 step(s) so far. The last 2 observations and the action you took after each: {history}\n" \
        in messages[3]
    for m, s in zip(messages, steps):  # admissible actions: one per line, between brackets on lines of their own
        assert "\nThe actions you can take now: [\n" + "\n".join(s.actions) + "\n]\n" in m


@needs_scienceworld
def test_scienceworld_paper_prompt_is_the_authors_template():
    from envs import ScienceWorld

    env = ScienceWorld()
    try:
        messages, steps = play(env, "boil-21", ["look around", "teleport to kitchen"], think=False)
        objects = env.sim.get_possible_objects()
    finally:
        env.close()
    reduced, full = THEIRS["scienceworld"]
    assert [fields(m) for m in messages] == [reduced, reduced, full]
    assert all(m.startswith(f"Your task in ScienceWorld: {steps[0].task}\n") for m in messages)
    # objects: a list of their own, apart from the action commands and from the observation
    assert steps[2].objects == objects and "kitchen" in objects and "objects: " not in steps[2].scene
    assert refused(steps[2], "why").objects == objects
    for m, s in zip(messages, steps):  # both lists quoted and comma separated, in brackets, a line each
        quoted = lambda items: "[" + ", ".join(f"'{x}'" for x in items) + "]"  # noqa: E731
        assert f"\nAction commands: {quoted(s.actions)}\nObjects you can act on: {quoted(s.objects)}\n" in m
        assert "\n\nIt is your turn to act. Make your action from one action command, its OBJ filled with objects " \
               "from the list.\n" in m  # theirs: combine an action command with objects
    history = records([(steps[0].scene.strip(), "look around"), (steps[1].scene.strip(), "teleport to kitchen")], 1)
    assert f"You have taken 2 step(s) so far. The last 2 observations and the action you took after each: {history}\n" \
        in messages[2]
