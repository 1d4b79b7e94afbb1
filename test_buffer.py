"""The update buffer (buffer.py, --update-from buffer): turn-rows carried across rollouts and drained in optimizer
steps of exactly --turns-per-update rows, checked against steps made by hand, across a resume, and on 2 Gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch

import buffer
import dist as dist_mod
import opd
import rundir
import tcod
from rollout import Episode
from test_faults import free_port
from test_tcod import chat, make_model, model_dirs, play, small_args, tok  # noqa: F401  (fixtures)


def fake_episode(task: str, turns: int, prompt: int = 3, reply: int = 2) -> Episode:
    """A stream of a prompt, then per turn a reply of `reply` student tokens and a user message of 2 tokens."""
    ep = Episode(task)
    ep.add(list(range(prompt)))
    for t in range(turns):
        ep.add([100 + t] * reply, turn=t)
        ep.add([7, 8])
    return ep


def test_rows_carry_over_and_each_step_takes_exactly_turns_per_update():
    buf = buffer.TurnBuffer(64)
    for step in range(3):  # F2B at depth 1: 16 one-turn episodes a rollout wait for a fourth
        assert buf.add(step, [fake_episode(f"t{i}", 1) for i in range(16)], [None] * 16) == 16
        assert not buf.ready()
    buf.add(3, [fake_episode(f"t{i}", 1) for i in range(16)], [None] * 16)
    pieces, _ = buf.take()
    assert len(pieces) == 64 and not buf.ready() and len(buf) == 0 and not buf.streams
    # 65 rows: one step of exactly 64, one row waits (per-rollout grouping made 2 steps of about 32)
    buf.add(4, [fake_episode(f"u{i}", 13) for i in range(5)], [None] * 5)
    assert len(buf) == 65 and len(opd.split_by_turns([f"u{i}" for i in range(5)], [13] * 5, 64)) == 2
    pieces, _ = buf.take()
    assert sum(len({t for t in p.turn_of if t >= 0}) for p in pieces) == 64 and len(buf) == 1
    assert buf.rows == [(4, "u4", 12)]


def test_a_split_episode_trains_each_row_once_in_its_full_context():
    ep = fake_episode("b", 5)  # tasks are taken in id order: "a" (3 rows) first, then "b" (5 rows)
    teacher = torch.arange(len(ep.ids), dtype=torch.float32)
    buf = buffer.TurnBuffer(4)
    buf.add(0, [ep, fake_episode("a", 3)], [teacher, None])
    first, _ = buf.take()
    second, logp = buf.take()
    assert [p.task for p in first] == ["a", "b"] and [p.task for p in second] == ["b"]
    b1, b2 = first[1], second[0]
    assert sorted({t for t in b1.turn_of if t >= 0}) == [0] and sorted({t for t in b2.turn_of if t >= 0}) == [1, 2, 3, 4]
    assert b1.ids == ep.ids[: len(b1.ids)] and b1.turn_of[-1] == 0  # cut after its last row: nothing after is needed
    assert b2.ids == ep.ids[:-2] and torch.equal(logp[0], teacher[:-2])  # the later rows keep the context before them
    assert len(buf) == 0 and not buf.streams
    restored = buffer.TurnBuffer(4)
    buf.add(1, [fake_episode("c", 6)], [None])
    buf.take()
    restored.load_state_dict(buf.state_dict())
    assert restored.rows == buf.rows and restored.streams == buf.streams


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_buffer_steps_equal_steps_taken_by_hand(tok, chat, aggregation):
    teacher = make_model(tok, 1).requires_grad_(False)
    sampler = make_model(tok, 0)
    rollouts = [play(sampler, chat, [f"train-{3 * j + i}" for i in range(3)], max_new_tokens=6, max_turns=4, seed=j) for j in range(3)]
    cfg = tcod.update_config(tcod.Args(grad_clip=1e9, aggregation=aggregation, micro_batch=2, turns_per_update=5))

    def weights(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    student, buf, steps = make_model(tok, 0), buffer.TurnBuffer(5), []
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for j, episodes in enumerate(rollouts):
        out, _, kl_tokens = buffer.update(buf, j, student, teacher, episodes, opt, cfg)
        steps.append(out["updates"])
        assert len(kl_tokens) == sum(e.reply_tokens for e in episodes)  # the rollout's metrics: every token of it
    # by hand: the rows in order (rollouts, tasks by id, turns), every 5 one SGD step on those turns of the whole
    # streams, the teacher run again, on a fresh student
    student2, done, pending = make_model(tok, 0), [], []
    opt2 = torch.optim.SGD(student2.parameters(), lr=0.1)
    for j, episodes in enumerate(rollouts):
        for ep in sorted(episodes, key=lambda e: e.task):
            pending += [(ep, t) for t in sorted({t for t in ep.turn_of if t >= 0})]
        n = 0
        while len(pending) >= 5:
            chunk, pending = pending[:5], pending[5:]
            pieces = {}
            for ep, t in chunk:
                pieces.setdefault(ep.task, (ep, set()))[1].add(t)
            opd.score_and_update(student2, teacher, [Episode(ep.task, ids=ep.ids, turn_of=[x if x in ts else -1 for x in ep.turn_of])
                                                     for ep, ts in pieces.values()], opt2, cfg)
            n += 1
        done.append(n)
    assert steps == done and sum(done) >= 3 and len(buf) == len(pending)
    torch.testing.assert_close(weights(student), weights(student2), atol=1e-6, rtol=1e-5)


def test_four_rollouts_of_16_rows_make_exactly_one_step(tmp_path):
    counts = {}
    for mode in ("buffer", "rollout"):  # F2B held at depth 1 (eta 1000): 16 one-turn episodes, 16 turn-rows a rollout
        args = small_args(tmp_path / mode, "tiny-student", "tiny-teacher", steps=4, tasks_per_step=16, eta=1000,
                          turns_per_update=64, update_from=mode, eval=False, save_every=10, max_turns=3)
        tcod.main(args)
        counts[mode] = [(r["updates"], r.get("buffer_rows")) for r in rundir.read_metrics(os.path.join(args.out, "metrics.jsonl"))]
    assert counts["buffer"] == [(0, 16), (0, 32), (0, 48), (1, 0)]  # the authors' trainer: one step per 64 rows
    assert counts["rollout"] == [(1, None)] * 4  # per-rollout grouping: 4 steps of 16


def test_resume_with_a_partly_filled_buffer_equals_the_uninterrupted_run(model_dirs, tmp_path):
    student, teacher = model_dirs
    # F2B with 4 tasks a step: 4, 8, 8 rows at depth 1, 2, 2; 5 rows a step leave rows waiting at the step-2 checkpoint
    kw = dict(update_from="buffer", turns_per_update=5, tasks_per_step=4, eval=False)
    tcod.main(small_args(tmp_path / "whole", student, teacher, steps=3, **kw))
    tcod.main(small_args(tmp_path / "cut", student, teacher, steps=2, **kw))
    state = torch.load(os.path.join(tmp_path / "cut" / "run", "ckpt", "trainer.pt"), weights_only=False)
    assert state["buffer"]["rows"], "the checkpoint must hold a partly filled buffer, or nothing was tested"
    tcod.main(small_args(tmp_path / "cut", student, teacher, steps=3, resume=True, **kw))
    a, b = (rundir.read_metrics(os.path.join(tmp_path / d / "run", "metrics.jsonl")) for d in ("whole", "cut"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2] and a[-1]["updates"] > 0
    for ra, rb in zip(a, b):
        assert (ra["updates"], ra["buffer_rows"]) == (rb["updates"], rb["buffer_rows"])
        for key in ("traj_kl", "loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    from transformers import AutoModelForCausalLM

    wa, wb = (AutoModelForCausalLM.from_pretrained(os.path.join(tmp_path / d / "run", "ckpt")).state_dict() for d in ("whole", "cut"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-7, rtol=1e-5) for k in wa)


# --------------------------------------------------------------------------------------------------
# data parallelism: every rank holds the whole buffer and trains its share of each step's pieces


def buffer_run(student_dir, teacher_dir, rollouts, aggregation, dist=None):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)  # the weights move by exactly the clipped gradient
    cfg = tcod.update_config(tcod.Args(micro_batch=2, aggregation=aggregation, grad_clip=0.05, turns_per_update=5))
    buf, updates, norms = buffer.TurnBuffer(5), [], []
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    for j, episodes in enumerate(rollouts):
        out, gathered, _ = buffer.update(buf, j, student, teacher, episodes[rank::world], opt, cfg, dist)
        assert len(gathered) == len(episodes)
        updates.append(out["updates"])
        norms.append(out["grad_norm"])
    return {"params": torch.cat([p.detach().flatten() for p in student.parameters()]), "updates": updates, "norms": norms,
            "left": len(buf)}


def rank_buffer(rank, world, port, student_dir, teacher_dir, rollouts, aggregation, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist = dist_mod.Dist()
    result = buffer_run(student_dir, teacher_dir, rollouts, aggregation, dist)
    if rank == 0:
        torch.save(result, out)
    dist.close()


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_two_gloo_ranks_drain_the_buffer_as_one_process(model_dirs, chat, tmp_path, aggregation):
    student, teacher = model_dirs
    from transformers import AutoModelForCausalLM

    sampler = AutoModelForCausalLM.from_pretrained(student)
    # 5 and 4 episodes of different lengths: uneven shares, steps that split episodes, rows that wait
    rollouts = [play(sampler, chat, [f"train-{i}" for i in range(5)], max_turns=4, seed=3),
                play(sampler, chat, [f"train-{i}" for i in range(10, 14)], max_turns=3, seed=4)]
    single = buffer_run(student, teacher, rollouts, aggregation)
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.spawn(rank_buffer, args=(2, free_port(), student, teacher, rollouts, aggregation, out), nprocs=2)
    ranks = torch.load(out)
    assert ranks["updates"] == single["updates"] and sum(single["updates"]) >= 3 and ranks["left"] == single["left"]
    assert min(single["norms"]) > 0.05  # the clip is active, so the global norm (not a rank's) must be used
    assert ranks["norms"] == pytest.approx(single["norms"], rel=1e-4)
    torch.testing.assert_close(ranks["params"], single["params"], atol=1e-6, rtol=1e-4)
