"""The train stage's work: stream an audit's paired activations from storage into the DFC trainer, checkpoint to
storage, resume from the last stored checkpoint, and store the final crosscoder with its held-out evaluation.

Nothing here knows about Ray: the pipeline runs :func:`run_training` inside an actor (one per data-parallel worker,
see ``dfc/distributed.py``), a notebook can call it directly with any :class:`ObjectStore`.

Layout under ``out_prefix`` (``audits/{id}/crosscoder``): ``checkpoint/step-NNNNNNNN/…`` plus
``checkpoint/latest.json`` (the pointer, written after every file of the step, so a reader never sees half a
checkpoint), and ``final/model.safetensors`` + ``final/config.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from safetensors.torch import save as save_safetensors

from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.distributed import SingleProcess
from dfc.metrics import evaluate
from dfc.trainer import StepMetrics, TrainConfig, train
from workers.activations.pairing import PairedActivations, load_pairs, median_norms
from workers.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

CHECKPOINT_POINTER = "latest.json"
HELDOUT_FRACTION = 0.05
"""Share of the paired tokens (the corpus' last documents) kept out of training to evaluate on."""
MAX_HELDOUT = 262_144
"""At most this many held-out pairs: enough for stable FVE, cheap at any corpus size."""
_CURVE_POINTS = 200


class PairSplit(NamedTuple):
    """The paired index cut into a training part and a held-out tail."""

    train_key: str
    heldout_key: str
    n_train: int
    n_heldout: int


def split_pairs(store: ObjectStore, pairs_key: str, out_prefix: str, *, min_train: int = 1) -> PairSplit:
    """Hold out the pairs of the corpus' last documents (a contiguous tail in corpus order) for evaluation.

    A tail rather than a random sample keeps held-out documents out of training (at most one document
    straddles the cut), so the FVE measures generalisation, not memorisation.
    """
    a, b = load_pairs(store, pairs_key)
    n = len(a)
    n_heldout = min(max(1, int(n * HELDOUT_FRACTION)), MAX_HELDOUT)
    n_train = n - n_heldout
    if n_train < min_train:
        raise ValueError(
            f"only {n} token pairs after alignment, too few to train on batches of {min_train}; "
            "raise token_budget or lower training.batch_size"
        )
    prefix = out_prefix.rstrip("/")
    train_key, heldout_key = f"{prefix}/train-pairs.safetensors", f"{prefix}/heldout-pairs.safetensors"
    store.put_bytes(train_key, save_safetensors({"a": a[:n_train].contiguous(), "b": b[:n_train].contiguous()}))
    store.put_bytes(heldout_key, save_safetensors({"a": a[n_train:].contiguous(), "b": b[n_train:].contiguous()}))
    return PairSplit(train_key, heldout_key, n_train, n_heldout)


@dataclass(frozen=True)
class TrainingJob:
    """Everything one training run needs: keys in the store and resolved configs, never tensors."""

    prefix_a: str
    """Model A's activation prefix."""
    prefix_b: str
    """Model B's activation prefix."""
    train_key: str
    """Paired index to train on."""
    n_train: int
    """Pairs in it."""
    heldout_key: str
    """Paired index to evaluate on."""
    n_heldout: int
    """Pairs in it."""
    out_prefix: str
    """Where checkpoints and the final crosscoder go (``audits/{id}/crosscoder``)."""
    model: CrosscoderConfig
    """The dictionary to train."""
    train: TrainConfig
    """The recipe (steps, lr, device, checkpoint interval…)."""
    batch_size: int
    """Token pairs per step."""
    seed: int
    """Seed of the data order."""
    scratch_dir: str
    """Local folder for the checkpoint the trainer writes before it is uploaded."""
    norm_batches: int = 8
    """Batches over which the median activation norms (the normalisation scales) are estimated."""
    eval_batches: int = 64
    """Held-out batches evaluated at the end, at most."""


@dataclass(frozen=True)
class TrainingOutcome:
    """What the train stage records in its manifest."""

    final_prefix: str
    steps: int
    tokens: int
    """Token pairs that counted towards the loss (outliers excluded), including the runs before a resume."""
    resumed_from_step: int
    wall_time_s: float
    """Training time of this run (a resumed run does not know the earlier runs' time)."""
    scale_a: float
    scale_b: float
    final_dead_fraction: float | None
    """Share of features that had not fired within the dead window at the last step."""
    heldout: dict[str, float]
    """fve_a, fve_b, l0, dead_fraction (never fired) and tokens on the held-out pairs."""
    loss_curve: list[dict[str, float]]
    """Up to 200 evenly spaced steps of this run: step, loss, fve_a, fve_b, l0, dead_fraction."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def outcome_key(out_prefix: str) -> str:
    """Where a finished run records its outcome: its presence means the run's final weights are complete."""
    return f"{out_prefix.rstrip('/')}/outcome.json"


def upload_checkpoint(store: ObjectStore, local: Path, prefix: str) -> int:
    """Copy a trainer checkpoint folder to ``prefix/step-N/`` and point ``latest.json`` at it; return N."""
    step = int(json.loads((local / "trainer.json").read_text())["step"])
    step_prefix = f"{prefix}/step-{step:08d}"
    files = sorted(p.name for p in local.iterdir() if p.is_file())
    for name in files:
        store.upload_file(f"{step_prefix}/{name}", local / name)
    store.put_json(f"{prefix}/{CHECKPOINT_POINTER}", {"step": step, "prefix": step_prefix, "files": files})
    # Older steps are only dropped once the pointer has moved, so a crash never leaves no checkpoint.
    for key in list(store.list(f"{prefix}/step-")):
        if not key.startswith(step_prefix + "/"):
            store.delete(key)
    return step


def download_checkpoint(store: ObjectStore, prefix: str, local: Path) -> int:
    """Replace ``local`` with the checkpoint ``latest.json`` points at; return its step (0 when there is none)."""
    if local.exists():
        shutil.rmtree(local)  # storage is the truth: a local leftover may belong to an older attempt
    try:
        pointer = store.get_json(f"{prefix}/{CHECKPOINT_POINTER}")
    except ObjectNotFound:
        return 0
    partial = local.with_name(local.name + ".download")
    shutil.rmtree(partial, ignore_errors=True)
    for name in pointer["files"]:
        store.download_file(f"{pointer['prefix']}/{name}", partial / name)
    partial.rename(local)
    return int(pointer["step"])


def _curve(history: list[StepMetrics], steps: int) -> list[dict[str, float]]:
    every = max(1, steps // _CURVE_POINTS)
    return [
        {
            "step": m.step,
            "loss": m.loss,
            "fve_a": 1.0 - m.fvu_a,
            "fve_b": 1.0 - m.fvu_b,
            "l0": m.l0,
            "dead_fraction": m.dead_fraction,
        }
        for m in history
        if m.step % every == 0 or m is history[-1]
    ]


def run_training(
    job: TrainingJob,
    store: ObjectStore,
    *,
    progress: Callable[[StepMetrics], None] | None = None,
    parallel: SingleProcess | None = None,
) -> TrainingOutcome | None:
    """Train the job's crosscoder, resuming from the stored checkpoint, and store the final weights.

    Data-parallel (``parallel`` a :class:`~dfc.distributed.DataParallel`): every worker resumes from its own copy
    of the stored checkpoint and reads its rows of each batch; rank 0 alone writes checkpoints, the final weights
    and the outcome, and returns it (the other workers return ``None``).
    """
    parallel = parallel or SingleProcess()
    # Workers of one run may share a node: each keeps its own copy of the checkpoint.
    scratch = Path(job.scratch_dir if parallel.rank == 0 else f"{job.scratch_dir}.rank-{parallel.rank}")
    scratch.mkdir(parents=True, exist_ok=True)
    ckpt_prefix, final_prefix = f"{job.out_prefix}/checkpoint", f"{job.out_prefix}/final"
    resumed = download_checkpoint(store, ckpt_prefix, scratch / "ckpt")
    if resumed and parallel.is_writer:
        log.info("resuming training from the stored checkpoint at step %d", resumed)

    pairs = PairedActivations(
        store,
        job.prefix_a,
        job.prefix_b,
        job.train_key,
        batch_size=job.batch_size,
        # The buffer holds about a quarter of the data on small corpora, so batches never straddle epochs much.
        shuffle_buffer=min(65536, max(4 * job.batch_size, job.n_train // 4)),
        seed=job.seed,
        worker=parallel.rank,
        workers=parallel.world_size,
    )
    model = Crosscoder(job.model)
    with closing(pairs.global_batches()) as batches:  # the whole batches: the same scales on every worker
        model.set_scales(*median_norms(batches, job.norm_batches))

    result = train(
        model,
        pairs,
        job.train,
        checkpoint_dir=scratch / "ckpt",
        on_step=progress,
        on_checkpoint=lambda path: upload_checkpoint(store, path, ckpt_prefix),
        parallel=parallel,
    )
    if not parallel.is_writer:
        return None
    final_dir = scratch / "final"
    model.save_pretrained(final_dir)
    for path in sorted(final_dir.iterdir()):
        store.upload_file(f"{final_prefix}/{path.name}", path)

    batch = min(job.batch_size, job.n_heldout)
    heldout = PairedActivations(
        store, job.prefix_a, job.prefix_b, job.heldout_key, batch_size=batch, shuffle_buffer=batch, epochs=1
    )
    ev = evaluate(model, heldout, max_batches=job.eval_batches)
    history = result.history
    outcome = TrainingOutcome(
        final_prefix=final_prefix,
        steps=result.steps,
        tokens=result.tokens,
        resumed_from_step=resumed,
        wall_time_s=round(result.seconds, 3),
        scale_a=float(model.scale_a),
        scale_b=float(model.scale_b),
        final_dead_fraction=history[-1].dead_fraction if history else None,
        heldout={
            "fve_a": ev.fve_a,
            "fve_b": ev.fve_b,
            "l0": ev.l0,
            "dead_fraction": ev.dead_fraction,
            "tokens": ev.tokens,
        },
        loss_curve=_curve(history, job.train.steps),
    )
    store.put_json(outcome_key(job.out_prefix), outcome.to_dict())  # last: the run is complete
    return outcome

