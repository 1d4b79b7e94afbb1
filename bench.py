"""Speed, measured as ratios of two variants run side by side in one process on the same inputs.

    python bench.py                 # tiny models on CPU (or the GPU when there is one)
    python bench.py --quick         # a seconds-long smoke run (the tests use it to keep this file working)
    python bench.py --student DIR --teacher DIR --device cuda --dtype bf16-mixed

Prints a table and writes bench.json. Each row names the two variants and their ratio:
  rollout    batched rollout of N episodes vs one episode at a time (generated tokens/s)
  scoring    the teacher scoring whole trajectories in one pass vs once per turn with the growing prompt
  kv-cache   rollout keeping the KV cache across turns vs re-prefilling the whole history every turn
  logprob    peak memory of chosen-token log-probs at vocab 151,936 x 2,048 tokens: chunked vs full float32
  env        stepping N episodes through the worker pool vs serially in this process, for the built-in world
             and ALFWorld (when installed; its demos drive the episodes, so both variants take the same steps)
  step       a whole training step split into generate (model forwards / sampling and bookkeeping), env,
             teacher forward, student forward+backward, optimizer and other; then the step time over the sum of
             its model passes (the generation forwards as timed inside the rollout, the teacher and student
             passes timed alone on the same batch): 1.0 would mean no time outside the models
  precision  one update at lr 1e-6 in each precision mode (rollout.precision's float32 and bf16-mixed, the bf16 +
             float32-master-copy recipe, pure bf16): the share of the weights a float32 update moves that it moves,
             its norm and cosine against float32's; then seconds per update, float32 vs bf16-mixed
  decode     the decoding step at the real vocabulary (a random Qwen2.5-1.5B-shaped model, few layers on a CPU, see
             decode_model): forward / sampling / bookkeeping ms, on-device sampling vs the old host multinomial
  shape rows (--shape NAME): random models of a real shape (random:NAME@LAYERS, the paper's teacher of the family at
             the same layers), the real Qwen tokenizer and vocabulary: rollout tokens/s, the decoding step's parts,
             one-pass teacher scoring time and peak memory, a training step's peak memory with and without gradient
             checkpointing, the same step with and without telemetry, LoRA rank 16 against full fine-tuning (time and
             peak), float32 vs bf16-mixed step time; each memory figure from a fresh subprocess
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch

import kl
import lora
import models
import rollout
import opd
import tcod
from curriculum import Plan
from envpool import EnvPool
from envs import make_env
from prompts import default_style


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
    """auto, float32 or bf16-mixed (rollout.precision)"""
    quick: bool = False
    """a smoke run: few episodes and turns, small memory test"""
    env_workers: int = 2
    """worker processes for the env row's pool variant"""
    shape: str | None = None
    """a real model shape (models.REAL_CONFIGS, e.g. Qwen2.5-1.5B): bench random models of that shape at the real
    vocabulary instead of the tiny rows (rollout, decoding step parts, teacher scoring, step memory, precision cost)"""
    teacher_shape: str | None = None
    """with --shape: the teacher's shape (default: the paper's teacher of the family, Qwen2.5-7B / Qwen3-30B-A3B)"""
    layers: int | None = None
    """with --shape: layers of both random models (default: 2 on CPU, the real counts on GPU)"""
    score_tokens: int | None = None
    """with --shape: tokens per episode of the scoring row's 16 episodes (default: 1024 on GPU, 64 on CPU)"""
    step_tokens: int | None = None
    """with --shape: tokens per episode of the step-memory row's micro-batch of 4 (default: 1024 on GPU, 128 on CPU)"""
    precision_row: bool = True
    """with --shape: the float32 vs bf16-mixed step row (slow on a CPU without bf16 units: minutes at 1.5B@2)"""
    decode_layers: int | None = None
    """layers of the Qwen2.5-1.5B-shaped random model of the decode row (default: 2 on CPU, the real 28 on GPU)"""
    out: str = "bench.json"
    """where the figures go"""


class MasterCopyAdamW:
    """The mixed-precision recipe rollout.precision did not choose, kept here to measure it: bf16 working weights (the
    model), a float32 master copy that AdamW steps, the result copied back into the bf16 weights. It duck-types the
    optimizer calls of opd.score_and_update (zero_grad, step)."""

    def __init__(self, model, lr: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_() for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, weight_decay=0.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        for p, m in zip(self.params, self.master):
            p.copy_(m)  # rounded to bf16: the working weights the next forward uses


def timed(fn, clock=time.perf_counter):
    """fn's result and its seconds by `clock`: wall time, or time.process_time for the CPU seconds of a one-thread
    process, which a machine shared with other jobs barely changes (wall time there can double)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = clock()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, clock() - t0


class RePrefillDecoder(rollout.Decoder):
    """The no-cache baseline: a fresh cache every turn, so each turn re-reads the whole history."""

    def reply(self, streams, *a, **k):
        noise = getattr(self, "noise", None)
        self.__init__(self.model, self.vocab_size, self.gen)
        self.noise = noise or self.noise  # one noise stream for the whole rollout, as the cached decoder has
        return super().reply(streams, *a, **k)

    def keep(self, rows):
        pass  # the next turn starts from scratch anyway


def roll(model, chat, env_name, tasks, turns, seed=0, decoder=None, amp=None):
    env = make_env(env_name)
    old, rollout.Decoder = rollout.Decoder, decoder or rollout.Decoder
    try:
        return rollout.rollout(
            model, chat, EnvPool(env_name, {}, 0), env, tasks, [Plan(0, turns)] * len(tasks), [None] * len(tasks),
            temperature=1.0, max_new_tokens=24, max_turns=turns, max_context=1 << 20, think=False,
            prompt=default_style(env_name), generator=torch.Generator().manual_seed(seed), amp=amp,
        )
    finally:
        rollout.Decoder = old


class TimedDecoder(rollout.Decoder):
    """rollout.Decoder that adds up the time of its model forwards and of whole replies (forwards + sampling)."""

    forward_s = reply_s = 0.0

    def _forward(self, chunks):
        out, t = timed(lambda: super(TimedDecoder, self)._forward(chunks))
        TimedDecoder.forward_s += t
        return out

    def reply(self, *a, **k):
        out, t = timed(lambda: super(TimedDecoder, self).reply(*a, **k))
        TimedDecoder.reply_s += t
        return out


class TimedPool:
    """An EnvPool that adds up the time spent in env resets and steps."""

    def __init__(self, pool):
        self.pool, self.seconds = pool, 0.0

    def reset(self, tasks):
        out, t = timed(lambda: self.pool.reset(tasks))
        self.seconds += t
        return out

    def step(self, slots, actions):
        out, t = timed(lambda: self.pool.step(slots, actions))
        self.seconds += t
        return out


def env_pool_row(env_name: str, n: int, turns: int, workers: int) -> tuple:
    """Reset n episodes and play up to `turns` demo actions each, through a pool of `workers` vs in-process."""
    env = make_env(env_name)
    tasks = env.tasks(env.eval_splits[0])[:n]
    demos = [env.demo(t) or [] for t in tasks]
    env.close()
    seconds = {}
    for w in (workers, 0):
        pool = EnvPool(env_name, {}, w)  # started before the clock: start-up happens once per run, not per step
        t0 = time.perf_counter()
        pool.reset(tasks)
        steps = 0
        for j in range(turns):
            slots = [i for i in range(n) if j < len(demos[i])]
            if not slots:
                break
            pool.step(slots, [demos[i][j] for i in slots])
            steps += len(slots)
        seconds[w] = time.perf_counter() - t0
        pool.close()
    return (f"env {env_name}", f"pool of {workers}", 1 / seconds[workers], "in-process", 1 / seconds[0],
            f"1/s; {n} resets + {steps} steps: {seconds[workers]:.2f}s vs {seconds[0]:.2f}s")


class HostSampleDecoder(rollout.Decoder):
    """The old sampler, to compare with: softmax, the [B, V] probabilities copied to the host, torch.multinomial."""

    def _sample(self, logits, temperature):
        probs = torch.softmax(logits / temperature, -1)
        return torch.multinomial(probs.cpu(), 1, generator=self.gen)[:, 0].to(logits.device)


def decode_model(layers: int, quick: bool, device: str, dtype: str):
    """The one place the decode row gets its model: a randomly initialised Qwen2 with Qwen2.5-1.5B's shape (hidden
    1536, MLP 8960, 12 heads, 2 KV heads, vocabulary 151,936, tied embeddings) and `layers` layers (the real model
    has 28); --quick shrinks everything but the vocabulary. Swap in any causal LM here (e.g. a random: name)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4) if quick else dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12)
    config = Qwen2Config(vocab_size=151_936, num_hidden_layers=layers, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=32_768, rope_theta=1e6, **shape)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device=device, dtype=getattr(torch, dtype)).eval()


def no_stop(decoder):
    """A Decoder that never stops early: no chat end token (eos=-1 at the call) and no generation config's end tokens
    (rollout.stop_tokens), so every row decodes exactly the tokens asked (timings and references at a fixed length)."""
    decoder.generation_config = None
    return decoder


def decode_step_parts(model, decoder_cls, amp, rows: int, prompt: int, steps: int, vocab: int = 151_665) -> dict:
    """Seconds per decoding step of one reply of `steps` tokens for `rows` rows: model forward, sampling, and the
    rest (bookkeeping: ids to the host, eos checks, building the next input). The prompt's prefill is left out."""
    times = {"prefill": 0.0, "forward": 0.0, "sampling": 0.0}

    class Timed(decoder_cls):
        def _forward(self, chunks):
            out, t = timed(lambda: super(Timed, self)._forward(chunks))
            times["forward" if max(map(len, chunks)) == 1 else "prefill"] += t  # one new token per row: a decoding step
            return out

        def _sample(self, logits, temperature):
            out, t = timed(lambda: super(Timed, self)._sample(logits, temperature))
            times["sampling"] += t
            return out

    g = torch.Generator().manual_seed(0)
    streams = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(rows)]
    dec = no_stop(Timed(model, vocab, torch.Generator().manual_seed(1)))
    with rollout.autocast(rollout.model_device(model), amp):
        _, total = timed(lambda: dec.reply(streams, eos=-1, temperature=1.0, max_new_tokens=steps))  # eos -1: never stops
    # reply samples `steps` tokens: the first from the prefill's logits, each next one after a one-token forward
    return {"forward": times["forward"] / (steps - 1), "sampling": times["sampling"] / steps,
            "bookkeeping": (total - times["prefill"] - times["forward"] - times["sampling"]) / steps}


def decode_row(model, amp, rows: int, steps: int, what: str) -> tuple:
    """The decode sampling row: the decoding step's parts with the on-device sampler vs the old host multinomial."""
    new = decode_step_parts(model, rollout.Decoder, amp, rows, 32, steps)
    old = decode_step_parts(model, HostSampleDecoder, amp, rows, 32, steps)
    share = lambda p: p["sampling"] / sum(p.values())
    ms = lambda p: ", ".join(f"{k} {v * 1e3:.1f}" for k, v in p.items())
    vocab = model.get_output_embeddings().weight.shape[0]
    return (("decode sampling", "on device ms", new["sampling"] * 1e3, "host multinomial ms", old["sampling"] * 1e3,
             f"per decoding step, {rows} rows, vocab {vocab:,}, {what}; on device: {ms(new)} ms, sampling "
             f"{share(new):.1%} of the step; host: {ms(old)} ms, sampling {share(old):.1%} (goal <= 5 %)"),
            {"on_device": new, "host": old})


def precision_update(mode: str, student, teacher, episodes, lr: float = 1e-6, steps: int = 1):
    """Copies of student and teacher in one precision mode, `steps` tcod updates at lr on episodes: returns the change
    of the (master) weights as one float64 vector, and seconds per update. Modes: float32; bf16-mixed (tcod's GPU
    default: float32 student under bf16 autocast, bf16 teacher); master-copy (MasterCopyAdamW); bf16 (pure bf16
    weights that AdamW updates in place: the old --dtype auto on a GPU)."""
    s, t = copy.deepcopy(student).float(), copy.deepcopy(teacher).requires_grad_(False)
    t.to(torch.float32 if mode == "float32" else torch.bfloat16)
    if mode in ("bf16", "master-copy"):
        s.to(torch.bfloat16)
    opt = MasterCopyAdamW(s, lr) if mode == "master-copy" else torch.optim.AdamW(s.parameters(), lr=lr, weight_decay=0.0)
    weights = lambda: torch.cat([p.detach().double().flatten() for p in (opt.master if mode == "master-copy" else s.parameters())])
    before = weights()
    args = tcod.Args(dtype="bf16-mixed" if mode == "bf16-mixed" else "float32", lr=lr, micro_batch=4, aggregation="token-mean")
    seconds = 0.0
    for _ in range(steps):
        update, t_update = timed(lambda: opd.score_and_update(s, t, episodes, opt, tcod.update_config(args)))
        assert not update["skipped"], mode
        seconds += t_update
    return weights() - before, seconds / steps


def compare_updates(deltas: dict) -> dict:
    """Per mode, against the float32 update: the share of the weights float32 moves that this mode moves too, the
    ratio of the update norms, and their cosine."""
    ref = deltas["float32"]
    grad = ref != 0
    return {m: {"moved": (d[grad] != 0).double().mean().item(), "norm_ratio": (d.norm() / ref.norm()).item(),
                "cosine": (d @ ref / (d.norm() * ref.norm() + 1e-300)).item()} for m, d in deltas.items()}


def logprob_peak_memory(variant: str, T: int, V: int, H: int = 64) -> float:
    """Peak RSS growth (MB) of one forward+backward, in a fresh process so that earlier work does not hide it."""
    code = f"""
import torch, kl

def kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

torch.manual_seed(0)
h = torch.randn(1, {T}, {H}, requires_grad=True); head = torch.nn.Linear({H}, {V}, bias=False)
y = torch.randint(0, {V}, (1, {T}))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = kb("VmRSS")
if "{variant}" == "chunked":
    lp = kl.token_logprobs(h, head, y)
else:
    lp = torch.log_softmax(head(h).float(), -1).gather(-1, y[..., None])[..., 0]
lp.sum().backward()
print((kb("VmHWM") - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode:
        raise RuntimeError(out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


def main(args: Args) -> dict:
    torch.manual_seed(0)
    if args.shape:
        return shape_main(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n, turns = (4, 3) if args.quick else (args.episodes, args.turns)
    chat = rollout.Chat(tcod.load_tokenizers(args.student, args.teacher))
    student_dtype, teacher_dtype, amp = rollout.precision(args.dtype, device)
    student = tcod.load_model(tcod.resolve_model(args.student), student_dtype, device)
    teacher = tcod.load_model(tcod.resolve_model(args.teacher), teacher_dtype, device).requires_grad_(False)
    tasks = make_env(args.env).tasks("train")[:n]
    rows = []

    def add(row: tuple) -> None:  # printed as soon as measured: a big model's full bench takes a while
        rows.append(row)
        print(f"{row[0]}: {row[1]} {row[2]:.3g} vs {row[3]} {row[4]:.3g} = {row[2] / row[4]:.2f}x ({row[5]})", flush=True)

    roll(student, chat, args.env, tasks[:2], 2, amp=amp)  # warm-up: one-time allocations and lazy inits stay out of the rows

    # 1. batched rollout vs one episode at a time
    batched, t_batch = timed(lambda: roll(student, chat, args.env, tasks, turns, amp=amp))
    serial, t_serial = timed(lambda: [e for t in tasks for e in roll(student, chat, args.env, [t], turns, amp=amp)])
    tps = lambda eps, t: sum(e.reply_tokens for e in eps) / t
    add(("rollout", f"batched {n}", tps(batched, t_batch), "one at a time", tps(serial, t_serial), "tokens/s"))

    # 2. one-pass scoring vs per-turn scoring with the growing prompt (the anchors' way: O(T^2) tokens)
    def one_pass():
        out = []
        for ep in batched:
            ids = torch.tensor([ep.ids], device=device)
            out.append(kl.token_logprobs(kl.hidden_states(teacher, ids), teacher.get_output_embeddings(), kl.causal_targets(ids))[0])
        return out, sum(len(ep.ids) for ep in batched)

    def per_turn():
        out, tokens = [], 0
        for ep in batched:
            turn_ids = torch.tensor(rollout.trained_turns(ep))
            lp = torch.zeros(len(ep.ids), device=device)
            for t in sorted(set(turn_ids.tolist()) - {-1}):
                pos = (turn_ids == t).nonzero()[:, 0]
                end = pos.max().item() + 2
                ids = torch.tensor([ep.ids[:end]], device=device)
                lp[pos] = kl.token_logprobs(kl.hidden_states(teacher, ids), teacher.get_output_embeddings(), kl.causal_targets(ids))[0][pos]
                tokens += end
            out.append(lp)
        return out, tokens

    with torch.no_grad():
        (lp_one, tok_one), t_one = timed(one_pass)
        (lp_turn, tok_turn), t_turn = timed(per_turn)
    diff = max(
        (a - b)[torch.tensor(rollout.trained_turns(ep)) >= 0].abs().max().item() for a, b, ep in zip(lp_one, lp_turn, batched) if ep.reply_tokens
    )
    add(("scoring", "one pass", tok_one / t_one, "per turn", tok_turn / t_turn, "tokens/s"))
    add(("scoring time", "one pass", 1 / t_one, "per turn", 1 / t_turn, f"1/s; tokens {tok_one} vs {tok_turn}; max |diff| {diff:.1e}"))

    # 3. KV cache across turns vs re-prefill every turn
    cached, t_cached = timed(lambda: roll(student, chat, args.env, tasks, turns, seed=1, amp=amp))
    fresh, t_fresh = timed(lambda: roll(student, chat, args.env, tasks, turns, seed=1, decoder=RePrefillDecoder, amp=amp))
    same = [e.ids for e in cached] == [e.ids for e in fresh]
    add(("kv-cache", "reuse", tps(cached, t_cached), "re-prefill", tps(fresh, t_fresh), f"tokens/s; same tokens: {same}"))

    # 4. memory of chosen-token log-probs
    T, V = (1024, 151_936) if args.quick else (2048, 151_936)
    full, chunked = logprob_peak_memory("full", T, V), logprob_peak_memory("chunked", T, V)
    add(("logprob memory", "chunked", 1 / max(chunked, 1e-3), "full fp32", 1 / max(full, 1e-3), f"1/MB; {chunked:.0f} vs {full:.0f} MB, T={T}"))

    # 5. env stepping: worker pool vs in-process
    add(env_pool_row("tinyworld", n, turns, args.env_workers))
    if not args.quick:
        try:
            add(env_pool_row("alfworld", n, turns, args.env_workers))
        except ImportError as e:
            print(f"no ALFWorld row: {e}")

    # 6. a whole training step, split into parts; then step time / the sum of its model passes
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.0)
    step_args = tcod.Args(micro_batch=4, dtype=args.dtype, aggregation="token-mean")
    env = make_env(args.env)
    pool = TimedPool(EnvPool(args.env, {}, 0))
    TimedDecoder.forward_s = TimedDecoder.reply_s = 0.0
    old, rollout.Decoder = rollout.Decoder, TimedDecoder
    try:
        episodes, t_roll = timed(lambda: rollout.rollout(
            student, chat, pool, env, tasks, [Plan(0, turns)] * n, [None] * n, temperature=1.0, max_new_tokens=24,
            max_turns=turns, max_context=1 << 20, think=False, prompt=default_style(args.env),
            generator=torch.Generator().manual_seed(2), amp=amp))
    finally:
        rollout.Decoder = old
    _, t_update = timed(lambda: opd.score_and_update(student, teacher, episodes, optimizer, tcod.update_config(step_args)))
    batches = [opd.batch_tensors(episodes, mb, [torch.tensor(rollout.trained_turns(e)) for e in episodes], device) for mb in opd.microbatches(episodes, 4)]
    with rollout.autocast(device, amp):  # as score_and_update runs them
        _, t_teacher = timed(lambda: [opd.teacher_logprobs(teacher, ids, targets) for ids, targets, _ in batches])

    def student_pass():
        for ids, targets, turn_ids in batches:
            with rollout.autocast(device, amp):
                lp = kl.token_logprobs(kl.hidden_states(student, ids), student.get_output_embeddings(), targets)
            (lp * (turn_ids >= 0)).sum().backward()

    _, t_student = timed(student_pass)
    _, t_opt = timed(optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    t_step = t_roll + t_update
    parts = {
        "generate: model forwards": TimedDecoder.forward_s,
        "generate: sampling and bookkeeping": TimedDecoder.reply_s - TimedDecoder.forward_s,
        "env": pool.seconds,
        "rollout other (chat tokens, parsing)": t_roll - TimedDecoder.reply_s - pool.seconds,
        "teacher forward (alone)": t_teacher,
        "student forward+backward (alone)": t_student,
        "optimizer step (alone)": t_opt,
        "update other": t_update - t_teacher - t_student - t_opt,
    }
    model_passes = TimedDecoder.forward_s + t_teacher + t_student
    add(("step", "step s", t_step, "model passes s", model_passes, "step / model passes (goal <= 1.3)"))
    print("step breakdown: " + ", ".join(f"{k} {v:.2f}s" for k, v in parts.items()) + f"; step {t_step:.2f}s")

    # 7. mixed precision: what one update at the paper's lr 1e-6 moves, and what an update costs, per mode
    modes = ("float32", "bf16-mixed", "master-copy", "bf16")
    deltas, seconds = {}, {}
    update_eps = batched[:2] if args.quick else batched  # bf16 on a CPU without bf16 units is slow
    for m in modes:
        deltas[m], seconds[m] = precision_update(m, student, teacher, update_eps, lr=1e-6)
    cmp = compare_updates(deltas)
    detail = "; ".join(f"{m} moved {c['moved']:.1%}, norm {c['norm_ratio']:.3f}x, cos {c['cosine']:.3f}" for m, c in cmp.items())
    add(("precision moved", "bf16-mixed", cmp["bf16-mixed"]["moved"], "pure bf16", cmp["bf16"]["moved"],
         f"share of the weights a float32 update moves that one update at lr 1e-6 moves; vs float32: {detail}"))
    add(("precision update", "float32 s", seconds["float32"], "bf16-mixed s", seconds["bf16-mixed"],
         f"seconds per score_and_update on {len(update_eps)} of the rollout row's episodes; master-copy {seconds['master-copy']:.3f}s, pure bf16 {seconds['bf16']:.3f}s"))

    # 8. the decoding step at the real vocabulary: forward / sampling / bookkeeping, old host sampler vs on-device
    layers = args.decode_layers or (1 if args.quick else 2 if device == "cpu" else 28)
    student_dtype, _, amp = rollout.precision(args.dtype, device)
    big = decode_model(layers, args.quick, device, student_dtype)
    shape = "Qwen2.5-1.5B shape" if not args.quick else "hidden 64 (quick)"
    row, decode_parts = decode_row(big, amp, *((4, 3) if args.quick else (16, 8)), f"{shape}, {layers} layers")
    add(row)
    del big
    write_table(args.out, rows, header := f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, " \
             f"student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M, teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M, dtype {next(student.parameters()).dtype}", {"step_parts": parts, "precision": cmp, "decode_parts": decode_parts})
    return json.load(open(args.out))


def write_table(out: str, rows: list, header: str, extra: dict) -> None:
    print(header)
    print(f"| what | A | value A | B | value B | A/B | unit |\n|---|---|---|---|---|---|---|")
    for name, a, va, b, vb, unit in rows:
        print(f"| {name} | {a} | {va:.3g} | {b} | {vb:.3g} | {va / vb:.2f}x | {unit} |")
    result = {"machine": header, "rows": [dict(zip(("what", "a", "value_a", "b", "value_b", "unit"), r)) for r in rows], **extra}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


# --------------------------------------------------------------------------------------------------
# --shape: random models of a real shape at the real vocabulary


def synthetic_episodes(n: int, length: int, vocab: int, seed: int = 0) -> list:
    """n episodes of `length` random tokens: the first quarter env text, the rest one student turn (what the teacher
    scores and the student is trained on); fixed, so the memory rows do not depend on what a random model replies."""
    g = torch.Generator().manual_seed(seed)
    env = length // 4
    return [rollout.Episode(task=str(i), ids=torch.randint(0, vocab, (length,), generator=g).tolist(),
                            turn_of=[-1] * env + [0] * (length - env), reply_tokens=length - env) for i in range(n)]


def child(spec: dict) -> None:
    """Runs in a fresh process (fresh_run), so the peak is this measurement's alone: loads the models, resets the
    peak (VmHWM, or the CUDA allocator's), runs one teacher scoring pass or one training step, prints the figures."""
    device = spec["device"]
    student_dtype, teacher_dtype, _ = rollout.precision(spec["dtype"], device)
    teacher = tcod.load_model(spec["teacher"], teacher_dtype, device).requires_grad_(False)
    episodes = synthetic_episodes(spec["episodes"], spec["tokens"], 151_665)
    if spec["kind"] in ("step", "telemetry"):
        if spec.get("lora_rank"):  # as tcod.py builds a LoRA student: the frozen base in the teacher's dtype
            student = lora.add_lora(tcod.load_model(spec["student"], teacher_dtype, device), spec["lora_rank"])
        else:
            student = tcod.load_model(spec["student"], student_dtype, device)
        if spec["checkpointing"]:
            student.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, weight_decay=0.0)
        step_args = tcod.update_config(tcod.Args(micro_batch=4, dtype=spec["dtype"], aggregation="token-mean"))
        step = lambda telemetry=True: opd.score_and_update(student, teacher, episodes, optimizer, replace(step_args, telemetry=telemetry))
    kb = lambda field: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        base = kb("VmRSS") * 1024
    cpu0 = time.process_time()
    if spec["kind"] == "score":
        turns = [torch.tensor(rollout.trained_turns(e)) for e in episodes]
        batches = [opd.batch_tensors(episodes, mb, turns, device) for mb in opd.microbatches(episodes, 4)]
        _, seconds = timed(lambda: [opd.teacher_logprobs(teacher, ids, targets) for ids, targets, _ in batches])
    elif spec["kind"] == "telemetry":  # the same step with and without telemetry, alternated; the fastest of each
        step()  # warm-up
        clock = time.perf_counter if device.startswith("cuda") else time.process_time
        times = {True: [], False: []}
        for _ in range(3):
            for on in (True, False):
                times[on].append(timed(lambda: step(on), clock)[1])
        print(json.dumps({"with": min(times[True]), "without": min(times[False])}))
        return
    else:
        _, seconds = timed(step)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else kb("VmHWM") * 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": time.process_time() - cpu0, "peak_mb": peak / 2**20,
                      "loaded_mb": base / 2**20, "growth_mb": (peak - base) / 2**20}))


def fresh_run(spec: dict) -> dict:
    code = f"import bench, json; bench.child(json.loads({json.dumps(spec)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def shape_main(args: Args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = device == "cpu"
    layers = args.layers or (2 if cpu else None)
    at = f"@{layers}" if layers else ""
    s_name = f"random:{args.shape}{at}"
    t_name = f"random:{args.teacher_shape}{at}" if args.teacher_shape else models.default_teacher(s_name)
    s_dir, t_dir = models.resolve_model(s_name), models.resolve_model(t_name)  # built once under ~/.cache/tcod/random
    chat = rollout.Chat(tcod.load_tokenizers(s_name, t_name))
    student_dtype, _, amp = rollout.precision(args.dtype, device)
    student = tcod.load_model(s_dir, student_dtype, device)
    n, turns = args.episodes, (2 if cpu else args.turns)
    tasks = make_env(args.env).tasks("train")[:n]
    rows = []

    def add(row: tuple) -> None:
        rows.append(row)
        print(f"{row[0]}: {row[1]} {row[2]:.3g} vs {row[3]} {row[4]:.3g} = {row[2] / row[4]:.2f}x ({row[5]})", flush=True)

    # 1. rollout tokens/s at n episodes vs one, then the decoding step's parts (the decode sampling row, on this model)
    roll(student, chat, args.env, tasks[:2], 1, amp=amp)  # warm-up
    batched, t_batch = timed(lambda: roll(student, chat, args.env, tasks, turns, amp=amp))
    single, t_single = timed(lambda: roll(student, chat, args.env, tasks[:1], turns, amp=amp))
    tps = lambda eps, t: sum(e.reply_tokens for e in eps) / t
    add((f"{args.shape} rollout", f"batched {n}", tps(batched, t_batch), "one episode", tps(single, t_single),
         f"tokens/s, {turns} turns of <= 24 tokens, {s_name}, {student_dtype}"))
    row, decode_parts = decode_row(student, amp, n, 8, f"{s_name}")
    add((f"{args.shape} decode sampling", *row[1:]))
    del student

    # 2. one-pass teacher scoring of n episodes (micro-batches of 4) vs the student scoring the same: time, peak memory
    L = args.score_tokens or (64 if cpu else 1024)
    spec = dict(kind="score", device=device, dtype=args.dtype, episodes=n, tokens=L)
    t_score, s_score = fresh_run(dict(spec, teacher=t_dir)), fresh_run(dict(spec, teacher=s_dir))
    add((f"{args.shape} scoring time", f"teacher {t_name}", t_score["seconds"], f"student-shape {s_name}", s_score["seconds"],
         f"s per one-pass scoring of {n} episodes x {L} tokens; {n * L / t_score['seconds']:.0f} vs {n * L / s_score['seconds']:.0f} tokens/s"))
    add((f"{args.shape} scoring memory", "teacher peak MB", t_score["peak_mb"], "student-shape peak MB", s_score["peak_mb"],
         f"fresh process; weights loaded {t_score['loaded_mb']:.0f} vs {s_score['loaded_mb']:.0f} MB, growth while scoring "
         f"{t_score['growth_mb']:.0f} vs {s_score['growth_mb']:.0f} MB"))

    # 3. a training step's peak memory, gradient checkpointing on vs off. On a CPU the teacher is the student's shape
    # (a second copy): the real teacher in float32 plus the student's AdamW state would not fit ~6 GB
    Ls = args.step_tokens or (128 if cpu else 1024)
    step_teacher, step_teacher_name = (s_dir, s_name) if cpu else (t_dir, t_name)
    spec = dict(kind="step", device=device, dtype=args.dtype, episodes=4, tokens=Ls, student=s_dir, teacher=step_teacher)
    on, off = fresh_run(dict(spec, checkpointing=True)), fresh_run(dict(spec, checkpointing=False))
    add((f"{args.shape} step memory", "checkpointing peak MB", on["peak_mb"], "no checkpointing peak MB", off["peak_mb"],
         f"score_and_update, 4 episodes x {Ls} tokens, micro-batch 4, teacher {step_teacher_name}, fresh process; growth over the "
         f"loaded weights (grads, AdamW state, activations) {on['growth_mb']:.0f} vs {off['growth_mb']:.0f} MB; step {on['seconds']:.1f} vs {off['seconds']:.1f} s"))

    # 4. telemetry's cost (teacher top-1 and student entropy at the trained tokens, opd.py) in one process, and a
    # LoRA student (rank 16, every projection) against full fine-tuning, each one score_and_update as above
    tel = fresh_run(dict(spec, kind="telemetry", checkpointing=True))
    add((f"{args.shape} telemetry", "with s", tel["with"], "without s", tel["without"],
         f"one score_and_update as in the step memory row, checkpointing on, 3 alternating repeats, the fastest of each; {'wall' if device.startswith('cuda') else 'CPU'} seconds; "
         f"{Ls - Ls // 4} of {Ls} tokens an episode are the student's"))
    lora16 = fresh_run(dict(spec, checkpointing=True, lora_rank=16))
    add((f"{args.shape} LoRA r16 step", "LoRA s", lora16["seconds"], "full fine-tuning s", on["seconds"],
         f"CPU seconds {lora16['cpu_seconds']:.1f} vs {on['cpu_seconds']:.1f}; "
         f"as the step memory row, checkpointing on; peak {lora16['peak_mb']:.0f} vs {on['peak_mb']:.0f} MB, growth over the "
         f"loaded weights {lora16['growth_mb']:.0f} vs {on['growth_mb']:.0f} MB"))

    # 5. the mixed-precision update's cost: float32 vs bf16-mixed step time, same step, no checkpointing
    if args.precision_row:
        f32, mixed = fresh_run(dict(spec, dtype="float32", checkpointing=False)), fresh_run(dict(spec, dtype="bf16-mixed", checkpointing=False))
        add((f"{args.shape} precision update", "float32 s", f32["seconds"], "bf16-mixed s", mixed["seconds"],
             f"one score_and_update as in the step memory row; peak {f32['peak_mb']:.0f} vs {mixed['peak_mb']:.0f} MB"
             + ("; a CPU without bf16 units runs bf16 matmuls slower than float32" if cpu else "")))

    header = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, " \
             f"student {s_name}, teacher {t_name}, dtype {args.dtype}"
    write_table(args.out, rows, header, {"decode_parts": decode_parts})
    return json.load(open(args.out))


if __name__ == "__main__":
    import tyro  # only for the command line: gpu_check.py imports this module where tyro is not installed

    main(tyro.cli(Args))
