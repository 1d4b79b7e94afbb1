"""Environments behind one interface: a built-in world for CPU runs, and the real benchmarks.

Every env is a plain Python object with
    tasks(split) -> list of task ids        (fixed order: eval panels are reproducible)
    reset(task)  -> Step                    (Step.observation holds the goal and the first observation)
    step(action) -> Step                    (observation, done, success, score, valid)
    demo(task)   -> list of actions | None  (a successful demonstration, for B2F and SFT)
    task_type(task) -> str                  (for per-type breakdowns)
    close()
and the class attributes `name`, `max_turns` (the paper's T_max), `splits`, `eval_splits`, `instructions`.
An observation is the compact text (task, scene and admissible actions, or their compact form, in one string); a
Step also gives the task, scene, actions (and ScienceWorld's objects) apart, for the paper's prompt template. prompts.py writes both styles, so
the loop needs no env-specific formatting and every benchmark speaks to the model the same way.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path


@dataclass
class Step:
    observation: str
    done: bool = False
    success: bool = False  # a real success (won / score 100 / reward 1.0), never just "the episode ended"
    score: float = 0.0  # the benchmark's own score (WebShop reward, ScienceWorld score/100); 1.0 = success
    valid: bool = True  # False when the env could not use the action
    info: dict = field(default_factory=dict)
    # The parts of `observation` that the paper-style prompt lays out on its own (prompts.py): the task statement (set
    # by reset), what the agent observes without task and action list (None: the observation), the admissible actions,
    # and (ScienceWorld) the objects that fill the action templates' OBJ, a list of their own in the authors' template.
    task: str = ""
    scene: str | None = None
    actions: list[str] | None = None
    objects: list[str] | None = None


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


# --------------------------------------------------------------------------------------------------
# ALFWorld: household text games generated from ALFRED scenes (Shridhar et al., ICLR 2021), played through textworld's
# PDDL engine. The release's game files ship with the project (data/alfworld, see its README) and are unpacked on first
# use; a game file alone is enough to play, and it stores an optimal walkthrough, which is our demonstration.

ALFWORLD_TARBALLS = Path(__file__).parent / "data" / "alfworld"
ALFWORLD_CACHE = "~/.cache/tcod/alfworld"


def unpack_alfworld(tarball: Path, root: Path):
    """Extract `tarball` (json_2.1.1/<split>/...) under `root`, each split appearing whole or not at all.

    Extraction goes to a temp dir beside the target and each split folder is then renamed into place, so a killed
    unpack never leaves a half tree, and of two processes unpacking at once the second one's rename simply fails.
    """
    (root / "json_2.1.1").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as tmp:
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        for split_dir in (Path(tmp) / "json_2.1.1").iterdir():
            try:
                split_dir.rename(root / "json_2.1.1" / split_dir.name)
            except OSError:  # already there: another process finished first
                pass


class AlfWorld:
    """ALFWorld's text games: 3553 train, 140 valid_seen and 134 valid_unseen (new rooms) games of 6 task types.

    A task id is a game's folder below json_2.1.1, e.g. "valid_seen/pick_and_place_simple-Pencil-None-Dresser-330/
    trial_T20190909_071128_012892"; the task type is the first part of the folder name. Success is the game's `won`.
    Data: the `data` argument (a cache dir, unpacked into on first use), else $ALFWORLD_DATA when it holds an
    alfworld-download layout (json_2.1.1/), else ~/.cache/tcod/alfworld. The train games (304 MB unpacked) are only
    unpacked when train tasks are asked for.
    """

    name = "alfworld"
    max_turns = 30
    splits = ("train", "valid_seen", "valid_unseen")
    eval_splits = ("valid_seen", "valid_unseen")
    instructions = "You are an agent in a household. Reach the goal with one of the listed actions per turn."

    def __init__(self, data: str | None = None):
        self.data = data
        self.env = None  # the textworld game, built on the first reset
        self.admissible: list[str] = []

    def _split_dir(self, split: str) -> Path:
        if split not in self.splits:
            raise ValueError(f"alfworld has splits {self.splits}, not {split!r}")
        standard = os.environ.get("ALFWORLD_DATA")
        # importing alfworld sets $ALFWORLD_DATA to ~/.cache/alfworld when unset: only that default may be absent
        own_default = standard == os.path.expanduser("~/.cache/alfworld") and not (Path(standard) / "json_2.1.1").is_dir()
        if self.data is None and standard and not own_default:
            if not (Path(standard) / "json_2.1.1" / split).is_dir():  # a typo must not silently pick other games
                raise FileNotFoundError(
                    f"$ALFWORLD_DATA={standard!r} has no json_2.1.1/{split}/ (the alfworld-download layout): fix it, "
                    "or unset it to use the bundled games")
            return Path(standard) / "json_2.1.1" / split
        root = Path(self.data or ALFWORLD_CACHE).expanduser()
        if not (root / "json_2.1.1" / split).is_dir():
            tarball = "alfworld_train.tar.xz" if split == "train" else "alfworld_valid.tar.xz"
            unpack_alfworld(ALFWORLD_TARBALLS / tarball, root)
        return root / "json_2.1.1" / split

    def _game(self, task: str) -> Path:
        return self._split_dir(task.split("/")[0]).parent / task / "game.tw-pddl"

    def tasks(self, split: str) -> list[str]:
        folder = self._split_dir(split)
        games = sorted(f"{split}/{game.parent.parent.name}/{game.parent.name}" for game in folder.glob("*/*/game.tw-pddl"))
        if not games:
            raise FileNotFoundError(f"no ALFWorld games (*/*/game.tw-pddl) in {folder}: the data directory is empty or incomplete")
        return games

    def task_type(self, task: str) -> str:
        return task.split("/")[1].split("-")[0]

    def _observe(self, scene: str, **kw) -> Step:
        # 'help' only prints the command list, which the prompt already gives; 'look' and 'inventory' stay.
        actions = [a for a in self.admissible if a != "help"]
        return Step(f"{scene}\nactions: {', '.join(actions)}.", scene=scene, actions=actions, **kw)

    def reset(self, task: str) -> Step:
        if self.env is None:
            import textworld
            import textworld.envs
            from alfworld.agents.environment.alfred_tw_env import AlfredDemangler

            # AlfredDemangler turns PDDL ids into the names the game text uses ("drawer 3"). One PddlEnv is reused for
            # every game: each holds its own copy of the planner library, so several may live in one process.
            infos = textworld.EnvInfos(won=True, admissible_commands=True)
            self.env = AlfredDemangler(textworld.envs.PddlEnv(infos))
        self.env.load(str(self._game(task)))
        state = self.env.reset()  # grounds the PDDL problem: most of the ~2 s a reset costs
        self.admissible = state["admissible_commands"]
        # The intro reads "-= Welcome to TextWorld, ALFRED! =-\n\n<room>\n\nYour task is to: ...": drop the banner.
        # The scene keeps the task where the game puts it, as the authors' template shows the first observation (and
        # its first history entry) raw; the compact text puts the task first.
        room, goal = state.feedback.split("\n\n")[-2:]
        step = self._observe(f"{room}\n\n{goal}", task=goal.removeprefix("Your task is to: "))
        step.observation = f"{goal}\n{room}\nactions: {', '.join(step.actions)}."
        return step

    def step(self, action: str) -> Step:
        if action not in self.admissible:
            # The game would answer exactly this and change nothing; answering here saves its ~60 ms.
            return self._observe("Nothing happens.", valid=False)
        state, _, _ = self.env.step(action)
        self.admissible = state["admissible_commands"]
        if state["won"]:
            return Step(state.feedback, done=True, success=True, score=1.0)
        return self._observe(state.feedback)

    def demo(self, task: str) -> list[str]:
        return json.loads(self._game(task).read_text())["walkthrough"]

    def close(self):
        self.env = None


# --------------------------------------------------------------------------------------------------
# ScienceWorld: 30 task types of elementary-school science (boil water, grow a plant, test conductivity, ...) in a
# simulator written in Scala (Wang et al., EMNLP 2022), driven through py4j, one JVM per env object.

SCIENCEWORLD_JVM_OPTIONS = "-Xmx256m -XX:+UseSerialGC"  # 180-350 MB per JVM; the default heap grows to 0.5-1.2 GB
NO_MATCH = "No known action matches that input."  # the simulator's answer to input its parser cannot use


def scienceworld_task_list() -> list[dict]:
    """The package's list of the 30 task types (task_id "family-index", task_name), without starting a JVM."""
    import scienceworld

    return json.loads((Path(scienceworld.__file__).parent / "tasks.json").read_text())


# The authors' 17 training task types (kokolerk/TCOD, TCOD_examples/scienceworld/get_sciworld_data.py); the other 13
# of the 30 are held out. In task-id order.
TRAIN_TYPES = (
    "boil", "melt", "change-the-state-of-matter-of", "use-thermometer", "measure-melting-point-known-substance",
    "power-component", "test-conductivity", "find-living-thing", "find-plant", "grow-plant", "chemistry-mix",
    "chemistry-mix-paint-secondary-color", "lifespan-shortest-lived", "identify-life-stages-2",
    "inclined-plane-determine-angle", "inclined-plane-friction-named-surfaces", "mendelian-genetics-known-plant",
)


def held_out_types() -> set[str]:
    """The 13 held-out task types of split="type": every type that is not one of the authors' TRAIN_TYPES."""
    return {t["task_name"] for t in scienceworld_task_list()} - set(TRAIN_TYPES)


def check_java() -> None:
    """ScienceWorld runs in a JVM: without java every episode would fail one by one, so say so before anything starts."""
    if shutil.which("java") is None:
        raise RuntimeError("ScienceWorld needs java (a JDK 11+ on PATH), and none was found: e.g. apt-get install default-jre")


class ScienceWorld:
    """ScienceWorld, split by task type as the authors (or by the simulator's own variation splits), with (by
    default) the "easy" simplifications the authors load every task with (`simplifications=""`: the full simulator).

    split="type" (the authors' protocol, kokolerk/TCOD get_sciworld_data.py): their 17 training types (TRAIN_TYPES)
    and 13 held-out types, each on the first half of its variations, rounded down (variations 0 .. n // 2 - 1 of a
    type with n; for all 30 types the simulator's n equals the authors' table and its variations are 0 .. n - 1).
    "train" holds the training types' first halves, "dev" the rest of their variations (seen types, unseen
    variations; the authors have no dev set), "test" the held-out types' first halves. split="variation": "train",
    "dev" and "test" are the simulator's own splits of every type's variations. `task_types` restricts every split to
    those types.

    "easy", as the simulator resolves it (get_simplifications_used()): teleportAction (a "teleport to LOC" action),
    openDoors (every door starts open) and selfWateringFlowerPots, plus noElectricalAction (the electrical actions
    removed) on every task but the four electrical ones (power-component, power-component-renewable-vs-nonrenewable-
    energy, test-conductivity, test-conductivity-of-unknown-substances). openContainers is not part of it.

    A task id is "<task name>-<variation>", e.g. "boil-3". Score runs from -100 to 100: Step.score is score/100, success
    is a score of 100, and a negative score (a wrong `focus on`) ends the episode as a failure. The full list of valid
    actions is 12k+ characters, so an observation shows the action templates (first observation only in the compact
    text: they never change; every turn in the paper prompt) and the objects in view (Step.objects: the paper prompt
    lists them apart from the templates, as the authors' template does).
    A JVM that dies (or a simulator that throws) ends the episode as a failure with info["error"]; the next reset
    starts a new JVM.
    """

    name = "scienceworld"
    max_turns = 30
    splits = ("train", "dev", "test")
    eval_splits = ("test",)
    instructions = "You are an agent in a world of science experiments. Complete the task with one action per turn."
    _variations: dict[str, tuple[list[int], ...]] = {}  # task name -> its train/dev/test variations (any JVM agrees)

    def __init__(self, task_types: list[str] | None = None, simplifications: str = "easy", split: str = "type"):
        check_java()
        if split not in ("type", "variation"):
            raise ValueError(f"scienceworld split {split!r}: use 'type' (the paper's) or 'variation' (the simulator's)")
        self.split = split
        # "easy" (see the class docstring) is how the authors load every task; "" is the simulator's full difficulty
        # (the gold paths of 14 of the 30 types' first test variations exceed T_max 30 either way: easy shortens
        # boil, melt and freeze by about 30 actions).
        self.task_types, self.simplifications = task_types, simplifications
        self.sim = None  # the scienceworld.ScienceWorldEnv, started on first use
        self.templates = None  # the action templates of the loaded task
        self.error = None  # why the JVM is unusable, when it is

    def _simulator(self):
        """The simulator, with a new JVM when there is none yet or the last one failed."""
        if self.sim is None or self.error or self.sim._gateway.java_process.poll() is not None:
            self.close()
            from scienceworld import ScienceWorldEnv

            os.environ.setdefault("JAVA_TOOL_OPTIONS", SCIENCEWORLD_JVM_OPTIONS)  # read by the JVM at start
            # py4j logs a traceback for every call to a dead JVM (even garbage collection); we report it once instead.
            logging.getLogger("py4j").setLevel(logging.CRITICAL)
            # envStepLimit: the wrapper's default of 100 would cut gold paths; our own max_turns is the limit.
            self.sim, self.error = ScienceWorldEnv("", envStepLimit=10**6), None
        return self.sim

    def tasks(self, split: str) -> list[str]:
        if split not in self.splits:
            raise ValueError(f"scienceworld has splits {self.splits}, not {split!r}")
        names = self.task_types or sorted(t["task_name"] for t in scienceworld_task_list())
        if self.split == "type":
            held_out = held_out_types()
            names = [n for n in names if (n in held_out) == (split == "test")]
        for name in names:
            if name not in ScienceWorld._variations:  # the variation lists are only readable from a loaded task
                sim = self._simulator()
                sim.load(name, 0)
                ScienceWorld._variations[name] = (
                    sim.get_variations_train(), sim.get_variations_dev(), sim.get_variations_test())
        if self.split == "variation":
            return [f"{name}-{v}" for name in names for v in ScienceWorld._variations[name][self.splits.index(split)]]
        tasks = []
        for name in names:
            every = sorted(v for part in ScienceWorld._variations[name] for v in part)
            half = len(every) // 2  # the authors' int(n * 0.5)
            tasks += [f"{name}-{v}" for v in (every[half:] if split == "dev" else every[:half])]
        return tasks

    def task_type(self, task: str) -> str:
        return task.rsplit("-", 1)[0]

    def _failed(self, error: Exception) -> Step:
        self.error = f"scienceworld simulator failed: {type(error).__name__}: {error}"
        return Step("The environment failed.", done=True, info={"error": self.error})

    def reset(self, task: str) -> Step:
        from py4j.protocol import Py4JError

        name, variation = task.rsplit("-", 1)
        try:
            sim = self._simulator()
            # load() builds a fresh world; the wrapper's reset() would build it again (6-8 s on Mendelian tasks).
            sim.load(name, int(variation), self.simplifications)
            look = sim.server.step("look around")  # the first move, as in the wrapper's reset()
            self.templates, objects = sim.get_possible_actions(), sim.get_possible_objects()
            task = sim.get_task_description()
            return Step(f"{task}\n{look}\nactions (OBJ is an object): {', '.join(self.templates)}.\n"
                        f"objects: {', '.join(objects)}.", task=task, scene=look, actions=self.templates,
                        objects=objects)
        except Py4JError as e:
            return self._failed(e)

    def step(self, action: str) -> Step:
        from py4j.protocol import Py4JError

        try:
            # The server directly, not the wrapper's step(): that one rebuilds the 12k-character list of valid
            # actions after every step (50-220 ms against 5-15 ms), and applies the step limit we lifted.
            server = self.sim.server
            scene = server.step(action)
            score = round(100 * server.getScore())
            done = server.getCompleted() or score < 0  # the wrapper's rule: a negative score ends the episode
            objects = None if done else self.sim.get_possible_objects()
        except Py4JError as e:
            return self._failed(e)
        observation = scene if done else f"{scene}\nobjects: {', '.join(objects)}."
        return Step(observation, done=done, success=score >= 100, score=score / 100, valid=not scene.startswith(NO_MATCH),
                    scene=scene, actions=self.templates, objects=objects)

    def demo(self, task: str, tries: int = 3) -> list[str] | None:
        """The simulator's gold path, kept only if replaying it in the world it was made for reaches score 100.

        Path generation is random and now and then yields a path that fails (seen on Mendelian tasks: it focuses on
        the wrong box), hence a few tries. A replay may end (done) before the path does: worlds differ in timing by a
        tick, so the path is returned whole rather than cut where this replay finished. Slow on some tasks (10-25 s
        on Mendelian ones). Ends the current episode.
        """
        name, variation = task.rsplit("-", 1)
        sim = self._simulator()
        for _ in range(tries):
            sim.load(name, int(variation), self.simplifications, generateGoldPath=True)
            actions = sim.get_gold_action_sequence()
            sim.server.step("look around")
            for action in actions:
                sim.server.step(action)
                score = round(100 * sim.server.getScore())
                if score >= 100:
                    return actions
                if score < 0:
                    break
        return None

    def close(self):
        if self.sim is not None:
            self.sim.close()  # shuts the JVM down (a dead one: nothing to do)
            self.sim = None


# --------------------------------------------------------------------------------------------------
# EnvPool: episodes in worker processes.


def failed_step(error: str) -> Step:
    return Step("The environment failed.", done=True, info={"error": error})


def run_env_call(envs: dict, env_cls, env_kwargs: dict, cmd: str, slot: int, arg: str) -> Step:
    """reset(arg) or step(arg) on the env of `slot`, made on its first reset; an exception fails the episode."""
    try:
        if cmd == "reset" and slot not in envs:
            envs[slot] = env_cls(**env_kwargs)
        if slot not in envs:
            return failed_step("no live episode in this slot: its worker was restarted")
        return envs[slot].reset(arg) if cmd == "reset" else envs[slot].step(arg)
    except Exception as e:
        return failed_step(f"{type(e).__name__}: {e}")


def env_worker(conn, env_cls, env_kwargs: dict):
    """A worker process: holds one env per slot it serves and answers each reset/step as soon as it is done."""
    envs = {}
    conn.send("ready")
    try:
        while (message := conn.recv())[0] != "close":
            cmd, items = message
            for slot, arg in items:
                conn.send((slot, run_env_call(envs, env_cls, env_kwargs, cmd, slot, arg)))
    except EOFError:  # the parent died without closing the pool
        pass
    for env in envs.values():
        env.close()


class EnvPool:
    """Plays a batch of episodes on `workers` processes, so that env time overlaps model time.

    Slot i (the episode of tasks[i] at the last reset) lives on worker i % workers. Every live episode needs its own
    simulator, so a worker keeps one env per slot it serves, made on first use and reused by that slot's later
    episodes. A call sends each involved worker its slots at once; a worker runs them one after another and sends each
    Step back as soon as it is ready, so `step_timeout` bounds every single reset or step. A worker that dies or
    exceeds step_timeout is killed and replaced: its unanswered episodes get a failed Step
    (done=True, success=False, info["error"]), and its other live episodes fail at their next step. Workers are
    replaced at a reset once they have run `recycle_after` episodes, because an ALFWorld process grows with every
    distinct game. workers=0 runs the same calls in this process, one after another (no timeout, no recycling).

    Workers are started with 'spawn' (torch in the parent is not fork-safe). Spawn re-imports the main script in every
    worker, so the script needs the `if __name__ == "__main__":` guard, and a torch import at its top costs each
    worker ~1 s and ~200 MB more.
    The env class is looked up here and pickled by reference, so an env registered at run time works in workers too.
    """

    def __init__(self, make_env_fn_name: str, env_kwargs: dict, workers: int, step_timeout: float = 60.0,
                 recycle_after: int = 50):
        self.env_cls, self.env_kwargs = env_class(make_env_fn_name), dict(env_kwargs)
        self.step_timeout, self.recycle_after = step_timeout, recycle_after
        self.local = {}  # workers=0: slot -> env, in this process
        self.procs, self.conns, self.episodes = [None] * workers, [None] * workers, [0] * workers
        self._start(list(range(workers)))

    def _start(self, ws: list[int]):
        ctx = mp.get_context("spawn")
        for w in ws:
            self.conns[w], child = ctx.Pipe()
            self.procs[w] = ctx.Process(target=env_worker, args=(child, self.env_cls, self.env_kwargs), daemon=True)
            self.procs[w].start()
            child.close()
            self.episodes[w] = 0
        for w in ws:  # wait until all are up, so that start-up time never counts against step_timeout
            try:
                self.conns[w].recv()
            except EOFError:
                raise RuntimeError("an env worker died while starting; its traceback is above") from None

    def _stop(self, w: int, kill: bool = False):
        if not kill:  # let the worker close its envs (ScienceWorld JVMs); killed, its JVMs exit with it anyway
            try:
                self.conns[w].send(("close", None))
                self.procs[w].join(timeout=30)
            except OSError:
                pass
        self.procs[w].kill()
        self.procs[w].join()
        self.conns[w].close()

    def _run(self, cmd: str, slots: list[int], args: list[str]) -> list[Step]:
        if not self.procs:
            return [run_env_call(self.local, self.env_cls, self.env_kwargs, cmd, s, a) for s, a in zip(slots, args)]
        pending = {}  # worker -> its slots not answered yet
        for s, a in zip(slots, args):
            pending.setdefault(s % len(self.procs), []).append((s, a))
        for w, items in pending.items():
            try:
                self.conns[w].send((cmd, items))
            except OSError:  # the worker died since the last call: its end of the pipe reads as closed below
                pass
            pending[w] = [s for s, _ in items]
        results, deadline = {}, {w: time.monotonic() + self.step_timeout for w in pending}
        while pending:
            ready = wait([self.conns[w] for w in pending], max(0.0, min(deadline.values()) - time.monotonic()))
            for w in list(pending):
                error = None
                if self.conns[w] in ready:
                    try:
                        slot, step = self.conns[w].recv()
                        results[slot] = step
                        pending[w].remove(slot)
                        deadline[w] = time.monotonic() + self.step_timeout
                    except (EOFError, OSError):
                        self.procs[w].join(timeout=5)
                        error = f"env worker process died (exit code {self.procs[w].exitcode})"
                elif time.monotonic() > deadline[w]:
                    error = f"env call exceeded step_timeout={self.step_timeout}s; worker restarted"
                if error:
                    self._stop(w, kill=True)
                    self._start([w])
                    results.update({s: failed_step(error) for s in pending[w]})
                    pending[w] = []
                if not pending[w]:
                    del pending[w], deadline[w]
        return [results[s] for s in slots]

    def reset(self, tasks: list[str]) -> list[Step]:
        """Start one episode per task, slot i playing tasks[i]; the previous batch's episodes end."""
        stale = [w for w, n in enumerate(self.episodes) if n >= self.recycle_after]
        for w in stale:  # between episodes: nothing live is lost
            self._stop(w)
        self._start(stale)
        if self.procs:
            for s in range(len(tasks)):
                self.episodes[s % len(self.procs)] += 1
        return self._run("reset", list(range(len(tasks))), tasks)

    def step(self, slots: list[int], actions: list[str]) -> list[Step]:
        """Step the episodes in `slots` with `actions`, in parallel across workers."""
        return self._run("step", slots, actions)

    def close(self):
        for w in range(len(self.procs)):
            self._stop(w)
        for env in self.local.values():
            env.close()
        self.procs, self.local = [], {}


# name -> "module:Class", imported on first use so that each benchmark's packages load only when it runs
ENVS = {"tinyworld": "envs:TinyWorld", "tinyworld-recall": "envs:TinyWorldRecall", "tinyworld-drift": "envs:TinyWorldDrift", "alfworld": "envs:AlfWorld", "scienceworld": "envs:ScienceWorld", "webshop": "webshop:WebShop"}


def env_class(name: str):
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; choose one of {sorted(ENVS)}")
    module, cls = ENVS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_env(name: str, **kwargs):
    return env_class(name)(**kwargs)


def eval_panel(env, split: str, n: int, seed: int = 0) -> list[str]:
    """The in-training eval panel: n tasks of `split`, stratified by task type, fixed and seeded.

    The first 50 ALFWorld valid_seen games in folder order cover 3 of its 6 task types (35 of them one type), so
    the panel instead takes the types in turn (sorted by name), each type's tasks in a seeded shuffle, until n are
    taken. Types with fewer tasks run out first; the panel stays the same for every run with the same n and seed.
    """
    by_type = {}
    for task in env.tasks(split):
        by_type.setdefault(env.task_type(task), []).append(task)
    queues = []
    for t in sorted(by_type):
        tasks = list(by_type[t])
        random.Random(f"{seed}-{t}").shuffle(tasks)
        queues.append(tasks)
    panel = []
    while len(panel) < n and any(queues):
        for q in queues:
            if q and len(panel) < n:
                panel.append(q.pop(0))
    return panel
