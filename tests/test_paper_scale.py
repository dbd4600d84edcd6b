"""The paper-scale plan's arithmetic and the training-speed benchmark's harness, checked against the real code.

The memory model must predict the measured peak of real CPU training steps; the stored bytes per token
must be what a shard holds; the dense baseline's whole run must be the same training as the sparse
trainer's; and the ``--paper-scale`` code path must run through the same functions at a tiny shape.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import pytest
import torch

from benchmarks.dense_run import DenseTrainer
from benchmarks.memory_model import check_training_peak, parameter_shapes
from benchmarks.paper_scale import Audit, Cluster, hours_table, shard_bytes_per_token
from benchmarks.run_timing import Shape, runs_in_turns, whole_run
from benchmarks.train_speed import paper_scale, run_paper_scale
from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.trainer import TrainConfig, Trainer
from workers.activations.shards import ShardData, ShardWriter
from workers.storage.local import LocalStore

TINY = Shape(d_a=32, d_b=48, n_features=512, k=8, batch=128)


@pytest.mark.parametrize(
    "config",
    [
        CrosscoderConfig(d_a=16, d_b=24, n_features=200, k=4, architecture="standard"),
        CrosscoderConfig(d_a=16, d_b=16, n_features=200, k=4, architecture="dsf"),
        CrosscoderConfig(d_a=16, d_b=24, n_features=200, k=4, architecture="dsf"),
        CrosscoderConfig(d_a=16, d_b=24, n_features=200, k=4, architecture="dfc", a_only=0.1, b_only=7),
    ],
    ids=["standard", "dsf-tied", "dsf-untied", "dfc"],
)
def test_parameter_shapes_are_the_crosscoders_own(config: CrosscoderConfig) -> None:
    model = Crosscoder(config)
    assert parameter_shapes(config) == {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "options", [{}, {"dead_after_tokens": 10**12}, {"bf16": True}], ids=["auxk", "no-dead-features", "bf16"]
)
def test_memory_model_predicts_the_measured_peak_of_a_training_step(options: dict) -> None:
    check = check_training_peak(128, 192, 8192, 16, 512, **options)
    assert (check.n_dead > 0) == ("dead_after_tokens" not in options)
    # The components the model cannot get wrong by much are most of the bytes; the phases decide the rest.
    assert 0.93 < check.ratio < 1.07, (check.measured, check.predicted)


def test_stored_bytes_per_token_are_what_a_written_shard_holds(tmp_path: Path) -> None:
    n, d = 3000, 96
    # The dtypes extraction hands the writer (workers/activations/extract.py).
    shard = ShardData(
        activations=torch.randn(n, d),
        token_ids=torch.arange(n, dtype=torch.int32),
        doc_ids=torch.zeros(n, dtype=torch.int64),
        offsets=torch.zeros(n, 2, dtype=torch.int32),
        positions=torch.arange(n, dtype=torch.int32),
        special_mask=torch.zeros(n, dtype=torch.bool),
    )
    entry = ShardWriter(LocalStore(tmp_path), "acts").write_shard(shard)
    predicted = n * shard_bytes_per_token(d)["total"]
    assert predicted <= entry.n_bytes < predicted + 1024  # the rest is the safetensors header


def test_one_gpu_reproduces_the_paper_reference_and_more_gpus_never_take_longer() -> None:
    audit = Audit()
    rows = hours_table(audit, Cluster(), kept_fraction=0.8, measured_gpu_tokens_per_s=None)
    assert [r["gpus"] for r in rows] == [1, 2, 4, 8, 16, 32]
    assert math.isclose(rows[0]["extraction_h"], audit.extraction_gpu_hours)
    assert math.isclose(rows[0]["training_h"], audit.training_gpu_hours)
    for before, after in itertools.pairwise(rows):
        assert after["extraction_h"] < before["extraction_h"]
        assert after["training_h"] <= before["training_h"]
        assert after["training_efficiency"] <= before["training_efficiency"] <= 1.0
        assert after["memory_per_gpu_bytes_sharded_optimizer"] < before["memory_per_gpu_bytes_sharded_optimizer"]


def test_the_dense_baseline_trains_exactly_like_the_sparse_trainer() -> None:
    """The baseline of the whole-run measure is the same training (annealing k, AuxK, counters), only dense."""
    config = TrainConfig(steps=40, dead_after_tokens=2 * TINY.batch, log_every=0)
    cc = CrosscoderConfig(d_a=TINY.d_a, d_b=TINY.d_b, n_features=TINY.n_features, k=TINY.k)
    sparse, dense = Trainer(Crosscoder(cc), config), DenseTrainer(Crosscoder(cc), config)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x_a, x_b = torch.randn(TINY.batch, TINY.d_a, generator=g), torch.randn(TINY.batch, TINY.d_b, generator=g)
        s, d = sparse.step(x_a, x_b), dense.step(x_a, x_b)
        assert (s.k, s.lr, s.dead_fraction, s.l0) == (d.k, d.lr, d.dead_fraction, d.l0)
        for name in ("loss_a", "loss_b", "aux_loss", "fvu_a", "fvu_b"):
            assert getattr(s, name) == pytest.approx(getattr(d, name), rel=1e-4), name
    assert s.k > TINY.k and s.aux_loss > 0  # still annealing, and AuxK was part of it


def test_a_whole_run_is_timed_with_its_checkpoints_annealing_and_auxk(tmp_path: Path) -> None:
    timing = whole_run(
        "dfc", TINY, device=torch.device("cpu"), bf16=False, steps=9, checkpoint_every=4,
        dead_after_tokens=TINY.batch, workdir=tmp_path,
    )
    assert (timing.steps, timing.tokens, timing.checkpoints) == (9, 9 * TINY.batch, 3)  # steps 4, 8 and the end
    assert timing.auxk_steps > 0 and 0 < timing.auxk_s < timing.annealing_steps_s + timing.settled_steps_s
    assert timing.checkpoint_s > 0 and timing.other_s >= 0
    assert not any(tmp_path.iterdir())  # the run's checkpoint is removed


def test_runs_taking_turns_each_count_only_their_own_time(tmp_path: Path) -> None:
    start = time.perf_counter()
    pair = runs_in_turns(
        TINY, device=torch.device("cpu"), bf16=False, steps=7, checkpoint_every=3, dead_after_tokens=TINY.batch,
        workdir=tmp_path,
    )
    wall = time.perf_counter() - start
    assert [(t.steps, t.checkpoints) for t in pair.values()] == [(7, 3), (7, 3)]
    assert all(t.seconds > 0 for t in pair.values())
    # One computes at a time: their own times add up to no more than the wall time of both.
    assert pair["dfc"].seconds + pair["dense_baseline"].seconds <= wall


def test_the_paper_scale_path_runs_through_the_same_function_at_a_tiny_shape(tmp_path: Path) -> None:
    result = paper_scale(
        TINY, device=torch.device("cpu"), bf16=False, repeats=1, steps=5, dead_after_tokens=TINY.batch,
        workdir=tmp_path,
    )
    for method in ("dfc", "dense_baseline"):
        assert result[method]["best_round"]["tokens_per_s"] > 0
        assert result[method]["run"]["steps"] == 5 and result[method]["run"]["checkpoints"] == 1
    assert result["dfc"]["predicted_memory_bytes"]["total"] > result["dfc"]["predicted_memory_bytes"]["weights"]
    assert set(result["speedup_vs_dense"]) == {"best_round", "run"}


def test_paper_scale_refuses_a_cpu_unless_scaled_down() -> None:
    args = argparse.Namespace(scaled_down=False, dead_after_tokens=None, repeats=1, workdir=None, out=Path("x"))
    with pytest.raises(SystemExit, match=r"needs a CUDA GPU.*--scaled-down"):
        run_paper_scale(args, torch.device("cpu"), {})
