"""Tests of --fsdp (fsdp.py) on CPU, 2 Gloo ranks: the sharded update is the single-process one, a sharded run resumes
exactly, its checkpoint exports to a plain model, and the plan per rank; bad input is refused before any model loads."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch

import buffer
import fsdp
import memory
import models
import opd
import rundir
import tcod
from test_faults import cli, free_port
from test_memory import H100_80GB, QWEN25_7B, paper_setting
from test_tcod import chat, model_dirs, play, small_args, tok  # noqa: F401  (fixtures)

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------------------------------
# one update: 2 sharded ranks against one process


def one_update(student, teacher, rollouts, aggregation, per_update, dist=None):
    """SGD at lr 1 (the weights move by exactly the clipped gradient) on each rollout's share of this rank, as
    --update-from rollout (per_update turns a group, 0: one step), or through the buffer (--update-from buffer, "buffer":
    5 rows a step); -> the weights after, by name, and the metrics."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    args = tcod.Args(micro_batch=2, aggregation=aggregation, grad_clip=0.05, turns_per_update=per_update if per_update != "buffer" else 5)
    turn_buffer, outs = buffer.TurnBuffer(5), []
    for j, episodes in enumerate(rollouts):
        if per_update == "buffer":
            outs.append(buffer.update(turn_buffer, j, student, teacher, episodes[rank::world], opt, tcod.update_config(args), dist)[0])
        else:
            outs.append(opd.update(student, teacher, episodes[rank::world], opt, tcod.update_config(args), dist))
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"params": {k: v.detach().clone() for k, v in full.items()}, "loss": [o["loss"] for o in outs],
            "grad_norm": [o["grad_norm"] for o in outs], "updates": [o["updates"] for o in outs]}


def rank_update(rank, world, port, student_dir, teacher_dir, rollouts, aggregation, per_update, checkpointing, out):
    from transformers import AutoModelForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist = fsdp.ShardedDist()
    student = fsdp.load_student(student_dir, dist, None, checkpointing)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).requires_grad_(False)
    result = one_update(student, teacher, rollouts, aggregation, per_update, dist)
    if rank == 0:
        torch.save(result, out)
    dist.close()


@pytest.mark.parametrize("aggregation,per_update", [("token-mean", 0), ("seq-mean-token-mean", 5), ("token-mean", "buffer")])
def test_two_sharded_ranks_make_the_single_process_update(model_dirs, chat, tmp_path, aggregation, per_update):
    from transformers import AutoModelForCausalLM

    student, teacher = model_dirs
    sampler = AutoModelForCausalLM.from_pretrained(student)
    # 5 episodes of different lengths: the ranks get 3 and 2, so 2 and 1 micro-batches: rank 1 runs an empty pass; the
    # buffer also gets a second rollout of 4 (steps that split episodes, rows that wait)
    rollouts = [play(sampler, chat, [f"train-{i}" for i in range(5)], max_turns=4, seed=3)]
    if per_update == "buffer":
        rollouts.append(play(sampler, chat, [f"train-{i}" for i in range(10, 14)], max_turns=3, seed=4))
    single = one_update(AutoModelForCausalLM.from_pretrained(student), AutoModelForCausalLM.from_pretrained(teacher).requires_grad_(False),
                        rollouts, aggregation, per_update)
    out = str(tmp_path / "rank0.pt")
    checkpointing = per_update != 0  # gradient checkpointing under FSDP in two of the three
    torch.multiprocessing.spawn(rank_update, args=(2, free_port(), student, teacher, rollouts, aggregation, per_update,
                                                   checkpointing, out), nprocs=2)
    ranks = torch.load(out)
    assert ranks["updates"] == single["updates"]
    if per_update != "buffer":
        groups = opd.split_by_turns([e.task for e in rollouts[0]], [e.student_turns for e in rollouts[0]], per_update)
        assert single["updates"] == [len(groups)] and (len(groups) > 1) == (per_update > 0)
    else:
        assert sum(single["updates"]) >= 3
    assert min(single["grad_norm"]) > 0.05  # the clip is active: the norm must be the whole gradient's, not a shard's
    tol = 1e-5 if per_update == 0 else 1e-4  # several steps carry the ranks' float summation order into later steps
    assert ranks["grad_norm"] == pytest.approx(single["grad_norm"], rel=tol)
    assert ranks["loss"] == pytest.approx(single["loss"], rel=tol)
    assert ranks["params"].keys() == single["params"].keys()
    for name, p in single["params"].items():
        torch.testing.assert_close(ranks["params"][name], p, atol=1e-6 if per_update else 1e-7, rtol=tol, msg=name)


# --------------------------------------------------------------------------------------------------
# a sharded run: resume, export, damage


def torchrun(args: tcod.Args, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    done = subprocess.run(cmd + cli(args)[1:] + list(extra), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, cwd=HERE)
    assert done.returncode == 0, [line for line in done.stderr.splitlines() if "error" in line.lower()][:5]
    return done


def test_sharded_checkpoint_exports_to_a_plain_model(model_dirs, tmp_path):
    student, teacher = model_dirs
    # bf16-mixed, the GPU's precision (bf16 gathers, float32 shards and reduction), runs on Gloo too
    args = small_args(tmp_path, student, teacher, steps=1, tasks_per_step=4, fsdp=True, lr=1e-2, eval=False, dtype="bf16-mixed")
    torchrun(args)
    ckpt = os.path.join(args.out, "ckpt")
    assert sorted(n for n in os.listdir(ckpt) if n.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a part a rank
    assert rundir.checkpoint_problem(ckpt) is None and rundir.checkpoint_step(ckpt) == 1
    out = str(tmp_path / "export")
    subprocess.run([sys.executable, os.path.join(HERE, "fsdp.py"), "export", args.out, out], check=True, capture_output=True)
    assert any(n.endswith(".safetensors") for n in os.listdir(out)) and os.path.isfile(os.path.join(out, "tokenizer.json"))
    # the export is a plain model with the run's weights; the checkpoint itself loads as one too (eval.py --model RUN,
    # tcod.py --student RUN/ckpt)
    exported = models.load_model(models.resolve_model(out), "float32", "cpu")
    direct = models.load_model(ckpt, "float32", "cpu")
    first = models.load_model(student, "float32", "cpu")
    assert exported.lm_head.weight is exported.model.embed_tokens.weight  # still tied
    assert exported.dtype == torch.float32  # the master weights
    moved = False
    for (name, p), q, r in zip(exported.named_parameters(), direct.parameters(), first.parameters()):
        assert torch.equal(p, q), name
        moved |= not torch.equal(p, r)
    assert moved, "a step at lr 1e-2 moved the weights"
    # the run's checkpoint evaluates as any model does
    done = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--env", "tinyworld", "--model", args.out, "--limit", "2",
                           "--max-turns", "4", "--max-new-tokens", "12", "--think", "False", "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, cwd=HERE)
    assert done.returncode == 0, done.stderr[-2000:]
    # a shard cut short, or missing, is named before anything loads
    damaged = str(tmp_path / "damaged")
    shutil.copytree(ckpt, damaged)
    with open(os.path.join(damaged, "__1_0.distcp"), "r+b") as f:
        f.truncate(10)
    assert "__1_0.distcp is cut short" in rundir.checkpoint_problem(damaged)
    os.remove(os.path.join(damaged, "__1_0.distcp"))
    assert "__1_0.distcp, a shard .metadata names, is missing" in rundir.checkpoint_problem(damaged)


def test_sharded_run_resumes_exactly(model_dirs, tmp_path):
    student, teacher = model_dirs
    # the authors' update buffer (the real benchmarks' default): a resume with rows waiting in it, from rank 0's trainer.pt
    kw = dict(eval_tasks=4, tasks_per_step=4, fsdp=True, lr=1e-2, update_from="buffer", turns_per_update=5)
    whole = small_args(tmp_path, student, teacher, steps=2, save_every=2, out=str(tmp_path / "whole"), **kw)
    part = small_args(tmp_path, student, teacher, steps=1, save_every=1, out=str(tmp_path / "part"), **kw)
    torchrun(whole)
    torchrun(part)
    torchrun(dataclasses.replace(part, steps=2), "--resume")  # AdamW's state, the curriculum and the step from the shards
    a, b = (rundir.read_metrics(os.path.join(o, "metrics.jsonl")) for o in (whole.out, part.out))
    assert [r["step"] for r in b] == [r["step"] for r in a] == [-1, 0, 1]
    assert a[1]["buffer_rows"] > 0 and a[2]["updates"] >= 1  # rows carried over the checkpoint, then trained
    for ra, rb in zip(a, b):
        for key in ("traj_kl", "loss", "grad_norm", "success", "eval_success", "eval_traj_kl"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)


# --------------------------------------------------------------------------------------------------
# bad input, and the plan per rank


def test_fsdp_without_torchrun_is_one_line_and_exit_2(model_dirs, tmp_path):
    student, teacher = model_dirs
    args = small_args(tmp_path, student, teacher, fsdp=True)
    done = subprocess.run(cli(args), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, cwd=HERE)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "torchrun --nproc-per-node N tcod.py --fsdp" in done.stderr
    assert not os.path.exists(args.out)  # refused before anything was written or loaded


@pytest.mark.parametrize("flag,value", [("lora_rank", 4), ("rollout", "vllm"), ("teacher_device", "cpu")])
def test_fsdp_refuses_what_it_does_not_shard(model_dirs, tmp_path, monkeypatch, flag, value):
    student, teacher = model_dirs
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = small_args(tmp_path, student, teacher, fsdp=True, **{flag: value})
    with pytest.raises(ValueError, match="--fsdp does not take --" + flag.replace("_", "-")):
        fsdp.check_args(args)


def test_plan_per_rank_shards_the_training_state():
    one, four = (memory.plan(QWEN25_7B, QWEN25_7B, paper_setting(gradient_checkpointing=True, shards=n)) for n in (1, 4))
    by = lambda items: {i.what.split(" (")[0].split(",")[0]: i.bytes for i in items}
    a, b = by(one), by(four)
    n = memory.param_count(QWEN25_7B)
    assert b["student weights"] == -(-n // 4) * 4 and b["AdamW state"] == -(-n // 4) * 8 and b["gradients"] == -(-n // 4) * 4
    assert a["teacher weights"] == b["teacher weights"] == n * 2  # the teacher is replicated
    assert b["student weights gathered once per rollout"] == n * 2  # the whole student, bf16, while decoding
    assert b["KV cache"] * 4 == a["KV cache"]  # 16 episodes over 4 ranks
    # 7B <- 7B does not fit one 80 GB GPU: the refusal names --fsdp and the number of GPUs that fits
    with pytest.raises(MemoryError, match=r"--fsdp on 4 GPUs \(torchrun --nproc-per-node 4"):
        memory.refuse_if_too_big(QWEN25_7B, QWEN25_7B, paper_setting(gradient_checkpointing=True), {"cuda:0": H100_80GB})
    memory.refuse_if_too_big(QWEN25_7B, QWEN25_7B, paper_setting(gradient_checkpointing=True, shards=4), {"cuda:0": H100_80GB})
    # `python fsdp.py plan`: the same plans from the paper's public configs, with the rollout's choices
    one, eight = (fsdp.plan_text("Qwen2.5-7B", "Qwen2.5-7B", g, 79.6, 4, 8192, 16, True) for g in (1, 8))
    assert "DOES NOT FIT" in one and "refused: " in one and "--fsdp on 4 GPUs" in one
    assert "fits" in eight and "refused" not in eight and "vLLM engine" in eight and "one of 8 ranks" in eight
