"""The update buffer (--update-from buffer, the default on the real benchmarks): turn-rows carried across rollouts and
drained in optimizer steps of exactly --turns-per-update rows, as the authors' trainer takes them from its queue.

A turn-row is one student turn of one episode: its reply tokens, scored in the context the student had. Their
explorer rolls out 16 tasks a step and their trainer takes one AdamW step per 64 turn-rows, so an early F2B rollout
(16 rows at depth 1) waits for the next ones and leftovers carry over. We buffer turn-rows, not whole episodes, so
that every step holds exactly 64 rows whatever the episodes' lengths: an episode of 30 turns can never fit 64 in
whole-episode groups (they would be 60 or 90). An episode is one token stream here, so an episode whose rows fall in
two steps is forwarded in both (each time only up to its last row of that step), with the other step's rows masked
out of the loss: each row is trained once, in its full context, as a row of theirs is (their rows are separate
prompts). Order is first in, first out: rollouts in step order, each rollout's episodes by task id (the same order
on every rank and in one process), each episode's rows by turn.

The teacher scores each episode once, on arrival (opd.score_episodes, which also gives the step's KL metrics at the
weights that sampled it); its log-probs are kept here with the stream, so a k1 update needs no teacher forward. The
buffer's contents go into the checkpoint (trainer.pt), so a resume with a partly filled buffer continues exactly.

Under data parallelism every rank holds the whole buffer (the rollouts are gathered), takes the same rows each step
and trains its share of that step's pieces (share()); the loss weights are normalized over all ranks and the
gradients summed, so the step equals the single-process one (test_buffer.py runs 2 Gloo ranks against one process).
"""

from __future__ import annotations

from dataclasses import replace

import torch

import fsdp
from dist import gather_episodes
from opd import UpdateConfig, score_and_update, score_episodes
from rollout import Episode, model_device, precision


class TurnBuffer:
    """Turn-rows waiting for an optimizer step; take() hands out the next exactly-`per_update` rows as stream pieces."""

    def __init__(self, per_update: int):
        if per_update < 1:
            raise ValueError(f"a turn-row buffer needs --turns-per-update >= 1 (got {per_update})")
        self.per_update = per_update
        self.rows: list[tuple[int, str, int]] = []  # (rollout step, task, turn), first in first out
        self.streams: dict[tuple[int, str], dict] = {}  # (step, task) -> ids, turn_of, teacher log-probs per position

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, step: int, episodes: list[Episode], teacher_logp: list[torch.Tensor | None]) -> int:
        """Queue a rollout's student turns (all ranks' episodes, gathered); returns how many rows it added."""
        added = 0
        for i in sorted(range(len(episodes)), key=lambda i: episodes[i].task):
            ep = episodes[i]
            turns = sorted({t for t in ep.turn_of if t >= 0})
            if not turns:  # truncated before its first reply, or a B2F replay that finished the task
                continue
            key = (step, ep.task)
            if key in self.streams:
                raise ValueError(f"task {ep.task!r} appears twice in the rollout of step {step}")
            self.streams[key] = {"ids": list(ep.ids), "turn_of": list(ep.turn_of), "teacher": teacher_logp[i]}
            self.rows += [(step, ep.task, t) for t in turns]
            added += len(turns)
        return added

    def ready(self) -> bool:
        return len(self.rows) >= self.per_update

    def take(self) -> tuple[list[Episode], list[torch.Tensor | None]]:
        """The next step's rows, one piece per episode: its stream cut after the last of these rows, the other turns
        untrained (turn -1), and the teacher's log-probs cut to match."""
        rows, self.rows = self.rows[: self.per_update], self.rows[self.per_update :]
        chosen: dict[tuple[int, str], set[int]] = {}
        for step, task, turn in rows:
            chosen.setdefault((step, task), set()).add(turn)
        waiting = {(s, t) for s, t, _ in self.rows}
        pieces, teacher = [], []
        for key, turns in chosen.items():
            stream = self.streams[key] if key in waiting else self.streams.pop(key)
            turn_of = [t if t in turns else -1 for t in stream["turn_of"]]
            end = max(p for p, t in enumerate(turn_of) if t >= 0) + 1
            pieces.append(Episode(key[1], ids=stream["ids"][:end], turn_of=turn_of[:end]))
            teacher.append(None if stream["teacher"] is None else stream["teacher"][:end])
        return pieces, teacher

    def state_dict(self) -> dict:
        return {"per_update": self.per_update, "rows": list(self.rows),
                "streams": [{"step": s, "task": t, **v} for (s, t), v in self.streams.items()]}

    def load_state_dict(self, state: dict) -> None:
        if state["per_update"] != self.per_update:
            raise ValueError(f"the checkpoint's buffer drains {state['per_update']} rows a step, this run {self.per_update}")
        self.rows = [tuple(r) for r in state["rows"]]
        self.streams = {(v["step"], v["task"]): {k: v[k] for k in ("ids", "turn_of", "teacher")} for v in state["streams"]}


def share(pieces: list[Episode], rank: int, world: int) -> list[int]:
    """This rank's pieces of a step: longest first, dealt in turn, so the ranks' token counts stay close and their
    piece counts differ by at most one (their micro-batch counts may differ: dist.sum_gradients reduces once, after
    all of them, so no rank waits on another's backward; under --fsdp, dist.even_passes pads them)."""
    order = sorted(range(len(pieces)), key=lambda j: (-len(pieces[j].ids), j))
    return order[rank::world]


def train(buffer: TurnBuffer, student, teacher, optimizer, cfg: UpdateConfig, dist=None) -> dict:
    """Every optimizer step the buffer holds rows for, in order; each step's outcome (skipped or not) in `outcomes`.
    Per-token telemetry is off here: the step's metrics come from the scoring on arrival."""
    cfg = replace(cfg, telemetry=False)
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    results = []
    while buffer.ready():
        pieces, teacher_logp = buffer.take()
        mine = share(pieces, rank, world)
        cached = [teacher_logp[j] for j in mine] if cfg.estimator == "k1" and all(t is not None for t in teacher_logp) else None
        results.append(score_and_update(student, teacher, [pieces[j] for j in mine], optimizer, cfg, dist, teacher_logp=cached))
    taken = [r for r in results if not r["skipped"]]
    mean = lambda key: sum(r[key] for r in results) / len(results) if results else None  # noqa: E731
    return {"loss": mean("loss"), "grad_norm": mean("grad_norm"), "updates": len(taken),
            "outcomes": [r["skipped"] for r in results]}


def update(buffer: TurnBuffer, step: int, student, teacher, episodes, optimizer, cfg: UpdateConfig, dist=None) -> tuple:
    """A rollout's part in the update: score it (its KL metrics at the weights that sampled it; the teacher's
    log-probs kept for the update), queue every rank's episodes, and take every full step the buffer then holds.
    -> (the update's results, all ranks' episodes, their per-token KL records), as tcod.py's loop logs them."""
    amp = precision(cfg.dtype, str(model_device(student)))[2]
    teacher_logp = []
    with fsdp.gathered(student):  # --fsdp: ranks score different numbers of micro-batches, so no per-layer collective
        kl_tokens = score_episodes(student, teacher, episodes, cfg.micro_batch, amp, cfg.telemetry, teacher_logp=teacher_logp)
    if dist:
        teacher_logp = [t for part in dist.gather(teacher_logp) for t in part]  # rank order, as gather_episodes
    episodes, kl_tokens = gather_episodes(dist, episodes, kl_tokens)
    added = buffer.add(step, episodes, teacher_logp)
    out = train(buffer, student, teacher, optimizer, cfg, dist)
    # A rollout without a student turn counts as a skipped update (the run stops after --max-bad-steps of them in a
    # row); one that only fills the buffer is waiting, not skipped.
    out["outcomes"] += [True] * (added == 0)
    out["skipped"] = added == 0 or (bool(out["outcomes"]) and not out["updates"])
    return out, episodes, kl_tokens
