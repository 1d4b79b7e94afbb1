"""Speed, measured as ratios of two variants run side by side in one process on the same inputs.

    python bench.py                 # tiny models on CPU (or the GPU when there is one)
    python bench.py --quick         # a seconds-long smoke run (the tests use it to keep this file working)
    python bench.py --student DIR --teacher DIR --device cuda --dtype bfloat16

Prints a table and writes bench.json. Each row names the two variants and their ratio:
  rollout    batched rollout of N episodes vs one episode at a time (generated tokens/s)
  scoring    the teacher scoring whole trajectories in one pass vs once per turn with the growing prompt
  kv-cache   rollout keeping the KV cache across turns vs re-prefilling the whole history every turn
  logprob    peak memory of chosen-token log-probs at vocab 151,936 x 2,048 tokens: chunked vs full float32
  step       a whole training step, and the step time over the sum of its parts measured alone
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import tyro

import kl
import tcod
from curriculum import Plan
from envs import EnvPool, make_env


@dataclass
class Args:
    student: str = "tiny-student"
    """student model (short name, hub id or directory)"""
    teacher: str = "tiny-teacher"
    """teacher model"""
    env: str = "tinyworld"
    """environment for the rollouts"""
    episodes: int = 16
    """episodes per batch"""
    turns: int = 10
    """turns per episode"""
    device: str | None = None
    """default: cuda if available"""
    dtype: str = "auto"
    """auto, float32 or bfloat16"""
    quick: bool = False
    """a smoke run: few episodes and turns, small memory test"""
    out: str = "bench.json"
    """where the figures go"""


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


class RePrefillDecoder(tcod.Decoder):
    """The no-cache baseline: a fresh cache every turn, so each turn re-reads the whole history."""

    def reply(self, streams, *a, **k):
        self.__init__(self.model, self.vocab_size, self.gen)
        return super().reply(streams, *a, **k)

    def keep(self, rows):
        pass  # the next turn starts from scratch anyway


def roll(model, chat, env_name, tasks, turns, seed=0, decoder=None):
    env = make_env(env_name)
    old, tcod.Decoder = tcod.Decoder, decoder or tcod.Decoder
    try:
        return tcod.rollout(
            model, chat, EnvPool(env_name, {}, 0), env, tasks, [Plan(0, turns)] * len(tasks), [None] * len(tasks),
            temperature=1.0, max_new_tokens=24, max_turns=turns, max_context=1 << 20, think=False,
            generator=torch.Generator().manual_seed(seed),
        )
    finally:
        tcod.Decoder = old


def logprob_peak_memory(variant: str, T: int, V: int, H: int = 64) -> float:
    """Peak RSS growth (MB) of one forward+backward, in a fresh process so that earlier work does not hide it."""
    code = f"""
import resource, torch, kl
torch.manual_seed(0)
h = torch.randn(1, {T}, {H}, requires_grad=True); head = torch.nn.Linear({H}, {V}, bias=False)
y = torch.randint(0, {V}, (1, {T}))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if "{variant}" == "chunked":
    lp = kl.token_logprobs(h, head, y)
else:
    lp = torch.log_softmax(head(h).float(), -1).gather(-1, y[..., None])[..., 0]
lp.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode:
        raise RuntimeError(out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


def main(args: Args) -> dict:
    torch.manual_seed(0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n, turns = (4, 3) if args.quick else (args.episodes, args.turns)
    run = tcod.Args(student=args.student, teacher=args.teacher)
    chat = tcod.Chat(tcod.load_tokenizers(run))
    student = tcod.load_model(tcod.resolve_model(args.student), args.dtype, device)
    teacher = tcod.load_model(tcod.resolve_model(args.teacher), args.dtype, device).requires_grad_(False)
    tasks = make_env(args.env).tasks("train")[:n]
    rows = []

    # 1. batched rollout vs one episode at a time
    batched, t_batch = timed(lambda: roll(student, chat, args.env, tasks, turns))
    serial, t_serial = timed(lambda: [e for t in tasks for e in roll(student, chat, args.env, [t], turns)])
    tps = lambda eps, t: sum(e.reply_tokens for e in eps) / t
    rows.append(("rollout", f"batched {n}", tps(batched, t_batch), "one at a time", tps(serial, t_serial), "tokens/s"))

    # 2. one-pass scoring vs per-turn scoring with the growing prompt (the anchors' way: O(T^2) tokens)
    def one_pass():
        out = []
        for ep in batched:
            ids = torch.tensor([ep.ids], device=device)
            out.append(kl.token_logprobs(tcod.hidden_states(teacher, ids), teacher.get_output_embeddings(), kl.causal_targets(ids))[0])
        return out, sum(len(ep.ids) for ep in batched)

    def per_turn():
        out, tokens = [], 0
        for ep in batched:
            turn_ids = torch.tensor(tcod.trained_turns(ep))
            lp = torch.zeros(len(ep.ids), device=device)
            for t in sorted(set(turn_ids.tolist()) - {-1}):
                pos = (turn_ids == t).nonzero()[:, 0]
                end = pos.max().item() + 2
                ids = torch.tensor([ep.ids[:end]], device=device)
                lp[pos] = kl.token_logprobs(tcod.hidden_states(teacher, ids), teacher.get_output_embeddings(), kl.causal_targets(ids))[0][pos]
                tokens += end
            out.append(lp)
        return out, tokens

    with torch.no_grad():
        (lp_one, tok_one), t_one = timed(one_pass)
        (lp_turn, tok_turn), t_turn = timed(per_turn)
    diff = max(
        (a - b)[torch.tensor(tcod.trained_turns(ep)) >= 0].abs().max().item() for a, b, ep in zip(lp_one, lp_turn, batched) if ep.reply_tokens
    )
    rows.append(("scoring", "one pass", tok_one / t_one, "per turn", tok_turn / t_turn, "tokens/s"))
    rows.append(("scoring time", "one pass", 1 / t_one, "per turn", 1 / t_turn, f"1/s; tokens {tok_one} vs {tok_turn}; max |diff| {diff:.1e}"))

    # 3. KV cache across turns vs re-prefill every turn
    cached, t_cached = timed(lambda: roll(student, chat, args.env, tasks, turns, seed=1))
    fresh, t_fresh = timed(lambda: roll(student, chat, args.env, tasks, turns, seed=1, decoder=RePrefillDecoder))
    same = [e.ids for e in cached] == [e.ids for e in fresh]
    rows.append(("kv-cache", "reuse", tps(cached, t_cached), "re-prefill", tps(fresh, t_fresh), f"tokens/s; same tokens: {same}"))

    # 4. memory of chosen-token log-probs
    T, V = (1024, 151_936) if args.quick else (2048, 151_936)
    full, chunked = logprob_peak_memory("full", T, V), logprob_peak_memory("chunked", T, V)
    rows.append(("logprob memory", "chunked", 1 / max(chunked, 1e-3), "full fp32", 1 / max(full, 1e-3), f"1/MB; {chunked:.0f} vs {full:.0f} MB, T={T}"))

    # 6. a whole training step split into parts, and step / sum of the model passes alone
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.0)
    step_args = tcod.Args(micro_batch=4)
    episodes, t_roll = timed(lambda: roll(student, chat, args.env, tasks, turns, seed=2))
    _, t_update = timed(lambda: tcod.score_and_update(student, teacher, episodes, optimizer, step_args))
    with torch.no_grad():
        _, t_teacher = timed(lambda: [tcod.hidden_states(teacher, tcod.pad([episodes[i].ids for i in mb], 0, device)) for mb in tcod.microbatches(episodes, 4)])
    t_total = t_roll + t_update
    rows.append(("step", "rollout s", t_roll, "update s (teacher fwd alone)", t_update, f"teacher forward alone {t_teacher:.2f}s; step {t_total:.2f}s"))

    header = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, " \
             f"student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M, teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M, dtype {next(student.parameters()).dtype}"
    print(header)
    print(f"| what | A | value A | B | value B | A/B | unit |\n|---|---|---|---|---|---|---|")
    for name, a, va, b, vb, unit in rows:
        print(f"| {name} | {a} | {va:.3g} | {b} | {vb:.3g} | {va / vb:.2f}x | {unit} |")
    result = {"machine": header, "rows": [dict(zip(("what", "a", "value_a", "b", "value_b", "unit"), r)) for r in rows]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
