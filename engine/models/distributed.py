"""Data-parallel training with ``torch.distributed`` (``torchrun``): what the trainers
need to run as one rank of N.

**Who holds what.** The interactions are sharded by user: rank ``r`` of ``N`` trains on
the users ``u`` (dense index) with ``u % N == r``. It reads only their rows when the data
is a sharded directory (``tandem data shard``, :mod:`engine.data.shards`), and keeps only
them otherwise (:func:`own_users`).

- **CF** (``engine.models.cf``) follows the data. A user's row of the user table is
  touched by that user's interactions only, so each rank holds just its users' rows
  (row-wise sharding, as TorchRec's, along the data's partition): no communication for
  them, and ``1/N`` of the table's memory. The item table, the item biases and the
  global mean are replicated in PyTorch's ``DistributedDataParallel``, whose backward
  *sums* their gradients over the ranks (:func:`summing_data_parallel`): each rank's
  loss is its share of the global batch's cost, so the sum is the cost's gradient.
- **The towers** (``engine.models.towers``) are small networks, replicated in
  ``DistributedDataParallel`` with its default mean of the ranks' gradients; their
  feature pipelines are fitted on sums over the ranks (``engine.models.features``), so
  they too need only the rank's users' interactions.

Every rank's Adam then takes the same step on the replicated parameters, and
:func:`check_replicas` confirms at the end that they are equal. Statistics of the whole
data (item counts, the number of ratings, validation sums) are sums over the ranks
(:func:`total`, :func:`total_array`); the ranks take the same number of steps per epoch,
each covering its own rows once. Only rank 0 shows progress, gathers the user rows
(:func:`gather_to_first`) and writes files.

Started by ``torchrun --nproc_per_node N -m engine train-cf --distributed`` (or
``train-towers``, or ``train``: ``make train DIST=N``): the process group comes from
torchrun's environment (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os

import numpy as np

_alone = False  # inside alone(): this process trains as if it were the only one


def world() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` outside a process group (or inside :func:`alone`)."""
    import torch.distributed as dist

    if not _alone and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def alone():
    """Train as one process within a process group: what rank 0 trains by itself (the
    ranker's rating model, ``index_builder.ranker``) must not wait for the other ranks."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


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
        # A process that exits with its group alive can abort (SIGABRT) in interpreter
        # finalisation: gloo's worker threads still hold tensors whose release needs the
        # GIL. The group is destroyed while the interpreter is whole.
        atexit.register(_leave_group)
    return world()


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def exit_together(code: int) -> int:
    """End a rank of a finished command: once every rank has got here (a barrier), leave
    the group, flush the output and end the process at once with ``code``. Outside a
    process group, just ``code``.

    Why not a normal exit: gloo's threads can outlive the group into interpreter
    finalisation, where a thread's destructor aborts the process (SIGABRT, "terminate
    called without an active exception"), and torchrun then fails the whole job although
    every rank's work is done and saved. Leaving the group at exit (``_leave_group``) made
    it rare, not impossible: a rank that finished first still aborted now and then. Here
    no rank exits while another still works, and none goes through finalisation.
    """
    import logging
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return code
    barrier()
    _leave_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def owned(user_idx: np.ndarray) -> np.ndarray:
    """``[n]`` bool: which of these users (dense indices) this rank trains: ``u % N == rank``."""
    rank, size = world()
    return np.ones(len(user_idx), bool) if size == 1 else (np.asarray(user_idx) % size == rank)


def own_users(dataset):
    """``dataset`` restricted to this rank's users (itself on one process, or when it
    holds no other user's rows: a rank's parts of a sharded directory)."""
    mask = owned(dataset.user_idx)
    return dataset if mask.all() else dataset.subset(mask, name=f"{dataset.name} (rank {world()[0]})")


def n_owned(n_users: int) -> int:
    """How many of ``n_users`` users this rank holds: ``len(range(rank, n_users, N))``."""
    rank, size = world()
    return len(range(rank, n_users, size))


def sizes(n: int) -> list[int]:
    """Every rank's ``n``, in rank order."""
    import torch
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return [n]
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(out, torch.tensor([n], dtype=torch.int64))
    return [int(t[0]) for t in out]


def epoch_steps(n_rows: int, batch_size: int) -> tuple[list[int], list[int]]:
    """How this rank cuts its ``n_rows`` shuffled rows into an epoch's batches:
    ``(bounds, step_rows)``, batch ``s`` being rows ``bounds[s]:bounds[s + 1]`` and
    ``step_rows[s]`` the rows of step ``s`` on all ranks together. One process: batches
    of ``batch_size``. N: as many steps on every rank as the rank with the most rows
    needs at ``batch_size / N`` rows a batch, each rank's rows cut evenly into them (the
    ranks hold different numbers of rows)."""
    rank, size = world()
    if size == 1:
        bounds = [*range(0, n_rows, batch_size), n_rows]
        return bounds, np.diff(bounds).tolist()
    counts = sizes(n_rows)
    per_rank = max(1, batch_size // size)
    steps = max(1, *(math.ceil(n / per_rank) for n in counts))
    cuts = [[n * s // steps for s in range(steps + 1)] for n in counts]
    return cuts[rank], [sum(c[s + 1] - c[s] for c in cuts) for s in range(steps)]


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


def summing_data_parallel(module):
    """``module`` in ``DistributedDataParallel`` whose backward *sums* the gradients over
    the ranks (DDP's default averages them): for a loss whose ranks' values add up to the
    cost, as CF's shares of a batch do. ``module`` itself on one process."""
    _, size = world()
    if size == 1:
        return module
    import torch.distributed as dist

    wrapped = data_parallel(module)

    def all_reduce_sum(state, bucket):
        future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return future.then(lambda done: done.value()[0])

    wrapped.register_comm_hook(None, all_reduce_sum)
    return wrapped


def total(value: float) -> float:
    """The sum of a number over the ranks."""
    return float(total_array(np.array([value]))[0])


def total_array(values: np.ndarray, op: str = "sum") -> np.ndarray:
    """Elementwise ``op`` (``"sum"``, ``"min"`` or ``"max"``) of an array over the ranks,
    as float64."""
    import torch
    import torch.distributed as dist

    values = np.asarray(values, np.float64)
    if world()[1] == 1:
        return values
    t = torch.from_numpy(values.copy())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.numpy()


def value_range(values: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of the values on every rank (as floats; ``(inf, -inf)`` for none)."""
    values = np.asarray(values)
    lo = float(values.min()) if len(values) else math.inf  # (no float64 copy of the values)
    hi = float(values.max()) if len(values) else -math.inf
    return float(total_array(np.array([lo]), "min")[0]), float(total_array(np.array([hi]), "max")[0])


def gather_to_first(array: np.ndarray) -> list[np.ndarray] | None:
    """Every rank's ``array`` (the same dtype and trailing shape, any length), in rank
    order, on rank 0; None on the others."""
    import torch
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return [array]
    lengths = sizes(len(array))
    padded = np.zeros((max(lengths), *array.shape[1:]), array.dtype)
    padded[: len(array)] = array
    tensor = torch.from_numpy(padded)
    chunks = [torch.empty_like(tensor) for _ in range(size)] if rank == 0 else None
    dist.gather(tensor, chunks, dst=0)
    return None if chunks is None else [c.numpy()[:n] for c, n in zip(chunks, lengths)]


def barrier() -> None:
    """Wait until every rank gets here: a rank that is done must not tear the group down
    (or exit) while another still exchanges with it."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


def check_replicas(tensors: dict) -> None:
    """Raise when a replicated parameter differs between the ranks (it never should:
    DistributedDataParallel gives every rank the same gradients and the same steps)."""
    if world()[1] == 1:
        return
    for name, tensor in tensors.items():
        values = tensor.detach().cpu().double().numpy()
        if not np.array_equal(total_array(values, "min"), total_array(values, "max")):
            raise RuntimeError(f"the ranks' replicas of {name} differ: distributed training went out of step")
