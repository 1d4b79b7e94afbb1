"""Faults, bad input, kills and data parallelism: each fault is injected and its handling asserted.

Replies are scripted by standing in for rollout.Decoder, so each malformed output is exactly the one named.
The env faults use FaultyEnv below (module level, so that spawned env workers can import it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import dist as dist_mod
import envs
import rundir
import rollout
import opd
import tcod
from curriculum import Plan
from envpool import EnvPool
from envs import Step
from test_tcod import chat, make_model, model_dirs, play, small_args, tok  # noqa: F401  (fixtures)
from tinyworld import TinyWorld

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------------------------------
# scripted replies


class ScriptedDecoder:
    """Stands in for rollout.Decoder: each row's reply is script(text of its stream so far) as token ids."""

    script = None  # set per test: str -> list[int]
    tok = None

    def __init__(self, model, vocab_size, generator):
        pass

    def reply(self, streams, eos, temperature, max_new_tokens):
        return [type(self).script(self.tok.decode(s)) for s in streams]

    def keep(self, rows):
        pass


@pytest.fixture
def scripted(monkeypatch, tok):
    monkeypatch.setattr(rollout, "Decoder", ScriptedDecoder)
    ScriptedDecoder.tok = tok
    return ScriptedDecoder


def turn_index(text: str) -> int:
    """Replies so far in a ChatML stream (the last assistant header is the one being answered)."""
    return text.count("<|im_start|>assistant") - 1


def invalid_utf8_tokens(tok) -> list[int]:
    """Byte-level tokens for the bytes 0xff 0xfe: not UTF-8, so they decode to replacement characters.

    The byte-level alphabet writes bytes 0xae-0xff as the characters of the same code point.
    """
    ids = [tok.convert_tokens_to_ids(chr(b)) for b in (0xFF, 0xFE)]
    assert all(i is not None and i != tok.unk_token_id for i in ids)
    return ids


def test_malformed_replies_are_counted_and_the_episode_goes_on(tok, chat, scripted):
    env = TinyWorld()
    task = env.tasks("train")[0]
    demo = env.demo(task)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    bad = [
        enc("I will go to the sink") + [chat.eos],  # no action tag
        enc("<action>look</action><action>look</action>") + [chat.eos],  # several actions
        enc("<action>" + "go " * 100 + "</action>") + [chat.eos],  # over-long action
        enc("<action>go") + invalid_utf8_tokens(tok) + enc("</action>") + [chat.eos],  # non-UTF-8 bytes in the action
        enc("<action>look"),  # cut at max_new_tokens: no closing tag, no eos
    ]

    def script(text):
        t = turn_index(text)
        return bad[t] if t < len(bad) else enc(f"<action>{demo[t - len(bad)]}</action>") + [chat.eos]

    scripted.script = staticmethod(script)
    (ep,) = play(None, chat, [task], max_turns=len(bad) + len(demo), max_new_tokens=40)
    assert ep.success and ep.error is None
    assert ep.invalid == len(bad) and ep.student_turns == len(bad) + len(demo)
    text = tok.decode(ep.ids)
    assert text.count("invalid reply") == len(bad) - 1  # the non-UTF-8 action reaches the env, which refuses it
    assert "\ufffd" in text
    # every turn is closed, the cut one too: the stream stays a well-formed chat
    assert text.count("<|im_start|>assistant") == text.count("<|im_start|>user") == ep.student_turns
    assert all(t == -1 or 0 <= t < ep.turns for t in ep.turn_of)


# --------------------------------------------------------------------------------------------------
# env faults mid-episode


class FaultyEnv(TinyWorld):
    """TinyWorld whose actions 'raise', 'die' and 'hang' make the env raise, its process exit, or hang."""

    def step(self, action):
        if action == "raise":
            raise RuntimeError("the simulator broke")
        if action == "die":
            os._exit(3)
        if action == "hang":
            time.sleep(600)
        return super().step(action)


@pytest.mark.parametrize("fault,error", [("raise", "the simulator broke"), ("die", "died"), ("hang", "step_timeout")])
def test_env_fault_mid_episode_fails_only_that_episode(tok, chat, scripted, monkeypatch, fault, error):
    monkeypatch.setitem(envs.ENVS, "faulty", "test_faults:FaultyEnv")
    env = TinyWorld()
    tasks = env.tasks("train")[:2]  # slot 0 meets the fault at its second turn; slot 1 (another worker) plays its demo
    demos = [env.demo(t) for t in tasks]
    starts = [env.reset(t).observation for t in tasks]

    def script(text):
        i, t = next(i for i, s in enumerate(starts) if s in text), turn_index(text)
        action = fault if (i == 0 and t == 1) else demos[i][t]
        return tok(f"<action>{action}</action>", add_special_tokens=False)["input_ids"] + [chat.eos]

    scripted.script = staticmethod(script)
    pool = EnvPool("faulty", {}, workers=2, step_timeout=3)
    try:
        episodes = rollout.rollout(
            None, chat, pool, env, tasks, [Plan(0, 20)] * 2, [None] * 2, temperature=1.0, max_new_tokens=40,
            max_turns=20, max_context=4096, think=False, prompt="compact", generator=torch.Generator(),
        )
    finally:
        pool.close()
    broken, fine = episodes
    assert broken.done and not broken.success and error in broken.error and broken.turns == 2
    assert fine.success and fine.error is None
    assert opd.episode_metrics(episodes)["errors"] == 1


# --------------------------------------------------------------------------------------------------
# bad input, before any model loads


def test_bad_input_is_rejected_before_any_model_loads(model_dirs, tmp_path, monkeypatch):
    student, teacher = model_dirs

    def no_models(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(tcod, "load_model", no_models)
    cases = [
        (dict(curriculum="b2f", demos=str(tmp_path / "none.json")), FileNotFoundError, "no such file"),
        (dict(curriculum="f2b", demos=str(tmp_path / "none.json")), ValueError, "--demos is for"),
        (dict(k_start=0), ValueError, "k_start"),
        (dict(max_bad_steps=0), ValueError, "max_bad_steps"),
        (dict(env_data=str(tmp_path / "missing")), ValueError, "not a directory"),
        (dict(tasks_per_step=10**6), ValueError, "training tasks"),
        (dict(env="nethack"), ValueError, "unknown env"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            tcod.main(small_args(tmp_path, student, teacher, **kw))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"env": "alfworld", "demos": {}}))
    with pytest.raises(ValueError, match="alfworld"):
        tcod.main(small_args(tmp_path, student, teacher, curriculum="b2f", demos=str(wrong)))


# --------------------------------------------------------------------------------------------------
# non-finite updates


def test_nan_teacher_skips_every_update_and_stops_after_max_bad_steps(model_dirs, tmp_path, tok):
    student, _ = model_dirs
    nan_teacher = str(tmp_path / "nan-teacher")
    model = make_model(tok, 1)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # every logit row has a NaN: every log-prob is NaN
    model.save_pretrained(nan_teacher)
    tok.save_pretrained(nan_teacher)
    args = small_args(tmp_path, student, nan_teacher, steps=4, max_bad_steps=2, save_every=1)
    with pytest.raises(RuntimeError, match="2 updates in a row"):
        tcod.main(args)
    rows = rundir.read_metrics(os.path.join(args.out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [-1, 0, 1] and all(r["skipped"] for r in rows[1:])
    # the weights never moved: the checkpoint equals the starting student
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(os.path.join(args.out, "ckpt")).state_dict()
    start = AutoModelForCausalLM.from_pretrained(student).state_dict()
    assert all(torch.equal(saved[k], start[k]) for k in start)


# --------------------------------------------------------------------------------------------------
# a kill at any moment


def cli(args: tcod.Args) -> list[str]:
    """The command line that gives tcod.py these Args."""
    out = [sys.executable, os.path.join(HERE, "tcod.py")]
    for f in dataclasses.fields(args):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if f.type == "bool":
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):  # e.g. --track wandb tensorboard; an empty tuple is the default
            out += [flag, *map(str, value)] if value else []
        else:
            out += [flag, str(value)]
    return out


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(model_dirs, tmp_path):
    student, teacher = model_dirs
    steps = 6
    whole = small_args(tmp_path / "whole", student, teacher, steps=steps, save_every=2)
    killed = small_args(tmp_path / "killed", student, teacher, steps=steps, save_every=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cli(whole), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cli(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(killed.out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and len(rundir.read_metrics(metrics)) < 4:  # the eval row, steps 0, 1 and 2
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # after step 2's metrics, before (or while) anything else
    assert proc.wait() == -signal.SIGKILL, "the run ended before the kill: nothing was tested"
    assert rundir.last_checkpoint(killed.out), "the step-2 checkpoint survives the kill"
    subprocess.run(cli(killed) + ["--resume"], check=True, env=env, capture_output=True)
    a, b = (rundir.read_metrics(os.path.join(o, "metrics.jsonl")) for o in (whole.out, killed.out))
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(-1, steps))
    for ra, rb in zip(a, b):
        for key in ("traj_kl", "loss", "grad_norm", "success", "eval_success"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)


# --------------------------------------------------------------------------------------------------
# data parallelism: 2 Gloo ranks make the update one process makes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_update(rank: int, world: int, port: int, student: str, teacher: str, episodes, aggregation: str, out: str, per_update: int = 0):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist = dist_mod.Dist()
    result = one_update(student, teacher, episodes[rank::world], aggregation, dist, per_update)
    if rank == 0:
        torch.save(result, out)
    dist.close()


def one_update(student_dir, teacher_dir, episodes, aggregation, dist=None, per_update=0):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).requires_grad_(False)
    # SGD at lr 1: the weights move by exactly the clipped gradient, which makes the comparison direct
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    args = tcod.Args(micro_batch=2, aggregation=aggregation, grad_clip=0.05, turns_per_update=per_update)
    update = opd.update(student, teacher, episodes, opt, tcod.update_config(args), dist)
    return {"params": torch.cat([p.detach().flatten() for p in student.parameters()]), "loss": update["loss"],
            "grad_norm": update["grad_norm"], "updates": update["updates"]}


@pytest.mark.parametrize("aggregation,per_update", [("token-mean", 0), ("seq-mean-token-mean", 0), ("token-mean", 5)])
def test_two_gloo_ranks_make_the_single_process_update(model_dirs, chat, tmp_path, aggregation, per_update):
    student, teacher = model_dirs
    from transformers import AutoModelForCausalLM

    # 5 episodes of different lengths: the ranks get 3 and 2, so uneven token counts and micro-batch counts
    episodes = play(AutoModelForCausalLM.from_pretrained(student), chat, [f"train-{i}" for i in range(5)], max_turns=4, seed=3)
    assert len({len(e.ids) for e in episodes}) > 1
    single = one_update(student, teacher, episodes, aggregation, per_update=per_update)
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.spawn(rank_update, args=(2, free_port(), student, teacher, episodes, aggregation, out, per_update), nprocs=2)
    ranks = torch.load(out)
    # several optimizer steps per rollout (the paper's update size) take the same steps on 2 ranks as in 1 process
    assert ranks["updates"] == single["updates"] == (len(opd.split_by_turns([e.task for e in episodes], [e.student_turns for e in episodes], per_update)))
    assert (single["updates"] > 1) == (per_update > 0)
    # several optimizer steps in a row carry the ranks' different float summation orders into later steps' weights
    tol = 1e-4 if per_update else 1e-5
    assert ranks["grad_norm"] == pytest.approx(single["grad_norm"], rel=tol)
    assert ranks["loss"] == pytest.approx(single["loss"], rel=tol)
    assert single["grad_norm"] > 0.05  # the clip is active, so the global norm (not a rank's) must be used
    torch.testing.assert_close(ranks["params"], single["params"], atol=1e-7, rtol=1e-5)


def test_torchrun_two_ranks_train_and_only_rank0_writes(model_dirs, tmp_path):
    student, teacher = model_dirs
    args = small_args(tmp_path, student, teacher, steps=2, eval_tasks=4, tasks_per_step=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())] + cli(args)[1:]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rundir.read_metrics(os.path.join(args.out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [-1, 0, 1]  # one row per step: only rank 0 writes
    assert os.path.isfile(os.path.join(args.out, "ckpt", "trainer.pt"))
    # metrics cover the step's 4 episodes, gathered from both ranks, and the 4 eval episodes
    assert all(r["episodes"] == 4 and r["turns"] > 0 for r in rows[1:])
    assert rows[0]["eval_turns"] > 0 and len(rows[0]["eval_kl_by_turn"]) == args.max_turns
