"""LoRA students (lora.py): only the adapter trains, its k1 gradient is the brute-force one, resume is exact, a LoRA
checkpoint loads (base + adapter) and merges into a plain model with the same logits, and the memory plan counts it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")

import kl
import lora
import memory
import models
import opd
import tcod
from rollout import trained_turns
from test_tcod import chat, make_model, model_dirs, play, small_args, tok  # noqa: F401 (fixtures)

TARGETS = ("q_proj", "v_proj", "down_proj")


def lora_student(tok, rank=2, targets=TARGETS, seed=0, random_b=True):
    """A tiny student with adapters; B is randomised (it starts at zero, which would make A's gradient zero)."""
    model = lora.add_lora(make_model(tok, seed), rank, targets=targets)
    return randomize_b(model, 123, 0.3) if random_b else model


def randomize_b(model, seed: int, scale: float):
    """B ~ scale * N(0, 1) in every adapter, so that the adapter changes the model's outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def test_only_the_adapter_changes_after_an_update(tok, chat):
    student, teacher = lora_student(tok, random_b=False), make_model(tok, 1).requires_grad_(False)
    base = {n: p.detach().clone() for n, p in student.named_parameters() if ".lora_" not in n}
    adapter = {n: p.detach().clone() for n, p in student.named_parameters() if ".lora_" in n}
    assert base and adapter and all(not p.requires_grad for n, p in student.named_parameters() if n in base)
    episodes = play(student, chat, [f"train-{i}" for i in range(3)], max_new_tokens=6, max_turns=2)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # B starts at zero, so A's first gradient is zero: A moves from the second step
        out = opd.update(student, teacher, episodes, opt, tcod.update_config(tcod.Args(aggregation="token-mean")))
        assert not out["skipped"] and out["grad_norm"] > 0
    now = dict(student.named_parameters())
    assert all(torch.equal(base[n], now[n]) for n in base)  # the frozen base is bit for bit the same
    moved = [n for n in adapter if not torch.equal(adapter[n], now[n])]
    assert any(".lora_A." in n for n in moved) and any(".lora_B." in n for n in moved)
    assert len(opt.state) == len(adapter)  # AdamW state for the adapter only


def brute_force_grads(tok, lora_model, teacher, episodes, aggregation):
    """d/dA, d/dB of the k1 policy-gradient loss, by autograd through a hand-built merged weight W + scale * B @ A in a
    plain copy of the base model, with full-vocabulary log-softmax (no chunking, no peft layer, one episode at a time)."""
    plain = make_model(tok, 0)  # the same seed: the adapted model's base weights
    leaves, merged_names = {}, {}
    for name, module in lora_model.named_modules():
        if isinstance(module, __import__("peft").tuners.lora.LoraLayer):
            A = module.lora_A[lora.ADAPTER].weight.detach().clone().requires_grad_(True)
            B = module.lora_B[lora.ADAPTER].weight.detach().clone().requires_grad_(True)
            leaves[name] = (A, B, module.scaling[lora.ADAPTER])
            merged_names[name] = name + ".weight"
    turns = [torch.tensor(trained_turns(ep)) for ep in episodes]
    weights = kl.loss_weights(turns, aggregation)
    loss = 0.0
    for ep, w in zip(episodes, weights):
        ids = torch.tensor([ep.ids])
        params = {merged_names[n]: plain.get_submodule(n).weight + s * B @ A for n, (A, B, s) in leaves.items()}
        logp_s = torch.func.functional_call(plain, params, (ids,)).logits[0].log_softmax(-1)
        with torch.no_grad():
            logp_t = teacher(ids).logits[0].log_softmax(-1)
        targets = kl.causal_targets(ids)[0]
        s_tok = logp_s.gather(1, targets[:, None])[:, 0]
        t_tok = logp_t.gather(1, targets[:, None])[:, 0]
        loss = loss + (w * (s_tok - t_tok).detach() * s_tok).sum()  # grad: sum w * d * grad log p_s
    loss.backward()
    return {n: (A.grad, B.grad) for n, (A, B, _) in leaves.items()}


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_k1_gradient_through_the_adapter_equals_brute_force(tok, chat, aggregation):
    student, teacher = lora_student(tok), make_model(tok, 1).requires_grad_(False)
    episodes = play(student, chat, [f"train-{i}" for i in range(3)], max_new_tokens=6, max_turns=3)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    opt.zero_grad = lambda set_to_none=True: None  # keep the grads for inspection
    cfg = opd.UpdateConfig(aggregation=aggregation, grad_clip=1e9, micro_batch=2)
    opd.score_and_update(student, teacher, episodes, opt, cfg)
    expected = brute_force_grads(tok, student, teacher, episodes, aggregation)
    assert len(expected) == 2 * len(TARGETS)  # 2 layers x 3 targets
    for name, (gA, gB) in expected.items():
        module = student.get_submodule(name)
        assert gA.abs().sum() > 0 and gB.abs().sum() > 0
        torch.testing.assert_close(module.lora_A[lora.ADAPTER].weight.grad, gA, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(module.lora_B[lora.ADAPTER].weight.grad, gB, atol=1e-6, rtol=1e-4)


def test_lora_run_resumes_exactly_and_checkpoints_hold_the_adapter_only(model_dirs, tmp_path):
    student, teacher = model_dirs
    kw = dict(lora_rank=4, lr=1e-2)
    full = tcod.main(small_args(tmp_path / "a", student, teacher, steps=3, **kw))
    ckpt = os.path.join(str(tmp_path / "a" / "run"), "ckpt")
    files = set(os.listdir(ckpt))
    assert {lora.CONFIG, lora.WEIGHTS, "trainer.pt"} <= files and "model.safetensors" not in files
    assert lora.is_lora_checkpoint(ckpt) and lora.settings_of(ckpt)["rank"] == 4
    n_adapter = memory.lora_param_count(models.model_config(student), 4, lora.DEFAULT_TARGETS)
    assert os.path.getsize(os.path.join(ckpt, lora.WEIGHTS)) < 4 * n_adapter + 50_000  # fp32 adapter + header
    tcod.main(small_args(tmp_path / "b", student, teacher, steps=2, **kw))
    resumed = tcod.main(small_args(tmp_path / "b", student, teacher, steps=3, resume=True, **kw))
    for key in ("traj_kl", "loss", "grad_norm", "success", "eval_success", "eval_traj_kl"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key
    with pytest.raises(ValueError, match="lora-rank"):  # the adapter's shape is part of the experiment
        tcod.main(small_args(tmp_path / "b", student, teacher, steps=4, resume=True, lora_rank=8, lr=1e-2))


def test_checkpoint_loads_as_base_plus_adapter_and_merges_to_a_plain_model(model_dirs, tmp_path):
    student_dir, teacher = model_dirs
    tok = models.load_tokenizers(student_dir, student_dir)
    adapted = randomize_b(lora.add_lora(models.load_model(student_dir, "float32", "cpu"), 4), 5, 0.2)
    ckpt = str(tmp_path / "ckpt")
    lora.save_model(adapted, ckpt)
    tok.save_pretrained(ckpt)
    ids = torch.tensor([tok("<|im_start|>user\nlook around<|im_end|>")["input_ids"]])
    with torch.no_grad():
        want = adapted(ids).logits
        base = models.load_model(student_dir, "float32", "cpu")(ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter matters
    assert models.check_models(ckpt, teacher) == teacher and models.resolve_model(ckpt) == ckpt  # tcod --student / eval --model
    assert models.model_config(ckpt).hidden_size == adapted.config.hidden_size
    loaded = models.load_model(ckpt, "float32", "cpu")  # what eval.py --model and tcod.py --student get
    assert not lora.is_lora(loaded) and not any(".lora_" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=1e-5)
    out = str(tmp_path / "merged")  # the one-command export
    subprocess.run([sys.executable, "lora.py", "merge", ckpt, out], check=True, capture_output=True,
                   cwd=os.path.dirname(os.path.abspath(__file__)), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert os.path.isfile(os.path.join(out, "config.json")) and not lora.is_lora_checkpoint(out)
    with torch.no_grad():
        torch.testing.assert_close(models.load_model(out, "float32", "cpu")(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_the_vllm_engine_gets_merged_weights_under_the_plain_names(model_dirs):
    """--rollout vllm with a LoRA student: sync sends base + adapter merged, under a plain model's names, and a plain
    model holding them computes the adapted model's logits (vllm_engine.sync, driven here with a recording engine)."""
    import vllm_engine

    student_dir, _ = model_dirs
    adapted = randomize_b(lora.add_lora(models.load_model(student_dir, "float32", "cpu"), 4), 7, 0.2)
    sent = {}

    class Recorder:
        def collective_rpc(self, method, kwargs):
            sent[method] = dict(kwargs["weights_iterator"])

        def reset_prefix_cache(self):
            sent["reset"] = True

    engine = vllm_engine.VLLMEngine.__new__(vllm_engine.VLLMEngine)
    engine.llm, engine.asleep = Recorder(), False
    engine.check = lambda model: 0.0  # the engine's own log-prob check needs vLLM (test_vllm.py runs it)
    engine.sync(adapted)
    plain = models.load_model(student_dir, "float32", "cpu")
    weights = sent["reload_weights"]
    assert set(weights) == set(plain.state_dict()) and sent["reset"]
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        want, base = adapted(ids).logits, plain(ids).logits
        plain.load_state_dict(weights)
        torch.testing.assert_close(plain(ids).logits, want, atol=1e-5, rtol=1e-5)
    assert (want - base).abs().max() > 1e-3  # the adapter matters, so the equality says the merge was sent
    assert any(".lora_" in n for n, _ in adapted.named_parameters())  # the student keeps training as LoRA


def test_bad_lora_settings_are_rejected():
    for kw, flag in ((dict(rank=-1), "lora-rank"), (dict(alpha=float("nan")), "lora-alpha"),
                     (dict(dropout=1.0), "lora-dropout"), (dict(targets=()), "lora-targets")):
        args = dict(rank=4, alpha=None, dropout=0.0, targets=lora.DEFAULT_TARGETS) | kw
        with pytest.raises(ValueError, match=flag):
            lora.check_settings(**args)


def test_memory_plan_counts_the_adapter_as_the_real_model_does(tok):
    model = lora.add_lora(make_model(tok, 0), 8)
    cfg = model.config
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.lora_param_count(cfg, 8, lora.DEFAULT_TARGETS) == n_adapter
    assert memory.trainable_count(cfg, 8, lora.DEFAULT_TARGETS) == n_adapter
    assert memory.trainable_count(cfg) == memory.param_count(cfg)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    # fp32 adapter + 2 AdamW moments + one float32 step counter per adapter tensor; nothing of the frozen base
    assert memory.saved_bytes(model, opt) == 12 * n_adapter + 4 * len(opt.state) + memory.TOKENIZER_BYTES


def test_memory_plan_for_a_lora_student_at_real_shapes():
    s_cfg, t_cfg = models.random_config("random:Qwen2.5-7B"), models.random_config("random:Qwen2.5-7B")
    base = dict(student_device="cuda:0", teacher_device="cuda:0", micro_batch=4, max_context=8192, tasks_per_step=16,
                gradient_checkpointing=True, compute_bytes=2, teacher_bytes=2)
    full = memory.needs(memory.plan(s_cfg, t_cfg, memory.Setting(**base)))["cuda:0"]
    items = memory.plan(s_cfg, t_cfg, memory.Setting(**base, student_bytes=2, lora_rank=16, lora_targets=lora.DEFAULT_TARGETS))
    low = memory.needs(items)["cuda:0"]
    n = memory.param_count(s_cfg)
    n_a = memory.lora_param_count(s_cfg, 16, lora.DEFAULT_TARGETS)
    assert 0 < n_a < 0.01 * n
    # at peak the base drops from fp32 + AdamW + grads + one phase's autocast copies (4+8+4+2 B/param) to bf16 (2)
    assert 15 * n < full - low < 17 * n
    by = {i.what.split(" (")[0]: i.bytes for i in items}
    assert by["student base weights"] == 2 * n and by["AdamW state of the adapters"] == 8 * n_a
