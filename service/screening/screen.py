"""`dfc-audit screen`: watch Hub organisations for new releases and submit one audit per new (model, revision).

One pass: for each watch-list entry, list the author's models newest first (``HfApi.list_models``) down to
the entry's watermark, filter them (decoder-only causal LM, safetensors size, gated/private, custom code),
and POST each survivor to the API with ``Idempotency-Key: screen:{model}@{sha}``. State lives in the bucket:

- ``screening/watermark.json``: per entry, the newest ``lastModified`` already screened. Only advanced
  after the entry's models were all handled, so a crash means a re-scan, never a missed model.
- ``screening/claims/{model}@{sha}.json``: written with a conditional put before a POST, so concurrent
  runs never both submit a model; the API's idempotency key is the backstop if a claim is lost.
- ``screening/runs/{timestamp}-{run}.json`` and ``screening/latest.json``: the run's summary
  (``service.screening.summary``), which the API's ``/metrics`` reads.

The CLI (``main``) logs one line per pass: seen, submitted, skipped by reason, errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

import httpx
from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from huggingface_hub.hf_api import ModelInfo
from pydantic import ValidationError

from service.screening.summary import LATEST_KEY as LATEST_KEY
from service.screening.summary import (
    ModelResult,
    Outcome,
    Reason,
    ScreeningSummary,
    SkipReason,
    read_latest,
    write_summary,
)
from service.screening.summary import latest_summary as latest_summary
from service.screening.watchlist import WatchEntry, WatchList, WatchListError, load_watch_list
from workers.pipeline.status import now
from workers.storage import ObjectNotFound, ObjectStore, StorageError, open_store

log = logging.getLogger(__name__)

WATERMARK_KEY = "screening/watermark.json"
CLAIM_LEASE = dt.timedelta(hours=1)
"""A claim older than this that never became a submission (its run crashed) may be taken over."""
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
LIST_FIELDS = ["lastModified", "sha", "private", "gated"]
INFO_FIELDS = ["sha", "lastModified", "private", "gated", "pipeline_tag", "config", "safetensors", "tags"]

ClaimState = Literal["none", "submitted", "live", "stale"]
TAKEN: dict[str, tuple[SkipReason, str]] = {
    "submitted": ("already_submitted", "this revision was submitted by an earlier or parallel run"),
    "live": ("in_progress", "another run claimed this revision and is submitting it"),
}
"""Skip reason and detail for a revision whose claim another run holds."""


class SubmitError(Exception):
    """The API did not accept an audit; the message says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status, or None when the API was not reached."""


class AuditClient:
    """POSTs audits to the dfc-audit API with a bearer key (httpx, one connection pool per run)."""

    def __init__(self, api_url: str, api_key: str | None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=api_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def submit(self, body: dict[str, Any], idempotency_key: str) -> str:
        """Submit one audit and return its id; the same key always names the same audit."""
        try:
            response = self.http.post("/audits", json=body, headers={"Idempotency-Key": idempotency_key})
        except httpx.HTTPError as e:
            raise SubmitError(f"API at {self.http.base_url} unreachable: {e}") from e
        if response.is_success:
            return str(response.json().get("id"))
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:200]
        raise SubmitError(f"API answered {response.status_code}: {detail}", response.status_code)

    def close(self) -> None:
        """Release the connection pool."""
        self.http.close()


def causal_lm_problem(info: ModelInfo) -> str | None:
    """Why a model is not a decoder-only causal LM the audit can load, or None if it is one."""
    config = info.config or {}
    architectures = config.get("architectures") or []
    if config.get("is_encoder_decoder"):
        return "encoder-decoder model"
    if info.pipeline_tag not in (None, "text-generation"):
        return f"pipeline tag {info.pipeline_tag!r} is not text-generation"
    if not any(arch.endswith(CAUSAL_SUFFIXES) for arch in architectures):
        return f"architectures {architectures} include no *ForCausalLM"
    return None


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat() if when else None


class Screener:
    """One screening pass over a watch list; the Hub, the store and the API client are passed in."""

    def __init__(
        self,
        watch_list: WatchList,
        hub: HfApi,
        store: ObjectStore,
        submit: Callable[[dict[str, Any], str], str] | None,
        trusted_models: Sequence[str] = (),
        clock: Callable[[], dt.datetime] = now,
    ) -> None:
        self.watch_list, self.hub, self.store, self.submit = watch_list, hub, store, submit
        self.trusted = set(trusted_models)
        self.clock = clock
        self.run_id = uuid.uuid4().hex[:8]

    def run(self) -> ScreeningSummary:
        """Screen every entry, advance the watermarks, store and return the summary."""
        summary = ScreeningSummary(run_id=self.run_id, started_at=self.clock(), dry_run=self.submit is None)
        marks = self._read_watermarks()
        advanced: dict[str, str] = {}
        for entry in self.watch_list.watch:
            before = marks.get(entry.key)
            since = dt.datetime.fromisoformat(before) if before else self.watch_list.defaults.since(self.clock())
            results, newest = self._screen_entry(entry, since)
            summary.models.extend(results)
            # An entry with an error, or a model another run is still submitting, keeps its watermark: the
            # next run looks at those models again (claims and the idempotency key stop a second submission).
            clean = not any(r.outcome == "error" or r.reason == "in_progress" for r in results)
            after = _iso(newest) if newest and clean and self.submit is not None else before
            if after and after != before:
                advanced[entry.key] = after
            summary.watermarks[entry.key] = {"before": before, "after": after}
        if advanced:
            self._write_watermarks(advanced)
        summary.finished_at = self.clock()
        summary.tally()
        if self.submit is not None:
            summary.last_success_at = summary.finished_at if summary.succeeded else self._previous_success()
            write_summary(self.store, summary)
        return summary

    def _previous_success(self) -> dt.datetime | None:
        """When the last run without errors finished, as the stored latest summary says (None if unknown)."""
        try:
            previous = read_latest(self.store)
        except ValidationError as e:  # a storage error is not caught: writing this summary would fail too
            log.warning("the previous screening summary is unreadable, so the last success is unknown: %s", e)
            return None
        return previous.last_success_at if previous else None

    def _screen_entry(self, entry: WatchEntry, since: dt.datetime) -> tuple[list[ModelResult], dt.datetime | None]:
        """Handle the entry's models modified after ``since``; return the results and the newest time seen."""
        results: list[ModelResult] = []
        newest: dt.datetime | None = None
        listing = iter(self.hub.list_models(author=entry.author, sort="last_modified", expand=LIST_FIELDS))
        while True:
            try:
                listed = next(listing, None)  # pages are fetched lazily, so errors surface here
            except Exception as e:  # the Hub client's transport errors differ across its versions
                detail = f"listing {entry.author}'s models failed: {e}"
                results.append(self._entry_result(entry, "error", "hub_error", detail))
                break
            # Newest first: the first model at or before the watermark ends the scan (later pages are never
            # fetched). Equal counts as seen: the watermark is the newest time a run already handled.
            if listed is None or listed.last_modified is None or listed.last_modified <= since:
                break
            # Non-matching models advance the watermark too: the next listing can stop sooner.
            newest = max(newest or listed.last_modified, listed.last_modified)
            if not fnmatch.fnmatchcase(listed.id, entry.key):
                continue
            if len(results) >= self.watch_list.defaults.max_models:
                # A bound on one run (a first run over a busy org); older releases are left unscreened,
                # said so in the summary rather than blocking every later run on the same backlog.
                detail = f"stopped after {len(results)} models (max_models); older releases were not screened"
                log.warning("%s: %s", entry.key, detail)
                results.append(self._entry_result(entry, "skipped", "max_models", detail))
                break
            results.append(self._screen_model(entry, listed))
        return results, newest

    @staticmethod
    def _entry_result(entry: WatchEntry, outcome: Outcome, reason: Reason, detail: str) -> ModelResult:
        """A result about the entry as a whole rather than one model."""
        return ModelResult(
            model=entry.key, revision=None, watch=entry.key, outcome=outcome, reason=reason, detail=detail
        )

    def _screen_model(self, entry: WatchEntry, listed: ModelInfo) -> ModelResult:
        """Decide about one listed model and, if it passes, claim and submit it."""

        def result(
            outcome: Outcome, reason: Reason | None = None, detail: str | None = None, **extra: Any
        ) -> ModelResult:
            return ModelResult(
                model=listed.id,
                revision=listed.sha,
                watch=entry.key,
                outcome=outcome,
                reason=reason,
                detail=detail,
                **extra,
            )

        if listed.private:
            return result("skipped", "private", "private model: audits run on public releases only")
        if listed.gated and not self.watch_list.allow_gated(entry):
            return result("skipped", "gated", f"gated ({listed.gated}); set allow_gated once HF_TOKEN has access")
        if not listed.sha:
            return result("error", "hub_error", "the Hub listed the model without a commit sha")
        claim_key = f"screening/claims/{listed.id}@{listed.sha}.json"
        taken = self._claim_state(claim_key)
        if taken in ("submitted", "live"):
            return result("skipped", *TAKEN[taken])
        try:
            info = self.hub.model_info(listed.id, revision=listed.sha, expand=INFO_FIELDS)
        except GatedRepoError:
            return result("skipped", "gated", "gated: the token has no access")
        except RepositoryNotFoundError:
            return result("skipped", "not_found", "gone, or private to this token")
        except Exception as e:  # as above; the model is retried next run
            return result("error", "hub_error", f"model_info failed: {e}")
        problem = causal_lm_problem(info)
        if problem:
            return result("skipped", "not_causal_lm", problem)
        parameters = info.safetensors.total if info.safetensors else None
        if parameters is None:
            return result("skipped", "no_safetensors", "no safetensors weights: the audit loads safetensors only")
        limit = self.watch_list.max_parameters(entry)
        if parameters > limit:
            return result("skipped", "too_large", f"{parameters:,} parameters > limit {limit:,}", parameters=parameters)
        if (info.config or {}).get("auto_map") and listed.id not in self.trusted:
            return result(
                "skipped",
                "custom_code",
                "needs trust_remote_code; add it to DFC_TRUSTED_MODELS to allow it",
                parameters=parameters,
            )
        body = self.watch_list.audit_body(entry, listed.id, listed.sha)
        if self.submit is None:
            return result("skipped", "dry_run", "would be submitted", parameters=parameters)
        taken = self._claim(claim_key, listed.id, listed.sha)
        if taken is not None:
            return result("skipped", *TAKEN[taken], parameters=parameters)
        try:
            audit_id = self.submit(body, f"screen:{listed.id}@{listed.sha}")
        except SubmitError as e:
            if e.status == 409:  # the key already names an audit (submitted with an older watch list)
                self.store.put_json(claim_key, self._claim_body("submitted"))
                return result("skipped", "already_submitted", str(e), parameters=parameters)
            self.store.delete(claim_key)  # let the next run try again
            return result("error", "submit_failed", str(e), parameters=parameters)
        self.store.put_json(claim_key, self._claim_body("submitted", audit_id))
        log.info("submitted %s@%s as audit %s (against %s)", listed.id, listed.sha, audit_id, entry.reference)
        return result("submitted", None, f"audited against {entry.reference}", audit_id=audit_id, parameters=parameters)

    def _claim_body(self, state: str, audit_id: str | None = None) -> dict[str, Any]:
        return {"state": state, "run_id": self.run_id, "at": self.clock().isoformat(), "audit_id": audit_id}

    def _claim_state(self, key: str) -> ClaimState:
        """Whether a revision was submitted, is being submitted by a live run, or has a stale or no claim."""
        try:
            claim = self.store.get_json(key)
        except ObjectNotFound:
            return "none"
        if claim.get("state") == "submitted":
            return "submitted"
        return "live" if self.clock() - dt.datetime.fromisoformat(claim["at"]) < CLAIM_LEASE else "stale"

    def _claim(self, key: str, model: str, sha: str) -> ClaimState | None:
        """Take the claim for one revision (None), or say who has it; a stale claim (its run died) is taken over."""
        if self.store.put_json(key, self._claim_body("claimed"), if_absent=True):
            return None
        state = self._claim_state(key)
        if state in ("submitted", "live"):
            return state
        log.warning("taking over a stale claim for %s@%s; the idempotency key prevents a double audit", model, sha)
        self.store.put_json(key, self._claim_body("claimed"))
        return None

    def _read_watermarks(self) -> dict[str, str]:
        try:
            return dict(self.store.get_json(WATERMARK_KEY).get("entries", {}))
        except ObjectNotFound:
            return {}

    def _write_watermarks(self, advanced: dict[str, str]) -> None:
        """Merge into the stored watermarks, keeping the later time per entry (a parallel run may have written)."""
        entries = self._read_watermarks()
        for key, when in advanced.items():
            old = entries.get(key)
            if old is None or dt.datetime.fromisoformat(old) < dt.datetime.fromisoformat(when):
                entries[key] = when
        self.store.put_json(
            WATERMARK_KEY, {"entries": entries, "updated_at": self.clock().isoformat(), "run_id": self.run_id}
        )


def _parser() -> argparse.ArgumentParser:
    # Written in the style of the other dfc-audit commands (service/cli/main.py): lower-case help, defaults shown.
    parser = argparse.ArgumentParser(
        prog="dfc-audit screen",
        description="Watch Hugging Face organisations for new models and submit an audit of each against a "
        "trusted reference. Store, S3 and API-key settings come from the DFC_* variables (service/SETTINGS.md). "
        "Prints each pass's summary as JSON; exits 1 when a pass had errors, 2 on a bad watch list or setting.",
    )
    parser.add_argument("--watch-list", required=True, metavar="FILE",
                        help="YAML or JSON watch list (see service/screening/watchlist.py)")
    parser.add_argument("--api-url", default="http://127.0.0.1:8000", metavar="URL",
                        help="the dfc-audit API to submit to (default http://127.0.0.1:8000)")
    parser.add_argument("--hf-endpoint", default=None, metavar="URL",
                        help="the Hub's URL (default $HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="where watermarks and summaries go (default $DFC_STORE_URL)")
    parser.add_argument("--once", action="store_true", help="one pass, then exit (what the CronJob runs)")
    parser.add_argument("--interval", type=float, default=3600.0, metavar="SECONDS",
                        help="seconds between passes without --once (default 3600)")
    parser.add_argument("--dry-run", action="store_true", help="report what would be submitted; write nothing")
    return parser


def _run_pass(args: argparse.Namespace) -> ScreeningSummary:
    """Build the clients from the environment and run one pass."""
    from service.settings import Settings  # the CLI's other commands may run without it configured

    settings = Settings()
    watch_list = load_watch_list(args.watch_list)
    store = open_store(args.store or settings.store_url, **settings.store_settings())
    keys = settings.api_key_list()
    client = None if args.dry_run else AuditClient(args.api_url, keys[0] if keys else None)
    hub = HfApi(endpoint=args.hf_endpoint, library_name="dfc-audit")
    try:
        screener = Screener(watch_list, hub, store, client.submit if client else None, settings.trusted_model_list())
        return screener.run()
    finally:
        if client is not None:
            client.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dfc-audit screen``; returns 0 when every pass had no errors, 1 otherwise, 2 on bad config."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed = False
    while True:
        try:
            summary = _run_pass(args)
        except (WatchListError, ValidationError) as e:
            print(f"dfc-audit screen: configuration error: {e}", file=sys.stderr)
            return 2
        except StorageError as e:
            print(f"dfc-audit screen: storage error: {e}", file=sys.stderr)
            return 1
        print(json.dumps(summary.model_dump(mode="json"), indent=2))
        c = summary.counts
        log.info(
            "screening run %s: %d seen, %d submitted, %d skipped %s, %d errors",
            summary.run_id,
            c["seen"],
            c["submitted"],
            c["skipped"],
            summary.skipped_by_reason,
            c["errors"],
        )
        failed = failed or c["errors"] > 0
        if args.once:
            return 1 if failed else 0
        time.sleep(args.interval)
