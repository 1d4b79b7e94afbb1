"""TCOD: Temporal Curriculum On-Policy Distillation for multi-turn LLM agents (arXiv 2604.24005).

One training step n, the paper's step n + 1 (this file: the arguments and the loop, as the paper's Algorithm 1;
preflight.py checks the arguments, rundir.py keeps the run directory, opd.py the update, buffer.py the update buffer,
eval.py the evaluation):
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

import functools
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from tqdm import tqdm

import cli
import fingerprint
import fsdp
import lora
import rundir
import track
import transcripts
from buffer import TurnBuffer, update as update_from_buffer
from curriculum import Curriculum, load_demos
from dist import Dist, gather_episodes
from envpool import EnvPool
from envs import eval_panel, make_env
from eval import during_training
from lock import release_lock
from models import load_model, load_tokenizers, resolve_model, size_warning
from opd import UpdateConfig, default_aggregation, kl_metrics, step_metrics, update
from preflight import check_tasks, memory_plan, resolve_args, stream_cap
from rollout import Chat, precision, rollout
from rundir import PER_INVOCATION, append_metrics, check_weights, plan_start, read_run_args, save_checkpoint, write_json


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



def update_config(args: Args) -> UpdateConfig:
    """The update's settings from the run's Args (aggregation None: the env's and curriculum's default)."""
    return UpdateConfig(
        estimator=args.estimator, kl_coef=args.kl_coef, jsd_beta=args.jsd_beta,
        aggregation=args.aggregation or default_aggregation(args.env, args.curriculum), grad_clip=args.grad_clip,
        micro_batch=args.micro_batch, turns_per_update=args.turns_per_update or 0, dtype=args.dtype,
        tis_cap=args.tis_cap,
    )




# --------------------------------------------------------------------------------------------------
# Set-up, above the loop: the arguments are checked in preflight.py, the run directory's life is rundir.py's, the
# evaluation is eval.py's; here the models, the trainer's state, the rollout engine and one step's metrics row.


def load_models(args: Args, ckpt: str | None, mode: str, weights: dict, loaded: tuple, lead: bool, dist):
    """The student (from the checkpoint on a resume; a frozen base with LoRA adapters; FSDP shards) and the frozen
    teacher. Returns them with the autocast dtype and the fingerprints of the weights that loaded."""
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
    return student, teacher, amp, weights


def trainer_state(args: Args, student, ckpt: str | None):
    """AdamW, the curriculum and the update buffer (--update-from buffer), fresh or as the checkpoint left them, with
    the step to start at and the count of skipped updates in a row."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    curriculum = Curriculum(args.curriculum, args.k_start, args.eta, args.max_turns, args.kl_gate, args.max_dwell)
    buffer = TurnBuffer(args.turns_per_update) if args.update_from == "buffer" else None
    if not ckpt:
        return optimizer, curriculum, buffer, 0, 0
    state = torch.load(os.path.join(ckpt, "trainer.pt"), weights_only=False)
    if args.fsdp:
        fsdp.load_optimizer(student, optimizer, ckpt)  # AdamW's state is in the shards
    else:
        optimizer.load_state_dict(state["optimizer"])
    if buffer is not None and "buffer" in state:  # the rows a step was waiting for: the resume trains them
        buffer.load_state_dict(state["buffer"])
    return optimizer, Curriculum.from_state_dict(state["curriculum"]), buffer, state["step"], state.get("bad_in_a_row", 0)


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
    rank = dist.rank if dist else 0
    file_demos = load_demos(args.demos, args.env)["demos"] if args.demos else None
    if lead:
        print(f"student {args.student}, teacher {args.teacher}")
        if warning := size_warning(args.student, args.teacher):
            print(warning)
    tok = load_tokenizers(args.student, args.teacher)  # fails on a mismatch before the (large) models load
    chat = Chat(tok)
    env_kwargs = {"data": args.env_data} if args.env_data else {}
    env = make_env(args.env, **env_kwargs)
    train_tasks, eval_tasks = env.tasks("train"), eval_panel(env, env.eval_splits[0], args.eval_tasks)
    check_tasks(args, env, train_tasks, eval_tasks, file_demos, chat)
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
    if lead:
        rundir.take(args.out, mode, asdict(args) | {"weights": weights}, args.force, locks)
    student, teacher, amp, weights = load_models(args, ckpt, mode, weights, loaded, lead, dist)
    optimizer, curriculum, buffer, start, bad_in_a_row = trainer_state(args, student, ckpt)
    if ckpt and lead:
        rundir.resumed(args.out, start, changed, asdict(args) | {"weights": weights})
    envs = EnvPool(args.env, env_kwargs, args.env_workers, step_timeout=args.env_timeout)
    engine = None
    if args.rollout == "vllm":  # from the weights the student was loaded from
        from vllm_engine import start_engine

        engine = start_engine(student, ckpt or resolve_model(args.student), len(tok), args.device, amp, args.seed,
                              mem_plan["vllm_memory"], args.vllm_sleep, args.tasks_per_step)
    model_limit = min(getattr(m.config, "max_position_embeddings", 1 << 30) for m in (student, teacher))
    max_context, eval_context = (stream_cap(args, model_limit, r) for r in (args.max_new_tokens, args.eval_max_new_tokens))
    run_eval = functools.partial(
        during_training, student=student, teacher=teacher, chat=chat, envs=envs, env=env, tasks=eval_tasks,
        batch=args.tasks_per_step, temperature=args.eval_temperature, max_new_tokens=args.eval_max_new_tokens,
        max_context=eval_context, max_turns=args.max_turns, think=args.think, prompt=args.prompt, engine=engine,
        seed=args.seed + 1_000 * rank, micro_batch=args.micro_batch, amp=amp, dist=dist, lead=lead, out=args.out,
        transcript_episodes=args.transcript_episodes)
    tracker = track.Tracker(args.track, args.out, asdict(args), resume=mode == "resume", start=start) if lead and args.track else None
    metrics_path = os.path.join(args.out, "metrics.jsonl")

    def record(row: dict) -> None:
        append_metrics(metrics_path, row)
        if tracker:
            tracker.log(row)

    row = {}
    if start == 0 and args.eval:
        first = {"step": -1, **run_eval(0)}  # the student before training
        if lead:
            record(first)
    # ----------------------------------------------------------------------------------------------
    # The loop: the paper's Algorithm 1. Step n here is the paper's step n + 1.
    for n in (bar := tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"{args.curriculum} {args.env}", disable=not lead)):
        t0 = time.time()
        step_seed = args.seed * 100_003 + n  # all of step n's randomness: resume replays it exactly
        torch.manual_seed(step_seed)
        gen = torch.Generator().manual_seed(step_seed + 1_000_003 * rank)
        tasks = random.Random(step_seed).sample(train_tasks, args.tasks_per_step)
        tasks = dist.shard(tasks) if dist else tasks
        if args.curriculum == "b2f":  # a task's demonstration, made the first time it is drawn (unless from --demos)
            demos |= {t: None if file_demos is not None else env.demo(t) for t in tasks if t not in demos}
        # The depth k = k_start + n // eta sets each episode's plan: F2B lets the student act for the first min(k, T_max)
        # turns; B2F replays the first L - k actions of the demonstration, then the student acts (none: from scratch).
        plans = [curriculum.plan(n, len(demos[t]) if demos.get(t) else None) for t in tasks]
        no_demo = sum(args.curriculum == "b2f" and not demos[t] for t in tasks)
        with fsdp.gathered(student):  # --fsdp: every layer gathered once per rollout, not at every token
            episodes = rollout(student, chat, envs, env, tasks, plans, [demos.get(t) for t in tasks], temperature=args.train_temperature,
                               generator=gen, amp=amp, max_new_tokens=args.max_new_tokens, max_turns=args.max_turns,
                               max_context=max_context, think=args.think, prompt=args.prompt, engine=engine,
                               desc=f"rollout {n}" if lead else None)
        t1 = time.time()
        if engine is not None:
            engine.sleep()  # its weights and KV cache freed for the update (GPU, --vllm-sleep); sync wakes it
        # The teacher scores the student's tokens; the negative per-token KL is the advantage of the AdamW steps (opd.py)
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
        row = step_metrics(n, k, args.max_turns, episodes, klm, step_update, round(dist.sum(no_demo)) if dist else no_demo, buffer, (t0, t1, t2))
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
        track.finish(args.out, tracker)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}, indent=1))
    if engine is not None:
        engine.close()  # first: vLLM's groups are cut from ours, and closing it destroys both
    if dist:
        dist.close()
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
