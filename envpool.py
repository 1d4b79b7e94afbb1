"""EnvPool: a batch of episodes played in worker processes, so that env time overlaps model time, and a crashed or
hung simulator fails its episodes instead of the run. Any env of envs.ENVS works in it (envs.py: the interface)."""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import wait

from envs import Step, env_class


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
