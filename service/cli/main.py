"""``dfc-audit``: audit two models on this machine, run the offline demo, serve the API, read audits.

Every subcommand works on the same store layout as the API (a local folder or an S3 bucket: ``--store`` or
``DFC_STORE_URL``; S3 settings from ``DFC_S3_ENDPOINT_URL``, ``DFC_S3_REGION``, ``DFC_S3_ACCESS_KEY``,
``DFC_S3_SECRET_KEY`` or boto3's usual chain). Heavy modules (torch, Ray, uvicorn) are imported by the
subcommands that need them, so ``--help`` and ``status`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.cli.common import DEFAULT_STORE, DEMO_STORE, CLIError, open_audits, show_summary
from workers.pipeline.status import AuditState, AuditStatus, AuditStore
from workers.spec import AuditSpec, ModelRef, Resources, TrainingSpec


def _layer(value: str) -> int | str:
    return value if value == "middle" else int(value)


def version() -> str:
    """The installed distribution's version (what ``dfc-audit --version`` prints)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dfc-audit")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _default(model: type[Any], field: str, shown: str = "{:,}") -> str:
    """A spec field's default as the help shows it, read from the spec (its one source of truth)."""
    return shown.format(model.model_fields[field].default)


# --------------------------------------------------------------------------------------------- commands
def _lazy(name: str) -> Any:
    """A command of ``service.cli.run``, imported when it runs (it pulls in the pipeline, Ray and torch)."""

    def command(args: argparse.Namespace) -> int:
        from service.cli import run as cli_run

        return int(getattr(cli_run, name)(args))

    return command


def cmd_run_audit(args: argparse.Namespace) -> int:
    url = args.store or os.environ.get("DFC_STORE_URL")
    if not url:
        raise CLIError("no store: set DFC_STORE_URL (s3://bucket/prefix or a folder) or pass --store")
    _, audits = open_audits(url)
    if not audits.exists(args.audit_id):
        raise CLIError(f"no audit {args.audit_id!r} in {url}; check the id and DFC_STORE_URL")
    from service.cli.run import execute

    return execute(args.audit_id, url, args, bars=sys.stderr.isatty())


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app

    app = create_app()  # here, not in uvicorn: a settings mistake then reads as one line, not a traceback
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _status_of(audits: AuditStore, audit_id: str, url: str) -> AuditStatus:
    try:
        return audits.status(audit_id)
    except KeyError:
        raise CLIError(f"no audit {audit_id!r} in {url}; list them with `dfc-audit status --store {url}`") from None


def cmd_status(args: argparse.Namespace) -> int:
    _, audits = open_audits(args.store)
    if args.audit_id is None:
        ids = list(audits.ids())[: args.limit]
        for audit_id in ids:
            s = audits.status(audit_id)
            print(f"{s.id}  {s.state.value:<10}  {s.progress:6.1%}  {s.stage.value if s.stage else '-'}")
        if not ids:
            hint = ""
            if Path(DEMO_STORE).is_dir() and Path(args.store).expanduser().resolve() != Path(DEMO_STORE).resolve():
                hint = f"; the demo's audits are in {DEMO_STORE}: dfc-audit status --store {DEMO_STORE}"
            print(f"no audits in {args.store}{hint}", file=sys.stderr)
        return 0
    status = _status_of(audits, args.audit_id, args.store)
    if args.json:
        print(status.model_dump_json(indent=2))
        return 0
    print(f"audit {status.id}: {status.state.value} ({status.progress:.1%})")
    if status.stage is not None:
        print(f"  stage: {status.stage.value} {status.stage_progress:.0%}")
    for name, value in sorted(status.counters.items()):
        print(f"  {name}: {value:,.4g}")
    for name, seconds in status.stage_seconds.items():
        print(f"  {name} took {seconds:.1f} s")
    if status.error is not None:
        print(f"  error in {status.error.stage} ({status.error.type}): {status.error.message}")
    for label, key in (("report.json", status.report_json), ("report.html", status.report_html)):
        if key:
            print(f"  {label}: {key}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    store, audits = open_audits(args.store)
    status = _status_of(audits, args.audit_id, args.store)
    if status.state is not AuditState.SUCCEEDED or not status.report_json:
        raise CLIError(f"audit {status.id} has no report yet (state: {status.state.value}); wait until it succeeds")
    if args.html:
        if not status.report_html:
            raise CLIError(f"audit {status.id} has no HTML report")
        store.download_file(status.report_html, Path(args.html))
        print(f"wrote {args.html}")
    elif args.json:
        print(json.dumps(store.get_json(status.report_json), indent=2))
    else:
        show_summary(store, status)
    return 0


# --------------------------------------------------------------------------------------------- parser
_SERVICE_COMMANDS = """service commands (not listed above):
  run-audit ID   run or resume the stored audit ID: what the API's Ray jobs run, and how a `run --stop-after`
                 audit continues

Each command has --help. Errors print one line (--debug shows the traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfc-audit",
        description="Diff two LLMs with Dedicated Feature Crosscoders: find what model B learnt that model A did not.",
        epilog=_SERVICE_COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors, and the libraries' logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    store_help = f"storage URL or folder (s3://bucket/prefix, file:///path; default $DFC_STORE_URL or {DEFAULT_STORE})"
    default_store = os.environ.get("DFC_STORE_URL", DEFAULT_STORE)
    training, model = TrainingSpec, ModelRef

    def runner_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--work-dir", metavar="DIR", help="local scratch folder (default: a temp folder per audit)")
        p.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the local Ray instance (default: all cores)")
        p.add_argument("--stop-after", choices=["extract", "align", "train", "analyse", "steer", "explain"],
                       help="stop after this stage (run-audit continues it)")

    def outcome_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--explain", action="store_true", help="have the LLM at DFC_EXPLAINER_URL explain the top "
                       "features and judge each explanation (off by default; see SETTINGS.md)")
        p.add_argument("--json", action="store_true", help="print only how the audit ended and where its report is, "
                       "as one JSON document on stdout (progress and messages go to stderr)")

    run = sub.add_parser("run", help="audit model B against model A on this machine",
                         description="Audit model B against the trusted model A on a local Ray instance. "
                         "Flags override the fields of --spec.")
    run.add_argument("--spec", metavar="FILE", help="audit spec JSON file (the API's request body)")
    run.add_argument("--model-a", metavar="ID", help="trusted reference model: hub id (org/name) or local folder")
    run.add_argument("--model-b", metavar="ID", help="model under audit: hub id or local folder")
    for side in ("a", "b"):
        run.add_argument(f"--revision-{side}", metavar="REV", help=f"branch, tag or 40-hex commit of model "
                         f"{side.upper()} (default {_default(model, 'revision', '{}')})")
    for side in ("a", "b"):
        run.add_argument(f"--layer-{side}", type=_layer, metavar="LAYER", help=f"layer of model {side.upper()}: "
                         f'index, negative index or "middle" (default {_default(model, "layer", "{}")})')
    run.add_argument("--corpus", nargs="+", metavar="PATH",
                     help='.txt/.jsonl files, folders or globs both models read, or "builtin" (default)')
    run.add_argument("--max-docs", type=int, metavar="N", help="read at most this many corpus documents (default all)")
    run.add_argument("--token-budget", type=int, metavar="N",
                     help=f"tokens extracted per model (default {_default(AuditSpec, 'token_budget')})")
    run.add_argument("--max-length", type=int, metavar="N",
                     help=f"tokens kept per document (default {_default(AuditSpec, 'max_length')})")
    run.add_argument("--n-features", type=int, metavar="N",
                     help="dictionary size (default 32x the wider model, at most 131,072)")
    run.add_argument("--k", type=int, metavar="N", help="active features per token (default n_features / 256, "
                     "at least 4; 200 from 65,536 features; at most n_features / 4)")
    epochs = _default(training, "epochs", "{:g}")
    run.add_argument("--steps", type=int, metavar="N", help=f"training steps (default {epochs} epochs of the pairs)")
    run.add_argument("--batch-size", type=int, metavar="N",
                     help=f"token pairs per training step (default {_default(training, 'batch_size')})")
    run.add_argument("--lr", type=float, help=f"peak learning rate (default {_default(training, 'lr', '{:g}')})")
    for side in ("a", "b"):
        run.add_argument(f"--gpus-{side}", type=float, metavar="N", help=f"GPUs for model {side.upper()}'s "
                         f"extraction (default {_default(Resources, 'num_gpus', '{:g}')})")
    run.add_argument("--seeds", type=int, metavar="N", help="crosscoders of the seed ensemble; a finding's stability "
                     f"is the share that have it (default {_default(training, 'seeds')}; 1: one crosscoder)")
    run.add_argument("--gpus-train", type=float, metavar="N",
                     help=f"GPUs for training (default {_default(training, 'num_gpus', '{:g}')})")
    run.add_argument("--top-features", type=int, metavar="N",
                     help=f"features per model analysed and reported (default {_default(AuditSpec, 'top_features')})")
    run.add_argument("--steer-prompt", action="append", metavar="TEXT",
                     help="extra prompt for steering generations (repeatable; default none)")
    run.add_argument("--no-steering", action="store_true", help="skip the steering stage")
    run.add_argument("--no-scan", action="store_true", help="skip the behaviour-first scan (divergent contexts)")
    run.add_argument("--seed", type=int, metavar="N",
                     help=f"seed of initialisation and data order (default {_default(AuditSpec, 'seed')})")
    run.add_argument("--audit-id", metavar="ID", help="id for the new audit (default: time + random)")
    run.add_argument("--store", default=default_store, metavar="URL", help=store_help)
    runner_options(run)
    outcome_options(run)
    run.set_defaults(func=_lazy("cmd_run"))

    demo = sub.add_parser("demo", help="audit the built-in planted-behaviour model pair (offline)",
                          description="Train (once, cached in $DFC_CACHE or ~/.cache/dfc-audit) two tiny models, "
                          "B with a planted response to a trigger word, and audit B against A end to end. It ends "
                          "by printing the commands that read the audit again.")
    demo.add_argument("--store", default=DEMO_STORE, metavar="URL",
                      help=f"folder or URL for the demo's audit (default {DEMO_STORE})")
    demo.add_argument("--token-budget", type=int, default=60_000, metavar="N",
                      help="tokens extracted per model (default 60,000)")
    runner_options(demo)
    outcome_options(demo)
    demo.set_defaults(func=_lazy("cmd_demo"))

    status = sub.add_parser("status", help="show an audit's status (or list audits)",
                            description="Show the status of AUDIT_ID, or list the latest audits without one.")
    status.add_argument("audit_id", nargs="?", help="audit id (omit to list the latest audits)")
    status.add_argument("--store", default=default_store, metavar="URL", help=store_help)
    status.add_argument("--json", action="store_true", help="print status.json as stored")
    status.add_argument("--limit", type=int, default=20, metavar="N", help="audits to list (default 20)")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="print an audit's ranked summary or save its HTML report",
                            description="Print the ranked exclusive features of AUDIT_ID, or save its report.")
    report.add_argument("audit_id", help="audit id")
    report.add_argument("--store", default=default_store, metavar="URL", help=store_help)
    report.add_argument("--html", metavar="OUT", help="save the self-contained HTML report to this file")
    report.add_argument("--json", action="store_true", help="print report.json")
    report.set_defaults(func=cmd_report)

    serve = sub.add_parser("serve", help="serve the HTTP API (settings from DFC_* variables)",
                           description="Serve the audit API with uvicorn; configure it with DFC_* variables.")
    serve.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                       help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, metavar="N", help="port (default 8000)")
    serve.set_defaults(func=cmd_serve)

    # Listed for --help only: main() hands `screen` and its arguments to service.screening.screen.
    sub.add_parser("screen", help="watch Hub organisations and submit audits of their new models", add_help=False)

    # Not in the list of commands (no help=): the service's entry point; the epilog describes it.
    job = sub.add_parser("run-audit", description="Run or resume the stored audit AUDIT_ID (what the API's Ray jobs "
                         "run). Logs go to stderr.")
    job.add_argument("audit_id", help="id of an audit created by the API or `dfc-audit run`")
    job.add_argument("--store", metavar="URL", help="storage URL (default $DFC_STORE_URL)")
    runner_options(job)
    job.set_defaults(func=cmd_run_audit)
    return parser


def _configure_logging(args: argparse.Namespace) -> int:
    """A Ray job's driver logs everything (operators read it); a terminal shows bars and one-line errors.

    Returns the ``workers`` logger's previous level, restored when the command ends.
    """
    workers_log = logging.getLogger("workers")
    previous = workers_log.level
    if args.command == "run-audit" or args.debug:
        level = logging.DEBUG if args.debug else logging.INFO
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")
    else:
        workers_log.setLevel(logging.CRITICAL)  # a failure is reported once, as one line
    return previous


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dfc-audit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if [a for a in argv if a != "--debug"][:1] == ["screen"]:
        from service.screening.screen import main as screen_main  # its own parser, options and exit codes

        return screen_main(argv[argv.index("screen") + 1 :])
    args = build_parser().parse_args(argv)
    previous_level = _configure_logging(args)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, ValidationError):
            message = "; ".join(f"{'.'.join(map(str, e['loc'])) or exc.title}: {e['msg']}" for e in exc.errors())
        else:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        first_line = (str(message).strip().splitlines() or [type(exc).__name__])[0]
        kind = "" if isinstance(exc, (CLIError, ValidationError)) else f"{type(exc).__name__}: "
        print(f"dfc-audit: error: {kind}{first_line}", file=sys.stderr)
        return 1
    finally:
        logging.getLogger("workers").setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
