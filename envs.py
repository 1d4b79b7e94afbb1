"""Environments behind one interface: the registry of env names (ENVS), ALFWorld and ScienceWorld; the built-in CPU world
is in tinyworld.py, WebShop in webshop.py, and envpool.py plays any of them in worker processes.

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
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
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


# name -> "module:Class", imported on first use so that each benchmark's packages load only when it runs
ENVS = {"tinyworld": "tinyworld:TinyWorld", "tinyworld-recall": "tinyworld:TinyWorldRecall", "tinyworld-drift": "tinyworld:TinyWorldDrift", "alfworld": "envs:AlfWorld", "scienceworld": "envs:ScienceWorld", "webshop": "webshop:WebShop"}


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
