"""Success rates on a benchmark's evaluation splits, the paper's way: full horizon, from scratch, temperature 0.4.

    python eval.py --env tinyworld --model tiny-teacher
    python eval.py --env alfworld --model Qwen2.5-7B --limit 20
    python eval.py --env webshop --model runs/webshop-f2b-s0/ckpt
    python eval.py --env alfworld --model oracle                          # the env's own demonstrations
    python eval.py --env scienceworld --model Qwen3-4B --per-type 2       # 2 variations of each of the 30 task types
    python eval.py --env alfworld --model Qwen2.5-7B --splits train --samples 4   # teacher demos for B2F and SFT
    python eval.py --env alfworld --model Qwen2.5-3B --splits hard --demos runs/eval-alfworld-Qwen2.5-7B/demos.json

The task panel is each split's tasks in their fixed order (the first --limit of them), rolled out in fixed batches
with fixed seeds, so two evaluations of one model see the same tasks and the same random numbers.
--samples K plays every task K times (sample j with its own fixed seed) and reports pass@K next to the success
rate of sample 0; it writes <out>/demos.json: per task, the first successful trajectory's actions and reply
texts (what `tcod.py --curriculum b2f --demos` replays and `sft.py baseline` trains on), and the tasks no sample
solved (the "hard" split, the paper's teacher-fails set: `--splits hard --demos FILE` evaluates on it).
--model oracle plays each task's env-provided demonstration instead of a model: the ceiling of the panel.
Writes <out>/episodes.jsonl as it goes (one row per finished episode, so a killed evaluation keeps its batches),
then <out>/eval.json (the arguments as used: splits, horizon, think, max new and prompt tokens) and <out>/eval.md, and prints
the Markdown table (per split, and per task type). Nothing is ever overwritten: the default <out> gets -2, -3, ...
when taken; an explicit --out must be new or empty. A tcod run directory or its checkpoint as --model
brings the run's env, think, eval reply cap (--eval-max-new-tokens), prompt cap and horizon, unless given here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

import cli
import fsdp
import models
import preflight
import rundir
import rollout
import support
import track
import transcripts
from curriculum import load_demos
from dist import gather_episodes
from envpool import EnvPool
from envs import check_java, env_class, make_env
from opd import episode_metrics, kl_metrics, score_episodes
from prompts import default_style

ORACLE = "oracle"


@dataclass
class Args:
    env: str | None = None
    """tinyworld, alfworld, scienceworld or webshop (default: the run's, for a tcod run's checkpoint; else tinyworld)"""
    model: str = "tiny-teacher"
    """a short name, hub id, local directory, a tcod run directory or its checkpoint (<run>/ckpt: the run's env, think,
    eval reply and prompt caps and horizon are the defaults), or 'oracle' (the env's demos)"""
    splits: tuple[str, ...] = ()
    """splits to evaluate (default: the env's eval splits, e.g. ALFWorld valid_seen and valid_unseen); 'hard' is
    the tasks a --demos file's model never solved"""
    limit: int | None = None
    """evaluate only the first N tasks of each split"""
    per_type: int | None = None
    """evaluate only the first N tasks of each task type in each split (a smaller panel that still covers every type)"""
    samples: int = 1
    """K: play each task K times; reports pass@K and writes the first success of each task to <out>/demos.json"""
    demos: str | None = None
    """a demos.json from an earlier --samples run, for --splits hard"""
    temperature: float = 0.4
    """sampling temperature (the paper's eval setting)"""
    max_turns: int | None = None
    """horizon (default: the env's)"""
    max_new_tokens: int | None = None
    """most tokens per reply (default: the run's --eval-max-new-tokens; else 512, 32 for the tiny models)"""
    max_prompt_tokens: int | None = None
    """most tokens read before a reply; an episode whose next prompt would pass it ends as truncated (default: the
    run's --max-prompt-tokens; else the authors' 10240 on the real benchmarks, 0 (no cap) on tinyworld)"""
    think: bool | None = None
    """ask for <think> before <action> (default: on, off for the tiny models)"""
    prompt: Literal["paper", "compact"] | None = None
    """prompt style (prompts.py; default: the run's, else paper on the real benchmarks and compact on tinyworld)"""
    batch: int = 16
    """episodes rolled out together"""
    dtype: str = "auto"
    """auto (bf16 weights on a GPU, float32 on a CPU), float32 or bf16-mixed (bf16 weights: eval only runs forwards)"""
    env_data: str | None = None
    """data directory for the env (default: bundled data)"""
    env_workers: int | None = None
    """env worker processes (default: as tcod.py)"""
    seed: int = 0
    """sampling seed"""
    out: str | None = None
    """where eval.json goes: a new or empty directory (default: runs/eval-<env>-<model>, with -2, -3, ... when taken)"""


def summarize(episodes, task_types: dict[str, str]) -> dict:
    n = max(len(episodes), 1)
    by_type = defaultdict(list)
    for ep in episodes:
        by_type[task_types[ep.task]].append(ep)
    return {
        "tasks": len(episodes),
        "success": sum(ep.success for ep in episodes) / n,
        "score": sum(ep.score for ep in episodes) / n,
        "rounds": sum(ep.turns for ep in episodes) / n,
        "invalid": sum(ep.invalid for ep in episodes) / max(sum(ep.student_turns for ep in episodes), 1),
        "errors": sum(ep.error is not None for ep in episodes),
        "by_type": {
            t: {"tasks": len(v), "success": sum(e.success for e in v) / len(v), "rounds": sum(e.turns for e in v) / len(v)}
            for t, v in sorted(by_type.items())
        },
    }


def markdown(results: dict) -> str:
    k = max((r.get("samples", 1) for r in results.values()), default=1)
    extra = f" pass@{k} |" if k > 1 else ""
    lines = [f"| split | type | tasks | success | score | rounds |{extra}", "|---|---|---|---|---|---|" + "---|" * (k > 1)]
    for split, r in results.items():
        pk = f" {r['pass_at_k']:.3f} |" if k > 1 else ""
        lines.append(f"| {split} | all | {r['tasks']} | {r['success']:.3f} | {r['score']:.3f} | {r['rounds']:.1f} |{pk}")
        for t, v in r["by_type"].items():
            lines.append(f"| {split} | {t} | {v['tasks']} | {v['success']:.3f} | | {v['rounds']:.1f} |" + " |" * (k > 1))
    return "\n".join(lines)


def during_training(step: int, train_episodes=(), *, student, teacher, chat, envs, env, tasks: list[str], batch: int,
                    temperature: float, max_new_tokens: int, max_context: int, max_turns: int, think: bool, prompt: str,
                    engine, seed: int, micro_batch: int, amp, dist, lead: bool, out: str, transcript_episodes: int) -> dict:
    """A training run's evaluation (tcod.py, before training and at its intervals): the full horizon from scratch on
    the held-out panel; the teacher also scores the episodes, so the KL by turn is seen where the curriculum never cut.
    In an env with an expert (TinyWorld), also the teacher's support over the states the student visited, in the eval
    episodes and in the step's training episodes (support.py). Returns the metrics row's eval_* fields."""
    mine = dist.shard(tasks) if dist else tasks
    with fsdp.gathered(student):  # --fsdp: every layer gathered once, for the eval rollout and its scoring
        episodes = rollout.evaluate(student, chat, envs, env, mine, batch=batch, temperature=temperature,
                                    max_new_tokens=max_new_tokens, think=think, prompt=prompt, engine=engine,
                                    max_turns=max_turns, max_context=max_context, seed=seed, amp=amp,
                                    desc=f"eval at step {step}" if lead else None)
        scored = score_episodes(student, teacher, episodes, micro_batch, amp)
    track.kill_point("eval", step)  # a test hook (TCOD_KILL_AT); nothing otherwise
    episodes, kl_tokens = gather_episodes(dist, episodes, scored)
    klm = kl_metrics(kl_tokens, len(episodes), max_turns)
    if lead and transcript_episodes:
        transcripts.write(os.path.join(out, "transcripts", f"eval-step-{step}.jsonl"), episodes, chat.tok, kl_tokens, transcript_episodes)
    row = {**episode_metrics(episodes, "eval_"), **{f"eval_{k}": v for k, v in klm.items()}}
    if lead and support.has_expert(env):
        off = dict(teacher=teacher, chat=chat, env=env, max_turns=max_turns)
        # seeded samples of 64 and 32 states: about 0.1 s each for the tiny teacher on one core
        row |= support.off_path(episodes=episodes, prefix="eval_", max_states=64, **off)
        row |= support.off_path(episodes=list(train_episodes), max_states=32, **off)
    return row


def play_demos(envs, env, tasks: list[str], max_turns: int) -> list[rollout.Episode]:
    """The oracle: each task's env-provided demonstration, played step by step, all tasks at once."""
    demos = [env.demo(t) or [] for t in tasks]
    episodes = [rollout.Episode(t) for t in tasks]
    for ep, s in zip(episodes, envs.reset(tasks)):
        if s.done:
            ep.finish(s)
    for j in range(max_turns):
        slots = [i for i, ep in enumerate(episodes) if not ep.done and j < len(demos[i])]
        if not slots:
            break
        for i, s in zip(slots, envs.step(slots, [demos[i][j] for i in slots])):
            ep = episodes[i]
            ep.turns, ep.student_turns = ep.turns + 1, ep.student_turns + 1
            ep.invalid += not s.valid
            ep.actions.append(demos[i][j])
            if s.done:
                ep.finish(s)
    return episodes


def append_episodes(path: str, split: str, sample: int, episodes) -> None:
    """Written as the evaluation goes, so a killed one keeps its finished batches."""
    with open(path, "a") as f:
        for ep in episodes:
            f.write(json.dumps({"split": split, "sample": sample, "task": ep.task, "success": ep.success, "score": ep.score,
                                "turns": ep.turns, "invalid": ep.invalid, "error": ep.error, "actions": ep.actions}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def panel(tasks: list[str], task_type, per_type: int | None) -> list[str]:
    """The tasks in their fixed order, keeping only the first per_type of each type (all when per_type is None)."""
    if per_type is None:
        return tasks
    seen = defaultdict(int)
    out = []
    for t in tasks:
        seen[task_type(t)] += 1
        if seen[task_type(t)] <= per_type:
            out.append(t)
    return out


def check_args(args: Args) -> None:
    """Range-check the numbers, naming the flag, the value and what is allowed."""
    for flag in ("limit", "per_type", "samples", "batch", "max_turns", "max_new_tokens", "env_workers", "max_prompt_tokens"):
        value = getattr(args, flag)
        low = 0 if flag in ("env_workers", "max_prompt_tokens") else 1
        if value is not None and value < low:
            raise ValueError(f"--{flag.replace('_', '-')} {value!r}: {flag} must be an integer >= {low}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature {args.temperature!r}: must be finite and >= 0 (0: greedy)")
    preflight.check_seed(args.seed)


def run_of(model: str) -> tuple[str, dict | None]:
    """A tcod run directory -> (its last checkpoint, its args.json); a checkpoint of a run -> (itself, the run's args)."""
    if os.path.isdir(model) and rundir.read_run_args(model) is not None:
        if rundir.last_checkpoint(model) is None:
            raise FileNotFoundError(f"--model {model!r} is a tcod run without a checkpoint yet: nothing to evaluate")
        return rundir.usable_checkpoint(model), rundir.read_run_args(model)
    parent = os.path.dirname(os.path.normpath(model))
    if os.path.isdir(model) and parent and rundir.read_run_args(parent) is not None:
        return model, rundir.read_run_args(parent)
    return model, None


def model_label(model: str, run_args: dict | None) -> str:
    """The name in the default output dir: a checkpoint is named by its run (A/ckpt -> A-ckpt), not just 'ckpt'."""
    path = os.path.normpath(model)
    if run_args is not None and os.path.dirname(path):
        return f"{os.path.basename(os.path.dirname(path))}-{os.path.basename(path)}"
    return os.path.basename(path)


def main(args: Args) -> dict:
    check_args(args)
    oracle = args.model == ORACLE
    model_path, run_args = (args.model, None) if oracle else run_of(args.model)
    run_args = run_args or {}
    given = args
    args = dataclasses.replace(  # a run's own settings, unless given here
        args, env=args.env or run_args.get("env", "tinyworld"),
        think=run_args.get("think") if args.think is None else args.think,
        prompt=args.prompt or run_args.get("prompt"),
        max_new_tokens=args.max_new_tokens or run_args.get("eval_max_new_tokens") or run_args.get("max_new_tokens"),
        max_prompt_tokens=run_args.get("max_prompt_tokens") if args.max_prompt_tokens is None else args.max_prompt_tokens,
        max_turns=args.max_turns or run_args.get("max_turns"),
    )
    step = rundir.checkpoint_step(model_path) if os.path.isfile(os.path.join(model_path, "trainer.pt")) else None
    if step is not None:
        print(f"evaluating {model_path}: the checkpoint at step {step} of the run", file=sys.stderr)
    if run_args and args.env != run_args["env"]:
        print(f"note: {given.model} was trained on {run_args['env']}, evaluated here on {args.env}", file=sys.stderr)
    env_cls = env_class(args.env)
    tiny = args.model in models.TINY or run_args.get("student") in models.TINY
    if not oracle:
        models.check_models(model_path, model_path)  # an unknown, empty or (offline) unobtainable model fails here, before anything loads
    splits = args.splits or env_cls.eval_splits
    bad = [s for s in splits if s not in env_cls.splits and s != "hard"]
    if bad:
        raise ValueError(f"{args.env} has splits {env_cls.splits} (and 'hard'), not {bad}")
    if "hard" in splits and args.demos is None:
        raise ValueError("--splits hard needs --demos FILE (a demos.json written by an earlier --samples run)")
    hard = load_demos(args.demos, args.env)["hard"] if "hard" in splits else None
    if args.env == "scienceworld":
        check_java()
    out = rundir.new_output_dir(args.out, os.path.join("runs", f"eval-{args.env}-{model_label(model_path, run_args or None)}"))
    max_new_tokens = args.max_new_tokens or (32 if tiny else 512)
    think = (not tiny) if args.think is None else args.think
    prompt = args.prompt or default_style(args.env)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = chat = None
    max_context = 1 << 30
    if not oracle:
        chat = rollout.Chat(models.load_tokenizers(model_path, model_path))
        model = models.load_model(models.resolve_model(model_path), rollout.precision(args.dtype, device)[1], device)  # inference: the teacher's dtype
        max_context = getattr(model.config, "max_position_embeddings", max_context)
    max_prompt_tokens = (0 if args.env.startswith("tinyworld") else preflight.PAPER_MAX_PROMPT_TOKENS) if args.max_prompt_tokens is None else args.max_prompt_tokens
    if max_prompt_tokens:  # as in training (preflight.stream_cap): a prompt of at most this, and one reply
        max_context = min(max_context, max_prompt_tokens + max_new_tokens)
    env_kwargs = {"data": args.env_data} if args.env_data else {}
    env = make_env(args.env, **env_kwargs)
    envs = EnvPool(args.env, env_kwargs, preflight.default_workers(args.env) if args.env_workers is None else args.env_workers)
    max_turns = args.max_turns or env_cls.max_turns
    used = {**vars(args), "splits": list(splits), "max_turns": max_turns, "max_new_tokens": max_new_tokens,
            "max_prompt_tokens": max_prompt_tokens,
            "think": think, "prompt": prompt, "model_path": model_path, "run": run_args or None, "out": out,
            "checkpoint_step": step}
    episodes_path = os.path.join(out, "episodes.jsonl")  # one row per finished episode, appended per batch
    results, demos, replies, unsolved = {}, {}, {}, []
    try:
        for split in splits:
            tasks = panel(hard if split == "hard" else env.tasks(split), env.task_type, args.per_type)[: args.limit]
            t0 = time.time()
            first, solved = [], {}
            for sample in range(args.samples):
                episodes = []
                for b in tqdm(range(0, len(tasks), args.batch), desc=f"eval {args.env}/{split}" + f" sample {sample}" * (args.samples > 1)):
                    batch = tasks[b : b + args.batch]
                    if oracle:
                        done = play_demos(envs, env, batch, max_turns)
                    else:  # sample j of batch b has its own fixed seed
                        done = rollout.evaluate(model, chat, envs, env, batch, batch=args.batch, temperature=args.temperature,
                                                max_new_tokens=max_new_tokens, think=think, prompt=prompt, max_turns=max_turns,
                                                max_context=max_context, seed=args.seed + b + 1_000_003 * sample, desc="turns")
                    append_episodes(episodes_path, split, sample, done)
                    episodes += done
                first = first or episodes
                for ep in episodes:
                    if ep.success and ep.task not in solved:
                        solved[ep.task] = ep
            results[split] = summarize(first, {t: env.task_type(t) for t in tasks}) | {
                "samples": args.samples, "pass_at_k": len(solved) / max(len(tasks), 1), "seconds": time.time() - t0,
            }
            demos |= {t: ep.actions for t, ep in solved.items()}
            replies |= {t: ep.replies for t, ep in solved.items()}
            unsolved += [t for t in tasks if t not in solved]
    finally:
        envs.close()
        env.close()
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump({"args": used, "results": results}, f, indent=2)
    table = markdown(results)
    with open(os.path.join(out, "eval.md"), "w") as f:
        f.write(table + "\n")
    if args.samples > 1:
        with open(os.path.join(out, "demos.json"), "w") as f:
            json.dump({"env": args.env, "model": args.model, "splits": list(splits), "samples": args.samples,
                       "demos": demos, "replies": replies, "hard": unsolved}, f)
    print(table)
    return results


if __name__ == "__main__":
    import tyro  # here, not at the top: tcod.py imports this module where tyro may not be installed (gpu_check.py)

    cli.run(lambda: main(tyro.cli(Args)))
