"""--fsdp: the student sharded over the ranks of torchrun with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

    torchrun --nproc-per-node 8 tcod.py --fsdp --env alfworld --student Qwen2.5-7B --teacher Qwen2.5-7B
    python fsdp.py plan --student Qwen2.5-7B --teacher Qwen2.5-7B --gpus 1 2 4 8   # the memory plan per rank
    python fsdp.py export RUN/ckpt OUT_DIR                                       # a plain Hugging Face model

Full fine-tuning holds 16 bytes a parameter (float32 weights, gradients, AdamW's two moments): 122 GB at 7B, which
no GPU holds. Here every decoder layer is one FSDP unit and the rest of the model (embeddings, final norm, head) the
root unit; each rank keeps 1/N of every float32 weight, gradient and AdamW moment. Under bf16-mixed the units gather
their weights in bf16 and reduce gradients in float32 (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)),
so the forwards run on bf16 weights throughout (the residual stream too; without --fsdp autocast keeps it float32).
AdamW steps the float32 shards; clip_grad_norm_ takes the norm of the whole gradient (FSDP's DTensors reduce it).

What had to be done to keep the update exactly the single-process one:
- Gradients are summed over ranks, not averaged: kl.loss_weights already divides by the count over all ranks (as
  with dist.py), so each unit's divide factor is 1, with SUM-only collectives (Gloo has no PREMUL_SUM).
- kl.py applies the head chunk by chunk outside the model's forward. The student's last hidden states are computed by
  `fsdp_hidden_states`, a method registered with register_fsdp_forward_method, so the root's hooks run: it gathers
  the root's weights, and FSDP keeps the root gathered after its forward, so the chunks read the whole head; the root's
  gradients are reduce-scattered when the backward ends. kl.hidden_states calls it where a model has one.
- EVERY RANK MUST RUN THE SAME NUMBER OF FORWARD/BACKWARD PASSES PER OPTIMIZER STEP. Each pass all-gathers every
  layer and reduce-scatters its gradient, collectives that wait for every rank: a rank with fewer micro-batches
  would leave the others waiting for ever. ShardedDist.even_passes pads a rank's micro-batches to the busiest
  rank's count with None, and for each None the update calls ShardedDist.empty_pass, a forward and backward with
  weight 0 through every parameter (every parameter must get a gradient on every rank, or the reduce-scatters differ
  in size). opd.score_and_update does both (for --update-from rollout and buffer alike); any other path that runs
  forwards and backwards of the student between optimizer steps must too. Dist.even_passes (plain data
  parallelism) returns the batches as they are.
- Rollouts, evaluation and no-grad scoring (eval's, and the buffer's on arrival) run under `gathered`: every layer is
  gathered once (the whole student in bf16, the memory plan's "gathered once per rollout") and kept until the block
  ends, so they run no collective and each rank runs as many forwards as its own episodes need. Any new no-grad
  forward of the student on a rank's own episodes must run under it too. FSDP's own per-layer gathering at every token would need every rank to
  decode in lockstep; it is not offered. `--rollout vllm` would hold a bf16 copy of the same size in the engine
  (plus its KV share) and sync it after every update through a gathered state dict; not wired up for --fsdp (refused).
- The teacher is replicated on every rank, in bf16 without gradients (the plan counts it whole). A teacher that does
  not fit next to the student's shards (the plan says so) would have to be sharded too, and every rank would then have
  to score in lockstep; not done here.

Loading: the model is built on the meta device, sharded, materialized shard by shard, and filled by
torch.distributed.checkpoint: from the safetensors files of a Hugging Face directory (HuggingFaceStorageReader: each
rank reads only its slices, no rank holds the whole float32 model) or from a sharded checkpoint. Checkpoints: each
rank writes its shard of the weights and AdamW state (`__R_0.distcp`), rank 0 the `.metadata`, config.json, the
tokenizer and trainer.pt (curriculum and step), in one directory that every rank can reach (one node, or a shared
filesystem); resume reads them back, on the same or another number of ranks. `models.load_model` (eval.py --model,
tcod.py --student) reads such a checkpoint as a plain model, and `python fsdp.py export` writes it as one.
Not with --fsdp: LoRA, --rollout vllm, --teacher-device (each refused before anything loads).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
import types
import warnings

import torch

import kl
import memory
from dist import Dist

METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_args(args) -> None:
    """--fsdp's own refusals, before any model loads (preflight.check_args calls this)."""
    if not args.fsdp:
        return
    if world() < 2:
        raise ValueError("--fsdp shards the student over the processes of torchrun: run `torchrun --nproc-per-node N "
                         "tcod.py --fsdp ...` with N >= 2 (this is one process); `python fsdp.py plan` prints the memory "
                         "plan for any number of GPUs")
    for bad, why in ((args.lora_rank, f"--lora-rank {args.lora_rank}: LoRA is not sharded here; train the adapters without "
                                      "--fsdp (they fit one GPU), or drop --lora-rank"),
                     (args.rollout == "vllm", "--rollout vllm: the engine is not synced from a sharded student; use --rollout hf"),
                     (args.teacher_device, f"--teacher-device {args.teacher_device}: under --fsdp every rank holds its "
                                           "own teacher on its own GPU; drop --teacher-device")):
        if bad:
            raise ValueError(f"--fsdp does not take {why}")


# --------------------------------------------------------------------------------------------------
# The ranks


class ShardedDist(Dist):
    """Dist for an FSDP student: the gradients are reduce-scattered in every backward (sum_gradients has nothing
    left to do), so every rank must run as many passes as the busiest (even_passes, empty_pass)."""

    def __init__(self):
        super().__init__()
        if self.cuda:
            torch.cuda.set_device(self.device)  # FSDP's collectives and its mesh use the current device
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.world,))

    def sum_gradients(self, model) -> None:
        pass  # summed by the reduce-scatter of each backward (divide factor 1)

    def even_passes(self, batches: list) -> list:
        return list(batches) + [None] * (max(self.gather(len(batches))) - len(batches))

    def empty_pass(self, model, amp=None) -> None:
        """A forward and backward of weight 0 through every parameter: this rank's share of the collectives of a
        pass it has no micro-batch for. Its gradient is exactly zero."""
        from rollout import autocast

        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        with autocast(self.device, amp):
            logp = kl.token_logprobs(kl.hidden_states(model, ids), model.get_output_embeddings(), kl.causal_targets(ids))
        (logp.sum() * 0.0).backward()


# --------------------------------------------------------------------------------------------------
# Sharding and loading


def shard(model, dist: ShardedDist, amp: torch.dtype | None = None):
    """Each decoder layer one FSDP unit, the rest the root; float32 shards, bf16 gathers under amp, summed gradients."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    for layer in model.base_model.layers:
        fully_shard(layer, mesh=dist.mesh, mp_policy=policy)
    fully_shard(model, mesh=dist.mesh, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # a sum: the loss weights are normalized over all ranks already
            m.set_force_sum_reduction_for_comms(True)
    model.fsdp_hidden_states = types.MethodType(lambda self, ids: self.base_model(input_ids=ids).last_hidden_state, model)
    register_fsdp_forward_method(model, "fsdp_hidden_states")  # kl.hidden_states: through the root's hooks
    return model


def is_sharded(model) -> bool:
    return hasattr(model, "fsdp_hidden_states")


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


def empty_model(path: str, device: str | torch.device, prepare=None):
    """The model of `path`'s config.json with uninitialized float32 weights on `device`: built on the meta device (no
    7B initialization), prepare(model) (sharding) applied, then materialized. Buffers (rotary frequencies) are
    computed at build time, kept, and put back after the materialization, which empties them too."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model.tie_weights()  # init_empty_weights unties them
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    if prepare is not None:
        prepare(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in buffers.items():
            model.get_buffer(name).copy_(b)
    return model


def tied_names(model) -> dict[str, str]:
    """A tied weight's later names -> its first (the head tied to the embeddings: a Hugging Face file holds the
    embeddings only). The same on a sharded model (FSDP keeps the tie) and a plain one."""
    first, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def distinct_state(model) -> dict:
    """The model's state dict (DTensor shards on a sharded model) with each tied weight once."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tied = tied_names(model)
    return {k: v for k, v in get_model_state_dict(model).items() if k not in tied}


def read_weights(model, path: str) -> None:
    """Fill `model` (sharded or plain) from a sharded checkpoint or the safetensors files of a Hugging Face directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = distinct_state(model)
    alone = not is_sharded(model)  # a plain model: this process reads every shard itself, with or without other ranks
    if is_sharded_checkpoint(path):
        with warnings.catch_warnings():  # dcp warns of every single-process load, even one asked for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, checkpoint_id=path, no_dist=alone)
    else:
        reader = dcp.HuggingFaceStorageReader(path)
        stored = reader.read_metadata().state_dict_metadata
        if missing := [k for k in state if k not in stored]:
            raise ValueError(f"--fsdp reads the weights from {path}'s safetensors files by name, and {len(missing)} of the "
                             f"model's are not there ({', '.join(missing[:3])}{', ...' * (len(missing) > 3)}): a model stored "
                             "under other names or in .bin files is not supported with --fsdp")
        dcp.load(state, storage_reader=reader, no_dist=alone)
    for name, first in tied_names(model).items():
        state[name] = state[first]
    set_model_state_dict(model, state)


def weights_dir(path: str) -> str:
    """A local directory of `path` (a hub id: its snapshot in the cache)."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import try_to_load_from_cache

    import models

    config = try_to_load_from_cache(path, "config.json", cache_dir=models.hub_cache())
    if not isinstance(config, str):
        raise ValueError(f"{path} is not in the Hugging Face cache; fetch it first: hf download {path}")
    return os.path.dirname(config)


def load_student(path: str, dist: ShardedDist, amp: torch.dtype | None, checkpointing: bool):
    """The student of `path` (a model directory, hub id or sharded checkpoint), sharded over the ranks, in float32."""
    path = weights_dir(path)

    def prepare(model):
        if checkpointing:
            model.gradient_checkpointing_enable()
        shard(model, dist, amp)

    model = empty_model(path, dist.device, prepare)
    read_weights(model, path)
    return model.eval()


def load_optimizer(model, optimizer, ckpt: str) -> None:
    """The AdamW state of a sharded checkpoint, into `optimizer` (over `model`'s shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not torch.load(os.path.join(ckpt, "trainer.pt"), weights_only=False)["optimizer_in_shards"]:
        return  # saved before any step was taken: AdamW starts fresh, as it would have gone on
    state = {"optim": get_optimizer_state_dict(model, optimizer)}  # a zero step at lr 0 makes the state to fill
    dcp.load(state, checkpoint_id=ckpt)
    set_optimizer_state_dict(model, optimizer, state["optim"])


@contextlib.contextmanager
def gathered(model):
    """Every layer gathered once, and kept until the block ends (rollouts, evaluation): decoding then runs no collective,
    so each rank decodes as many tokens as its own episodes need. A no-op for a model that is not sharded."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    layers = list(model.base_model.layers)
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
    try:
        yield
    finally:
        for layer in layers:  # the root stays gathered: FSDP frees it at the end of the next backward
            layer.set_reshard_after_forward(True, recurse=False)
            layer.reshard()


# --------------------------------------------------------------------------------------------------
# Checkpoints


def nonfinite(model, optimizer, dist: ShardedDist) -> str | None:
    """rundir.nonfinite over this rank's shards, agreed by every rank (so that all refuse the save, or none)."""
    import rundir

    return next((bad for bad in dist.gather(rundir.nonfinite(model, optimizer)) if bad), None)


def save_checkpoint(dist: ShardedDist, out: str, model, tok, optimizer, curriculum, step: int, bad_in_a_row: int = 0,
                    buffer: dict | None = None) -> None:
    """rundir.save_checkpoint for a sharded student, on every rank: each writes its shards into ckpt.tmp, rank 0 the
    rest (the update buffer's state, which every rank holds whole, in trainer.pt), then ckpt.tmp replaces ckpt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    import rundir

    final, tmp, old = (os.path.join(out, n) for n in ("ckpt", "ckpt.tmp", "ckpt.old"))
    lead = dist.rank == 0
    if bad := nonfinite(model, optimizer, dist):
        raise RuntimeError(f"not saving the step-{step} checkpoint: {bad} is not finite (lower --lr?); {out} keeps the last good one")
    problem = None
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # sizes are the whole model's (a DTensor's numel is its global one): what all ranks write together
            memory.check_disk(out, memory.saved_bytes(model, optimizer))
            os.makedirs(tmp)
        except OSError as e:
            problem = e
    if said := dist.gather(problem and str(problem))[0]:  # rank 0's refusal is every rank's, or the others would wait
        if problem:
            raise problem
        raise RuntimeError(f"rank 0 could not start the step-{step} checkpoint: {said}")
    # AdamW has no state before its first step (every update so far skipped): asking dcp for it would make one
    stepped = bool(optimizer.state)
    state = {"model": distinct_state(model)} | ({"optim": get_optimizer_state_dict(model, optimizer)} if stepped else {})
    try:
        dcp.save(state, checkpoint_id=tmp)
    except Exception as e:  # dcp gathers every rank's failure into one CheckpointException: {rank: (exception, trace)}
        causes = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()] + [e]
        if not any(rundir.disk_full(c) for c in causes if isinstance(c, BaseException)):
            raise
        raise OSError(errno.ENOSPC, f"the disk is full: writing the step-{step} checkpoint to {tmp} failed; the last "
                      f"complete checkpoint in {out} is intact: free some space, then resume with --resume --out {out}") from e
    if lead:
        tok.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        state = {"curriculum": curriculum.state_dict(), "step": step, "bad_in_a_row": bad_in_a_row, "ranks": dist.world,
                 "optimizer_in_shards": stepped}
        torch.save(state | ({"buffer": buffer} if buffer is not None else {}), os.path.join(tmp, "trainer.pt"))
        if os.path.isfile(os.path.join(out, "args.json")):
            shutil.copy(os.path.join(out, "args.json"), tmp)
        rundir.follow_umask(tmp)
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # no rank goes on (to the next save, or to a resume) before the checkpoint is in place


def checkpoint_problem(ckpt: str) -> str | None:
    """What is damaged in a sharded checkpoint (rundir.checkpoint_problem calls this): an unreadable index, or a shard
    file it names that is missing or shorter than it says."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(ckpt).read_metadata()
    except Exception as e:  # whatever the reader's complaint, the index cannot be used
        return f"{METADATA} is unreadable ({type(e).__name__})"
    ends = {}
    for info in meta.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path):
            return f"{name}, a shard {METADATA} names, is missing"
        if os.path.getsize(path) < end:
            return f"{name} is cut short ({os.path.getsize(path)} bytes where {METADATA} needs {end})"
    return None


def consolidated(ckpt: str, dtype: torch.dtype, device: str):
    """A sharded checkpoint's weights as one plain model (in one process: torch.distributed.checkpoint reads every
    shard; the AdamW state is not read)."""
    model = empty_model(ckpt, "cpu")
    model.tie_weights()  # materializing a plain model unties them (a sharded one keeps the tie)
    read_weights(model, ckpt)
    return model.to(dtype=dtype, device=device).eval()


def export(ckpt: str, out: str, dtype: str = "float32") -> str:
    """A sharded checkpoint -> `out`, a plain Hugging Face model directory (weights, config, tokenizer)."""
    import rundir
    from transformers import AutoTokenizer

    if not is_sharded_checkpoint(ckpt):
        raise ValueError(f"{ckpt!r} is not a sharded checkpoint of a --fsdp run (no {METADATA} in it)")
    if problem := checkpoint_problem(ckpt):
        raise ValueError(f"{ckpt} is damaged: {problem}")
    rundir.new_output_dir(out, out, "OUT_DIR")
    consolidated(ckpt, getattr(torch, dtype), "cpu").save_pretrained(out)
    AutoTokenizer.from_pretrained(ckpt).save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# The plan per rank, for any number of GPUs, without them


def plan_text(student: str, teacher: str, gpus: int, capacity_gib: float, micro_batch: int, max_context: int | None,
              tasks_per_step: int, checkpointing: bool) -> str:
    """tcod.py's memory plan of one rank of `gpus` on GPUs of capacity_gib, bf16-mixed (1 GPU: without --fsdp), and
    its refusal when it does not fit."""
    import models

    # the paper's models by their public configs (models.REAL_CONFIGS: no download); others from their config.json
    config = lambda name: models.random_config(f"random:{name}") if name in models.REAL_CONFIGS else models.model_config(name)
    s_cfg, t_cfg = config(student), config(teacher)
    limit = min(memory.max_positions(s_cfg), memory.max_positions(t_cfg))
    setting = memory.Setting(student_device="cuda:0", teacher_device="cuda:0", micro_batch=micro_batch,
                             max_context=min(max_context or limit, limit), tasks_per_step=tasks_per_step,
                             gradient_checkpointing=checkpointing, compute_bytes=2, teacher_bytes=2, shards=gpus,
                             logits_per_chunk=kl.LOGITS_PER_CHUNK)
    capacity = {"cuda:0": int(capacity_gib * memory.GiB)}
    head = f" -- {student} <- {teacher}, " + (f"--fsdp, one of {gpus} ranks" if gpus > 1 else "one GPU, no --fsdp")
    items = memory.plan(s_cfg, t_cfg, setting)
    text = memory.format_plan(items, capacity, head)
    if gpus > 1:
        text += "\n" + rollout_choices(s_cfg, items)
    try:
        memory.refuse_if_too_big(s_cfg, t_cfg, setting, capacity)
    except MemoryError as e:
        text += f"\n  refused: {e}"
    return text


def rollout_choices(student_config, items: list) -> str:
    """The peak of one rank under each way to hold the student's weights for decoding: gathered once per rollout
    (what --fsdp does), FSDP's per-layer gathering at every token, or a vLLM engine's own copy."""
    from dataclasses import replace

    gather = next(i for i in items if i.what.startswith("student weights gathered"))
    rest = [i for i in items if i is not gather]
    root = memory.root_param_count(student_config)
    layer = -(-(memory.param_count(student_config) - root) // memory.as_config(student_config).num_hidden_layers)
    per_layer = replace(gather, bytes=(root + 2 * layer) * gather.bytes // memory.param_count(student_config))
    peak = lambda its: memory.human(memory.needs(its)[gather.device])
    rows = [("gathered once per rollout (--fsdp)", items, ""),
            ("FSDP's per-layer gathering at every token", rest + [per_layer], "needs every rank to decode in lockstep: not offered"),
            ("a vLLM engine's own copy of the weights, held always", rest + [replace(gather, phase="always")],
             "+ its --vllm-memory share for the KV cache; not with --fsdp")]
    return "\n".join(["  rollout choices, this rank's peak:"] + [f"    {what:<68}{peak(its)}  {note}".rstrip() for what, its, note in rows])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="--fsdp: the memory plan per rank; a sharded checkpoint as one model")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the memory plan of one rank for each number of GPUs (loads no model)")
    p.add_argument("--student", default="Qwen2.5-7B")
    p.add_argument("--teacher", default="Qwen2.5-7B")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--capacity-gib", type=float, default=79.6, help="each GPU's memory (what an '80 GB' H100 reports)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-context", type=int, default=8192)
    p.add_argument("--tasks-per-step", type=int, default=16)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    e = sub.add_parser("export", help="write a sharded checkpoint as a plain Hugging Face model directory")
    e.add_argument("ckpt", help="a --fsdp run's checkpoint (RUN/ckpt) or its run directory")
    e.add_argument("out", help="a new directory")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    a = parser.parse_args(argv)
    if a.command == "plan":
        for g in a.gpus:
            if g < 1:
                raise ValueError(f"--gpus {g}: must be >= 1")
            print(plan_text(a.student, a.teacher, g, a.capacity_gib, a.micro_batch, a.max_context, a.tasks_per_step,
                            not a.no_gradient_checkpointing) + "\n")
    else:
        ckpt = os.path.join(a.ckpt, "ckpt") if os.path.isdir(os.path.join(a.ckpt, "ckpt")) else a.ckpt
        print(f"exported {ckpt} to {export(ckpt, a.out, a.dtype)}")


if __name__ == "__main__":
    import cli

    cli.run(lambda: main(sys.argv[1:]))
