"""One OPD step on a rollout's episodes: the teacher scores the student's exact tokens, the per-token sampled
reverse KL d = log p_s - log p_t becomes the policy-gradient loss, and AdamW steps on it (tcod.py runs the loop
around this, kl.py holds the estimators). Also the KL and episode metrics every step logs.

Every episode is one token stream (rollout.Episode.ids) whose student tokens carry their turn index
(rollout.trained_turns; -1 elsewhere: prompts, observations, replayed B2F turns). Both models see the same padded
ids, so "the teacher scores the student's exact tokens" holds by construction.

Telemetry: inside the same chunked passes (one chunk's [B, c, V] logits at a time, nothing full-vocabulary kept),
the scoring also yields, per student token, the teacher's probability of it, whether it is the teacher's argmax, and
the student's full-vocabulary entropy at that position; kl_metrics turns them into per-turn and overall means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import kl
from kl import hidden_states, pad
from dist import Dist
from rollout import Episode, autocast, model_device, precision, trained_turns


@dataclass(frozen=True)
class UpdateConfig:
    """What an update needs to know (tcod.update_config builds it from the run's Args, where each is documented)."""

    estimator: str = "k1"
    kl_coef: float = 1.0
    jsd_beta: float = 0.5
    aggregation: str = "token-mean"
    grad_clip: float = 1.0
    micro_batch: int = 4
    turns_per_update: int = 0  # 0: one optimizer step per rollout
    dtype: str = "float32"  # rollout.precision's mode: "auto", "float32" or "bf16-mixed"
    telemetry: bool = True  # teacher_p / entropy / top1 per token (off only to measure its cost: bench.py)
    tis_cap: float = 0.0  # truncated importance sampling of the sampler/trainer gap (k1 only); 0: off


def softcap(model):
    return getattr(model.config, "final_logit_softcapping", None)


def microbatches(episodes: list[Episode], size: int):
    """Indices grouped by similar length so that little compute goes to padding."""
    order = sorted(range(len(episodes)), key=lambda i: len(episodes[i].ids))
    return [order[i : i + size] for i in range(0, len(order), size)]


def _teacher_chunk(start, stop, hidden, head, targets, softcap, at):
    logits = kl.head_logits(head, hidden[:, start:stop], softcap)  # [B, c, V]
    picked = logits.gather(-1, targets[:, start:stop, None]).squeeze(-1)
    top1 = torch.zeros_like(picked)
    w = at[:, start:stop]  # the argmax only where it is recorded: the trained positions, a share of the stream
    top1[w] = (picked[w] == logits[w].amax(-1)).to(top1.dtype)  # the sampled token is (one of) the argmax; ties count
    return torch.stack([picked - logits.logsumexp(-1), top1], -1)  # [B, c, 2]


def teacher_logprobs(teacher, ids: torch.Tensor, targets: torch.Tensor, top1_at: torch.Tensor | None = None):
    """The teacher's hidden states (on its own device, see --teacher-device) and log p_teacher(target) on ids' device;
    with top1_at (a bool mask [B, T]), also whether each target there is the teacher's argmax (float 0/1; 0 outside
    the mask), from the same chunks' logits."""
    with torch.no_grad():
        dev = model_device(teacher)
        hidden = hidden_states(teacher, ids.to(dev))
        head, targets = teacher.get_output_embeddings(), targets.to(dev)
        if top1_at is None:
            return hidden, kl.token_logprobs(hidden, head, targets, softcap=softcap(teacher)).to(ids.device)
        out = kl._chunked(_teacher_chunk, hidden.shape[1], kl.chunk_size(hidden, head), hidden, head, targets,
                          softcap(teacher), top1_at.to(dev))
    return hidden, out[..., 0].to(ids.device), out[..., 1].to(ids.device)


def token_entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_v p(v) log p(v) over the last axis, in the logits' float32, as an elementwise product and a sum.
    Not lse - E_p[z] (a difference of two large numbers: 6.4e-3 nats off at the 152k vocabulary) and not an einsum
    (a matmul-style reduction: 1.4e-3 off); this form is within 1e-5 of float64 there (test_telemetry)."""
    logp = logits - lse[..., None]
    return -logp.exp().mul_(logp).sum(-1)


def student_logprobs(hidden, head, targets, softcap=None, entropy_at: torch.Tensor | None = None):
    """log p_student(target) [B, T] (differentiable, as kl.token_logprobs) and, with entropy_at (a bool mask [B, T]),
    the student's entropy H(p_s) at those positions (0 elsewhere; no grad), from the same chunks' logits: the raw head
    at temperature 1 (softcapped if the model softcaps), the distribution the loss scores, whatever the sampling
    temperature was. Only the masked positions pay for it: the trained tokens, where it is recorded."""
    if entropy_at is None:
        return kl.token_logprobs(hidden, head, targets, softcap=softcap), None
    ent = {}  # chunk start -> [B, c]

    def chunk(start, stop, hidden, head, targets, softcap):
        logits = kl.head_logits(head, hidden[:, start:stop], softcap)
        lse = logits.logsumexp(-1)
        if start not in ent:  # not again when the activation checkpoint recomputes the chunk in the backward
            with torch.no_grad():
                w, h = entropy_at[:, start:stop], torch.zeros_like(lse, dtype=torch.float32)
                h[w] = token_entropy(logits.detach()[w], lse.detach()[w])  # head_logits: float32
                ent[start] = h
        return logits.gather(-1, targets[:, start:stop, None]).squeeze(-1) - lse

    logp = kl._chunked(chunk, hidden.shape[1], kl.chunk_size(hidden, head), hidden, head, targets, softcap)
    return logp, torch.cat([ent[k] for k in sorted(ent)], 1)


def batch_tensors(episodes: list[Episode], mb: list[int], turns: list[torch.Tensor], device):
    ids = pad([episodes[i].ids for i in mb], 0, device)
    return ids, kl.causal_targets(ids), pad([turns[i].tolist() for i in mb], -1, device)


def per_token(kl_tokens: list, mb: list[int], turn_ids: torch.Tensor, d: torch.Tensor, logp_t=None, entropy=None, top1=None) -> None:
    """Append one record per student token of a micro-batch: (episode index, turn, d) and, with telemetry,
    (episode index, turn, d, p_teacher(token), student entropy at its position, 1.0 if it is the teacher's argmax)."""
    mask = turn_ids >= 0
    extra = [] if logp_t is None else [logp_t.exp(), entropy, top1]
    for r, i in enumerate(mb):
        cols = [turn_ids[r][mask[r]].tolist()] + [x[r][mask[r]].float().tolist() for x in [d] + extra]
        kl_tokens += [(i, *row) for row in zip(*cols)]


@torch.no_grad()
def score_episodes(student, teacher, episodes: list[Episode], micro_batch: int, amp=None, telemetry: bool = True,
                   teacher_logp: list | None = None) -> list:
    """Per-token records (per_token) at every student token, no update: the KL diagnostics of eval episodes, and of a
    rollout on arrival in the update buffer (buffer.py). amp: the student's autocast dtype (`precision`), as in the
    update, so that d means the same thing. teacher_logp: a list that gets, per episode, log p_teacher of each next
    token (float32 [len(ids)], on the CPU), which the buffer keeps so that its update needs no teacher forward."""
    device = model_device(student)
    turns = [torch.tensor(trained_turns(ep), dtype=torch.long) for ep in episodes]
    kl_tokens = []
    if teacher_logp is not None:
        teacher_logp[:] = [None] * len(episodes)
    for mb in microbatches(episodes, micro_batch):
        ids, targets, turn_ids = batch_tensors(episodes, mb, turns, device)
        with autocast(device, amp):
            at = turn_ids >= 0 if telemetry else None  # the telemetry's positions: the student's tokens
            logp_s, ent = student_logprobs(hidden_states(student, ids), student.get_output_embeddings(), targets, softcap(student), at)
            logp_t, *top1 = teacher_logprobs(teacher, ids, targets, top1_at=at)[1:]
        per_token(kl_tokens, mb, turn_ids, kl.sampled_kl(logp_s, logp_t), *((logp_t, ent, top1[0]) if telemetry else ()))
        if teacher_logp is not None:
            for r, i in enumerate(mb):
                teacher_logp[i] = logp_t[r, : len(episodes[i].ids)].float().cpu()
    return kl_tokens


def sampler_logprobs(episodes: list[Episode], mb: list[int], shape, device) -> torch.Tensor:
    """Per prediction position t (predicting token t+1, as trained_turns): the log p the rollout engine recorded when
    it sampled token t+1 (Episode.sampled_logp), nan where it sampled none."""
    out = torch.full(shape, math.nan, dtype=torch.float32)
    for r, i in enumerate(mb):
        v = episodes[i].sampled_logp[1:]
        out[r, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out.to(device)


def sampler_gap(logp_s: torch.Tensor, logp_sampler: torch.Tensor, cap: float) -> tuple[list[float], torch.Tensor]:
    """The sampler/trainer mismatch at the sampled tokens: (sum of |log p_trainer - log p_sampler|, how many of their
    ratios p_trainer / p_sampler leave [0.5, 2], how many tokens), and the truncated importance weights
    min(p_trainer / p_sampler, cap) (1 where no log p was recorded, or with cap 0: off), as TRL and verl offer them."""
    diff = logp_s.detach().float() - logp_sampler
    known = ~diff.isnan()
    d = diff[known]
    stats = [d.abs().sum().item(), (d.abs() > math.log(2)).sum().item(), float(known.sum().item())]
    weight = diff.exp().clamp(max=cap).where(known, torch.ones_like(diff)) if cap else torch.ones_like(diff)
    return stats, weight


def split_by_turns(keys: list[str], turns: list[int], per_update: int) -> list[list[int]]:
    """--update-from rollout: optimizer-step groups of whole episodes of one rollout, about per_update turns a group.

    A deep rollout (OPD: ~480 turns) makes several steps and a shallow one (F2B at depth 1: 16 turns) one; nothing
    carries over to the next rollout (the authors' trainer does carry rows over: buffer.py, --update-from buffer).
    An episode stays whole in one group, so each stream gets a single forward: the groups are
    ceil(total / per_update) contiguous runs of the episodes in a canonical order (by key, the task id: the same on
    every rank and in a single process), cut where the running turn count passes each multiple of total / groups
    (65 turns: 2 groups of about 32). per_update 0: one group.
    """
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    total = sum(turns)
    n_groups = max(1, -(-total // per_update)) if per_update else 1
    groups = [[] for _ in range(n_groups)]
    seen = 0
    for i in order:
        # by the episode's midpoint, so a long episode goes where most of its turns fall
        g = min(int((seen + turns[i] / 2) * n_groups / max(total, 1)), n_groups - 1)
        groups[g].append(i)
        seen += turns[i]
    return [g for g in groups if g]


def update(student, teacher, episodes, optimizer, cfg: UpdateConfig, dist: Dist | None = None) -> dict:
    """One or more optimizer steps on a rollout's episodes (split_by_turns), with the same metrics as one.

    Under data parallelism the groups are cut from every rank's (task, turns) list, so all ranks take the same
    number of steps, each on its own share of the same group (possibly none), normalized over the group globally.
    """
    mine = [(e.task, e.student_turns) for e in episodes]
    everyone = dist.gather(mine) if dist else [mine]
    owner = [(r, i) for r, rows in enumerate(everyone) for i in range(len(rows))]
    flat = [row for rows in everyone for row in rows]
    rank = dist.rank if dist else 0
    results, kl_tokens = [], []
    for group in split_by_turns([t for t, _ in flat], [n for _, n in flat], cfg.turns_per_update):
        local = [owner[g][1] for g in group if owner[g][0] == rank]
        out = score_and_update(student, teacher, [episodes[i] for i in local], optimizer, cfg, dist)
        kl_tokens += [(local[j], *rest) for j, *rest in out["kl_tokens"]]
        results.append(out)
    taken = [r for r in results if not r["skipped"]]
    gap = [sum(r["sampler"][k] for r in results) for k in range(3)]  # summed over groups (and ranks, in each group)
    return {
        # the sampler/trainer gap over every student token whose sampler log p was recorded (None without one)
        "sampler_logp_diff": gap[0] / gap[2] if gap[2] else None,
        "sampler_ratio_out": gap[1] / gap[2] if gap[2] else None,
        "loss": sum(r["loss"] for r in results) / len(results),  # each group's loss is its mean KL
        "grad_norm": sum(r["grad_norm"] for r in results) / len(results),
        "skipped": not taken,  # skipped only when every group's step was
        "updates": len(taken),
        "kl_tokens": kl_tokens,
    }


def score_and_update(student, teacher, episodes, optimizer, cfg: UpdateConfig, dist: Dist | None = None,
                     teacher_logp: list | None = None) -> dict:
    """Teacher scoring, the loss, the backward and the optimizer step; returns per-token KL stats and loss.

    Under data parallelism (dist) each rank holds its share of the step's episodes; the loss weights are
    normalized by the global token (or response) count and the gradients summed over ranks, so the update is
    exactly the one a single process would make on all the episodes. teacher_logp (k1 only): per episode, the
    teacher's log-probs already computed (score_episodes); then the teacher does not run, and no telemetry.
    """
    if teacher_logp is not None and cfg.estimator != "k1":
        raise ValueError(f"cached teacher log-probs serve the k1 estimator only, not {cfg.estimator}")
    device = model_device(student)
    amp = precision(cfg.dtype, str(device))[2]  # bf16-mixed: the forwards under autocast, the backward outside it
    telemetry = cfg.telemetry and teacher_logp is None  # the telemetry needs the teacher's logits
    turns = [torch.tensor(trained_turns(ep), dtype=torch.long) for ep in episodes]
    weights = kl.loss_weights(turns, cfg.aggregation, total=dist.global_units(turns, cfg.aggregation) if dist else None)
    student.train()
    optimizer.zero_grad(set_to_none=True)
    loss_total, kl_tokens, gap = 0.0, [], [0.0, 0.0, 0.0]  # kl_tokens: per_token's records, one per student token
    passes = microbatches(episodes, cfg.micro_batch)
    for mb in dist.even_passes(passes) if dist else passes:
        if mb is None:  # --fsdp: this rank has no micro-batch left; a zero-weight pass keeps it in step (fsdp.py)
            dist.empty_pass(student, amp)
            continue
        ids, targets, turn_ids = batch_tensors(episodes, mb, turns, device)
        w = torch.zeros(ids.shape, dtype=torch.float32, device=device)
        for r, i in enumerate(mb):
            w[r, : len(weights[i])] = weights[i].to(device)
        with autocast(device, amp):
            at = turn_ids >= 0 if telemetry else None  # the telemetry's positions: the student's tokens
            if teacher_logp is None:
                t_hidden, logp_t, *top1 = teacher_logprobs(teacher, ids, targets, top1_at=at)
            else:  # the teacher scored these streams on arrival; the positions past a stream's end are padding
                logp_t = torch.nn.utils.rnn.pad_sequence([teacher_logp[i] for i in mb], batch_first=True).to(device)
            s_hidden = hidden_states(student, ids)
            # d's log p_s comes from this very forward, the one differentiated: old and new log-probs agree exactly
            logp_s, ent = student_logprobs(s_hidden, student.get_output_embeddings(), targets, softcap(student), at)
            d = kl.sampled_kl(logp_s.detach(), logp_t)  # per token, the k1 estimate of KL(student || teacher)
            old = sampler_logprobs(episodes, mb, ids.shape, device).where(turn_ids >= 0, torch.tensor(math.nan, device=device))
            stats, is_weight = sampler_gap(logp_s, old, cfg.tis_cap)
            gap = [a + b for a, b in zip(gap, stats)]
            if cfg.estimator == "k1":
                # Policy gradient with advantage A = -kl_coef * d. The ratio exp(logp - logp.detach()) is 1 on-policy,
                # so the loss value is the mean KL and its gradient is -A * grad log p (one update per batch).
                loss_per_token = cfg.kl_coef * d * torch.exp(logp_s - logp_s.detach()) * is_weight
            else:
                loss_per_token = cfg.kl_coef * kl.full_divergence(
                    cfg.estimator, s_hidden, student.get_output_embeddings(), t_hidden, teacher.get_output_embeddings(),
                    beta=cfg.jsd_beta, s_softcap=softcap(student), t_softcap=softcap(teacher),
                )
            loss = (w * loss_per_token).sum()
        loss.backward()
        loss_total += loss.item()
        per_token(kl_tokens, mb, turn_ids, d, *((logp_t, ent, top1[0]) if telemetry else ()))
    if dist:
        dist.sum_gradients(student)
        loss_total = dist.sum(loss_total)
        gap = [dist.sum(x) for x in gap]
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip).item()
    # No student token on any rank (every episode truncated at once) or a non-finite gradient: skip the step, since
    # Adam would still move the weights on its momentum, or spread the NaN into them.
    tokens = dist.sum(len(kl_tokens)) if dist else len(kl_tokens)
    skipped = not tokens or not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    student.eval()
    return {"loss": loss_total, "grad_norm": grad_norm, "skipped": skipped, "kl_tokens": kl_tokens, "sampler": gap}


def kl_metrics(kl_tokens, n_episodes: int, max_turns: int) -> dict:
    """Metrics of per_token's records. Turn t's tokens are the student tokens of the replies at env turn index t;
    a "per-token mean" pools them over all episodes.

    traj_kl: mean over episodes of the summed per-token KL (the paper's Fig. 2); token_kl: the per-token mean.
    kl_by_turn: per turn, the per-token mean of d (comparable across turns of different lengths); kl_sum_by_turn:
    per turn, d summed over each episode's turn-t tokens, averaged over the episodes with student tokens at turn t
    (the paper's Fig. 2d and the authors' logs). Telemetry (None without it), per turn and over all tokens:
    teacher_p(_by_turn), the per-token mean of p_teacher(sampled token); entropy(_by_turn), of the student's
    full-vocabulary entropy at temperature 1 (nats); top1(_by_turn), the share of tokens that are the teacher's
    argmax. Lists have max_turns entries, None where no student token."""
    by_turn = [[] for _ in range(max_turns)]
    sums = [{} for _ in range(max_turns)]  # turn -> episode -> summed KL
    extra = [[[] for _ in range(max_turns)] for _ in range(3)]  # teacher_p, entropy, top1, per turn
    per_episode = [0.0] * n_episodes
    telemetry = bool(kl_tokens) and all(len(r) == 6 for r in kl_tokens)
    for i, t, v, *rest in kl_tokens:
        by_turn[t].append(v)
        sums[t][i] = sums[t].get(i, 0.0) + v
        per_episode[i] += v
        if telemetry:
            for k in range(3):
                extra[k][t].append(rest[k])
    mean = lambda v: sum(v) / len(v) if v else None
    out = {
        "traj_kl": sum(per_episode) / max(n_episodes, 1),
        "token_kl": sum(v for _, _, v, *_ in kl_tokens) / max(len(kl_tokens), 1),
        "kl_by_turn": [mean(v) for v in by_turn],
        "kl_sum_by_turn": [sum(s.values()) / len(s) if s else None for s in sums],
    }
    for k, name in enumerate(("teacher_p", "entropy", "top1")):
        out[name] = mean([x for turn in extra[k] for x in turn]) if telemetry else None
        out[f"{name}_by_turn"] = [mean(v) for v in extra[k]] if telemetry else [None] * max_turns
    return out


def reply_lengths(episode: Episode) -> int:
    """The longest student reply of an episode, in sampled tokens (the eos we add to a cut reply is not sampled)."""
    counts = {}
    for t in episode.turn_of:
        if t >= 0:
            counts[t] = counts.get(t, 0) + 1
    return max(counts.values(), default=0)


def episode_metrics(episodes: list[Episode], prefix: str = "") -> dict:
    n = max(len(episodes), 1)
    student_turns = max(sum(e.student_turns for e in episodes), 1)
    return {
        f"{prefix}success": sum(e.success for e in episodes) / n,
        f"{prefix}score": sum(e.score for e in episodes) / n,
        f"{prefix}turns": sum(e.turns for e in episodes) / n,
        f"{prefix}reply_tokens": sum(e.reply_tokens for e in episodes) / student_turns,
        f"{prefix}max_reply_tokens": max((reply_lengths(e) for e in episodes), default=0),  # the paper's Fig. 5c
        f"{prefix}invalid": sum(e.invalid for e in episodes) / student_turns,
        f"{prefix}truncated": sum(e.truncated for e in episodes) / n,
        f"{prefix}errors": sum(e.error is not None for e in episodes),
    }




def step_metrics(n: int, k: int | None, max_turns: int, episodes, klm: dict, step_update: dict, no_demo: int, buffer,
             times: tuple[float, float, float]) -> dict:
    """Training step n's metrics row (docs/metrics.md), before its eval fields and the whole step's time: the depth used,
    the episodes, their KL (kl_metrics), the update's outcome (`step_update`: from update or buffer.update), throughput."""
    t0, t1, t2 = times
    return {
        "step": n,
        "k": min(k, max_turns) if k is not None else max_turns,  # the depth used: capped at T_max
        "episodes": len(episodes),
        "prefix": sum(e.prefix for e in episodes) / len(episodes),
        "replay_done": sum(e.replay_done for e in episodes),
        "replay_refused": sum(e.replay_refused for e in episodes),
        "no_demo": no_demo,
        **klm,
        **episode_metrics(episodes),
        "loss": step_update["loss"],
        "grad_norm": step_update["grad_norm"],
        "skipped": step_update["skipped"],
        "updates": step_update["updates"],
        # the rollout engine's log p vs the update's (None under --update-from buffer: its rows keep none)
        "sampler_logp_diff": step_update.get("sampler_logp_diff"),
        "sampler_ratio_out": step_update.get("sampler_ratio_out"),
        **({"buffer_rows": len(buffer)} if buffer is not None else {}),
        # decoding alone (the sampling passes), and the whole step (env resets, B2F replay, scoring, update)
        "decode_tokens_per_s": sum(e.reply_tokens for e in episodes) / max(max(e.decode_seconds for e in episodes), 1e-9),
        "time_rollout": t1 - t0,
        "time_update": t2 - t1,
    }


def default_aggregation(env: str, curriculum: str) -> str:
    """The authors' ALFWorld F2B config normalizes per response ("prevent length collapse"); their other configs that
    we could read, and our default elsewhere, average over all tokens."""
    return "seq-mean-token-mean" if (env, curriculum) == ("alfworld", "f2b") else "token-mean"
