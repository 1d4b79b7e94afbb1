"""The rollout engine interface (rollout.Engine / Session): our Decoder implements it (rollout.Local); its stop set
and its sampled tokens' log-probs, which the update compares with its own (the sampler/trainer gap); a third engine
is one class. vLLM's implementation is checked against the same in test_vllm.py."""

import math

import pytest
import torch

import models
import rollout
from curriculum import Plan
from envpool import EnvPool
from prompts import Prompter
from tinyworld import TinyWorld


@pytest.fixture(scope="module")
def tiny():
    chat = rollout.Chat(models.load_tokenizers("tiny-student", "tiny-student"))
    return chat, models.load_model(models.resolve_model("tiny-student"), "float32", "cpu").eval()


def first(chat, task="test-0"):
    env = TinyWorld()
    return chat.first(Prompter("compact", env, False).first(env.reset(task)))


def play(chat, tasks, model=None, engine=None, temperature=1.0):
    return rollout.rollout(model, chat, EnvPool("tinyworld", {}, 0), TinyWorld(), tasks, [Plan(0, 4)] * len(tasks),
                           [None] * len(tasks), temperature=temperature, max_new_tokens=16, max_turns=4, max_context=4096,
                           think=False, prompt="compact", generator=torch.Generator().manual_seed(0), engine=engine)


def test_stop_tokens_are_the_chats_end_and_the_generation_configs_eos():
    from transformers import GenerationConfig

    assert rollout.stop_tokens(7, None) == [7]
    assert rollout.stop_tokens(7, GenerationConfig(eos_token_id=7)) == [7]
    assert rollout.stop_tokens(151645, GenerationConfig(eos_token_id=[151645, 151643])) == [151645, 151643]


def test_the_decoder_also_stops_at_the_generation_configs_eos(tiny):
    """A reply ends at the first token of the stop set; the rollout closes that turn with the chat's end token."""
    chat, model = tiny
    stream = first(chat)
    (full,) = rollout.Local(model, len(chat.tok)).session(torch.Generator()).reply([stream], chat.eos, 0.0, 16)
    x = full[2]
    assert x != chat.eos and full[-1] == chat.eos
    model.generation_config.eos_token_id = [chat.eos, x]
    try:
        (cut,) = rollout.Local(model, len(chat.tok)).session(torch.Generator()).reply([stream], chat.eos, 0.0, 16)
        (ep,) = play(chat, ["test-0"], model, temperature=0.0)
    finally:
        model.generation_config.eos_token_id = chat.eos
    assert cut == full[: full.index(x) + 1]
    i = len(stream) + len(cut)
    assert ep.ids[:i] == stream + cut and ep.ids[i] == chat.eos and ep.turn_of[i] == -1


def test_the_decoders_logprobs_are_the_models_over_the_whole_head(tiny):
    """Session.logprobs: log p of each sampled token at temperature 1 whatever the sampling temperature, over every
    row of the head, equal to a forward over the stream; the episode keeps them on its sampled tokens, nan elsewhere."""
    chat, model = tiny
    streams = [first(chat, t) for t in ("test-0", "test-1")]
    session = rollout.Local(model, len(chat.tok)).session(torch.Generator().manual_seed(1))
    replies = session.reply(streams, chat.eos, 1.5, 12)
    for s, r, lp in zip(streams, replies, session.logprobs):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([s + r])).logits[0].float(), -1)
        assert len(lp) == len(r)
        assert max(abs(a - logp[len(s) + j - 1, t].item()) for j, (t, a) in enumerate(zip(r, lp))) < 1e-5
    (ep,) = play(chat, ["test-0"], model)
    assert len(ep.sampled_logp) == len(ep.ids)
    assert all((t >= 0) != math.isnan(lp) for t, lp in zip(ep.turn_of, ep.sampled_logp))


def test_a_third_engine_is_one_class(tiny):
    """An Engine is session(generator) -> Session (reply, keep, logprobs) and sync(model): a scripted one plays."""
    chat, model = tiny

    class Scripted:
        synced = None

        def session(self, generator):
            return self

        def sync(self, model):
            self.synced = model

        def reply(self, streams, eos, temperature, max_new_tokens):
            out = [chat.tok("<action>look</action>", add_special_tokens=False)["input_ids"] + [eos] for _ in streams]
            self.logprobs = [[-1.0] * len(r) for r in out]
            return out

        def keep(self, rows):
            pass

    engine = Scripted()
    engine.sync(model)
    episodes = play(chat, ["test-0", "test-1"], engine=engine)
    assert engine.synced is model and all(e.student_turns == 4 for e in episodes)
    assert all(lp == -1.0 for e in episodes for t, lp in zip(e.turn_of, e.sampled_logp) if t >= 0)
    local = play(chat, ["test-0", "test-1"], model, engine=rollout.Local(model, len(chat.tok)))
    assert [e.ids for e in local] == [e.ids for e in play(chat, ["test-0", "test-1"], model)]


def test_the_sampler_gap_and_its_truncated_importance_weights_by_hand():
    import opd

    logp_s = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    sampler = torch.tensor([[-1.5, -2.0, math.nan, -0.5]])  # ratios e^0.5, 1, (none), e^-2.5
    stats, w = opd.sampler_gap(logp_s, sampler, cap=1.5)
    assert stats == pytest.approx([0.5 + 0.0 + 2.5, 1, 3])
    assert w[0].tolist() == pytest.approx([1.5, 1.0, 1.0, math.exp(-2.5)])
    assert opd.sampler_gap(logp_s, sampler, cap=0)[1].tolist() == [[1.0] * 4]


def test_the_update_logs_the_sampler_gap_and_truncates_its_weights(tiny):
    """The Decoder samples from the trainer's own float32 weights: no gap. With each recorded log p lowered by 1 (every
    ratio e > 2), the gap is 1 for every token, and --tis-cap 1.5 weighs every token's loss by 1.5: the same update
    as a kl_coef 1.5 times larger."""
    import copy

    import opd

    chat, model = tiny
    teacher = models.load_model(models.resolve_model("tiny-teacher"), "float32", "cpu").requires_grad_(False)
    episodes = play(chat, ["train-0", "train-1", "train-2"], model)

    def step(eps, **kw):
        student = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        return opd.update(student, teacher, eps, optimizer, opd.UpdateConfig(grad_clip=1e9, **kw))

    plain = step(episodes)
    assert plain["sampler_logp_diff"] < 1e-5 and plain["sampler_ratio_out"] == 0
    lowered = copy.deepcopy(episodes)
    for e in lowered:
        e.sampled_logp = [x - 1.0 for x in e.sampled_logp]
    capped, scaled = step(lowered, tis_cap=1.5), step(episodes, kl_coef=1.5)
    assert capped["sampler_logp_diff"] == pytest.approx(1.0, abs=1e-5) and capped["sampler_ratio_out"] == 1.0
    assert capped["loss"] == pytest.approx(scaled["loss"], rel=1e-5)
    assert capped["grad_norm"] == pytest.approx(scaled["grad_norm"], rel=1e-5)


def test_tis_cap_is_refused_where_there_is_no_sampled_token_to_reweight(tmp_path):
    from test_cli import script

    done = script("tcod.py", "--tis-cap", "2", "--estimator", "jsd", "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --tis-cap 2.0") and not (tmp_path / "run").exists()


def test_tis_cap_is_refused_with_the_turn_row_buffer(tmp_path):
    import tcod

    args = tcod.Args(tis_cap=2.0, update_from="buffer", turns_per_update=8, out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(ValueError, match="--tis-cap 2.0: the turn-row buffer keeps no sampler log-probs"):
        tcod.main(args)
    assert not (tmp_path / "run").exists()
