"""Temporal curricula: how much of each episode the student plays during training.

The paper's depth schedule is  k = k_start + n // eta  (n = training step). It is used two ways:
  F2B (forward-to-backward): the student acts for the first min(k, T_max) turns only; every turn is trained.
  B2F (backward-to-forward): replay the first max(L - k, 0) actions of a successful demonstration of length L
       (no gradient; the student sees them as history), then the student acts until done or T_max turns in all.
Vanilla OPD ("opd") is the same loop with no curriculum: the student plays the full horizon from the start.
"adaptive" goes beyond the paper (its future work names it): F2B whose depth advances when the student has
settled at the frontier turn, measured by the KL there, instead of every eta steps.

Everything here is pure or holds a small JSON-serializable state, so tests hit it directly and a resumed
run continues with the same depth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

CURRICULA = ("opd", "f2b", "b2f", "adaptive")


def depth(n: int, k_start: int, eta: int) -> int:
    """The paper's schedule: depth k at training step n."""
    return k_start + n // eta


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


# The adaptive gate waits this many steps at a depth before it may advance, so its EMA has more than one
# noisy batch behind it (16 episodes give only a few dozen tokens at one turn).
MIN_DWELL = 2
EMA_DECAY = 0.5


@dataclass
class Curriculum:
    name: str = "f2b"
    k_start: int = 1
    eta: int = 2
    max_turns: int = 30
    kl_gate: float = 0.1  # adaptive: advance once the EMA of per-token KL at the frontier turn is below this
    max_dwell: int = 8  # adaptive: advance after this many steps at one depth whatever the KL
    # adaptive state (saved with checkpoints)
    k: int = 0
    dwell: int = 0
    ema: float | None = None

    def __post_init__(self):
        if self.name not in CURRICULA:
            raise ValueError(f"unknown curriculum {self.name!r}; choose one of {CURRICULA}")
        if self.k_start < 1 or self.eta < 1 or self.max_turns < 1:
            raise ValueError(f"need k_start >= 1, eta >= 1 and max_turns >= 1 (got {self.k_start}, {self.eta}, {self.max_turns})")
        if self.max_dwell < MIN_DWELL:
            raise ValueError(f"max_dwell must be at least {MIN_DWELL}")
        self.k = self.k or self.k_start

    def depth(self, n: int) -> int | None:
        """The depth k at step n; None for vanilla OPD (full horizon)."""
        if self.name == "opd":
            return None
        if self.name == "adaptive":
            return self.k
        return depth(n, self.k_start, self.eta)

    def plan(self, n: int, demo_len: int | None) -> Plan:
        """The episode plan at step n for a task whose demonstration has demo_len actions (None: no demo)."""
        k = self.depth(n)
        if k is None:
            return Plan(0, self.max_turns)
        if self.name == "b2f":
            if demo_len is None:
                raise ValueError("B2F needs a demonstration for every training task")
            return b2f_plan(k, demo_len, self.max_turns)
        return f2b_plan(k, self.max_turns)

    def update(self, kl_by_turn: list[float | None]) -> None:
        """After a step: feed the adaptive gate the per-token KL by turn index (None where no tokens)."""
        if self.name != "adaptive":
            return
        self.dwell += 1
        frontier = self.k - 1  # the deepest trained turn (0-based)
        kl = kl_by_turn[frontier] if frontier < len(kl_by_turn) else None
        if kl is not None:
            self.ema = kl if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * kl
        # No tokens at the frontier means every episode ended before it (mostly by success): nothing to wait for.
        settled = self.ema is None or self.ema < self.kl_gate
        if self.k < self.max_turns and ((self.dwell >= MIN_DWELL and settled) or self.dwell >= self.max_dwell):
            self.k, self.dwell, self.ema = self.k + 1, 0, None

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "Curriculum":
        return cls(**state)
