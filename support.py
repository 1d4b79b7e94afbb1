"""The teacher's support, measured: where can the teacher still guide the student?

The paper's mechanism (sec. 4.1): a student that errs early drifts into states where the teacher's supervision is
unreliable, so the per-token signal there misleads it, and the errors compound. Two measures, for envs with an
expert that acts from any state (TinyWorld's `expert()`):

  profile   the teacher's success when it takes over from the expert's own states and from perturbed ones: the
            expert's path up to a random point, then 0, 1, 2 or 3 random admissible actions, then the teacher plays
            the rest of the horizon (seeded). A teacher with narrow support succeeds from the expert's states and
            fails once a few wrong moves were made.
  off_path  over the states a student actually visited (its episodes), the share where the teacher's greedy reply
            is not the expert's `<action>a</action>`: the states where the teacher would lead the student astray. Logged by tcod.py at
            each evaluation, for the eval episodes (`eval_teacher_off_path`) and the step's training episodes
            (`teacher_off_path`), so it can be followed over training for every curriculum.

    python support.py --teacher tiny-teacher        # the profile of a teacher, as a table
    python support.py --teacher tiny-teacher --env tinyworld-drift   # ... in another tiny world
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch

from curriculum import Plan
from prompts import format_reply, parse_action
from rollout import Episode, rollout


def has_expert(env) -> bool:
    return callable(getattr(env, "expert", None))


def visited_states(env, chat, episode: Episode) -> list[tuple[int, list[int], str]]:
    """Per student turn of an episode: (turn index, the stream up to its reply, the expert's action from that state).

    The episode is replayed in `env` (its replayed B2F prefix, then the student's parsed actions; a refused reply
    changes nothing), so the states are the ones the student saw. The stream is cut where the student's reply began,
    which is exactly what a model would be asked to continue there."""
    starts = {}  # turn index -> first token of the student's reply
    for pos, t in enumerate(episode.turn_of):
        if t >= 0 and t not in starts:
            starts[t] = pos
    step, out = env.reset(episode.task), []
    for action in episode.actions[: episode.prefix]:
        step = env.step(action)
    for t in sorted(starts):
        if step.done:
            break
        out.append((t, episode.ids[: starts[t]], env.expert()))
        stop = starts[t]
        while stop < len(episode.turn_of) and episode.turn_of[stop] == t:  # the reply's own tokens
            stop += 1
        action, _ = parse_action(chat.tok.decode(episode.ids[starts[t] : stop], skip_special_tokens=True))
        if action is not None:
            step = env.step(action)
    return out


@torch.no_grad()
def follows_expert(model, chat, states: list[tuple[int, list[int], str]], batch: int = 16) -> list[bool]:
    """Per state: is the expert's reply `<action>a</action>` exactly the model's greedy reply there? A greedy decode
    gives a sequence iff each of its tokens is the argmax after the ones before it, so one teacher-forced forward per
    state answers this without decoding. Rows are left-padded so that every row ends with its reply and only the
    reply's logits are computed (no [T, V] tensor for the prompt)."""
    device, out = next(model.parameters()).device, []
    for b in range(0, len(states), batch):
        rows = [(ids, chat.assistant(format_reply(expert))) for _, ids, expert in states[b : b + batch]]
        n, L = max(len(i) + len(r) for i, r in rows), max(len(r) for _, r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for j, (prompt, reply) in enumerate(rows):
            ids[j, n - len(prompt) - len(reply) :] = torch.tensor(prompt + reply)
            mask[j, n - len(prompt) - len(reply) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                       logits_to_keep=L + 1).logits[..., : len(chat.tok)]
        best = logits.argmax(-1)  # [B, L + 1]: kept position k predicts the token at n - L + k
        for j, (_, reply) in enumerate(rows):
            out.append(best[j, L - len(reply) : L].tolist() == reply)
    return out


def off_path(teacher, chat, env, episodes: list[Episode], *, max_turns: int, prefix: str = "", max_states: int = 64) -> dict:
    """Share of the student's visited states where the teacher's greedy reply is not the expert's (overall, and per
    turn index; over a seeded sample of max_states states); {} for an env without an expert."""
    if not has_expert(env):
        return {}
    states = [s for ep in episodes for s in visited_states(env, chat, ep)]
    if not states:
        return {}
    if len(states) > max_states:  # a fixed-size sample keeps the cost flat (a share's SD is at most 6 % at 64 states)
        states = random.Random(0).sample(states, max_states)
    off = [not f for f in follows_expert(teacher, chat, states)]
    by_turn = [[o for (t, _, _), o in zip(states, off) if t == turn] for turn in range(max_turns)]
    return {f"{prefix}teacher_off_path": sum(off) / len(off),
            f"{prefix}teacher_off_path_by_turn": [sum(v) / len(v) if v else None for v in by_turn]}


def perturbed_prefix(env, task: str, n_random: int, rng: random.Random) -> list[str] | None:
    """The expert's path up to a random point, then n_random random admissible actions (None if the task ended)."""
    demo = env.demo(task)
    cut = rng.randrange(len(demo))  # at least one expert action remains to be done
    step = env.reset(task)
    for a in demo[:cut]:
        step = env.step(a)
    actions = demo[:cut]
    for _ in range(n_random):
        a = rng.choice(env.admissible())
        step = env.step(a)
        actions.append(a)
        if step.done:
            return None
    return actions


def profile(teacher, chat, envs, env, tasks: list[str], *, prompt: str, think: bool, max_new_tokens: int,
            perturbations=(0, 1, 2, 3), temperature: float = 0.0, seed: int = 0) -> dict:
    """The teacher's success rate taking over after each number of random actions (the same cut points for every
    number, seeded per task), playing the rest of the env's horizon."""
    out = {}
    for n in perturbations:
        rngs = [random.Random(seed * 1_000_003 + i) for i in range(len(tasks))]
        prefixes = [perturbed_prefix(env, t, n, r) for t, r in zip(tasks, rngs)]
        keep = [(t, p) for t, p in zip(tasks, prefixes) if p is not None]
        # the teacher gets a whole horizon of its own after the prefix, so that what is measured is recovery, not time
        plans = [Plan(len(p), env.max_turns) for _, p in keep]
        episodes = rollout(teacher, chat, envs, env, [t for t, _ in keep], plans, [p for _, p in keep],
                           temperature=temperature, max_new_tokens=max_new_tokens,
                           max_turns=max(len(p) for _, p in keep) + env.max_turns, max_context=1 << 20, think=think,
                           prompt=prompt, generator=torch.Generator().manual_seed(seed))
        out[n] = {"tasks": len(keep), "success": sum(e.success for e in episodes) / max(len(keep), 1)}
    return out


@dataclass
class Args:
    teacher: str = "tiny-teacher"
    """the teacher: a tiny model's name (models.TINY)"""
    env: Literal["tinyworld", "tinyworld-recall", "tinyworld-drift"] | None = None
    """the world to measure it in (default: the one it was trained in)"""
    tasks: int = 100
    """held-out tasks (the env's first eval split)"""
    seed: int = 0
    """seeds the cut points and the random actions"""


def main(args: Args) -> dict:
    import models
    from envpool import EnvPool
    from envs import make_env
    from rollout import Chat

    env = make_env(args.env or models.tiny_env(args.teacher))
    chat = Chat(models.load_tokenizers(args.teacher, args.teacher))
    teacher = models.load_model(models.resolve_model(args.teacher), "float32", "cpu").eval()
    result = profile(teacher, chat, EnvPool(env.name, {}, 0), env, env.tasks("test")[: args.tasks], prompt="compact",
                     think=False, max_new_tokens=32, seed=args.seed)
    print("| random actions before the teacher takes over | tasks | teacher success |\n|---|---|---|")
    for n, r in result.items():
        print(f"| {n} | {r['tasks']} | {r['success']:.2f} |")
    return result


if __name__ == "__main__":
    import tyro  # only for the command line: tcod.py and gpu_check.py import this module

    main(tyro.cli(Args))
