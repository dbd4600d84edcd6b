"""A terminal summary of an audit report: the headline numbers and a table of the top features per model.

On a terminal the table is fitted to its width, one line per feature: the context is cut around its marked token
with an ellipsis, and on a narrow terminal the columns that matter least are left out. Anywhere else (a pipe, a
file, a CI log) it is plain aligned text: one line per feature whatever the width, no box drawing, no colours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from workers.report.schema import AuditReport, FeatureReport, Owner
from workers.spec import CHECK_STATISTICS

_STYLE: dict[Owner, str] = {"A": "blue", "B": "dark_orange3"}
SNIPPET_CHARS = 48
"""Width of a top context where there is room (and always in plain text)."""
MIN_CONTEXT_CHARS = 24
"""Narrowest context worth showing: below it, columns are dropped to make room."""
SAYS_CHARS = 14
MIN_EXPLANATION_CHARS = 16
_BORDERS = 3
"""Columns a rich table spends per column (padding on both sides and a rule), plus one for the last rule."""


def _snippet(feature: FeatureReport, chars: int, mark: tuple[str, str] = ("", "")) -> Text:
    """The top context in at most ``chars`` cells, cut around its marked token (in bold, or between ``mark``).

    Rich markup in the text is not interpreted: model output is shown as written.
    """
    if not feature.top_contexts:
        return Text("—", style="dim")
    c = feature.top_contexts[0]
    flat = str.maketrans({"\n": "↵", "\t": " ", "\r": "↵"})
    prefix, token, suffix = (part.translate(flat) for part in (c.prefix, c.token, c.suffix))
    token = _cut(token, max(1, chars - cell_len(mark[0] + mark[1])))
    room = max(0, chars - cell_len(token) - cell_len(mark[0] + mark[1]))
    keep_after = min(cell_len(suffix), room // 3)
    keep_before = room - keep_after
    if cell_len(prefix) < keep_before:  # a short prefix leaves its room to the suffix
        keep_after = min(cell_len(suffix), room - cell_len(prefix))
    before, after = _cut_left(prefix, keep_before), _cut(suffix, keep_after)
    # Text.assemble takes plain strings, so '[bold]' inside model output stays literal.
    return Text.assemble(before, mark[0], (token, "bold reverse"), mark[1], after)


def _cut(text: str, chars: int) -> str:
    """``text`` in at most ``chars`` cells, ending in "…" when it had to be cut."""
    if cell_len(text) <= chars:
        return text
    if chars <= 0:
        return ""
    out, used = [], 0
    for char in text:
        if used + cell_len(char) > chars - 1:
            break
        out.append(char)
        used += cell_len(char)
    return "".join(out) + "…"


def _cut_left(text: str, chars: int) -> str:
    """The end of ``text`` in at most ``chars`` cells, starting with "…" when it had to be cut."""
    if cell_len(text) <= chars:
        return text
    return "…" + _tail(text, chars - 1) if chars > 0 else ""


def _tail(text: str, chars: int) -> str:
    """The last ``chars`` cells of ``text``."""
    out, used = [], 0
    for char in reversed(text):
        if used + cell_len(char) > chars:
            break
        out.append(char)
        used += cell_len(char)
    return "".join(reversed(out))


def _says(feature: FeatureReport) -> str:
    """The next token the feature most makes its model say that the other would not (divergence), else the
    token its decoder promotes most."""
    if feature.divergence is not None and feature.divergence.tokens:
        text = feature.divergence.tokens[0].text
        return _cut("end of text" if text is None else repr(text), SAYS_CHARS)
    return _cut(repr(feature.promoted_tokens[0].token), SAYS_CHARS) if feature.promoted_tokens else "—"


def _explanation(feature: FeatureReport) -> str:
    """The LLM's explanation, with its detection score when it was judged."""
    e = feature.explanation
    if e is None:
        return "—"
    score = "" if e.detection_score is None else f" ({e.detection_score:.0%})"
    return " ".join(e.text.split()) + score


def _check(feature: FeatureReport) -> Text:
    return Text("✓", style="green") if feature.checks.passed else Text("✗", style="red")


@dataclass(frozen=True)
class _Column:
    """A column of fixed content; ``optional`` columns are dropped, in list order, on a narrow terminal."""

    name: str
    cell: Callable[[FeatureReport], str | Text]
    justify: str = "right"
    optional: bool = False


# Left to right as shown; the optional ones are dropped on a narrow terminal in the order of _DROP_ORDER.
_COLUMNS = (
    _Column("rank", lambda f: str(f.rank)),
    _Column("feature", lambda f: f.label),
    _Column("score", lambda f: f"{f.score:.3f}", optional=True),
    _Column("freq", lambda f: f"{f.stats.frequency * 100:.3g}%", optional=True),
    _Column("div", lambda f: "—" if f.divergence is None else f"{f.divergence.nats:.2f}", optional=True),
    _Column("ν_ε", lambda f: "—" if f.checks.nu_eps is None else f"{f.checks.nu_eps:.2f}", optional=True),
    _Column("seeds", lambda f: f.stability_text.removesuffix(" seeds").removesuffix(" seed") or "—",
            justify="center", optional=True),
    _Column("checks", _check, justify="center"),
)
_DROP_ORDER = ("ν_ε", "freq", "score", "seeds", "div")


def _title(report: AuditReport, owner: Owner, top: int) -> str:
    features = report.features(owner)
    return f"Exclusive to {owner}: {report.model(owner).id} (top {min(top, len(features))} of {len(features)})"


def _width(name: str, cells: list[str]) -> int:
    return max([cell_len(name), *map(cell_len, cells)])


@dataclass(frozen=True)
class _Layout:
    """What fits a terminal: the columns kept, the context's width and the explanation's (0: left out)."""

    columns: list[_Column]
    context: int
    explanation: int


def _columns(rows: list[FeatureReport]) -> list[_Column]:
    """The columns these rows need: "seeds" only for a seed ensemble's findings."""
    return [c for c in _COLUMNS if c.name != "seeds" or any(f.stability_text for f in rows)]


def _fit(rows: list[FeatureReport], width: int, explained: bool) -> _Layout:
    """Drop optional columns until the context (and the explanation) get a readable width within ``width``; an
    explanation that still cannot is left out rather than cut to a few characters."""
    columns = _columns(rows)
    says = _width("says", [_says(f) for f in rows])

    def free(columns: list[_Column], explained: bool) -> int:
        fixed = sum(_width(c.name, [str(c.cell(f)) for f in rows]) for c in columns) + says
        return width - fixed - _BORDERS * (len(columns) + 2 + explained) - 1

    wanted = MIN_CONTEXT_CHARS + (MIN_EXPLANATION_CHARS if explained else 0)
    while free(columns, explained) < wanted:
        droppable = [name for name in _DROP_ORDER if any(c.name == name for c in columns)]
        if not droppable:
            break
        columns = [c for c in columns if c.name != droppable[0]]
    room = free(columns, explained)
    if explained and room < wanted:
        explained, room = False, free(columns, False)
    context = max(8, min(SNIPPET_CHARS, room - (MIN_EXPLANATION_CHARS if explained else 0)))
    return _Layout(columns, context, room - context if explained else 0)


def feature_table(report: AuditReport, owner: Owner, top: int = 10, width: int = 200) -> Table:
    """A ``rich`` table of the ``top`` ranked features exclusive to ``owner``, one line each, fitted to ``width``
    columns (with an explanation column when the audit wrote explanations)."""
    rows = report.features(owner)[:top]
    explained = any(f.explanation is not None for f in rows)
    layout = _fit(rows, width, explained)
    squeezed = explained and not layout.explanation
    caption = "explanations need a wider terminal (or see report.html)" if squeezed else None
    table = Table(title=_title(report, owner, top), title_style=f"bold {_STYLE[owner]}", header_style="bold",
                  caption=caption, expand=False, box=box.HEAVY_HEAD)  # fmt: skip
    for column in layout.columns:
        table.add_column(column.name, justify=column.justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("top context", no_wrap=True, overflow="ellipsis", width=layout.context)
    table.add_column("says", no_wrap=True, overflow="ellipsis")
    if layout.explanation:
        header = "explanation (detection)" if layout.explanation >= len("explanation (detection)") else "explanation"
        table.add_column(header, no_wrap=True, overflow="ellipsis", max_width=layout.explanation)
    for f in rows:
        explanation = [_cut(_explanation(f), layout.explanation)] if layout.explanation else []
        table.add_row(*(c.cell(f) for c in layout.columns), _snippet(f, layout.context), _says(f), *explanation)
    return table


def feature_lines(report: AuditReport, owner: Owner, top: int = 10) -> list[str]:
    """The same table as plain aligned text: a title, a header and one line per feature, never wrapped."""
    rows = report.features(owner)[:top]
    explained = any(f.explanation is not None for f in rows)
    columns = _columns(rows)
    names = [c.name for c in columns] + ["says", "top context"] + (["explanation (detection)"] if explained else [])
    cells = [[str(c.cell(f)) for c in columns] + [_says(f), _snippet(f, SNIPPET_CHARS, ("«", "»")).plain]
             + ([_explanation(f)] if explained else []) for f in rows]  # fmt: skip
    widths = [_width(name, [row[i] for row in cells]) for i, name in enumerate(names)]
    right = {c.name for c in columns if c.justify == "right"}

    def line(values: list[str]) -> str:
        padded = []
        for name, value, width in zip(names, values, widths, strict=True):
            gap = " " * (width - cell_len(value))
            padded.append(gap + value if name in right else value + gap)
        return "  ".join(padded).rstrip()

    return [_title(report, owner, top), line(names), *(line(row) for row in cells)]


def headline(report: AuditReport) -> list[str]:
    """The numbers above the tables: reconstruction quality, and the two token-pair counts named apart."""
    t, pairs = report.training, report.alignment.pairs
    passes = f" ({t.tokens / pairs:.1f} passes)" if pairs else ""
    lines = [
        f"FVE A {t.fve_a:.3f} · FVE B {t.fve_b:.3f} · L0 {t.l0:.0f} · dead {t.dead_fraction:.1%}",
        f"{pairs:,} distinct aligned token pairs · {t.tokens:,} seen in training{passes}",
    ]
    for owner in ("B", "A"):
        features = report.features(owner)
        passed = sum(f.checks.passed for f in features)
        lines.append(f"{owner}-exclusive: {len(features)} ranked, {passed} passed the false-positive checks")
    lines.extend(checks_legend(report))
    return lines


def checks_legend(report: AuditReport) -> list[str]:
    """What a ✓ means in this report: the null thresholds, and how many findings pass them by chance."""
    cal = report.checks_calibration
    if cal is None:
        return ["✓ = passes Latent Scaling (no null calibration in this report)"]
    order = [n for n in CHECK_STATISTICS if n in cal.thresholds]
    parts = [f"{n.replace('_', ' ')} > {cal.thresholds[n]:.3g} (null p{cal.percentiles[n]:g})" for n in order]
    chance = sum(cal.passing_per_pair) / len(cal.passing_per_pair) if cal.passing_per_pair else 0.0
    worst = max(cal.passing_per_pair, default=0)
    return [
        f"✓ = Latent Scaling and {', '.join(parts)}",
        f"    by chance: {chance:.2g} findings per audit pass on null pairs (at most {worst}; {cal.null_pairs} null "
        f"pairs, {cal.null_features} null features)",
    ]


def finding_evidence(report: AuditReport, owner: Owner, top: int = 3) -> list[str]:
    """The ``top`` findings of ``owner`` against the null, one line each ("divergence 4.8 nats; null 99th …")."""
    out = []
    for feature in report.features(owner)[:top]:
        if feature.checks.null_checks:
            mark = "✓" if feature.checks.passed else "✗"
            texts = " · ".join(c.text for c in feature.checks.null_checks)
            seeds = f" ({feature.stability_text})" if feature.stability_text else ""
            out.append(f"  {mark} #{feature.rank} feature {feature.label}{seeds}: {texts}")
    return out


def _quoted(text: str | None) -> str:
    return "end of text" if text is None else repr(text)


def scan_checks(report: AuditReport) -> str:
    """What a scan entry's ✓ means in this report ("gap > 6.1 nats"; empty: the scan is not checked)."""
    info = report.scan
    if info is None:
        return ""
    checks = [f"gap > {info.null_gap:.3g} nats" if info.null_gap is not None else "",
              f"salience > {info.null_threshold:.2f}" if info.null_threshold is not None else ""]  # fmt: skip
    return " and ".join(c for c in checks if c)


def scan_lines(report: AuditReport, owner: Owner, top: int = 5, width: int = 160) -> list[str]:
    """The behaviour-first scan's ``top`` entries of ``owner``: what it says where, how likely the other model finds
    it, and which features carry it (one line per entry, a second for the features)."""
    entries = [e for e in report.divergent_contexts or [] if e.owner == owner][:top]
    if not entries:
        return []
    other = "A" if owner == "B" else "B"
    threshold = ""
    checks = scan_checks(report)
    if checks:
        cal = report.checks_calibration
        null = "" if cal is None or cal.scan_percentile is None else f", the null pairs' p{cal.scan_percentile:g}"
        threshold = f"; ✓ = {checks}{null}"
    lines = [f"What {owner} says that {other} would not (behaviour-first scan, top {len(entries)}{threshold}):"]
    for e in entries:
        mark = " " if e.passes_null is None else ("✓" if e.passes_null else "✗")
        head = (f"  {mark} #{e.rank} says {_quoted(e.text)} (p {e.p_owner:.2f}; log p {owner} {e.logprob_owner:.1f}, "
                f"{other} {e.logprob_other:.1f}) in {e.occurrences} doc{'s' if e.occurrences > 1 else ''}, "
                f"gap {e.gap:.1f}, score {e.score:.1f}, "
                f"salience {'—' if e.salience is None else f'{e.salience:.2f}'}: ")  # fmt: skip
        context = " ".join(e.context.split())
        room = max(16, width - cell_len(head))
        lines.append(head + ("…" + context[-(room - 1) :] if len(context) > room else context))
        if e.features:
            named = [(f, f"{f.index}" if not f.run else f"{f.index}@seed{f.seed}") for f in e.features[:3]]
            carried = ", ".join(f"{f.partition} {name} ({f.closes:.0%})" for f, name in named)
            lines.append(f"      carried by {carried}")
    return lines


def print_summary(report: AuditReport, console: Console | None = None, top: int = 10) -> None:
    """Print the audit's headline numbers and the ``top`` features exclusive to B, then to A: a table fitted to
    the console when it is a terminal, plain lines otherwise."""
    console = console or Console()
    plain = not console.is_terminal

    def say(text: str | Text) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=plain)

    if plain:
        say(f"Audit {report.audit_id}: B {report.model_b.id} vs A {report.model_a.id}")
    else:
        say(Text.assemble(
            ("Audit ", "bold"), (report.audit_id, "bold"), ": ",
            ("B ", f"bold {_STYLE['B']}"), report.model_b.id, " vs ", ("A ", f"bold {_STYLE['A']}"), report.model_a.id,
        ))  # fmt: skip
    for line in headline(report):
        say(line)
    for warning in report.warnings:
        say(Text("! " + warning, style="yellow"))
    for owner in ("B", "A"):
        if plain:
            say("")
            for line in feature_lines(report, owner, top):
                say(line)
        else:
            console.print(feature_table(report, owner, top, width=console.width))
        for line in finding_evidence(report, owner):
            say(line if plain else _cut(line, max(20, console.width)))
    for owner in ("B", "A"):
        lines = scan_lines(report, owner, width=10_000 if plain else console.width)
        if lines:
            say("")
        for line in lines:
            say(line if plain else _cut(line, max(20, console.width)))
