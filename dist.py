"""Data parallelism for tcod.py: `torchrun --nproc-per-node N tcod.py ...` (NCCL on GPUs, Gloo on CPU).

Each rank plays its share of a step's tasks. The loss weights are normalized by the count over all ranks (kl.py's
loss_weights with total=) and the gradients summed, so the update equals one process's on all the episodes;
episodes and per-token KL are gathered so that every rank computes the same metrics and curriculum depth, and
rank 0 writes. Without torchrun (WORLD_SIZE unset or 1) none of this runs.
"""

from __future__ import annotations

import os

import torch

import kl


class Dist:
    """Each rank plays its share of the step's tasks; gradients are summed, metrics gathered; rank 0 writes."""

    def __init__(self):
        import torch.distributed as td

        self.td = td
        self.cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if self.cuda else torch.device("cpu")
        if self.cuda:  # before the group: NCCL's collectives, and anything else, run on the current device
            torch.cuda.set_device(self.device)
        td.init_process_group("nccl" if self.cuda else "gloo")
        self.rank, self.world = td.get_rank(), td.get_world_size()

    @classmethod
    def from_env(cls) -> "Dist | None":
        return cls() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None

    def shard(self, items: list) -> list:
        return items[self.rank :: self.world]

    def sum(self, x: float) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        self.td.all_reduce(t)
        return t.item()

    def global_units(self, turns: list[torch.Tensor], aggregation: str) -> int:
        return round(self.sum(kl.count_units(turns, aggregation)))

    def sum_gradients(self, model) -> None:
        # One flat all-reduce after all micro-batches, rather than DDP's hooks on each backward: ranks hold
        # different numbers of micro-batches (episodes differ in length), and DDP needs the same on every rank.
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        self.td.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))

    def even_passes(self, batches: list) -> list:
        """This rank's micro-batches as they are: the gradients are summed once, after all of them, so ranks may run
        different numbers (fsdp.ShardedDist pads them: its collectives run in every pass)."""
        return batches

    def gather(self, obj) -> list:
        out = [None] * self.world
        self.td.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.td.barrier()

    def close(self) -> None:
        """Tear the process group down once every rank is done with it: a rank that destroys Gloo while another still
        talks to it can abort the other at exit ('terminate called without an active exception', seen in tests)."""
        if self.td.is_initialized():
            self.td.barrier()
            self.td.destroy_process_group()


def gather_episodes(dist: Dist | None, episodes: list, kl_tokens: list) -> tuple[list, list]:
    """All ranks' episodes and per-token KL, episode indices renumbered in rank order."""
    if dist is None:
        return episodes, kl_tokens
    all_episodes, all_tokens = [], []
    for eps, toks in dist.gather((episodes, kl_tokens)):
        all_tokens += [(i + len(all_episodes), *rest) for i, *rest in toks]
        all_episodes += eps
    return all_episodes, all_tokens
