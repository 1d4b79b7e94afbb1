"""support.py: the teacher's support, measured from the states a student visited and from perturbed expert states."""

import os
import random

import pytest
import torch

import models
import rollout
import support
from curriculum import Plan
from envpool import EnvPool
from tinyworld import TinyWorld


@pytest.fixture(scope="module")
def shipped():
    """The shipped tiny student and teacher (trained: a random teacher would never agree with the expert)."""
    chat = rollout.Chat(models.load_tokenizers("tiny-student", "tiny-teacher"))
    load = lambda name: models.load_model(models.resolve_model(name), "float32", "cpu").eval()  # noqa: E731
    return chat, load("tiny-student"), load("tiny-teacher")


def student_episodes(model, chat, tasks, temperature=1.0, prefix_of=None):
    env = TinyWorld()
    demos = [env.demo(t) for t in tasks]
    plans = [Plan(prefix_of(d) if prefix_of else 0, 20) for d in demos]
    return rollout.rollout(model, chat, EnvPool("tinyworld", {}, 0), env, tasks, plans, demos, temperature=temperature,
                           max_new_tokens=16, max_turns=20, max_context=4096, think=False, prompt="compact",
                           generator=torch.Generator().manual_seed(0))


def test_visited_states_are_the_states_the_student_saw(shipped):
    chat, student, _ = shipped
    env = TinyWorld()
    episodes = student_episodes(student, chat, env.tasks("test")[:6], prefix_of=lambda d: len(d) // 3)
    for ep in episodes:
        states = support.visited_states(env, chat, ep)
        assert [t for t, _, _ in states] == sorted({t for t in ep.turn_of if t >= 0})  # every student turn, in order
        for t, ids, expert in states:
            assert ep.ids[: len(ids)] == ids and ep.turn_of[len(ids)] == t and ep.turn_of[len(ids) - 1] == -1
        # brute force: the expert's action after the prefix and the student's parsed actions up to each turn
        replay = TinyWorld()
        replay.reset(ep.task)
        for a in ep.actions[: ep.prefix]:
            replay.step(a)
        assert states[0][2] == replay.expert()
        text = chat.tok.decode(states[-1][1])
        assert text.count("<|im_start|>assistant") == ep.turns  # the last state follows every earlier turn


def test_follows_expert_equals_a_greedy_decode(shipped):
    chat, student, teacher = shipped
    env = TinyWorld()
    states = [s for ep in student_episodes(student, chat, env.tasks("test")[:4]) for s in support.visited_states(env, chat, ep)]
    states = random.Random(1).sample(states, min(24, len(states)))
    fast = support.follows_expert(teacher, chat, states, batch=5)
    greedy = []
    for _, ids, expert in states:  # one row at a time, a real decode at temperature 0
        (reply,) = rollout.Decoder(teacher, len(chat.tok), torch.Generator().manual_seed(0)).reply([ids], chat.eos, 0.0, 32)
        greedy.append(reply == chat.assistant(f"<action>{expert}</action>"))
    assert fast == greedy and 0 < sum(fast)  # (the teacher agrees with the expert on most of these states)


def test_off_path_counts_and_samples(shipped):
    chat, student, teacher = shipped
    env = TinyWorld()
    episodes = student_episodes(student, chat, env.tasks("test")[:2])
    full = support.off_path(teacher, chat, env, episodes, max_turns=20, prefix="eval_", max_states=10_000)
    states = [s for ep in episodes for s in support.visited_states(env, chat, ep)]
    expected = 1 - sum(support.follows_expert(teacher, chat, states)) / len(states)
    assert abs(full["eval_teacher_off_path"] - expected) < 1e-12 and len(full["eval_teacher_off_path_by_turn"]) == 20
    assert len(support.off_path(teacher, chat, env, episodes, max_turns=20, max_states=5)) == 2
    assert support.off_path(teacher, chat, object(), episodes, max_turns=20) == {}  # no expert: no measure


def test_perturbed_prefix_is_seeded_and_valid():
    env = TinyWorld()
    for n in (0, 1, 3):
        a = support.perturbed_prefix(env, "test-5", n, random.Random(7))
        assert a == support.perturbed_prefix(env, "test-5", n, random.Random(7))
        demo = env.demo("test-5")
        cut = len(a) - n
        assert a[:cut] == demo[:cut] and cut < len(demo)
        step = env.reset("test-5")
        for x in a:
            step = env.step(x)
            assert step.valid and not step.done


def test_data_tiny_ships_exactly_the_listed_models():
    import sft

    assert sorted(os.listdir(models.TINY_DIR)) == sorted(models.TINY_SHIPPED)


@pytest.mark.parametrize("name", models.TINY_SHIPPED)
def test_each_shipped_tiny_model_has_the_tiny_shape_and_the_shared_tokenizer(name):
    """Each shipped tiny model (not rebuilt here: 35 min each) is the 4 x 128 Qwen2 of sft.py's recipe (1.05 M
    parameters, a few MB) and has the tokenizer of the demo pair, so any two of them can be paired."""
    import sft
    from transformers import AutoTokenizer

    path = os.path.join(models.TINY_DIR, name)
    assert os.path.isfile(os.path.join(path, "model.safetensors")), f"{name} is not shipped in data/tiny"
    assert sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) < 8e6
    model = models.load_model(path, "float32", "cpu")
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (128, 4, 492)
    assert sum(p.numel() for p in model.parameters()) == 1_048_192
    tok, ref = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(os.path.join(models.TINY_DIR, "tiny-teacher"))
    models.check_same_tokenizer(tok, ref)  # raises, naming the difference
    assert tok.get_vocab() == ref.get_vocab() and tok.chat_template == ref.chat_template
