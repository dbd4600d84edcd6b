"""The audit the analysis tests read: tiny Llama (d=64) and Qwen3 (d=96) models with different tokenizers read a
few thousand tokens of the built-in corpus, and the pipeline driver runs every stage, with the spec's defaults for
the seed ensemble (3 seeds) and the behaviour-first scan, on a local Ray and a local folder standing in for the
bucket. Run once for the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from workers.pipeline import run as pipeline
from workers.pipeline.run import run_audit
from workers.pipeline.status import AuditState, AuditStore
from workers.report.schema import AuditReport
from workers.spec import AuditSpec
from workers.storage import LocalStore, ObjectStore, open_store

ALPHAS = [-4.0, 4.0]
STEERED = 2


def make_spec(tiny_models: Any, *, steering: bool = True, architecture: str = "dfc") -> AuditSpec:
    return AuditSpec.model_validate({
        "model_a": {"id": str(tiny_models["llama"])},
        "model_b": {"id": str(tiny_models["qwen3"])},
        "corpus": {"kind": "builtin"},
        "token_budget": 4000,
        "max_length": 128,
        "crosscoder": {"architecture": architecture, "n_features": 256, "k": 8, "a_only": 0.1, "b_only": 0.1},
        "training": {"steps": 30, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 0},
        "steering": {"enabled": steering, "top_n": STEERED, "alphas": ALPHAS,
                     "probe_prompts": ["The capital of France is"], "max_new_tokens": 3},
        "top_features": 6,
        # Random tiny models spread their next-token probability thin: read their top tokens however unlikely.
        "scan": {"min_prob": 0.0, "contexts": 64},
    })  # fmt: skip


class Audit:
    """One finished audit: its store, id, final status and the order in which the driver wrote objects."""

    def __init__(self, root: Path, audit_id: str, puts: list[str]) -> None:
        self.root, self.id, self.puts = root, audit_id, puts
        self.store = LocalStore(root)

    def key(self, name: str) -> str:
        return f"audits/{self.id}/{name}"

    def json(self, name: str) -> Any:
        return self.store.get_json(self.key(name))

    def report(self) -> AuditReport:
        return AuditReport.model_validate_json(self.store.get_bytes(self.key("report/report.json")))


@pytest.fixture(scope="package")
def audit(local_ray, tiny_models, tmp_path_factory) -> Audit:
    root = tmp_path_factory.mktemp("bucket")
    audit_id = AuditStore(LocalStore(root)).create(make_spec(tiny_models)).id
    puts: list[str] = []

    def recording_store(url: str, **settings: Any) -> ObjectStore:
        store = open_store(url, **settings)
        put = store.put_bytes

        def put_bytes(key: str, data: bytes) -> None:
            puts.append(key)
            put(key, data)

        store.put_bytes = put_bytes  # type: ignore[method-assign]
        return store

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "open_store", recording_store)
        status = run_audit(audit_id, str(root), work_dir=tmp_path_factory.mktemp("work"))
    assert status.error is None and status.state is AuditState.SUCCEEDED
    assert status.report_json == f"audits/{audit_id}/report/report.json"
    assert status.report_html == f"audits/{audit_id}/report/report.html"
    return Audit(root, audit_id, puts)


