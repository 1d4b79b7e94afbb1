"""Token log-probabilities, divergences between student and teacher, and loss weights.

Notation: p_s and p_t are the student's and teacher's next-token distributions at one position.

Sampled-token estimator ("k1"). On-policy distillation samples a response y ~ p_s and scores each of its
tokens with k1 = log p_s(y_t) - log p_t(y_t). Its expectation under the student is
    E_{y~p_s}[log p_s(y) - log p_t(y)] = KL(p_s || p_t),
the reverse KL, so it is an unbiased one-sample estimate that needs only two log-probabilities per token.
The trainer uses -k1 (detached) as a per-token advantage in a policy-gradient loss.

Full-vocabulary divergences sum over the whole vocabulary at every position instead:
    forward_kl  KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))     (mode covering, as in SFT)
    reverse_kl  KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))     (mode seeking)
    jsd         the generalized JSD of GKD (Agarwal et al. 2024), with m = beta p_t + (1 - beta) p_s:
                JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m).
                beta = 0.5 is the textbook JSD; as beta -> 0 it tends to beta * forward KL, as beta -> 1 to
                (1 - beta) * reverse KL. log m = logaddexp(log p_t + log beta, log p_s + log(1 - beta)) never
                leaves log space, so tiny probabilities do not underflow.

Memory. With a 152k vocabulary, [B, T, V] float32 logits for T = 8k tokens is ~5 GB, and autograd would
keep another copy for the backward. Everything here therefore works on chunks of positions: per chunk we
compute the logits, reduce them to one number per position, and drop them. With grad enabled each chunk is
wrapped in a non-reentrant activation checkpoint, which saves only the chunk's (small) hidden states and
recomputes the logits during the backward, so the backward too holds one chunk's logits at a time.

Loss aggregation. loss_weights turns "mean over tokens" or "mean over turns of the mean over their tokens"
into explicit per-token weights computed from the whole optimizer step's counts, so summing
weights * per-token loss over micro-batches gives exactly the full-batch loss (gradient accumulation stays exact).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

FULL_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
ESTIMATORS = ("k1",) + FULL_DIVERGENCES  # k1 = sampled-token estimator (the Tinker/Thinking Machines recipe)
AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
# Float32 logits held per chunk (64 MB): positions per chunk = this // (rows x vocabulary). A 152k vocabulary
# gets ~110 positions a row, a tiny one the whole sequence at once (no recomputation worth the name).
LOGITS_PER_CHUNK = 1 << 24


def pad(seqs: list[list[int]], value: int, device) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for r, s in enumerate(seqs):
        out[r, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states of right-padded sequences; the LM head is applied chunk by chunk in kl.py.

    No attention mask: under causal attention no real token sees the padding after it, so the real positions are
    exact without one (tested), and without a mask sdpa runs its fused causal kernel (2-3x faster on CPU here).
    """
    sharded = getattr(model, "fsdp_hidden_states", None)  # an FSDP student: through its root's hooks (fsdp.py)
    return sharded(ids) if sharded else model.base_model(input_ids=ids).last_hidden_state


def chunk_size(hidden: torch.Tensor, head: torch.nn.Module) -> int:
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    return max(1, LOGITS_PER_CHUNK // (hidden.shape[0] * vocab))


def head_logits(head: torch.nn.Module, hidden: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """head(hidden) as float32 logits, optionally Gemma-style softcapped: softcap * tanh(logits / softcap)."""
    weight = next(head.parameters(), None)
    if weight is not None and weight.dtype != hidden.dtype:
        hidden = hidden.to(weight.dtype)  # e.g. float32 hidden states into a bf16 lm_head
    logits = head(hidden).float()  # the softmax is done in float32 even when the model runs in bf16
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _chunked(fn, n_positions: int, chunk: int, *args) -> torch.Tensor:
    """Concatenate fn(start, stop, *args) -> [B, stop - start] over chunks of positions, checkpointed under grad."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out = []
    for start in range(0, n_positions, chunk):
        stop = min(start + chunk, n_positions)
        if torch.is_grad_enabled():
            out.append(checkpoint(fn, start, stop, *args, use_reentrant=False))
        else:
            out.append(fn(start, stop, *args))
    return torch.cat(out, dim=1)


def _logprob_chunk(start, stop, hidden, head, targets, softcap):
    logits = head_logits(head, hidden[:, start:stop], softcap)  # [B, c, V]
    picked = logits.gather(-1, targets[:, start:stop, None]).squeeze(-1)
    return picked - logits.logsumexp(-1)  # log softmax at the target only: no [B, c, V] log-softmax copy


def token_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int | None = None, softcap: float | None = None
) -> torch.Tensor:
    """log p(targets[b, t] | position t) as [B, T] float32, from hidden [B, T, H] (already aligned with targets).

    Padded positions may hold any valid id; the caller masks them. Never holds more than one chunk's logits.
    """
    return _chunked(_logprob_chunk, hidden.shape[1], chunk_size(hidden, head) if chunk is None else chunk, hidden, head, targets, softcap)


def causal_targets(input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Next-token targets: out[:, t] = input_ids[:, t + 1], last column pad_id (hidden[:, t] predicts token t + 1)."""
    out = torch.full_like(input_ids, pad_id)
    out[:, :-1] = input_ids[:, 1:]
    return out


def shift_mask(mask: torch.Tensor) -> torch.Tensor:
    """Mask over tokens -> mask over prediction positions: out[:, t] = mask[:, t + 1], last column 0.

    Token t + 1 is trained iff it is a student token, and it is predicted at position t.
    """
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, 1:]
    return out


def sampled_kl(logp_student: torch.Tensor, logp_teacher: torch.Tensor) -> torch.Tensor:
    """Per-token k1 = log p_s - log p_t at the sampled tokens; E_{y~p_s}[k1] = KL(p_s || p_t)."""
    return logp_student - logp_teacher


def _divergence_chunk(start, stop, kind, beta, s_hidden, s_head, t_hidden, t_head, s_softcap, t_softcap):
    # The teacher is computed in here rather than passed in: a checkpointed function keeps its inputs alive until
    # the backward, so passing teacher log-probs would keep all chunks' [B, c, V] alive. The price is that the
    # teacher's head runs again in the recomputation, a small cost next to the saved memory.
    with torch.no_grad():  # the teacher is a fixed target: no gradient into it
        # the teacher may sit on its own device; only this chunk's logits come over
        t_logits = head_logits(t_head, t_hidden[:, start:stop], t_softcap).to(s_hidden.device)
    s_logits = head_logits(s_head, s_hidden[:, start:stop], s_softcap)
    # Models of one family pad their vocabularies differently (Qwen2.5-7B: 152064, 1.5B: 151936); the extra
    # rows are never-used ids, so compare the shared prefix and renormalize over it.
    v = min(s_logits.shape[-1], t_logits.shape[-1])
    s_logp = F.log_softmax(s_logits[..., :v], dim=-1)
    t_logp = F.log_softmax(t_logits[..., :v], dim=-1)
    if kind == "forward_kl":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "reverse_kl":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    log_m = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log1p(-beta))
    return beta * (t_logp.exp() * (t_logp - log_m)).sum(-1) + (1 - beta) * (s_logp.exp() * (s_logp - log_m)).sum(-1)


def full_divergence(
    kind: str,
    s_hidden: torch.Tensor,
    s_head: torch.nn.Module,
    t_hidden: torch.Tensor,
    t_head: torch.nn.Module,
    chunk: int | None = None,
    beta: float = 0.5,
    s_softcap: float | None = None,
    t_softcap: float | None = None,
) -> torch.Tensor:
    """Per-position full-vocabulary divergence [B, T] float32 between student and teacher (see module docstring).

    kind is one of FULL_DIVERGENCES; beta (in (0, 1)) is used by "jsd" only. Gradients flow into the student only.
    """
    if kind not in FULL_DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {FULL_DIVERGENCES}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")  # at 0 or 1, m equals one side and JSD is 0
    args = (kind, beta, s_hidden, s_head, t_hidden, t_head, s_softcap, t_softcap)
    return _chunked(_divergence_chunk, s_hidden.shape[1], chunk_size(s_hidden, s_head) if chunk is None else chunk, *args)


def loss_weights(turn_ids: list[torch.Tensor], mode: str, total: int | None = None) -> list[torch.Tensor]:
    """Per-position float32 weights, one tensor per episode, so that sum_e (w[e] * loss[e]).sum() is the step's loss.

    turn_ids[e] holds, per prediction position, the index of the turn it belongs to, or -1 where untrained.
    "token-mean": every trained position of every episode counts equally (1 / N_tokens).
    "seq-mean-token-mean": each (episode, turn) response is one sequence; mean over its tokens, then mean over
    all sequences (1 / (n_tokens_in_sequence * N_sequences)). Untrained positions, and all positions when
    nothing is trained, get weight 0. total overrides the count N (tokens or sequences): under data parallelism it
    is the count over all ranks, so that summed gradients equal one process's (count_units gives a rank's share).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")
    weights, n_units = [], 0
    for ids in turn_ids:
        trained = ids >= 0
        w = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        if mode == "token-mean":
            w[trained] = 1.0
            n_units += int(trained.sum())
        else:
            # Each trained position gets 1 / (size of its turn); the same turn index in another episode is a
            # different sequence, which is why the counting is per episode.
            turns, inverse, counts = torch.unique(ids[trained], return_inverse=True, return_counts=True)
            w[trained] = 1.0 / counts[inverse].float()
            n_units += len(turns)
        weights.append(w)
    return [w / max(n_units if total is None else total, 1) for w in weights]


def count_units(turn_ids: list[torch.Tensor], mode: str) -> int:
    """N in loss_weights: trained positions ("token-mean") or (episode, turn) responses ("seq-mean-token-mean")."""
    if mode == "token-mean":
        return sum(int((ids >= 0).sum()) for ids in turn_ids)
    return sum(len(torch.unique(ids[ids >= 0])) for ids in turn_ids)
