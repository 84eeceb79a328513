"""Data-parallel training across processes with ``torch.distributed``.

``torchrun --nproc-per-node N -m piarec train ...`` (or ``piarec train --nproc-per-node N``,
which starts it) runs N copies of the trainer: NCCL between GPUs, gloo between CPU
processes. The reference every rank count must reproduce is one process over the same
global batches (docs/training-scale.md):

- one global permutation of the training users per pass, the same on every rank (the
  run's seeded generator); each global batch is cut from it as in one process;
- rank r holds the users whose index is r mod N (its shard) and, of each global batch, works
  on those; its loss terms are means over its users times ``n_local / n_global``, so the
  summed gradient is the global batch's;
- input masks and reparameterisation noise are keyed by (seed, pass, user)
  (:mod:`piarec.models.noise`), so a user draws the same wherever it is trained;
- each parameter's gradient is summed over the ranks (an asynchronous all-reduce) as soon as
  backward has finished it, so the decoder's sums travel while the encoder's gradients are
  still being computed; a last small all-reduce carries the loss parts. Every rank then takes
  the same optimizer step, so the parameters stay equal without a broadcast.

Gradients are reduced by hand rather than by ``DistributedDataParallel``: RecVAE's phases
switch ``requires_grad`` between updates and Multi-VAE leaves the anchors without a gradient
when PIA is off, both of which DDP's fixed buckets refuse. The overlap is DDP's; the buckets
are the parameters themselves (a few large tensors).

Rank 0 evaluates on the validation users, logs and writes the checkpoint; every rank
restores from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ranks", "ranks_from_env", "join", "stop", "all_reduce_sum", "summed_gradients", "broadcast_object", "local_device"]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def ranks_from_env(environ=os.environ) -> Ranks:
    """The ranks torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process without them."""
    world = int(environ.get("WORLD_SIZE", "1"))
    return Ranks(int(environ.get("RANK", "0")), world, int(environ.get("LOCAL_RANK", "0")))


def local_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The GPU of this rank (``cuda:LOCAL_RANK``) when training on GPUs, else ``device``."""
    if device.type == "cuda" and ranks.parallel:
        torch.cuda.set_device(ranks.local_rank)
        return torch.device("cuda", ranks.local_rank)
    return device


def join(ranks: Ranks, device: torch.device) -> None:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); no-op for one process."""
    if ranks.parallel and not dist.is_initialized():
        # torch._dynamo, which the first optimizer step imports, holds on to a process group that
        # exists when it is first imported: destroy_process_group then cannot free the group, its
        # worker threads outlive the interpreter, and one that drops its last finished work while
        # Python shuts down aborts the process (SIGABRT, "terminate called without an active
        # exception"). Imported before the group exists, it holds nothing and :func:`stop` joins
        # the threads.
        import torch._dynamo  # noqa: F401

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (unchanged for one process)."""
    if ranks.parallel:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@contextmanager
def summed_gradients(params: Iterable[torch.nn.Parameter], ranks: Ranks) -> Iterator[None]:
    """Around one backward: sum each of ``params``' gradients over the ranks, in place, as soon
    as backward has accumulated it (an asynchronous all-reduce per parameter, overlapping the
    rest of backward); on exit every sum has arrived. No-op for one process.

    Every rank must run the same backward, so the hooks fire, and the all-reduces are issued,
    in the same order everywhere; a parameter that gets no gradient is skipped on every rank."""
    if not ranks.parallel:
        yield
        return
    pending: list[dist.Work] = []

    def reduce(p: torch.Tensor) -> None:
        pending.append(dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True))

    hooks = [p.register_post_accumulate_grad_hook(reduce) for p in params if p.requires_grad]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for work in pending:
            work.wait()


def broadcast_object(obj, ranks: Ranks):
    """Rank 0's ``obj`` on every rank (``obj`` itself for one process)."""
    if not ranks.parallel:
        return obj
    box = [obj if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
