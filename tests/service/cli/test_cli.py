"""Specification of ``dfc-audit`` as a new user and a script meet it: help, version, defaults, where audits are
found again, what a run prints, and ``--json`` for scripts. The pipeline is a stand-in here (the real one runs in
tests/workers/pipeline and tests/test_ground_truth.py): what is specified is the command line around it."""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service.cli.common import DEFAULT_STORE, DEMO_STORE, open_audits
from service.cli.main import build_parser, main, version
from service.cli.run import _SPEC_FLAGS, RunResult, _detail
from service.screening.screen import _parser as screen_parser
from workers.pipeline.status import AuditError, AuditState, AuditStatus, now
from workers.report.fixtures import example_report
from workers.spec import AuditSpec, TrainingSpec

CHATTER = ("`loss_type=None` was set in the config but it is unrecognized.", "Writing model shards")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_prints_the_installed_version() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert version()[0].isdigit()


def test_version_is_one_line_naming_the_program(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"dfc-audit {version()}\n"


def test_the_main_help_lists_the_users_commands_and_sets_run_audit_apart(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    commands, _, rest = out.partition("options:")
    listed = [line.split()[0] for line in commands.splitlines() if line.startswith("    ")]
    assert listed == ["run", "demo", "status", "report", "serve", "screen"]
    assert "run-audit ID" in rest.split("service commands")[1]  # still documented, for operators
    with pytest.raises(SystemExit) as exited:  # and still a command (the Ray jobs' entrypoint)
        main(["run-audit", "--help"])
    assert exited.value.code == 0 and "usage: dfc-audit run-audit" in capsys.readouterr().out


def _described_options() -> list[tuple[str, str, str]]:
    parsers = {**_subparsers(build_parser()), "screen": screen_parser()}
    return [(command, action.option_strings[0], action.help)
            for command, parser in parsers.items() for action in parser._actions
            if action.option_strings and action.help and action.help != argparse.SUPPRESS
            and action.option_strings[0] != "-h"]  # fmt: skip


@pytest.mark.parametrize(("command", "option", "text"), _described_options(),
                         ids=[f"{command} {option}" for command, option, _ in _described_options()])  # fmt: skip
def test_every_option_of_every_command_is_described_in_one_style(command: str, option: str, text: str) -> None:
    first = text.split()[0]
    assert not (first[0].isupper() and first[1:].islower()), f"{command} {option}: help starts with a capital"
    assert not text.rstrip().endswith("."), f"{command} {option}: help ends with a full stop"


def test_every_run_option_that_sets_the_spec_says_its_default() -> None:
    run = _subparsers(build_parser())["run"]
    helps = {action.dest: action.help or "" for action in run._actions}
    missing = [dest for dest in _SPEC_FLAGS if dest not in ("model_a", "model_b") and "default" not in helps[dest]]
    assert missing == []
    assert "n_features / 256" in helps["k"]
    assert f"(default {TrainingSpec.model_fields['lr'].default:g})" in helps["lr"]  # read from the spec
    assert f"{AuditSpec.model_fields['token_budget'].default:,}" in helps["token_budget"]


def test_status_with_no_audits_says_so_and_points_to_the_demos_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DFC_STORE_URL", raising=False)
    _, audits = open_audits(DEMO_STORE)
    audits.create(AuditSpec.model_validate({"model_a": {"id": "org/a"}, "model_b": {"id": "org/b"}}))

    assert main(["status"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (f"no audits in {DEFAULT_STORE}; the demo's audits are in {DEMO_STORE}: "
                                    f"dfc-audit status --store {DEMO_STORE}")  # fmt: skip
    assert main(["status", "--store", DEMO_STORE]) == 0 and capsys.readouterr().out.count("queued") == 1


def test_the_align_stages_progress_names_its_pairs_as_distinct_aligned_pairs() -> None:
    # The summary's other count is the pairs training saw (with repeats); the two must not read alike.
    assert _detail(AuditState.ALIGNING, {"token_pairs": 52_431}) == "52,431 distinct aligned token pairs"


# --- running (the pipeline stood in for) ------------------------------------------------------------------------


def _finish(url: str, audit_id: str, state: AuditState) -> AuditStatus:
    """What the pipeline leaves behind: a report for a success, an error for a failure."""
    store, audits = open_audits(url)
    if state is not AuditState.SUCCEEDED:
        error = AuditError(stage="training", type="RuntimeError", message="loss became NaN; lower --lr")
        return audits.update(audit_id, state=state, error=error, finished_at=now())
    report = example_report(n_features=5, seed=1, n_shared=5).model_copy(update={"audit_id": audit_id})
    keys = {name: audits.key(audit_id, f"report/report.{name}") for name in ("json", "html")}
    store.put_json(keys["json"], report.model_dump(mode="json"))
    store.put_bytes(keys["html"], b"<!doctype html><title>report</title>")
    return audits.update(audit_id, state=state, progress=1.0, finished_at=now(), report_json=keys["json"],
                         report_html=keys["html"])  # fmt: skip


@pytest.fixture
def pipeline(monkeypatch: pytest.MonkeyPatch) -> Callable[[AuditState], None]:
    """Stand in for Ray and the stages; call it with the state the stand-in audit should end in."""
    import workers.pipeline.run as real

    ending = {"state": AuditState.SUCCEEDED}

    def run_audit(audit_id: str, url: str, store_settings: dict[str, Any], **_: Any) -> AuditStatus:
        return _finish(url, audit_id, ending["state"])

    monkeypatch.setattr(real, "ensure_ray", lambda num_cpus=None: None)
    monkeypatch.setattr(real, "run_audit", run_audit)
    return lambda state: ending.update(state=state)


def _run(store: Path, *extra: str) -> list[str]:
    return ["run", "--model-a", "org/a", "--model-b", "org/b", "--store", str(store), *extra]


@pytest.mark.parametrize(("flags", "field"), [(["--revision-b", "../../x"], "model_b.revision"),
                                              (["--lr", "nan"], "training.lr")])  # fmt: skip
def test_run_refuses_a_revision_or_a_number_the_api_would_refuse_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], field: str
) -> None:
    assert main(_run(tmp_path / "bucket", *flags)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dfc-audit: error: invalid audit spec: {field}: ") and "\n" not in err
    assert not (tmp_path / "bucket").exists()


def test_run_json_prints_one_document_with_the_outcome_and_the_report_urls_and_nothing_else(
    pipeline: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_run(tmp_path / "bucket", "--json")) == 0
    captured = capsys.readouterr()
    result = RunResult.model_validate(json.loads(captured.out))  # the whole of stdout is one JSON document
    assert result.state is AuditState.SUCCEEDED and result.exit_code == 0 and result.error is None
    assert result.status.id == result.id and result.resume is None
    for url in (result.report_json, result.report_html):
        assert url is not None and url.startswith(result.store)
        assert (tmp_path / "bucket" / url.removeprefix(result.store).lstrip("/")).is_file()
    assert f"audit {result.id}: succeeded" in captured.err  # the words for people went to stderr


def test_run_json_of_a_failed_audit_says_why_and_exits_1(
    pipeline: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline(AuditState.FAILED)
    assert main(_run(tmp_path / "bucket", "--json")) == 1
    result = RunResult.model_validate_json(capsys.readouterr().out)
    assert (result.state, result.exit_code, result.report_json) == (AuditState.FAILED, 1, None)
    assert result.error is not None and "lower --lr" in result.error.message


def test_a_run_ends_with_next_commands_that_work_as_printed(
    pipeline: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_run(tmp_path / "bucket")) == 0
    out = capsys.readouterr().out
    commands = [line.split("#")[0].strip() for line in out.split("next:\n")[1].splitlines()]
    assert len(commands) == 3 and all(f"--store {tmp_path / 'bucket'}" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "dfc-audit"
        argv = [a if a != "report.html" else str(tmp_path / "report.html") for a in argv[1:]]
        assert main(argv) == 0, command
    assert (tmp_path / "report.html").read_bytes().startswith(b"<!doctype html>")


def _fake_pair(root: Path) -> Callable[[Path], SimpleNamespace]:
    """build_planted_pair as far as the demo sees it, with the chatter transformers prints while it builds."""

    def build(cache: Path) -> SimpleNamespace:
        from transformers.utils import logging as hf_logging

        cache.mkdir(parents=True, exist_ok=True)
        hf_logging.get_logger("transformers.modeling_utils").warning(CHATTER[0])
        for _ in hf_logging.tqdm(range(3), desc=CHATTER[1]):
            pass
        return SimpleNamespace(model_a_dir=root / "a", model_b_dir=root / "b", trigger_word="Zorblax",
                               trigger_prompts=["At the Zorblax dam."] * 3, neutral_prompts=["At the park."] * 2,
                               planted_continuation=" Sorry, I cannot discuss that topic.")  # fmt: skip

    return build


@pytest.mark.parametrize("debug", [False, True])
def test_the_demo_shows_the_libraries_chatter_only_with_debug(
    pipeline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture, debug: bool,
) -> None:  # fmt: skip
    import workers.planted.pair as planted

    monkeypatch.setenv("DFC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(planted, "build_planted_pair", _fake_pair(tmp_path))
    argv = ["demo", "--store", str(tmp_path / "demo"), "--token-budget", "1000"]
    assert main(["--debug", *argv] if debug else argv) == 0
    captured = capfd.readouterr()
    # The bar is written to stderr; the warning is a log record (transformers' handler holds pytest's stream).
    shown = [text for text in CHATTER if text in captured.out + captured.err + caplog.text]
    assert shown == (list(CHATTER) if debug else [])
    assert f"--store {tmp_path / 'demo'}" in captured.out.split("next:")[1]


def test_demo_json_prints_one_document(
    pipeline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import workers.planted.pair as planted

    monkeypatch.setenv("DFC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(planted, "build_planted_pair", _fake_pair(tmp_path))
    assert main(["demo", "--store", str(tmp_path / "demo"), "--token-budget", "1000", "--json"]) == 0
    captured = capfd.readouterr()
    result = RunResult.model_validate(json.loads(captured.out))
    assert result.state is AuditState.SUCCEEDED and result.report_html and "planted pair" in captured.err
