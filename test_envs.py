"""Tests of the real benchmarks (AlfWorld, ScienceWorld) and of EnvPool. CPU only; about 1 min on 2 cores.

Mechanics of the pool (crash, hang, recycling) use a tiny fake env; the fake is defined at module level so that
spawned workers can import it, and registered in envs.ENVS per test.
"""

import importlib.util
import os
import shutil
import signal
import threading
import time

import pytest

import envs
from envs import Step
from envpool import EnvPool
from envs import AlfWorld, ScienceWorld

needs_alfworld = pytest.mark.skipif(importlib.util.find_spec("alfworld") is None, reason="alfworld not installed")
needs_scienceworld = pytest.mark.skipif(
    importlib.util.find_spec("scienceworld") is None or shutil.which("java") is None,
    reason="scienceworld or java not installed")
ALFWORLD_TYPES = {"pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
                  "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place"}


def replay(env, task: str, actions: list[str]) -> Step:
    """Play a demonstration until the episode ends (a ScienceWorld gold path may go on after it)."""
    step = env.reset(task)
    for action in actions:
        step = env.step(action)
        assert step.valid, f"{task}: demo action {action!r} was not valid: {step.observation}"
        if step.done:
            break
    return step


# ------------------------------------------------------------------ ALFWorld


@pytest.fixture(scope="module")
def alfworld():
    env = AlfWorld()
    yield env
    env.close()


@needs_alfworld
def test_alfworld_unpacks_only_the_valid_games_atomically(tmp_path):
    env = AlfWorld(data=str(tmp_path))
    seen, unseen = env.tasks("valid_seen"), env.tasks("valid_unseen")
    assert (len(seen), len(unseen)) == (140, 134)
    assert seen == sorted(seen) and {env.task_type(t) for t in seen + unseen} == ALFWORLD_TYPES
    assert sorted(os.listdir(tmp_path)) == ["json_2.1.1"]  # no temp dir left behind
    assert sorted(os.listdir(tmp_path / "json_2.1.1")) == ["valid_seen", "valid_unseen"]  # train not unpacked
    with pytest.raises(ValueError):
        env.tasks("test")


def test_alfworld_honours_alfworld_data(tmp_path, monkeypatch):
    game = tmp_path / "json_2.1.1" / "valid_seen" / "pick_and_place_simple-Pen-None-Desk-1" / "trial_1" / "game.tw-pddl"
    game.parent.mkdir(parents=True)
    game.write_text('{"walkthrough": ["go to desk 1"]}')
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    env = AlfWorld()
    assert env.tasks("valid_seen") == ["valid_seen/pick_and_place_simple-Pen-None-Desk-1/trial_1"]
    assert env.demo(env.tasks("valid_seen")[0]) == ["go to desk 1"]


@needs_alfworld
def test_alfworld_reset_step_and_invalid_action(alfworld):
    task = alfworld.tasks("valid_seen")[0]
    first = alfworld.reset(task)
    assert first.observation.startswith("Your task is to: ") and "Welcome" not in first.observation
    assert "\nactions: go to " in first.observation and "help" not in first.observation
    bad = alfworld.step("fly to the moon")
    assert not bad.valid and not bad.done and bad.observation.startswith("Nothing happens.")
    good = alfworld.step(alfworld.demo(task)[0])  # still usable after the invalid action
    assert good.valid and not good.done and "actions: " in good.observation


@needs_alfworld
def test_alfworld_demos_replay_to_success(alfworld):
    """One game of each task type from valid_seen, and one from valid_unseen."""
    seen = alfworld.tasks("valid_seen")
    tasks = [next(t for t in seen if alfworld.task_type(t) == kind) for kind in sorted(ALFWORLD_TYPES)]
    for task in tasks + alfworld.tasks("valid_unseen")[:1]:
        demo = alfworld.demo(task)
        final = replay(alfworld, task, demo[:-1])
        assert not final.done, f"{task}: won before the walkthrough's last action"
        final = alfworld.step(demo[-1])
        assert final.done and final.success and final.score == 1.0, task


# ------------------------------------------------------------------ ScienceWorld


@pytest.fixture(scope="module")
def scienceworld():
    env = ScienceWorld()
    yield env
    env.close()


@needs_scienceworld
def test_scienceworld_variation_splits():
    env = ScienceWorld(split="variation")
    try:
        train, dev, test = (env.tasks(s) for s in ("train", "dev", "test"))
        assert (len(train), len(dev), len(test)) == (3592, 1796, 1819)  # 7,207 variations in all
        assert not (set(train) & set(test)) and not (set(dev) & set(test))
        assert len({env.task_type(t) for t in test}) == 30
        some = ScienceWorld(task_types=["boil", "melt"], split="variation")
        assert {some.task_type(t) for t in some.tasks("test")} == {"boil", "melt"}
        assert some.tasks("test") == [t for t in test if t.startswith(("boil-", "melt-"))]
    finally:
        env.close()


@needs_scienceworld
def test_scienceworld_type_split_holds_out_13_types(scienceworld):
    """The authors' protocol (default): their 17 training types, 13 held out, each on the first half of its
    variations rounded down (kokolerk/TCOD get_sciworld_data.py: range(int(n * 0.5)))."""
    train, dev, test = (scienceworld.tasks(s) for s in ("train", "dev", "test"))
    types = lambda tasks: {scienceworld.task_type(t) for t in tasks}  # noqa: E731
    assert types(train) == {
        "boil", "melt", "change-the-state-of-matter-of", "use-thermometer", "measure-melting-point-known-substance",
        "power-component", "test-conductivity", "find-living-thing", "find-plant", "grow-plant", "chemistry-mix",
        "chemistry-mix-paint-secondary-color", "lifespan-shortest-lived", "identify-life-stages-2",
        "inclined-plane-determine-angle", "inclined-plane-friction-named-surfaces", "mendelian-genetics-known-plant"}
    assert types(test) == {
        "freeze", "measure-melting-point-unknown-substance", "power-component-renewable-vs-nonrenewable-energy",
        "test-conductivity-of-unknown-substances", "find-non-living-thing", "find-animal", "grow-fruit",
        "chemistry-mix-paint-tertiary-color", "lifespan-longest-lived", "lifespan-longest-lived-then-shortest-lived",
        "identify-life-stages-1", "inclined-plane-friction-unnamed-surfaces", "mendelian-genetics-unknown-plant"}
    assert types(test) == envs.held_out_types() and types(dev) == types(train)
    assert (len(train), len(dev), len(test)) == (2294, 2295, 1308)
    sim = scienceworld._simulator()
    for name, split, n in (("boil", train, 30), ("identify-life-stages-2", train, 10), ("freeze", test, 30),
                           ("lifespan-longest-lived", test, 125), ("identify-life-stages-1", test, 14)):
        assert sim.get_max_variations(name) == n  # the authors' table of variation counts
        mine = [int(t.rsplit("-", 1)[1]) for t in split if scienceworld.task_type(t) == name]
        assert mine == list(range(n // 2))  # 125 -> 0..61: rounded down
    assert [int(t.rsplit("-", 1)[1]) for t in dev if t.startswith("boil-")] == list(range(15, 30))
    with pytest.raises(ValueError, match="split 'random'"):
        ScienceWorld(split="random")


@needs_scienceworld
def test_scienceworld_reset_step_and_invalid_action(scienceworld):
    first = scienceworld.reset("boil-21")
    assert first.observation.startswith("Your task is to boil")
    assert "actions (OBJ is an object): " in first.observation and "\nobjects: " in first.observation
    bad = scienceworld.step("fly to the moon")
    assert not bad.valid and not bad.done and "objects: " in bad.observation
    good = scienceworld.step("look around")
    assert good.valid and not good.done and good.observation.startswith("This room is called")


@needs_scienceworld
@pytest.mark.parametrize("task", ["boil-21", "chemistry-mix-24", "find-plant-225", "use-thermometer-405",
                                  "lifespan-longest-lived-93", "test-conductivity-675"])
def test_scienceworld_demos_replay_to_success(scienceworld, task):
    actions = scienceworld.demo(task)
    assert actions, f"no gold path replayed to success for {task}"
    final = replay(scienceworld, task, actions)
    assert final.done and final.success and final.score == 1.0


@needs_scienceworld
def test_scienceworld_loads_the_authors_easy_simplifications(scienceworld):
    assert "teleport OBJ" in scienceworld.reset("boil-21").observation
    assert scienceworld.step("teleport to kitchen").observation.startswith("You teleport to the kitchen")
    # what "easy" resolves to in the simulator: never openContainers; noElectricalAction except on electrical tasks
    used = lambda: set(scienceworld.sim.get_simplifications_used().split(", "))  # noqa: E731
    easy = {"teleportAction", "openDoors", "selfWateringFlowerPots"}
    assert used() == easy | {"noElectricalAction"}
    for task in ("power-component-3", "test-conductivity-of-unknown-substances-0"):
        scienceworld.reset(task)
        assert used() == easy
    full = ScienceWorld(simplifications="")
    try:
        assert "teleport" not in full.reset("boil-21").observation
        assert full.sim.get_simplifications_used() == ""
    finally:
        full.close()


@needs_scienceworld
def test_scienceworld_survives_a_dead_jvm(scienceworld):
    scienceworld.reset("boil-21")
    os.kill(scienceworld.sim._gateway.java_process.pid, signal.SIGKILL)
    scienceworld.sim._gateway.java_process.wait()
    lost = scienceworld.step("look around")
    assert lost.done and not lost.success and "error" in lost.info
    again = scienceworld.reset("boil-21")  # a new JVM
    assert "error" not in again.info and again.observation.startswith("Your task is to boil")
    assert scienceworld.step("look around").valid


# ------------------------------------------------------------------ EnvPool


class FakeEnv:
    """Answers with its process id; the action 'slow' takes 1 s, 'hang' a minute, and 'raise' raises."""

    def reset(self, task):
        self.task = task
        return Step(f"{task} pid {os.getpid()}")

    def step(self, action):
        if action in ("slow", "hang"):
            time.sleep(1 if action == "slow" else 60)
        if action == "raise":
            raise RuntimeError("boom")
        return Step(f"{self.task} {action} pid {os.getpid()}", done=action == "finish", success=action == "finish")

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(envs.ENVS, "fake", "test_envs:FakeEnv")


@needs_alfworld
def test_pool_parallel_equals_serial(alfworld):
    tasks = alfworld.tasks("valid_seen")[:3] + alfworld.tasks("valid_unseen")[:1]
    demos = [alfworld.demo(t) for t in tasks]
    transcripts = []
    for workers in (2, 0):
        pool = EnvPool("alfworld", {}, workers=workers)
        steps, transcript = pool.reset(tasks), []
        for k in range(max(map(len, demos)) + 1):
            transcript.append([(s.observation, s.done, s.success, s.valid) for s in steps])
            live = [i for i, s in enumerate(steps) if not s.done]
            actions = [demos[i][k] if k < len(demos[i]) else "fly to the moon" for i in live]
            for i, s in zip(live, pool.step(live, actions)):
                steps[i] = s
        pool.close()
        assert all(s.success for s in steps)
        transcripts.append(transcript)
    assert transcripts[0] == transcripts[1]


def test_pool_survives_a_killed_worker(fake):
    pool = EnvPool("fake", {}, workers=2, step_timeout=20)
    pool.reset(["a", "b", "c", "d"])  # worker 0 holds slots 0 and 2, worker 1 slots 1 and 3
    threading.Timer(0.3, os.kill, (pool.procs[0].pid, signal.SIGKILL)).start()  # dies during its 'slow' step
    steps = pool.step([0, 1, 2, 3], ["slow", "go", "go", "go"])
    for i in (0, 2):
        assert steps[i].done and not steps[i].success and "died" in steps[i].info["error"]
    assert steps[1].observation.startswith("b go") and steps[3].observation.startswith("d go")
    os.kill(pool.procs[1].pid, signal.SIGKILL)  # dies between calls
    pool.procs[1].join()
    steps = pool.step([1, 3], ["go", "go"])
    assert all(s.done and "died" in s.info["error"] for s in steps)
    fresh = pool.reset(["e", "f", "g"])
    assert [s.observation.split()[0] for s in fresh] == ["e", "f", "g"] and not any(s.done for s in fresh)
    pool.close()


def test_pool_times_out_a_hung_step(fake):
    pool = EnvPool("fake", {}, workers=2, step_timeout=2)
    pool.reset(["a", "b", "c"])
    raised = pool.step([1], ["raise"])[0]  # an env exception fails that episode only
    assert raised.done and "boom" in raised.info["error"]
    pool.reset(["a", "b", "c"])
    started = time.monotonic()
    steps = pool.step([0, 1, 2], ["hang", "go", "go"])  # slot 2 waits behind slot 0 on worker 0
    assert time.monotonic() - started < 15
    for i in (0, 2):
        assert steps[i].done and "step_timeout" in steps[i].info["error"]
    assert steps[1].observation.startswith("b go")
    after = pool.step([0], ["go"])[0]  # the restarted worker no longer holds slot 0's episode
    assert after.done and "restarted" in after.info["error"]
    assert pool.reset(["x"])[0].observation.startswith("x")
    pool.close()


def test_pool_recycles_workers(fake):
    pool = EnvPool("fake", {}, workers=1, recycle_after=2)
    pids = [pool.reset(["a", "b"])[0].observation.split()[-1] for _ in range(2)]
    assert pids[0] != pids[1]
    pool.close()


def test_pool_in_process(fake):
    pool = EnvPool("fake", {}, workers=0)
    steps = pool.reset(["a", "b"])
    assert steps[0].observation == f"a pid {os.getpid()}"
    assert pool.step([1], ["raise"])[0].info["error"] == "RuntimeError: boom"
    pool.close()


# ------------------------------------------------------------------ slow: every eval demo


@pytest.mark.slow
@needs_alfworld
def test_alfworld_every_valid_demo_replays(alfworld):
    """All 274 eval walkthroughs (~12 min on one core)."""
    for task in alfworld.tasks("valid_seen") + alfworld.tasks("valid_unseen"):
        assert replay(alfworld, task, alfworld.demo(task)).success, task


@pytest.mark.slow
@needs_scienceworld
def test_scienceworld_demo_of_every_task_type(scienceworld):
    """The first test variation of each of the 30 task types (Mendelian ones take ~30 s each)."""
    tasks, failed = scienceworld.tasks("test"), []
    for kind in sorted({scienceworld.task_type(t) for t in tasks}):
        task = next(t for t in tasks if scienceworld.task_type(t) == kind)
        actions = scienceworld.demo(task)
        if not actions or not replay(scienceworld, task, actions).success:
            failed.append(task)
    assert not failed


def test_tinyworld_recall_states_the_sources_once_then_hides_them():
    """tinyworld.TinyWorldRecall: the first message lists every object's place; later observations name the next move's
    object and destination but not where the object is; the same expert solves it in the same actions as TinyWorld."""
    from tinyworld import TinyWorld, TinyWorldRecall

    plain, recall = TinyWorld(), TinyWorldRecall()
    for task in recall.tasks("test")[:20]:
        first = recall.reset(task)
        assert all(f"{o} at {p}" in first.observation for o, p in recall.where.items())
        actions = recall.demo(task)  # (demo plays the env to the end: reset after it)
        assert actions == plain.demo(task)
        step = recall.reset(task)
        for action in actions[:-1]:
            step = recall.step(action)
            o, p = recall._next_goal()
            assert step.observation.endswith(f" next: {o} to {'here' if p == recall.here else p}.")
            assert " from " not in step.observation and "objects:" not in step.observation
        assert recall.step(recall.expert()).success


def test_tinyworld_drift_reads_as_tinyworld_until_the_first_detour_then_never_again():
    """tinyworld.TinyWorldDrift: on the expert's path every observation equals TinyWorld's; the first action that is not the
    expert's (valid or not) switches every later observation to the off-plan form, which names the same object, source
    and destination; the expert still solves every task from there within the horizon's slack it has."""
    import random

    from tinyworld import TinyWorld, TinyWorldDrift

    plain, drift = TinyWorld(), TinyWorldDrift()
    for task in drift.tasks("test")[:20]:
        actions = plain.demo(task)
        assert drift.demo(task) == actions
        a, b = plain.reset(task), drift.reset(task)
        for action in actions[:-1]:
            a, b = plain.step(action), drift.step(action)
            assert a.observation == b.observation and a.scene == b.scene and "off plan" not in b.observation
    solved, rng, words = 0, random.Random(0), set()
    for task in drift.tasks("train")[:50]:
        step, detour = drift.reset(task), rng.choice(["fly", None])
        detour = detour or next(x for x in drift.admissible() if x != drift.expert())
        step = drift.step(detour)
        assert step.observation.startswith(("hand: ", "nothing happens. hand: "))
        while not step.done:
            o, p = drift._next_goal()
            src = "hand" if drift.hand == o else ("here" if drift.where[o] == drift.here else drift.where[o])
            assert f" Move {o} to {'here' if p == drift.here else p} from {src}. " in step.observation
            assert " next: " not in step.observation and step.observation.endswith(f"actions: {', '.join(step.actions)}.")
            words.update(step.observation.replace(",", " ").replace(".", " ").replace(":", " ").split())
            step = drift.step(drift.expert())
        solved += step.success
    assert solved == 50
    # a form the tiny models can learn: each of its words is one token of their tokenizer (the first form's were
    # split into characters, and the teacher trained on it learnt nothing)
    import models

    tok = models.load_tokenizers("tiny-teacher", "tiny-teacher")
    assert {w for w in words if len(tok.tokenize(" " + w)) > 1} == set() and "Move" in words
