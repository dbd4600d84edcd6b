"""What this API refuses in an otherwise valid spec: paths on the workers' own filesystem, and explanations when
the deployment has no explainer endpoint.

A spec may name a local model folder or corpus files, which is right for the CLI on one machine; through
the API it would let any client make a worker read its files (and quote them in a report), so the API
accepts them only when DFC_ALLOW_LOCAL_PATHS is on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from workers.activations.corpus import CorpusSpec
from workers.analysis.llm import ExplainerSettings
from workers.spec import AuditSpec

HINT = "use Hugging Face model ids and a builtin or hf corpus, or set DFC_ALLOW_LOCAL_PATHS=true on the API"


class Refusal(NamedTuple):
    """One refused field: where it is in the request body, why, and its value."""

    loc: tuple[str | int, ...]
    message: str
    value: Any


def _file_corpora(corpus: CorpusSpec, loc: tuple[str | int, ...]) -> list[Refusal]:
    refusals = []
    if corpus.kind == "files":
        refusals.append(Refusal((*loc, "kind"), f'corpus kind "files" reads local files; {HINT}', corpus.kind))
    for i, part in enumerate(corpus.parts):
        refusals += _file_corpora(part, (*loc, "parts", i))
    return refusals


def explainer_refusals(spec: AuditSpec, explainer: ExplainerSettings) -> list[Refusal]:
    """Explanations asked of a deployment that has no explainer endpoint (the report would only say so)."""
    problem = explainer.problem() if spec.explain.enabled else None
    if problem is None:
        return []
    message = (f"explanations were asked for, but {problem} on this API; submit with explain.enabled=false, or "
               "ask the operator to configure DFC_EXPLAINER_URL and DFC_EXPLAINER_MODEL (SETTINGS.md)")  # fmt: skip
    return [Refusal(("body", "explain", "enabled"), message, True)]


def local_path_refusals(spec: AuditSpec) -> list[Refusal]:
    """Every field of ``spec`` that names a path on the workers' filesystem."""
    refusals = []
    for field in ("model_a", "model_b"):
        model_id = getattr(spec, field).id
        if model_id.startswith(("/", "./", "../", "~")):
            refusals.append(Refusal(("body", field, "id"), f"model id {model_id!r} is a local path; {HINT}", model_id))
    return refusals + _file_corpora(spec.corpus, ("body", "corpus"))
