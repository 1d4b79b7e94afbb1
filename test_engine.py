"""The rollout engine interface (rollout.Engine / Session): our Decoder implements it (rollout.Local); its stop set
and its sampled tokens' log-probs, which the update compares with its own (the sampler/trainer gap); a third engine
is one class. vLLM's implementation is checked against the same in test_vllm.py."""

import math

import pytest
import torch

import models
import rollout
from curriculum import Plan
from envs import EnvPool, TinyWorld
from prompts import Prompter


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
