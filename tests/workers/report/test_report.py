"""Specification of the audit report: its JSON contract, the self-contained HTML page and the terminal summary."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from rich.console import Console

from workers.report.fixtures import example_report
from workers.report.html import render_html
from workers.report.schema import SCHEMA_VERSION, AuditReport, Context, Continuation, FeatureReport
from workers.report.terminal import feature_table, print_summary, scan_lines

EVIL = "<script>alert(1)</script>"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def report() -> AuditReport:
    return example_report(n_features=30, seed=0, n_shared=60)


@pytest.fixture(scope="module")
def page(report: AuditReport) -> str:
    return render_html(report)


def strings_in(value: Any) -> list[str]:
    """Every string a report carries (JSON values and keys)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return []


def poisoned(report: AuditReport) -> AuditReport:
    """A copy of ``report`` with a script tag in every kind of free text that model output or users control."""
    data = report.model_dump(mode="json")
    top = data["features_b"][0]
    top["top_contexts"][0].update(prefix=EVIL, token=EVIL, suffix=EVIL, doc_id=EVIL)
    top["promoted_tokens"][0]["token"] = EVIL
    top["explanation"]["text"] = EVIL
    top["checks"]["flags"].append(EVIL)
    top["steering"][0]["continuations"][0].update(prompt=EVIL, unsteered=EVIL, steered=EVIL)
    top["score_components"][EVIL] = 0.5
    data["model_b"]["id"] = EVIL
    data["warnings"].append(EVIL)
    data["spec"]["note"] = EVIL
    data["shared_summary"]["features"][0].update(snippet=EVIL, top_tokens=[EVIL])
    data["steering_transfer"]["notes"] = EVIL
    return AuditReport.model_validate(data)


# --- the JSON contract ---------------------------------------------------------------------------------------


def test_report_round_trips_exactly_through_json(report: AuditReport) -> None:
    text = report.model_dump_json()
    again = AuditReport.model_validate_json(text)
    assert again == report
    assert again.model_dump_json() == text
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION == "1.7"


def test_every_schema_field_has_a_description() -> None:
    schema = AuditReport.model_json_schema()
    missing = [
        f"{name}.{field}"
        for name, definition in {"AuditReport": schema, **schema["$defs"]}.items()
        for field, spec in definition.get("properties", {}).items()
        if not spec.get("description")
    ]
    assert missing == []


def test_an_unknown_schema_version_is_refused(report: AuditReport) -> None:
    data = report.model_dump(mode="json") | {"schema_version": "2.0"}
    with pytest.raises(ValidationError, match="schema_version"):
        AuditReport.model_validate(data)


def _set(data: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[int(key)] if isinstance(data, list) else data[key]
    data[int(last) if isinstance(data, list) else last] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("features_b.0.stats.frequency", -0.01, r"stats\.frequency"),
        ("features_b.0.stats.frequency", 1.5, r"stats\.frequency"),
        ("features_a.2.score", float("nan"), r"features_a\.2\.score\n.*finite"),
        ("features_a.0.score_components.strength", float("inf"), r"score_components\.strength\n.*finite"),
        ("features_b.0.checks.nu_eps", float("nan"), r"checks\.nu_eps\n.*finite"),
        ("features_b.0.top_contexts.0.activation", -1.0, r"top_contexts\.0\.activation"),
        ("features_b.1.rank", 3, r"features_b\[1\]\.rank=3; ranks must run 1\.\.30"),
        ("features_a.0.owner", "B", r"features_a\[0\]\.owner='B'"),
        ("features_b.0.index", 10**9, r"features_b\[0\]\.index=1000000000 is outside the dictionary"),
        ("features_b.5.score", 99.0, r"features_b\[5\]\.score=99\.0 is above the score of rank 5"),
        ("training.dead_fraction", 1.2, r"training\.dead_fraction"),
        ("model_b.layer", 36, r"layer=36 must be below n_layers=36"),
        ("crosscoder.n_shared", 5, r"n_a_only \+ n_b_only \+ n_shared"),
        ("finished_at", "2020-01-01T00:00:00Z", r"finished_at=.* is before created_at"),
        ("shared_summary.relative_norm_histogram.counts", [1, 2], r"bin_edges has 21 entries"),
        ("features_b.0.score_weights.made_up", 1.0, r"score_weights names \['made_up'\]"),
    ],
)
def test_validators_refuse_nonsense_naming_the_field(report: AuditReport, path: str, value: Any, message: str) -> None:
    data = report.model_dump(mode="json")
    _set(data, path, value)
    with pytest.raises(ValidationError, match=message):
        AuditReport.model_validate(data)


def test_unknown_keys_are_refused_rather_than_dropped() -> None:
    with pytest.raises(ValidationError, match="activaton"):
        Context.model_validate({"doc_id": "d", "prefix": "", "token": "x", "suffix": "", "activaton": 1.0})


# --- the HTML page -------------------------------------------------------------------------------------------


def test_html_loads_nothing_from_the_network(report: AuditReport, page: str) -> None:
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert all(src.startswith("data:") for src in re.findall(r'\bsrc="([^"]*)"', page))
    assert "url(" not in page
    carried = "\n".join(strings_in(report.model_dump(mode="json")))
    urls = re.findall(r"https?://[^\s\"'<>]+", page)
    assert urls, "the example carries a URL in a context; it must still be shown"
    assert [u for u in urls if u not in carried] == []


def test_html_escapes_model_output_everywhere(report: AuditReport) -> None:
    page = render_html(poisoned(report))
    assert EVIL not in page
    assert page.count("<script") == 1  # the page's own filter script
    assert page.count(EVIL_ESCAPED) >= 10


def test_html_is_deterministic(report: AuditReport, page: str) -> None:
    assert render_html(report) == page


def test_top_cards_come_first_and_cards_are_capped() -> None:
    big = example_report(n_features=120, seed=1, n_shared=50)
    page = render_html(big, top_n=20)
    for owner, features in (("b", big.features_b), ("a", big.features_a)):
        assert page.count(f'<article class="card owner-{owner}"') == 20
        assert page.count(f'id="feature-{owner}-') == 20
        table = page.split(f'id="table-{owner}"', 1)[1].split("</table>", 1)[0]
        assert table.count("<tr>") == len(features) + 1  # header + every feature, carded or not
    top_b, top_a = f'id="feature-b-{big.features_b[0].index}"', f'id="feature-a-{big.features_a[0].index}"'
    assert page.index(top_b) < page.index(top_a) < page.index('id="plots"')


def test_a_thousand_features_render_in_seconds() -> None:
    import time

    big = example_report(n_features=1000, seed=2, n_shared=1000)
    start = time.perf_counter()
    page = render_html(big)
    assert time.perf_counter() - start < 15
    assert len(page) < 5_000_000


# --- the page in a real browser ------------------------------------------------------------------------------

ERROR_TRAP = """<script>
window.addEventListener("error", function (e) {
  document.documentElement.setAttribute("data-js-error", String(e.message)); });
var consoleError = console.error;
console.error = function () {
  document.documentElement.setAttribute("data-js-error", Array.prototype.join.call(arguments, " "));
  consoleError.apply(console, arguments); };
</script>"""


def js_error(dom: str) -> str | None:
    """The message the error trap recorded on the <html> element, if any."""
    found = re.search(r'<html[^>]*\sdata-js-error="([^"]*)"', dom)
    return found.group(1) if found else None


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90, check=True)


def _dump(html_text: str, tmp_path: Path, name: str) -> tuple[str, str]:
    """Load ``html_text`` from a file:// URL in headless Chromium; return the DOM after scripts ran, and stderr."""
    path = tmp_path / f"{name}.html"
    path.write_text(html_text.replace("<head>", "<head>" + ERROR_TRAP, 1), encoding="utf-8")
    done = _chromium("--window-size=1280,900", "--dump-dom", path.as_uri(), profile=tmp_path / f"profile-{name}")
    return done.stdout, done.stderr


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_page_runs_in_chromium_without_errors_and_shows_b_top_feature_first(
    report: AuditReport, page: str, tmp_path: Path
) -> None:
    # The trap must be able to fail: a page with a broken script is caught.
    broken, _ = _dump("<html><head></head><body><script>noSuchFunction()</script></body></html>", tmp_path, "bad")
    assert js_error(broken) is not None

    top_b = report.features_b[0]
    query = report.shared_summary.features[3].top_tokens[0]
    expected = sum(query.lower() in " ".join([*f.top_tokens, f.snippet, str(f.index)]).lower()
                   for f in report.shared_summary.features)
    probe = f"""<script>
      var d = document.documentElement, card = document.getElementById("feature-b-{top_b.index}");
      d.setAttribute("data-top-b", card ? Math.round(card.getBoundingClientRect().top) : -1);
      var box = document.querySelector('input[data-filter="table-shared"]');
      box.value = {json.dumps(query)}; box.dispatchEvent(new Event("input"));
      d.setAttribute("data-shared-shown", document.querySelectorAll("#table-shared tbody tr:not([hidden])").length);
    </script></body>"""
    dom, stderr = _dump(page.replace("</body>", probe, 1), tmp_path, "report")
    assert js_error(dom) is None
    assert "Uncaught" not in stderr
    assert f'id="feature-b-{top_b.index}"' in dom
    # The top B card starts within the first screen and a half of a 1280×900 window.
    top = int(re.search(r'data-top-b="(-?\d+)"', dom).group(1))
    assert 0 < top < 1350
    # The filter box hides shared features that do not match what the reader typed.
    shown = int(re.search(r'data-shared-shown="(\d+)"', dom).group(1))
    assert 0 < shown == expected < len(report.shared_summary.features)

    shot = tmp_path / "report.png"
    _chromium("--window-size=1280,2400", f"--screenshot={shot}", (tmp_path / "report.html").as_uri(),
              profile=tmp_path / "profile-shot")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def _generation_boxes(page: str) -> list[str]:
    """The text a reader sees in each box of generated text (unsteered, suppressed, amplified, transferred)."""
    boxes = re.findall(r'<div(?: class="(?:suppressed|amplified)")?><h5>[^<]*</h5>(<p.*?</p>)</div>', page)
    return [html.unescape(re.sub(r"<[^>]+>", "", box)) for box in boxes]


def test_no_generation_box_is_ever_empty_and_each_says_what_happened(report: AuditReport) -> None:
    data = report.model_dump(mode="json")
    first, second = ({s["alpha"]: s for s in f["steering"]} for f in data["features_b"][:2])
    # Without per-token lists (what the steer stage records today): the text alone says what it can.
    first[-2.0]["continuations"][0]["unsteered"] = "\n\n"
    first[2.0]["continuations"][0]["steered"] = ""
    # With them: the tokens themselves.
    first[4.0]["continuations"] = [dict(first[2.0]["continuations"][0], steered="", steered_tokens=["<|endoftext|>"])]
    second[-2.0]["continuations"][0].update(unsteered="\n\n", unsteered_tokens=["\n", "\n"])
    data["steering_transfer"]["continuations"][0].update(steered=" ", steered_tokens=[" ", "<|im_end|>"])
    page = render_html(AuditReport.model_validate(data))

    boxes = _generation_boxes(page)
    assert len(boxes) >= 2 * len(report.features_b[:5]) and all(box.strip() for box in boxes), boxes
    assert "no text: the model ended the text at once (end-of-text or only special tokens)" in boxes
    assert "no text: the model ended the text at once (<|endoftext|>)" in boxes
    assert "only whitespace: ↵↵" in boxes and "only whitespace: ↵↵ (tokens ↵ ↵)" in boxes
    assert "only whitespace: ␣ (tokens ␣ <|im_end|>)" in boxes


def test_generated_tokens_are_optional_and_round_trip() -> None:
    old = {"prompt": "p", "unsteered": "", "steered": "x"}
    assert Continuation.model_validate(old).unsteered_tokens is None  # a 1.3 report still reads
    new = Continuation(prompt="p", unsteered="", steered="x", unsteered_tokens=["</s>"], steered_tokens=["x"])
    assert Continuation.model_validate_json(new.model_dump_json()) == new


def test_the_steer_stages_generated_tokens_reach_the_report_and_older_steer_data_still_builds() -> None:
    from workers.report.build import _steering_results

    point = {"alpha": 4.0, "kl_feature": 0.1, "kl_neutral": 0.0, "promoted_logprob_change": None,
             "continuations": [""]}  # fmt: skip
    sweep = {"probe_prompts": ["Hi"], "unsteered": [" there"], "points": [point]}
    old = _steering_results({"sweeps": {"additive": sweep}})[0].continuations[0]
    assert (old.steered, old.steered_tokens, old.unsteered_tokens) == ("", None, None)

    sweep |= {"unsteered_tokens": [[" there", "</s>"]], "points": [point | {"continuation_tokens": [["</s>"]]}]}
    new = _steering_results({"sweeps": {"additive": sweep}})[0].continuations[0]
    assert (new.unsteered_tokens, new.steered_tokens) == ([" there", "</s>"], ["</s>"])


# --- the terminal summary ------------------------------------------------------------------------------------


def test_terminal_summary_lists_top_features_of_both_models(report: AuditReport) -> None:
    console = Console(record=True, width=200, color_system=None, force_terminal=True)
    print_summary(report, console=console, top=5)
    text = console.export_text()
    for owner in ("A", "B"):
        features = report.features(owner)
        assert f"Exclusive to {owner}: {report.model(owner).id} (top 5 of 30)" in text
        for f in features[:5]:
            assert re.search(rf"│\s+{f.rank} │\s+{f.index} │ {f.score:.3f} │", text)
        assert str(features[5].index) not in text.split(f"Exclusive to {owner}")[1].split("Exclusive to")[0]
    top = report.features_b[0]
    assert repr(top.promoted_tokens[0].token) in text and top.top_contexts[0].token in text
    passed, failed = (sum(f.checks.passed == p for f in report.features_b[:5]) for p in (True, False))
    b_rows = "\n".join(r for r in text.split("Exclusive to B")[1].split("Exclusive to A")[0].splitlines()
                       if r.startswith("│"))  # the table's rows, not the evidence lines under it
    assert b_rows.count("✓") == passed and b_rows.count("✗") == failed


def test_terminal_summary_shows_explanations_only_when_the_audit_wrote_them(report: AuditReport) -> None:
    console = Console(record=True, width=400, color_system=None, force_terminal=True)
    print_summary(report, console=console, top=3)
    text = console.export_text()
    top = report.features_b[0].explanation
    assert "explanation (detection)" in text and f"{top.text} ({top.detection_score:.0%})" in text

    data = report.model_dump(mode="json")
    for f in data["features_a"] + data["features_b"]:
        f["explanation"] = None
    console = Console(record=True, width=400, color_system=None, force_terminal=True)
    print_summary(AuditReport.model_validate(data), console=console, top=3)
    assert "explanation" not in console.export_text()


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"│\s+\d+ │", line)]


@pytest.mark.parametrize("width", [60, 80, 100, 120, 200])
def test_terminal_summary_keeps_each_feature_on_one_line_at_any_width(report: AuditReport, width: int) -> None:
    console = Console(record=True, width=width, color_system=None, force_terminal=True)
    print_summary(report, console=console, top=5)
    text = console.export_text()
    rows = _table_rows(text)
    assert len(rows) == 10, text  # five per model, none wrapped onto a second line
    assert all(len(line) <= width for line in text.splitlines() if line.startswith(("│", "┃", "┏", "└")))
    for row, feature in zip(rows, report.features_b[:5] + report.features_a[:5], strict=True):
        assert re.match(rf"│\s+{feature.rank} │\s+{feature.index} │", row), row
        assert feature.top_contexts[0].token.strip() in row, row  # the context is cut around its marked token


def test_a_narrow_terminal_leaves_out_the_columns_that_matter_least(report: AuditReport) -> None:
    data = report.model_dump(mode="json")
    for f in data["features_b"]:
        f["explanation"] = None
    unexplained = AuditReport.model_validate(data)

    def table(report: AuditReport, width: int) -> tuple[list[str], str]:
        console = Console(record=True, width=width, color_system=None, force_terminal=True)
        console.print(feature_table(report, "B", top=5, width=width))
        text = console.export_text()
        header = next(line for line in text.splitlines() if line.startswith("┃"))
        return [h.strip() for h in header.strip("┃").split("┃")], text

    everything = ["rank", "feature", "score", "freq", "div", "ν_ε", "seeds", "checks", "top context", "says"]
    assert table(unexplained, 200)[0] == everything
    assert table(unexplained, 80)[0] == ["rank", "feature", "div", "checks", "top context", "says"]
    assert table(unexplained, 60)[0] == ["rank", "feature", "checks", "top context", "says"]
    assert table(report, 200)[0] == [*everything, "explanation (detection)"]
    headers, text = table(report, 80)  # no room for a readable explanation: left out, and the table says so
    assert "explanation" not in headers and "explanations need a wider terminal" in text


def test_summary_is_plain_text_when_stdout_is_not_a_terminal(report: AuditReport) -> None:
    out = io.StringIO()
    print_summary(report, console=Console(file=out, width=80), top=5)  # a pipe or a file, 80 columns or not
    text = out.getvalue()
    assert not set("│┃━┏└") & set(text) and "\x1b[" not in text
    lines = text.splitlines()
    for owner in ("B", "A"):
        title = lines.index(f"Exclusive to {owner}: {report.model(owner).id} (top 5 of 30)")
        assert lines[title + 1].split()[:3] == ["rank", "feature", "score"]
        for line, feature in zip(lines[title + 2 : title + 7], report.features(owner)[:5], strict=True):
            assert line.split()[:2] == [str(feature.rank), str(feature.index)]  # one line per feature
            assert f"«{feature.top_contexts[0].token}»" in line.replace("\n", "↵")
    assert max(map(len, lines)) > 80  # nothing wrapped to the console's width


def test_the_summary_names_distinct_aligned_pairs_and_pairs_seen_in_training_apart(report: AuditReport) -> None:
    console = Console(record=True, width=200, color_system=None, force_terminal=True)
    print_summary(report, console=console, top=1)
    text = console.export_text()
    assert report.alignment.pairs != report.training.tokens
    assert f"{report.alignment.pairs:,} distinct aligned token pairs" in text
    assert f"{report.training.tokens:,} seen in training" in text
    page = render_html(report)
    assert "distinct aligned token pairs" in page and "token pairs seen in training" in page


def test_terminal_summary_prints_model_output_literally(report: AuditReport) -> None:
    data = report.model_dump(mode="json")
    data["features_a"][0]["top_contexts"][0]["token"] = "[bold red]x[/bold red]"
    console = Console(record=True, width=200, color_system=None, force_terminal=True)
    print_summary(AuditReport.model_validate(data), console=console, top=1)
    assert "[bold red]x[/bold red]" in console.export_text()


def test_feature_report_models_accept_optional_evidence_left_out() -> None:
    """A feature the audit could not explain or steer still validates and renders."""
    base = example_report(n_features=3, seed=3, n_shared=5)
    data = base.model_dump(mode="json")
    data["features_b"][0].update(explanation=None, steering=[], weak_contexts=[])
    data["features_b"][0]["checks"].update(nu_eps=None, nu_r=None, nearest_shared_feature=None)
    bare = AuditReport.model_validate(data)
    assert isinstance(bare.features_b[0], FeatureReport) and bare.features_b[0].explanation is None
    page = render_html(bare.model_copy(update={"steering_transfer": None}))
    assert "Steering was not run for this feature." in page and "not computed" in page


def test_the_details_count_the_explanations_and_how_many_a_judge_found_interpretable(report: AuditReport) -> None:
    explained = [f.explanation for f in report.features_a + report.features_b if f.explanation]
    good = sum(e.detection_score >= 0.8 for e in explained)
    assert 0 < good < len(explained)
    page = render_html(report)
    assert (f"{len(explained)} features explained by example-explainer; {len(explained)} judged, {good} of them "
            "interpretable") in page  # fmt: skip
    data = report.model_dump(mode="json")
    for f in data["features_a"] + data["features_b"]:
        f["explanation"] = None
    assert "features explained by" not in render_html(AuditReport.model_validate(data))


def test_a_report_with_no_exclusive_features_for_a_model_still_renders():
    # A standard crosscoder can find nothing exclusive to a model; the page must say so, not crash.
    from workers.report.fixtures import example_report
    from workers.report.html import render_html
    from workers.report.plots import frequency_score_plot

    report = example_report().model_copy(update={"features_a": []})
    assert frequency_score_plot(report).startswith("data:image/")  # raised "Data cannot be log-scaled"
    assert 'id="feature-b-' in render_html(report)


def test_token_counts_read_at_a_glance_at_every_scale():
    from workers.report.html import _count

    assert [_count(n) for n in (512, 131_049, 2_400_000, 100_000_000)] == ["512", "131k", "2.4 M", "100 M"]


# --- null-calibrated checks --------------------------------------------------------------------------------------


def test_the_summary_says_what_a_check_mark_means_and_how_each_top_finding_compares_with_the_null(report):
    out = io.StringIO()
    print_summary(report, Console(file=out, width=120, color_system=None, force_terminal=False))
    text = out.getvalue()
    assert "✓ = Latent Scaling and divergence > 0.14 (null p99), removal kl > 0.01 (null p50)" in text
    assert "by chance: 0.33 findings per audit pass on null pairs (at most 1; 3 null pairs, 120 null features)" in text
    top = report.features_b[0]
    divergence = next(c for c in top.checks.null_checks if c.name == "divergence")
    assert f"divergence {divergence.value:.3g} nats; null 99th percentile 0.14" in text


def test_a_finding_below_the_null_fails_its_checks_and_says_which():
    from dfc.analysis.null import FindingStatistics, judge
    from dfc.analysis.ranking import RankingWeights
    from workers.report.build import _checks
    from workers.report.fixtures import EXAMPLE_CALIBRATION

    entry = {"nu_eps": 0.1, "nu_r": 0.1, "passes_latent_scaling": True}
    record = {"nearest_shared_cosine": 0.1, "nearest_shared": 3, "contexts": [1, 2, 3]}
    new = judge(FindingStatistics(4.8, 0.5, 3.0, 1.0), EXAMPLE_CALIBRATION)
    reencoding = judge(FindingStatistics(0.01, 0.5, 3.0, 1.0), EXAMPLE_CALIBRATION)
    assert _checks(entry, record, None, RankingWeights(), new).passed
    failed = _checks(entry, record, None, RankingWeights(), reencoding)
    assert not failed.passed
    assert any(f.startswith("below the null: divergence 0.01 nats; null 99th percentile 0.14") for f in failed.flags)
    # Without steering there is nothing to check against the null: Latent Scaling alone decides.
    assert _checks(entry, record, None, RankingWeights(), None).passed


def test_a_report_from_before_the_null_checks_still_opens_and_says_so(report):
    data = json.loads(report.model_dump_json())
    data["schema_version"] = "1.4"
    del data["checks_calibration"]
    for feature in data["features_a"] + data["features_b"]:
        del feature["checks"]["null_checks"]
    old = AuditReport.model_validate(data)
    assert old.checks_calibration is None and all(not f.checks.null_checks for f in old.features_b)
    out = io.StringIO()
    print_summary(old, Console(file=out, width=120, color_system=None, force_terminal=False))
    assert "no null calibration in this report" in out.getvalue()
    assert "no null calibration in this report" in render_html(old)


def test_the_shipped_calibration_is_from_null_pairs_and_a_spec_can_bring_its_own():
    from workers.report.checks import builtin_calibration, calibration_for
    from workers.spec import NullCalibrationSpec

    shipped = builtin_calibration()
    assert shipped.null_pairs >= 3 and shipped.null_features >= 100
    assert {"divergence", "removal_kl"} <= set(shipped.thresholds) and shipped.percentiles["divergence"] >= 99
    # Fewer than one chance finding per calibration null pair on average (held-out nulls: benchmarks/suite.py).
    assert len(shipped.passing_per_pair) == shipped.null_pairs and shipped.passing_per_pair_mean < 1
    assert shipped.scan_gap is not None and shipped.scan_percentile is not None  # the scan's ✓ reads the gap
    own = NullCalibrationSpec(thresholds={"divergence": 2.0}, percentiles={"divergence": 99}, null_pairs=1,
                              null_features=40, scan_gap=5.0)  # fmt: skip
    mine = calibration_for(own.model_dump())
    assert mine.thresholds == {"divergence": 2.0} and mine.scan_gap == 5.0 and mine.scan_salience is None
    with pytest.raises(ValidationError, match="unknown check statistics"):
        NullCalibrationSpec(thresholds={"loudness": 1.0}, percentiles={"loudness": 99}, null_pairs=1, null_features=1)


def test_a_report_from_before_ensembles_and_the_scan_still_opens_with_no_seeds_and_no_scan(report):
    data = json.loads(report.model_dump_json())
    data["schema_version"] = "1.5"
    for key in ("ensemble", "divergent_contexts", "scan"):
        del data[key]
    for feature in data["features_a"] + data["features_b"]:
        for key in ("run", "seed", "stability", "seeds"):
            del feature[key]
        del feature["score_components"]["stability"], feature["score_weights"]["stability"]
    old = AuditReport.model_validate(data)
    assert old.ensemble is None and old.divergent_contexts is None and old.scan is None
    assert all(f.stability is None and f.label == str(f.index) and f.stability_text == "" for f in old.features_b)
    out = io.StringIO()
    print_summary(old, Console(file=out, width=200, color_system=None, force_terminal=False))
    text = out.getvalue()
    assert "seeds" not in text and "behaviour-first scan" not in text  # nothing to show, no empty column
    page = render_html(old)
    assert 'id="divergent"' not in page and "Divergent contexts" not in page


def test_two_findings_of_different_seeds_may_share_an_index_but_one_seed_may_not_list_it_twice(report):
    first, second = report.features_b[0], report.features_b[1]
    other_seed = second.model_copy(update={"index": first.index, "run": 1, "seed": 1})
    ok = report.model_copy(update={"features_b": [first, other_seed, *report.features_b[2:]]})
    AuditReport.model_validate(ok.model_dump())
    assert other_seed.label == f"{first.index}@seed1" and first.label == str(first.index)
    twice = report.model_copy(update={"features_b": [first, second.model_copy(update={"index": first.index}),
                                                      *report.features_b[2:]]})  # fmt: skip
    with pytest.raises(ValidationError, match=f"index={first.index} of run 0 appears twice"):
        AuditReport.model_validate(twice.model_dump())
    page = render_html(ok)  # each has its own card anchor
    assert f'id="feature-b-{first.index}"' in page and f'id="feature-b-{first.index}-run1"' in page


def test_the_terminal_lists_what_each_model_says_that_the_other_would_not_and_what_carries_it(report):
    out = io.StringIO()
    print_summary(report, Console(file=out, width=160, color_system=None, force_terminal=False))
    text = out.getvalue()
    b_first = next(e for e in report.divergent_contexts if e.owner == "B")
    assert "What B says that A would not (behaviour-first scan" in text and "What A says that B would not" in text
    assert f"#1 says {b_first.text!r}" in text and f"in {b_first.occurrences} docs" in text
    assert f"salience {b_first.salience:.2f}" in text and f"gap {b_first.gap:.1f}," in text
    assert "✓ = gap > 8 nats and salience > 2.50, the null pairs' p99" in text
    absorbed = next(e for e in report.divergent_contexts if e.owner == "B" and e.features[0].partition == "shared")
    assert f"carried by shared {absorbed.features[0].index}@seed1 ({absorbed.features[0].closes:.0%})" in text
    lines = [line for line in text.splitlines() if "says" in line and "score" in line]
    assert all(len(line) <= 160 for line in scan_lines(report, "B", width=160))
    assert lines


def test_the_page_lists_divergent_contexts_with_links_to_the_cards_of_the_features_that_carry_them(report, page):
    assert 'id="divergent"' in page and "Divergent contexts" in page
    for e in report.divergent_contexts:
        for link in e.features:
            anchor = f'href="#feature-{e.owner.lower()}-{link.index}"'
            assert (anchor in page) == (link.reported and link.partition != "shared")
    assert "✓ = gap &gt; 8 nats and salience &gt; 2.50" in page  # the scan's null thresholds are stated


def test_a_1_6_report_whose_scan_was_checked_on_salience_alone_still_opens_and_says_so(report):
    data = json.loads(report.model_dump_json())
    data["schema_version"] = "1.6"
    del data["scan"]["null_gap"], data["checks_calibration"]["scan_gap"]
    old = AuditReport.model_validate(data)
    assert old.scan is not None and old.scan.null_gap is None and old.scan.null_threshold == 2.5
    out = io.StringIO()
    print_summary(old, Console(file=out, width=160, color_system=None, force_terminal=False))
    assert "✓ = salience > 2.50, the null pairs' p99" in out.getvalue() and "gap >" not in out.getvalue()
