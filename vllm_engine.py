"""The student's rollouts on vLLM (`--rollout vllm`): the same token streams as rollout.Decoder, sampled by vLLM.

rollout.rollout asks its engine for one reply per active episode, given each episode's whole token stream. vLLM gets
the stream's token ids (never text: `TokensPrompt`) and returns the sampled ids, so the stream the teacher scores is
exactly what was sampled. Its prefix cache keeps the KV of the stream's earlier turns (whole blocks), which plays the
part of the Decoder's cache across turns. The sampling seed of every request is drawn from the step's generator, so a
step's rollout is a function of (seed, step) and resume is exact, as with the Decoder (the two engines draw different
random numbers: a run is exact on one engine, not across them).

Weights: the engine starts from the student's directory (the checkpoint on resume) and gets the student's weights
after every update (`sync`: vLLM's reload_weights, then its prefix cache is dropped, since KV computed with the old
weights would be stale). A LoRA student's engine starts from the base model and gets base + adapter merged
(lora.merged_state_dict) at start and after every update. The teacher stays a transformers forward: it scores a whole trajectory in one pass
(`opd.teacher_logprobs`), where vLLM would score prompt log-probs turn by turn.

Memory: on a GPU the engine takes `memory` (vLLM's gpu_memory_utilization) of the device for its weights and KV
cache, beside the student's training state and the teacher; on a CPU $VLLM_CPU_KVCACHE_SPACE (GB, default 1 here)
sizes its cache. Under torchrun each rank has its own engine on its own device, for its own share of the episodes.
"""

from __future__ import annotations

import os

import torch


class VLLMEngine:
    def __init__(self, model_dir: str, vocab: int, device: str, dtype: str = "auto", memory: float = 0.3, seed: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: weights sync by reference
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(f"--rollout vllm needs vllm (see requirements-vllm.txt; on a CPU: .ci/vllm builds "
                               f".venv-vllm): {e}") from e
        cpu = not str(device).startswith("cuda")
        kw = dict(block_size=32) if cpu else dict(gpu_memory_utilization=memory)  # CPU blocks: multiples of 32
        self.llm = LLM(model=model_dir, dtype=dtype, enforce_eager=cpu, seed=seed, enable_prefix_caching=True, **kw)
        self.vocab = vocab  # the tokenizer's ids: a config's padded vocabulary rows are never sampled (as the Decoder)
        self.padded = self.llm.llm_engine.model_config.get_vocab_size() > vocab

    def session(self, generator: torch.Generator) -> "VLLMSession":
        """The engine for one rollout: its seeds come from the rollout's generator."""
        return VLLMSession(self, int(torch.randint(0, 2**31 - 1, (), generator=generator)))

    @torch.no_grad()
    def sync(self, model) -> None:
        """Load the student's current weights into the engine and drop the KV computed with the old ones."""
        import lora  # a LoRA student: base + adapter merged, under the plain names the engine knows

        state = lora.merged_state_dict(model) if lora.is_lora(model) else model.state_dict()
        weights = list(state.items())  # tied embeddings: state_dict holds lm_head.weight too
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()


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
        params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens, stop_token_ids=[eos],
                                 seed=(self.seed + 1_000_003 * self.calls + r) % 2**31, detokenize=False,
                                 allowed_token_ids=allowed, logprobs=0) for r in range(len(streams))]
        self.calls += 1
        outs = self.engine.llm.generate([TokensPrompt(prompt_token_ids=s) for s in streams], params, use_tqdm=False)
        replies = [list(o.outputs[0].token_ids) for o in outs]
        self.logprobs = [[lp[t].logprob for t, lp in zip(ids, o.outputs[0].logprobs)] for ids, o in zip(replies, outs)]
        self.cache.append([(len(o.prompt_token_ids), o.num_cached_tokens or 0) for o in outs])
        return replies

    def keep(self, rows: list[int]) -> None:
        pass  # nothing per row: each reply sends the whole stream, and the prefix cache finds its earlier turns
