"""The report's figures, drawn with matplotlib and returned as ``data:`` URIs so the HTML needs no files.

Figures are built with :class:`matplotlib.figure.Figure` rather than ``pyplot``: no global figure state,
no GUI backend, safe inside a worker that renders several reports.
"""

from __future__ import annotations

import base64
import io
import itertools

from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from workers.report.schema import AuditReport, FeatureReport, Histogram, Owner

COLORS: dict[Owner, str] = {"A": "#1d4ed8", "B": "#c2410c"}
"""One colour per model, shared with the page's CSS so plots and cards agree."""
SHARED_COLOR = "#6b7280"
PASS_COLOR = "#15803d"


def _data_uri(fig: Figure, fmt: str = "svg") -> str:
    """Serialise ``fig`` into a base64 ``data:`` URI."""
    buffer = io.BytesIO()
    # A fixed (absent) date keeps the output byte-identical for the same report.
    metadata = {"Date": None} if fmt == "svg" else {}
    # A fixed hash salt makes SVG element ids, and so the whole page, reproducible.
    with rc_context({"svg.hashsalt": "dfc-audit-report"}):
        fig.savefig(buffer, format=fmt, bbox_inches="tight", metadata=metadata, dpi=110)
    mime = "image/svg+xml" if fmt == "svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _style(ax: Axes) -> None:
    """A light, uncluttered look shared by every plot."""
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25, linewidth=0.6)
    ax.tick_params(labelsize=8)


def relative_norm_plot(histogram: Histogram) -> str:
    """Bar chart of shared features' relative decoder norms, with the two models' ends labelled."""
    fig = Figure(figsize=(6.4, 2.6))
    ax = fig.add_subplot()
    edges, counts = histogram.bin_edges, histogram.counts
    widths = [b - a for a, b in itertools.pairwise(edges)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=SHARED_COLOR, edgecolor="white", linewidth=0.5)
    ax.set_xlabel("relative decoder norm ‖d_A‖ / (‖d_A‖ + ‖d_B‖)", fontsize=9)
    ax.set_ylabel("shared features", fontsize=9)
    ax.text(0.01, 0.95, "← leans to B", transform=ax.transAxes, color=COLORS["B"], fontsize=8, va="top")
    ax.text(0.99, 0.95, "leans to A →", transform=ax.transAxes, color=COLORS["A"], fontsize=8, va="top", ha="right")
    _style(ax)
    return _data_uri(fig)


def frequency_score_plot(report: AuditReport, label_top: int = 5) -> str:
    """Per model, each exclusive feature's firing frequency against its ranking score (passed checks in colour)."""
    fig = Figure(figsize=(9.6, 3.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, owner in zip(axes, ("A", "B"), strict=True):
        features = report.features(owner)
        for passed, colour, label in ((True, COLORS[owner], "passed checks"), (False, "#d1d5db", "flagged")):
            chosen = [f for f in features if f.checks.passed == passed]
            ax.scatter([max(f.stats.frequency, 1e-7) for f in chosen], [f.score for f in chosen], s=12,
                       color=colour, label=f"{label} ({len(chosen)})", edgecolors="none", alpha=0.85)
        for f in features[:label_top]:
            ax.annotate(f"#{f.rank} {f.index}", (max(f.stats.frequency, 1e-7), f.score), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
        if features:  # a log axis needs data; an empty panel says so instead
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no exclusive features", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_title(f"exclusive to {owner}: {report.model(owner).id}", fontsize=9, color=COLORS[owner])
        ax.set_xlabel("frequency (share of tokens, log)", fontsize=9)
        if features:
            ax.legend(fontsize=7, frameon=False, loc="lower left")
        _style(ax)
    axes[0].set_ylabel("ranking score", fontsize=9)
    # Thousands of points make a heavy SVG; a PNG keeps the page fast for big audits.
    fmt = "png" if len(report.features_a) + len(report.features_b) > 400 else "svg"
    return _data_uri(fig, fmt)


def steering_plot(report: AuditReport, top: int = 5) -> str | None:
    """Δ log-prob of promoted tokens and KL on neutral prompts against α for each model's top features."""
    def steered(owner: Owner) -> list[FeatureReport]:
        return [f for f in report.features(owner) if f.steering][:top]

    if not steered("A") and not steered("B"):
        return None
    fig = Figure(figsize=(9.6, 4.8))
    axes = fig.subplots(2, 2, sharex=True)
    for col, owner in enumerate(("A", "B")):
        for j, f in enumerate(steered(owner)):
            points = sorted(f.steering, key=lambda s: s.alpha)
            alphas = [s.alpha for s in points]
            shade = 1.0 - 0.15 * j
            style = {"color": COLORS[owner], "alpha": shade, "marker": "o", "markersize": 3, "linewidth": 1.4 - 0.2 * j}
            axes[0, col].plot(alphas, [s.delta_logprob_promoted for s in points], label=f"#{f.rank} ({f.index})",
                              **style)
            axes[1, col].plot(alphas, [s.kl_neutral_prompts for s in points], **style)
        axes[0, col].set_title(f"top features exclusive to {owner}", fontsize=9, color=COLORS[owner])
        axes[0, col].axhline(0, color="black", linewidth=0.6)
        axes[1, col].set_xlabel("steering coefficient α (negative suppresses)", fontsize=9)
        if steered(owner):
            axes[0, col].legend(fontsize=7, frameon=False)
        for ax in axes[:, col]:
            ax.axvline(0, color="black", linewidth=0.6)
            _style(ax)
    axes[0, 0].set_ylabel("Δ log-prob of\npromoted tokens", fontsize=9)
    axes[1, 0].set_ylabel("KL on neutral\nprompts (side effects)", fontsize=9)
    return _data_uri(fig)
