"""Specification of data-parallel extraction on a real local Ray: 1, 2 and 3 replicas per model store the same
bytes, and a replica killed mid-run costs only its unfinished block, with no row lost, duplicated or rewritten.

Tiny Llama and Qwen3 models, 20,000 tokens of the built-in corpus (about 16 shards per model), the extract stage
alone; each replica reserves 0.3 CPU, so three of each model fit the 2-CPU test instance.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from pydantic import ValidationError

from workers.activations.shards import ShardReader
from workers.pipeline import actors
from workers.pipeline.replicas import replica_counts
from workers.pipeline.run import run_audit
from workers.pipeline.status import AuditState, AuditStore
from workers.spec import AuditSpec, Resources
from workers.storage import LocalStore

BUDGET = 20_000


def make_spec(tiny_models, replicas: int | str) -> AuditSpec:
    resources = {"num_cpus": 0.3, "replicas": replicas}
    return AuditSpec.model_validate(
        {
            "model_a": {"id": str(tiny_models["llama"]), "resources": resources},
            "model_b": {"id": str(tiny_models["qwen3"]), "resources": resources},
            "corpus": {"kind": "builtin"},
            "token_budget": BUDGET,
            "max_length": 128,
        }
    )


def start_extraction(tiny_models, root: Path, replicas: int | str) -> tuple[str, threading.Thread, dict[str, Any]]:
    """Run an audit's extract stage on a thread; returns its id, the thread and a dict that receives its status."""
    audit_id = AuditStore(LocalStore(root)).create(make_spec(tiny_models, replicas)).id
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(status=run_audit(audit_id, str(root), stop_after="extract")))
    thread.start()
    return audit_id, thread, out


def extract_with(tiny_models, root: Path, replicas: int | str) -> dict[str, Any]:
    """The extract stage's manifest of a fresh audit with ``replicas`` per model in the bucket ``root``."""
    audit_id, thread, out = start_extraction(tiny_models, root, replicas)
    thread.join(timeout=120)
    assert out["status"].error is None and out["status"].state is AuditState.EXTRACTING
    return LocalStore(root).get_json(f"audits/{audit_id}/stages/extract.json")


def activation_files(root: Path) -> dict[str, bytes]:
    """Every object under ``activations/`` (shards, entries, texts, plans, manifests) by key, with its bytes."""
    base = root / "activations"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def rows_per_document(store: LocalStore, prefix: str) -> dict[int, int]:
    """How many rows (tokens) each document has in a finished prefix; a document stored twice counts double."""
    rows: dict[int, int] = {}
    for shard in ShardReader(store, prefix):  # verifies every checksum
        for doc_id in shard.doc_ids.tolist():
            rows[doc_id] = rows.get(doc_id, 0) + 1
    return rows


def replica_gone(name: str, timeout_s: float = 10.0) -> bool:
    """Whether the named actor is gone within ``timeout_s`` (a kill reaches Ray's registry asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def one_replica(local_ray, tiny_models, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The reference: every model extracted by one replica (the bucket's root and the stage manifest)."""
    root = tmp_path_factory.mktemp("one-replica")
    return root, extract_with(tiny_models, root, 1)


@pytest.mark.parametrize("replicas", [2, 3, "auto"])
def test_any_number_of_replicas_stores_the_same_shards_byte_for_byte(local_ray, tiny_models, tmp_path, one_replica,
                                                                     replicas):  # fmt: skip
    reference_root, reference = one_replica
    if replicas == "auto":  # "auto" counts what is free: let earlier tests' actors and tasks give their CPUs back
        settle = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < settle:
            time.sleep(0.2)
    extracted = extract_with(tiny_models, tmp_path, replicas)

    if replicas == "auto":  # the instance's 2 CPUs hold six 0.3-CPU replicas (fewer if Ray is slow to free some)
        assert extracted["a"]["replicas"] + extracted["b"]["replicas"] >= 3
    for side in ("a", "b"):
        got, want = extracted[side], reference[side]
        assert got["replicas"] == replicas or replicas == "auto"
        assert want["replicas"] == 1
        assert all(n > 0 for n in got["blocks_per_replica"]) and sum(got["blocks_per_replica"]) == got["n_shards"]
        assert got["n_shards"] >= 2 * got["replicas"]  # enough blocks that every replica had work to share
        assert {k: got[k] for k in ("prefix", "n_tokens", "n_docs", "n_shards")} == {
            k: want[k] for k in ("prefix", "n_tokens", "n_docs", "n_shards")
        }
    # Same keys, same bytes: shards, their entries (sha256 included), texts, the plans and the manifests.
    assert activation_files(tmp_path) == activation_files(reference_root)


@pytest.mark.parametrize("restart", [False, True], ids=["killed-for-good", "restarted-by-ray"])
def test_a_killed_replica_costs_only_its_unfinished_block(local_ray, tiny_models, tmp_path, one_replica, restart):
    reference_root, reference = one_replica
    store = LocalStore(tmp_path)
    prefix_a = reference["a"]["prefix"]
    audit_id, thread, out = start_extraction(tiny_models, tmp_path, 2)

    deadline = time.monotonic() + 90
    while not any(key.endswith(".json") and "/shard-" in key for key in store.list(f"{prefix_a}/")):
        assert thread.is_alive() and time.monotonic() < deadline, "model A's replicas never committed a shard"
        time.sleep(0.01)
    ray.kill(ray.get_actor(actors.actor_name(audit_id, "extract-a-1", 1)), no_restart=not restart)
    committed = {
        path: (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in (tmp_path / prefix_a).glob("shard-*")
        if (tmp_path / prefix_a / f"{path.name.split('.')[0]}.json").exists()
    }
    thread.join(timeout=120)

    assert out["status"].error is None and out["status"].state is AuditState.EXTRACTING
    extracted = store.get_json(f"audits/{audit_id}/stages/extract.json")["a"]
    if restart:
        assert extracted["replica_restarts"] >= 1 and extracted["replicas_lost"] == 0
        assert extracted["resumed_shards"] >= 1  # what was committed when the replica came back was kept
    else:
        assert extracted["replicas_lost"] == 1 and extracted["replica_restarts"] == 0
    # Every document's rows exactly once, as many as with one replica; the shards committed before the kill
    # were not written again (same file, same modification time); and the bytes equal one replica's.
    reference_store = LocalStore(reference_root)
    assert rows_per_document(store, prefix_a) == rows_per_document(reference_store, prefix_a)
    assert committed and {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in committed} == committed
    assert activation_files(tmp_path) == activation_files(reference_root)


def test_a_cancelled_extraction_stops_its_replicas_and_a_rerun_keeps_what_they_committed(
    local_ray, tiny_models, tmp_path, one_replica
):
    reference_root, reference = one_replica
    store, audits = LocalStore(tmp_path), AuditStore(LocalStore(tmp_path))
    prefix_a = reference["a"]["prefix"]
    audit_id, thread, out = start_extraction(tiny_models, tmp_path, 2)
    deadline = time.monotonic() + 90
    while not any(key.endswith(".json") and "/shard-" in key for key in store.list(f"{prefix_a}/")):
        assert thread.is_alive() and time.monotonic() < deadline, "model A's replicas never committed a shard"
        time.sleep(0.01)

    audits.request_cancel(audit_id)
    thread.join(timeout=30)
    assert not thread.is_alive() and out["status"].state is AuditState.CANCELLED
    assert not store.exists(f"{prefix_a}/manifest.json")
    assert replica_gone(actors.actor_name(audit_id, "extract-a-1", 1))  # stopped for good, not left running

    store.delete(audits.key(audit_id, "cancel.json"))  # withdraw the cancellation
    resumed = run_audit(audit_id, str(tmp_path), stop_after="extract")
    assert resumed.error is None and resumed.attempts == 2
    extracted = store.get_json(f"audits/{audit_id}/stages/extract.json")
    assert extracted["a"]["resumed_shards"] >= 1 and not extracted["a"]["cached"]
    assert activation_files(tmp_path) == activation_files(reference_root)


def test_auto_replicas_share_what_is_free_and_never_outnumber_the_blocks():
    gpu, cpu = Resources(num_gpus=1, num_cpus=2, replicas="auto"), Resources(num_cpus=1, replicas="auto")
    free = {"CPU": 64.0, "GPU": 8.0}
    assert replica_counts({"a": gpu, "b": gpu}, {"a": 100, "b": 100}, free) == {"a": 4, "b": 4}
    assert replica_counts({"a": gpu, "b": gpu}, {"a": 2, "b": 100}, free) == {"a": 2, "b": 6}  # a's leftovers to b
    fixed = Resources(num_gpus=1, num_cpus=2, replicas=3)
    assert replica_counts({"a": fixed, "b": gpu}, {"a": 100, "b": 100}, free) == {"a": 3, "b": 5}
    assert replica_counts({"a": fixed, "b": gpu}, {"a": 1, "b": 100}, free) == {"a": 1, "b": 7}
    # Without GPUs "auto" counts CPUs; a model that cannot fit still gets one replica (the reservation says why).
    assert replica_counts({"a": cpu, "b": cpu}, {"a": 100, "b": 100}, {"CPU": 7.0}) == {"a": 4, "b": 3}
    assert replica_counts({"a": gpu, "b": cpu}, {"a": 100, "b": 100}, {"CPU": 7.0}) == {"a": 1, "b": 5}
    assert replica_counts({"a": cpu}, {"a": 0}, {"CPU": 7.0}) == {"a": 1}  # one writes the manifest


def test_replicas_are_a_whole_number_or_auto():
    assert Resources().replicas == 1 and Resources(replicas="auto").replicas == "auto"
    for bad in (0, -1, 2.5, "two", True, 10_000):
        with pytest.raises(ValidationError, match=r'replicas .* nor "auto"'):
            Resources.model_validate({"replicas": bad})
