"""What the model reads each turn, and how its reply becomes an action.

An episode is one growing chat: the first user message, the student's reply, the next user message, ... (rollout.py
turns it into one token stream). This file writes the user messages, in one of two styles:

  paper    the authors' templates (kokolerk/TCOD, trinity/common/workflows/envs/TCOD/{alfworld,webshop,scienceworld}/
           utils.py and the OPD_workflow.py beside each, which fills them), the default on ALFWorld, WebShop and
           ScienceWorld: their fields in their order, in our words (LAYOUTS). While fewer than HISTORY steps have been
           taken a reduced message: the current observation and the admissible actions (and, but on ALFWorld, the
           task); after that every message restates the task, says how many steps were taken, shows the last HISTORY
           (observation, action) pairs as text, then the current observation and the admissible actions. Each ends
           with the <think>/<action> instruction. The chat still accumulates (the earlier messages stay in context),
           as in their workflows; the text history is what the template itself shows.
  compact  ours, the default on TinyWorld (its tokenizer and shipped models were made with it): the instructions,
           task and first observation once, then `step t. <observation>` per turn.

Envs return Steps whose `task`, `scene`, `actions` and `objects` fields feed the paper style, and whose `observation`
is the compact text (envs.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from envs import Step

STYLES = ("paper", "compact")
HISTORY = 2  # (observation, action) pairs restated in each full paper-style message (the authors' HISTORY_LENGTH)
ACTION_RE = re.compile(r"<action>(.*?)</action>", re.DOTALL)
MAX_ACTION_CHARS = 200
NO_ACTION = "(no valid action)"  # what the text history shows for a reply the env could not use


def default_style(env_name: str) -> str:
    return "compact" if env_name.startswith("tinyworld") else "paper"


def how_to_reply(think: bool) -> str:
    if think:
        return "First reason step by step inside <think> </think>, then give exactly one action inside <action> </action>."
    return "Reply with exactly one action inside <action> </action>."


def first_prompt(env, goal_and_observation: str, think: bool) -> str:
    """The compact style's first message."""
    return f"{env.instructions}\n{how_to_reply(think)}\n\n{goal_and_observation}"


def turn_prompt(turn: int, observation: str) -> str:
    """The compact style's message after `turn` env steps."""
    return f"step {turn}. {observation}"


# ---- the paper style: one Layout per benchmark, the fields of the authors' template and their order


@dataclass(frozen=True)
class Layout:
    intro: str | None  # the first line, naming the world; None: the task line does (ScienceWorld)
    task: str  # the task line's lead
    task_when_reduced: bool  # False: the reduced message has no task line (ALFWorld: the first observation holds it)
    task_beside_intro: bool  # the full message puts the task on the intro's line (ALFWorld)
    actions: str  # how the admissible actions are listed (list_actions)
    actions_label: str  # what the list is called (ScienceWorld's are templates: "action commands", objects apart)
    history_on_one_line: bool  # a history observation's lines joined by spaces (WebShop: its pages are many lines)
    act: str  # the sentence before the reply format: what an action is here


LAYOUTS = {
    # ALFWORLD_TEMPLATE(_NO_HIS): intro (+ task in the full one) / [count + history] / observation / actions, quoted,
    # one per line / turn + reply format. The reduced one has no task: it is in the first raw observation.
    "alfworld": Layout("You are an agent in an ALFWorld household, acting through text commands.", "Your task: ",
                       task_when_reduced=False, task_beside_intro=True, actions="quoted-lines",
                       actions_label="The actions you can take now", history_on_one_line=False,
                       act="Pick one of the listed actions."),
    # WEBSHOP_TEMPLATE(_NO_HIS): intro / task / [count + history] / observation / actions, one per line between
    # brackets on lines of their own / turn + reply format. History pages compacted to one line (_compact_text).
    "webshop": Layout("You are an agent shopping on the WebShop web store.", "Your task: ", task_when_reduced=True,
                      task_beside_intro=False, actions="lines", actions_label="The actions you can take now",
                      history_on_one_line=True,
                      act="Pick the listed action that best moves you towards the purchase described."),
    # SCIWORLD_TEMPLATE(_NO_HIS): task (naming the world; no intro) / [count + history] / observation / action
    # commands, quoted, comma separated / objects, the same / turn + how to combine them + reply format.
    "scienceworld": Layout(None, "Your task in ScienceWorld: ", task_when_reduced=True, task_beside_intro=False,
                           actions="quoted-commas", actions_label="Action commands", history_on_one_line=False,
                           act="Make your action from one action command, its OBJ filled with objects from the list."),
}


def layout(env) -> Layout:
    """The env's Layout; any other env (TinyWorld) gets WebShop's field order with its own instructions as intro."""
    return LAYOUTS.get(env.name) or Layout(
        env.instructions, "Your task: ", task_when_reduced=True, task_beside_intro=False, actions="quoted-lines",
        actions_label="The actions you can take now", history_on_one_line=False, act="Pick one of the listed actions.")


def list_actions(items: list[str], how: str) -> str:
    """A bracketed list as each template writes it: quoted-lines ['a'\n 'b'] (ALFWorld), lines [\na\nb\n]
    (WebShop), quoted-commas ['a', 'b'] (ScienceWorld)."""
    if how == "quoted-lines":
        return "[" + "\n ".join(f"'{a}'" for a in items) + "]"
    if how == "lines":
        return "[\n" + "\n".join(items) + "\n]"
    return "[" + ", ".join(f"'{a}'" for a in items) + "]"


def paper_prompt(env, task: str, turn: int, history: list[tuple[str, str]], scene: str, step: Step,
                 think: bool) -> str:
    """The paper style's message after `turn` env steps; history holds the (observation, action) pairs of those
    steps, scene the current observation, step the Step it came with (its actions and objects)."""
    lay = layout(env)
    reduced = turn < HISTORY  # the authors switch on len(history) < HISTORY_LENGTH
    lines = [] if lay.intro is None else [lay.intro]
    if lay.task_when_reduced or not reduced:
        if lay.task_beside_intro and lines:
            lines[0] += f" {lay.task}{task}"
        else:
            lines.append(f"{lay.task}{task}")
    if reduced:
        lines.append(f"What you observe now: {scene}")
    else:
        shown = history[-HISTORY:]
        flat = (lambda text: " ".join(x.strip() for x in text.splitlines() if x.strip())) if lay.history_on_one_line \
            else str.strip
        records = "\n".join(f"[Observation {t}: '{flat(seen)}', Action {t}: '{action}']"
                             for t, (seen, action) in enumerate(shown, start=turn - len(shown) + 1))
        lines.append(f"You have taken {turn} step(s) so far. The last {len(shown)} observations and the action you "
                     f"took after each: {records}")
        lines.append(f"Now, at step {turn + 1}, you observe: {scene}")
    if step.actions is not None:
        lines.append(f"{lay.actions_label}: {list_actions(step.actions, lay.actions)}")
    if step.objects is not None:
        lines.append(f"Objects you can act on: {list_actions(step.objects, lay.actions)}")
    lines += ["", f"It is your turn to act. {lay.act}", how_to_reply(think)]
    return "\n".join(lines)


class Prompter:
    """The user messages of one episode, in one style: `first(step)` after reset, then `after(action, step)` each
    turn, with the action the env took (None when the reply gave no usable action) and the Step it answered."""

    def __init__(self, style: str, env, think: bool):
        if style not in STYLES:
            raise ValueError(f"unknown prompt style {style!r}: use one of {STYLES}")
        self.style, self.env, self.think = style, env, think
        self.task, self.turn, self.history, self.last = "", 0, [], None

    def _scene(self, step: Step) -> str:
        return step.observation if step.scene is None else step.scene

    def _paper(self, step: Step) -> str:
        return paper_prompt(self.env, self.task, self.turn, self.history, self._scene(step), step, self.think)

    def first(self, step: Step) -> str:
        self.task, self.turn, self.history, self.last = step.task, 0, [], step
        return first_prompt(self.env, step.observation, self.think) if self.style == "compact" else self._paper(step)

    def after(self, action: str | None, step: Step) -> str:
        self.history.append((self._scene(self.last), action or NO_ACTION))
        self.turn, self.last = self.turn + 1, step
        return turn_prompt(self.turn, step.observation) if self.style == "compact" else self._paper(step)


def refused(last: Step, why: str) -> Step:
    """The env's answer to a reply with no usable action: nothing changes, the model is told why."""
    scene = None if last.scene is None else f"invalid reply: {why}. {last.scene}"
    return Step(f"invalid reply: {why}. {last.observation}", valid=False, task=last.task, scene=scene,
                actions=last.actions, objects=last.objects)


def format_reply(action: str) -> str:
    """The assistant message for a replayed (B2F) or demonstrated action."""
    return f"<action>{action}</action>"


def parse_action(text: str) -> tuple[str | None, str]:
    """The action in a reply, or (None, why) when there is not exactly one usable action."""
    found = ACTION_RE.findall(text)
    if not found:
        return None, "no <action>...</action> in the reply"
    if len(found) > 1:
        return None, f"{len(found)} actions in one reply; give exactly one"
    action = " ".join(found[0].split())
    if not action:
        return None, "the action is empty"
    if len(action) > MAX_ACTION_CHARS:
        return None, f"the action is longer than {MAX_ACTION_CHARS} characters"
    return action, ""
