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
from envs import EnvPool, TinyWorld  # noqa: E402
from prompts import Prompter  # noqa: E402
from test_tcod import small_args  # noqa: E402
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


def test_a_vllm_run_resumes_exactly(tmp_path):
    student, teacher = models.resolve_model("tiny-student"), models.resolve_model("tiny-teacher")
    kw = dict(rollout="vllm", max_turns=4, tasks_per_step=4, lr=1e-4)
    full = tcod.main(small_args(tmp_path / "a", student, teacher, steps=3, **kw))
    tcod.main(small_args(tmp_path / "b", student, teacher, steps=2, **kw))
    resumed = tcod.main(small_args(tmp_path / "b", student, teacher, steps=3, resume=True, **kw))
    rows = lambda d: [json.loads(line) for line in open(os.path.join(d, "run", "metrics.jsonl"))]  # noqa: E731
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")  # (b also evaluated at the end of its first 2 steps)
    assert [(r["step"], r.get("traj_kl"), r.get("loss")) for r in a] == [(r["step"], r.get("traj_kl"), r.get("loss")) for r in b]
    assert resumed["loss"] == full["loss"] and resumed["eval_success"] == full["eval_success"]
