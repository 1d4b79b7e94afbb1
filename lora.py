"""LoRA students: a frozen base model plus trainable low-rank adapters, through `peft` (imported only when used).

Each targeted linear layer W (out x in) becomes W x + scale * B (A x), A: rank x in, B: out x rank, scale = alpha / rank;
B starts at zero, so the adapted model starts as the base model. Only A and B train: the optimizer state and the
gradients are the adapter's, and the base stays in the dtype it was loaded in (bf16 on a GPU), which is what makes a
7B student fit next to its teacher on one GPU (memory.py). The adapters are injected in place (peft's
`inject_adapter_in_model`), so the student stays the same transformers class and every other file's code path
(`model.base_model`, `get_output_embeddings`, the Decoder, gradient checkpointing) is unchanged.

`--rollout vllm` gets merged weights (`merged_state_dict`) after every update, under the plain model's names: the
engine stays a plain model, with no LoRA kernels and no per-request adapter, and the policy it samples is the one
trained (vLLM's own LoRA serving would need the adapter saved to disk and loaded each step, and caps the rank).

A LoRA checkpoint directory holds adapter_config.json + adapter_model.safetensors (peft's own format and key names,
so `peft.PeftModel.from_pretrained(base, ckpt)` reads it too), the tokenizer and tcod's trainer.pt; it names its base
model in adapter_config.json (`base_model_name_or_path`). `models.load_model` loads one as base + merged adapter.

    python lora.py merge RUN/ckpt OUT_DIR [--dtype bfloat16]   # a plain Hugging Face model directory
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import cli

PEFT_VERSION = "0.21.2"  # the version tested (requirements.txt)
# Every linear projection of a Qwen2/Qwen3/Llama decoder layer: adapting attention and MLP both is what matches full
# fine-tuning best at a given parameter budget; attention alone leaves the MLP, most of the weights, frozen.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"  # peft's adapter name
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def require_peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"LoRA (--lora-rank > 0, or a LoRA checkpoint) needs peft: pip install peft=={PEFT_VERSION}") from e
    return peft


def default_alpha(rank: int) -> float:
    """alpha = 2 x rank: the adapter's scale alpha / rank is 2 at every rank, so a rank sweep changes capacity, not
    the size of the update; 2 (rather than 1) is the common choice that lets the zero-initialised B catch up."""
    return 2.0 * rank


def check_settings(rank: int, alpha: float | None, dropout: float, targets) -> None:
    """Range checks, naming the flag, before any model loads; with rank > 0 peft must import."""
    if not (isinstance(rank, int) and rank >= 0):
        raise ValueError(f"--lora-rank {rank!r}: must be an integer >= 0 (0: full fine-tuning)")
    if rank == 0:
        return
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0 < alpha < float("inf")):
        raise ValueError(f"--lora-alpha {alpha!r}: must be finite and > 0")
    if not (0 <= dropout < 1):
        raise ValueError(f"--lora-dropout {dropout!r}: must be in [0, 1)")
    if not targets:
        raise ValueError("--lora-targets: name at least one linear module (e.g. q_proj v_proj)")
    require_peft()


def add_lora(model, rank: int, alpha: float | None = None, dropout: float = 0.0, targets=DEFAULT_TARGETS,
             adapter_dir: str | None = None, seed: int = 0):
    """Freeze `model` and inject float32 LoRA adapters (in place); with adapter_dir, load their trained weights.
    A's random init is drawn from `seed` (B starts at zero), so two runs with one seed start alike."""
    peft = require_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=default_alpha(rank) if alpha is None else alpha, lora_dropout=dropout,
                             target_modules=list(targets), bias="none")
    config.base_model_name_or_path = model.config._name_or_path
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # not from the global stream, which would differ by what ran before
        torch.manual_seed(seed)
        model = peft.inject_adapter_in_model(config, model, ADAPTER)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"--lora-targets {list(targets)}: no linear module of {type(model).__name__} has such a name")
    device = next(model.parameters()).device
    for p in adapter_params(model):  # float32 adapters over a bf16 base: Adam's steps are not lost to rounding
        p.data = p.data.to(device=device, dtype=torch.float32)
    model.lora_config = config
    if adapter_dir is not None:
        load_adapter_weights(model, adapter_dir)
    return model


def adapter_params(model) -> list:
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def is_lora(model) -> bool:
    return getattr(model, "lora_config", None) is not None


def is_lora_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


def base_of(path: str) -> str:
    """The base model a LoRA checkpoint adapts (a hub id or a directory)."""
    with open(os.path.join(path, CONFIG)) as f:
        return json.load(f)["base_model_name_or_path"]


def settings_of(path: str) -> dict:
    with open(os.path.join(path, CONFIG)) as f:
        c = json.load(f)
    return {"rank": c["r"], "alpha": c["lora_alpha"], "dropout": c["lora_dropout"], "targets": sorted(c["target_modules"])}


def save_adapter(model, path: str) -> None:
    """The adapter only (peft's key names), its config, nothing of the frozen base."""
    peft = require_peft()
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(path, WEIGHTS))
    model.lora_config.save_pretrained(path)


def save_model(model, path: str) -> None:
    """What a checkpoint stores of the student: its adapter when it has one, else the whole model."""
    save_adapter(model, path) if is_lora(model) else model.save_pretrained(path)


def load_adapter_weights(model, path: str) -> None:
    peft = require_peft()
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, WEIGHTS))
    result = peft.set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    loaded = {n for n, _ in model.named_parameters() if ".lora_" in n}
    missing = [k for k in result.missing_keys if k in loaded]
    if missing or result.unexpected_keys or len(state) != len(loaded):
        raise ValueError(f"{path}: the adapter does not match the model's LoRA layers (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}); were --lora-rank/--lora-targets changed?")


def merged_state_dict(model) -> dict:
    """The adapted model's weights under the plain model's names (W + scale * B @ A in each adapted layer, in the
    base's dtype; no lora_ tensors), leaving the model as it is: what a plain engine loads (vllm_engine.sync)."""
    require_peft()
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" not in name:
            state[name.replace(".base_layer.", ".")] = tensor
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                w = module.get_base_layer().weight
                state[f"{name}.weight"] = (w.float() + module.get_delta_weight(ADAPTER).float()).to(w.dtype)
    return state


def merge(model):
    """W <- W + scale * B @ A in every adapted layer, then the plain layers back in place: an ordinary model."""
    require_peft()
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            with torch.no_grad():
                delta = module.get_delta_weight(ADAPTER)  # float32, from the float32 adapter
                base.weight.copy_((base.weight.float() + delta.float()).to(base.weight.dtype))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, base)
    model.lora_config = None
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.requires_grad_(True)
    return model


def merge_checkpoint(ckpt: str, out: str, dtype: str = "float32") -> str:
    """Base + adapter of a LoRA checkpoint -> `out`, a plain HF model directory (weights and tokenizer)."""
    import models  # imported here: models.py and rundir.py import this file
    import rundir
    from transformers import AutoTokenizer

    if not is_lora_checkpoint(ckpt):
        raise ValueError(f"{ckpt!r} is not a LoRA checkpoint (no {CONFIG}, or it is a full model)")
    rundir.new_output_dir(out, out, "OUT_DIR")
    model = models.load_model(ckpt, "float32", "cpu")  # base + adapter, merged in float32
    model.to(getattr(torch, dtype)).save_pretrained(out)
    AutoTokenizer.from_pretrained(ckpt).save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="LoRA checkpoints: merge the adapter into its base model")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="write base + adapter as a plain Hugging Face model directory")
    m.add_argument("ckpt", help="a LoRA checkpoint (RUN/ckpt) or a run directory")
    m.add_argument("out", help="a new directory")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    a = parser.parse_args()
    ckpt = os.path.join(a.ckpt, "ckpt") if os.path.isdir(os.path.join(a.ckpt, "ckpt")) else a.ckpt
    cli.run(lambda: print(f"merged {ckpt} into {merge_checkpoint(ckpt, a.out, a.dtype)}"))
