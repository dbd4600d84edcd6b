"""A terminal summary of an audit report: the headline numbers and a ``rich`` table of top features per model."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from workers.report.schema import AuditReport, FeatureReport, Owner

_STYLE: dict[Owner, str] = {"A": "blue", "B": "dark_orange3"}
SNIPPET_CHARS = 48


def _snippet(feature: FeatureReport) -> Text:
    """The top context around its marked token, the token in bold; rich markup in the text is not interpreted."""
    if not feature.top_contexts:
        return Text("—", style="dim")
    c = feature.top_contexts[0]
    room = max(0, SNIPPET_CHARS - len(c.token))
    keep_before, keep_after = room * 2 // 3, room // 3
    before = c.prefix if len(c.prefix) <= keep_before else "…" + c.prefix[len(c.prefix) - keep_before + 1 :]
    after = c.suffix if len(c.suffix) <= keep_after else c.suffix[: max(0, keep_after - 1)] + "…"
    flat = str.maketrans({"\n": "↵", "\t": " "})
    # Text.assemble takes plain strings, so '[bold]' inside model output stays literal.
    return Text.assemble(before.translate(flat), (c.token.translate(flat), "bold reverse"), after.translate(flat))


def _says(feature: FeatureReport) -> Text:
    """The next token the feature most makes its model say that the other would not (divergence), else the
    token its decoder promotes most."""
    if feature.divergence is not None and feature.divergence.tokens:
        text = feature.divergence.tokens[0].text
        return Text("end of text" if text is None else repr(text))
    return Text(repr(feature.promoted_tokens[0].token) if feature.promoted_tokens else "—")


def _explanation(feature: FeatureReport) -> Text:
    """The LLM's explanation, with its detection score when it was judged."""
    e = feature.explanation
    if e is None:
        return Text("—", style="dim")
    score = "" if e.detection_score is None else f" ({e.detection_score:.0%})"
    return Text(e.text + score)


def feature_table(report: AuditReport, owner: Owner, top: int = 10) -> Table:
    """A ``rich`` table of the ``top`` ranked features exclusive to ``owner`` (with an explanation column when the
    audit wrote explanations)."""
    model = report.model(owner)
    features = report.features(owner)
    explained = any(f.explanation is not None for f in features[:top])
    table = Table(title=f"Exclusive to {owner}: {model.id} (top {min(top, len(features))} of {len(features)})",
                  title_style=f"bold {_STYLE[owner]}", header_style="bold", expand=False)
    for name, justify in (("rank", "right"), ("feature", "right"), ("score", "right"), ("freq", "right"),
                          ("div", "right"), ("ν_ε", "right"), ("checks", "center"), ("top context", "left"),
                          ("says", "left")):
        table.add_column(name, justify=justify, overflow="fold" if name == "top context" else "ellipsis")
    if explained:
        table.add_column("explanation (detection)", overflow="fold")
    for f in features[:top]:
        nu_eps = "—" if f.checks.nu_eps is None else f"{f.checks.nu_eps:.2f}"
        check = Text("✓", style="green") if f.checks.passed else Text("✗", style="red")
        cells = [str(f.rank), str(f.index), f"{f.score:.3f}", f"{f.stats.frequency * 100:.3g}%",
                 "—" if f.divergence is None else f"{f.divergence.nats:.2f}", nu_eps, check, _snippet(f), _says(f)]
        table.add_row(*cells, *([_explanation(f)] if explained else []))
    return table


def print_summary(report: AuditReport, console: Console | None = None, top: int = 10) -> None:
    """Print the audit's headline numbers and the ``top`` features exclusive to B, then to A."""
    console = console or Console()
    t = report.training
    console.print(Text.assemble(
        ("Audit ", "bold"), (report.audit_id, "bold"), ": ",
        ("B ", f"bold {_STYLE['B']}"), report.model_b.id, " vs ", ("A ", f"bold {_STYLE['A']}"), report.model_a.id,
    ))
    console.print(
        f"FVE A {t.fve_a:.3f} · FVE B {t.fve_b:.3f} · L0 {t.l0:.0f} · dead {t.dead_fraction:.1%} · "
        f"{t.tokens:,} token pairs",
        markup=False, highlight=False,
    )
    for owner in ("B", "A"):
        features = report.features(owner)
        passed = sum(f.checks.passed for f in features)
        console.print(f"{owner}-exclusive: {len(features)} ranked, {passed} passed the false-positive checks",
                      markup=False, highlight=False)
    for warning in report.warnings:
        console.print(Text("! " + warning, style="yellow"))
    for owner in ("B", "A"):
        console.print(feature_table(report, owner, top))
