"""Sparse kernels: BatchTopK selection, and encoder/decoder ops whose backward touches only kept entries.

A BatchTopK crosscoder keeps ``k·B`` of the ``B·F`` pre-activations of a batch. The encoder's
forward must be dense (every feature is scored), but nothing after it has to be: the decoder is a
sparse-times-dense product and the encoder's gradient is non-zero only at the kept entries. These
``autograd.Function``s make that explicit instead of materialising dense ``(B, F)`` gradients
(cf. EleutherAI/sparsify's fused encoder).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

# CSR support is marked beta in torch; the ops used here (CSR @ dense, sampled_addmm) are stable.
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")


class SparseFeatures(NamedTuple):
    """Active features of a batch in coordinate form, sorted by (row, feature)."""

    rows: Tensor
    """Token index within the batch of each active entry (int64)."""
    cols: Tensor
    """Global feature index of each active entry (int64)."""
    values: Tensor
    """Activation of each entry (carries gradient to the encoder during training)."""
    batch_size: int
    """Number of tokens in the batch."""
    n_features: int
    """Dictionary size."""

    def to_dense(self) -> Tensor:
        """The ``(batch, n_features)`` activation matrix (for analysis, never for training)."""
        dense = torch.zeros(self.batch_size, self.n_features, dtype=self.values.dtype, device=self.values.device)
        dense[self.rows, self.cols] = self.values
        return dense

    @property
    def l0(self) -> float:
        """Mean number of active features per token."""
        return self.rows.numel() / max(self.batch_size, 1)


def batch_topk(scores: Tensor, n_keep: int) -> Tensor:
    """Flat indices of the ``n_keep`` largest entries of ``scores`` (exact, any order).

    A full ``topk`` over ``B·F`` entries costs as much as the encoder matmul on a CPU. A
    threshold estimated from a strided sample discards almost every entry in one vectorised
    pass; the exact top-k then runs on the few survivors. If the estimate keeps too few, the
    full top-k is the fallback, so the result is always exact.
    """
    flat = scores.reshape(-1)
    numel = flat.numel()
    if n_keep >= numel:
        return torch.arange(numel, device=flat.device)
    if n_keep <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    stride = 17  # coprime with the power-of-two dictionary sizes, so every feature is sampled
    if numel < 64 * stride or n_keep * 8 > numel:
        return flat.topk(n_keep, sorted=False).indices
    sample = flat[::stride]
    # Keep ~1.5× the expected share of the sample (plus slack) so the threshold sits below the true one.
    want = min(sample.numel(), int(n_keep / stride * 1.5) + 64)
    threshold = sample.topk(want, sorted=False).values.min()
    candidates = (flat >= threshold).nonzero().squeeze(1)
    if candidates.numel() < n_keep:
        return flat.topk(n_keep, sorted=False).indices
    picked = flat[candidates].topk(n_keep, sorted=False).indices
    return candidates[picked]


def sort_entries(rows: Tensor, cols: Tensor, n_features: int) -> Tensor:
    """Permutation that sorts entries by (row, col), the order CSR needs."""
    return torch.sort(rows * n_features + cols).indices


def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR matrix from entries already sorted by (row, col)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    return torch.sparse_csr_tensor(crow, cols, values, shape, device=rows.device)


def _transposed_csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR of the transpose of the (rows, cols) matrix of the given shape."""
    order = torch.sort(cols * shape[0] + rows).indices
    return _csr(cols[order], rows[order], values[order], (shape[1], shape[0]))


class _EncodeGather(torch.autograd.Function):
    """Pass pre-activations at kept entries through; backprop only into those entries' weights.

    Forward returns ``values`` (already computed by the dense no-grad encoder pass). Backward
    computes ``dL/dW_enc = G^T x`` with ``G`` the sparse ``(B, F)`` gradient, which costs
    ``O(nnz·d)`` instead of the dense ``O(B·F·d)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        values: Tensor,
        rows: Tensor,
        cols: Tensor,
        x_a: Tensor,
        x_b: Tensor,
        w_enc_a: Tensor,
        w_enc_b: Tensor,
        b_enc: Tensor,
        b_offset: int,
    ) -> Tensor:
        ctx.save_for_backward(values, rows, cols, x_a, x_b)
        ctx.b_offset = b_offset
        ctx.shapes = (w_enc_a.shape, w_enc_b.shape, b_enc.shape)
        ctx.dtypes = (w_enc_a.dtype, w_enc_b.dtype)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        values, rows, cols, x_a, x_b = ctx.saved_tensors
        shape_a, shape_b, shape_bias = ctx.shapes
        # ReLU: entries that were clipped to zero pass no gradient.
        grad = torch.where(values > 0, grad, torch.zeros_like(grad))
        grad_b_enc = torch.zeros(shape_bias, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        grads_w = []
        for x, shape, offset, dtype in (
            (x_a, shape_a, 0, ctx.dtypes[0]),
            (x_b, shape_b, ctx.b_offset, ctx.dtypes[1]),
        ):
            local = cols - offset
            mask = (local >= 0) & (local < shape[0])
            g = _transposed_csr(rows[mask], local[mask], grad[mask], (x.shape[0], shape[0]))
            grads_w.append((g @ x.to(grad.dtype)).to(dtype))
        return None, None, None, None, None, grads_w[0], grads_w[1], grad_b_enc, None


class _SparseDecode(torch.autograd.Function):
    """``out = S @ W_dec`` for a sparse ``(B, F_m)`` activation matrix ``S``, with sparse backward."""

    @staticmethod
    def forward(ctx, values: Tensor, rows: Tensor, cols: Tensor, w_dec: Tensor, batch_size: int) -> Tensor:  # type: ignore[override]
        s = _csr(rows, cols, values.to(w_dec.dtype), (batch_size, w_dec.shape[0]))
        ctx.save_for_backward(values, rows, cols, w_dec)
        ctx.batch_size = batch_size
        return s @ w_dec

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        values, rows, cols, w_dec = ctx.saved_tensors
        grad_values = grad_w = None
        grad_out = grad_out.contiguous().to(w_dec.dtype)
        if ctx.needs_input_grad[0]:
            pattern = _csr(rows, cols, torch.zeros_like(values, dtype=w_dec.dtype), (ctx.batch_size, w_dec.shape[0]))
            # (grad_out @ W_dec^T) only at the kept entries: a sampled dense-dense product.
            grad_values = torch.sparse.sampled_addmm(pattern, grad_out, w_dec.T, beta=0.0).values().to(values.dtype)
        if ctx.needs_input_grad[3]:
            st = _transposed_csr(rows, cols, values.detach().to(w_dec.dtype), (ctx.batch_size, w_dec.shape[0]))
            grad_w = st @ grad_out
        return grad_values, None, None, grad_w, None


def encode_gather(
    values: Tensor,
    rows: Tensor,
    cols: Tensor,
    x_a: Tensor,
    x_b: Tensor,
    w_enc_a: Tensor,
    w_enc_b: Tensor,
    b_enc: Tensor,
    b_offset: int,
) -> Tensor:
    """Attach the encoder's sparse gradient to pre-activation ``values`` at ``(rows, cols)``.

    ``w_enc_a`` covers global features ``[0, len(w_enc_a))`` and ``w_enc_b`` covers
    ``[b_offset, b_offset + len(w_enc_b))``.
    """
    return _EncodeGather.apply(values, rows, cols, x_a, x_b, w_enc_a, w_enc_b, b_enc, b_offset)


def sparse_decode(values: Tensor, rows: Tensor, cols: Tensor, w_dec: Tensor, batch_size: int) -> Tensor:
    """``(batch, d)`` reconstruction from entries sorted by (row, col); ``cols`` index rows of ``w_dec``."""
    if rows.numel() == 0:
        # Keep the graph connected so gradients (zeros) still reach the decoder.
        return torch.zeros(batch_size, w_dec.shape[1], dtype=w_dec.dtype, device=w_dec.device) + 0 * w_dec.sum()
    return _SparseDecode.apply(values, rows, cols, w_dec, batch_size)
