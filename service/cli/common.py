"""What every ``dfc-audit`` command shares: default stores, the one-line user error, opening a store, the summary."""

from __future__ import annotations

import os
from typing import Any

from workers.pipeline.status import AuditStatus, AuditStore
from workers.storage import ObjectStore, open_store

DEFAULT_STORE = "./.dfc-audit/bucket"
"""The API's default store (service.settings), so the CLI and a local API see the same audits."""
DEMO_STORE = "./dfc-audit-demo"


class CLIError(Exception):
    """A problem the user can fix; printed as one line."""


def store_settings_from_env() -> dict[str, Any]:
    """``open_store`` settings from the ``DFC_S3_*`` variables the API and its Ray jobs use."""
    names = {
        "DFC_S3_ENDPOINT_URL": "endpoint_url",
        "DFC_S3_REGION": "region",
        "DFC_S3_ACCESS_KEY": "access_key",
        "DFC_S3_SECRET_KEY": "secret_key",
    }
    settings: dict[str, Any] = {key: os.environ[env] for env, key in names.items() if os.environ.get(env)}
    if os.environ.get("DFC_S3_CONNECT_TIMEOUT_S"):
        settings["connect_timeout"] = float(os.environ["DFC_S3_CONNECT_TIMEOUT_S"])
    if os.environ.get("DFC_S3_MAX_ATTEMPTS"):
        settings["max_attempts"] = int(os.environ["DFC_S3_MAX_ATTEMPTS"])
    return settings


def open_audits(url: str) -> tuple[ObjectStore, AuditStore]:
    store = open_store(url, **store_settings_from_env())
    return store, AuditStore(store)


def show_summary(store: ObjectStore, status: AuditStatus) -> None:
    """The ranked terminal summary, when this installation has the report renderer."""
    try:
        from workers.report.schema import AuditReport
        from workers.report.terminal import print_summary
    except ImportError:
        return
    if status.report_json and store.exists(status.report_json):
        print_summary(AuditReport.model_validate(store.get_json(status.report_json)))
