"""The audit report: its versioned schema (``report.json``), the self-contained HTML page and a terminal summary."""

from workers.report.html import render_html
from workers.report.schema import SCHEMA_VERSION, AuditReport, FeatureReport
from workers.report.terminal import print_summary

__all__ = ["SCHEMA_VERSION", "AuditReport", "FeatureReport", "print_summary", "render_html"]
