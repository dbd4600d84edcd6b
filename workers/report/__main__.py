"""Render a report from the command line: ``python -m workers.report report.json --html report.html``.

``--example`` renders the invented example report instead (for documentation and screenshots).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workers.report.fixtures import example_report
from workers.report.html import DEFAULT_TOP_N, render_html
from workers.report.schema import AuditReport
from workers.report.terminal import print_summary


def main(argv: list[str] | None = None) -> None:
    """Print a report's summary and optionally write its HTML page and JSON."""
    parser = argparse.ArgumentParser(prog="python -m workers.report", description=__doc__)
    parser.add_argument("report", nargs="?", type=Path, help="report.json to read")
    parser.add_argument("--example", action="store_true", help="use the invented example report")
    parser.add_argument("--html", type=Path, help="write the self-contained HTML page here")
    parser.add_argument("--json", type=Path, help="write the report's JSON here")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP_N, help="feature cards per model in the HTML")
    args = parser.parse_args(argv)
    if args.example == (args.report is not None):
        parser.error("give either a report.json path or --example")
    report = example_report() if args.example else AuditReport.model_validate_json(args.report.read_text())
    print_summary(report)
    if args.html:
        args.html.write_text(render_html(report, top_n=args.top), encoding="utf-8")
    if args.json:
        args.json.write_text(report.model_dump_json(indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
