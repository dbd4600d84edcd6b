"""Specification of data-parallel training in the pipeline: the paired reader's shares, and a run of two workers
(two Ray actors in one gloo group) that is cancelled mid-run and resumed from its stored checkpoint."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.workers.activations.test_pairing import paired_store  # noqa: F401 - a fixture
from tests.workers.pipeline.test_pipeline import make_spec, run_in_thread, wait_for
from workers.activations.pairing import PairedActivations
from workers.pipeline.run import run_audit
from workers.pipeline.status import AuditState, AuditStore
from workers.spec import AuditSpec
from workers.storage import LocalStore


def test_each_worker_reads_its_rows_of_the_batches_one_reader_yields(paired_store):  # noqa: F811
    store, _, result = paired_store

    def reader(worker: int = 0, workers: int = 1) -> PairedActivations:
        return PairedActivations(
            store, "act/a", "act/b", result.pairs_key, batch_size=48, shuffle_buffer=128, seed=3, epochs=1,
            worker=worker, workers=workers,
        )  # fmt: skip

    whole = list(reader())
    for workers in (2, 3):
        shares = [list(reader(w, workers)) for w in range(workers)]
        assert all(len(share) == len(whole) for share in shares)
        for i, (x_a, x_b) in enumerate(whole):
            for w, share in enumerate(shares):
                assert torch.equal(share[i][0], x_a[w::workers]) and torch.equal(share[i][1], x_b[w::workers])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(reader(0, 2).global_batches(), whole, strict=True))
    with pytest.raises(ValueError, match="multiple of the number of workers"):
        reader(0, 5)


def test_a_batch_that_does_not_split_over_the_workers_is_refused_with_what_to_change():
    with pytest.raises(ValueError, match=r"make the batch size .* a multiple of the number of workers"):
        AuditSpec.model_validate({"model_a": {"id": "a/b"}, "model_b": {"id": "c/d"},
                                  "training": {"batch_size": 100, "workers": 3}})  # fmt: skip


def test_a_data_parallel_run_cancelled_mid_run_resumes_on_every_worker_from_the_stored_checkpoint(
    local_ray, tiny_models, tmp_path
):
    store = LocalStore(tmp_path / "bucket")
    audits = AuditStore(store)
    # Two data-parallel workers take the local Ray's two CPUs. Cancel as soon as the first checkpoint lands, with
    # enough steps left that the run cannot finish before the kill does.
    training = {"steps": 400, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 20, "seeds": 1, "workers": 2}
    audit_id = audits.create(make_spec(tiny_models, training=training, budget=3000)).id
    work = tmp_path / "work"
    thread, out = run_in_thread(audit_id, str(tmp_path / "bucket"), stop_after="train", work_dir=work)
    wait_for(lambda: store.exists(f"audits/{audit_id}/crosscoder/checkpoint/latest.json"), interval=0.005)

    audits.request_cancel(audit_id)
    asked = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive() and time.monotonic() - asked < 5.0
    assert out["status"].state is AuditState.CANCELLED
    assert not store.exists(f"audits/{audit_id}/crosscoder/outcome.json")  # the killed run did not finish

    store.delete(audits.key(audit_id, "cancel.json"))
    resumed = run_audit(audit_id, str(tmp_path / "bucket"), stop_after="train", work_dir=work)
    trained = store.get_json(f"audits/{audit_id}/stages/train.json")
    assert resumed.error is None and resumed.attempts == 2 and resumed.counters["training_step"] == 400
    assert trained["workers"] == 2 and trained["steps"] == 400 and 20 <= trained["resumed_from_step"] < 400
    assert trained["tokens"] > 390 * 120  # every step counted the whole global batch (outliers aside)
    assert trained["heldout"]["fve_a"] > 0.1 and trained["heldout"]["fve_b"] > 0.1
    # Worker 1 resumed from its own copy of the stored checkpoint and never wrote one.
    copy = json.loads((work / "train" / "seed-0.rank-1" / "ckpt" / "trainer.json").read_text())
    assert copy["step"] == trained["resumed_from_step"]
    assert json.loads((work / "train" / "seed-0" / "ckpt" / "trainer.json").read_text())["step"] == 400
