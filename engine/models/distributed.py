"""Data-parallel training with ``torch.distributed`` (``torchrun``): what the trainers
need to run as one rank of N.

Each rank keeps its shard of the interactions (every N-th of the fitting rows, the same
number on every rank) and a full replica of the parameters in PyTorch's
``DistributedDataParallel`` (:func:`data_parallel`): it broadcasts rank 0's parameters
at the start, and averages the gradients over the ranks during each backward pass, so
every rank's Adam takes the same step and the replicas stay equal. The embedding tables
are replicated with dense gradients — the simplest consistent scheme; its cost per step
is the size of the tables, which is what sharding the tables by row (TorchRec) would
cut. Validation runs on every rank over the same held-out rows, so early stopping
decides alike everywhere. Only rank 0 shows progress and writes files.

The ranks' batches together make one batch of the configured size, so an epoch takes as
many steps as on one process; the towers' in-batch softmax then draws a row's negatives
from its own rank's batch (batch size / N rows).

Started by ``torchrun --nproc_per_node N -m engine train-cf --distributed`` (or
``train-towers``, or ``train``: ``make train DIST=N``): the process group comes from
torchrun's environment (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment(device: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``); returns ``(rank, world size)``. Without them, one
    process: ``(0, 1)``."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return world()
    if not dist.is_initialized():
        cuda = device is not None and str(device).startswith("cuda") and torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    return world()


def shard(rows):
    """This rank's share of ``rows`` (an array of row numbers): every N-th from the rank's
    own on, ``len(rows) // N`` of them on every rank, so that all ranks take as many steps
    (at most N - 1 rows go unused); all of them on one process."""
    rank, size = world()
    return rows if size == 1 else rows[rank::size][: len(rows) // size]


def data_parallel(module):
    """``module`` in ``DistributedDataParallel`` when this process is one rank of N (its
    forward goes through the wrapper; its gradients are averaged over the ranks during
    backward); ``module`` itself on one process."""
    _, size = world()
    if size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module)


def loss_module(parameters: dict, loss):
    """A ``torch.nn.Module`` holding ``parameters`` (name -> Parameter) whose forward is
    ``loss(*args)``: how a trainer whose parameters are plain tables (CF) goes through
    :func:`data_parallel`."""
    import torch

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = torch.nn.ParameterDict(parameters)

        def forward(self, *args):
            return loss(*args)

    return Loss()


def total(value: float) -> float:
    """The sum of a number over the ranks."""
    import torch
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])
