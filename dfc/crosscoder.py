"""BatchTopK crosscoders over two models of possibly different widths: standard, DSF and DFC.

One module serves all three families; they differ only in how the dictionary is partitioned
(see :class:`dfc.config.CrosscoderConfig`). Model A owns features ``[0, n_a_only + n_shared)``
and model B owns ``[n_a_only, F)``; each model has its own encoder and decoder block over just
the features it owns, so a DFC's A-only features have no parameter that reads or writes model B.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dfc.config import CrosscoderConfig
from dfc.sparse import SparseFeatures, batch_topk, encode_gather, sort_entries, sparse_decode

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class ForwardOutput(NamedTuple):
    """What one forward pass produced."""

    features: SparseFeatures
    """Active features of the batch."""
    recon_a: Tensor
    """Reconstruction of model A's (normalised) activations."""
    recon_b: Tensor
    """Reconstruction of model B's (normalised) activations."""
    loss_a: Tensor
    """Squared L2 reconstruction error of A, summed over dimensions, mean over tokens."""
    loss_b: Tensor
    """Same for B."""

    @property
    def loss(self) -> Tensor:
        """Total reconstruction loss (the paper's squared L2, summed over the two models)."""
        return self.loss_a + self.loss_b


class EncoderScores(NamedTuple):
    """Dense BatchTopK ranking scores of a batch and the per-feature factor they carry."""

    scores: Tensor
    """``(batch, F)`` pre-activation times total decoder norm (not yet ReLU'd)."""
    norms: Tensor
    """``Σ_m ‖d_i^m‖`` per feature; ``scores / norms`` is the pre-activation."""


class DecoderNorms(NamedTuple):
    """Per-feature decoder norms in the global feature layout (0 where a model has no decoder)."""

    a: Tensor
    b: Tensor

    @property
    def relative(self) -> Tensor:
        """``‖d^A‖ / (‖d^A‖ + ‖d^B‖)``: 1 → A-exclusive, 0 → B-exclusive, 0.5 → balanced."""
        return self.a / (self.a + self.b).clamp_min(1e-12)


class Crosscoder(nn.Module):
    """A sparse dictionary over paired activations of two models."""

    def __init__(self, config: CrosscoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        n_a, n_b = len(c.features_a), len(c.features_b)
        self.w_enc_a = nn.Parameter(torch.zeros(n_a, c.d_a))
        self.w_enc_b = nn.Parameter(torch.zeros(n_b, c.d_b))
        self.b_enc = nn.Parameter(torch.zeros(c.n_features))
        self.w_dec_a = nn.Parameter(torch.zeros(n_a, c.d_a))
        # Tied DSF features read B's decoder from the rows of w_dec_a, so B stores only the rest.
        self.w_dec_b = nn.Parameter(torch.zeros(n_b - (c.n_designated if c.ties_decoders else 0), c.d_b))
        self.b_dec_a = nn.Parameter(torch.zeros(c.d_a))
        self.b_dec_b = nn.Parameter(torch.zeros(c.d_b))
        # Raw activations are multiplied by these before encoding (SCIENCE.md §4 normalisation).
        self.register_buffer("scale_a", torch.ones(()))
        self.register_buffer("scale_b", torch.ones(()))
        # Inference thresholds in score space: [free features, designated features]; < 0 = not learned.
        self.register_buffer("thresholds", torch.full((2,), -1.0))
        self.reset_parameters()

    # ----------------------------------------------------------------- parameters
    def reset_parameters(
        self,
        decoder_norm: float = 0.4,
        generator: torch.Generator | None = None,
        exclusive_decoder_norm: float | None = None,
    ) -> None:
        """Random unit directions scaled to ``decoder_norm``; encoder initialised to the decoder.

        ``exclusive_decoder_norm`` sets the DFC partitions' rows apart (default: the same norm);
        e.g. ``2 × decoder_norm`` gives an exclusive feature the same *total* norm Σ_m‖d^m‖ as a
        shared one, and so the same BatchTopK score scale at initialisation.
        """
        c = self.config
        excl = decoder_norm if exclusive_decoder_norm is None else exclusive_decoder_norm
        with torch.no_grad():
            for dec in (self.w_dec_a, self.w_dec_b):
                dec.copy_(torch.randn(dec.shape, generator=generator))
                dec.div_(dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            self.w_dec_a.mul_(decoder_norm)
            self.w_dec_a[: c.n_a_only].mul_(excl / decoder_norm)
            self.w_dec_b.mul_(decoder_norm)
            self.w_dec_b[self.w_dec_b.shape[0] - c.n_b_only :].mul_(excl / decoder_norm)
            self.w_enc_a.copy_(self.w_dec_a)
            self.w_enc_b.copy_(self.decoder_b())
            self.b_enc.zero_()
            self.b_dec_a.zero_()
            self.b_dec_b.zero_()

    def decoder_b(self) -> Tensor:
        """Model B's decoder over its features ``[n_a_only, F)`` (tied rows included for DSF)."""
        c = self.config
        if not c.ties_decoders:
            return self.w_dec_b
        tied = self.w_dec_a[c.n_a_only : c.n_a_only + c.n_designated]
        return torch.cat([tied, self.w_dec_b], dim=0)

    @property
    def b_offset(self) -> int:
        """Global index of model B's first feature."""
        return self.config.n_a_only

    def decoder_norms(self) -> DecoderNorms:
        """Decoder norm of every feature for each model, in the global layout."""
        c = self.config
        a = torch.zeros(c.n_features, device=self.w_dec_a.device)
        b = torch.zeros(c.n_features, device=self.w_dec_a.device)
        a[: len(c.features_a)] = self.w_dec_a.detach().float().norm(dim=1)
        b[self.b_offset :] = self.decoder_b().detach().float().norm(dim=1)
        return DecoderNorms(a, b)

    def decoder_directions(self, feature: int, raw_scale: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """Feature's decoder vector for A and for B (``None`` where it has none), raw scale by default."""
        c = self.config
        d_a = d_b = None
        if feature in c.features_a:
            d_a = self.w_dec_a[feature].detach().float()
            d_a = d_a / self.scale_a if raw_scale else d_a
        if feature in c.features_b:
            d_b = self.decoder_b()[feature - self.b_offset].detach().float()
            d_b = d_b / self.scale_b if raw_scale else d_b
        return d_a, d_b

    # ----------------------------------------------------------------- normalisation
    def normalize(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        """Raw activations → the scale the crosscoder was trained on."""
        return x_a * self.scale_a, x_b * self.scale_b

    def set_scales(self, median_norm_a: float, median_norm_b: float) -> None:
        """Scale each model so its median activation norm becomes ``sqrt((d_A + d_B) / 2)``."""
        for name, value in (("A", median_norm_a), ("B", median_norm_b)):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"median activation norm of model {name} must be positive and finite, got {value}")
        target = math.sqrt((self.config.d_a + self.config.d_b) / 2)
        self.scale_a.fill_(target / median_norm_a)
        self.scale_b.fill_(target / median_norm_b)

    # ----------------------------------------------------------------- encoding
    def scores(self, x_a: Tensor, x_b: Tensor, compute_dtype: torch.dtype | None = None) -> EncoderScores:
        """Dense ranking scores ``(W_enc^A x_A + W_enc^B x_B + b_enc) · Σ_m ‖d^m‖`` without autograd.

        This is the only dense step. The decoder-norm factor is folded into the encoder weights
        (an ``F×d`` product) rather than applied to the ``B×F`` result, which saves a full pass
        over the batch. The two models' contributions are *summed*, as in the released code (the
        paper's text says averaged; a sum keeps the standard crosscoder's scale and is what was run).
        """
        c = self.config
        dtype = compute_dtype or self.w_enc_a.dtype
        with torch.no_grad():
            norms = self.decoder_norms()
            total = (norms.a + norms.b).clamp_min(1e-12)
            n_a = len(c.features_a)
            # One matmul over [x_a | x_b] with a zero-padded copy of the two encoder blocks: a
            # contiguous result (no strided in-place updates) and a longer inner dimension, at the
            # price of multiplying the exclusive rows' absent block by zeros (the partitions' share).
            # The parameters stay separate blocks; this temporary exists only inside this no-grad pass.
            weights = torch.zeros(c.n_features, c.d_a + c.d_b, dtype=dtype, device=x_a.device)
            weights[:n_a, : c.d_a] = self.w_enc_a.detach() * total[:n_a, None]
            weights[self.b_offset :, c.d_a :] = self.w_enc_b.detach() * total[self.b_offset :, None]
            bias = (self.b_enc.detach() * total).to(dtype)
            x = torch.cat([x_a.to(dtype), x_b.to(dtype)], dim=1)
            out = torch.addmm(bias, x, weights.T)
            return EncoderScores(out.float(), total)

    def pre_activations(self, x_a: Tensor, x_b: Tensor, compute_dtype: torch.dtype | None = None) -> Tensor:
        """Dense ``ReLU(W_enc^A x_A + W_enc^B x_B + b_enc)`` (for analysis; training uses :meth:`scores`)."""
        s = self.scores(x_a, x_b, compute_dtype)
        return (s.scores / s.norms).relu_()

    def _k_budgets(self, k: float, batch_size: int) -> tuple[int, int]:
        """Entries kept per batch for (free, designated) features; designated get a k multiplier."""
        c = self.config
        total = round(k * batch_size)
        if c.n_designated == 0:
            return total, 0
        weight = c.designated_k_multiplier * c.n_designated
        designated = round(total * weight / (weight + (c.n_features - c.n_designated)))
        return total - designated, designated

    def select(
        self, scores: EncoderScores, k: float | None = None, use_thresholds: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Choose active (row, col) entries by score ``r_i · Σ_m ‖d_i^m‖``; returns rows, cols, min kept scores.

        BatchTopK keeps the ``k·B`` best scores of the batch; at inference the learned thresholds
        replace the batch-dependent choice. DSF's designated block has its own budget and threshold.
        """
        c = self.config
        full = scores.scores
        designated = slice(c.n_a_only, c.n_a_only + c.n_designated)
        groups: list[tuple[Tensor, int, int]] = []
        if c.n_designated:
            free = full.clone()
            free[:, designated] = 0
            groups = [(free, 0, 0), (full[:, designated], designated.start, 1)]
        else:
            groups = [(full, 0, 0)]
        budgets = self._k_budgets(c.k if k is None else k, full.shape[0])
        rows_all, cols_all, mins = [], [], torch.zeros(2)
        for sub, offset, slot in groups:
            if use_thresholds:
                if float(self.thresholds[slot]) < 0:
                    raise RuntimeError("this crosscoder has no learned inference thresholds; train it first or pass k")
                rows, cols = (sub > self.thresholds[slot]).nonzero(as_tuple=True)
            else:
                flat = batch_topk(sub, budgets[slot])
                kept = sub.reshape(-1)[flat]
                positive = kept > 0  # a non-positive score is ReLU'd away: not an active feature
                flat, kept = flat[positive], kept[positive]
                rows, cols = flat // sub.shape[1], flat % sub.shape[1]
                if flat.numel():
                    mins[slot] = kept.min()
            rows_all.append(rows)
            cols_all.append(cols + offset)
        rows, cols = torch.cat(rows_all), torch.cat(cols_all)
        order = sort_entries(rows, cols, c.n_features)
        return rows[order], cols[order], mins

    def encode(
        self,
        x_a: Tensor,
        x_b: Tensor,
        k: float | None = None,
        use_thresholds: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> SparseFeatures:
        """Sparse features of normalised activations: BatchTopK, or the learned thresholds at inference."""
        self._check_inputs(x_a, x_b)
        scores = self.scores(x_a, x_b, compute_dtype)
        rows, cols, _ = self.select(scores, k, use_thresholds)
        return self.gather(scores, rows, cols, x_a, x_b)

    def gather(self, scores: EncoderScores, rows: Tensor, cols: Tensor, x_a: Tensor, x_b: Tensor) -> SparseFeatures:
        """Activations at chosen entries, differentiable w.r.t. the encoder (sparse backward)."""
        values = scores.scores[rows, cols] / scores.norms[cols]
        if torch.is_grad_enabled():
            values = encode_gather(values, rows, cols, x_a, x_b, self.w_enc_a, self.w_enc_b, self.b_enc, self.b_offset)
        return SparseFeatures(rows, cols, values, x_a.shape[0], self.config.n_features)

    # ----------------------------------------------------------------- decoding
    def decode(self, features: SparseFeatures, with_bias: bool = True) -> tuple[Tensor, Tensor]:
        """Reconstruct both models from features; each model sees only the features it owns."""
        c = self.config
        rows, cols, values, batch = features.rows, features.cols, features.values, features.batch_size
        in_a = cols < len(c.features_a)
        recon_a = sparse_decode(values[in_a], rows[in_a], cols[in_a], self.w_dec_a, batch)
        in_b = cols >= self.b_offset
        recon_b = sparse_decode(values[in_b], rows[in_b], cols[in_b] - self.b_offset, self.decoder_b(), batch)
        if with_bias:
            recon_a = recon_a + self.b_dec_a
            recon_b = recon_b + self.b_dec_b
        return recon_a, recon_b

    def forward(self, x_a: Tensor, x_b: Tensor, k: float | None = None, use_thresholds: bool = False) -> ForwardOutput:
        """Encode, decode and score normalised activations."""
        features = self.encode(x_a, x_b, k, use_thresholds)
        recon_a, recon_b = self.decode(features)
        loss_a = (x_a - recon_a).pow(2).sum(-1).mean()
        loss_b = (x_b - recon_b).pow(2).sum(-1).mean()
        return ForwardOutput(features, recon_a, recon_b, loss_a, loss_b)

    def _check_inputs(self, x_a: Tensor, x_b: Tensor) -> None:
        c = self.config
        if x_a.ndim != 2 or x_b.ndim != 2:
            raise ValueError(
                f"expected 2-D (tokens, width) activations, got shapes {tuple(x_a.shape)} and {tuple(x_b.shape)}"
            )
        if x_a.shape[1] != c.d_a or x_b.shape[1] != c.d_b:
            raise ValueError(
                f"activation widths ({x_a.shape[1]}, {x_b.shape[1]}) do not match the crosscoder's "
                f"(d_a={c.d_a}, d_b={c.d_b}); was it trained on other models or layers?"
            )
        if x_a.shape[0] != x_b.shape[0]:
            raise ValueError(
                f"paired batches must have the same number of tokens, got {x_a.shape[0]} and {x_b.shape[0]}"
            )

    # ----------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json``; :meth:`from_pretrained` restores it exactly."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(self.config.to_json())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Crosscoder:
        """Load a crosscoder written by :meth:`save_pretrained`."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing; is {directory} a saved crosscoder?")
        config = CrosscoderConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(directory / WEIGHTS_NAME, device=str(device)))
        return model.to(device)
