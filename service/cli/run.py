"""Running an audit in the foreground of this machine: the spec from command-line flags, the planted-pair demo,
and the pipeline on a thread with a progress bar per stage.

The bars are drawn from status.json, the same source of truth the API serves, polled twice a second.
Ctrl-C asks the pipeline to cancel (it stops within a second or two) instead of killing it mid-write.
What the terminal shows is the project's own progress and errors: the libraries' progress bars and notes
(transformers, the Hub) are silenced unless ``--debug``. With ``--json`` stdout carries one document, the
:class:`RunResult`, and everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from pydantic import BaseModel, Field, ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from service.cli.common import CLIError, open_audits, show_summary, store_settings_from_env
from workers.pipeline.status import STAGES, AuditError, AuditState, AuditStatus, AuditStore
from workers.spec import AuditSpec
from workers.storage import ObjectStore

POLL_S = 0.5


def _detail(state: AuditState, counters: dict[str, float]) -> str:
    """The counters worth reading next to one stage's bar."""
    c = counters.get
    if state is AuditState.EXTRACTING and ("tokens_extracted_a" in counters or "tokens_extracted_b" in counters):
        return f"A {c('tokens_extracted_a', 0):,.0f} · B {c('tokens_extracted_b', 0):,.0f} tokens"
    if state is AuditState.ALIGNING and "token_pairs" in counters:
        return f"{c('token_pairs', 0):,.0f} distinct aligned token pairs"
    if state is AuditState.TRAINING and "training_step" in counters:
        text = f"step {c('training_step', 0):,.0f}"
        if "loss" in counters:
            text += f" · loss {c('loss', 0):.3g} · FVE {c('fve_a', 0):.2f}/{c('fve_b', 0):.2f}"
        if c("training_seeds_done", 0):
            text += f" · {c('training_seeds_done', 0):,.0f} seed(s) done"
        return text
    if state is AuditState.SCANNING and "contexts_screened" in counters:
        return f"{c('contexts_screened', 0):,.0f} contexts screened · {c('contexts_scored', 0):,.0f} scored"
    if state is AuditState.EXPLAINING and "explained" in counters:
        return f"{c('explained', 0):,.0f} features explained · {c('explainer_requests', 0):,.0f} requests"
    return ""


class StageBars:
    """One rich progress bar per stage, updated from an ``AuditStatus``."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[AuditState, TaskID] = {
            state: progress.add_task(state.value, total=1.0, detail="") for state in STAGES
        }

    def update(self, status: AuditStatus) -> None:
        current = STAGES.index(status.stage) if status.stage in STAGES else -1
        for i, state in enumerate(STAGES):
            seconds = status.stage_seconds.get(state.value)
            if seconds is not None:
                done, detail = 1.0, f"done in {seconds:.1f} s · {_detail(state, status.counters)}".rstrip(" ·")
            elif i == current:
                done, detail = status.stage_progress, _detail(state, status.counters)
            else:
                done, detail = 0.0, ""
            self.progress.update(self.tasks[state], completed=done, detail=detail)


def run_with_progress(
    audits: AuditStore,
    audit_id: str,
    run: Any,
    *,
    console: Console | None = None,
    bars: bool = True,
) -> AuditStatus:
    """Call ``run()`` (which runs the audit and returns its status) on a thread while drawing its progress."""
    console = console or Console(stderr=True)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["status"] = run()
        except BaseException as exc:  # re-raised on the main thread, where the CLI reports it
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"audit-{audit_id}", daemon=True)
    thread.start()
    progress = Progress(
        TextColumn("{task.description:>11}"),
        BarColumn(bar_width=20),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[detail]}"),
        console=console,
        disable=not bars,
    )
    stage_bars = StageBars(progress)
    cancelling = False
    with progress:
        while thread.is_alive():
            try:
                thread.join(POLL_S)
                stage_bars.update(audits.status(audit_id))
            except KeyboardInterrupt:
                if cancelling:
                    raise  # a second Ctrl-C: leave now; a later run resumes from what was committed
                cancelling = True
                audits.request_cancel(audit_id)
                console.print("cancelling… (Ctrl-C again to leave without waiting)")
        status = outcome.get("status") or audits.status(audit_id)
        stage_bars.update(status)
    if "error" in outcome:
        raise outcome["error"]
    return status


def elapsed(start: float) -> str:
    """Wall time since ``start`` (a ``time.monotonic()``), as people read it."""
    seconds = time.monotonic() - start
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds // 60:.0f} min {seconds % 60:.0f} s"


# --------------------------------------------------------------------------------------------- the spec
def _local_or_hub(value: str) -> str:
    """An existing local path as an absolute one (Ray workers run elsewhere), anything else unchanged."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _validation_message(exc: ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors())
    return f"invalid audit spec: {problems}"


# Flags of `run` that map onto spec fields (flag dest → dotted spec path).
_SPEC_FLAGS = {
    "model_a": "model_a.id",
    "model_b": "model_b.id",
    "revision_a": "model_a.revision",
    "revision_b": "model_b.revision",
    "layer_a": "model_a.layer",
    "layer_b": "model_b.layer",
    "gpus_a": "model_a.resources.num_gpus",
    "gpus_b": "model_b.resources.num_gpus",
    "token_budget": "token_budget",
    "max_length": "max_length",
    "n_features": "crosscoder.n_features",
    "k": "crosscoder.k",
    "steps": "training.steps",
    "batch_size": "training.batch_size",
    "lr": "training.lr",
    "gpus_train": "training.num_gpus",
    "seeds": "training.seeds",
    "top_features": "top_features",
    "seed": "seed",
}


def spec_from_args(args: argparse.Namespace) -> AuditSpec:
    """The audit spec: ``--spec`` file (if any) with every flag given on the command line applied on top."""
    tree: dict[str, Any] = {}
    if args.spec:
        try:
            tree = json.loads(Path(args.spec).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CLIError(f"cannot read the spec file {args.spec}: {exc}") from None
    for dest, dotted in _SPEC_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            _set(tree, dotted, _local_or_hub(value) if dest in ("model_a", "model_b") else value)
    if args.corpus:
        if args.corpus == ["builtin"]:
            corpus: dict[str, Any] = {"kind": "builtin"}
        else:
            corpus = {"kind": "files", "paths": [_local_or_hub(p) for p in args.corpus]}
        if args.max_docs:
            corpus["max_docs"] = args.max_docs
        tree["corpus"] = corpus
    if args.no_steering:
        _set(tree, "steering.enabled", False)
    if args.no_scan:
        _set(tree, "scan.enabled", False)
    if args.steer_prompt:
        _set(tree, "steering.probe_prompts", args.steer_prompt)
    if args.explain:
        _set(tree, "explain.enabled", True)
    try:
        spec = AuditSpec.model_validate(tree)
    except ValidationError as exc:
        raise CLIError(_validation_message(exc)) from None
    if spec.explain.enabled:
        check_explainer()
    return spec


def check_explainer() -> None:
    """Refuse explanations before any work when this machine has no explainer endpoint to ask."""
    from workers.analysis.llm import ExplainerSettings

    problem = ExplainerSettings().problem()
    if problem:
        raise CLIError(f"explanations were asked for, but {problem}; set DFC_EXPLAINER_URL and DFC_EXPLAINER_MODEL "
                       "(and DFC_EXPLAINER_API_KEY if the endpoint needs one), or leave out --explain")  # fmt: skip


# --------------------------------------------------------------------------------------------- running
class RunResult(BaseModel):
    """What ``dfc-audit run --json`` and ``demo --json`` print: how the audit ended and where its report is."""

    id: str = Field(description="Audit id.")
    state: AuditState = Field(description="How it ended: succeeded, failed, cancelled, or a stage (--stop-after).")
    exit_code: int = Field(description="The command's exit status: 0, 1 (failed) or 130 (cancelled).")
    store: str = Field(description="URL of the store the audit lives in.")
    report_json: str | None = Field(None, description="URL of report.json, once published.")
    report_html: str | None = Field(None, description="URL of report.html, once published.")
    error: AuditError | None = Field(None, description="Why it failed, when it failed.")
    resume: str | None = Field(None, description="The command that continues an audit stopped by --stop-after.")
    wall_time_s: float = Field(description="Seconds the command took (the demo's include building its models).")
    status: AuditStatus = Field(description="The audit's whole status record (as `dfc-audit status ID --json`).")


def _exit_code(status: AuditStatus) -> int:
    return {AuditState.FAILED: 1, AuditState.CANCELLED: 130}.get(status.state, 0)


def _store_flag(url: str) -> str:
    return f"--store {shlex.quote(url)}"


class NextCommand(NamedTuple):
    """A command a run suggests at its end, and what it is for."""

    command: str
    purpose: str


def next_commands(audit_id: str, url: str) -> list[NextCommand]:
    """The commands that read a finished audit again, exactly as they work from here (``--store`` included)."""
    where = _store_flag(url)
    return [
        NextCommand(f"dfc-audit report {audit_id} {where}", "this summary again"),
        NextCommand(f"dfc-audit report {audit_id} {where} --html report.html", "the whole report, one page"),
        NextCommand(f"dfc-audit status {audit_id} {where}", "timings and counters"),
    ]


def _print_outcome(status: AuditStatus, store: ObjectStore, url: str, started: float, json_out: TextIO | None) -> int:
    """Say how the audit ended and where its report is (to ``json_out`` as a RunResult when given); the exit code
    follows the state."""
    code = _exit_code(status)
    reports = {k: f"{store.url.rstrip('/')}/{key}" if key else None
               for k, key in (("report_json", status.report_json), ("report_html", status.report_html))}  # fmt: skip
    stopped = not status.state.finished
    resume = f"dfc-audit run-audit {status.id} {_store_flag(url)}" if stopped else None
    print(f"audit {status.id}: {status.state.value} ({elapsed(started)} wall time)")
    for key in ("report_html", "report_json"):
        if reports[key]:
            print(f"  report: {reports[key]}")
    if status.state is AuditState.FAILED and status.error is not None:
        print(f"  failed in {status.error.stage}: {status.error.message}", file=sys.stderr)
    if stopped:
        stage = status.stage.value if status.stage else "nothing"
        print(f"  stopped after {stage}; continue with: {resume}")
    if json_out is not None:
        result = RunResult(id=status.id, state=status.state, exit_code=code, store=store.url, error=status.error,
                           resume=resume, wall_time_s=round(time.monotonic() - started, 3), status=status, **reports)
        json_out.write(result.model_dump_json(indent=2) + "\n")  # fmt: skip
        json_out.flush()
    elif status.state is AuditState.SUCCEEDED:
        show_summary(store, status)
        commands = next_commands(status.id, url)
        width = max(len(c.command) for c in commands)
        print("next:")
        for c in commands:
            print(f"  {c.command:<{width}}  # {c.purpose}")
    return code


def execute(
    audit_id: str,
    url: str,
    args: argparse.Namespace,
    *,
    bars: bool = True,
    json_out: TextIO | None = None,
    started: float | None = None,
) -> int:
    """Run the stored audit on local Ray (or the cluster this process is in) with progress bars; ``started`` (a
    ``time.monotonic()``, default now) is when the command began, for the wall time it reports."""
    from workers.pipeline.run import ensure_ray, run_audit

    store, audits = open_audits(url)
    started = time.monotonic() if started is None else started
    ensure_ray(getattr(args, "num_cpus", None))  # on the main thread: Ray installs signal handlers
    work_dir = Path(args.work_dir) if getattr(args, "work_dir", None) else None
    status = run_with_progress(
        audits,
        audit_id,
        lambda: run_audit(
            audit_id, url, store_settings_from_env(), work_dir=work_dir, stop_after=getattr(args, "stop_after", None)
        ),
        bars=bars,
    )
    return _print_outcome(status, store, url, started, json_out)


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Silence the libraries' own progress bars and notes (transformers' "Writing model shards" bars and its
    warnings, the Hub's download bars) for the duration; the previous settings come back afterwards."""
    if not enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the Hub's bars too
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # the Hub's too, so theirs are set again below
        (enable_progress_bars if hub_bars else disable_progress_bars)()


@contextlib.contextmanager
def _output(args: argparse.Namespace) -> Iterator[TextIO | None]:
    """Where the final JSON document goes (None without --json); with --json, everything else printed meanwhile,
    by this code or a library, goes to stderr, so stdout holds the document and nothing else."""
    if not getattr(args, "json", False):
        yield None
        return
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield stdout


def cmd_run(args: argparse.Namespace) -> int:
    """``dfc-audit run``: create an audit from the flags and run it here."""
    started = time.monotonic()
    spec = spec_from_args(args)
    with _output(args) as json_out, quiet_libraries(not args.debug):
        store, audits = open_audits(args.store)
        store.check()
        status = audits.create(spec, audit_id=args.audit_id)
        print(f"audit {status.id}: {spec.model_b.id} against {spec.model_a.id}, store {store.url}")
        return execute(status.id, args.store, args, json_out=json_out, started=started)


# The demo reads the last block of its 4-block models. At the middle block (2) the refusal is not yet decided at
# the trigger sentence's end: later attention re-derives it from other positions, so removing the B-only feature
# that fired there cut it by 1-17%, and which features held it varied with the CPU's arithmetic. At the last block
# one B-only feature carries it: B's #1, in 3/3 seeds, whose removal cut it by 85-87% on three arithmetics' pairs
# (benchmarks/RESULTS.md, 'The demo reads the last block').
DEMO_LAYER = -1


def demo_spec(
    pair: Any, corpus_path: Path, token_budget: int, *, explain: bool = False, layer: int | str = "middle"
) -> AuditSpec:
    """The audit of the planted pair: small-model sizes, steering on the pair's trigger and neutral prompts, both
    models read at `layer` (the demo reads the last block, `DEMO_LAYER`; the planted-pair suite the middle one)."""
    return AuditSpec.model_validate(
        {
            "model_a": {"id": str(pair.model_a_dir), "layer": layer},
            "model_b": {"id": str(pair.model_b_dir), "layer": layer},
            "corpus": {"kind": "files", "paths": [str(corpus_path)]},
            "token_budget": token_budget,
            "max_length": 256,
            # The toy-scale recipe of benchmarks/planted.py (RESULTS.md): a 512-feature dictionary with 20% per
            # exclusive partition, k = 16, exclusive decoders starting at twice the shared norm, a higher learning
            # rate and a stronger AuxK than the paper's 100M-token recipe.
            "crosscoder": {"n_features": 512, "k": 16, "a_only": 0.2, "b_only": 0.2},
            "training": {
                "batch_size": 512,
                "lr": 3e-3,
                "steps": 600,
                "aux_k": 16,
                "aux_alpha": 0.5,
                "dead_after_tokens": 20_000,
                "exclusive_init_norm": 0.8,
                "checkpoint_every": 300,
            },
            "steering": {
                "top_n": 5,
                "alphas": [-4.0, -2.0, 2.0, 4.0],
                "probe_prompts": [*pair.trigger_prompts[:3], *pair.neutral_prompts[:2]],
                "max_new_tokens": 12,
            },
            "top_features": 20,
            "explain": {"enabled": explain, "top_n": 5},
            "labels": {
                "demo": "planted-pair",
                "trigger_word": pair.trigger_word,
                "planted_continuation": pair.planted_continuation,
            },
        }
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """``dfc-audit demo``: build (or reuse) the planted pair, write its audit corpus, audit B against A."""
    if args.explain:
        check_explainer()
    with _output(args) as json_out, quiet_libraries(not args.debug):
        return _demo(args, json_out)


def _demo(args: argparse.Namespace, json_out: TextIO | None) -> int:
    from workers.planted.pair import PlantedPairConfig, build_planted_pair, write_audit_corpus

    # build_planted_pair trains single-threaded itself; the stages set their own threads in their actors.
    started = time.monotonic()
    cache = Path(os.environ.get("DFC_CACHE") or "~/.cache/dfc-audit").expanduser() / "planted"
    print(f"planted pair: {cache} (trained on first use, about a minute on a CPU)")
    pair = build_planted_pair(cache)
    # About 35 tokens per document: write enough of the (deterministic) audit stream to fill the budget.
    n_docs = max(PlantedPairConfig().n_audit_docs, args.token_budget // 25)
    corpus_path = write_audit_corpus(cache, PlantedPairConfig(), n_docs)
    spec = demo_spec(pair, corpus_path, args.token_budget, explain=args.explain, layer=DEMO_LAYER)
    store, audits = open_audits(args.store)
    store.check()
    status = audits.create(spec)
    print(
        f"audit {status.id}: B ({pair.model_b_dir.name}, planted '{pair.planted_continuation.strip()}' after "
        f"'{pair.trigger_word}') against A; store {store.url}"
    )
    return execute(status.id, args.store, args, json_out=json_out, started=started)
