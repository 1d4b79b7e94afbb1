"""The student's rollouts on vLLM (`--rollout vllm`): a rollout.Engine, as our Decoder (rollout.Local) is one.

rollout.rollout asks its engine for one reply per active episode, given each episode's whole token stream. vLLM gets
the stream's token ids (never text: `TokensPrompt`) and returns the sampled ids, so the stream the teacher scores is
exactly what was sampled. Its prefix cache keeps the KV of the stream's earlier turns (whole blocks), which plays the
part of the Decoder's cache across turns. The sampling seed of every request is drawn from the step's generator, so a
step's rollout is a function of (seed, step) and resume is exact, as with the Decoder (the two engines draw different
random numbers: a run is exact on one engine, not across them). A reply ends at the same tokens as the Decoder's
(rollout.stop_tokens: the chat's end token and the eos_token_ids of the model's generation config, which vLLM adds
itself). Each reply also records vLLM's log p of every token it sampled, which the update compares with its own
(opd.sampler_gap: the sampler/trainer mismatch, and the optional truncated importance weights, --tis-cap).

Weights: the engine starts from the student's directory (the checkpoint on resume), checked against the student
(`check`), and gets the student's weights after every update (`sync`: vLLM's reload_weights, then its prefix cache is
dropped, since KV computed with the old weights would be stale, then `check`). A LoRA student's engine starts from the
base model and gets base + adapter merged (lora.merged_state_dict) at start and after every update. `check` compares
the engine's prompt log-probs over a recent stream with the student's forward: vLLM's reload_weights raises on a name
it does not know but only warns, keeping the old weights, on one it misses; sync turns that warning into an error.

The teacher stays a transformers forward (opd.teacher_logprobs), not a vLLM engine scoring prompt log-probs: the
full-vocabulary estimators (forward_kl, reverse_kl, jsd) need the teacher's hidden states and whole distribution at
every position, and the telemetry needs its argmax (top1), where vLLM returns the top-k log-probs of each position.
Not speed: on the CPU build vLLM's prompt log-probs score the same episodes about twice as fast (bench_vllm.py).

Memory: on a GPU the engine takes `memory` (vLLM's gpu_memory_utilization; tcod.py: the memory plan's engine items
over the device, memory.with_engine) of the device for its weights, KV cache and working memory, beside the student's
training state and the teacher; with `sleep` (vLLM's sleep mode, level 2) it frees its weights and KV cache for each
update (`sleep`) and the next sync wakes them. On a CPU $VLLM_CPU_KVCACHE_SPACE (GB, default 1 here) sizes its cache.
Under torchrun each rank has its own engine (vLLM's external-launcher mode) on its LOCAL_RANK's device, for its own
share of the episodes; `close` shuts it down before the process group goes.
"""

from __future__ import annotations

import logging
import os

import torch

from rollout import stop_tokens


class VLLMEngine:
    def __init__(self, model_dir: str, vocab: int, device: str, dtype: str = "auto", memory: float | None = None,
                 seed: int = 0, sleep: bool = False, max_seqs: int | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: weights sync by reference
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(f"--rollout vllm needs vllm (see requirements-vllm.txt; on a CPU: .ci/vllm builds "
                               f".venv-vllm): {e}") from e
        cpu = not str(device).startswith("cuda")
        from memory import ENGINE_BATCH_TOKENS

        # what the memory plan counts: its batch of tokens, at most max_seqs sequences (a rollout's episodes) at once
        kw = dict(max_num_batched_tokens=ENGINE_BATCH_TOKENS, **(dict(max_num_seqs=max_seqs) if max_seqs else {}))
        if cpu:
            kw |= dict(block_size=32)  # CPU blocks: multiples of 32
        else:
            kw |= dict(enable_sleep_mode=sleep, **(dict(gpu_memory_utilization=memory) if memory else {}))
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # torchrun: vLLM's documented mode for engines inside a launcher's ranks. Each rank's engine runs on its
            # LOCAL_RANK's device (the default executor would put every rank's on cuda:0), and vLLM's groups are cut
            # from our process group (tensor parallel 1: each engine is whole, its own rank's episodes only)
            kw["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(model=model_dir, dtype=dtype, enforce_eager=cpu, seed=seed, enable_prefix_caching=True, **kw)
        self.vocab = vocab  # the tokenizer's ids: a config's padded vocabulary rows are never sampled (as the Decoder)
        self.padded = self.llm.llm_engine.model_config.get_vocab_size() > vocab
        self.dtype = self.llm.llm_engine.model_config.dtype
        self.generation_config = generation_config(model_dir)  # its eos_token_id(s) stop replies (rollout.stop_tokens)
        self.probe: list[int] | None = None  # the stream `check` scores: set by each reply
        self.sleeps, self.asleep = sleep and not cpu, False  # (vLLM's sleep mode is CUDA's)

    def sleep(self) -> None:
        """Before an update: free the engine's weights and KV cache (vLLM's sleep level 2: the next sync reloads the
        weights anyway), so that they and the update's gradients and activations are not held at once. A no-op
        without sleep mode (on a CPU, or --no-vllm-sleep)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        """Shut the engine down, its process groups with it (and torchrun's, which vLLM's are cut from): before the
        process exits, since vLLM's own shutdown at exit would find those groups already destroyed."""
        self.llm.llm_engine.engine_core.shutdown()

    def session(self, generator: torch.Generator) -> "VLLMSession":
        """The engine for one rollout: its seeds come from the rollout's generator."""
        return VLLMSession(self, int(torch.randint(0, 2**31 - 1, (), generator=generator)))

    @torch.no_grad()
    def sync(self, model) -> None:
        """Load the student's current weights into the engine, drop the KV computed with the old ones, and check that
        the engine now samples from them."""
        weights = list(student_state(model).items())  # tied embeddings: state_dict holds lm_head.weight too
        if self.asleep:  # vLLM's documented order after a level-2 sleep: weights' memory, the weights, the KV cache
            self.llm.wake_up(tags=["weights"])
        with LoadWarnings() as missed:  # reload_weights raises on a name it does not know, only warns on one it misses
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if missed.messages:
            raise RuntimeError(f"the vLLM engine kept some of its old weights: {' '.join(missed.messages)[:500]}")
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()
        self.check(model)

    @torch.no_grad()
    def check(self, model, probe: list[int] | None = None) -> float:
        """Raise unless the engine's prompt log-probs over `probe` (default: the first stream of the last reply,
        up to 256 tokens) are the student's forward's, within what the engine's dtype allows (`TOLERANCE`: a mean
        |difference| over the probe's tokens); return that mean. One short prefill on each side."""
        from vllm import SamplingParams, TokensPrompt

        from rollout import autocast, model_device, precision

        probe = (probe or self.probe or list(range(1, min(self.vocab, 129))))[:256]
        out = self.llm.generate([TokensPrompt(prompt_token_ids=probe)], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                detokenize=False), use_tqdm=False)[0]
        theirs = torch.tensor([lp[t].logprob for t, lp in zip(probe[1:], out.prompt_logprobs[1:])])
        device = model_device(model)
        with autocast(device, precision("auto", str(device))[2] if self.dtype == torch.bfloat16 else None):
            logits = model(torch.tensor([probe], device=device)).logits[0, :-1].float()
        ours = (logits.gather(1, torch.tensor(probe[1:], device=device)[:, None])[:, 0] - logits.logsumexp(-1)).cpu()
        gap = (ours - theirs).abs().mean().item()
        limit = TOLERANCE.get(self.dtype, TOLERANCE[torch.bfloat16])
        if not gap <= limit:
            raise RuntimeError(f"the vLLM engine does not sample from the student's weights: its log-probs differ from "
                               f"the student's by {gap:.3g} on average over {len(probe) - 1} tokens (allowed {limit})")
        return gap


# The most a synced engine's mean |log p| may differ from the student's over a probe: float32 agrees to ~1e-6
# (test_vllm.py), bf16 kernels to a few 1e-2; a stale, unloaded or garbage weight set is off by far more.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25}


class LoadWarnings(logging.Handler):
    """Collects vLLM's 'weights were not loaded' warnings while in a `with` block (the engine runs in-process)."""

    name = "vllm.model_executor.model_loader.reload.inplace"

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        if "not loaded" in record.getMessage():
            self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger(self.name).addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger(self.name).removeHandler(self)


def generation_config(model_dir: str):
    """The model's generation config as transformers and vLLM read it: generation_config.json, else from config.json."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))


def start_engine(student, loaded_from: str, vocab: int, device: str, amp, seed: int, memory: float | None, sleep: bool,
                 max_seqs: int) -> VLLMEngine:
    """tcod.py's engine, for a student loaded from `loaded_from` (a model, a run's checkpoint or a LoRA adapter), in
    the precision the student's forwards run in (amp: bf16 autocast)."""
    import lora
    from models import resolve_model

    plain = loaded_from
    while lora.is_lora_checkpoint(plain):  # an adapter is no model for vLLM: start from its base, then sync
        plain = resolve_model(lora.base_of(plain))
    engine = VLLMEngine(plain, vocab, device, dtype="bfloat16" if amp else "float32", seed=seed, memory=memory,
                        sleep=sleep, max_seqs=max_seqs)
    if plain != loaded_from:
        engine.sync(student)  # base + adapter, merged
    else:
        engine.check(student)  # it samples from the weights the student was loaded with
    return engine


def student_state(model) -> dict:
    """The weights vLLM loads: a LoRA student's base + adapter merged, under the plain names the engine knows."""
    import lora

    return lora.merged_state_dict(model) if lora.is_lora(model) else model.state_dict()


class VLLMSession:
    """reply / keep, as rollout.Decoder: rows are episodes still active, in order.

    After each reply, `logprobs[r]` holds vLLM's log-probability of each token it sampled for row r (its raw
    log-softmax, at temperature 1, whatever the sampling temperature), and `cache` gets one (prompt tokens, tokens
    found in the prefix cache) pair per row: what the tests check the streams and the cache against."""

    def __init__(self, engine: VLLMEngine, seed: int):
        self.engine, self.seed, self.calls = engine, seed, 0
        self.logprobs: list[list[float]] = []
        self.cache: list[list[tuple[int, int]]] = []

    def reply(self, streams: list[list[int]], eos: int, temperature: float, max_new_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams, TokensPrompt

        allowed = list(range(self.engine.vocab)) if self.engine.padded else None
        stops = stop_tokens(eos, self.engine.generation_config)  # what vLLM would add itself: said, so it is one set
        params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens, stop_token_ids=stops,
                                 seed=(self.seed + 1_000_003 * self.calls + r) % 2**31, detokenize=False,
                                 allowed_token_ids=allowed, logprobs=0) for r in range(len(streams))]
        self.calls += 1
        outs = self.engine.llm.generate([TokensPrompt(prompt_token_ids=s) for s in streams], params, use_tqdm=False)
        replies = [list(o.outputs[0].token_ids) for o in outs]
        self.engine.probe = (streams[0] + replies[0])[-256:]
        self.logprobs = [[lp[t].logprob for t, lp in zip(ids, o.outputs[0].logprobs)] for ids, o in zip(replies, outs)]
        self.cache.append([(len(o.prompt_token_ids), o.num_cached_tokens or 0) for o in outs])
        return replies

    def keep(self, rows: list[int]) -> None:
        pass  # nothing per row: each reply sends the whole stream, and the prefix cache finds its earlier turns
