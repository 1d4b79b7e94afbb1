"""What the model reads each turn, and how its reply becomes an action.

An episode is one growing chat: the first user message, the student's reply, the next user message, ... (rollout.py
turns it into one token stream). This file writes the user messages, in one of two styles:

  paper    the paper's (verl-agent style) template, the default on ALFWorld, WebShop and ScienceWorld: every message
           restates the instructions and the task, says how many steps were taken, shows the last HISTORY
           (observation, action) pairs as text, then the current observation, the admissible actions and the
           <think>/<action> instruction. The chat still accumulates (the earlier messages stay in context), as in
           the paper; the text history is what the template itself shows.
  compact  ours, the default on TinyWorld (its tokenizer and shipped models were made with it): the instructions,
           task and first observation once, then `step t. <observation>` per turn.

The wording is ours; the structure (and the 2-step history) is the paper's. Envs return Steps whose `task`, `scene`
and `actions` fields feed the paper style, and whose `observation` is the compact text (envs.py).
"""

from __future__ import annotations

import re

from envs import Step

STYLES = ("paper", "compact")
HISTORY = 2  # (observation, action) pairs restated in each paper-style message (the paper's history length)
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


def paper_prompt(env, task: str, turn: int, history: list[tuple[str, str]], scene: str, actions: list[str] | None,
                 think: bool) -> str:
    """The paper style's message after `turn` env steps; history holds the (observation, action) pairs of those steps."""
    lines = [env.instructions, f"Your task: {task}"]
    if turn == 0:
        lines.append("You have not taken any step yet.")
    else:
        shown = history[-HISTORY:]
        lines.append(f"You have taken {turn} step(s) so far. The last {len(shown)}, oldest first:")
        for t, (seen, action) in enumerate(shown, start=turn - len(shown) + 1):
            lines.append(f"[step {t}] observation: {seen}\n[step {t}] your action: {action}")
    lines.append(f"Now, at step {turn + 1}, you observe: {scene}")
    if actions is not None:
        lines.append(f"Admissible actions: {', '.join(actions)}.")
    lines.append(how_to_reply(think))
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
        return paper_prompt(self.env, self.task, self.turn, self.history, self._scene(step), step.actions, self.think)

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
    return Step(f"invalid reply: {why}. {last.observation}", valid=False, task=last.task, scene=scene, actions=last.actions)


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
