"""Data-parallel learner: ``W`` copies of the policy that take the same optimizer step.

Every rank receives the whole scored batch, applies the same lag filter and the same k-sample
baselines, and runs forward/backward on its own contiguous share of the kept captions
(:meth:`DataParallelGroup.shard`), each loss weighted by the share of the *batch's* tokens it
covers. Summing the gradients over ranks (:meth:`all_reduce_grads`) then gives the gradient of the
whole batch's loss, so every rank's AdamW takes the same step and the copies stay identical
(tested against one learner). The ranks' detached per-token outputs are gathered
(:meth:`gather_rows`) so that every rank computes the batch's statistics.

The group is a ``torch.distributed`` process group: gloo on CPUs, NCCL on GPUs. No Ray here: the
learner actor (:mod:`learner.actor`) starts the other ranks as Ray actors and hands each the
rendezvous address.
"""
from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DataParallelGroup", "free_port", "shard_slices"]

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that does not reach a collective fails the others after this


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (for the rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def shard_slices(b: int, world: int) -> list[slice]:
    """``world`` contiguous row slices of a ``b``-row batch, sizes differing by at most one
    (the first ``b % world`` one larger); some are empty when ``b < world``."""
    base, extra = divmod(b, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append(slice(start, stop))
        start = stop
    return out


class DataParallelGroup:
    """One rank's membership of the learner group.

    Args:
        rank, world: this rank and the number of ranks (rank 0 publishes weights, evaluates and
            writes checkpoints).
        init_method: rendezvous URL, e.g. ``tcp://127.0.0.1:29500`` (rank 0 listens there).
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors).
    """

    def __init__(self, rank: int, world: int, init_method: str, backend: str = "gloo"):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a group of {world}")
        self.rank, self.world = int(rank), int(world)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        if dist.is_initialized():
            raise RuntimeError("this process is already in a torch.distributed group; one learner rank per process")
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world,
                                timeout=TIMEOUT)

    def shard(self, b: int) -> slice:
        """This rank's rows of a ``b``-row batch."""
        return shard_slices(b, self.world)[self.rank]

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks, in place. A parameter no rank has a gradient
        for keeps ``grad=None`` (so AdamW leaves it alone, as with one learner); one that only some
        ranks have (a rank with no rows) counts as zero on the others."""
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has)
        live = [p for p, n in zip(params, has.tolist()) if n > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not live:
            return
        flat = torch.cat([p.grad.reshape(-1).to(self.device, torch.float32) for p in live])
        dist.all_reduce(flat)
        offset = 0
        for p in live:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def gather_rows(self, local: Tensor, b: int) -> Tensor:
        """``[b, ...]``: every rank's ``local`` rows (its :meth:`shard` of ``b``) in row order."""
        slices = shard_slices(b, self.world)
        width = max(s.stop - s.start for s in slices)
        padded = local.new_zeros((width,) + tuple(local.shape[1:]))
        padded[: local.shape[0]] = local
        padded = padded.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: s.stop - s.start] for p, s in zip(parts, slices)]).to(local.device)

    def broadcast_(self, tensors: list[Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values."""
        with torch.no_grad():
            for t in tensors:
                buf = t.detach().to(self.device)
                dist.broadcast(buf, src=0)
                t.copy_(buf.to(t.device))
