"""The rollout: chat tokens, episodes, and batched multi-turn sampling with one KV cache across turns.

An episode is one token stream: the chat template's deltas around the student's sampled ids, never re-tokenized, so
the teacher scores exactly the student's tokens in one pass (tcod.py). `rollout` plays one episode per task, all at
once; `evaluate` is the paper's eval: the full horizon from scratch, in fixed batches with fixed seeds.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm

import models
from curriculum import Plan
from envs import Step
from prompts import Prompter, format_reply, parse_action, refused

def model_device(model) -> torch.device:
    return next(model.parameters()).device


def precision(dtype: str, device: str) -> tuple[str, str, torch.dtype | None]:
    """--dtype on a device -> (student weights dtype, teacher weights dtype, autocast dtype of the student's forwards).

    float32: everything float32 (the CPU default). bf16-mixed (the GPU default): the student is held in float32, the
    master weights that AdamW updates, and its forwards (rollout, scoring, update) run under bfloat16 autocast; the
    teacher, never trained, is held in bfloat16. Pure bfloat16 weights are not offered: at lr 1e-6 an Adam step is
    far below one bf16 ulp of a typical weight (|w| ~ 0.02: ulp ~ 1e-4), so an in-place bf16 update leaves almost
    every weight bit-identical (test_precision.py: about 2 % of the weights move).

    Why autocast over float32 weights rather than bf16 working weights plus a float32 master copy that the optimizer
    steps and copies back (the other standard recipe, measured in test_precision.py and bench.py)? The student's
    state costs the same, 16 B/param (4 weights + 4 grads + 8 Adam, vs 2 + 2 + 4 master + 8 Adam), and both move the
    weights like a float32 update. Autocast is stock torch: the gradients are float32, so micro-batch accumulation
    and clipping happen in float32 (bf16 .grad would accumulate in bf16), and AdamW, its state_dict, save_pretrained
    and exact resume need nothing extra (the checkpoint holds the master weights; the copy recipe would have to save
    its master copy beside the model). Its price is a bf16 copy of each weight cast per forward (2 B/param, held for
    one forward, or one reply while decoding) and float32 checkpoints.
    """
    if dtype == "auto":
        dtype = "bf16-mixed" if str(device).startswith("cuda") else "float32"
    if dtype == "float32":
        return "float32", "float32", None
    if dtype == "bf16-mixed":
        return "float32", "bfloat16", torch.bfloat16
    raise ValueError(f"unknown --dtype {dtype!r}: use auto, float32 or bf16-mixed")


def autocast(device, dtype: torch.dtype | None):
    """torch.autocast on device's type when dtype is set (bf16-mixed), else a no-op context (device may then be None)."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# The chat format


class Chat:
    """Token deltas of a multi-turn chat, so an episode grows as one token stream that is never re-tokenized.

    The student's reply tokens are appended as sampled (ending in its end-of-turn token); each new user
    message is the chat template's text between that end-of-turn token and the next generation prompt.
    Template kwargs (default: models.template_kwargs, i.e. enable_thinking=False for Qwen3) go to every
    apply_chat_template call. Earlier turns' reasoning: Qwen3's template drops <think> blocks from the history it
    renders, but this stream keeps every token the student sampled (never re-tokenized, one KV cache). The teacher
    scores these same ids, so student and teacher both see the history with its reasoning (tested in test_models.py).
    """

    def __init__(self, tok, template_kwargs: dict | None = None):
        self.tok = tok
        self.kwargs = models.template_kwargs(tok) if template_kwargs is None else dict(template_kwargs)
        self.eos = tok.eos_token_id
        probe = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "MARK"}]
        text = tok.apply_chat_template(probe, tokenize=False, **self.kwargs)
        after = text[text.rindex("MARK") + 4 :]
        if self.eos is None or not after.startswith(tok.eos_token):
            raise ValueError(f"the chat template does not end assistant turns with the eos token {tok.eos_token!r}")

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def first(self, content: str) -> list[int]:
        text = self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True, **self.kwargs)
        return self._encode(text)

    def user(self, content: str) -> list[int]:
        """Tokens after an assistant turn's eos: the rest of that turn, the user message, the generation prompt."""
        msgs = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "MARK"}, {"role": "user", "content": content}]
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **self.kwargs)
        return self._encode(text[text.rindex("MARK") + 4 + len(self.tok.eos_token) :])

    def assistant(self, content: str) -> list[int]:
        """A reply that the student did not sample (a B2F replayed action), ending with eos."""
        return self._encode(content) + [self.eos]


# --------------------------------------------------------------------------------------------------
# The rollout engine: what samples the student's replies


class Session(Protocol):
    """One rollout's sampler. Rows are the episodes still active, in order; `keep` drops the others."""

    logprobs: list[list[float]]  # after each reply: per row, log p(token) of each sampled token (temperature 1);
    # optional: without it the episodes hold nan there, and no sampler/trainer gap is logged

    def reply(self, streams: list[list[int]], eos: int, temperature: float, max_new_tokens: int) -> list[list[int]]:
        """One reply per row, streams[r] being row r's whole token stream so far: the sampled ids, ending in a stop
        token (`stop_tokens`) unless cut at max_new_tokens. Its randomness comes from the session's generator only."""

    def keep(self, rows: list[int]) -> None: ...


class Engine(Protocol):
    """What samples the student's replies: our Decoder (`Local`) or vLLM (vllm_engine.VLLMEngine). Another engine
    (SGLang, say) is one class with these two methods, whose sessions sample from the weights of the last sync."""

    def session(self, generator: torch.Generator) -> Session:
        """The sampler of one rollout; its seeds are drawn from generator, so a rollout is a function of it."""

    def sync(self, model) -> None:
        """Sample from `model`'s current weights from now on (after each update)."""


class Local:
    """The Decoder as an Engine: it samples from the live model, so there is nothing to copy on sync."""

    def __init__(self, model, vocab_size: int):
        self.model, self.vocab_size = model, vocab_size

    def session(self, generator: torch.Generator) -> "Decoder":
        return Decoder(self.model, self.vocab_size, generator)

    def sync(self, model) -> None:
        self.model = model


def stop_tokens(eos: int, generation_config) -> list[int]:
    """The ids a reply ends at: the chat's end-of-turn token and the eos_token_id(s) of the model's generation config
    (Qwen's lists <|endoftext|> beside <|im_end|>), as vLLM stops on both; the Decoder stops on the same set."""
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys([eos] + extra))


# --------------------------------------------------------------------------------------------------
# Batched sampling with one KV cache across turns


class Decoder:
    """Samples replies for many episodes at once and keeps their KV cache from turn to turn.

    `generate()` cannot continue a batched cache when each row gets a different-length new message, so we run
    the sampling loop over model.forward ourselves. Rows are aligned on the right: each turn's new tokens are
    left-padded to a common length, padding is masked out, and position ids count only real tokens, so every
    row computes exactly what a lone forward over its own stream would (tested).
    """

    def __init__(self, model, vocab_size: int, generator: torch.Generator):
        from transformers import DynamicCache

        self.model, self.vocab_size, self.gen = model, vocab_size, generator
        self.device = next(model.parameters()).device
        # The sampling noise comes from a generator on the model's device, seeded from the caller's (the step's)
        # generator: a rollout's randomness stays a function of (seed, step), so resume is exact, and no
        # probabilities leave the device. (A CUDA and a CPU generator give different streams for one seed.)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        self.noise = torch.Generator(device=self.device).manual_seed(seed)
        self.cache = DynamicCache(config=model.config)
        # transformers 5.20+ names the forward's cache argument `cache`, earlier releases `past_key_values` (vLLM's
        # environment has 5.19: requirements-vllm.txt); an unknown keyword would be dropped silently, uncached
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.pos = None  # [B] next position id of each row
        self.fed = []  # per row: tokens of its stream already in the cache
        self.generation_config = getattr(model, "generation_config", None)
        self.logprobs: list[list[float]] = []  # Session.logprobs

    def _forward(self, chunks: list[list[int]]) -> torch.Tensor:
        n, B = max(map(len, chunks)), len(chunks)
        ids = torch.zeros(B, n, dtype=torch.long)
        new_mask = torch.zeros(B, n, dtype=torch.long)
        for r, c in enumerate(chunks):
            if c:
                ids[r, n - len(c) :] = torch.tensor(c)
                new_mask[r, n - len(c) :] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        if self.pos is None:
            self.pos = torch.zeros(B, dtype=torch.long, device=self.device)
            self.mask = self.mask.new_zeros(B, 0)
        position_ids = (self.pos[:, None] + new_mask.cumsum(1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, new_mask], 1)
        self.pos = self.pos + new_mask.sum(1)
        out = self.model(
            input_ids=ids, attention_mask=self.mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
            **{self.cache_kw: self.cache}
        )
        return out.logits[:, -1].float()  # every row of the head: log p over all of them, as the trainer's

    block = 256  # vocabulary entries per block of the two-level draw in _sample

    def _race(self, logw: torch.Tensor) -> torch.Tensor:
        """argmax(logw - log E), E ~ Exp(1) iid: an exact draw from softmax(logw) along the last dim (Gumbel-max: the
        smallest of the E_v / w_v is entry v with probability w_v / sum w). E = -log U with U ~ U[0, 1) from the
        decoder's own generator: U = 0 makes E = inf, an entry that cannot win (probability 2^-24 per entry)."""
        u = torch.empty_like(logw).uniform_(generator=self.noise)
        return (logw - u.log_().neg_().log_()).argmax(-1)

    def _sample(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """One token per row from softmax(logits / temperature), on the logits' device (argmax at temperature 0).

        No [B, V] probabilities go to the host, and no cumulative sum is taken (in float32 it would round away the
        tail of a 152k vocabulary). The draw has two levels, each an exact race: a block of `block` ids with
        probability its share of the mass, then an id within that block by its weight; P(v) = w_v / sum w. Noise is
        needed for V / block + block entries a row instead of V: on a CPU one race over the whole vocabulary
        costs 2-3x more (the random numbers dominate); on a GPU either is negligible.
        """
        if temperature == 0:
            return logits.argmax(-1)
        x = logits.float()
        w = (x - x.amax(-1, keepdim=True)).mul_(1 / temperature).exp_()  # in (0, 1], 0 only below e^-103
        blocks = torch.nn.functional.pad(w, (0, -w.shape[-1] % self.block)).view(w.shape[0], -1, self.block)
        b = self._race(blocks.sum(-1).log())  # log 0 = -inf: an empty (padding) block or id never wins
        return b * self.block + self._race(blocks[torch.arange(len(b), device=b.device), b].log())

    @torch.no_grad()
    def reply(self, streams: list[list[int]], eos: int, temperature: float, max_new_tokens: int) -> list[list[int]]:
        """One reply per row; streams[r] is row r's whole token stream so far (its unfed tail is fed first)."""
        if len(self.fed) < len(streams):
            self.fed += [0] * (len(streams) - len(self.fed))
        stops = torch.tensor(stop_tokens(eos, self.generation_config), device=self.device)
        logits = self._forward([s[f:] for s, f in zip(streams, self.fed)])
        self.fed = [len(s) for s in streams]
        out, logps = [[] for _ in streams], []
        alive = [True] * len(streams)
        for t in range(max_new_tokens):
            # a config's padded vocabulary rows are never sampled; log p is over every row (as the trainer's)
            tokens = self._sample(logits[:, : self.vocab_size], temperature)
            logps.append(logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(-1))
            ended = torch.isin(tokens, stops).tolist()
            tokens = tokens.tolist()
            for r, tok in enumerate(tokens):
                if alive[r]:
                    out[r].append(tok)
                    alive[r] = not ended[r]
            if not any(alive) or t == max_new_tokens - 1:
                break
            # Rows that already finished feed a masked token: their cache entry is ignored from now on.
            logits = self._forward([[tok] if a else [] for tok, a in zip(tokens, alive)])
            self.fed = [f + a for f, a in zip(self.fed, alive)]
        logps = torch.stack(logps, 1).tolist()  # one transfer per reply
        self.logprobs = [row[: len(o)] for row, o in zip(logps, out)]
        return out

    def keep(self, rows: list[int]) -> None:
        """Drop the rows of finished episodes from the batch and the cache."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos = self.mask[idx], self.pos[idx]
        self.fed = [self.fed[r] for r in rows]


# --------------------------------------------------------------------------------------------------
# Rollout


@dataclass
class Episode:
    task: str
    ids: list[int] = field(default_factory=list)  # the whole chat as one token stream
    turn_of: list[int] = field(default_factory=list)  # per token: env turn index of a student-sampled token, else -1
    sampled_logp: list[float] = field(default_factory=list)  # per token: the sampler's log p of a sampled token, else nan
    prefix: int = 0  # B2F: demonstration actions replayed before the student acts
    turns: int = 0  # env turns taken, replayed ones included
    student_turns: int = 0
    reply_tokens: int = 0
    invalid: int = 0  # student replies with no usable action, or actions the env refused
    done: bool = False
    success: bool = False
    score: float = 0.0  # the best score the episode reached (ScienceWorld scores partial progress; the authors log its best)
    truncated: bool = False  # ended because the stream reached the context limit
    replay_done: bool = False  # B2F: the replayed prefix already finished the task (no student turn)
    replay_refused: int = 0  # B2F: replayed demo actions the env refused (a demos file that does not fit the env)
    error: str | None = None  # the env failed (crashed worker, dead JVM): recorded as a failure
    decode_seconds: float = 0.0  # wall time of the sampling passes while this episode was active (shared by its batch)
    actions: list[str] = field(default_factory=list)  # the actions the env took, replayed ones included
    replies: list[str] = field(default_factory=list)  # the text of each reply that gave one of those actions

    def add(self, tokens: list[int], turn: int = -1, logp: list[float] | None = None) -> None:
        self.ids += tokens
        self.turn_of += [turn] * len(tokens)
        self.sampled_logp += logp if logp is not None else [math.nan] * len(tokens)

    def saw(self, step: Step) -> None:
        """Keep the best score so far: an episode cut at T_max, or ended by a wrong move, keeps the points it earned."""
        self.score = max(self.score, step.score)

    def finish(self, step: Step) -> None:
        self.saw(step)
        self.done, self.success = True, step.success
        self.error = step.info.get("error")


@torch.no_grad()
def rollout(model, chat: Chat, envs, env, tasks, plans, demos, *, temperature, max_new_tokens, max_turns, max_context, think, prompt,
            generator, amp=None, desc=None, engine=None):
    """Play one episode per task, all at once. plans[i] is a curriculum.Plan, demos[i] an action list or None.
    prompt: the prompt style (prompts.STYLES). amp: the autocast dtype of the model's forwards (`precision`), or None.
    desc: show a progress bar with this label (turns played, episodes still active), e.g. for a long first eval.
    engine: what samples the replies (an Engine): None, our Decoder over `model` (Local); or vllm_engine.VLLMEngine."""
    episodes = [Episode(t, prefix=p.prefix) for t, p in zip(tasks, plans)]
    prompters = [Prompter(prompt, env, think) for _ in tasks]

    def extend(ep: Episode, tokens: list[int]) -> bool:
        """Append a user message, unless the stream could then not fit one more reply: that ends the episode."""
        if len(ep.ids) + len(tokens) + max_new_tokens > max_context:
            ep.truncated = ep.done = True
            return False
        ep.add(tokens)
        return True

    last = envs.reset(tasks)  # per episode: the env's latest Step
    for ep, p, s in zip(episodes, prompters, last):
        if extend(ep, chat.first(p.first(s))) and s.done:  # an env that failed at reset
            ep.finish(s)

    # B2F: replay the demonstration prefix. The student sees it as history; it is never trained.
    for j in range(max((ep.prefix for ep in episodes), default=0)):
        slots = [i for i, ep in enumerate(episodes) if not ep.done and j < ep.prefix]
        for i, s in zip(slots, envs.step(slots, [demos[i][j] for i in slots])):
            ep, action = episodes[i], demos[i][j]
            ep.turns += 1
            ep.saw(s)
            ep.replay_refused += not s.valid
            last[i] = s
            ep.actions.append(action)
            ep.replies.append(format_reply(action))
            if s.done:
                ep.add(chat.assistant(format_reply(action)))
                ep.finish(s)
                ep.replay_done = True
            else:
                extend(ep, chat.assistant(format_reply(action)) + chat.user(prompters[i].after(action, s)))

    decoder = (engine if engine is not None else Local(model, len(chat.tok))).session(generator)
    active = [i for i, ep in enumerate(episodes) if not ep.done]
    bar = tqdm(total=max_turns, desc=desc, unit="turn", leave=False, disable=desc is None)
    while active:
        bar.set_postfix(active=f"{len(active)}/{len(tasks)}")
        t0 = time.perf_counter()
        with autocast(amp and model_device(model), amp):  # one context per reply: each weight is cast to bf16 once per turn
            replies = decoder.reply([episodes[i].ids for i in active], chat.eos, temperature, max_new_tokens)
        for i in active:
            episodes[i].decode_seconds += time.perf_counter() - t0
        parsed, texts = [], []
        logps = getattr(decoder, "logprobs", None) or [None] * len(replies)  # an engine may record none: nan
        for i, reply, logp in zip(active, replies, logps):
            ep = episodes[i]
            ep.add(reply, turn=ep.turns, logp=logp)
            ep.reply_tokens += len(reply)
            if reply[-1] != chat.eos:  # cut at max_new_tokens, or another stop token: close the turn with the chat's
                ep.add([chat.eos])
            texts.append(chat.tok.decode(reply, skip_special_tokens=True))
            parsed.append(parse_action(texts[-1]))
        good = [(i, a) for i, (a, _) in zip(active, parsed) if a is not None]
        results = dict(zip([i for i, _ in good], envs.step([i for i, _ in good], [a for _, a in good]))) if good else {}
        keep = []
        for r, (i, (action, why)) in enumerate(zip(active, parsed)):
            ep = episodes[i]
            ep.turns += 1
            ep.student_turns += 1
            if action is None:
                ep.invalid += 1
                s = refused(last[i], why)
            else:
                s = results[i]
                ep.saw(s)
                ep.invalid += not s.valid
                if s.valid:
                    ep.actions.append(action)
                    ep.replies.append(texts[r])
                last[i] = s  # (a refused reply changes nothing: the next refusal restates this Step, not itself)
            if s.done:
                ep.finish(s)
            elif ep.turns >= max_turns or ep.student_turns >= plans[i].student_turns:
                ep.done = True  # the horizon, or the F2B depth: stop here without a verdict of success
            elif extend(ep, chat.user(prompters[i].after(action, s))):
                keep.append(r)
        if len(keep) < len(active):
            decoder.keep(keep)
        active = [active[r] for r in keep]
        bar.update(1)
    bar.close()
    return episodes


def trained_turns(episode: Episode) -> list[int]:
    """Per prediction position t (predicting token t+1): the turn index if that token is a student token, else -1."""
    return episode.turn_of[1:] + [-1]


def evaluate(model, chat, envs, env, tasks, *, batch: int, temperature: float, max_new_tokens: int, think: bool,
             prompt: str, max_turns: int, max_context: int, seed: int, amp=None, desc=None, engine=None) -> list[Episode]:
    """Full horizon from scratch (the paper's eval), in fixed batches with fixed seeds (amp, desc, engine: as in rollout)."""
    episodes = []
    for b in range(0, len(tasks), batch):
        part = tasks[b : b + batch]
        label = desc and f"{desc} batch {b // batch + 1}/{-(-len(tasks) // batch)}"
        gen = torch.Generator().manual_seed(seed * 7919 + b)
        episodes += rollout(
            model, chat, envs, env, part, [Plan(0, max_turns)] * len(part), [None] * len(part),
            temperature=temperature, max_new_tokens=max_new_tokens, max_turns=max_turns,
            max_context=max_context, think=think, prompt=prompt, generator=gen, amp=amp, desc=label, engine=engine,
        )
    return episodes
