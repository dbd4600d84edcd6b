"""Specification of the audit pipeline on a real local Ray: stages, manifests, resume, cancellation, failures, CLI.

Tiny Llama (d=64) and Qwen3 (d=96) models with different tokenizers, a few thousand tokens of the built-in
corpus, and the first three stages (extract → align → train), on the real S3 server and on a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from dfc.crosscoder import Crosscoder
from service.cli.common import CLIError
from service.cli.main import build_parser
from service.cli.main import main as cli_main
from service.cli.run import spec_from_args
from workers.pipeline import actors, stages
from workers.pipeline import run as pipeline
from workers.pipeline.run import StageContext, run_audit
from workers.pipeline.status import AuditState, AuditStatus, AuditStore
from workers.spec import AuditSpec
from workers.storage import LocalStore, ObjectStore, open_store

STEPS = 40
FIRST_THREE = ["extract", "align", "train"]


@pytest.fixture(scope="module")
def shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local bucket shared by this module's tests, so activations extracted once are reused (as in production)."""
    return tmp_path_factory.mktemp("bucket")


def make_spec(tiny_models, *, model_b: str | None = None, budget: int = 5000, steps: int = STEPS, **extra: Any):
    return AuditSpec.model_validate(
        {
            "model_a": {"id": str(tiny_models["llama"])},
            "model_b": {"id": model_b or str(tiny_models["qwen3"])},
            "corpus": {"kind": "builtin"},
            "token_budget": budget,
            "max_length": 128,
            "crosscoder": {"n_features": 256, "k": 8},
            "training": {"steps": steps, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 20},
            **extra,
        }
    )


def recording(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the driver's store record the state of every status.json it writes."""
    states: list[str] = []

    def open_recording(url: str, **settings: Any) -> ObjectStore:
        store = open_store(url, **settings)
        put = store.put_bytes

        def put_bytes(key: str, data: bytes) -> None:
            if key.endswith("/status.json"):
                states.append(json.loads(data)["state"])
            put(key, data)

        store.put_bytes = put_bytes  # type: ignore[method-assign]
        return store

    monkeypatch.setattr(pipeline, "open_store", open_recording)
    return states


def run_in_thread(audit_id: str, url: str, settings: dict[str, Any] | None = None, **kwargs: Any):
    """Start ``run_audit`` on a thread; returns the thread and a dict that receives its status."""
    out: dict[str, AuditStatus] = {}
    thread = threading.Thread(target=lambda: out.update(status=run_audit(audit_id, url, settings, **kwargs)))
    thread.start()
    return thread, out


def wait_for(condition, timeout: float = 60.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the pipeline"
        time.sleep(interval)


@pytest.fixture(params=["s3", "local"])
def location(request, shared_folder) -> tuple[str, dict[str, Any], ObjectStore]:
    """(store URL, settings, store) of a fresh S3 prefix on the real server, or of the module's local folder."""
    if request.param == "local":
        return str(shared_folder), {}, LocalStore(shared_folder)
    server = request.getfixturevalue("s3_server")
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    settings = {
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
    }
    return f"s3://{server.bucket}/{prefix}", settings, server.store(prefix)


def test_first_three_stages_commit_manifests_and_a_crosscoder_and_a_rerun_skips_them(
    local_ray, tiny_models, location, monkeypatch, tmp_path
):
    url, settings, store = location
    audits = AuditStore(store)
    audit_id = audits.create(make_spec(tiny_models)).id
    states = recording(monkeypatch)

    status = run_audit(audit_id, url, settings, stop_after="train")

    assert status.error is None and status.state is AuditState.TRAINING and status.attempts == 1
    assert [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]] == [
        "queued", "extracting", "aligning", "training"
    ]
    assert set(status.stage_seconds) == {"extracting", "aligning", "training"}
    assert status.counters["tokens_extracted_a"] >= 5000 and status.counters["tokens_extracted_b"] > 0
    assert status.counters["training_step"] == STEPS and status.stage_progress == 1.0

    manifests = {name: store.get_json(f"audits/{audit_id}/stages/{name}.json") for name in FIRST_THREE}
    extracted, aligned, trained = manifests["extract"], manifests["align"], manifests["train"]
    assert (extracted["a"]["d_model"], extracted["b"]["d_model"]) == (64, 96)
    assert extracted["a"]["n_docs"] == extracted["b"]["n_docs"] == extracted["documents"]  # same documents
    assert aligned["n_train"] + aligned["n_heldout"] == aligned["n_pairs"] > 0.5 * extracted["a"]["n_tokens"]
    assert trained["steps"] == STEPS and trained["resumed_from_step"] == 0
    assert trained["heldout"]["fve_a"] > 0.1 and trained["heldout"]["fve_b"] > 0.1
    assert 0 < trained["heldout"]["l0"] <= 8 * 2

    final = tmp_path / "final"
    for name in ("model.safetensors", "config.json"):
        store.download_file(f"{trained['final_prefix']}/{name}", final / name)
    model = Crosscoder.from_pretrained(final)
    assert (model.config.d_a, model.config.d_b, model.config.n_features) == (64, 96, 256)
    assert float(model.scale_a) == pytest.approx(trained["scale_a"]) and float(model.scale_a) != 1.0

    # A second run finds every manifest and starts no worker at all.
    monkeypatch.setattr(actors, "ExtractionActor", None)
    monkeypatch.setattr(actors, "TrainingActor", None)
    again = run_audit(audit_id, url, settings, stop_after="train")
    assert again.error is None and again.attempts == 2
    assert store.get_json(f"audits/{audit_id}/stages/train.json") == trained


def test_cancelling_during_training_stops_promptly_and_a_rerun_resumes_from_the_stored_checkpoint(
    local_ray, tiny_models, shared_folder
):
    store = LocalStore(shared_folder)
    audits = AuditStore(store)
    # One seed: what resumes is a checkpoint (an ensemble's finished seeds are kept whole: the next test).
    # Tiny models train hundreds of steps a second and the progress counters lag: cancel as soon as the first
    # checkpoint lands, with enough steps left that the run cannot finish before the kill does.
    training = {"steps": 2000, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 20, "seeds": 1}
    audit_id = audits.create(make_spec(tiny_models, training=training)).id
    thread, out = run_in_thread(audit_id, str(shared_folder), stop_after="train")
    checkpoint = f"audits/{audit_id}/crosscoder/checkpoint/latest.json"
    wait_for(lambda: store.exists(checkpoint), interval=0.005)

    audits.request_cancel(audit_id)
    asked = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive() and time.monotonic() - asked < 5.0
    assert out["status"].state is AuditState.CANCELLED and out["status"].finished_at is not None
    assert not store.exists(f"audits/{audit_id}/stages/train.json")
    assert not store.exists(f"audits/{audit_id}/crosscoder/outcome.json")  # the killed run did not finish

    store.delete(audits.key(audit_id, "cancel.json"))  # withdraw the cancellation
    resumed = run_audit(audit_id, str(shared_folder), stop_after="train")
    trained = store.get_json(f"audits/{audit_id}/stages/train.json")
    assert resumed.error is None and resumed.attempts == 2
    assert 20 <= trained["resumed_from_step"] < 2000 and trained["steps"] == 2000


def test_an_ensemble_trains_each_seed_once_and_a_rerun_keeps_the_seeds_that_finished(
    local_ray, tiny_models, tmp_path
):
    store = LocalStore(tmp_path / "bucket")
    audits = AuditStore(store)
    training = {"steps": STEPS, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 0, "seeds": 3}
    audit_id = audits.create(make_spec(tiny_models, training=training, seed=7)).id

    status = run_audit(audit_id, str(tmp_path / "bucket"), stop_after="train")

    assert status.error is None and status.counters["training_seeds_done"] == 3
    trained = store.get_json(f"audits/{audit_id}/stages/train.json")
    runs = trained["runs"]
    assert [(r["run"], r["seed"]) for r in runs] == [(0, 7), (1, 8), (2, 9)]
    assert len({r["final_prefix"] for r in runs}) == 3 and trained["final_prefix"] == runs[0]["final_prefix"]
    weights = []
    for r in runs:
        for name in ("model.safetensors", "config.json"):
            store.download_file(f"{r['final_prefix']}/{name}", tmp_path / f"run{r['run']}" / name)
        weights.append(Crosscoder.from_pretrained(tmp_path / f"run{r['run']}").w_dec_b.detach())
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])  # different seeds

    # A crash after seeds 0 and 2 finished but before seed 1 recorded its outcome and the stage its manifest.
    outcome = {r["run"]: f"audits/{audit_id}/crosscoder/seed-{r['run']}/outcome.json" for r in runs}
    kept = {run: store.get_bytes(outcome[run]) for run in (0, 2)}
    store.delete(f"audits/{audit_id}/stages/train.json")
    store.delete(outcome[1])
    again = run_audit(audit_id, str(tmp_path / "bucket"), stop_after="train")

    assert again.error is None and again.attempts == 2
    assert {run: store.get_bytes(outcome[run]) for run in (0, 2)} == kept  # finished seeds were not trained again
    rerun = store.get_json(f"audits/{audit_id}/stages/train.json")
    assert rerun["runs"][0] == runs[0] and rerun["runs"][2] == runs[2]
    assert rerun["runs"][1]["resumed_from_step"] == STEPS  # seed 1 resumed from its stored final checkpoint


def test_a_killed_extraction_actor_is_restarted_by_ray_and_resumes_from_its_committed_shards(
    local_ray, tiny_models, tmp_path
):
    store = LocalStore(tmp_path / "bucket")
    audit_id = AuditStore(store).create(make_spec(tiny_models, budget=40_000)).id
    thread, out = run_in_thread(audit_id, str(tmp_path / "bucket"), stop_after="extract")

    def first_shard_of_a() -> bool:
        return any("llama" in key and key.endswith("/shard-00000.json") for key in store.list("activations/"))

    wait_for(first_shard_of_a, interval=0.01)
    ray.kill(ray.get_actor(actors.actor_name(audit_id, "extract-a", 1)), no_restart=False)
    thread.join(timeout=90)

    assert out["status"].error is None and out["status"].state is AuditState.EXTRACTING
    extracted = store.get_json(f"audits/{audit_id}/stages/extract.json")
    assert extracted["a"]["resumed_shards"] >= 1 and not extracted["a"]["cached"]
    assert extracted["a"]["n_tokens"] >= 40_000 and extracted["a"]["n_docs"] == extracted["b"]["n_docs"]


def test_a_missing_model_fails_the_audit_with_a_message_that_names_it(local_ray, tiny_models, shared_folder):
    store = LocalStore(shared_folder)
    audit_id = AuditStore(store).create(make_spec(tiny_models, model_b="/nonexistent/model")).id

    status = run_audit(audit_id, str(shared_folder))

    assert status.state is AuditState.FAILED and status.finished_at is not None
    assert status.error is not None and status.error.stage == "extract" and status.error.type == "ModelLoadError"
    assert "model B (/nonexistent/model)" in status.error.message and "does not exist" in status.error.message
    assert "Traceback" not in status.error.message


def test_resources_the_cluster_cannot_provide_fail_with_what_to_change(
    local_ray, tiny_models, shared_folder, monkeypatch
):
    monkeypatch.setattr(stages, "PLACEMENT_TIMEOUT_S", 1.0)
    store = LocalStore(shared_folder)
    spec = make_spec(tiny_models, model_a={"id": str(tiny_models["llama"]), "resources": {"num_gpus": 1}})
    audit_id = AuditStore(store).create(spec).id

    status = run_audit(audit_id, str(shared_folder))

    assert status.state is AuditState.FAILED and status.error is not None
    assert status.error.type == "ResourcesUnavailable" and status.error.stage == "extract"
    assert "1 GPU" in status.error.message and "num_gpus" in status.error.message


def fake_stages(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, list[str]]], fail: str = "") -> None:
    """Replace every stage with one that records what it saw (and ``fail`` with one that raises)."""

    def fake(name: str):
        def run(ctx: StageContext) -> dict[str, Any]:
            calls.append((name, sorted(ctx.outputs)))
            if name == fail:
                raise ValueError(f"{name} found nothing to rank; lower top_features")
            ctx.report_progress(0.5, force=True, **{f"{name}_done": 1})
            if name == "publish":
                ctx.store.put_json(ctx.key("report/report.json"), {})
                return {"report_json": ctx.key("report/report.json"), "report_html": ctx.key("report/report.html")}
            return {"made_by": name}

        return run

    stages_ = tuple(pipeline.Stage(s.name, s.state, fake(s.name)) for s in pipeline.STAGE_TABLE)
    monkeypatch.setattr(pipeline, "STAGE_TABLE", stages_)


def test_the_driver_runs_the_eight_stages_in_order_and_records_where_the_report_is(
    local_ray, tiny_models, tmp_path, monkeypatch
):
    store = LocalStore(tmp_path / "bucket")
    audit_id = AuditStore(store).create(make_spec(tiny_models)).id
    calls: list[tuple[str, list[str]]] = []
    fake_stages(monkeypatch, calls)

    status = run_audit(audit_id, str(tmp_path / "bucket"))

    names = [s.name for s in pipeline.STAGE_TABLE]
    assert calls == [(name, sorted(names[:i])) for i, name in enumerate(names)]  # each sees the earlier manifests
    assert status.state is AuditState.SUCCEEDED and status.progress == 1.0 and status.finished_at is not None
    assert status.report_json == f"audits/{audit_id}/report/report.json"
    assert status.report_html == f"audits/{audit_id}/report/report.html"
    assert set(status.stage_seconds) == {s.state.value for s in pipeline.STAGE_TABLE}
    assert store.get_json(f"audits/{audit_id}/stages/steer.json")["made_by"] == "steer"
    assert run_audit(audit_id, str(tmp_path / "bucket")) == status  # a finished audit is left as it is


def test_a_failing_later_stage_fails_the_audit_and_a_rerun_resumes_at_that_stage(
    local_ray, tiny_models, tmp_path, monkeypatch
):
    store = LocalStore(tmp_path / "bucket")
    audit_id = AuditStore(store).create(make_spec(tiny_models)).id
    calls: list[tuple[str, list[str]]] = []
    fake_stages(monkeypatch, calls, fail="analyse")

    failed = run_audit(audit_id, str(tmp_path / "bucket"))
    assert failed.state is AuditState.FAILED and failed.error is not None
    assert (failed.error.stage, failed.error.type) == ("analyse", "ValueError")
    assert failed.error.message == "analyse found nothing to rank; lower top_features"

    calls.clear()
    fake_stages(monkeypatch, calls)
    resumed = run_audit(audit_id, str(tmp_path / "bucket"))
    assert [name for name, _ in calls] == ["analyse", "steer", "scan", "explain", "publish"]
    assert resumed.state is AuditState.SUCCEEDED and resumed.error is None and resumed.attempts == 2


def test_progress_reports_are_throttled_but_a_forced_one_is_written_at_once(tiny_models, tmp_path):
    store = LocalStore(tmp_path / "bucket")
    audits = AuditStore(store)
    audit_id = audits.create(make_spec(tiny_models)).id
    ctx = StageContext(audit_id, audits.spec(audit_id), store, audits, tmp_path, status_interval_s=60)
    ctx.begin(AuditState.TRAINING)
    written = audits.status(audit_id).updated_at
    for step in range(1, 50):
        ctx.report_progress(step / 100, training_step=step)
    assert audits.status(audit_id).updated_at == written  # nothing written within the interval

    ctx.report_progress(0.5, force=True, training_step=50)
    status = audits.status(audit_id)
    assert status.counters["training_step"] == 50 and status.stage_progress == 0.5
    assert status.progress == pytest.approx(0.35 + 0.05 + 0.37 * 0.5)  # extract and align done, training half


SUBCOMMANDS = ["run", "demo", "run-audit", "serve", "status", "report", "screen"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: dfc-audit {command}" in capsys.readouterr().out


def test_the_console_script_is_installed_and_lists_every_subcommand():
    script = Path(sys.executable).parent / "dfc-audit"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert all(command in out for command in SUBCOMMANDS)


def test_status_prints_a_stored_audit_and_an_unknown_id_is_one_line(tiny_models, tmp_path, capsys):
    store = LocalStore(tmp_path / "bucket")
    audits = AuditStore(store)
    audit_id = audits.create(make_spec(tiny_models)).id
    audits.update(audit_id, state=AuditState.TRAINING, stage=AuditState.TRAINING, counters={"training_step": 7})

    assert cli_main(["status", audit_id, "--store", str(tmp_path / "bucket")]) == 0
    out = capsys.readouterr().out
    assert f"audit {audit_id}: training" in out and "training_step: 7" in out

    assert cli_main(["status", audit_id, "--store", str(tmp_path / "bucket"), "--json"]) == 0
    assert AuditStatus.model_validate_json(capsys.readouterr().out).counters == {"training_step": 7}

    assert cli_main(["status", "no-such-audit", "--store", str(tmp_path / "bucket")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dfc-audit: error: no audit 'no-such-audit'") and "\n" not in err


def test_run_refuses_a_bad_spec_in_one_line_before_starting_anything(tmp_path, capsys):
    code = cli_main(["run", "--model-a", "org/x", "--model-b", "org/x", "--store", str(tmp_path / "bucket")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "are the same model" in err
    assert not (tmp_path / "bucket").exists()


def test_run_with_explain_needs_an_explainer_endpoint_and_says_which_variables(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DFC_EXPLAINER_URL", raising=False)
    for command in (["run", "--model-a", "org/a", "--model-b", "org/b"], ["demo"]):
        code = cli_main([*command, "--explain", "--store", str(tmp_path / "bucket")])
        err = capsys.readouterr().err.strip()
        assert code == 1 and "DFC_EXPLAINER_URL" in err and "--explain" in err
    assert not (tmp_path / "bucket").exists()


def test_the_ensemble_and_the_scan_are_on_by_default_and_the_run_flags_turn_them_down():
    base = ["run", "--model-a", "org/a", "--model-b", "org/b"]
    default = spec_from_args(build_parser().parse_args(base))
    assert default.training.seeds == 3 and default.scan.enabled
    down = spec_from_args(build_parser().parse_args([*base, "--seeds", "1", "--no-scan"]))
    assert down.training.seeds == 1 and not down.scan.enabled
    with pytest.raises(CLIError, match="seeds"):
        spec_from_args(build_parser().parse_args([*base, "--seeds", "0"]))


def test_run_with_explain_asks_for_explanations_in_the_spec(monkeypatch):
    monkeypatch.setenv("DFC_EXPLAINER_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("DFC_EXPLAINER_MODEL", "m")
    args = build_parser().parse_args(["run", "--model-a", "org/a", "--model-b", "org/b", "--explain"])
    assert spec_from_args(args).explain.enabled
    args = build_parser().parse_args(["run", "--model-a", "org/a", "--model-b", "org/b"])
    assert not spec_from_args(args).explain.enabled


@pytest.mark.slow
def test_starting_local_ray_keeps_its_token_authentication_notice_off_the_terminal(tmp_path):
    """Ray 2.60 warns on every new local instance that token authentication is on (its default, nothing to do)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    code = "import ray; from workers.pipeline.actors import ensure_ray; ensure_ray(1); print(ray.is_initialized())"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3], env=env,
                          capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    assert "Token authentication" not in done.stderr and "WARNING" not in done.stderr, done.stderr


def test_only_rays_token_authentication_is_on_notice_is_dropped():
    from ray._private.authentication import authentication_token_setup as notices

    logger = logging.getLogger(actors.RAY_AUTH_LOGGER)
    seen: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Seen(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        actors.quiet_ray_auth_notice()
        actors.quiet_ray_auth_notice()  # idempotent: one filter
        notices._warn_token_auth_enabled()
        notices._warn_token_auth_disabled()  # this one matters (anyone on the network can run code): it stays
    finally:
        logger.removeHandler(handler)
    assert [m.split(".")[0] for m in seen] == ["Token authentication is disabled for this Ray cluster"]
    assert sum(isinstance(f, actors._AuthEnabledNotice) for f in logger.filters) == 1
