"""HTML fragments for one exclusive feature: its card and its row in the ranked table.

Every string that comes from a report passes through :func:`esc` before it reaches the page: contexts and
continuations are model output and must never be able to inject markup.
"""

from __future__ import annotations

import html
from collections.abc import Collection

from workers.report.schema import (
    Context,
    Continuation,
    Divergence,
    FalsePositiveChecks,
    FeatureReport,
    SteeringResult,
    TokenValue,
)

PREFIX_CHARS = 140
SUFFIX_CHARS = 90


def esc(text: object) -> str:
    """Escape ``text`` for element content and quoted attributes."""
    return html.escape(str(text), quote=True)


def esc_visible(text: str) -> str:
    """Escape ``text`` and show line breaks as a dim ↵ so a snippet stays on a few lines."""
    return esc(text).replace("\n", '<span class="nl">↵</span>')


def token_text(token: str) -> str:
    """A token with its whitespace made visible (a leading space matters to a tokenizer)."""
    return esc(token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")) or "∅"


def generation_html(text: str, tokens: list[str] | None = None) -> str:
    """A generated continuation for its box; where there is nothing to read, what happened instead.

    ``text`` is decoded without special tokens, so an empty one means the model ended the text at once (or wrote
    only special tokens); ``tokens`` (each generated token alone, special ones kept) says which, when recorded.
    """
    if text.strip():
        return f"<p>{esc_visible(text)}</p>"
    raw = " ".join(f"<code>{token_text(t)}</code>" for t in tokens or [])
    if text:
        note = f"only whitespace: <code>{token_text(text)}</code>" + (f" (tokens {raw})" if raw else "")
    elif tokens is None:
        note = "no text: the model ended the text at once (end-of-text or only special tokens)"
    elif not tokens:
        note = "no text: no token was generated"
    elif len(tokens) == 1:
        note = f"no text: the model ended the text at once ({raw})"
    else:
        note = f"no text: the model wrote only special tokens ({raw})"
    return f'<p class="gen-note">{note}</p>'


def feature_anchor(feature: FeatureReport) -> str:
    """The stable anchor id of a feature's card, e.g. ``feature-b-123`` (``feature-b-123-run1`` from another seed)."""
    return anchor_of(feature.owner, feature.index, feature.run or 0)


def anchor_of(owner: str, index: int, run: int = 0) -> str:
    """The anchor of owner's feature ``index`` of seed ``run`` (what :func:`feature_anchor` gives its card)."""
    return f"feature-{owner.lower()}-{index}" + (f"-run{run}" if run else "")


def fmt_freq(frequency: float) -> str:
    """A frequency as a short percentage."""
    return f"{frequency * 100:.3g}%"


def fmt_opt(value: float | None, digits: int = 2) -> str:
    """A number, or an em dash when the audit did not compute it."""
    return "—" if value is None else f"{value:.{digits}f}"


def context_html(context: Context, scale: float) -> str:
    """One snippet with its token in a <mark> shaded by activation / ``scale``; the activation is its tooltip."""
    prefix = context.prefix if len(context.prefix) <= PREFIX_CHARS else "…" + context.prefix[-PREFIX_CHARS:]
    suffix = context.suffix if len(context.suffix) <= SUFFIX_CHARS else context.suffix[:SUFFIX_CHARS] + "…"
    strength = min(1.0, context.activation / scale) if scale > 0 else 1.0
    return (
        f'<li class="ctx" title="document {esc(context.doc_id)}">{esc_visible(prefix)}'
        f'<mark style="--a:{strength:.2f}" title="activation {context.activation:.3g}">{esc_visible(context.token)}'
        f'</mark>{esc_visible(suffix)}<span class="act">{context.activation:.3g}</span></li>'
    )


def _chips(tokens: list[TokenValue], kind: str) -> str:
    if not tokens:
        return '<p class="muted">none recorded</p>'
    chips = "".join(
        f'<span class="chip {kind}" title="{t.value:+.3g}"><code>{token_text(t.token)}</code>'
        f"<small>{t.value:+.2f}</small></span>"
        for t in tokens
    )
    return f'<div class="chips">{chips}</div>'


def shared_link(index: int, shared_listed: Collection[int]) -> str:
    """A shared feature's index, linked to its row in the shared table when the report lists it."""
    return f'<a href="#shared-{index}">{index}</a>' if index in shared_listed else str(index)


def badge(passed: bool) -> str:
    """A pass/fail badge for the false-positive checks."""
    if passed:
        return '<span class="badge pass" title="passed the false-positive checks">✓ checks passed</span>'
    return '<span class="badge fail" title="failed at least one false-positive check">✗ flagged</span>'


def _checks_html(checks: FalsePositiveChecks, shared_listed: Collection[int]) -> str:
    def verdict(value: float | None, threshold: float | None) -> str:
        if value is None:
            return '<td class="muted">not computed</td>'
        if threshold is None:
            return '<td class="muted">reported, not tested</td>'
        ok = value < threshold
        return f'<td class="{"ok" if ok else "bad"}">{"✓ &lt;" if ok else "✗ ≥"} {threshold:g}</td>'

    nearest = "—"
    if checks.nearest_shared_feature is not None:
        link = shared_link(checks.nearest_shared_feature, shared_listed)
        nearest = f"{link} (cos {fmt_opt(checks.nearest_shared_cosine)})"
    flags = "".join(f"<li>{esc(flag)}</li>" for flag in checks.flags)
    null_rows = "".join(
        f'<tr><th title="against the null: features of audits of null pairs, where nothing differs">'
        f"{esc(c.name.replace('_', ' '))}</th><td>{fmt_opt(c.value)}</td>"
        + ('<td class="muted">not measured</td>' if c.passed is None else
           f'<td class="{"ok" if c.passed else "bad"}">{"✓ &gt;" if c.passed else "✗ ≤"} {c.threshold:.3g} '
           f'(null p{c.percentile:g})</td>')
        + "</tr>"
        for c in checks.null_checks
    )  # fmt: skip
    return (
        f'<table class="checks"><tr><th title="Latent Scaling: does the other model\'s error contain it?">ν_ε</th>'
        f"<td>{fmt_opt(checks.nu_eps)}</td>{verdict(checks.nu_eps, checks.nu_eps_threshold)}</tr>"
        f'<tr><th title="Latent Scaling: does the other model reconstruct it through other latents?">ν_r</th>'
        f"<td>{fmt_opt(checks.nu_r)}</td>{verdict(checks.nu_r, checks.nu_r_threshold)}</tr>"
        f"{null_rows}"
        f'<tr><th>nearest shared</th><td colspan="2">{nearest}</td></tr></table>'
        + (f'<ul class="flags">{flags}</ul>' if flags else "")
    )


def _steering_html(steering: list[SteeringResult]) -> tuple[str, str]:
    """The steering table and the side-by-side generations, laid out in different places of the card."""
    if not steering:
        return '<p class="muted">Steering was not run for this feature.</p>', ""
    ordered = sorted(steering, key=lambda s: s.alpha)
    # One column per α keeps the table three rows high however many coefficients were swept.
    head = "".join(f"<th>α = {s.alpha:+g}</th>" for s in ordered)
    metrics = (
        (
            "Δ log p of promoted tokens",
            "mean change in log-probability of the promoted tokens",
            "delta_logprob_promoted",
            "+.2f",
        ),
        ("KL on prompts where it fires", "how much the next-token distribution changes", "kl_feature_prompts", ".3f"),
        ("KL on neutral prompts", "side effects on unrelated text", "kl_neutral_prompts", ".3f"),
    )
    rows = "".join(
        f'<tr><th title="{hint}">{label}</th>'
        + "".join(f"<td>{getattr(s, attr):{spec}}</td>" for s in ordered)
        + "</tr>"
        for label, hint, attr, spec in metrics
    )
    table = (
        f'<div class="hscroll"><table class="num"><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody>'
        "</table></div>"
    )
    # Group generations by prompt so the unsteered text sits beside every steered version of it.
    by_prompt: dict[str, list[tuple[float, Continuation]]] = {}
    for s in ordered:
        for c in s.continuations:
            by_prompt.setdefault(c.prompt, []).append((s.alpha, c))
    examples = []
    for prompt, runs in by_prompt.items():
        first = runs[0][1]
        columns = [f"<div><h5>unsteered</h5>{generation_html(first.unsteered, first.unsteered_tokens)}</div>"]
        for alpha, c in runs:
            verb = "suppressed" if alpha < 0 else "amplified"
            columns.append(f'<div class="{verb}"><h5>{verb} (α = {alpha:+g})</h5>'
                           f"{generation_html(c.steered, c.steered_tokens)}</div>")  # fmt: skip
        examples.append(
            f'<div class="cont"><p class="prompt"><b>Prompt</b> {esc_visible(prompt)}</p>'
            f'<div class="side">{"".join(columns)}</div></div>'
        )
    heading = "<h4>What the model writes, unsteered and steered</h4>" if examples else ""
    return table, heading + "".join(examples)


def _divergence_html(divergence: Divergence | None, owner: str) -> str:
    """What removing the feature takes away from its model, and how likely the other model finds that text."""
    if divergence is None:
        return '<p class="muted">Not measured (steering was not run).</p>'
    other = "A" if owner == "B" else "B"
    seen: set[str | None] = set()
    rows = []
    for t in divergence.tokens:
        if t.text in seen:
            continue
        seen.add(t.text)
        text = "end of text" if t.text is None else token_text(t.text)
        rows.append(
            f"<tr><td><code>{esc_visible(text)}</code></td><td>{t.gain:+.3f}</td><td>{t.logprob_owner:.1f}</td>"
            f"<td>{t.logprob_other:.1f}</td></tr>"
        )
        if len(rows) == 5:
            break
    table = (
        f'<table class="num"><thead><tr><th>next token</th><th title="probability the feature adds">Δp</th>'
        f"<th>log p {owner}</th><th>log p {other}</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else ""
    )
    return (
        f'<p><b>{divergence.nats:.2f}</b> nats per context: removing the feature where it fires '
        f"(KL {divergence.removal_kl:.3f}) takes these next tokens away from {owner}; how likely is each "
        f"after the same text for {other}?</p>{table}"
    )


def feature_card(feature: FeatureReport, model_id: str, shared_listed: Collection[int] = ()) -> str:
    """The full card of one feature: contexts, tokens, checks, steering and score breakdown.

    ``shared_listed`` holds the shared features the page lists, so the nearest one is linked only when it exists.
    """
    stats = feature.stats
    explanation = ""
    if feature.explanation is not None:
        detection = feature.explanation.detection_score
        note = f"explained by {esc(feature.explanation.explainer)}"
        if detection is not None:
            note += f", detection accuracy {detection:.0%}"
        explanation = f'<p class="expl">{esc(feature.explanation.text)} <small>({note})</small></p>'
    contexts = "".join(context_html(c, stats.max_activation) for c in feature.top_contexts)
    weak = "".join(context_html(c, stats.max_activation) for c in feature.weak_contexts)
    weak_block = (
        f'<details><summary>Weak activations ({len(feature.weak_contexts)})</summary><ol class="ctxs">{weak}</ol>'
        "</details>"
        if weak
        else ""
    )
    components = "".join(
        f"<tr><td>{esc(name)}</td><td>{value:.3f}</td><td>{feature.score_weights.get(name, 0.0):g}</td></tr>"
        for name, value in feature.score_components.items()
    )
    owner = feature.owner.lower()
    steer_table, steer_examples = _steering_html(feature.steering)
    return f"""
<article class="card owner-{owner}" id="{feature_anchor(feature)}">
  <header>
    <span class="rank">#{feature.rank}</span>
    <h3>Feature {esc(feature.label)} <span class="owner">exclusive to {feature.owner} · {esc(model_id)}</span></h3>
    {badge(feature.checks.passed)}{_stability_html(feature)}
  </header>
  {explanation}
  <p class="meta">score <b>{feature.score:.3f}</b> · fires on {fmt_freq(stats.frequency)} of tokens ·
    max activation {stats.max_activation:.3g} · mean when active {stats.mean_activation:.3g} ·
    variance share {fmt_freq(stats.variance_share)}</p>
  <div class="cols">
    <section><h4>Where it fires most</h4><ol class="ctxs">{contexts or '<li class="muted">none</li>'}</ol>
      {weak_block}
      <h4>Steering: suppress (α &lt; 0) or amplify (α &gt; 0)</h4>{steer_table}</section>
    <section>
      <h4>Tokens it promotes</h4>{_chips(feature.promoted_tokens, "up")}
      <h4>Tokens it suppresses</h4>{_chips(feature.suppressed_tokens, "down")}
      <h4>False-positive checks</h4>{_checks_html(feature.checks, shared_listed)}
      <h4>New behaviour? What it makes {feature.owner} say</h4>{_divergence_html(feature.divergence, feature.owner)}
    </section>
  </div>
  {steer_examples}
  <details class="score"><summary>Score breakdown</summary>
    <table class="num"><thead><tr><th>component</th><th>value</th><th>weight</th></tr></thead>
    <tbody>{components}</tbody></table></details>
</article>"""


def _stability_html(feature: FeatureReport) -> str:
    """A badge saying how many seeds have the feature, with the matched features in its tooltip."""
    if not feature.stability_text:
        return ""
    matched = "; ".join(f"seed {m.seed}: feature {m.feature} (cos {m.cosine:.2f})" for m in feature.seeds)
    kind = "stable" if feature.stability == 1.0 else ("one-seed" if len(feature.seeds) == 1 else "partial")
    return f' <span class="seeds {kind}" title="{esc(matched)}">{esc(feature.stability_text)}</span>'


def feature_row(feature: FeatureReport, has_card: bool) -> str:
    """One line of the ranked table; links to the card when the feature has one."""
    label = esc(feature.label)
    name = f'<a href="#{feature_anchor(feature)}">{label}</a>' if has_card else label
    name += f' <span class="muted">{esc(feature.stability_text)}</span>' if feature.stability_text else ""
    top = feature.top_contexts[0] if feature.top_contexts else None
    snippet = (
        f'{esc_visible(top.prefix[-40:])}<mark style="--a:1">{esc_visible(top.token)}</mark>'
        f"{esc_visible(top.suffix[:30])}"
        if top
        else ""
    )
    promoted = token_text(feature.promoted_tokens[0].token) if feature.promoted_tokens else ""
    label = esc(feature.explanation.text) if feature.explanation else ""
    return (
        f"<tr><td>{feature.rank}</td><td>{name}</td><td>{label}</td><td>{feature.score:.3f}</td>"
        f"<td>{fmt_freq(feature.stats.frequency)}</td><td>{feature.stats.max_activation:.3g}</td>"
        f"<td>{fmt_opt(feature.checks.nu_eps)}</td><td>{'✓' if feature.checks.passed else '✗'}</td>"
        f'<td class="snip">{snippet}</td><td><code>{promoted}</code></td></tr>'
    )
