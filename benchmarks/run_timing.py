"""A whole training run timed from outside the trainer: where its wall time goes, for the DFC and the baseline.

The DFC runs through :func:`dfc.trainer.train`, the dense masked baseline through
:func:`benchmarks.dense_run.dense_train`; a clock around the batch iterator and the ``on_step`` /
``on_checkpoint`` callbacks, and a wrapper around each method's AuxK function, split the run into
initialisation, annealing and final-k steps, AuxK's forward, data and checkpoints. Used by
``benchmarks/train_speed.py``.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks import dense_run
from benchmarks.dense_run import dense_train
from benchmarks.memory_model import PeakMemory
from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.trainer import PairedBatch, StepMetrics, TrainConfig, Trainer, train


class Shape(NamedTuple):
    """One benchmarked crosscoder shape."""

    d_a: int
    d_b: int
    n_features: int
    k: int
    batch: int


PAPER_SCALE = Shape(4096, 4096, 131072, 200, 2048)
SCALED_DOWN = Shape(64, 64, 2048, 16, 256)
"""The paper-scale code path at a size a CPU runs in seconds (``--paper-scale --scaled-down``)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_batches(shape: Shape, n: int, seed: int = 0) -> Iterator[PairedBatch]:
    """``n`` paired batches of Gaussian activations, drawn as they are asked for (the run's data loader)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(shape.batch, shape.d_a, generator=g), torch.randn(shape.batch, shape.d_b, generator=g)


@dataclass
class RunTiming:
    """Where the wall time of one whole run went (seconds), measured around the trainer's public calls."""

    method: str
    steps: int
    tokens: int
    seconds: float
    """Wall time of the whole ``train(...)`` call."""
    first_step_s: float
    """The first step: it also initialises (scales, geometric median of ``b_dec``) and allocates Adam's moments."""
    annealing_steps_s: float
    """The other steps while k anneals (more active features per token)."""
    settled_steps_s: float
    """The steps at the final k."""
    auxk_s: float | None
    """AuxK's forward in the steps with dead features, timed around the trainer's AuxK function (None: no hook);
    its backward is inside the step's ``loss.backward()`` and cannot be told apart from outside."""
    auxk_steps: int
    data_s: float
    """Waiting for the next batch (drawing it)."""
    checkpoint_s: float
    checkpoints: int
    dead_fraction: float
    """Dead features at the last step."""
    peak_memory_bytes: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def other_s(self) -> float:
        """Trainer construction, loop, callbacks: the wall time no other entry accounts for."""
        accounted = self.first_step_s + self.annealing_steps_s + self.settled_steps_s + self.data_s + self.checkpoint_s
        return self.seconds - accounted

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"tokens_per_s": self.tokens_per_s, "other_s": self.other_s}


class _Turns:
    """Two runs in two threads that take turns, one step each, so that both see the same machine.

    Only the thread whose turn it is computes; the other waits on a condition. A run that ends
    hands the turn over for good.
    """

    def __init__(self, names: tuple[str, str]) -> None:
        self._names = names
        self._turn = names[0]
        self._done: set[str] = set()
        self._cond = threading.Condition()

    def _other(self, name: str) -> str:
        return self._names[1] if name == self._names[0] else self._names[0]

    def take(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == name or self._other(name) in self._done)

    def give_and_take(self, name: str) -> None:
        with self._cond:
            if self._other(name) in self._done:
                return
            self._turn = self._other(name)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._turn == name or self._other(name) in self._done)

    def finish(self, name: str) -> None:
        with self._cond:
            self._done.add(name)
            self._turn = self._other(name)
            self._cond.notify_all()


class _RunClock:
    """Timestamps a run's events from outside: batch handed over, step done, checkpoint written.

    With ``turns`` the run yields its turn before each batch after the first; the time it waits is
    not its own, so ``active_s`` sums only the stretches in which it ran.
    """

    def __init__(self, device: torch.device, name: str, turns: _Turns | None = None) -> None:
        self.device, self.name, self.turns = device, name, turns
        self.last = self.resumed = time.perf_counter()
        self.active_s = 0.0
        self.data_s = 0.0
        self.steps: list[tuple[float, StepMetrics]] = []
        self.checkpoints: list[float] = []

    def start(self) -> None:
        if self.turns is not None:
            self.turns.take(self.name)
        self.last = self.resumed = time.perf_counter()

    def stop(self) -> float:
        """End the run; returns its own wall time."""
        sync(self.device)
        self.active_s += time.perf_counter() - self.resumed
        if self.turns is not None:
            self.turns.finish(self.name)
        return self.active_s

    def batches(self, source: Iterable[PairedBatch]) -> Iterator[PairedBatch]:
        iterator = iter(source)
        while True:
            if self.turns is not None and self.steps:
                self.active_s += time.perf_counter() - self.resumed
                self.turns.give_and_take(self.name)
                self.last = self.resumed = time.perf_counter()
            start = time.perf_counter()
            item = next(iterator, None)
            self.last = time.perf_counter()
            self.data_s += self.last - start
            if item is None:
                return
            yield item

    def on_step(self, metrics: StepMetrics) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.steps.append((now - self.last, metrics))
        self.last = now

    def on_checkpoint(self, _path: Path) -> None:
        now = time.perf_counter()
        self.checkpoints.append(now - self.last)
        self.last = now


@contextlib.contextmanager
def timing_calls(owner: object, name: str, device: torch.device) -> Iterator[list[float] | None]:
    """Time every call of ``owner.name`` (a method or module function) while the block runs; None if it has none."""
    original = getattr(owner, name, None)
    if original is None:
        yield None
        return
    seconds: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        sync(device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync(device)
        seconds.append(time.perf_counter() - start)
        return out

    setattr(owner, name, timed)
    try:
        yield seconds
    finally:
        setattr(owner, name, original)


# Where each method's AuxK can be timed from outside (the trainer's is private: the one hook it offers).
AUXK = {"dfc": (Trainer, "_aux_loss"), "dense_baseline": (dense_run, "dense_aux_loss")}


@dataclass
class _Run:
    """One prepared run: call :meth:`go` to train, then :meth:`timing` to read where the time went."""

    method: str
    clock: _RunClock
    train: Callable[[], object]
    anneal_steps: int
    checkpoint_dir: Path
    seconds: float = 0.0

    def go(self) -> None:
        self.clock.start()
        try:
            self.train()
        finally:
            self.seconds = self.clock.stop()
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def timing(self, aux_seconds: list[float] | None, peak_bytes: int | None) -> RunTiming:
        durations = [d for d, _ in self.clock.steps]
        metrics = [m for _, m in self.clock.steps]
        dead_steps = [i for i, m in enumerate(metrics) if m.dead_fraction > 0]
        n = self.anneal_steps
        return RunTiming(
            method=self.method,
            steps=len(durations),
            tokens=sum(m.tokens for m in metrics),
            seconds=self.seconds,
            first_step_s=durations[0],
            annealing_steps_s=sum(durations[1:n]),
            settled_steps_s=sum(durations[max(1, n) :]),
            auxk_s=None if aux_seconds is None else sum(aux_seconds[i] for i in dead_steps if i < len(aux_seconds)),
            auxk_steps=len(dead_steps),
            data_s=self.clock.data_s,
            checkpoint_s=sum(self.clock.checkpoints),
            checkpoints=len(self.clock.checkpoints),
            dead_fraction=metrics[-1].dead_fraction,
            peak_memory_bytes=peak_bytes,
        )


def prepare_run(
    method: str,
    shape: Shape,
    *,
    device: torch.device,
    bf16: bool,
    steps: int,
    checkpoint_every: int,
    dead_after_tokens: int,
    workdir: Path,
    turns: _Turns | None = None,
    seed: int = 0,
) -> _Run:
    """A short run of ``method``: dfc through :func:`dfc.trainer.train`, or dense_baseline through ``dense_train``."""
    model = Crosscoder(
        CrosscoderConfig(d_a=shape.d_a, d_b=shape.d_b, n_features=shape.n_features, k=shape.k, architecture="dfc")
    )
    config = TrainConfig(
        steps=steps,
        device=str(device),
        bf16=bf16,
        checkpoint_every=checkpoint_every,
        dead_after_tokens=dead_after_tokens,
        log_every=0,
    )
    clock = _RunClock(device, method, turns)
    data = clock.batches(random_batches(shape, steps, seed))
    checkpoint_dir = workdir / f"{method}-checkpoint"
    run_loop = train if method == "dfc" else dense_train

    def go() -> object:
        return run_loop(
            model, data, config, checkpoint_dir=checkpoint_dir, on_step=clock.on_step,
            on_checkpoint=clock.on_checkpoint,
        )

    anneal_steps = config.resolved(model.config).k_anneal_steps or 0
    return _Run(method, clock, go, anneal_steps, checkpoint_dir)


def whole_run(method: str, shape: Shape, **settings: Any) -> RunTiming:
    """One short run of ``method`` alone, with its peak memory (``settings``: see :func:`prepare_run`)."""
    run = prepare_run(method, shape, **settings)
    device = settings["device"]
    peak = PeakMemory(device)
    with timing_calls(*AUXK[method], device) as aux_seconds:
        peak.reset()
        run.go()
        peak_bytes = peak.peak()
    return run.timing(aux_seconds, peak_bytes)


def runs_in_turns(shape: Shape, **settings: Any) -> dict[str, RunTiming]:
    """A run of the DFC and one of the baseline taking turns step by step (``settings``: see :func:`prepare_run`).

    The DFC's ``train(...)`` runs in a second thread; only one of the two computes at any moment,
    so a change in the machine's load falls on both alike. Each run's time is the sum of its turns.
    """
    turns = _Turns(("dfc", "dense_baseline"))
    runs = {m: prepare_run(m, shape, turns=turns, **settings) for m in AUXK}
    errors: list[BaseException] = []

    def sparse() -> None:
        try:
            runs["dfc"].go()
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)

    device = settings["device"]
    with timing_calls(*AUXK["dfc"], device) as aux_sparse, timing_calls(*AUXK["dense_baseline"], device) as aux_dense:
        thread = threading.Thread(target=sparse, name="dfc-run")
        thread.start()
        try:
            runs["dense_baseline"].go()
        finally:
            thread.join()
    if errors:
        raise errors[0]
    return {
        "dfc": runs["dfc"].timing(aux_sparse, None),
        "dense_baseline": runs["dense_baseline"].timing(aux_dense, None),
    }


def whole_runs(
    shape: Shape,
    *,
    device: torch.device,
    bf16: bool,
    runs: int,
    steps: int,
    checkpoint_every: int,
    dead_after_tokens: int,
    in_turns: bool = False,
) -> dict[str, Any]:
    """``runs`` rounds of a whole run of the DFC and of the baseline; mean and best of each.

    By default each run is alone on the machine and the methods alternate run by run. ``in_turns``
    makes them take turns step by step instead (:func:`runs_in_turns`): robust to load that comes
    and goes, but the DFC's small steps then share the caches with the baseline's large ones, which
    measured ~25-30% slower DFC steps on a quiet machine (RESULTS.md).
    """
    timings: dict[str, list[RunTiming]] = {"dfc": [], "dense_baseline": []}
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        for round_ in range(runs):
            settings: dict[str, Any] = {
                "device": device,
                "bf16": bf16,
                "steps": steps,
                "checkpoint_every": checkpoint_every,
                "dead_after_tokens": dead_after_tokens,
                "workdir": Path(tmp),
            }
            if in_turns:
                pair = runs_in_turns(shape, **settings)
            else:
                pair = {}
                for method in timings:
                    pair[method] = whole_run(method, shape, **settings)
                    release(device)
            for method, timing in pair.items():
                timings[method].append(timing)
            rates = ", ".join(f"{m} {t.tokens_per_s:.0f}" for m, t in pair.items())
            print(f"  {tuple(shape)} run {round_ + 1}/{runs}: tokens/s {rates}", flush=True)
            release(device)
    summary: dict[str, Any] = {
        "steps": steps,
        "checkpoint_every": checkpoint_every,
        "dead_after_tokens": dead_after_tokens,
        "runs": runs,
        "interleaving": (
            "steps: the two runs take turns step by step (one computes at a time)"
            if in_turns
            else "runs: each run alone, the methods alternating run by run"
        ),
    }
    for method, rounds in timings.items():
        rates = [t.tokens_per_s for t in rounds]
        summary[method] = {
            "tokens_per_s_mean": sum(rates) / len(rates),
            "tokens_per_s_best": max(rates),
            "rounds": [t.to_json() for t in rounds],
        }
    summary["speedup_vs_dense"] = summary["dfc"]["tokens_per_s_mean"] / summary["dense_baseline"]["tokens_per_s_mean"]
    summary["speedup_vs_dense_best"] = (
        summary["dfc"]["tokens_per_s_best"] / summary["dense_baseline"]["tokens_per_s_best"]
    )
    return summary
