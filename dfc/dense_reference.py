"""A plain dense crosscoder step: the baseline the sparse kernels are measured and pinned against.

This is what the released DFC code does: dense ``(2, d, F)`` weights with zero masks over the
blocks a model may not use, a dense decoder and autograd's dense backward. It exists for two
reasons only: equivalence tests (the sparse path must give the same loss and gradients) and the
speed benchmark's baseline. Never train with it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from dfc.crosscoder import Crosscoder


class DenseOutput(NamedTuple):
    loss_a: Tensor
    loss_b: Tensor
    dense_features: Tensor


class DenseReference(nn.Module):
    """Masked dense weights holding exactly the parameters of a :class:`Crosscoder`."""

    def __init__(self, model: Crosscoder) -> None:
        super().__init__()
        c = model.config
        d = max(c.d_a, c.d_b)
        self.d_a, self.d_b, self.n_features = c.d_a, c.d_b, c.n_features
        self.designated = slice(c.shared.start, c.shared.start + c.n_designated)
        self.budgets = model._k_budgets
        mask = torch.zeros(2, d, c.n_features)
        mask[0, : c.d_a, c.features_a.start : c.features_a.stop] = 1
        mask[1, : c.d_b, c.features_b.start : c.features_b.stop] = 1
        self.register_buffer("mask", mask)
        w_enc = torch.zeros(2, d, c.n_features)
        w_dec = torch.zeros(2, c.n_features, d)
        with torch.no_grad():
            w_enc[0, : c.d_a, c.features_a.start : c.features_a.stop] = model.w_enc_a.T
            w_enc[1, : c.d_b, c.features_b.start : c.features_b.stop] = model.w_enc_b.T
            w_dec[0, c.features_a.start : c.features_a.stop, : c.d_a] = model.w_dec_a
            w_dec[1, c.features_b.start : c.features_b.stop, : c.d_b] = model.decoder_b()
        self.w_enc = nn.Parameter(w_enc)
        self.w_dec = nn.Parameter(w_dec)
        self.b_enc = nn.Parameter(model.b_enc.detach().clone())
        self.b_dec_a = nn.Parameter(model.b_dec_a.detach().clone())
        self.b_dec_b = nn.Parameter(model.b_dec_b.detach().clone())

    def forward(self, x_a: Tensor, x_b: Tensor, k: float) -> DenseOutput:
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
        loss_a = (x_a - recon[0, :, : self.d_a] - self.b_dec_a).pow(2).sum(-1).mean()
        loss_b = (x_b - recon[1, :, : self.d_b] - self.b_dec_b).pow(2).sum(-1).mean()
        return DenseOutput(loss_a, loss_b, f)
