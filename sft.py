"""Supervised fine-tuning on demonstrations, and the tiny models of the CPU demo.

SFT (next-token NLL on the assistant tokens of successful demonstrations) is one of the paper's baselines. Here it
also makes the CPU demo's models, offline: a byte-level BPE tokenizer trained on TinyWorld text with a ChatML
template (the Qwen format), and one SFT run of a tiny Qwen2 model on expert demonstrations with injected mistakes
(so it also learns to recover from states the expert never visits). The teacher is the end of that run, the
student a snapshot from its middle. Both are ordinary Hugging Face checkpoints and go through exactly the code
path a 7B model does. Demonstration streams are built with rollout.Chat, the same token layout rollouts produce.

    python sft.py baseline --env alfworld --model Qwen2.5-3B --demos runs/eval-alfworld-Qwen2.5-7B/demos.json
    python sft.py tiny --force          # rebuild the tiny models shipped in data/tiny (seeded; ~35 min on 2 cores)

The baseline trains on the teacher's successful trajectories that `eval.py --samples K --splits train` saved
(their reply texts, replayed through the env to rebuild each chat), `epochs` passes' worth of random batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

import cli
import kl
import models
from rollout import Chat, Episode, evaluate, precision, trained_turns
from envpool import EnvPool
from envs import make_env
from prompts import Prompter, default_style, first_prompt, format_reply, turn_prompt
from tinyworld import TinyWorld

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class BaselineArgs:
    demos: str
    """a demos.json written by `eval.py --samples K` (the teacher's successful trajectories)"""
    env: str = "tinyworld"
    """the env the demonstrations come from"""
    model: str = "tiny-student"
    """the model to fine-tune: a short name, hub id or local directory"""
    epochs: float = 2.0
    """passes over the demonstrations (the paper's SFT baseline trains 2 epochs)"""
    lr: float | None = None
    """AdamW learning rate (default 1e-5; 1e-4 for the tiny models)"""
    batch: int = 16
    """demonstrations per step"""
    think: bool | None = None
    """the prompt asks for <think> (default: on, off for the tiny models); use what the demos were made with"""
    prompt: Literal["paper", "compact"] | None = None
    """prompt style, paper or compact (prompts.py; default: paper on the real benchmarks, compact on tinyworld); use
    what the demos were made with"""
    dtype: str = "auto"
    """auto (bf16-mixed on a GPU, float32 on a CPU), float32 or bf16-mixed: float32 weights, bf16 autocast (rollout.precision)"""
    seed: int = 0
    """data order"""
    out: str | None = None
    """where the fine-tuned model goes: a new or empty directory (default: runs/sft-<env>-<model>, -2, -3, ... when taken)"""


@dataclass
class Args:
    force: bool = False
    """rebuild the tiny tokenizer and models even if they exist"""
    out: str = models.TINY_DIR
    """where the tiny tokenizer and models go"""
    seed: int = 0
    """seeds the demonstrations, the initialization and the data order"""
    teacher_steps: int = 500
    """SFT steps for the tiny teacher"""
    student_steps: int = 255
    """the tiny student is the teacher's network after this many of its SFT steps"""
    snapshots: tuple[int, ...] = ()
    """also save the network at these SFT steps, with its test success, under OUT/snapshots/ (to pick a student)"""
    restart_at: int = 100
    """SFT step at which the optimizer and data order restart (the run that made the shipped models did this)"""
    noise: float = 0.2
    """probability of a random action at each demonstration turn (never trained on; the expert's fix is); 0: expert
    states only, a teacher without recovery skill (support.py measures the difference)"""
    env: Literal["tinyworld", "tinyworld-recall", "tinyworld-drift"] = "tinyworld"
    """the world the demonstrations come from (the tokenizer is TinyWorld's either way, so every tiny model shares it)"""


def recipe_suffix(env: str, noise: float) -> str:
    """What a tiny model's name says of its recipe: -recall / -drift (trained in tinyworld-recall / -drift), -norec (--noise 0: expert
    states only, no recovery skill), -noiseX (another noise); the shipped demo pair has none."""
    return {"tinyworld-recall": "-recall", "tinyworld-drift": "-drift"}.get(env, "") + ("" if noise == 0.2 else "-norec" if noise == 0 else f"-noise{noise:g}")


# --------------------------------------------------------------------------------------------------
# Tokenizer


def tinyworld_texts(n_tasks: int = 300) -> list[str]:
    """Every kind of text a TinyWorld chat holds, for training the tokenizer."""
    env, texts = TinyWorld(), []
    for task in env.tasks("train")[:n_tasks] + env.tasks("test")[:50]:
        step = env.reset(task)
        texts.append(first_prompt(env, step.observation, think=False) + first_prompt(env, step.observation, think=True))
        while not step.done:
            for action in env.admissible():
                texts.append(format_reply(action))
            step = env.step(env.expert())
            texts.append(turn_prompt(1, step.observation) + " invalid reply: no <action>...</action> in the reply. nothing happens.")
    texts += [f"<|im_start|>user\nstep {i}. <|im_end|>\n<|im_start|>assistant\n" for i in range(40)]
    return texts


def build_tokenizer(path: str):
    """A byte-level BPE trained on TinyWorld text, inside Qwen2's own tokenizer class. Qwen2's pre-tokenizer is used
    for training too: AutoTokenizer reloads any tokenizer next to a Qwen2 config as Qwen2Tokenizer, and a BPE trained
    with another pre-tokenizer would then give different ids (tested)."""
    import json

    from tokenizers import Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = Qwen2Tokenizer(vocab={"a": 0}, merges=[])._tokenizer.pre_tokenizer
    alphabet = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 324)]  # all 256 byte-level symbols
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials, initial_alphabet=alphabet)
    bpe.train_from_iterator(tinyworld_texts(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return tok


# --------------------------------------------------------------------------------------------------
# Demonstration streams and SFT


def demo_stream(env, chat, task: str, think: bool, noise: float, rng: random.Random):
    """One demonstration episode as (token ids, per-token trained flag); with noise, random actions are mixed in
    (kept as context, never trained) and the expert's way back from them is trained."""

    ep, step, prompter = Episode(task), env.reset(task), Prompter("compact", env, think)
    ep.add(chat.first(prompter.first(step)))
    while not step.done and ep.turns < env.max_turns:
        expert = env.expert()
        act = rng.choice(env.admissible()) if rng.random() < noise else expert
        ep.add(chat.assistant(format_reply(act)), turn=ep.turns if act == expert else -1)
        step, ep.turns = env.step(act), ep.turns + 1
        if not step.done:
            ep.add(chat.user(prompter.after(act, step)))
    return ep


def sft(model, episodes, steps: int, lr: float, batch: int = 16, seed: int = 0, bf16: bool = False, desc: str = "sft",
        total: int | None = None, start: int = 0, on_step=None) -> list[float]:
    """Next-token NLL on the trained tokens of `episodes` (rollout.Episode, turn_of >= 0 = trained). Returns losses.
    bf16: autocast the body to bfloat16 (2-3x faster on CPUs with bf16 units; the loss stays float32).
    total, start: the learning-rate schedule's length and position, to continue one schedule over several calls.
    on_step: called with the global step number (start + steps done) after every step."""

    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total = total or steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (start + s + 1) / 20) * max(0.1, 1 - (start + s) / total))
    rng, losses = random.Random(seed), []
    model.train()
    for i in (bar := tqdm(range(steps), desc=desc, leave=False)):
        mb = rng.sample(episodes, min(batch, len(episodes)))
        ids = kl.pad([e.ids for e in mb], 0, device)
        mask = kl.pad([trained_turns(e) for e in mb], -1, device) >= 0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = kl.hidden_states(model, ids)
        logp = kl.token_logprobs(hidden, model.get_output_embeddings(), kl.causal_targets(ids))
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step:
            on_step(start + i + 1)
    model.eval()
    return losses


def replayed_stream(env, chat, task: str, actions: list[str], replies: list[str], think: bool, prompt: str):
    """A saved trajectory rebuilt as a chat in prompt style `prompt`: the replies trained, the env's observations
    between them. None if the actions no longer reach success (a changed env or data)."""

    ep, step, prompter = Episode(task), env.reset(task), Prompter(prompt, env, think)
    ep.add(chat.first(prompter.first(step)))
    for action, reply in zip(actions, replies):
        ep.add(chat.assistant(reply), turn=ep.turns)
        step, ep.turns = env.step(action), ep.turns + 1
        if step.done:
            break
        ep.add(chat.user(prompter.after(action, step)))
    return ep if step.success else None


def baseline(args: BaselineArgs) -> str:
    """The SFT baseline: NLL on the teacher's successful trajectories, then saved like any checkpoint."""
    from curriculum import load_demos
    from envs import make_env

    import rundir

    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise ValueError(f"--epochs {args.epochs!r}: must be finite and > 0")
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch!r}: must be an integer >= 1")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr {args.lr!r}: must be finite and > 0")
    out = rundir.new_output_dir(args.out, os.path.join("runs", f"sft-{args.env}-{os.path.basename(os.path.normpath(args.model))}"))
    data = load_demos(args.demos, args.env)
    demos, replies = data["demos"], data.get("replies", {})
    tiny = args.model in models.TINY
    think = (not tiny) if args.think is None else args.think
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = models.load_tokenizers(args.model, args.model)
    chat, env = Chat(tok), make_env(args.env)
    prompt = args.prompt or default_style(args.env)
    data = [replayed_stream(env, chat, t, a, replies.get(t) or [format_reply(x) for x in a], think, prompt)
            for t, a in tqdm(demos.items(), desc="demos")]
    env.close()
    kept = [d for d in data if d is not None]
    if not kept:
        raise ValueError(f"no demonstration in {args.demos} replays to success")
    weights, _, amp = precision(args.dtype, device)  # float32 master weights: bf16 ones would barely move at lr 1e-5
    model = models.load_model(models.resolve_model(args.model), weights, device)
    steps = math.ceil(args.epochs * len(kept) / args.batch)
    lr = args.lr or (1e-4 if tiny else 1e-5)
    losses = sft(model, kept, steps, lr, batch=args.batch, seed=args.seed, bf16=amp is not None, desc="sft baseline")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"{len(kept)} demonstrations ({len(data) - len(kept)} no longer succeed), {steps} steps, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved to {out}")
    return out


# --------------------------------------------------------------------------------------------------
# The tiny models


def tiny_model(tok, hidden: int, layers: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def build_tiny(args: Args) -> None:
    """One SFT run of a 4-layer model: the teacher is its end, the student a snapshot from its middle (the same
    family and tokenizer, far less competent, like a small model beside a large one)."""

    t0, suffix = time.time(), recipe_suffix(args.env, args.noise)
    torch.set_num_threads(1)  # bitwise reproducible on a CPU, and on 2 shared cores not slower
    tok_dir = os.path.join(args.out, "tokenizer" + suffix)  # one per recipe: two builds can share the folder
    tok = build_tokenizer(tok_dir)
    chat, env, rng = Chat(tok), make_env(args.env), random.Random(args.seed)
    data = [demo_stream(env, chat, t, False, args.noise, rng) for t in env.tasks("train")[:3000]]
    model = tiny_model(tok, 128, 4, args.seed)

    def save(name: str, step: int) -> None:
        was_training = model.training
        test = evaluate(model.eval(), chat, EnvPool(args.env, {}, 0), env, env.tasks("test")[:100], batch=16, temperature=0.4,
                        max_new_tokens=16, think=False, prompt="compact", max_turns=env.max_turns, max_context=2048, seed=0)
        model.train(was_training)
        path, tmp = os.path.join(args.out, name), os.path.join(args.out, name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {step} SFT steps, "
              f"test success {sum(e.success for e in test) / len(test):.2f} (100 tasks, T=0.4)", flush=True)

    # The optimizer and data order restart once, at restart_at, as in the run that made the shipped models.
    T, R = args.teacher_steps, args.restart_at
    assert R < args.student_steps < T
    sft(model, data, R, lr=3e-3, seed=args.seed, bf16=True, desc="sft", total=T)
    sft(model, data, T - R, lr=3e-3, seed=args.seed + R, bf16=True, desc="sft", total=T, start=R,
        on_step=lambda step: (step == args.student_steps and save("tiny-student" + suffix, step),
                              step in args.snapshots and save(f"snapshots/tiny-student{suffix}-{step}", step)))
    save("tiny-teacher" + suffix, T)
    shutil.rmtree(tok_dir)
    print(f"tiny models built in {time.time() - t0:.0f}s under {args.out}")


if __name__ == "__main__":
    import tyro  # only for the command line

    args = tyro.extras.subcommand_cli_from_dict({"baseline": BaselineArgs, "tiny": Args})
    if isinstance(args, BaselineArgs):
        cli.run(lambda: baseline(args))
    elif args.force or not os.path.isdir(os.path.join(args.out, "tiny-teacher" + recipe_suffix(args.env, args.noise))):
        build_tiny(args)
