"""TinyWorld: an ALFWorld-like household, small enough that a 1M-parameter model learns it in minutes.
Rooms have places (some closed), objects lie on them, and a task asks to move three objects, one after
another. Each observation says where the agent is, what it sees and holds, the next unfinished move and
the admissible actions, so the right action is readable from the latest message; what makes it hard is
the horizon (12-18 expert steps of 20): a wrong take or put changes the state and later turns inherit it.

Two variants test the paper's mechanism: TinyWorldRecall (the state must be remembered) and TinyWorldDrift (one
detour changes every later observation). The env interface is in envs.py.
"""

from __future__ import annotations

import random

from envs import Step

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
        goal = "move " + ", ".join(f"{o} to {p}" for o, p in self.goals) + "."
        step = self._observe()
        step.observation, step.task = f"task: {goal}\n{step.observation}", goal
        return step

    def _next_goal(self):
        return next(((o, p) for o, p in self.goals if self.where.get(o) != p), None)

    def admissible(self) -> list[str]:
        acts = [f"go {p}" for p in self.places if p != self.here]
        if self.here in self.closed:
            return acts + [f"open {self.here}"]
        if self.hand is None:
            return acts + [f"take {o}" for o, p in self.where.items() if p == self.here]
        return acts + [f"put {self.hand}"]

    def _things_here(self) -> str:
        return ", ".join(o for o, p in self.where.items() if p == self.here) or "nothing"

    def _observe(self, before: str = "") -> Step:
        seen = f"at {self.here}, closed." if self.here in self.closed else f"at {self.here}, you see {self._things_here()}."
        o, p = self._next_goal()
        # What decides the action comes last, in a fixed shape, with "here" in place of the current location, so
        # that a tiny model reads the decision off fixed offsets instead of comparing place names.
        src = "hand" if self.hand == o else ("here" if self.where[o] == self.here else self.where[o])
        dest = "here" if p == self.here else p
        scene, actions = f"{before}{seen} hand: {self.hand or 'empty'}. next: {o} from {src} to {dest}.", self.admissible()
        return Step(f"{before}actions: {', '.join(actions)}. {scene[len(before):]}", scene=scene, actions=actions)

    def step(self, action: str) -> Step:
        if action not in self.admissible():
            step = self._observe("nothing happens. ")
            step.valid = False
            return step
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
        return self._observe()

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


class TinyWorldRecall(TinyWorld):
    """TinyWorld where early errors compound (the CPU reproduction's test of the paper's mechanism, docs/reproduction.md).

    The first message lists where every object lies; later observations name the next move's object and destination
    but no longer where the object is. The source must be read from the first message, which stays true only while
    the plan is kept: an object taken by mistake, carried off and put down elsewhere makes the first message stale for
    it, and every later turn that needs that object must be answered from the chat's own history instead, states a
    teacher trained on expert paths has never seen. Same layouts, actions, expert and horizon as TinyWorld."""

    name = "tinyworld-recall"

    def reset(self, task: str) -> Step:
        step = super().reset(task)
        layout = "objects: " + ", ".join(f"{o} at {p}" for o, p in self.where.items()) + "."
        step.observation = f"task: {step.task}\n{layout}\n{step.observation.split(chr(10), 1)[1]}"
        return step

    def _observe(self, before: str = "") -> Step:
        step = super()._observe(before)
        o, p = self._next_goal()
        dest = "here" if p == self.here else p
        cut = lambda text: text[: text.index(" next: ")] + f" next: {o} to {dest}."  # the source is gone
        step.observation, step.scene = cut(step.observation), cut(step.scene)
        return step


class TinyWorldDrift(TinyWorld):
    """TinyWorld where one early error changes every later turn (the CPU reproduction's test of the paper's mechanism).

    Written before any model was trained on it. The paper's account of vanilla OPD's collapse: the student's errors
    compound, it leaves the states the teacher knows, and there the teacher's per-token scores mislead it. In TinyWorld
    an off-path state looks like an on-path one (the observation names the next move in the same form), so a teacher
    trained on expert paths only still acts well there (support.py: tiny-teacher-norec 1.00 / 0.97 / 0.92 / 0.91).
    Here, while every action taken was the expert's, the world reads as TinyWorld; the first other action (a valid
    detour or an invalid one) puts the episode off plan for good, and every later observation comes in another form:
    "hand: empty. you see apple at shelf. Move apple to sink from here. actions: go sink, take apple."
    The same facts and the same decision, read the same way (the object, where it is: here / hand / a place, where it
    goes), but with its fields in another order and other words. A teacher trained on expert paths has never seen
    that form: after one student error its scores cover states outside its support, for the rest of the episode. A
    teacher trained with recovery data (random actions and the expert's fixes, sft.py --noise) has seen both forms.
    Same layouts, actions, expert and horizon as TinyWorld.

    Every word of the off-plan form is a whole word of the tiny tokenizer (test_envs). The first form ("off plan.
    wanted: apple to sink, now here. at shelf, ...") used words the tokenizer splits into single characters, and the
    recovery-data teacher trained on it solved none of the held-out layouts (docs/reproduction.md)."""

    name = "tinyworld-drift"

    def reset(self, task: str) -> Step:
        self.off_plan = False
        return super().reset(task)

    def step(self, action: str) -> Step:
        self.off_plan = self.off_plan or action != self.expert()
        return super().step(action)

    def _observe(self, before: str = "") -> Step:
        step = super()._observe(before)
        if not self.off_plan:
            return step
        o, p = self._next_goal()
        src = "hand" if self.hand == o else ("here" if self.where[o] == self.here else self.where[o])
        seen = f"at {self.here}: closed." if self.here in self.closed else f"you see {self._things_here()} at {self.here}."
        scene = f"{before}hand: {self.hand or 'empty'}. {seen} Move {o} to {'here' if p == self.here else p} from {src}."
        return Step(f"{scene} actions: {', '.join(step.actions)}.", scene=scene, actions=step.actions)
