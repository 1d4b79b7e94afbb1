"""Mixed precision (rollout.precision) and the on-device sampler (rollout.Decoder._sample).

The bf16 paths run on the CPU here: CPU autocast and bf16 weights take the same code path as on a GPU (tcod never
branches on the device type past `precision`), so what moves the weights here moves them there.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import bench
import rollout
import opd
import tcod
from test_tcod import chat, make_model, model_dirs, play, small_args, tok  # noqa: F401  (fixtures)


def test_precision_modes():
    assert rollout.precision("auto", "cpu") == ("float32", "float32", None)
    assert rollout.precision("auto", "cuda:1") == ("float32", "bfloat16", torch.bfloat16)  # master weights in float32
    assert rollout.precision("bf16-mixed", "cpu") == ("float32", "bfloat16", torch.bfloat16)
    assert rollout.precision("float32", "cuda") == ("float32", "float32", None)
    with pytest.raises(ValueError, match="bf16-mixed"):
        rollout.precision("bfloat16", "cuda")  # pure bf16 training weights are gone: they do not train at lr 1e-6


@pytest.fixture(scope="module")
def updates(tok, chat):  # noqa: F811
    """One update at the paper's lr 1e-6 on one batch, from the same student and teacher, in each precision mode."""
    student, teacher = make_model(tok, 0), make_model(tok, 1).requires_grad_(False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3)  # a teacher far from the student: a gradient everywhere
    episodes = play(student, chat, ["train-0", "train-1"], max_new_tokens=8, max_turns=3)
    deltas = {m: bench.precision_update(m, student, teacher, episodes, lr=1e-6)[0] for m in ("float32", "bf16-mixed", "master-copy", "bf16")}
    return bench.compare_updates(deltas), deltas


def moves_like_float32(c: dict) -> bool:
    """The check of issue 10: nearly every weight float32 moves moves, and the update's norm within 5 % of float32's."""
    return c["moved"] > 0.99 and abs(c["norm_ratio"] - 1) < 0.05


def test_mixed_precision_update_moves_the_weights_like_float32_and_pure_bf16_does_not(updates):
    cmp, deltas = updates
    print(json.dumps(cmp, indent=1))
    assert (deltas["float32"] != 0).double().mean() > 0.9  # the reference itself moves (nearly) every weight
    assert moves_like_float32(cmp["bf16-mixed"]), cmp["bf16-mixed"]  # the GPU default (fp32 master, bf16 autocast)
    assert cmp["bf16-mixed"]["cosine"] > 0.9, cmp["bf16-mixed"]  # and in (nearly) the same direction
    assert moves_like_float32(cmp["master-copy"]), cmp["master-copy"]  # the recipe not chosen passes as well
    assert not moves_like_float32(cmp["bf16"]), cmp["bf16"]  # the old --dtype auto: bf16 weights, AdamW in place
    assert cmp["bf16"]["moved"] < 0.2, cmp["bf16"]


def test_bf16_mixed_main_runs_keeps_float32_master_weights_and_resumes_exactly(model_dirs, tmp_path):  # noqa: F811
    """The GPU default's code path end to end on the CPU: float32 checkpoint (the master weights), exact resume."""
    from safetensors.torch import load_file

    student, teacher = model_dirs
    fast = dict(dtype="bf16-mixed", tasks_per_step=2, eval_tasks=2, max_new_tokens=8, max_turns=3)
    full = tcod.main(small_args(tmp_path / "a", student, teacher, steps=2, **fast))
    ckpt = os.path.join(str(tmp_path / "a" / "run"), "ckpt")
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    tcod.main(small_args(tmp_path / "b", student, teacher, steps=1, **fast))
    resumed = tcod.main(small_args(tmp_path / "b", student, teacher, steps=2, resume=True, **fast))
    for key in ("traj_kl", "loss", "grad_norm", "success"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return ((counts - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize("block", [3, 256])  # 3: three blocks, the last padded; 256: one padded block
def test_sampler_draws_from_softmax_over_temperature_and_is_reproducible(tok, block, monkeypatch):  # noqa: F811
    monkeypatch.setattr(rollout.Decoder, "block", block)
    model = make_model(tok)
    V, T, rows = 8, 0.7, 4000
    logits = torch.tensor([-0.5, 1.0, 0.5, 0.0, 2.0, -1.0, -3.0, float("-inf")])  # -inf: a token that must never come
    draws = []
    dec = rollout.Decoder(model, V, torch.Generator().manual_seed(0))
    for _ in range(10):  # 40,000 draws over ten steps of one decoder's noise stream
        draws.append(dec._sample(logits.expand(rows, V).clone(), T))
    counts = torch.bincount(torch.cat(draws), minlength=V).double()
    assert counts[-1] == 0
    p = torch.softmax(logits[:-1].double() / T, -1)
    # df = 6: P(chi2 > 22.5) = 0.001. The test has power: the same draws are far from softmax at temperature 1.
    assert chi_square(counts[:-1], p) < 22.5
    assert chi_square(counts[:-1], torch.softmax(logits[:-1].double(), -1)) > 200
    # reproducible from the generator's seed, different for another seed; temperature 0 is the argmax
    again = rollout.Decoder(model, V, torch.Generator().manual_seed(0))
    assert all(torch.equal(d, again._sample(logits.expand(rows, V).clone(), T)) for d in draws)
    other = rollout.Decoder(model, V, torch.Generator().manual_seed(1))
    assert not torch.equal(draws[0], other._sample(logits.expand(rows, V).clone(), T))
    x = torch.randn(5, V, generator=torch.Generator().manual_seed(2))
    assert torch.equal(dec._sample(x, 0), x.argmax(-1))


@pytest.mark.parametrize("estimator", ["k1", "forward_kl", "jsd"])
def test_bf16_mixed_update_has_float32_gradients_for_each_estimator(tok, chat, estimator):  # noqa: F811
    """bf16 teacher, autocast student: every estimator gives a finite loss and a gradient, float32 like the weights."""
    student, teacher = make_model(tok, 0), make_model(tok, 1).requires_grad_(False).to(torch.bfloat16)
    episodes = play(student, chat, ["train-0", "train-1", "train-2"], max_new_tokens=6, max_turns=2)
    seen = []
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    opt.step = lambda: seen.extend(p.grad.dtype for p in student.parameters() if p.grad is not None)  # inspect, no step
    update = opd.score_and_update(student, teacher, episodes, opt, tcod.update_config(tcod.Args(dtype="bf16-mixed", estimator=estimator, micro_batch=2)))
    assert not update["skipped"] and update["grad_norm"] > 0 and update["loss"] == update["loss"]
    assert seen and set(seen) == {torch.float32}
