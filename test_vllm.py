"""--rollout vllm: vLLM samples the same token streams as our Decoder, with the student's log-probs, follows the
student's updates, and resumes exactly. Run in .venv-vllm by .ci/vllm (`-m vllm`); skipped where vllm is missing."""

import json
import os

import pytest
import torch

pytest.importorskip("vllm")

import models  # noqa: E402
import opd  # noqa: E402
import rollout  # noqa: E402
import tcod  # noqa: E402
from curriculum import Plan  # noqa: E402
from envpool import EnvPool  # noqa: E402
from prompts import Prompter  # noqa: E402
from test_tcod import small_args  # noqa: E402
from tinyworld import TinyWorld  # noqa: E402
from vllm_engine import VLLMEngine  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def shipped():
    """The shipped tiny student (trained, so that its greedy replies are not near-ties) and one engine on it."""
    path = models.resolve_model("tiny-student")
    chat = rollout.Chat(models.load_tokenizers("tiny-student", "tiny-student"))
    engine = VLLMEngine(path, len(chat.tok), "cpu", dtype="float32")
    return chat, path, engine


def play(model, chat, tasks, engine=None, temperature=0.0, seed=0, turns=4):
    return rollout.rollout(model, chat, EnvPool("tinyworld", {}, 0), TinyWorld(), tasks, [Plan(0, turns)] * len(tasks),
                           [None] * len(tasks), temperature=temperature, max_new_tokens=16, max_turns=turns,
                           max_context=4096, think=False, prompt="compact", generator=torch.Generator().manual_seed(seed),
                           engine=engine)


def load(path):
    return models.load_model(path, "float32", "cpu").eval()


def untrained(path):
    """A model of the student's shape with fresh random weights: its samples are near-random tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(load(path).config).eval()


def test_vllm_plays_the_same_episodes_as_the_decoder_at_temperature_0(shipped):
    chat, path, engine = shipped
    engine.sync(load(path))
    tasks = TinyWorld().tasks("test")[:6]
    ours, theirs = play(load(path), chat, tasks), play(None, chat, tasks, engine=engine)
    assert [e.ids for e in ours] == [e.ids for e in theirs]
    assert [e.success for e in ours] == [e.success for e in theirs] and sum(e.student_turns for e in ours) > 6


def test_vllm_samples_from_the_students_distribution(shipped):
    """The log-probs vLLM reports for the tokens it sampled equal a transformers forward over the same stream."""
    from vllm import SamplingParams, TokensPrompt

    chat, path, engine = shipped
    model = load(path)
    engine.sync(model)
    env = TinyWorld()
    prompts = [chat.first(Prompter("compact", env, False).first(env.reset(t))) for t in env.tasks("test")[:4]]
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                               SamplingParams(temperature=1.0, max_tokens=12, seed=3, logprobs=0), use_tqdm=False)
    worst = 0.0
    for p, o in zip(prompts, outs):
        ids = p + list(o.outputs[0].token_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for j, (tid, lp) in enumerate(zip(o.outputs[0].token_ids, o.outputs[0].logprobs)):
            worst = max(worst, abs(lp[tid].logprob - logp[len(p) + j - 1, tid].item()))
    assert worst < 1e-4, worst


def test_a_training_step_then_a_sync_changes_vllm_as_the_new_weights_say(shipped):
    chat, path, engine = shipped
    model = load(path)
    engine.sync(model)
    tasks = TinyWorld().tasks("test")[6:12]
    before = play(None, chat, tasks, engine=engine)
    teacher = load(models.resolve_model("tiny-teacher")).requires_grad_(False)
    episodes = play(model, chat, TinyWorld().tasks("train")[:8], temperature=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    cfg = tcod.update_config(tcod.resolve_args(tcod.Args(micro_batch=4)))
    opd.update(model.train(), teacher, episodes, optimizer, cfg, None)
    model.eval()
    stale = play(None, chat, tasks, engine=engine)
    assert [e.ids for e in stale] == [e.ids for e in before]  # without a sync vLLM still has the old weights
    engine.sync(model)
    after, ours = play(None, chat, tasks, engine=engine), play(model, chat, tasks)
    assert [e.ids for e in after] == [e.ids for e in ours] and [e.ids for e in after] != [e.ids for e in before]
    engine.sync(load(path))  # back to the shipped weights for the other tests


def scrambled_prompt(chat, env, task) -> list[int]:
    """A first prompt with every word of its observation spelled letter by letter: token ids that a decode and encode
    would merge back into words, so an engine that got text instead of ids would see another stream."""
    ids, tok = chat.first(Prompter("compact", env, False).first(env.reset(task))), chat.tok
    cut = len(ids) // 2
    letters = [t for c in tok.decode(ids[cut:]) for t in tok(c, add_special_tokens=False)["input_ids"]]
    return ids[:cut] + letters


def forward_logprobs(model, stream: list[int], reply: list[int]) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([stream + reply])).logits[0].float(), -1)
    return [logp[len(stream) + j - 1, t].item() for j, t in enumerate(reply)]


def test_vllm_gets_the_streams_ids_and_returns_the_sampled_ids(shipped):
    """Streams that do not survive decode + encode in, replies sampled at temperature 2 from an untrained
    model (near-random tokens, which do not either) out: the log-probs vLLM reports for the ids it returns equal a transformers forward over exactly
    the stream and those ids. Text in place of ids, or re-tokenized replies, would shift or change the tokens."""
    chat, path, engine = shipped
    model = untrained(path)
    engine.sync(model)
    env, tok = TinyWorld(), chat.tok
    streams = [scrambled_prompt(chat, env, t) for t in env.tasks("test")[:3]]
    assert all(tok(tok.decode(s), add_special_tokens=False)["input_ids"] != s for s in streams)
    session = engine.session(torch.Generator().manual_seed(0))
    replies = session.reply(streams, chat.eos, temperature=2.0, max_new_tokens=16)
    assert any(tok(tok.decode(r), add_special_tokens=False)["input_ids"] != r for r in replies)
    for s, r, lp in zip(streams, replies, session.logprobs):
        assert len(lp) == len(r) and max(abs(a - b) for a, b in zip(lp, forward_logprobs(model, s, r))) < 1e-4
    engine.sync(load(path))


def test_each_rollout_draws_its_own_seeds(shipped):
    """Sampling (temperature 1, an untrained model) is a function of the rollout's generator: the same generator gives
    the same replies, another generator other ones; within a rollout each call and each row gets its own seed."""
    chat, path, engine = shipped
    engine.sync(untrained(path))
    env = TinyWorld()
    streams = [chat.first(Prompter("compact", env, False).first(env.reset(env.tasks("test")[0])))] * 4
    draw = lambda seed: engine.session(torch.Generator().manual_seed(seed))  # noqa: E731
    a, again, other = draw(1), draw(1), draw(2)
    first = a.reply(streams, chat.eos, 1.0, 16)
    assert again.reply(streams, chat.eos, 1.0, 16) == first != other.reply(streams, chat.eos, 1.0, 16)
    assert a.reply(streams, chat.eos, 1.0, 16) != first  # the next call of the same rollout
    assert len({tuple(r) for r in first}) > 1  # four rows of one stream
    engine.sync(load(path))


def test_later_turns_find_the_earlier_turns_in_the_prefix_cache(shipped):
    """Each reply sends the whole stream; from the second turn on, vLLM finds at least every whole 32-token block of
    the previous turn's prompt in its prefix cache."""
    chat, path, engine = shipped
    engine.sync(load(path))  # (which resets the cache: the first turn finds nothing)

    class Spy:
        def session(self, generator):
            self.last = engine.session(generator)
            return self.last

    spy = Spy()
    episodes = play(None, chat, TinyWorld().tasks("test")[:4], engine=spy, temperature=1.0)
    turns = spy.last.cache
    assert len(turns) >= 3 and sum(e.student_turns for e in episodes) > 8
    assert all(c > 0 for call in turns[1:] for _, c in call)
    # where no episode ended in between, row r of a call is row r of the one before: its prompt grew from that one
    same = [(prev, call) for prev, call in zip(turns, turns[1:]) if len(prev) == len(call)]
    assert same and all(c >= n // 32 * 32 for prev, call in same for (n, _), (_, c) in zip(prev, call))


def first_prompt(chat, task="test-0") -> list[int]:
    env = TinyWorld()
    return chat.first(Prompter("compact", env, False).first(env.reset(task)))


@pytest.fixture(scope="module")
def stopping(shipped, tmp_path_factory):
    """A copy of the shipped student whose generation config lists, beside <|im_end|>, the third token of its greedy
    reply to the first test task (as Qwen's lists <|endoftext|>), and an engine on that copy."""
    import shutil

    chat, path, _ = shipped
    (full,) = rollout.Local(load(path), len(chat.tok)).session(torch.Generator()).reply([first_prompt(chat)], chat.eos, 0.0, 16)
    x = full[2]
    out = tmp_path_factory.mktemp("stopping")
    for f in os.listdir(path):
        shutil.copy(os.path.join(path, f), out)
    config = json.load(open(out / "generation_config.json")) | {"eos_token_id": [chat.eos, x]}
    json.dump(config, open(out / "generation_config.json", "w"))
    return str(out), x, full, VLLMEngine(str(out), len(chat.tok), "cpu", dtype="float32")


def test_vllm_and_the_decoder_stop_on_the_same_tokens(shipped, stopping):
    """Both stop at the chat's end token and at every eos_token_id of the model's generation config."""
    chat = shipped[0]
    path, x, full, engine = stopping
    cut = full[: full.index(x) + 1]
    for sampler in (rollout.Local(load(path), len(chat.tok)), engine):
        assert sampler.session(torch.Generator()).reply([first_prompt(chat)], chat.eos, 0.0, 16) == [cut]
    tasks = TinyWorld().tasks("test")[:6]
    ours, theirs = play(load(path), chat, tasks), play(None, chat, tasks, engine=engine)
    assert [e.ids for e in ours] == [e.ids for e in theirs]
    assert any(a == x and b == chat.eos for e in ours for a, b in zip(e.ids, e.ids[1:]))


def test_the_dry_run_plans_the_engine(tmp_path, monkeypatch, capsys):
    """On a CPU: vLLM's float32 weights, its $VLLM_CPU_KVCACHE_SPACE of KV cache and its batch's forward, held
    throughout, in place of the Decoder's KV cache; no model loads."""
    import memory

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setattr(tcod, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    kw = dict(tasks_per_step=4, steps=1, eval_tasks=2, max_turns=4, out=str(tmp_path / "run"), device="cpu", dry_run=True)
    hf, vl = tcod.main(tcod.Args(**kw)), tcod.main(tcod.Args(rollout="vllm", **kw))
    assert "vLLM weights (fp32" in capsys.readouterr().out
    cfg = models.model_config("tiny-student")
    items = memory.plan(cfg, models.model_config("tiny-teacher"), memory.Setting(
        student_device="cpu", teacher_device="cpu", micro_batch=4, max_context=2048, tasks_per_step=4,
        gradient_checkpointing=False, compute_bytes=4, teacher_bytes=4))
    phase = lambda p: sum(i.bytes for i in items if i.phase == p)  # noqa: E731
    engine = memory.param_count(cfg) * 4 + memory.GiB + memory.no_grad_forward_bytes(cfg, memory.ENGINE_BATCH_TOKENS, 4)
    assert hf["needs"] == {"cpu": phase("always") + max(phase("rollout"), phase("update"))}
    assert vl["needs"] == {"cpu": phase("always") + engine + phase("update")} and vl["needs"] != hf["needs"]
    assert not (tmp_path / "run").exists()


def test_a_temperature_vllm_refuses_is_refused_before_any_model_loads(tmp_path):
    args = small_args(tmp_path, "tiny-student", "tiny-teacher", rollout="vllm", train_temperature=2.5)
    with pytest.raises(ValueError, match="--train-temperature 2.5: train_temperature must be <= 2 with --rollout vllm"):
        tcod.main(args)
    assert not (tmp_path / "run").exists()


def test_vllm_with_fsdp_is_refused_before_any_model_loads(tmp_path):
    args = small_args(tmp_path, "tiny-student", "tiny-teacher", rollout="vllm", fsdp=True)
    with pytest.raises(ValueError, match="--rollout vllm with --fsdp"):
        tcod.main(args)
    assert not (tmp_path / "run").exists()


def test_sync_refuses_an_engine_that_kept_old_weights_or_samples_from_others(shipped, monkeypatch):
    """vLLM's reload_weights warns and keeps the old weights for the names it misses: sync raises; and `check`
    raises when the engine's log-probs are not the student's (another model's weights; a reload that did nothing)."""
    import vllm_engine

    chat, path, engine = shipped
    model = load(path)
    engine.sync(model)
    assert engine.check(model) < 1e-4
    with pytest.raises(RuntimeError, match="does not sample from the student's weights"):
        engine.check(untrained(path))
    monkeypatch.setattr(vllm_engine, "student_state", lambda m: {k: v for k, v in m.state_dict().items() if "mlp" not in k})
    with pytest.raises(RuntimeError, match="kept some of its old weights"):
        engine.sync(untrained(path))
    monkeypatch.undo()
    monkeypatch.setattr(engine.llm, "collective_rpc", lambda *a, **k: None)  # a reload that silently loads nothing
    with pytest.raises(RuntimeError, match="does not sample from the student's weights"):
        engine.sync(untrained(path))
    monkeypatch.undo()
    engine.sync(model)


# tcod.main runs last: each builds and drops an engine of its own, and dropping one tears down vLLM's process-wide
# parallel state, which the module's engine (above) then lacks


def rows(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "run", "metrics.jsonl"))]


def transcripts(out) -> dict[str, list]:
    """Every transcript file of a run (train steps and evals): the replies' text and their summed KL, per turn."""
    folder = os.path.join(out, "run", "transcripts")
    return {f: [json.loads(line) for line in open(os.path.join(folder, f))] for f in sorted(os.listdir(folder))}


def test_a_vllm_run_follows_the_students_updates(tmp_path):
    """Greedy rollouts at a learning rate that changes the greedy replies: a --rollout vllm run equals a --rollout hf
    run step by step (the same replies, KL, losses and evals), so the engine samples from each step's weights."""
    student, teacher = models.resolve_model("tiny-student"), models.resolve_model("tiny-teacher")
    kw = dict(max_turns=4, tasks_per_step=4, steps=3, lr=3e-3, train_temperature=0.0, eval_temperature=0.0,
              transcript_every=1, transcript_episodes=4)
    hf = tcod.main(small_args(tmp_path / "hf", student, teacher, rollout="hf", **kw))
    vl = tcod.main(small_args(tmp_path / "vllm", student, teacher, rollout="vllm", **kw))
    ours, theirs = transcripts(tmp_path / "hf"), transcripts(tmp_path / "vllm")
    replies = lambda f: [[t["reply"] for t in ep["turns"]] for ep in ours[f]]  # noqa: E731
    assert replies("eval-step-0.jsonl") != replies("eval-step-3.jsonl")  # the updates changed the greedy replies
    assert set(ours) == set(theirs) and all(ours[f] == theirs[f] for f in ours)
    key = lambda r: {k: r.get(k) for k in ("step", "traj_kl", "loss", "success", "eval_success", "eval_traj_kl")}  # noqa: E731
    assert [key(r) for r in rows(tmp_path / "hf")] == [key(r) for r in rows(tmp_path / "vllm")]
    # float32 on both sides: vLLM's log p of each sampled token is the update's (the sampler/trainer gap is ~0)
    steps = [r for r in rows(tmp_path / "vllm") if r["step"] >= 0]
    assert all(r["sampler_logp_diff"] < 1e-4 and r["sampler_ratio_out"] == 0 for r in steps)
    assert hf["loss"] == vl["loss"]


def test_a_vllm_run_resumes_exactly(tmp_path):
    """At a learning rate whose steps change the sampled tokens: a run resumed from its step-2 checkpoint samples from
    the checkpoint's weights, with the step's seeds, as the uninterrupted run did."""
    student, teacher = models.resolve_model("tiny-student"), models.resolve_model("tiny-teacher")
    kw = dict(rollout="vllm", max_turns=4, tasks_per_step=4, lr=3e-3, transcript_every=1, transcript_episodes=4)
    full = tcod.main(small_args(tmp_path / "a", student, teacher, steps=3, **kw))
    tcod.main(small_args(tmp_path / "b", student, teacher, steps=2, **kw))
    resumed = tcod.main(small_args(tmp_path / "b", student, teacher, steps=3, resume=True, **kw))
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")  # (b also evaluated at the end of its first 2 steps)
    assert [(r["step"], r.get("traj_kl"), r.get("loss")) for r in a] == [(r["step"], r.get("traj_kl"), r.get("loss")) for r in b]
    assert transcripts(tmp_path / "a")["train-step-2.jsonl"] == transcripts(tmp_path / "b")["train-step-2.jsonl"]
    assert resumed["loss"] == full["loss"] and resumed["eval_success"] == full["eval_success"]


def test_two_torchrun_ranks_with_vllm_train_as_with_the_decoder_and_shut_down_cleanly(tmp_path):
    """torchrun, 2 Gloo ranks, greedy: each rank's engine (vLLM's external-launcher mode) plays its share of the
    episodes as the Decoder does, the run's rows equal a --rollout hf run's, and the engines shut down before the
    process group (no 'Invalid process group' at exit)."""
    import subprocess
    import sys

    from test_faults import cli, free_port

    student, teacher = models.resolve_model("tiny-student"), models.resolve_model("tiny-teacher")
    out = {}
    for engine in ("hf", "vllm"):
        args = small_args(tmp_path / engine, student, teacher, steps=2, tasks_per_step=4, max_turns=4, rollout=engine,
                          train_temperature=0.0, eval_temperature=0.0)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
        done = subprocess.run(cmd + cli(args)[1:], capture_output=True, text=True, cwd=os.path.dirname(__file__),
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        out[engine] = (rows(tmp_path / engine), done.stdout + done.stderr)  # (vLLM logs to stdout)
    assert "Using external launcher" in out["vllm"][1]
    key = lambda r: {k: r.get(k) for k in ("step", "episodes", "traj_kl", "loss", "eval_success", "eval_traj_kl")}  # noqa: E731
    assert [key(r) for r in out["vllm"][0]] == [key(r) for r in out["hf"][0]] and len(out["hf"][0]) == 3


def test_the_engine_sleeps_through_each_update_and_wakes_in_vllms_order(tmp_path, monkeypatch):
    """Sleep mode is CUDA's: here its calls are recorded, not made. Each step: the rollout, sleep(level 2) before the
    update, then the sync wakes the weights' memory, reloads the weights, wakes the KV cache and resets the cache."""
    import vllm_engine

    calls = []

    class Recorded(vllm_engine.VLLMEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.sleeps = k["sleep"]
            for name in ("sleep", "wake_up", "collective_rpc", "reset_prefix_cache"):
                real = getattr(self.llm, name) if name in ("collective_rpc", "reset_prefix_cache") else (lambda *a, **k: None)
                setattr(self.llm, name, lambda *a, _n=name, _f=real, **k: (calls.append((_n, k.get("level", k.get("tags")))), _f(*a, **k))[1])

    monkeypatch.setattr(vllm_engine, "VLLMEngine", Recorded)
    student, teacher = models.resolve_model("tiny-student"), models.resolve_model("tiny-teacher")
    tcod.main(small_args(tmp_path, student, teacher, rollout="vllm", steps=2, max_turns=4, eval=False))
    step = [("sleep", 2), ("wake_up", ["weights"]), ("collective_rpc", None), ("wake_up", ["kv_cache"]), ("reset_prefix_cache", None)]
    assert calls == step * 2
