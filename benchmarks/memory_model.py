"""Bytes of a crosscoder training step, from shapes alone, and the measured peak to check them against.

The model follows :meth:`dfc.trainer.Trainer.step` tensor by tensor: fp32 parameters (``Crosscoder``
creates them fp32 and the trainer never casts them), two fp32 Adam moments each (``make_adam``'s
``torch.optim.Adam`` keeps its state in the parameter's dtype), the gradients of the last step (they
live until the next step's ``zero_grad``, so through its whole forward), and the largest of the
step's phases of temporaries. ``bf16`` is the trainer's flag: only the dense encoder pass runs in
bfloat16. Checkpoints are written from host copies and are not part of the device peak.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dfc.config import CrosscoderConfig

FP32 = 4
INT64 = 8


def parameter_shapes(config: CrosscoderConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of :class:`dfc.crosscoder.Crosscoder` by name, exclusive partitions included."""
    c = config
    n_a, n_b = len(c.features_a), len(c.features_b)
    return {
        "w_enc_a": (n_a, c.d_a),
        "w_enc_b": (n_b, c.d_b),
        "b_enc": (c.n_features,),
        "w_dec_a": (n_a, c.d_a),
        "w_dec_b": (n_b - (c.n_designated if c.ties_decoders else 0), c.d_b),
        "b_dec_a": (c.d_a,),
        "b_dec_b": (c.d_b,),
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class TrainingMemory:
    """Predicted bytes of one training replica, by component; ``total`` is the step's peak."""

    weights: int
    """fp32 parameters: encoders, decoders and biases of both models' blocks."""
    adam_states: int
    """Adam's two fp32 moments per parameter, plus its per-parameter step counters."""
    gradients: int
    """One fp32 gradient per parameter, alive from one backward to the next step's ``zero_grad``."""
    buffers: int
    """Normalisation scales, inference thresholds and the trainer's dead-feature counters and masks."""
    input_batch: int
    """The raw fp32 paired batch handed to the step."""
    activations: int
    """Peak of the step's temporaries: the largest of ``phases``."""
    phases: dict[str, int] = field(default_factory=dict)
    """Temporaries alive at the high-water mark of each phase of the step."""

    @property
    def total(self) -> int:
        return self.weights + self.adam_states + self.gradients + self.buffers + self.input_batch + self.activations

    def components(self) -> dict[str, int]:
        """The components and the total, for tables and JSON."""
        return {
            "weights": self.weights,
            "adam_states": self.adam_states,
            "gradients": self.gradients,
            "buffers": self.buffers,
            "input_batch": self.input_batch,
            "activations": self.activations,
            "total": self.total,
        }


def training_memory(
    config: CrosscoderConfig,
    batch: int,
    *,
    bf16: bool,
    aux_k: int,
    n_dead: int,
    k: float | None = None,
    device: str = "cuda",
) -> TrainingMemory:
    """Predicted peak bytes of a steady-state :meth:`Trainer.step` on ``batch`` tokens.

    ``n_dead`` dead features make AuxK run (0: it returns at once); ``k`` is the step's k (the
    model's own by default; larger while annealing). On the CPU a sparse-times-dense product
    holds a second copy of its dense result (measured); CUDA's is assumed to write in place.
    """
    c = config
    shapes = parameter_shapes(c)
    params = sum(_numel(s) for s in shapes.values())
    n_a, n_b, F, B = len(c.features_a), len(c.features_b), c.n_features, batch
    D = c.d_a + c.d_b
    s = 2 if bf16 else FP32
    kept = round((c.k if k is None else k) * B)
    vectors = B * D * FP32  # one fp32 (tokens, d_A + d_B) pair of tensors
    scores = B * F * FP32  # the step's ranking scores, alive from the encoder pass to the end of the step

    # Scores pass: the zero-padded scaled encoder in the compute dtype; it is filled from an fp32
    # product of one model's block at a time, then meets the concatenated batch and the matmul output.
    fold = F * D * s + max(n_a * c.d_a, n_b * c.d_b) * FP32
    matmul = F * D * s + B * D * s + B * F * s + (scores if s != FP32 else 0)
    # BatchTopK: a boolean mask of the batch's scores, then ~1.5 k·B candidates and their top-k.
    candidates = min(B * F, int(1.5 * kept) + 64 * 17)
    select = scores + B * F + candidates * (INT64 + FP32) + kept * 3 * INT64
    # Decoding: entries (rows, cols, values and per-model copies), reconstructions and the squared
    # error autograd saves, plus the residuals AuxK receives.
    decode = scores + kept * 2 * (2 * INT64 + FP32) + 3 * vectors
    phases = {
        "normalise": 2 * vectors,
        "encoder_scores": vectors + max(fold, matmul),
        "batch_topk": vectors + select,
        "decode": vectors + decode,
    }
    grads_of_encoders = (_numel(shapes["w_enc_a"]) + _numel(shapes["w_enc_b"])) * FP32
    # Each dense weight gradient is the result of a CSR @ dense product (sparse backward).
    sparse_copy = max(_numel(shapes["w_enc_a"]), _numel(shapes["w_enc_b"])) * FP32 if device == "cpu" else 0
    backward = vectors + scores + 2 * vectors + sparse_copy
    if n_dead:
        a_k = min(aux_k, n_dead)
        # Dead columns gathered and divided by their norms (two B×n_dead copies), then top-aux_k per token.
        phases["auxk"] = vectors + decode + 2 * B * n_dead * FP32 + B * a_k * (FP32 + INT64)
        # Two paths (reconstruction and AuxK) reach the encoders: autograd holds one path's dense
        # encoder gradients while the other's are computed, then adds them.
        phases["backward"] = backward + grads_of_encoders
    else:
        phases["backward"] = backward
    buffers = 3 * FP32 + F * (INT64 + 2)  # scales, thresholds; tokens_since_fired, dead and fired masks
    return TrainingMemory(
        weights=params * FP32,
        adam_states=params * 2 * FP32 + len(shapes) * FP32,
        gradients=params * FP32,
        buffers=buffers,
        input_batch=vectors,
        activations=max(phases.values()),
        phases=phases,
    )


# --------------------------------------------------------------------------- measuring a real peak
def _status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key}; peak resident memory needs Linux")
    return int(match[1]) * 1024


class PeakMemory:
    """Peak memory of the code between :meth:`reset` and :meth:`peak`, on CUDA or on a Linux CPU.

    On CUDA it is ``torch.cuda.max_memory_allocated`` (tensors only). On the CPU torch has no
    allocator statistics; the resident high-water mark (reset through ``/proc/self/clear_refs``)
    above the resident size at :meth:`reset` is the nearest measure: it also counts the allocator's
    slack and the pages of anything else the process touches, so run it in a fresh process.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = 0
            return
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the high-water mark only
        self._base = _status_bytes("VmRSS")

    def peak(self) -> int:
        """Bytes above the state at :meth:`reset` (CPU) or allocated in all (CUDA) at the highest point."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return _status_bytes("VmHWM") - self._base


def allocator_peak(fn: Callable[[], object]) -> int:
    """Highest bytes the torch CPU allocator held *above its level when ``fn`` started*, while ``fn`` ran.

    Read from the profiler's allocation events, so it counts tensors only, like
    ``torch.cuda.max_memory_allocated``; tensors alive before ``fn`` are not in it.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def live_tensor_bytes(*groups: object) -> int:
    """Bytes of the distinct tensors reachable in ``groups`` (tensors, modules, optimisers, dicts, lists)."""
    seen: dict[int, int] = {}

    def visit(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, torch.nn.Module):
            for t in (*obj.parameters(), *obj.buffers()):
                visit(t)
                if isinstance(t, torch.nn.Parameter) and t.grad is not None:
                    visit(t.grad)
        elif isinstance(obj, torch.optim.Optimizer):
            visit(list(obj.state.values()))
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                visit(v)

    for group in groups:
        visit(group)
    return sum(seen.values())


@dataclass(frozen=True)
class PeakCheck:
    """A measured training-step peak beside the model's prediction for the same step."""

    shape: dict[str, int | bool]
    n_dead: int
    """Dead features at the measured step (AuxK runs when > 0)."""
    measured: int
    """Tensor bytes at the step's high-water mark: tensors alive before it plus the allocator's peak during it."""
    predicted: TrainingMemory

    @property
    def ratio(self) -> float:
        """Predicted over measured (1.0 = exact)."""
        return self.predicted.total / self.measured


def check_training_peak(
    d_a: int, d_b: int, n_features: int, k: int, batch: int, *, bf16: bool = False, dead_after_tokens: int | None = None
) -> PeakCheck:
    """Train a few steps on the CPU, then measure one more step's peak tensor bytes and predict it.

    ``dead_after_tokens`` (default: one batch) is small so that some features are dead and AuxK
    runs; ``10**12`` keeps every feature alive. The last step's gradients are re-created inside
    the measured window so that the profiler sees them freed by ``zero_grad``, and the originals
    are kept until it ends: the profiler cannot size a block allocated before it started (and in a
    process that profiled before, it may take one for a stale block of the earlier session).
    """
    from dfc.crosscoder import Crosscoder
    from dfc.trainer import TrainConfig, Trainer

    config = CrosscoderConfig(d_a=d_a, d_b=d_b, n_features=n_features, k=k)
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(batch, d_a, generator=g), torch.randn(batch, d_b, generator=g)
    trainer = Trainer(
        Crosscoder(config),
        TrainConfig(
            steps=10**6, k_anneal_steps=0, bf16=bf16, dead_after_tokens=dead_after_tokens or batch, log_every=0
        ),
    )
    for _ in range(3):
        trainer.step(x_a, x_b)
    n_dead = int((trainer.tokens_since_fired >= trainer.config.dead_after_tokens).sum())
    params = list(trainer.model.parameters())
    grads = [p.grad for p in params]  # alive until we return: no block from before the profiler is freed in it
    for p in params:
        p.grad = None
    before = live_tensor_bytes(trainer.model, trainer.optimizer, trainer.tokens_since_fired, x_a, x_b)

    def step() -> None:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        trainer.step(x_a, x_b)

    measured = before + allocator_peak(step)
    assert trainer.config.aux_k is not None
    predicted = training_memory(config, batch, bf16=bf16, aux_k=trainer.config.aux_k, n_dead=n_dead, device="cpu")
    shape = {"d_a": d_a, "d_b": d_b, "F": n_features, "k": k, "batch": batch, "bf16": bf16}
    return PeakCheck(shape, n_dead, measured, predicted)
