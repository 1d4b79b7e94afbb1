"""The memory plan: what each device must hold for a run, computed from the model configs before any weight loads.

A run has two phases that never overlap in time, so a device's peak is what it always holds plus the larger phase:
  always   student weights (float32 master weights: the optimizer updates these), AdamW state (exp_avg and
           exp_avg_sq, 2 x float32 per parameter), teacher weights (bf16 on GPU, no gradients);
  rollout  the KV cache of `tasks_per_step` episodes of up to `max_context` tokens, plus the bf16 copies of the
           student's weights that autocast makes when the forward runs in bf16 over float32 weights;
  update   float32 gradients, those bf16 weight copies again, the activations autograd saves for the backward of one
           micro-batch (`micro_batch` episodes of up to `max_context` tokens: every layer's, or with
           --gradient-checkpointing only each layer's input plus one layer's recomputed set), kl.py's chunked
           float32 logits, and the teacher's no-grad forward of the same micro-batch.
Everything is the worst case: every episode as long as the context allows. Activations are an estimate (see
`layer_activation_bytes`; fused attention, so no T x T score matrix); weights, optimizer state, gradients and the KV
cache are exact sizes. The PyTorch allocator reuses the rollout's freed blocks for the update, so the two phases
share memory, but fragmentation can cost a few more percent: keep some headroom.

vLLM (--rollout vllm, vllm_engine.py): the engine, not the student, samples, so the rollout phase holds the engine's
bf16 copy of the student's weights and its KV cache (the same worst case) in place of the Decoder's cache and autocast
copies, plus an allowance for what vLLM reserves besides (its forward over a batch of ENGINE_BATCH_TOKENS tokens, its
sampler's logits for every sequence, CUDA graphs and workspaces: ENGINE_FIXED). vLLM reserves its share of the device
(gpu_memory_utilization) for the whole run; with sleep mode (level 2, on CUDA) it frees its weights and KV cache for
the update and gets them back with the next sync, so they count in the rollout phase only, the allowance always. On a
CPU it holds its float32 weights and $VLLM_CPU_KVCACHE_SPACE GiB of KV cache always (no sleep mode there).
`engine_share` turns the engine's items into the share tcod.py passes as gpu_memory_utilization.

LoRA (--lora-rank R, lora.py): the base is frozen in the forwards' dtype (bf16 on GPU) and only the adapters train,
so the float32 weights, AdamW state, gradients and autocast copies are the adapter's (`lora_param_count`), and the
update's activations gain each adapted layer's input (kept for A's gradient) and its rank-R projection.

--fsdp (fsdp.py; `shards` ranks): each rank holds 1/shards of the float32 weights, AdamW state and gradients, the
whole bf16 teacher, and its own ceil(tasks_per_step / shards) episodes' KV cache; the rollout gathers every layer
once (the whole student in the compute dtype); the update gathers the root (embeddings, head, final norm: FSDP keeps
it gathered from its forward to the end of the backward) and two layers at a time (the one computing, the one
prefetched), plus their unsharded gradients and the float32 buffers of their reduce-scatter. The forwards run on the
gathered compute-dtype weights, so the residual stream is in that dtype too (no autocast casts of float32 weights).

Disk: a checkpoint (tcod.save_checkpoint) is the student weights as saved (float32, 4 B/param), the AdamW state
(8 B/param) and the tokenizer. It is written next to the previous one and then renamed over it, so for a moment the
output directory holds two: the run needs twice a checkpoint, and `check_disk` refuses a save that cannot fit.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace

GiB = 1 << 30
ENGINE_BATCH_TOKENS = 8192  # vllm_engine.py's max_num_batched_tokens: the largest forward vLLM profiles and runs
ENGINE_FIXED = 2 * GiB  # allowance: CUDA graphs, cuBLAS/NCCL workspaces, the CUDA context (not measured: no GPU here)
MAX_GPUS = 64  # the most GPUs a refusal considers for --fsdp
TOKENIZER_BYTES = 32 << 20  # allowance for the saved tokenizer files (Qwen's: ~11 MB on disk)


# --------------------------------------------------------------------------------------------------
# Reading a config (a transformers config object, or its config.json as a dict)


def as_config(config):
    """A dict becomes the transformers config of its model_type, so that absent keys take that class's defaults."""
    if isinstance(config, dict):
        from transformers import AutoConfig

        fields = dict(config)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return config


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_heads(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def is_moe_layer(cfg, i: int) -> bool:
    """Qwen3-MoE's rule (Qwen3MoeDecoderLayer): sparse unless listed in mlp_only_layers or off the sparse step."""
    experts = getattr(cfg, "num_experts", 0) or 0
    return experts > 0 and i not in (getattr(cfg, "mlp_only_layers", None) or []) and (i + 1) % getattr(cfg, "decoder_sparse_step", 1) == 0


# --------------------------------------------------------------------------------------------------
# Parameters, counted from the architecture (tested equal to the real models' counts)


def param_count(config) -> int:
    """Parameters of a Qwen2 / Qwen3 / Qwen3-MoE / Llama-style causal LM, counted as model.parameters() does
    (a tied lm_head is the embedding, counted once)."""
    cfg = as_config(config)
    h, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * head_dim(cfg), kv_heads(cfg) * head_dim(cfg)
    kind = cfg.model_type
    # attention: q, k, v, o projections; Qwen2 biases q/k/v only, Qwen3 and Llama bias all four iff attention_bias
    attn = h * q + 2 * h * kv + q * h
    if kind == "qwen2":
        attn += q + 2 * kv
    elif getattr(cfg, "attention_bias", False):
        attn += q + 2 * kv + h
    if kind in ("qwen3", "qwen3_moe"):
        attn += 2 * head_dim(cfg)  # q_norm and k_norm: one RMSNorm weight over head_dim each, shared by all heads
    mlp_bias = getattr(cfg, "mlp_bias", False)

    def dense_mlp(inter: int) -> int:  # gate, up, down
        return 3 * h * inter + (2 * inter + h if mlp_bias else 0)

    total = v * h + h  # embedding, final norm
    if not getattr(cfg, "tie_word_embeddings", False):
        total += v * h  # a separate lm_head (no bias)
    for i in range(layers):
        total += attn + 2 * h  # + input and post-attention RMSNorms
        if is_moe_layer(cfg, i):
            total += cfg.num_experts * dense_mlp(cfg.moe_intermediate_size) + cfg.num_experts * h  # experts + router
        else:
            total += dense_mlp(cfg.intermediate_size)
    return total


def lora_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear projection of a dense decoder layer, by module name."""
    cfg = as_config(config)
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * head_dim(cfg), kv_heads(cfg) * head_dim(cfg)
    inter = cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def lora_param_count(config, rank: int, targets) -> int:
    """LoRA adapter parameters: rank x (in + out) per adapted projection per layer (A is rank x in, B out x rank).
    MoE layers: their attention projections only (the experts are not adapted here)."""
    if not rank:
        return 0
    cfg, shapes = as_config(config), lora_shapes(config)
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    total = 0
    for i in range(cfg.num_hidden_layers):
        names = [t for t in targets if t in shapes and (t in attn or not is_moe_layer(cfg, i))]
        total += sum(rank * sum(shapes[t]) for t in names)
    return total


def trainable_count(config, lora_rank: int = 0, lora_targets=()) -> int:
    """What the optimizer updates: the adapter with LoRA, else every parameter."""
    return lora_param_count(config, lora_rank, lora_targets) if lora_rank else param_count(config)


def lora_activation_bytes(config, tokens: int, rank: int, targets, compute_bytes: int) -> int:
    """What the adapters add to one layer's saved activations, per micro-batch: each adapted projection keeps its
    input (in the compute dtype) for A's gradient and A's rank-R output for B's."""
    shapes = lora_shapes(config)
    return tokens * sum((shapes[t][0] + rank) * compute_bytes for t in targets if t in shapes)


def max_positions(config) -> int:
    return getattr(as_config(config), "max_position_embeddings", None) or 1 << 30


# --------------------------------------------------------------------------------------------------
# Activations and KV cache


def layer_activation_bytes(config, compute_bytes: int, residual_bytes: int) -> int:
    """Bytes one decoder layer saves for its backward, per token (an estimate, from what the ops save):
      residual dtype (float32 when the weights are float32 masters, even under autocast): the two RMSNorms save
        their input and normalized output, 4 x hidden;
      compute dtype (bf16 under autocast): the normed inputs of the projections (2 x hidden in one dtype; under
        autocast each of q, k, v, gate and up saves its own bf16 cast: 5 x hidden), q before and after rope and the
        attention output (3 x q), k before and after rope and v (3 x kv; + q and k norm inputs on Qwen3), the MLP's
        gate, up, silu(gate) and their product (4 x intermediate; MoE: per routed expert, top-k of them, plus the
        router's float32 logits).
    Checked against the tensors autograd really saves (test_memory.py): within 10 % on Qwen2 and Qwen3 layers."""
    cfg = as_config(config)
    h, hd = cfg.hidden_size, head_dim(cfg)
    q, kv = cfg.num_attention_heads * hd, kv_heads(cfg) * hd
    qk_norm = cfg.model_type in ("qwen3", "qwen3_moe")
    if getattr(cfg, "num_experts", 0):
        mlp = 4 * cfg.moe_intermediate_size * cfg.num_experts_per_tok * compute_bytes + cfg.num_experts * 4
    else:
        mlp = 4 * cfg.intermediate_size * compute_bytes
    casts = 5 * h if compute_bytes < residual_bytes else 2 * h
    attn = (casts + 3 * q + 3 * kv + (q + kv if qk_norm else 0)) * compute_bytes
    return 4 * h * residual_bytes + attn + mlp


def activation_bytes(config, tokens: int, checkpointing: bool, compute_bytes: int, residual_bytes: int) -> int:
    """Saved activations of one forward over `tokens` tokens (micro-batch x context). With gradient checkpointing
    each layer keeps only its input (hidden, residual dtype) and the backward recomputes one layer at a time."""
    cfg = as_config(config)
    per_layer = layer_activation_bytes(cfg, compute_bytes, residual_bytes)
    layer_inputs = cfg.hidden_size * residual_bytes
    last_hidden = 2 * cfg.hidden_size * residual_bytes  # final norm's input and the last hidden states kl.py keeps
    if checkpointing:
        return tokens * (cfg.num_hidden_layers * layer_inputs + per_layer + last_hidden)
    return tokens * (cfg.num_hidden_layers * per_layer + last_hidden)


def no_grad_forward_bytes(config, tokens: int, dtype_bytes: int) -> int:
    """A no-grad forward holds one layer at a time: the residual stream, the normed input and the MLP's gate, up and
    product (the largest transient), plus the returned last hidden states."""
    cfg = as_config(config)
    inter = cfg.moe_intermediate_size * cfg.num_experts_per_tok if getattr(cfg, "num_experts", 0) else cfg.intermediate_size
    return tokens * (3 * cfg.hidden_size + 3 * inter) * dtype_bytes


def kv_cache_bytes(config, episodes: int, tokens: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for `episodes` streams of `tokens` tokens."""
    cfg = as_config(config)
    return episodes * tokens * cfg.num_hidden_layers * 2 * kv_heads(cfg) * head_dim(cfg) * dtype_bytes


def logits_bytes(config, rows: int, positions: int, logits_per_chunk: int) -> int:
    """kl.py's chunked head: one chunk's float32 logits (kl.chunk_size: logits_per_chunk // (rows x vocab) positions a
    row, at least one, at most the sequence), its log-softmax work and, in the backward, its gradient: 3 of them."""
    row = rows * as_config(config).vocab_size
    chunk = min(positions, max(1, logits_per_chunk // row))
    return 3 * row * chunk * 4


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Setting:
    """What the plan depends on besides the two configs (all from the command line)."""

    student_device: str
    teacher_device: str
    micro_batch: int
    max_context: int
    tasks_per_step: int
    gradient_checkpointing: bool
    compute_bytes: int  # the forwards' dtype: 2 (bf16 autocast on GPU) or 4 (float32)
    teacher_bytes: int  # the teacher's weights' dtype
    student_bytes: int = 4  # float32 master weights (with LoRA: the frozen base's dtype)
    logits_per_chunk: int = 1 << 24  # kl.LOGITS_PER_CHUNK
    lora_rank: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = ()
    rollout: str = "hf"  # "vllm": a vLLM engine samples (its items replace the Decoder's rollout ones)
    engine_sleeps: bool = False  # vLLM's sleep mode: the engine's weights and KV cache are freed for the update
    engine_reserved: int = 0  # bytes of an explicit --vllm-memory share (0: the engine's own items, as planned)
    engine_kv_bytes: int | None = None  # a fixed KV reservation (a CPU's $VLLM_CPU_KVCACHE_SPACE); None: the worst case
    shards: int = 1  # --fsdp: the ranks the student's weights, gradients and AdamW state are sharded over


@dataclass(frozen=True)
class Item:
    device: str
    phase: str  # "always", "rollout" or "update"
    what: str
    bytes: int


def plan(student_config, teacher_config, s: Setting) -> list[Item]:
    """Every allocation of the run that scales with the models, by device and phase."""
    student, teacher = as_config(student_config), as_config(teacher_config)
    n_s, n_t = param_count(student), param_count(teacher)
    size = lambda n: f"{n / 1e9:.2f} B params" if n >= 1e8 else f"{n / 1e6:.2f} M params"
    tokens = s.micro_batch * s.max_context
    dt = {2: "bf16", 4: "fp32"}
    sd, td = s.student_device, s.teacher_device
    if s.lora_rank:
        return lora_plan(student, teacher, s)
    if s.shards > 1:
        return sharded_plan(student, teacher, s)
    items = [
        Item(sd, "always", f"student weights ({dt[s.student_bytes]}, {size(n_s)})", n_s * s.student_bytes),
        Item(sd, "always", "AdamW state (2 x fp32)", n_s * 8),
        Item(td, "always", f"teacher weights ({dt[s.teacher_bytes]}, {size(n_t)})", n_t * s.teacher_bytes),
        Item(sd, "rollout", f"KV cache ({s.tasks_per_step} episodes x {s.max_context} tokens, {dt[s.compute_bytes]})",
             kv_cache_bytes(student, s.tasks_per_step, s.max_context, s.compute_bytes)),
        Item(sd, "update", f"gradients ({dt[s.student_bytes]})", n_s * s.student_bytes),
        Item(sd, "update", f"activations ({s.micro_batch} x {s.max_context} tokens, "
             f"{'gradient checkpointing' if s.gradient_checkpointing else 'every layer saved'})",
             activation_bytes(student, tokens, s.gradient_checkpointing, s.compute_bytes, s.student_bytes)),
        Item(sd, "update", "chunked logits (kl.py, fp32)", logits_bytes(student, s.micro_batch, s.max_context, s.logits_per_chunk)),
        Item(td, "update", f"teacher forward ({s.micro_batch} x {s.max_context} tokens, no grad)",
             no_grad_forward_bytes(teacher, tokens, s.teacher_bytes) + logits_bytes(teacher, s.micro_batch, s.max_context, s.logits_per_chunk)),
    ]
    if s.compute_bytes < s.student_bytes:  # autocast keeps a bf16 copy of each weight it casts within the forward
        for phase in ("rollout", "update"):
            items.append(Item(sd, phase, "bf16 weight copies (autocast)", n_s * s.compute_bytes))
    return with_engine(items, student, s, n_s)


def with_engine(items: list[Item], student, s: Setting, n_params: int) -> list[Item]:
    """--rollout vllm: the engine's items in place of the Decoder's rollout-phase ones (see the module's notes)."""
    if s.rollout != "vllm":
        return items
    sd, dt = s.student_device, {2: "bf16", 4: "fp32"}[s.compute_bytes]
    cuda = sd.startswith("cuda")
    phase = "rollout" if s.engine_sleeps else "always"
    weights = n_params * s.compute_bytes
    kv = s.engine_kv_bytes if s.engine_kv_bytes is not None else kv_cache_bytes(student, s.tasks_per_step, s.max_context, s.compute_bytes)
    extra = no_grad_forward_bytes(student, ENGINE_BATCH_TOKENS, s.compute_bytes) + (
        3 * s.tasks_per_step * as_config(student).vocab_size * 4 + ENGINE_FIXED if cuda else 0)
    if s.engine_reserved:  # vLLM takes the whole share, whatever it needs: its KV cache gets the rest
        kv = max(s.engine_reserved - weights - extra, 0)
    kept = [i for i in items if not (i.device == sd and i.phase == "rollout")]
    return kept + [
        Item(sd, phase, f"vLLM weights ({dt})", weights),
        Item(sd, phase, f"vLLM KV cache ({'the rest of --vllm-memory' if s.engine_reserved else f'{s.tasks_per_step} episodes x {s.max_context} tokens'})", kv),
        Item(sd, "always", "vLLM activations, sampler" + (", CUDA graphs, workspaces" if cuda else "") + " (allowance)", extra),
    ]


def engine_setting(rollout: str, device: str, share: float | None, sleep: bool) -> dict:
    """The Setting fields of --rollout, --vllm-memory and --vllm-sleep on the student's device (sleep mode: CUDA only;
    an explicit share: of the device's total memory, when this machine has the device)."""
    if rollout != "vllm":
        return {}
    if not device.startswith("cuda"):  # vllm_engine.py: $VLLM_CPU_KVCACHE_SPACE GiB (it sets 1 when unset)
        return dict(rollout="vllm", engine_kv_bytes=int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * GiB))
    total = device_total(device)
    return dict(rollout="vllm", engine_sleeps=sleep, engine_reserved=int(share * total) if share and total else 0)


def device_total(device: str) -> int | None:
    import torch

    d = torch.device(device)
    if d.type != "cuda" or not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count():
        return None
    return torch.cuda.mem_get_info(d)[1]


def engine_share(items: list[Item], device: str, total: int) -> float:
    """The engine's share of a device of `total` bytes: its items' sum over the total (vLLM's gpu_memory_utilization)."""
    return sum(i.bytes for i in items if i.device == device and i.what.startswith("vLLM")) / total


def lora_plan(student, teacher, s: Setting) -> list[Item]:
    """The plan of a LoRA student: a frozen base (no gradients, no optimizer state, no autocast copies when it is
    already in the compute dtype) and float32 adapters that hold all of the trainable state."""
    n_s, n_t, n_a = param_count(student), param_count(teacher), lora_param_count(student, s.lora_rank, s.lora_targets)
    full = plan(student, teacher, replace(s, lora_rank=0, rollout="hf"))  # the shared rows: teacher, KV cache, logits, teacher forward
    tokens, dt, sd = s.micro_batch * s.max_context, {2: "bf16", 4: "fp32"}, s.student_device
    acts = activation_bytes(student, tokens, s.gradient_checkpointing, s.compute_bytes, s.student_bytes)
    layers = 1 if s.gradient_checkpointing else as_config(student).num_hidden_layers
    acts += layers * lora_activation_bytes(student, tokens, s.lora_rank, s.lora_targets, s.compute_bytes)
    items = [
        Item(sd, "always", f"student base weights (frozen, {dt[s.student_bytes]}, {n_s / 1e9:.2f} B params)", n_s * s.student_bytes),
        Item(sd, "always", f"LoRA adapters (fp32, rank {s.lora_rank}, {n_a / 1e6:.2f} M params)", n_a * 4),
        Item(sd, "always", "AdamW state of the adapters (2 x fp32)", n_a * 8),
        Item(sd, "update", "adapter gradients (fp32)", n_a * 4),
        Item(sd, "update", f"activations ({s.micro_batch} x {s.max_context} tokens, "
             f"{'gradient checkpointing' if s.gradient_checkpointing else 'every layer saved'}, adapters' inputs included)", acts),
    ]
    keep = ("teacher weights", "KV cache", "chunked logits", "teacher forward")
    items += [i for i in full if i.what.startswith(keep)]
    if s.compute_bytes < 4:  # autocast's bf16 copies: of the adapters, and of the base if it is not already bf16
        copies = n_a * s.compute_bytes + (n_s * s.compute_bytes if s.compute_bytes < s.student_bytes else 0)
        items += [Item(sd, phase, "bf16 weight copies (autocast)", copies) for phase in ("rollout", "update")]
    return with_engine(items, student, s, n_s)


def root_param_count(config) -> int:
    """The parameters outside the decoder layers: embeddings, final norm and an untied head (FSDP's root unit)."""
    cfg = as_config(config)
    return cfg.vocab_size * cfg.hidden_size * (1 if getattr(cfg, "tie_word_embeddings", False) else 2) + cfg.hidden_size


def sharded_plan(student, teacher, s: Setting) -> list[Item]:
    """The plan of one rank of --fsdp over s.shards ranks (the module docstring says what each row is)."""
    n_s, shards, cb, sd = param_count(student), s.shards, s.compute_bytes, s.student_device
    shard = -(-n_s // shards)
    root = root_param_count(student)
    layer = -(-(n_s - root) // student.num_hidden_layers)
    gathered = root + 2 * layer
    tokens, dt = s.micro_batch * s.max_context, {2: "bf16", 4: "fp32"}
    tasks = -(-s.tasks_per_step // shards)
    items = [
        Item(sd, "always", f"student weights, a 1/{shards} shard (fp32, {n_s / 1e9:.2f} B params in all)", shard * 4),
        Item(sd, "always", f"AdamW state, a 1/{shards} shard (2 x fp32)", shard * 8),
        Item(sd, "rollout", f"KV cache ({tasks} episodes x {s.max_context} tokens, {dt[cb]})",
             kv_cache_bytes(student, tasks, s.max_context, cb)),
        Item(sd, "rollout", f"student weights gathered once per rollout ({dt[cb]}, every layer)", n_s * cb),
        Item(sd, "update", f"gradients, a 1/{shards} shard (fp32)", shard * 4),
        Item(sd, "update", f"gathered: embeddings, head, norm and 2 layers ({dt[cb]})", gathered * cb),
        Item(sd, "update", f"their gradients before the reduce-scatter ({dt[cb]} + fp32)", gathered * (cb + 4)),
        Item(sd, "update", f"activations ({s.micro_batch} x {s.max_context} tokens, "
             f"{'gradient checkpointing' if s.gradient_checkpointing else 'every layer saved'})",
             activation_bytes(student, tokens, s.gradient_checkpointing, cb, cb)),
    ]
    keep = ("teacher weights", "chunked logits", "teacher forward")  # the replicated teacher, as without --fsdp
    return items + [i for i in plan(student, teacher, replace(s, shards=1)) if i.what.startswith(keep)]


def needs(items: list[Item]) -> dict[str, int]:
    """Per device: what it always holds plus the larger of the two phases."""
    out = {}
    for dev in dict.fromkeys(i.device for i in items):
        by_phase = {p: sum(i.bytes for i in items if i.device == dev and i.phase == p) for p in ("always", "rollout", "update")}
        out[dev] = by_phase["always"] + max(by_phase["rollout"], by_phase["update"])
    return out


def fixes(student_config, teacher_config, s: Setting, device: str, capacity: int) -> list[str]:
    """The single flag changes that would make `device` fit, tried one at a time on the same plan."""
    def fits(t: Setting) -> bool:
        return needs(plan(student_config, teacher_config, t)).get(device, 0) <= capacity

    out = []
    if not s.gradient_checkpointing and fits(replace(s, gradient_checkpointing=True)):
        out.append("--gradient-checkpointing")
    mb = next((m for m in range(s.micro_batch - 1, 0, -1) if fits(replace(s, micro_batch=m))), None)
    if mb:
        out.append(f"--micro-batch {mb}")
    if s.teacher_device == s.student_device and s.shards == 1 and fits(replace(s, teacher_device="another device")):
        out.append("--teacher-device (put the teacher on another GPU)")
    ctx = next((c for c in (32768, 16384, 8192, 4096, 2048, 1024) if c < s.max_context and fits(replace(s, max_context=c))), None)
    if ctx:
        out.append(f"--max-context {ctx}")
    tasks = next((t for t in range(s.tasks_per_step - 1, 0, -1) if fits(replace(s, tasks_per_step=t))), None)
    if tasks:
        out.append(f"--tasks-per-step {tasks}")
    if not s.lora_rank:  # more GPUs, the student sharded over them (its teacher replicated on each)
        gpus = next((g for g in range(max(s.shards, 1) + 1, MAX_GPUS + 1)
                     if fits(replace(s, shards=g, teacher_device=s.student_device))), None)
        if gpus:
            out.append(f"--fsdp on {gpus} GPUs (torchrun --nproc-per-node {gpus} tcod.py --fsdp ...)")
    return out


def human(n: int) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / (1 << 20):8.1f} MiB"


def format_plan(items: list[Item], capacity: dict[str, int | None], header: str = "") -> str:
    lines = [f"memory plan (worst case: every episode as long as the context){header}"]
    need = needs(items)
    for dev, total in need.items():
        cap = capacity.get(dev)
        lines.append(f"  {dev}: {'capacity unknown' if cap is None else f'{cap / GiB:.1f} GiB available'}")
        for phase in ("always", "rollout", "update"):
            for i in items:
                if i.device == dev and i.phase == phase:
                    lines.append(f"    {phase:<8}{i.what:<64}{human(i.bytes)}")
        verdict = "" if cap is None else ("  fits" if total <= cap else "  DOES NOT FIT")
        lines.append(f"    {'peak = always + max(rollout, update)':<72}{human(total)}{verdict}")
    return "\n".join(lines)


def refuse_if_too_big(student_config, teacher_config, s: Setting, capacity: dict[str, int | None]) -> None:
    """Raise MemoryError, naming the flags that would fix it, when a device cannot hold its share."""
    for dev, total in needs(plan(student_config, teacher_config, s)).items():
        cap = capacity.get(dev)
        if cap is not None and total > cap:
            options = fixes(student_config, teacher_config, s, dev, cap)
            hint = f"any one of these would fit: {', '.join(options)}" if options else (
                "no single flag fixes it; combine --gradient-checkpointing, --micro-batch 1, --teacher-device, --max-context")
            raise MemoryError(f"{dev} would need {total / GiB:.1f} GiB at peak but has {cap / GiB:.1f} GiB available "
                              f"(the memory plan above); {hint}")


# --------------------------------------------------------------------------------------------------
# Device capacity


def canonical_device(device: str) -> str:
    """'cuda' -> 'cuda:0' (the current device), so a student on 'cuda' and a teacher on 'cuda:0' share one entry."""
    import torch

    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return f"cuda:{torch.cuda.current_device() if torch.cuda.is_available() else 0}"
    return str(d)


def device_capacity(device: str) -> int | None:
    """Bytes free for this process: CUDA's free memory now (other processes' use excluded), on CPU MemAvailable.
    None where it cannot be known (a CUDA device on a machine without it: the plan is then only printed)."""
    import torch

    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count():
            return None
        return torch.cuda.mem_get_info(d)[0]
    if d.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


# --------------------------------------------------------------------------------------------------
# Disk


def checkpoint_bytes(n_params: int, weight_bytes: int = 4) -> int:
    """One checkpoint: the student weights as saved, the AdamW state (2 x fp32) and the tokenizer."""
    return n_params * weight_bytes + n_params * 8 + TOKENIZER_BYTES


def saved_bytes(model, optimizer) -> int:
    """What save_checkpoint is about to write, from the live tensors (tied weights once, every optimizer tensor)."""
    import torch

    lora = getattr(model, "lora_config", None) is not None  # a LoRA student saves its adapter only (lora.save_model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not lora)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return weights + state + TOKENIZER_BYTES


def existing_dir(path: str) -> str:
    """The nearest existing ancestor: the run directory may not exist yet, its filesystem does."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_disk(path: str, need: int, what: str = "the checkpoint") -> None:
    """Raise OSError, naming the disk and the size, when `path`'s filesystem has less than `need` bytes free."""
    where = existing_dir(path)
    free = shutil.disk_usage(where).free
    if free < need:
        raise OSError(f"not enough disk space for {what}: {need / 1e9:.2f} GB needed on the filesystem of {where} "
                      f"but {free / 1e9:.2f} GB free; free some space or pass another --out")
