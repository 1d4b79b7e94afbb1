"""Turn-level telemetry (opd.py): each per-token quantity against a direct full-softmax computation, the turn
assignment and masking of the records, and the per-turn and overall metrics kl_metrics makes of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dist
import kl
import opd
import rollout

V = 48


def qwen(seed: int, hidden: int = 32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # sharper distributions than the init's near-uniform ones, so argmax and entropy vary
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def models():
    return qwen(0), qwen(1).requires_grad_(False)


def episodes_for(teacher, seed=0):
    """Episodes of different lengths: env text (-1), a turn-0 reply the teacher writes greedily (so every one of
    its tokens is the teacher's argmax), more env text, a random turn-2 reply; one episode has no student token."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, V, (n,), generator=g).tolist()
    out = []
    for k, (env, reply0, reply2) in enumerate([(3, 4, 5), (5, 3, 2), (2, 6, 0), (4, 0, 0), (6, 2, 7)]):
        ep = rollout.Episode(task=f"t{k}")
        ep.add(rand(env))
        for _ in range(reply0):
            with torch.no_grad():
                nxt = int(teacher(input_ids=torch.tensor([ep.ids])).logits[0, -1].argmax())
            ep.add([nxt], turn=0)
        ep.add(rand(3))
        ep.add(rand(reply2), turn=2)
        ep.add(rand(2))
        ep.student_turns = (reply0 > 0) + (reply2 > 0)
        out.append(ep)
    return out


def brute_force(student, teacher, ep):
    """(turn, d, p_teacher, student entropy, top1) per student token of ep, in position order, from full softmaxes."""
    ids = torch.tensor([ep.ids])
    with torch.no_grad():
        ls = F.log_softmax(student(input_ids=ids).logits[0].float(), -1)
        lt = F.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
    rows = []
    for j, t in enumerate(rollout.trained_turns(ep)):
        if t < 0:
            continue
        y = ep.ids[j + 1]
        rows.append((t, (ls[j, y] - lt[j, y]).item(), lt[j, y].exp().item(), -(ls[j].exp() * ls[j]).sum().item(),
                     float(y == lt[j].argmax().item())))
    return rows


def by_episode(records, n):
    out = [[] for _ in range(n)]
    for i, *rest in records:
        out[i].append(tuple(rest))
    return out


def assert_records(records, expected):
    assert len(records) == len(expected)
    for got, want in zip(records, expected):
        assert got[0] == want[0] and got[4] == want[4]  # turn, top1: exact
        assert got[1:4] == pytest.approx(want[1:4], abs=2e-5, rel=1e-4)


@pytest.fixture
def small_chunks(monkeypatch):
    # a few positions per chunk, so the chunking (and under grad, the checkpoint's recomputation) is exercised
    monkeypatch.setattr(kl, "LOGITS_PER_CHUNK", 2 * V * 3)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_student_logprobs_and_entropy_match_full_softmax(small_chunks, softcap):
    torch.manual_seed(0)
    B, T, H = 2, 11, 8
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.mul_(4.0)
    hidden = torch.randn(B, T, H, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    everywhere = torch.ones(B, T, dtype=torch.bool)
    logp, ent = opd.student_logprobs(hidden, head, targets, softcap, everywhere)  # grad on: checkpointed chunks
    z = head(hidden).float()
    z = softcap * torch.tanh(z / softcap) if softcap else z
    ls = F.log_softmax(z, -1)
    torch.testing.assert_close(logp, ls.gather(-1, targets[..., None]).squeeze(-1))
    torch.testing.assert_close(ent, -(ls.exp() * ls).sum(-1))
    assert not ent.requires_grad
    # the gradient is that of the log-probs alone, as without telemetry
    logp.sum().backward()
    g_tel = hidden.grad.clone()
    hidden.grad = None
    off, none = opd.student_logprobs(hidden, head, targets, softcap, None)
    assert none is None
    off.sum().backward()
    torch.testing.assert_close(g_tel, hidden.grad)


def test_telemetry_is_computed_at_the_masked_positions_only(small_chunks, models):
    """The trained positions get the full-mask values, the others 0 (they are never recorded: per_token)."""
    _, teacher = models
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(2))
    targets, at = kl.causal_targets(ids), torch.rand(3, 9, generator=torch.Generator().manual_seed(3)) < 0.4
    everywhere = torch.ones_like(at)
    _, logp_all, top1_all = opd.teacher_logprobs(teacher, ids, targets, top1_at=everywhere)
    _, logp, top1 = opd.teacher_logprobs(teacher, ids, targets, top1_at=at)
    torch.testing.assert_close(logp, logp_all)
    assert torch.equal(top1[at], top1_all[at]) and not top1[~at].any()
    hidden, head = torch.randn(3, 9, 32), teacher.get_output_embeddings()
    _, ent_all = opd.student_logprobs(hidden, head, targets, None, everywhere)
    _, ent = opd.student_logprobs(hidden, head, targets, None, at)
    torch.testing.assert_close(ent[at], ent_all[at])
    assert (ent[~at] == 0).all() and (ent_all[~at] > 0).all()


def test_entropy_is_precise_at_the_real_vocabulary():
    """At Qwen's 151,936 logits, float32: within 1e-4 nats of a float64 reference. The old lse - E_p[z] form is
    checked to be worse than 1e-3 here, so the bound is one that form fails."""
    g = torch.Generator().manual_seed(0)
    logits = 4.0 * torch.randn(8, 151_936, generator=g) + 20.0  # spread and offset of real heads' logits
    lse = logits.logsumexp(-1)
    exact = -(logits.double().log_softmax(-1).exp() * logits.double().log_softmax(-1)).sum(-1)
    ours = opd.token_entropy(logits, lse)
    old = lse - torch.einsum("bv,bv->b", (logits - lse[:, None]).exp(), logits)  # the old code, as it was
    assert (ours.double() - exact).abs().max() < 1e-4 and (old.double() - exact).abs().max() > 1e-3


def test_teacher_top1_matches_argmax(small_chunks, models):
    _, teacher = models
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    targets = kl.causal_targets(ids)
    lt = F.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    targets[0, :4] = lt[0, :4].argmax(-1)  # some positions where the target is the argmax
    hidden, logp, top1 = opd.teacher_logprobs(teacher, ids, targets, top1_at=torch.ones(ids.shape, dtype=torch.bool))
    torch.testing.assert_close(logp, lt.gather(-1, targets[..., None]).squeeze(-1))
    assert torch.equal(top1, (targets == lt.argmax(-1)).float()) and top1[0, :4].all()
    torch.testing.assert_close(opd.teacher_logprobs(teacher, ids, targets)[1], logp)  # top1 off: the same log-probs


def test_score_and_update_records_match_brute_force(small_chunks, models):
    student, teacher = models
    eps = episodes_for(teacher)
    expected = [brute_force(student, teacher, e) for e in eps]
    assert any(r[4] == 1.0 for rows in expected for r in rows if r[0] == 0)  # the greedy turn-0 tokens
    cfg = opd.UpdateConfig(micro_batch=2, aggregation="token-mean")  # 3 micro-batches, padded
    before = [p.detach().clone() for p in student.parameters()]
    out = opd.score_and_update(student, teacher, eps, torch.optim.SGD(student.parameters(), lr=0.0), cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    for got, want in zip(by_episode(out["kl_tokens"], len(eps)), expected):
        assert_records(got, want)
    assert by_episode(out["kl_tokens"], len(eps))[3] == []  # no student token: no record
    # the same records from the no-update scoring of eval episodes (tcod.py's run_eval)
    for got, want in zip(by_episode(opd.score_episodes(student, teacher, eps, 2), len(eps)), expected):
        assert_records(got, want)


def test_telemetry_leaves_loss_and_gradient_unchanged(small_chunks, models):
    student, teacher = models
    eps = episodes_for(teacher, seed=1)
    results = []
    for on in (True, False):
        grads = []
        opt = torch.optim.SGD(student.parameters(), lr=0.0)
        opt.step = lambda: grads.append([p.grad.clone() for p in student.parameters()])
        out = opd.score_and_update(student, teacher, eps, opt, opd.UpdateConfig(micro_batch=2, grad_clip=1e9, telemetry=on))
        results.append((out, grads[0]))
    (on, g_on), (off, g_off) = results
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-6)
    for a, b in zip(g_on, g_off):
        torch.testing.assert_close(a, b)
    assert [r[:3] for r in on["kl_tokens"]] == off["kl_tokens"] and all(len(r) == 3 for r in off["kl_tokens"])
    m = opd.kl_metrics(off["kl_tokens"], len(eps), 3)
    assert m["teacher_p"] is None and m["entropy_by_turn"] == [None] * 3 and m["kl_by_turn"][0] is not None


def test_kl_metrics_telemetry_by_turn_and_overall():
    # (episode, turn, d, p_teacher, entropy, top1): episode 0 has turns 0 (2 tokens) and 2; episode 1 turn 0 only
    recs = [(0, 0, 1.0, 0.5, 2.0, 1.0), (0, 0, 3.0, 0.1, 1.0, 0.0), (0, 2, 2.0, 0.9, 0.5, 1.0), (1, 0, 5.0, 0.2, 3.0, 0.0)]
    m = opd.kl_metrics(recs, n_episodes=3, max_turns=4)
    assert m["kl_by_turn"] == [pytest.approx(3.0), None, 2.0, None]
    assert m["kl_sum_by_turn"] == [pytest.approx((4 + 5) / 2), None, 2.0, None]  # over the episodes with the turn
    assert m["teacher_p_by_turn"] == [pytest.approx(0.8 / 3), None, pytest.approx(0.9), None]
    assert m["entropy_by_turn"] == [pytest.approx(2.0), None, 0.5, None]
    assert m["top1_by_turn"] == [pytest.approx(1 / 3), None, 1.0, None]
    assert (m["teacher_p"], m["entropy"], m["top1"]) == (pytest.approx(1.7 / 4), pytest.approx(6.5 / 4), 0.5)
    assert m["traj_kl"] == pytest.approx(11 / 3) and m["token_kl"] == pytest.approx(11 / 4)
    empty = opd.kl_metrics([], 2, 2)
    assert empty["top1"] is None and empty["teacher_p_by_turn"] == [None, None]


def test_update_and_gather_keep_the_telemetry(models):
    student, teacher = models
    eps = episodes_for(teacher, seed=2)
    cfg = opd.UpdateConfig(micro_batch=2, turns_per_update=2)  # several groups: episode indices remapped
    out = opd.update(student, teacher, eps, torch.optim.SGD(student.parameters(), lr=0.0), cfg)
    assert out["updates"] > 1 and all(len(r) == 6 for r in out["kl_tokens"])
    for got, want in zip(by_episode(out["kl_tokens"], len(eps)), [brute_force(student, teacher, e) for e in eps]):
        assert_records(got, want)

    class TwoRanks:  # dist.gather_episodes with two ranks holding the same share
        gather = staticmethod(lambda obj: [obj, obj])

    all_eps, recs = dist.gather_episodes(TwoRanks(), eps, out["kl_tokens"])
    assert len(all_eps) == 2 * len(eps) and recs[len(out["kl_tokens"]):] == [(i + len(eps), *r) for i, *r in out["kl_tokens"]]


def test_plot_writes_telemetry_heat_maps_when_logged(tmp_path):
    import json
    import os

    import plot

    runs = []
    for name, telemetry in (("tel-s0", True), ("old-s0", False)):
        run = tmp_path / name
        os.makedirs(run)
        rows = []
        for n in range(4):
            r = {"step": n, "traj_kl": 1.0, "success": 0.0, "k": 1, "kl_by_turn": [0.1 * n, 0.2], "kl_sum_by_turn": [1.0, 2.0]}
            if telemetry:
                r.update(teacher_p_by_turn=[0.5, None], entropy_by_turn=[2.0, 1.0 + n], top1_by_turn=[0.25 * n, 0.5],
                         eval_teacher_p_by_turn=[0.4, 0.3], eval_entropy_by_turn=[1.0, 1.5], eval_top1_by_turn=[0.1, None])
            rows.append(r)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(str(run))
    steps, grid = plot.kl_grid([plot.load(runs[0])], "entropy_by_turn")
    assert steps == [0, 1, 2, 3] and [g[1] for g in grid] == [1.0, 2.0, 3.0, 4.0]
    plot.plot_runs(runs, str(tmp_path / "a.png"))
    assert os.path.getsize(tmp_path / "a-telemetry.png") > 10_000 and os.path.getsize(tmp_path / "a-heatmap.png") > 10_000
    plot.plot_runs(runs[1:], str(tmp_path / "b.png"))  # runs from before the telemetry: no telemetry figure
    assert os.path.exists(tmp_path / "b-heatmap.png") and not os.path.exists(tmp_path / "b-telemetry.png")
