"""Render an :class:`AuditReport` as ONE self-contained HTML page for a person who never saw the tool.

No network: CSS and the tiny table-filter script are inline, plots are ``data:`` URIs. Every report string is
escaped (see :mod:`workers.report.cards`). Only the top ``top_n`` features per model get a full card; all of
them are listed in a compact, filterable table, so a report with thousands of features still opens fast.
"""

from __future__ import annotations

import json

from workers.report import plots
from workers.report.cards import (
    anchor_of,
    badge,
    esc,
    esc_visible,
    feature_anchor,
    feature_card,
    feature_row,
    fmt_freq,
    generation_html,
    shared_link,
    token_text,
)
from workers.report.schema import INTERPRETABLE, AuditReport, ModelInfo, Owner
from workers.report.terminal import checks_legend, scan_checks

DEFAULT_TOP_N = 50

_CSS = """
:root{--a:#1d4ed8;--b:#c2410c;--ink:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--ok:#15803d;--bad:#b91c1c}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);
 background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:0 20px 60px}
nav{position:sticky;top:0;z-index:5;background:#111827;padding:6px 20px;font-size:13px}
nav a{color:#e5e7eb;margin-right:16px;text-decoration:none}nav a:hover{text-decoration:underline}
h1{font-size:24px;margin:22px 0 4px}h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;
 border-bottom:2px solid var(--line)}h3{font-size:16px;margin:0}h4{font-size:13.5px;margin:12px 0 6px;
 color:#374151}h5{margin:0 0 4px;font-size:12px;color:var(--muted)}
section,article{scroll-margin-top:40px}
.muted{color:var(--muted)}.sub{color:var(--muted);margin:0 0 14px}
.a{color:var(--a)}.b{color:var(--b)}
.models{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.model{background:#fff;border:1px solid var(--line);border-left:5px solid;border-radius:8px;padding:10px 14px}
.model.a{border-left-color:var(--a)}.model.b{border-left-color:var(--b)}
.model h3 code{font-size:15px}.model p{margin:2px 0;color:var(--muted);font-size:13px}
.howto{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin-top:14px}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(128px,1fr));gap:10px}
.tile{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.tile b{display:block;font-size:22px}.tile>span{color:var(--muted);font-size:12px;line-height:1.3;display:block}
.warn{background:#fffbeb;border:1px solid #fcd34d;border-radius:8px;padding:8px 14px 8px 30px;margin:12px 0}
.card{background:#fff;border:1px solid var(--line);border-top:4px solid;border-radius:8px;padding:14px 18px;
 margin:16px 0}
.card.owner-a{border-top-color:var(--a)}.card.owner-b{border-top-color:var(--b)}
.card>header{display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.rank{font-weight:700;font-size:18px;color:var(--muted)}
.owner{font-weight:400;font-size:13px;color:var(--muted)}
.owner-a .owner{color:var(--a)}.owner-b .owner{color:var(--b)}
.expl{font-size:15px;margin:8px 0 2px;font-style:italic}.expl small{font-style:normal;color:var(--muted)}
.meta{color:var(--muted);font-size:13px;margin:4px 0}
.cols{display:grid;grid-template-columns:3fr 2fr;gap:20px}
@media (max-width:860px){.cols,.models,.side{grid-template-columns:1fr!important}}
.ctxs{margin:0;padding-left:20px}
.ctx{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:12.5px;margin:0 0 6px;
 white-space:pre-wrap;word-break:break-word}
mark{background:rgba(234,88,12,calc(.18 + .62*var(--a)));border-radius:3px;padding:0 2px;font-weight:600}
.owner-a mark{background:rgba(37,99,235,calc(.15 + .55*var(--a)))}
.act{margin-left:8px;font-size:11px;color:var(--muted)}.nl{color:#9ca3af}
.chips{display:flex;flex-wrap:wrap;gap:6px}
.chip{border-radius:12px;padding:1px 8px;font-size:12px;border:1px solid}
.chip small{margin-left:6px;color:var(--muted)}
.chip.up{background:#ecfdf5;border-color:#a7f3d0}.chip.down{background:#fef2f2;border-color:#fecaca}
.badge{border-radius:12px;padding:2px 10px;font-size:12px;font-weight:600}
.badge.pass{background:#dcfce7;color:var(--ok)}.badge.fail{background:#fee2e2;color:var(--bad)}
.seeds{border-radius:12px;padding:2px 10px;font-size:12px;margin-left:6px;background:#e0e7ff;color:#3730a3}
.seeds.one-seed{background:#fef3c7;color:#92400e}
.checks td,.checks th{padding:2px 10px 2px 0;text-align:left;font-size:13px}
.ok{color:var(--ok)}.bad{color:var(--bad)}
.flags{margin:6px 0;padding-left:18px;color:#92400e;font-size:13px}
table.num,table.list{border-collapse:collapse;font-size:13px}
table.num td,table.num th{padding:3px 14px 3px 0;text-align:right}table.num tbody th{text-align:left}
table.num th{color:var(--muted);font-weight:600}
.cont{margin-top:10px}.hscroll{overflow-x:auto}.prompt{margin:0 0 4px;font-size:13px}
.side{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:10px}
.side>div{border:1px solid var(--line);border-radius:6px;padding:6px 10px;font-size:13px;white-space:pre-wrap}
.side p{margin:0}.side .suppressed{background:#f0f9ff}.side .amplified{background:#fff7ed}
.side .gen-note{color:var(--muted);font-style:italic;white-space:normal}
details.score{margin-top:10px;font-size:13px}
figure{margin:0 0 18px;background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px}
figure img{max-width:100%;height:auto}figcaption{color:var(--muted);font-size:13px}
.scroll{max-height:380px;overflow:auto;border:1px solid var(--line);border-radius:8px;background:#fff}
table.list{width:100%}table.list th{position:sticky;top:0;background:#f3f4f6;text-align:left}
table.list td,table.list th{padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
table.list .snip{font-family:ui-monospace,monospace;font-size:12px;max-width:360px}
.filter{margin:6px 0;padding:5px 10px;width:320px;border:1px solid #d1d5db;border-radius:6px}
pre{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px;overflow:auto;font-size:12px}
"""

# Filters a table's rows by substring as the reader types; without JS every row simply stays visible.
_JS = """
document.querySelectorAll("input[data-filter]").forEach(function (box) {
  var table = document.getElementById(box.getAttribute("data-filter"));
  var rows = Array.prototype.slice.call(table.querySelectorAll("tbody tr"));
  var texts = rows.map(function (r) { return r.textContent.toLowerCase(); });
  var count = document.getElementById(box.getAttribute("data-filter") + "-count");
  box.addEventListener("input", function () {
    var q = box.value.trim().toLowerCase(), shown = 0;
    rows.forEach(function (r, i) { var hit = texts[i].indexOf(q) !== -1; r.hidden = !hit; if (hit) { shown++; } });
    if (count) { count.textContent = shown + " of " + rows.length + " shown"; }
  });
});
"""


def _listed(report: AuditReport) -> frozenset[int]:
    """Indices of the shared features that have a row (and an anchor) on the page."""
    return frozenset(f.index for f in report.shared_summary.features)


def _model_box(owner: Owner, model: ModelInfo, role: str) -> str:
    return (
        f'<div class="model {owner.lower()}"><h3><span class="{owner.lower()}">{owner}</span> · {esc(role)}: '
        f"<code>{esc(model.id)}</code></h3><p>revision <code>{esc(model.revision[:12])}</code> · layer "
        f"{model.layer} of {model.n_layers} · width {model.hidden_size} · {esc(model.architecture)} · "
        f"tokenizer <code>{esc(model.tokenizer)}</code></p></div>"
    )


def _how_to_read(report: AuditReport) -> str:
    c = report.crosscoder
    return (
        '<div class="howto"><b>How to read this.</b> A sparse dictionary (a '
        f"<i>crosscoder</i>, {c.n_features:,} features) was trained to rebuild the internal activations of both "
        f"models on the same text: layer {report.model_a.layer} of A and layer {report.model_b.layer} of B. "
        f"{c.n_a_only:,} features may only be used by A and {c.n_b_only:,} only by B, so each of them is a "
        "candidate for something one model represents and the other does not. They are ranked by a score; "
        "each card shows the texts where the feature fires most (hover a highlighted token for its activation), "
        "the tokens it pushes the model towards, false-positive checks (Latent Scaling: ν_ε and ν_r near 0 mean "
        "the other model really lacks it), and what the owning model writes when the feature is suppressed "
        "(α &lt; 0) or amplified (α &gt; 0). The method is deliberately high-recall: treat a feature as a "
        "finding when its checks pass <i>and</i> steering changes the model's behaviour.</div>"
    )


def _tile(value: str, label: str) -> str:
    return f'<div class="tile"><b>{value}</b><span>{label}</span></div>'


def _summary(report: AuditReport) -> str:
    t, c = report.training, report.crosscoder
    tiles = [
        _tile(f"{t.fve_a:.3f}", "FVE, model A (variance explained)"),
        _tile(f"{t.fve_b:.3f}", "FVE, model B (variance explained)"),
        _tile(f"{t.l0:.0f}", f"L0: active features per token (k = {c.k})"),
        _tile(f"{t.dead_fraction:.1%}", "dead features"),
    ]
    for owner in ("B", "A"):
        features = report.features(owner)
        passed = sum(f.checks.passed for f in features)
        tiles.append(_tile(f'<span class="{owner.lower()}">{passed}</span> / {len(features)}',
                           f"{owner}-exclusive features passing the checks"))
    tiles.append(_tile(f"{report.alignment.kept_token_fraction:.1%}", "tokens aligned across tokenizers"))
    tiles.append(_tile(_count(report.alignment.pairs), "distinct aligned token pairs"))
    tiles.append(_tile(_count(t.tokens), f"token pairs seen in training ({c.steps:,} steps)"))
    warnings = "".join(f"<li>{esc(w)}</li>" for w in report.warnings)
    legend = "".join(f"<p class=\"muted\">{esc(line.strip())}</p>" for line in checks_legend(report))
    return (f'<section id="summary"><h2>Summary</h2><div class="tiles">{"".join(tiles)}</div>{legend}'
            + (f'<ul class="warn">{warnings}</ul>' if warnings else "") + "</section>")


def _feature_table(report: AuditReport, owner: Owner, carded: set[tuple[int, int]]) -> str:
    features = report.features(owner)
    table_id = f"table-{owner.lower()}"
    rows = "".join(feature_row(f, (f.run or 0, f.index) in carded) for f in features)
    return (
        f'<input class="filter" type="search" data-filter="{table_id}" placeholder="Filter {len(features)} '
        f'features: text, token, index…" aria-label="filter {owner}-exclusive features"> '
        f'<span class="muted" id="{table_id}-count"></span>'
        f'<div class="scroll"><table class="list" id="{table_id}"><thead><tr><th>rank</th><th>feature</th>'
        "<th>explanation</th><th>score</th><th>freq</th><th>max act</th><th>ν_ε</th><th>checks</th>"
        f"<th>top context</th><th>top promoted</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _model_section(report: AuditReport, owner: Owner, top_n: int) -> str:
    features = report.features(owner)
    model = report.model(owner)
    carded = {(f.run or 0, f.index) for f in features[:top_n]}
    listed = _listed(report)
    cards = "".join(feature_card(f, model.id, listed) for f in features[1:top_n])
    more = (f'<p class="muted">Cards show the top {min(top_n, len(features))}; the table lists all '
            f"{len(features)}.</p>" if len(features) > top_n else "")
    return (
        f'<section id="features-{owner.lower()}"><h2>Features exclusive to <span class="{owner.lower()}">{owner}'
        f"</span> · <code>{esc(model.id)}</code></h2>"
        f'<p class="sub">Ranked by score. Rank 1 is shown under <a href="#top">Top findings</a>.</p>'
        f"{_feature_table(report, owner, carded)}{more}{cards}</section>"
    )


def _plots(report: AuditReport) -> str:
    figures = [
        (plots.frequency_score_plot(report), "Each exclusive feature's firing frequency against its ranking score. "
         "Coloured: passed the false-positive checks; grey: flagged."),
        (plots.steering_plot(report), "Steering the top features: change in log-probability of each feature's "
         "promoted tokens (top) and KL divergence on unrelated prompts, i.e. side effects (bottom), against α."),
        (plots.relative_norm_plot(report.shared_summary.relative_norm_histogram),
         "Relative decoder norms of the shared features: a shared feature far from 0.5 is used mostly by one model."),
    ]
    body = "".join(f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'
                   for uri, caption in figures if uri)
    return f'<section id="plots"><h2>Plots</h2>{body}</section>'


def _shared(report: AuditReport) -> str:
    s = report.shared_summary
    rows = "".join(
        f'<tr id="shared-{f.index}"><td>{f.index}</td><td>{f.relative_norm:.3f}</td><td>{fmt_freq(f.frequency)}</td>'
        f"<td>{' '.join(f'<code>{token_text(t)}</code>' for t in f.top_tokens)}</td>"
        f'<td class="snip">{esc(f.snippet)}</td></tr>'
        for f in s.features
    )
    return (
        f'<section id="shared"><h2>Shared features</h2><p class="sub">{s.n_shared:,} shared features, '
        f"{s.n_alive:,} alive; {len(s.features)} listed below.</p>"
        f'<input class="filter" type="search" data-filter="table-shared" placeholder="Search shared features…" '
        'aria-label="search shared features"> <span class="muted" id="table-shared-count"></span>'
        '<div class="scroll"><table class="list" id="table-shared"><thead><tr><th>feature</th>'
        "<th>relative norm</th><th>freq</th><th>top tokens</th><th>snippet</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></div></section>"
    )


def _transfer(report: AuditReport) -> str:
    t = report.steering_transfer
    if t is None:
        return ""
    components = ", ".join(f"{shared_link(c.feature, _listed(report))} ({c.weight:.2f})" for c in t.components)
    examples = "".join(
        f'<div class="cont"><p class="prompt"><b>Prompt</b> {esc(c.prompt)}</p><div class="side">'
        f"<div><h5>{t.target} unsteered</h5>{generation_html(c.unsteered, c.unsteered_tokens)}</div>"
        f'<div class="amplified"><h5>{t.target} steered with the transferred vector</h5>'
        f"{generation_html(c.steered, c.steered_tokens)}</div></div></div>"
        for c in t.continuations
    )
    return (
        f'<section id="transfer"><h2>Steering transfer: “{esc(t.vector_name)}” from {t.source} to {t.target}</h2>'
        f'<p class="sub">A steering vector of {t.source} (coefficient {t.source_coefficient:g}) rebuilt in '
        f"{t.target} (coefficient {t.target_coefficient:g}) from the decoders of the shared features most "
        f"aligned with it (feature, cosine): {components}.</p><p>{esc(t.notes)}</p>{examples}</section>"
    )


def _explained(report: AuditReport) -> str:
    """One sentence on the LLM explanations, when there are any."""
    explained = [f.explanation for f in report.features_a + report.features_b if f.explanation is not None]
    if not explained:
        return ""
    judged = [e.detection_score for e in explained if e.detection_score is not None]
    by = ", ".join(sorted({e.explainer for e in explained}))
    return (f" Explanations: {len(explained)} features explained by {esc(by)}; {len(judged)} judged, "
            f"{sum(s >= INTERPRETABLE for s in judged)} of them interpretable (detection score ≥ {INTERPRETABLE}).")


def _details(report: AuditReport) -> str:
    c, a = report.corpus, report.alignment
    config = report.crosscoder.model_dump(mode="json")
    return (
        f'<section id="details"><h2>Audit details</h2><p>Audit <code>{esc(report.audit_id)}</code>, submitted '
        f"{esc(report.created_at.isoformat())}, finished {esc(report.finished_at.isoformat())}. Corpus: "
        f"{esc(c.description)} ({c.documents:,} documents, {c.tokens:,} tokens, hash <code>{esc(c.hash)}</code>). "
        f"Alignment: {a.aligned_sequence_fraction:.1%} of sequences aligned to the end, {a.pairs:,} distinct token "
        f"pairs. Training: {report.training.tokens:,} token pairs seen in {report.training.wall_time_s / 3600:.1f} h."
        f"{_explained(report)} Report schema "
        f"{esc(report.schema_version)}.</p>"
        f"<details><summary>Crosscoder configuration</summary><pre>{esc(json.dumps(config, indent=2))}</pre></details>"
        f"<details><summary>Audit spec as submitted</summary><pre>{esc(json.dumps(report.spec, indent=2))}</pre>"
        "</details></section>"
    )


def _top_findings(report: AuditReport) -> str:
    cards = []
    for owner in ("B", "A"):
        features = report.features(owner)
        if features:
            cards.append(feature_card(features[0], report.model(owner).id, _listed(report)))
        else:
            cards.append(f'<p class="muted">No features exclusive to {owner} were ranked.</p>')
    return (f'<section id="top"><h2>Top findings</h2><p class="sub">The highest-ranked feature exclusive to each '
            f"model, B (audited) first.</p>{''.join(cards)}</section>")


def render_html(report: AuditReport, top_n: int = DEFAULT_TOP_N) -> str:
    """The whole report as one self-contained HTML page; ``top_n`` features per model get a full card."""
    a, b = report.model_a, report.model_b
    nav = "".join(f'<a href="#{target}">{label}</a>' for target, label in (
        ("summary", "Summary"), ("top", "Top findings"), ("plots", "Plots"), ("features-b", "B-exclusive"),
        ("features-a", "A-exclusive"), ("divergent", "Divergent contexts"), ("shared", "Shared"),
        ("transfer", "Transfer"), ("details", "Details"),
    ) if (target != "transfer" or report.steering_transfer is not None)
        and (target != "divergent" or report.divergent_contexts is not None))
    top_b = report.features_b[0] if report.features_b else None
    lede = (f'top B-exclusive feature <a href="#{feature_anchor(top_b)}">{esc(top_b.label)}</a> '
            f"{badge(top_b.checks.passed)}" if top_b else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Model diff audit: {esc(b.id)} vs {esc(a.id)}</title><style>{_CSS}</style></head>
<body><nav>{nav}</nav><main>
<h1>What is new in <span class="b">{esc(b.id)}</span> compared with <span class="a">{esc(a.id)}</span>?</h1>
<p class="sub">Dedicated Feature Crosscoder audit <code>{esc(report.audit_id)}</code> ·
 finished {esc(report.finished_at.strftime("%Y-%m-%d %H:%M %Z"))} · {lede}</p>
<div class="models">{_model_box("A", a, "reference")}{_model_box("B", b, "audited")}</div>
{_how_to_read(report)}
{_summary(report)}
{_top_findings(report)}
{_plots(report)}
{_model_section(report, "B", top_n)}
{_model_section(report, "A", top_n)}
{_divergent(report, top_n)}
{_shared(report)}
{_transfer(report)}
{_details(report)}
</main><script>{_JS}</script></body></html>
"""


def _divergent(report: AuditReport, top_n: int) -> str:
    """The behaviour-first scan: contexts where one model says what the other would not, and the features that
    carry each, linked to their cards."""
    if report.divergent_contexts is None:
        return ""
    carded = {(o, f.run or 0, f.index) for o in ("A", "B") for f in report.features(o)[:top_n]}
    parts = []
    for owner in ("B", "A"):
        other = "A" if owner == "B" else "B"
        rows = []
        for e in (e for e in report.divergent_contexts if e.owner == owner):
            links = []
            for f in e.features:
                name = f"{f.index}" if not f.run else f"{f.index}@seed{f.seed}"
                partition = "shared" if f.partition == "shared" else f"{f.partition[0]}-only"
                linked = (owner, f.run, f.index) in carded and f.partition != "shared"
                shown = f'<a href="#{anchor_of(owner, f.index, f.run)}">{name}</a>' if linked else name
                links.append(f"{partition} {shown} ({f.closes:.0%})")
            said = "end of text" if e.text is None else f"<code>{esc_visible(e.text)}</code>"
            mark = "" if e.passes_null is None else badge(e.passes_null)
            examples = "".join(f"<li>…{esc_visible(x.context[-120:])} <span class=\"muted\">({x.gap:.2f})</span></li>"
                               for x in e.examples)  # fmt: skip
            more = f"<details><summary>{len(e.examples)} more</summary><ol>{examples}</ol></details>" * bool(examples)
            rows.append(
                f"<tr><td>{e.rank}</td><td class=\"snip\">…{esc_visible(e.context[-160:])}{more}</td><td>{said}</td>"
                f"<td>{e.p_owner:.2f}</td><td>{e.logprob_owner:.2f}</td><td>{e.logprob_other:.2f}</td>"
                f"<td>{e.gap:.2f}</td><td>{e.occurrences}</td><td>{e.score:.2f}</td>"
                f"<td>{'—' if e.salience is None else f'{e.salience:.2f}'} {mark}</td>"
                f"<td>{', '.join(links) or '—'}</td></tr>"
            )
        none = f'<tr><td colspan="11" class="muted">nothing {owner} says is unlikely for {other}</td></tr>'
        body = "".join(rows) or none
        parts.append(
            f'<h3>What <span class="{owner.lower()}">{owner}</span> says that {other} would not</h3>'
            f'<div class="scroll"><table class="list" id="divergent-{owner.lower()}"><thead><tr><th>rank</th>'
            f"<th>context</th><th>{owner} says</th><th>p {owner}</th><th>log P {owner}</th><th>log P {other}</th>"
            f"<th>gap (nats)</th><th>docs</th><th>score</th><th>salience</th>"
            f"<th>carried by (share of the gap removal closes)</th>"
            f"</tr></thead><tbody>{body}</tbody></table></div>"
        )
    info = report.scan
    how = ""
    if info is not None:
        screened = ", ".join(f"{o}: {n:,}" for o, n in info.contexts_screened.items())
        checks = scan_checks(report)
        threshold = ("uncalibrated (no null pairs measured for the scan)" if not checks
                     else f"✓ = {esc(checks)} (the null pairs' thresholds; gap: the owner's top next tokens' "
                          "log-probability under the owner over the other, weighted by the owner's; salience: log of "
                          "the entry's score over the median of this audit's other top entries)")  # fmt: skip
        how = (f'<p class="muted">Contexts screened ({screened}); the top {info.top_k} next tokens of the owner '
               f"per context; {threshold}; {info.seconds:.0f} s.</p>")
    return (
        '<section id="divergent"><h2>Divergent contexts: behaviour first</h2><p class="sub">Independently of any '
        "feature: contexts of the analysed text where one model's likely next text is unlikely for the other "
        "(gap = Σ over its top tokens of p · (log P owner − log P other), each model in its own tokenizer), "
        "deduplicated by what it says and where; the score sums the gap over the documents where it says it. "
        "Each is attributed to the features, exclusive or shared, whose removal at that token closes the gap "
        f"most: a behaviour found here with no exclusive feature was absorbed into shared ones.</p>{how}"
        f"{''.join(parts)}</section>"
    )


def _count(n: int) -> str:
    """A token count at a glance: 131k, 2.4 M, 100 M (never "0 M" for a small audit)."""
    if n >= 10_000_000:
        return f"{n / 1e6:,.0f} M"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} M"
    if n >= 1_000:
        return f"{n / 1e3:,.0f}k"
    return f"{n:,}"
