"""Training a crosscoder from any iterator of paired activation batches (SCIENCE.md §2–4)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor

from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder, EncoderScores
from dfc.distributed import SingleProcess
from dfc.train_config import StepMetrics, TrainConfig, TrainResult

__all__ = [
    "PairedBatch", "StepMetrics", "TrainConfig", "TrainResult", "Trainer", "geometric_median", "make_adam", "train",
]

log = logging.getLogger(__name__)

PairedBatch = tuple[Tensor, Tensor]
"""Raw activations of model A and model B for the same tokens: ``(tokens, d_A)`` and ``(tokens, d_B)``."""


def geometric_median(points: Tensor, iterations: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm; robust to the outlier tokens that pull a mean around."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < eps * max(1.0, float(median.norm())):
            return new
        median = new
    return median


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel where torch has one: one pass over the dictionary instead of ~10."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


def _check_batch(x_a: Tensor, x_b: Tensor, config: CrosscoderConfig, index: int) -> None:
    """Reject malformed batches before they reach an optimiser step."""
    for name, x, d in (("A", x_a, config.d_a), ("B", x_b, config.d_b)):
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(
                f"batch {index}: model {name} activations have shape {tuple(x.shape)}, expected (tokens, {d})"
            )
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise ValueError(
                f"batch {index}: model {name} activations contain non-finite values in {bad} token(s); "
                "check the extraction dtype (fp16 overflow?) or filter those tokens"
            )
    if x_a.shape[0] != x_b.shape[0]:
        raise ValueError(f"batch {index}: {x_a.shape[0]} tokens for A but {x_b.shape[0]} for B; pairs must align")
    if x_a.shape[0] == 0:
        raise ValueError(f"batch {index} is empty")


class Trainer:
    """Owns the optimiser and the training state of one crosscoder; :meth:`step` does one update."""

    def __init__(self, model: Crosscoder, config: TrainConfig, parallel: SingleProcess | None = None) -> None:
        self.model = model
        self.config = config.resolved(model.config)
        # Where batch statistics are taken: this process, or over every data-parallel worker (dfc/distributed.py).
        self.parallel = parallel or SingleProcess()
        self.device = torch.device(self.config.device)
        self.model.to(self.device)
        self.optimizer = make_adam(self.model.parameters(), self.config.lr, self.device)
        self.step_count = 0
        self.tokens_seen = 0
        self.tokens_since_fired = torch.zeros(model.config.n_features, dtype=torch.long, device=self.device)
        self.initialised = False

    # ----------------------------------------------------------------- schedules
    def lr_at(self, step: int) -> float:
        c = self.config
        assert c.warmup_steps is not None
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        decay_from = int(c.decay_start * c.steps)
        if step >= decay_from and c.steps > decay_from:
            return c.lr * max(0.0, (c.steps - step) / (c.steps - decay_from))
        return c.lr

    def k_at(self, step: int) -> float:
        c, k = self.config, self.model.config.k
        assert c.k_anneal_from is not None and c.k_anneal_steps is not None
        if step >= c.k_anneal_steps or c.k_anneal_steps == 0:
            return float(k)
        return c.k_anneal_from + (k - c.k_anneal_from) * step / c.k_anneal_steps

    # ----------------------------------------------------------------- one step
    def initialise(self, x_a: Tensor, x_b: Tensor) -> None:
        """Seeded init, normalisation scales and ``b_dec`` from the first batch."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed)
        self.model.reset_parameters(c.decoder_init_norm, generator, c.exclusive_init_norm)
        if c.estimate_scales and float(self.model.scale_a) == 1.0 and float(self.model.scale_b) == 1.0:
            self.model.set_scales(float(x_a.norm(dim=1).median()), float(x_b.norm(dim=1).median()))
        x_a, x_b = self._normalised_inliers(x_a, x_b)
        with torch.no_grad():
            self.model.b_dec_a.copy_(geometric_median(x_a.float()))
            self.model.b_dec_b.copy_(geometric_median(x_b.float()))
        self.initialised = True

    def _normalised_inliers(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        """A whole batch, normalised, without its outlier tokens."""
        x_a, x_b, _ = self._inliers(x_a, x_b, SingleProcess())
        return x_a, x_b

    def _inliers(self, x_a: Tensor, x_b: Tensor, batch: SingleProcess) -> tuple[Tensor, Tensor, int]:
        """This worker's normalised inlier tokens, and how many inliers the whole batch has."""
        x_a, x_b = self.model.normalize(x_a.to(self.device).float(), x_b.to(self.device).float())
        keep, n = batch.inliers(x_a.norm(dim=1), x_b.norm(dim=1), self.config.outlier_factor)
        return x_a[keep], x_b[keep], n

    def step(self, x_a: Tensor, x_b: Tensor) -> StepMetrics:
        """One optimiser step on a raw paired batch (this worker's rows of it, when data-parallel)."""
        _check_batch(x_a, x_b, self.model.config, self.step_count)
        batch = self.parallel
        if not self.initialised:
            self.initialise(batch.whole(x_a), batch.whole(x_b))
        c, model = self.config, self.model
        x_a, x_b, n = self._inliers(x_a, x_b, batch)
        step, k = self.step_count, self.k_at(self.step_count)
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        compute_dtype = torch.bfloat16 if c.bf16 else None
        scores = model.scores(x_a, x_b, compute_dtype)
        rows, cols, mins = batch.select(model, scores, k, n)
        features = model.gather(scores, rows, cols, x_a, x_b)
        recon_a, recon_b = model.decode(features)
        loss_a = batch.mean((x_a - recon_a).pow(2).sum(-1), n)
        loss_b = batch.mean((x_b - recon_b).pow(2).sum(-1), n)
        res_a, res_b = x_a - recon_a.detach(), x_b - recon_b.detach()
        # Over the whole batch: the residuals' spread normalises AuxK, the inputs' spread is FVU's denominator.
        spread = [v.clamp_min(1e-12) for v in batch.centred_squares([res_a, res_b, x_a, x_b], n)]
        dead = self.tokens_since_fired >= c.dead_after_tokens
        aux = self._aux_loss(scores, dead, x_a, x_b, (res_a, res_b), (spread[0], spread[1]))
        loss = loss_a + loss_b + c.aux_alpha * aux

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        batch.reduce_gradients(list(model.parameters()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        self.optimizer.step()

        with torch.no_grad():
            # One reduction for the fired features and the step's metrics.
            n_features = model.config.n_features
            fired = torch.zeros(n_features, device=self.device)
            fired[cols] = 1.0
            stats = torch.stack([
                (x_a - recon_a).pow(2).sum(), (x_b - recon_b).pow(2).sum(), loss_a, loss_b, aux,
                torch.tensor(float(cols.numel()), device=self.device),
            ])  # fmt: skip
            totals = batch.sum_(torch.cat([fired, stats.to(fired.dtype)]))
            sse_a, sse_b, total_a, total_b, total_aux, active = totals[n_features:].unbind()
        self.tokens_since_fired += n
        self.tokens_since_fired[totals[:n_features] > 0] = 0
        if step >= c.threshold_start_step:
            self._update_thresholds(mins)
        self.step_count += 1
        self.tokens_seen += n
        return StepMetrics(
            step=step,
            loss=float(total_a + total_b + c.aux_alpha * total_aux),
            loss_a=float(total_a),
            loss_b=float(total_b),
            aux_loss=float(total_aux),
            fvu_a=float(sse_a / spread[2]),
            fvu_b=float(sse_b / spread[3]),
            l0=float(active) / max(n, 1),
            k=k,
            lr=lr,
            dead_fraction=float(dead.float().mean()),
            tokens=n,
        )

    def _aux_loss(
        self,
        scores: EncoderScores,
        dead: Tensor,
        x_a: Tensor,
        x_b: Tensor,
        residuals: tuple[Tensor, Tensor],
        variances: tuple[Tensor, Tensor],
    ) -> Tensor:
        """AuxK: the top dead features per token reconstruct the residual, without decoder bias.

        ``variances`` are the residuals' summed squared deviations over the whole batch.
        """
        n_dead = int(dead.sum())
        pre = scores.scores
        if n_dead == 0:
            return torch.zeros((), device=pre.device)
        dead_idx = dead.nonzero().squeeze(1)
        aux_k = min(self.config.aux_k, n_dead)
        values, local = (pre[:, dead_idx] / scores.norms[dead_idx]).topk(aux_k, dim=1)
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(aux_k)
        cols = dead_idx[local.reshape(-1)]
        keep = values.reshape(-1) > 0
        rows, cols = rows[keep], cols[keep]
        order = torch.sort(rows * self.model.config.n_features + cols).indices
        rows, cols = rows[order], cols[order]
        aux_features = self.model.gather(scores, rows, cols, x_a, x_b)
        aux_a, aux_b = self.model.decode(aux_features, with_bias=False)
        loss = torch.zeros((), device=pre.device)
        for res, rec, variance in zip(residuals, (aux_a, aux_b), variances, strict=True):
            loss = loss + (res - rec).pow(2).sum() / variance
        return loss

    def _update_thresholds(self, mins: Tensor) -> None:
        beta = self.config.threshold_beta
        thresholds = self.model.thresholds
        for slot in range(2):
            value = float(mins[slot])
            if value <= 0:
                continue
            old = float(thresholds[slot])
            thresholds[slot] = value if old < 0 else beta * old + (1 - beta) * value

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: str | Path) -> Path:
        """Everything needed to continue bit-for-bit: weights, optimiser moments, counters, RNG."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(tmp)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, tmp / "trainer_state.pt")
        meta = {
            "step": self.step_count,
            "tokens_seen": self.tokens_seen,
            "initialised": self.initialised,
            "train_config": dataclasses.asdict(self.config),
        }
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
        if directory.exists():
            _rmtree(directory)
        tmp.rename(directory)  # a checkpoint directory is complete or absent, never half-written
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` into this trainer."""
        directory = Path(directory)
        loaded = Crosscoder.from_pretrained(directory, device=self.device)
        if loaded.config.to_dict() != self.model.config.to_dict():
            raise ValueError(f"checkpoint {directory} is for a different crosscoder config; refusing to resume")
        self.model.load_state_dict(loaded.state_dict())
        state = torch.load(directory / "trainer_state.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        torch.set_rng_state(state["torch_rng"])
        meta = json.loads((directory / "trainer.json").read_text())
        self.step_count, self.tokens_seen, self.initialised = meta["step"], meta["tokens_seen"], meta["initialised"]


def _rmtree(path: Path) -> None:
    for child in path.iterdir():
        _rmtree(child) if child.is_dir() else child.unlink()
    path.rmdir()


def train(
    model: Crosscoder,
    batches: Iterable[PairedBatch],
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    skip_consumed: bool = True,
    on_step: Callable[[StepMetrics], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    parallel: SingleProcess | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps on ``batches``.

    With ``checkpoint_dir`` the trainer saves a checkpoint every ``config.checkpoint_every`` steps
    and at the end; with ``resume`` it continues from one found there. ``batches`` must then
    replay the same sequence from the start: the trainer skips the batches it already trained on
    (``skip_consumed=False`` if the iterator itself resumes at the right place).

    Data-parallel (``parallel`` a :class:`~dfc.distributed.DataParallel`): ``batches`` yields this worker's rows
    of each global batch, every worker resumes from its own copy of the same checkpoint, and only rank 0 writes
    checkpoints (and calls ``on_checkpoint``).
    """
    if config.steps <= 0:
        raise ValueError(f"steps must be positive, got {config.steps}")
    trainer = Trainer(model, config, parallel)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    writes = trainer.parallel.is_writer
    if checkpoint is not None and resume and (checkpoint / "trainer.json").is_file():
        trainer.load_checkpoint(checkpoint)
        log.info("resumed from %s at step %d", checkpoint, trainer.step_count)
    trainer.parallel.agree(trainer.step_count, "the step to resume from")
    iterator: Iterator[PairedBatch] = iter(batches)
    if skip_consumed and trainer.step_count:
        skipped = sum(1 for _ in islice(iterator, trainer.step_count))
        if skipped < trainer.step_count:
            raise ValueError(f"the batch iterator ended after {skipped} batches while skipping {trainer.step_count}")
    history: list[StepMetrics] = []
    start = time.perf_counter()
    for x_a, x_b in iterator:
        if trainer.step_count >= trainer.config.steps:
            break
        metrics = trainer.step(x_a, x_b)
        history.append(metrics)
        if on_step is not None:
            on_step(metrics)
        if writes and trainer.config.log_every and metrics.step % trainer.config.log_every == 0:
            log.info(
                "step %d loss %.4g fvu %.3f/%.3f l0 %.1f dead %.3f",
                metrics.step,
                metrics.loss,
                metrics.fvu_a,
                metrics.fvu_b,
                metrics.l0,
                metrics.dead_fraction,
            )
        every = trainer.config.checkpoint_every
        if (
            writes and checkpoint is not None and every
            and trainer.step_count % every == 0 and trainer.step_count < config.steps
        ):  # fmt: skip
            trainer.save_checkpoint(checkpoint)
            if on_checkpoint is not None:
                on_checkpoint(checkpoint)
    if trainer.step_count == 0:
        raise ValueError("the batch iterator yielded no batches; nothing to train on")
    if trainer.step_count < config.steps:
        log.warning("data ran out after %d of %d steps", trainer.step_count, config.steps)
    if writes and checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
        if on_checkpoint is not None:
            on_checkpoint(checkpoint)
    tokens = trainer.tokens_seen
    if not math.isfinite(history[-1].loss if history else 0.0):
        raise FloatingPointError("training diverged (non-finite loss); lower the learning rate")
    return TrainResult(model, trainer.step_count, tokens, history, time.perf_counter() - start)
