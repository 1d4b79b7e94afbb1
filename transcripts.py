"""What the model did: episodes decoded turn by turn, written to the run directory and printed on demand.

    python transcripts.py runs/tinyworld-f2b-s0                 # the newest transcript file of a run
    python transcripts.py runs/tinyworld-f2b-s0/transcripts/eval-step-40.jsonl --episodes 2

tcod.py writes <out>/transcripts/train-step-<n>.jsonl every --transcript-every steps and eval-step-<n>.jsonl at each
evaluation: one JSON line per episode (the first --transcript-episodes of the batch), each turn with the text the
model saw since its last reply, its reply, the action parsed from it, and the summed per-token KL of the reply
(log p_student - log p_teacher over its tokens). Long texts are cut to MAX_CHARS, so a file stays small.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import cli
import rundir
from prompts import parse_action

MAX_CHARS = 2000


def cut(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS // 2] + " [...] " + text[-MAX_CHARS // 2 :]


def segments(turn_of: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal turn_of values as (turn, start, stop): -1 is context (prompts, observations, replayed turns)."""
    out, start = [], 0
    for i in range(1, len(turn_of) + 1):
        if i == len(turn_of) or turn_of[i] != turn_of[start]:
            out.append((turn_of[start], start, i))
            start = i
    return out


def transcript(episode, tok, kl_by_turn: dict[int, float]) -> dict:
    """One episode as a list of turns: {"context", "reply", "action", "kl"}; kl_by_turn maps turn -> summed KL."""
    turns, context = [], []
    for turn, start, stop in segments(episode.turn_of):
        text = tok.decode(episode.ids[start:stop], skip_special_tokens=False)
        if turn < 0:
            context.append(text)
            continue
        reply = tok.decode(episode.ids[start:stop], skip_special_tokens=True)
        action, why = parse_action(reply)
        turns.append({"turn": turn, "context": cut("".join(context)), "reply": cut(reply),
                      "action": action if action is not None else f"(invalid: {why})", "kl": kl_by_turn.get(turn)})
        context = []
    return {"task": episode.task, "success": episode.success, "score": episode.score, "prefix": episode.prefix,
            "turns": turns, "end": cut("".join(context))}


def write(path: str, episodes: list, tok, kl_tokens: list, n: int) -> None:
    """The first n episodes' transcripts to path (kl_tokens: (episode index, turn, d) as tcod.py collects them)."""
    sums = [{} for _ in episodes]
    for i, t, v, *_ in kl_tokens:  # records may carry telemetry after d (opd.per_token)
        if i < n:
            sums[i][t] = sums[i].get(t, 0.0) + v
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for ep, s in zip(episodes[:n], sums):
            f.write(json.dumps(transcript(ep, tok, s)) + "\n")
    os.replace(tmp, path)


def show(path: str, episodes: int = 1) -> str:
    """A transcript file as readable text (a run directory: its newest file)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "transcripts", "*-step-*.jsonl")) or glob.glob(os.path.join(path, "*-step-*.jsonl")),
                       key=os.path.getmtime)  # a run directory, or its transcripts/ folder
        if not files:
            raise FileNotFoundError(f"no transcripts in {path}/transcripts: not a tcod run, one that has not reached its "
                                    "first evaluation yet, or one run with --transcript-episodes 0")
        path = files[-1]
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: neither a run directory nor a transcript file")
    rows, damaged = rundir.read_jsonl(path, ("task", "turns"))
    if damaged:
        print(f"warning: {path}: damaged lines skipped: {damaged[:5]}", file=sys.stderr)
    if not rows:
        raise ValueError(f"{path} holds no complete transcript: not a transcript file, or one still being written")
    lines = [f"# {path}"]
    for row in rows[:episodes]:
        lines.append(f"\n## {row['task']}: success {row['success']}, score {row['score']:.2f}, {row['prefix']} replayed")
        for t in row["turns"]:
            kl = "" if t["kl"] is None else f" (KL {t['kl']:.2f})"
            lines += [f"\n--- turn {t['turn']}: seen\n{t['context'].strip()}", f"--- reply{kl}\n{t['reply'].strip()}",
                      f"--- action: {t['action']}"]
        if row["end"].strip():
            lines.append(f"\n--- after the last reply\n{row['end'].strip()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("path", metavar="RUN_DIR_OR_FILE", help="a run directory (its newest transcript) or a transcript file")
    parser.add_argument("--episodes", type=int, default=1, help="episodes to print (default 1)")
    a = parser.parse_args(argv)
    if a.episodes < 1:
        raise ValueError(f"--episodes {a.episodes}: must be an integer >= 1")
    return show(a.path, a.episodes)


if __name__ == "__main__":
    cli.run(lambda: print(main()))
