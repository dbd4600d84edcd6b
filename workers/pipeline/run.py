"""The audit pipeline: eight stages run in order on Ray by one driver, the only writer of the audit's status.json.

extract → align → train → analyse → steer → scan → explain → publish. Each stage writes its outputs, then its manifest
``audits/{id}/stages/{stage}.json``; a stage whose manifest exists is skipped, so a crashed or cancelled audit
resumes where it stopped and nothing is computed twice. Stage names key the manifests and
``StageContext.outputs``; status.json speaks in states (``extracting``…), ``stage_seconds`` included.
The first three stages are in ``workers/pipeline/stages.py``; analyse and publish in ``workers/analysis/analyse.py``,
steer in ``workers/analysis/steer.py``, scan (the behaviour-first scan) in ``workers/analysis/scan.py`` and
explain (optional LLM explanations) in ``workers/analysis/explain.py``, imported when they run.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from workers.pipeline import actors
from workers.pipeline.actors import ensure_ray
from workers.pipeline.context import AuditCancelled, StageContext, StageFn
from workers.pipeline.stages import align_stage, extract_stage, train_stage
from workers.pipeline.status import AuditError, AuditState, AuditStatus, AuditStore, now
from workers.storage import StorageError, open_store

__all__ = ["STAGE_TABLE", "AuditCancelled", "Stage", "StageContext", "ensure_ray", "run_audit"]

log = logging.getLogger(__name__)


class Stage(NamedTuple):
    """One step of the pipeline: its name (manifest file, outputs key), its state, and its function."""

    name: str
    state: AuditState
    run: StageFn


def _deferred(name: str, module_name: str = "workers.analysis.analyse") -> StageFn:
    """A stage function imported when it runs (it pulls in the heavier analysis code)."""

    def run(ctx: StageContext) -> dict[str, Any]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name not in (module_name, "workers.analysis.analyse"):
                raise
            raise NotImplementedError(
                f"the {name.removesuffix('_stage')} stage is missing from this installation (no {exc.name}); "
                "install the full package, or stop the audit after training"
            ) from None
        stage: StageFn = getattr(module, name)
        return stage(ctx)

    run.__name__ = run.__qualname__ = name
    return run


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("extract", AuditState.EXTRACTING, extract_stage),
    Stage("align", AuditState.ALIGNING, align_stage),
    Stage("train", AuditState.TRAINING, train_stage),
    Stage("analyse", AuditState.ANALYSING, _deferred("analyse_stage")),
    Stage("steer", AuditState.STEERING, _deferred("steer_stage", "workers.analysis.steer")),
    Stage("scan", AuditState.SCANNING, _deferred("scan_stage", "workers.analysis.scan")),
    Stage("explain", AuditState.EXPLAINING, _deferred("explain_stage", "workers.analysis.explain")),
    Stage("publish", AuditState.PUBLISHING, _deferred("publish_stage")),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE)


def manifest_key(audit_id: str, stage: str, audits: AuditStore) -> str:
    """Where a stage's manifest lives (``audits/{id}/stages/{stage}.json``)."""
    return audits.key(audit_id, f"stages/{stage}.json")


def describe_failure(stage: str | None, exc: BaseException) -> AuditError:
    """The error a person reads in status.json: the failing stage, the underlying error class and its message."""
    kind = exc.kind if isinstance(exc, actors.WorkerFailed) else type(exc).__name__
    message = str(exc).strip() or f"{kind} without a message; see the driver's log for the traceback"
    return AuditError(stage=stage, type=kind, message=message)


def run_audit(
    audit_id: str,
    store_url: str | Path,
    store_settings: dict[str, Any] | None = None,
    *,
    work_dir: Path | None = None,
    stop_after: str | None = None,
) -> AuditStatus:
    """Run (or resume) the audit ``audit_id`` recorded in the store and return its final status.

    Failures end as state ``failed`` with an actionable ``error`` and cancellation as ``cancelled``; neither
    raises. ``stop_after`` (a stage name) returns once that stage is done, leaving the state at that stage for
    a later call to resume. Raises ``KeyError`` only when the store has no such audit.
    """
    if stop_after is not None and stop_after not in STAGE_NAMES:
        raise ValueError(f"stop_after={stop_after!r} is not a stage; use one of {', '.join(STAGE_NAMES)}")
    settings = dict(store_settings or {})
    store = open_store(store_url, **settings)
    audits = AuditStore(store)
    status = audits.status(audit_id)
    if status.state is AuditState.SUCCEEDED:
        return status
    if audits.cancel_requested(audit_id):
        return audits.update(audit_id, state=AuditState.CANCELLED, finished_at=status.finished_at or now())
    try:
        spec = audits.spec(audit_id)
    except (ValidationError, StorageError) as exc:  # written by an older or newer version, or damaged
        error = AuditError(type=type(exc).__name__, message=f"spec.json of audit {audit_id} is unusable: {exc}")
        return _finish(audits, status, state=AuditState.FAILED, error=error)
    ctx = StageContext(
        audit_id=audit_id,
        spec=spec,
        store=store,
        audits=audits,
        work_dir=Path(work_dir or Path(tempfile.gettempdir()) / "dfc-audit" / audit_id),
        store_url=store.url,  # absolute (file:///… or s3://…): workers may not share the caller's directory
        store_settings=settings,
        attempt=status.attempts + 1,
        counters=dict(status.counters),
    )
    audits.update(audit_id, attempts=ctx.attempt, started_at=status.started_at or now(), finished_at=None, error=None)
    stage_name: str | None = None
    try:
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        ensure_ray()
        for stage in STAGE_TABLE:
            stage_name = stage.name
            key = manifest_key(audit_id, stage.name, audits)
            if store.exists(key):
                ctx.outputs[stage.name] = store.get_json(key)
            else:
                ctx.check_cancelled()
                ctx.begin(stage.state)
                started = time.monotonic()
                manifest = stage.run(ctx)
                seconds = round(time.monotonic() - started, 3)
                manifest = {**manifest, "stage": stage.name, "seconds": seconds, "completed_at": now().isoformat()}
                store.put_json(key, manifest)  # written last: its presence means the stage's outputs are complete
                ctx.outputs[stage.name] = manifest
                ctx.end(seconds)
            if stage.name == stop_after:
                return audits.status(audit_id)
        published = ctx.outputs.get("publish", {})
        return audits.update(
            audit_id,
            state=AuditState.SUCCEEDED,
            progress=1.0,
            stage_progress=1.0,
            finished_at=now(),
            report_json=published.get("report_json", ctx.key("report/report.json")),
            report_html=published.get("report_html", ctx.key("report/report.html")),
        )
    except AuditCancelled:
        log.info("audit %s cancelled during %s", audit_id, stage_name)
        return _finish(audits, status, state=AuditState.CANCELLED)
    except Exception as exc:
        log.exception("audit %s failed in stage %s", audit_id, stage_name)
        return _finish(audits, status, state=AuditState.FAILED, error=describe_failure(stage_name, exc))


def _finish(audits: AuditStore, status: AuditStatus, **changes: Any) -> AuditStatus:
    """Write a final state; if storage itself is failing, return the status the driver would have written."""
    changes["finished_at"] = now()
    try:
        return audits.update(status.id, **changes)
    except (StorageError, KeyError, OSError) as exc:
        log.error("cannot record the outcome of audit %s in storage: %s", status.id, exc)
        return status.model_copy(update=changes)
