"""Temporal curricula: how much of each episode the student plays during training.

The paper's depth schedule is  k = k_start + n // eta  with n the training step counted from 1, as in its Algorithm 1
(k = 1, 2, 2, 3, 3, ... at eta 2). Our loop counts steps from 0, so depth() takes the 0-based step and adds one.
It is used two ways:
  F2B (forward-to-backward): the student acts for the first min(k, T_max) turns only; every turn is trained.
  B2F (backward-to-forward): replay the first max(L - k, 0) actions of a successful demonstration of length L
       (no gradient; the student sees them as history), then the student acts until done or T_max turns in all.
Vanilla OPD ("opd") is the same loop with no curriculum: the student plays the full horizon from the start.
"adaptive" goes beyond the paper (its future work names it): F2B whose depth advances when the student has
settled at the frontier turn instead of every eta steps. "Settled" follows the student rather than an absolute
number of nats: the KL at the frontier turn has come down to within a factor kl_gate of the KL at the turns before
it, which the student already trains on (per-token KL grows with the turn index, so an absolute gate that fits
turn 1 never opens at turn 15).

Everything here is pure or holds a small JSON-serializable state, so tests hit it directly and a resumed
run continues with the same depth.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass

CURRICULA = ("opd", "f2b", "b2f", "adaptive")


def depth(n: int, k_start: int, eta: int) -> int:
    """The paper's schedule: depth k at 0-based training step n (the paper's step n + 1)."""
    return k_start + (n + 1) // eta


@dataclass(frozen=True)
class Plan:
    """What one training episode looks like."""

    prefix: int  # demonstration actions replayed before the student acts (B2F); never trained
    student_turns: int  # the most turns the student acts


def f2b_plan(k: int, max_turns: int) -> Plan:
    return Plan(prefix=0, student_turns=min(k, max_turns))


def b2f_plan(k: int, demo_len: int, max_turns: int) -> Plan:
    prefix = min(max(demo_len - k, 0), max_turns - 1)  # the student always gets at least one turn
    return Plan(prefix=prefix, student_turns=max_turns - prefix)


# The adaptive gate waits this many steps at a depth before it may advance on the KL, so its EMAs have more than
# one noisy batch behind them (16 episodes give only a few dozen tokens at one turn).
MIN_DWELL = 2
EMA_DECAY = 0.5


def smooth(old: float | None, new: float | None) -> float | None:
    if new is None:
        return old
    return new if old is None else EMA_DECAY * old + (1 - EMA_DECAY) * new


@dataclass
class Curriculum:
    name: str = "f2b"
    k_start: int = 1
    eta: int = 2
    max_turns: int = 30
    kl_gate: float = 1.5  # adaptive: advance once the frontier's KL EMA is at most this times the earlier turns' EMA
    max_dwell: int = 8  # adaptive: advance after this many steps at one depth whatever the KL
    # adaptive state (saved with checkpoints)
    k: int = 0
    dwell: int = 0
    ema: float | None = None  # per-token KL at the frontier turn k - 1
    ema_before: float | None = None  # per-token KL over the turns before it (0 .. k - 2)

    def __post_init__(self):
        if self.name not in CURRICULA:
            raise ValueError(f"unknown curriculum {self.name!r}; choose one of {CURRICULA}")
        if self.k_start < 1 or self.eta < 1 or self.max_turns < 1:
            raise ValueError(f"need k_start >= 1, eta >= 1 and max_turns >= 1 (got {self.k_start}, {self.eta}, {self.max_turns})")
        if self.max_dwell < MIN_DWELL:
            raise ValueError(f"max_dwell must be at least {MIN_DWELL}")
        if not self.kl_gate > 0:
            raise ValueError(f"kl_gate must be > 0 (got {self.kl_gate})")
        self.k = self.k or self.k_start

    def depth(self, n: int) -> int | None:
        """The depth k at step n; None for vanilla OPD (full horizon)."""
        if self.name == "opd":
            return None
        if self.name == "adaptive":
            return self.k
        return depth(n, self.k_start, self.eta)

    def plan(self, n: int, demo_len: int | None) -> Plan:
        """The episode plan at step n for a task whose demonstration has demo_len actions (None: none)."""
        k = self.depth(n)
        if k is None:
            return Plan(0, self.max_turns)
        if self.name == "b2f":  # a task with no successful demonstration is played from scratch (tcod.py counts it)
            return b2f_plan(k, demo_len, self.max_turns) if demo_len else Plan(0, self.max_turns)
        return f2b_plan(k, self.max_turns)

    def update(self, kl_by_turn: list[float | None]) -> None:
        """After a step: feed the adaptive gate the per-token KL by turn index (None where no tokens).

        Advance when no episode reached the frontier turn (they all ended before it, mostly by success: nothing to
        wait for), or after MIN_DWELL steps once the frontier's EMA is at most kl_gate times the EMA over the earlier
        turns (at depth 1 there is no earlier turn: the gate is open), or after max_dwell steps whatever the KL.
        """
        if self.name != "adaptive" or self.k >= self.max_turns:
            return
        self.dwell += 1
        frontier = self.k - 1  # the deepest trained turn (0-based)
        at = kl_by_turn[frontier] if frontier < len(kl_by_turn) else None
        before = [v for v in kl_by_turn[:frontier] if v is not None]
        self.ema = smooth(self.ema, at)
        self.ema_before = smooth(self.ema_before, sum(before) / len(before) if before else None)
        settled = at is None or self.ema_before is None or self.ema <= self.kl_gate * self.ema_before
        if at is None or (self.dwell >= MIN_DWELL and settled) or self.dwell >= self.max_dwell:
            self.k, self.dwell, self.ema, self.ema_before = self.k + 1, 0, None, None

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "Curriculum":
        return cls(**state)


# --------------------------------------------------------------------------------------------------
# B2F demonstrations from a file (the paper's route: the teacher's pass@K successes, written by eval.py --samples K)


def load_demos(path: str, env_name: str) -> dict:
    """A demonstrations file written by `eval.py --samples K`, checked: its "demos" map each task to the teacher's first
    successful actions, "replies" to their reply texts, and "hard" lists the tasks no sample solved."""
    import rundir  # its JSON rule (a key given twice is refused); imported here, where it is used

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--demos {path!r}: no such file (make one with `python eval.py --samples K --splits train`)")
    with open(path) as f:
        try:
            data = json.load(f, object_pairs_hook=rundir.unique_keys)
        except json.JSONDecodeError as e:
            raise ValueError(f"--demos {path!r} is not valid JSON: {e}") from None
        except ValueError as e:  # a task given twice
            raise ValueError(f"--demos {path!r}: {e}") from None
    problem = demos_schema_problem(data)
    if problem:
        raise ValueError(f"--demos {path!r}: {problem} (the file `eval.py --samples K` writes: "
                         '{"env": ..., "demos": {task: [action, ...]}, "replies": {task: [text, ...]}, "hard": [task, ...]})')
    if data["env"] != env_name:
        raise ValueError(f"--demos {path!r} holds {data['env']!r} demonstrations, not {env_name!r}")
    return data


def demos_schema_problem(data) -> str | None:
    """What is wrong with a demos file's structure, or None. An action list given as one string would be replayed
    character by character, so every list must hold strings."""

    def str_lists(m) -> bool:
        return isinstance(m, dict) and all(isinstance(v, list) and all(isinstance(a, str) for a in v) for v in m.values())

    if not isinstance(data, dict):
        return f"the top level is a {type(data).__name__}, not an object"
    if not isinstance(data.get("env"), str):
        return 'no "env" name'
    if not str_lists(data.get("demos")):
        return '"demos" must map each task to a list of action strings'
    if "replies" in data and not str_lists(data["replies"]):
        return '"replies" must map each task to a list of reply strings'
    if "hard" in data and not (isinstance(data["hard"], list) and all(isinstance(t, str) for t in data["hard"])):
        return '"hard" must be a list of task ids'
    return None


def check_demos_cover(demos: dict, train_tasks: list[str], path: str) -> None:
    """B2F demos must be training tasks of the env; an empty file is refused, a sparse one warned about with the count."""
    if not demos:
        raise ValueError(f"--demos {path!r} holds no demonstration: B2F would be plain OPD. Use a file with successes, or "
                         "drop --demos to use the env's own demonstrations")
    train = set(train_tasks)
    unknown = [t for t in demos if t not in train]
    if unknown:
        raise ValueError(f"--demos {path!r}: {len(unknown)} of its {len(demos)} tasks are not training tasks of this env "
                         f"(e.g. {unknown[0]!r}); make the file with `eval.py --samples K --splits train`")
    if len(demos) < len(train) / 2:
        warnings.warn(f"--demos {path!r} covers {len(demos)} of the {len(train)} training tasks: the others are played "
                      "from scratch (counted per step as no_demo)", stacklevel=2)
