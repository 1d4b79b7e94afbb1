"""Tests for kl.py: every function against a float64 brute force on small random data."""

import math

import pytest
import torch

import kl

B, T, H, V = 2, 7, 16, 50


def make_head(h=H, v=V, bias=True, seed=0, scale=4.0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(h, v, bias=bias)
    with torch.no_grad():
        head.weight.mul_(scale)  # by default sharper distributions than nn.Linear's init, so divergences are not ~0
    return head


def brute_logits(head, hidden, softcap=None):
    """float64 logits straight from the head's parameters."""
    logits = hidden.double() @ head.weight.double().T
    if head.bias is not None:
        logits = logits + head.bias.double()
    return softcap * torch.tanh(logits / softcap) if softcap else logits


# ----------------------------------------------------------------------------------------------------------
# token_logprobs


@pytest.mark.parametrize("chunk", [1, 3, T, T + 5])
@pytest.mark.parametrize("softcap,bias", [(None, True), (5.0, False)])
def test_token_logprobs_matches_brute_force(chunk, softcap, bias):
    head = make_head(bias=bias)
    hidden = torch.randn(B, T, H, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    targets[1, -3:] = 0  # right padding: any valid id, masked later by the caller
    ref_hidden = hidden.detach().double().requires_grad_()
    ref = torch.log_softmax(brute_logits(head, ref_hidden, softcap), -1).gather(-1, targets[..., None]).squeeze(-1)

    out = kl.token_logprobs(hidden, head, targets, chunk=chunk, softcap=softcap)  # grad on: checkpointed path
    assert out.shape == (B, T) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(kl.token_logprobs(hidden, head, targets, chunk=chunk, softcap=softcap), out)

    upstream = torch.randn(B, T, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), ref_hidden.grad, atol=1e-5, rtol=1e-4)


def test_token_logprobs_bf16_hidden():
    head = make_head()
    hidden = torch.randn(B, T, H).bfloat16()
    targets = torch.randint(0, V, (B, T))
    ref = torch.log_softmax(brute_logits(head, hidden.double()), -1).gather(-1, targets[..., None]).squeeze(-1)
    out = kl.token_logprobs(hidden, head, targets, chunk=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def saved_for_backward(fn):
    """Run fn() with grad on and return the numel of every tensor autograd saves for the backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_backward_keeps_no_logits_alive():
    # With checkpointing, nothing of size [B, chunk, V] is saved for the backward (only the small hidden states);
    # without it, every chunk's logits would stay alive until backward.
    v, h, t, chunk = 1000, 8, 64, 8  # t * h (the hidden states) < chunk * v (one chunk's logits)
    head, t_head = make_head(h, v), make_head(h, v + 3, seed=1)
    s_hidden, t_hidden = torch.randn(1, t, h, requires_grad=True), torch.randn(1, t, h)
    targets = torch.randint(0, v, (1, t))
    for fn in [
        lambda: kl.token_logprobs(s_hidden, head, targets, chunk=chunk),
        *[lambda k=k: kl.full_divergence(k, s_hidden, head, t_hidden, t_head, chunk=chunk) for k in kl.FULL_DIVERGENCES],
    ]:
        sizes = saved_for_backward(fn)
        assert sizes and max(sizes) < chunk * v
    # and the check can fail: an unchunked, uncheckpointed computation saves the logits
    assert max(saved_for_backward(lambda: head(s_hidden).logsumexp(-1))) >= t * v


def test_token_logprobs_never_materializes_full_vocab():
    from torch.profiler import ProfilerActivity, profile

    v, t, chunk = 151936, 2048, 512  # Qwen2.5 vocabulary
    head = torch.nn.Linear(64, v, bias=False)
    hidden = torch.randn(1, t, 64).bfloat16()
    targets = torch.randint(0, v, (1, t))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = kl.token_logprobs(hidden, head, targets, chunk=chunk)
    assert out.shape == (1, t) and torch.isfinite(out).all()
    largest = max(e.cpu_memory_usage for e in prof.events())  # bytes allocated by any single op
    # At least one chunk's float32 logits (so the profiler did see them), and well under [T, V] (4x that).
    assert chunk * v * 4 <= largest < 2 * chunk * v * 4


# ----------------------------------------------------------------------------------------------------------
# causal_targets, shift_mask, on a real (tiny) model


def test_causal_targets_and_shift_mask_by_hand():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    assert kl.causal_targets(ids).tolist() == [[6, 7, 8, 0], [10, 0, 0, 0]]
    assert kl.causal_targets(ids, pad_id=3).tolist() == [[6, 7, 8, 3], [10, 0, 0, 3]]
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])  # token 0 is the prompt
    assert kl.shift_mask(mask).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert kl.shift_mask(mask.bool()).dtype == torch.bool


def test_causal_targets_on_tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config).eval()
    pad = 0
    ids = torch.randint(1, 64, (2, 9))
    attention = torch.ones_like(ids)
    ids[1, 6:], attention[1, 6:] = pad, 0  # right padding
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        logp = kl.token_logprobs(hidden, model.lm_head, kl.causal_targets(ids, pad), chunk=4)
        ref_logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.double(), -1)
    trained = kl.shift_mask(attention).bool()
    assert trained.sum() == 8 + 5  # 9 - 1 and 6 - 1 predicted tokens
    for b, t in trained.nonzero().tolist():
        assert logp[b, t].item() == pytest.approx(ref_logp[b, t, ids[b, t + 1]].item(), abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# sampled_kl


def test_sampled_kl_is_unbiased_for_reverse_kl():
    g = torch.Generator().manual_seed(0)
    logp_s = torch.log_softmax(2 * torch.randn(20, generator=g, dtype=torch.float64), -1)
    logp_t = torch.log_softmax(2 * torch.randn(20, generator=g, dtype=torch.float64), -1)
    reverse = (logp_s.exp() * (logp_s - logp_t)).sum()
    forward = (logp_t.exp() * (logp_t - logp_s)).sum()
    n = 200_000
    y = torch.multinomial(logp_s.exp(), n, replacement=True, generator=g)
    k1 = kl.sampled_kl(logp_s[y], logp_t[y])
    stderr = k1.std() / math.sqrt(n)
    # Deterministic (fixed seed); 6 standard errors would make even an unseeded failure ~1e-9 likely.
    assert abs(k1.mean() - reverse) < 6 * stderr
    assert abs(forward - reverse) > 20 * stderr  # the test tells the two KLs apart


# ----------------------------------------------------------------------------------------------------------
# full_divergence


def brute_divergence(kind, s_logits, t_logits, beta=0.5):
    """float64, written with probabilities (not log-space) so it is an independent route to the same number."""
    v = min(s_logits.shape[-1], t_logits.shape[-1])
    p_s, p_t = torch.softmax(s_logits[..., :v], -1), torch.softmax(t_logits[..., :v], -1)
    kl_pq = lambda p, q: (p * (p.log() - q.log())).sum(-1)
    if kind == "forward_kl":
        return kl_pq(p_t, p_s)
    if kind == "reverse_kl":
        return kl_pq(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl_pq(p_t, m) + (1 - beta) * kl_pq(p_s, m)


@pytest.mark.parametrize("kind", kl.FULL_DIVERGENCES)
@pytest.mark.parametrize("chunk", [2, 4, 6, 10])  # T = 6: divides, doesn't, equal, larger
@pytest.mark.parametrize("v_s,v_t", [(50, 50), (50, 53), (53, 50)])
def test_full_divergence_matches_brute_force(kind, chunk, v_s, v_t):
    t = 6
    s_head, t_head = make_head(H, v_s, seed=0), make_head(24, v_t, seed=1)  # hidden sizes may differ too
    s_hidden = torch.randn(B, t, H, requires_grad=True)
    t_hidden = torch.randn(B, t, 24, requires_grad=True)  # to check that no gradient reaches it
    beta = 0.3 if kind == "jsd" else 0.5  # an asymmetric beta catches swapped p_s / p_t
    ref_hidden = s_hidden.detach().double().requires_grad_()
    with torch.no_grad():
        t_logits = brute_logits(t_head, t_hidden)
    ref = brute_divergence(kind, brute_logits(s_head, ref_hidden), t_logits, beta)

    out = kl.full_divergence(kind, s_hidden, s_head, t_hidden, t_head, chunk=chunk, beta=beta)
    assert out.shape == (B, t) and out.dtype == torch.float32
    assert (ref > 1e-2).all()  # non-trivial distributions
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(kl.full_divergence(kind, s_hidden, s_head, t_hidden, t_head, chunk, beta), out)

    upstream = torch.rand(B, t, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(s_hidden.grad.double(), ref_hidden.grad, atol=1e-5, rtol=1e-4)
    assert t_hidden.grad is None and t_head.weight.grad is None and t_head.bias.grad is None


@pytest.mark.parametrize("kind", kl.FULL_DIVERGENCES)
def test_full_divergence_softcap(kind):
    s_head, t_head = make_head(seed=0), make_head(seed=1)
    s_hidden, t_hidden = torch.randn(B, T, H), torch.randn(B, T, H)
    out = kl.full_divergence(kind, s_hidden, s_head, t_hidden, t_head, chunk=3, s_softcap=3.0, t_softcap=7.0)
    ref = brute_divergence(kind, brute_logits(s_head, s_hidden, 3.0), brute_logits(t_head, t_hidden, 7.0))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    uncapped = kl.full_divergence(kind, s_hidden, s_head, t_hidden, t_head, chunk=3)
    assert not torch.allclose(out, uncapped)  # the softcaps were applied


def test_jsd_limits():
    # milder distributions: the beta -> 0 and 1 limits below converge at a rate set by the chi-square divergence
    s_head, t_head = make_head(seed=0, scale=1.0), make_head(seed=1, scale=1.0)
    s_hidden, t_hidden = torch.randn(B, T, H), torch.randn(B, T, H)

    def div(kind, beta=0.5):
        with torch.no_grad():
            return kl.full_divergence(kind, s_hidden, s_head, t_hidden, t_head, chunk=3, beta=beta)

    with torch.no_grad():
        # equal distributions: 0 for every beta
        for beta in (0.1, 0.5, 0.9):
            assert kl.full_divergence("jsd", s_hidden, s_head, s_hidden, s_head, beta=beta).abs().max() < 1e-6
        # beta = 0.5 is the textbook JSD: mean of KL(p || m) and KL(q || m), m the average, bounded by log 2
        p_s = torch.softmax(brute_logits(s_head, s_hidden), -1)
        p_t = torch.softmax(brute_logits(t_head, t_hidden), -1)
        m = (p_s + p_t) / 2
        textbook = 0.5 * (p_s * (p_s / m).log()).sum(-1) + 0.5 * (p_t * (p_t / m).log()).sum(-1)
        jsd = div("jsd")
        torch.testing.assert_close(jsd.double(), textbook, atol=1e-5, rtol=1e-4)
        assert (jsd < math.log(2)).all()
        # small beta: m -> p_s and JSD / beta -> KL(p_t || p_s); beta -> 1: JSD / (1 - beta) -> KL(p_s || p_t)
        torch.testing.assert_close(div("jsd", 1e-3) / 1e-3, div("forward_kl"), rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(div("jsd", 1 - 1e-3) / 1e-3, div("reverse_kl"), rtol=2e-2, atol=1e-3)


def test_rejects_bad_arguments():
    head, hidden = make_head(), torch.randn(B, T, H)
    with pytest.raises(ValueError, match="forward_kl"):
        kl.full_divergence("k1", hidden, head, hidden, head)  # k1 is sampled, not a full divergence
    for beta in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="beta"):
            kl.full_divergence("jsd", hidden, head, hidden, head, beta=beta)
    assert kl.full_divergence("forward_kl", hidden, head, hidden, head, beta=0.0).abs().max() < 1e-6  # beta unused
    with pytest.raises(ValueError, match="chunk"):
        kl.token_logprobs(hidden, head, torch.zeros(B, T, dtype=torch.long), chunk=0)
    assert set(kl.ESTIMATORS) == {"k1", *kl.FULL_DIVERGENCES}


# ----------------------------------------------------------------------------------------------------------
# loss_weights


def hand_built_turns():
    # episode 0: turn 0 has 1 token, turn 1 has 3; episode 1: turn 0 has 2 (a different sequence from ep 0's turn 0)
    return [torch.tensor([-1, 0, -1, -1, 1, 1, 1, -1]), torch.tensor([-1, -1, 0, 0, -1])]


def test_loss_weights_token_mean():
    w = kl.loss_weights(hand_built_turns(), "token-mean")
    s = 1 / 6
    assert torch.allclose(w[0], torch.tensor([0, s, 0, 0, s, s, s, 0]))
    assert torch.allclose(w[1], torch.tensor([0, 0, s, s, 0]))
    assert all(x.dtype == torch.float32 for x in w)


def test_loss_weights_seq_mean_token_mean():
    w = kl.loss_weights(hand_built_turns(), "seq-mean-token-mean")
    # 3 sequences of lengths 1, 3, 2: weights 1/(1*3), 1/(3*3), 1/(2*3)
    assert torch.allclose(w[0], torch.tensor([0, 1 / 3, 0, 0, 1 / 9, 1 / 9, 1 / 9, 0]))
    assert torch.allclose(w[1], torch.tensor([0, 0, 1 / 6, 1 / 6, 0]))
    # the weighted sum is the mean over sequences of each sequence's mean loss
    losses = [torch.tensor([9.0, 1, 9, 9, 2, 3, 4, 9]), torch.tensor([9.0, 9, 5, 7, 9])]
    total = sum((wi * li).sum() for wi, li in zip(w, losses))
    assert total.item() == pytest.approx((1 + 3 + 6) / 3)


@pytest.mark.parametrize("mode", kl.AGGREGATIONS)
def test_loss_weights_sum_to_one_or_zero(mode):
    assert sum(x.sum() for x in kl.loss_weights(hand_built_turns(), mode)).item() == pytest.approx(1.0)
    w = kl.loss_weights([torch.full((4,), -1), torch.full((3,), -1)], mode)
    assert all(torch.equal(x, torch.zeros_like(x, dtype=torch.float32)) for x in w)
    assert kl.loss_weights([], mode) == []


def test_loss_weights_rejects_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        kl.loss_weights(hand_built_turns(), "sum")


def test_default_chunk_holds_a_fixed_number_of_logits():
    big, tiny = torch.nn.Linear(8, 151_936, bias=False), torch.nn.Linear(8, 492, bias=False)
    assert kl.chunk_size(torch.zeros(1, 4096, 8), big) == (1 << 24) // 151_936 == 110
    assert kl.chunk_size(torch.zeros(4, 4096, 8), big) == 27
    assert kl.chunk_size(torch.zeros(4, 4096, 8), tiny) == (1 << 24) // (4 * 492)  # a whole sequence at once
    assert kl.chunk_size(torch.zeros(200, 10, 8), big) == 1
