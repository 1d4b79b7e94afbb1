"""Success rates on a benchmark's evaluation splits, the paper's way: full horizon, from scratch, temperature 0.4.

    python eval.py --env tinyworld --model tiny-teacher
    python eval.py --env alfworld --model Qwen2.5-7B --limit 20
    python eval.py --env webshop --model runs/webshop-f2b-s0/ckpt

The task panel is each split's tasks in their fixed order (the first --limit of them), rolled out in fixed batches
with fixed seeds, so two evaluations of one model see the same tasks and the same random numbers.
Writes <out>/eval.json and prints a Markdown table (per split, and per task type).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import tyro
from tqdm import tqdm

import tcod
from envs import EnvPool, env_class, make_env


@dataclass
class Args:
    env: str = "tinyworld"
    """tinyworld, alfworld, scienceworld or webshop"""
    model: str = "tiny-teacher"
    """a short name, hub id, local directory or checkpoint directory (<run>/ckpt)"""
    splits: tuple[str, ...] = ()
    """splits to evaluate (default: the env's eval splits, e.g. ALFWorld valid_seen and valid_unseen)"""
    limit: int | None = None
    """evaluate only the first N tasks of each split"""
    temperature: float = 0.4
    """sampling temperature (the paper's eval setting)"""
    max_turns: int | None = None
    """horizon (default: the env's)"""
    max_new_tokens: int = 512
    """most tokens per reply"""
    think: bool | None = None
    """ask for <think> before <action> (default: on, off for the tiny models)"""
    batch: int = 16
    """episodes rolled out together"""
    dtype: str = "auto"
    """auto, float32 or bfloat16"""
    env_data: str | None = None
    """data directory for the env (default: bundled data)"""
    env_workers: int | None = None
    """env worker processes (default: as tcod.py)"""
    seed: int = 0
    """sampling seed"""
    out: str | None = None
    """where eval.json goes (default: runs/eval-<env>-<model>)"""


def summarize(episodes, task_types: dict[str, str]) -> dict:
    n = max(len(episodes), 1)
    by_type = defaultdict(list)
    for ep in episodes:
        by_type[task_types[ep.task]].append(ep.success)
    return {
        "tasks": len(episodes),
        "success": sum(ep.success for ep in episodes) / n,
        "score": sum(ep.score for ep in episodes) / n,
        "rounds": sum(ep.turns for ep in episodes) / n,
        "invalid": sum(ep.invalid for ep in episodes) / max(sum(ep.student_turns for ep in episodes), 1),
        "errors": sum(ep.error is not None for ep in episodes),
        "by_type": {t: {"tasks": len(v), "success": sum(v) / len(v)} for t, v in sorted(by_type.items())},
    }


def markdown(results: dict) -> str:
    lines = ["| split | type | tasks | success | score | rounds |", "|---|---|---|---|---|---|"]
    for split, r in results.items():
        lines.append(f"| {split} | all | {r['tasks']} | {r['success']:.3f} | {r['score']:.3f} | {r['rounds']:.1f} |")
        for t, v in r["by_type"].items():
            lines.append(f"| {split} | {t} | {v['tasks']} | {v['success']:.3f} | | |")
    return "\n".join(lines)


def main(args: Args) -> dict:
    env_cls = env_class(args.env)
    tiny = args.model in tcod.TINY
    run = tcod.Args(
        env=args.env, student=args.model, teacher=args.model, eval_temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, think=(not tiny) if args.think is None else args.think,
        tasks_per_step=args.batch, dtype=args.dtype,
    )
    path = tcod.resolve_model(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = tcod.load_tokenizers(run)
    model = tcod.load_model(path, args.dtype, device)
    chat = tcod.Chat(tok)
    env_kwargs = {"data": args.env_data} if args.env_data else {}
    env = make_env(args.env, **env_kwargs)
    envs = EnvPool(args.env, env_kwargs, tcod.default_workers(args.env) if args.env_workers is None else args.env_workers)
    max_turns = args.max_turns or env_cls.max_turns
    max_context = getattr(model.config, "max_position_embeddings", 1 << 30)
    results = {}
    for split in args.splits or env.eval_splits:
        tasks = env.tasks(split)[: args.limit]
        t0 = time.time()
        episodes = []
        for b in tqdm(range(0, len(tasks), args.batch), desc=f"eval {args.env}/{split}"):
            episodes += tcod.evaluate(model, chat, envs, env, tasks[b : b + args.batch], run, max_turns, max_context, args.seed + b)
        results[split] = summarize(episodes, {t: env.task_type(t) for t in tasks}) | {"seconds": time.time() - t0}
    envs.close()
    env.close()
    out = args.out or os.path.join("runs", f"eval-{args.env}-{os.path.basename(os.path.normpath(args.model))}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
