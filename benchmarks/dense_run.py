"""A whole training run of the dense masked baseline: :func:`dfc.trainer.train`'s recipe on the dense reference.

The trainer only trains the sparse crosscoder, so the baseline's run is built here from the same
parts: the sparse :class:`~dfc.trainer.Trainer` supplies the seeded initialisation (scales and
``b_dec`` from the first batch) and the lr and k schedules; the step is the dense reference's
forward (dense ``(2, d, F)`` weights with masks, dense decoder, autograd backward, as in the
released code) with the same outlier filter, AuxK over dead features (the released code's dense
form), dead-feature counters, threshold tracking, clipping, fused Adam and metrics; checkpoints are
written the same way (weights, optimiser moments, counters, RNG; to a temporary folder, then renamed).
It is a benchmark baseline, not a way to train.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor

from dfc.crosscoder import Crosscoder
from dfc.dense_reference import DenseReference
from dfc.trainer import PairedBatch, StepMetrics, TrainConfig, Trainer, make_adam


class DenseForward(NamedTuple):
    """What one dense forward keeps for the loss, AuxK and the bookkeeping."""

    pre: Tensor
    """``(batch, F)`` ReLU'd pre-activations (AuxK ranks the dead features' entries)."""
    scores: Tensor
    """``(batch, F)`` pre-activations times the total decoder norm (BatchTopK's ranking)."""
    features: Tensor
    """``(batch, F)`` kept activations, zero elsewhere."""
    w_dec: Tensor
    """``(2, F, d)`` masked decoder (the AuxK reconstruction reuses it)."""
    recon_a: Tensor
    recon_b: Tensor


class DenseRunModel(DenseReference):
    """The dense reference, keeping the intermediates a training step needs besides the losses."""

    def forward_all(self, x_a: Tensor, x_b: Tensor, k: float) -> DenseForward:
        """:meth:`DenseReference.forward`'s computation, step for step, with its intermediates returned."""
        d = self.w_enc.shape[1]
        x = torch.zeros(2, x_a.shape[0], d, dtype=x_a.dtype, device=x_a.device)
        x[0, :, : self.d_a] = x_a
        x[1, :, : self.d_b] = x_b
        w_enc = self.w_enc * self.mask
        w_dec = self.w_dec * self.mask.transpose(1, 2)
        pre = torch.relu(torch.einsum("mbd,mdf->bf", x, w_enc) + self.b_enc)
        norms = w_dec.norm(dim=2).sum(0)
        scores = (pre * norms).detach()
        free, designated = self.budgets(k, x_a.shape[0])
        in_designated = torch.zeros_like(scores)
        in_designated[:, self.designated] = 1.0
        keep = torch.zeros_like(scores).reshape(-1)
        for budget, group in ((free, 1 - in_designated), (designated, in_designated)):
            if budget:
                keep[(scores * group).reshape(-1).topk(budget).indices] = 1.0
        f = pre * keep.reshape(pre.shape) * (scores > 0)
        recon = torch.einsum("bf,mfd->mbd", f, w_dec)
        return DenseForward(
            pre, scores, f, w_dec, recon[0, :, : self.d_a] + self.b_dec_a, recon[1, :, : self.d_b] + self.b_dec_b
        )


def dense_aux_loss(out: DenseForward, dead: Tensor, aux_k: int, res_a: Tensor, res_b: Tensor) -> Tensor:
    """AuxK in the released code's dense form: top dead pre-activations per token, dense decode, no bias."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return torch.zeros((), device=out.pre.device)
    latents = torch.where(dead[None], out.pre, torch.zeros((), dtype=out.pre.dtype, device=out.pre.device))
    values, indices = latents.topk(min(aux_k, n_dead), dim=1, sorted=False)
    aux = torch.zeros_like(out.pre).scatter_(1, indices, values)
    recon = torch.einsum("bf,mfd->mbd", aux, out.w_dec)
    loss = torch.zeros((), device=out.pre.device)
    for m, res in enumerate((res_a, res_b)):
        variance = (res - res.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = loss + (res - recon[m, :, : res.shape[1]]).pow(2).sum() / variance
    return loss


def _fvu(x: Tensor, recon: Tensor) -> float:
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))


class DenseTrainer:
    """:class:`dfc.trainer.Trainer`'s step on the dense masked reference (same recipe, dense arithmetic)."""

    def __init__(self, model: Crosscoder, config: TrainConfig) -> None:
        # The sparse trainer is used for its initialisation and schedules only; it never steps.
        self.recipe = Trainer(model, config)
        self.config = self.recipe.config
        self.device = self.recipe.device
        self.reference: DenseRunModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.tokens_since_fired = torch.zeros(model.config.n_features, dtype=torch.long, device=self.device)
        self.threshold = -1.0
        self.step_count = 0
        self.scales = (1.0, 1.0)

    def _start(self, x_a: Tensor, x_b: Tensor) -> None:
        model = self.recipe.model
        self.recipe.initialise(x_a, x_b)
        self.scales = (float(model.scale_a), float(model.scale_b))
        self.reference = DenseRunModel(model).to(self.device)
        self.optimizer = make_adam(self.reference.parameters(), self.config.lr, self.device)
        model.to("cpu")  # the sparse weights are copied into the reference; free the device for it

    def _normalised_inliers(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        x_a = x_a.to(self.device).float() * self.scales[0]
        x_b = x_b.to(self.device).float() * self.scales[1]
        norm_a, norm_b = x_a.norm(dim=1), x_b.norm(dim=1)
        factor = self.config.outlier_factor
        keep = (norm_a <= factor * norm_a.median()) & (norm_b <= factor * norm_b.median())
        return x_a[keep], x_b[keep]

    def step(self, x_a: Tensor, x_b: Tensor) -> StepMetrics:
        """One optimiser step on a raw paired batch."""
        if self.reference is None:
            self._start(x_a, x_b)
        assert self.reference is not None and self.optimizer is not None
        c = self.config
        x_a, x_b = self._normalised_inliers(x_a, x_b)
        step, k, lr = self.step_count, self.recipe.k_at(self.step_count), self.recipe.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(c.bf16)):
            out = self.reference.forward_all(x_a, x_b, k)
            loss_a = (x_a - out.recon_a).pow(2).sum(-1).mean()
            loss_b = (x_b - out.recon_b).pow(2).sum(-1).mean()
            dead = self.tokens_since_fired >= c.dead_after_tokens
            assert c.aux_k is not None
            aux = dense_aux_loss(out, dead, c.aux_k, x_a - out.recon_a.detach(), x_b - out.recon_b.detach())
            loss = loss_a + loss_b + c.aux_alpha * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.reference.parameters(), c.grad_clip)
        self.optimizer.step()

        n = x_a.shape[0]
        active = out.features.detach() > 0
        self.tokens_since_fired += n
        self.tokens_since_fired[active.any(0)] = 0
        assert c.threshold_start_step is not None
        if step >= c.threshold_start_step and bool(active.any()):
            value = float(out.scores[active].min())
            beta = c.threshold_beta
            self.threshold = value if self.threshold < 0 else beta * self.threshold + (1 - beta) * value
        self.step_count += 1
        with torch.no_grad():
            fvu_a, fvu_b = _fvu(x_a, out.recon_a.float()), _fvu(x_b, out.recon_b.float())
        return StepMetrics(
            step=step,
            loss=float(loss.detach()),
            loss_a=float(loss_a.detach()),
            loss_b=float(loss_b.detach()),
            aux_loss=float(aux.detach()),
            fvu_a=fvu_a,
            fvu_b=fvu_b,
            l0=float(active.sum()) / max(n, 1),
            k=k,
            lr=lr,
            dead_fraction=float(dead.float().mean()),
            tokens=n,
        )

    def save_checkpoint(self, directory: Path) -> Path:
        """Weights, optimiser moments, counters and RNG, written to a temporary folder and renamed."""
        assert self.reference is not None and self.optimizer is not None
        tmp = directory.with_name(directory.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.reference.state_dict().items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        state = {
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": self.step_count, "threshold": self.threshold}))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
        return directory


def dense_train(
    model: Crosscoder,
    batches: Iterable[PairedBatch],
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    on_step: Callable[[StepMetrics], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> int:
    """:func:`dfc.trainer.train`'s loop for the dense baseline (no resume); returns the tokens trained on."""
    trainer = DenseTrainer(model, config)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    tokens = 0
    for x_a, x_b in batches:
        if trainer.step_count >= config.steps:
            break
        metrics = trainer.step(x_a, x_b)
        tokens += metrics.tokens
        if on_step is not None:
            on_step(metrics)
        every = config.checkpoint_every
        if checkpoint is not None and every and trainer.step_count % every == 0 and trainer.step_count < config.steps:
            trainer.save_checkpoint(checkpoint)
            if on_checkpoint is not None:
                on_checkpoint(checkpoint)
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
        if on_checkpoint is not None:
            on_checkpoint(checkpoint)
    return tokens
