"""Environments behind one interface: a built-in world for CPU runs, and the real benchmarks.

Every env is a plain Python object with
    tasks(split) -> list of task ids        (fixed order: eval panels are reproducible)
    reset(task)  -> Step                    (Step.observation holds the goal and the first observation)
    step(action) -> Step                    (observation, done, success, score, valid)
    demo(task)   -> list of actions | None  (a successful demonstration, for B2F and SFT)
    task_type(task) -> str                  (for per-type breakdowns)
    close()
and the class attributes `name`, `max_turns` (the paper's T_max), `splits`, `eval_splits`, `instructions`.
An observation already carries the admissible actions (or their compact form), so the loop needs no
env-specific formatting. Prompts are built here too, so every benchmark speaks to the model the same way.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field


@dataclass
class Step:
    observation: str
    done: bool = False
    success: bool = False  # a real success (won / score 100 / reward 1.0), never just "the episode ended"
    score: float = 0.0  # the benchmark's own score (WebShop reward, ScienceWorld score/100); 1.0 = success
    valid: bool = True  # False when the env could not use the action
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Prompts and replies. The structure follows the paper's (verl-agent style) prompts: task, steps taken,
# history, current observation, admissible actions, and the <think>/<action> instruction. The history is
# not re-written into each prompt: the episode is one growing chat, so earlier turns are already there.

ACTION_RE = re.compile(r"<action>(.*?)</action>", re.DOTALL)
MAX_ACTION_CHARS = 200


def first_prompt(env, goal_and_observation: str, think: bool) -> str:
    how = (
        "First reason step by step inside <think> </think>, then give exactly one action inside <action> </action>."
        if think
        else "Reply with exactly one action inside <action> </action>."
    )
    return f"{env.instructions}\n{how}\n\n{goal_and_observation}"


def turn_prompt(turn: int, observation: str) -> str:
    return f"step {turn}. {observation}"


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


# --------------------------------------------------------------------------------------------------
# TinyWorld: an ALFWorld-like household, small enough that a 1M-parameter model learns it in minutes.
# Rooms have places (some closed), objects lie on them, and a task asks to move three objects, one after
# another. Each observation says where the agent is, what it sees and holds, the next unfinished move and
# the admissible actions, so the right action is readable from the latest message; what makes it hard is
# the horizon (12-18 expert steps of 20): a wrong take or put changes the state and later turns inherit it.

PLACES = ["table", "shelf", "sink", "fridge", "drawer", "cabinet", "desk", "counter", "bed", "sofa"]
OPENABLE = {"fridge", "drawer", "cabinet"}
OBJECTS = ["apple", "cup", "key", "book", "pen", "plate", "sock", "phone", "mug", "egg"]
TEST_SEED_OFFSET = 1_000_000  # test layouts come from seeds no train task uses


class TinyWorld:
    name = "tinyworld"
    max_turns = 20
    splits = ("train", "test")
    eval_splits = ("test",)
    instructions = "You are in a house. Move each object to its place, one at a time."
    n_places, n_objects, n_goals = 5, 4, 3

    def __init__(self, n_train: int = 5000, n_test: int = 200):
        self.n = {"train": n_train, "test": n_test}

    def tasks(self, split: str) -> list[str]:
        if split not in self.n:
            raise ValueError(f"tinyworld has splits {self.splits}, not {split!r}")
        return [f"{split}-{i}" for i in range(self.n[split])]

    def task_type(self, task: str) -> str:
        return "move3"

    def _layout(self, task: str):
        split, i = task.rsplit("-", 1)
        rng = random.Random(int(i) + (TEST_SEED_OFFSET if split == "test" else 0))
        places = rng.sample(PLACES, self.n_places)
        objects = rng.sample(OBJECTS, self.n_objects)
        where = {o: rng.choice(places) for o in objects}
        goals = [(o, rng.choice([p for p in places if p != where[o]])) for o in rng.sample(objects, self.n_goals)]
        return places, where, goals, rng.choice(places)

    def reset(self, task: str) -> Step:
        self.places, self.where, self.goals, self.here = self._layout(task)
        self.closed = {p for p in self.places if p in OPENABLE}
        self.hand = None
        goal = "task: move " + ", ".join(f"{o} to {p}" for o, p in self.goals) + "."
        return Step(f"{goal}\n{self._observe()}")

    def _next_goal(self):
        return next(((o, p) for o, p in self.goals if self.where.get(o) != p), None)

    def admissible(self) -> list[str]:
        acts = [f"go {p}" for p in self.places if p != self.here]
        if self.here in self.closed:
            return acts + [f"open {self.here}"]
        if self.hand is None:
            return acts + [f"take {o}" for o, p in self.where.items() if p == self.here]
        return acts + [f"put {self.hand}"]

    def _observe(self) -> str:
        if self.here in self.closed:
            seen = f"the {self.here} is closed."
        else:
            things = [o for o, p in self.where.items() if p == self.here]
            seen = f"you see {', '.join(things)}." if things else "you see nothing."
        hold = f"hand: {self.hand or 'empty'}."
        o, p = self._next_goal()
        at = "in hand" if self.hand == o else f"at {self.where[o]}"
        return f"at {self.here}. {seen} {hold} next: {o} {at} to {p}. actions: {', '.join(self.admissible())}."

    def step(self, action: str) -> Step:
        if action not in self.admissible():
            return Step(f"nothing happens. {self._observe()}", valid=False)
        verb, arg = action.split(" ", 1)
        if verb == "go":
            self.here = arg
        elif verb == "open":
            self.closed.discard(arg)
        elif verb == "take":
            self.hand = arg
            self.where[arg] = None
        else:  # put
            self.where[arg], self.hand = self.here, None
        if self._next_goal() is None:
            return Step("done.", done=True, success=True, score=1.0)
        return Step(self._observe())

    def expert(self) -> str:
        """The optimal action from the current state (also from states off the expert's path)."""
        obj, dest = self._next_goal()
        if self.here in self.closed:
            return f"open {self.here}"
        if self.hand is not None and self.hand != obj:
            return f"put {self.hand}"  # wrong object in hand: set it down first
        if self.hand == obj:
            return f"put {obj}" if self.here == dest else f"go {dest}"
        return f"take {obj}" if self.where[obj] == self.here else f"go {self.where[obj]}"

    def demo(self, task: str) -> list[str]:
        actions, step = [], self.reset(task)
        while not step.done:
            actions.append(self.expert())
            step = self.step(actions[-1])
        return actions

    def close(self):
        pass


ENVS = {"tinyworld": TinyWorld}


def make_env(name: str, **kwargs):
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; choose one of {sorted(ENVS)}")
    return ENVS[name](**kwargs)
