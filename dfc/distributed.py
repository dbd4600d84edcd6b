"""Where a training step takes its batch statistics: in one process, or over data-parallel workers.

A BatchTopK crosscoder's step is not a sum of per-token terms. Which entries are active depends on the whole
batch (its best k·B scores), and so do the outlier cut (the batch's median norm), AuxK's normalisation (the
residual's variance over the batch), the dead-feature counters and the metrics. :class:`SingleProcess` takes
those statistics when one process holds the whole batch (the trainer's default). :class:`DataParallel` takes the
same statistics over N workers with ``torch.distributed`` collectives (gloo on CPU, NCCL on GPU), so workers that
each hold rows ``r::N`` of a global batch take the step one worker takes on the whole batch, up to float rounding:

- BatchTopK: each worker sends its best k·B scores; every worker finds the same global cut and keeps its own
  entries above it, so the sparse kernels run unchanged on each worker's rows;
- loss terms are divided by the global token count, so summed (all-reduced) gradients are the one-worker gradient;
- the outlier cut, AuxK's variance, fired features, token counts and metrics are all-reduced;
- the first batch (scales, ``b_dec``) is gathered whole and every worker initialises from the same seed.

Starting the processes is the caller's job (``torch.multiprocessing`` in a notebook or a test): this module needs
only an initialised default process group (:func:`process_group`). The pipeline runs each worker in one of its own
Ray actors (``workers/pipeline/actors.py``), not in Ray Train's ``TorchTrainer``: the train stage already reserves
placement groups shared with the seed ensemble, polls progress, cancels, and checkpoints to and resumes from the
audit's store, and TorchTrainer would bring a second placement group, checkpoint store and run lifecycle of its
own. Its ``prepare_model`` (DDP) does not fit this trainer's sparse step, which never calls ``forward``; without it,
what TorchTrainer would add is the process-group set-up, a few lines here.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from dfc.sparse import batch_topk, sort_entries

if TYPE_CHECKING:
    from dfc.crosscoder import Crosscoder, EncoderScores

__all__ = ["DataParallel", "SingleProcess", "free_port", "init_process_group", "process_group"]

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("DFC_COLLECTIVE_TIMEOUT_S", "7200")))
"""How long a worker waits in a collective. Long, because the other workers wait in the next step's first
collective while rank 0 uploads a checkpoint (tens of GB at paper scale); a dead worker is noticed by the
driver, which stops the rest, long before this."""


def free_port() -> int:
    """A TCP port that is free on this host now (for rank 0's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_process_group(address: str, rank: int, world_size: int, device: str) -> DataParallel:
    """Join the process group whose rank 0 listens on ``address`` (``host:port``): NCCL for CUDA, gloo otherwise."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        # A Ray actor sees only its own GPUs, so plain "cuda" is its first one.
        torch.cuda.set_device(torch.device(device).index or 0)
    dist.init_process_group(
        backend, init_method=f"tcp://{address}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    return DataParallel(device)


@contextmanager
def process_group(address: str, rank: int, world_size: int, device: str) -> Iterator[DataParallel]:
    """:func:`init_process_group` for the ``with`` block, left together on success and at once on an error.

    The closing barrier matters: a gloo worker that tears down while a peer is already gone can abort its whole
    process ("terminate called without an active exception"). After an error there is no barrier, since the
    peers may never reach it.
    """
    parallel = init_process_group(address, rank, world_size, device)
    try:
        yield parallel
        dist.barrier()
    finally:
        dist.destroy_process_group()


class SingleProcess:
    """One process holds the whole batch: every batch statistic is local."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_writer(self) -> bool:
        """Whether this worker writes checkpoints, final weights and progress (rank 0)."""
        return self.rank == 0

    def whole(self, x: Tensor) -> Tensor:
        """The whole batch of which ``x`` holds this worker's rows, in the one-worker row order."""
        return x

    def inliers(self, norm_a: Tensor, norm_b: Tensor, factor: float) -> tuple[Tensor, int]:
        """Which of this worker's tokens are within ``factor`` × the batch's median norm in both models, and how many
        such tokens the whole batch has."""
        keep = (norm_a <= factor * norm_a.median()) & (norm_b <= factor * norm_b.median())
        return keep, int(keep.sum())

    def mean(self, values: Tensor, n: int) -> Tensor:
        """Mean over the whole batch's ``n`` tokens of per-token ``values`` (this worker's share of it)."""
        return values.mean()

    def centred_squares(self, tensors: Sequence[Tensor], n: int) -> list[Tensor]:
        """``Σ ‖t − mean(t)‖²`` over the whole batch's ``n`` rows, for each ``(rows, d)`` tensor."""
        return [(t - t.mean(0)).pow(2).sum() for t in tensors]

    def select(self, model: Crosscoder, scores: EncoderScores, k: float, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """BatchTopK over the whole batch: this worker's active (rows, cols) and the minimum kept scores."""
        return model.select(scores, k)

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the workers, in place."""
        return tensor

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the parameters' gradients over the workers."""

    def agree(self, value: int, what: str) -> int:
        """``value``, checked to be the same on every worker."""
        return value


class DataParallel(SingleProcess):
    """This worker holds rows ``rank::world_size`` of every global batch; statistics go through the default group."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        if not dist.is_initialized():
            raise RuntimeError("no torch.distributed process group; call dfc.distributed.init_process_group first")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)  # where tensors of the group's own messages live (CUDA for NCCL)

    def _gather(self, x: Tensor) -> Tensor:
        """``(world_size, *x.shape)``: every worker's ``x`` (same shape on each)."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    def whole(self, x: Tensor) -> Tensor:
        # Worker r holds global rows r, r + N, r + 2N, …: interleaving restores the one-worker order.
        return self._gather(x).transpose(0, 1).reshape(-1, *x.shape[1:])

    def inliers(self, norm_a: Tensor, norm_b: Tensor, factor: float) -> tuple[Tensor, int]:
        norms = self.whole(torch.stack([norm_a, norm_b], dim=1))
        all_a, all_b = norms[:, 0].contiguous(), norms[:, 1].contiguous()
        limit_a, limit_b = factor * all_a.median(), factor * all_b.median()
        n = int(((all_a <= limit_a) & (all_b <= limit_b)).sum())
        return (norm_a <= limit_a) & (norm_b <= limit_b), n

    def mean(self, values: Tensor, n: int) -> Tensor:
        return values.sum() / n

    def centred_squares(self, tensors: Sequence[Tensor], n: int) -> list[Tensor]:
        sums = self.sum_(torch.cat([t.sum(0) for t in tensors]))
        means = (sums / n).split([t.shape[1] for t in tensors])
        squares = self.sum_(torch.stack([(t - m).pow(2).sum() for t, m in zip(tensors, means, strict=True)]))
        return list(squares.unbind())

    def select(self, model: Crosscoder, scores: EncoderScores, k: float, n: int) -> tuple[Tensor, Tensor, Tensor]:
        # Mirrors Crosscoder.select (same groups, same budgets over the whole batch's n tokens), with the cut of
        # each group found over all workers. Entries tied with the cut are all kept (one worker keeps an arbitrary
        # subset of them); on real activations a tie at the cut does not happen.
        c = model.config
        full = scores.scores
        designated = slice(c.n_a_only, c.n_a_only + c.n_designated)
        groups: list[tuple[Tensor, int, int]] = [(full, 0, 0)]
        if c.n_designated:
            free = full.clone()
            free[:, designated] = 0
            groups = [(free, 0, 0), (full[:, designated], designated.start, 1)]
        budgets = model._k_budgets(k, n)
        # A worker's best `budget` scores hold every one of its entries that is in the global best `budget`.
        candidates = []
        for sub, _, slot in groups:
            local = sub.reshape(-1)
            best = local[batch_topk(sub, min(budgets[slot], local.numel()))]
            candidates.append(torch.nn.functional.pad(best, (0, budgets[slot] - best.numel()), value=-torch.inf))
        pool = self._gather(torch.cat(candidates))
        rows_all, cols_all, mins = [], [], torch.zeros(2)
        start = 0
        for sub, offset, slot in groups:
            budget = budgets[slot]
            if budget <= 0:
                continue
            kept = pool[:, start : start + budget].reshape(-1).topk(budget).values
            start += budget
            cut = float(kept.min())
            positive = kept[kept > 0]  # a non-positive score is ReLU'd away: not an active feature
            if positive.numel():
                mins[slot] = positive.min()
            rows, cols = (sub >= cut if cut > 0 else sub > 0).nonzero(as_tuple=True)
            rows_all.append(rows)
            cols_all.append(cols + offset)
        if not rows_all:
            empty = torch.empty(0, dtype=torch.long, device=full.device)
            return empty, empty, mins
        rows, cols = torch.cat(rows_all), torch.cat(cols_all)
        order = sort_entries(rows, cols, c.n_features)
        return rows[order], cols[order], mins

    def sum_(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor)
        return tensor

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        for p in params:
            if p.grad is None:  # every worker must join every all-reduce, in the same order
                p.grad = torch.zeros_like(p)
        handles = [dist.all_reduce(p.grad, async_op=True) for p in params]
        for handle in handles:
            if handle is not None:
                handle.wait()

    def agree(self, value: int, what: str) -> int:
        values = self._gather(torch.tensor([value], dtype=torch.long, device=self.device)).reshape(-1).tolist()
        if len(set(values)) > 1:
            raise RuntimeError(
                f"the data-parallel workers disagree on {what} ({values} by rank); they must all start from the "
                "same stored state: run the audit again"
            )
        return value
