"""Specification of data-parallel training: N gloo workers with the same global batch take the one-worker steps.

The workers are real processes (``torch.multiprocessing`` spawn, a gloo process group on loopback), as in the
pipeline, where each is a Ray actor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dfc.distributed import free_port, process_group
from dfc.trainer import TrainConfig, train
from tests.dfc.test_trainer import model, paired_batches

STEPS, CRASH_AT, BATCH = 40, 15, 64


def config() -> TrainConfig:
    # A dead window of 4 steps and early thresholds: AuxK, the dead counters and k annealing all engage.
    return TrainConfig(
        steps=STEPS, lr=3e-3, dead_after_tokens=4 * BATCH, k_anneal_steps=10, threshold_start_step=5, log_every=0
    )


def global_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = list(paired_batches(n, batch=BATCH, seed=11))
    for i, (x_a, _) in enumerate(batches):
        x_a[i % BATCH] *= 40.0  # one outlier token per batch: the outlier cut uses the whole batch's median
    return batches


def shard(batches, rank: int, world: int):
    return [(x_a[rank::world], x_b[rank::world]) for x_a, x_b in batches]


def _worker(rank: int, world: int, address: str, arch: str, out: str) -> None:
    """One data-parallel worker: a run that stops at CRASH_AT (its data runs out), then a resumed run to STEPS."""
    torch.set_num_threads(1)
    with process_group(address, rank, world, "cpu") as parallel:
        folder = Path(out) / f"rank-{rank}"
        batches = shard(global_batches(STEPS), rank, world)
        train(model(arch), batches[:CRASH_AT], config(), checkpoint_dir=folder / "ckpt", parallel=parallel)
        dist.barrier()  # rank 0 has written the checkpoint; every worker resumes from its own copy of it
        if rank:
            shutil.copytree(Path(out) / "rank-0" / "ckpt", folder / "ckpt")
        result = train(model(arch), batches, config(), checkpoint_dir=folder / "ckpt", parallel=parallel)
        torch.save({"state": result.model.state_dict(), "history": result.history}, Path(out) / f"result-{rank}.pt")


@pytest.mark.parametrize("arch", ["dfc", "dsf"])
def test_two_workers_with_the_same_global_batch_reach_the_weights_of_one_worker(arch, tmp_path):
    one = train(model(arch), global_batches(STEPS), config())
    assert any(m.aux_loss > 0 for m in one.history) and max(m.dead_fraction for m in one.history) > 0.1
    assert one.history[0].k > one.history[-1].k and float(one.model.thresholds[0]) > 0
    assert all(m.tokens < BATCH for m in one.history)  # outliers are cut

    mp.spawn(_worker, args=(2, f"127.0.0.1:{free_port()}", arch, str(tmp_path)), nprocs=2, join=True)

    results = [torch.load(tmp_path / f"result-{rank}.pt", weights_only=False) for rank in range(2)]
    for name, tensor in one.model.state_dict().items():
        # Every worker holds the same weights, and they are the one-worker weights up to float rounding.
        assert torch.equal(results[0]["state"][name], results[1]["state"][name]), name
        torch.testing.assert_close(results[0]["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    resumed = results[0]["history"]
    assert [m.step for m in resumed] == list(range(CRASH_AT, STEPS))  # the second run resumed at the checkpoint
    for mine, theirs in zip(resumed, one.history[CRASH_AT:], strict=True):
        assert (mine.tokens, mine.dead_fraction, mine.k) == (theirs.tokens, theirs.dead_fraction, theirs.k)
        assert mine.l0 == pytest.approx(theirs.l0) and mine.loss == pytest.approx(theirs.loss, rel=1e-4)
        assert mine.aux_loss == pytest.approx(theirs.aux_loss, rel=1e-4, abs=1e-6)
        assert mine.fvu_a == pytest.approx(theirs.fvu_a, rel=1e-4)
    # Only rank 0 writes checkpoints: rank 1's copy is still the one it resumed from.
    steps = {
        rank: json.loads((tmp_path / f"rank-{rank}" / "ckpt" / "trainer.json").read_text())["step"] for rank in (0, 1)
    }
    assert steps == {0: STEPS, 1: CRASH_AT}
