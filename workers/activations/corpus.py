"""Corpus sources for activation extraction: the built-in offline corpus, local files, or a streamed HF
dataset.

Both models of an audit read the same documents in the same order from `iter_documents(spec)`, and
`corpus_hash` names that exact sequence of contents, so a model's activations are reused across audits
only when the corpus is the same.

File rules (`kind="files"`):
- `.jsonl`: one JSON object per line, with a string `text` field (plain document) or a `messages` field
  of chat turns `[{"role": ..., "content": ...}]` (chat document); `messages` wins when both are present.
  Blank lines are skipped; a malformed line is an error naming the file and line.
- `.txt`: with `txt_split="paragraphs"` (default) each run of non-blank lines is one document, so blank
  lines separate documents; with `txt_split="file"` the whole file is one document. Surrounding blank
  lines and trailing whitespace are trimmed; indentation is kept (code).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

CorpusKind = Literal["builtin", "files", "hf", "mix"]
TxtSplit = Literal["paragraphs", "file"]
Select = Literal["all", "plain", "chat"]
ChatFormat = Literal["plain", "template"]
Messages = list[dict[str, str]]

CORPUS_SUFFIXES = (".txt", ".jsonl")
BUILTIN_RESOURCE = ("workers.activations.data", "builtin_corpus.jsonl")
# Bump when the canonical form changes, so old activation caches stop matching instead of lying.
_HASH_HEADER = b"dfc-corpus-v1\n"
_ROLE_LABELS = {"user": "User", "assistant": "Assistant", "system": "System"}


class CorpusError(ValueError):
    """A corpus could not be read; the message names the source and what to change."""


@dataclass(frozen=True)
class Document:
    """One document of the corpus, as both models receive it before tokenisation."""

    doc_id: int
    """Position in the corpus stream, counting from 0; the same spec always gives the same ids."""
    text: str
    """The content; for a chat document, its turns in the shared plain format of `render_plain`."""
    source: str
    """Where it came from (`path:line`, `builtin:line`, `hf:dataset#row`), for people reading a report."""
    is_chat: bool = False
    """Whether the document is a chat transcript (then `messages` holds its turns)."""
    messages: Messages | None = None
    """The chat turns `[{"role", "content"}]` of a chat document, else None."""


@dataclass(frozen=True)
class CorpusSpec:
    """Where an audit's documents come from and how many to take; the input of `iter_documents`."""

    kind: CorpusKind = "builtin"
    """"builtin" (the shipped offline corpus), "files" (local .txt/.jsonl), "hf" (a streamed Hugging Face
    dataset) or "mix" (`parts` interleaved by `weights`)."""
    paths: tuple[str, ...] = ()
    """kind="files": files, directories (their .txt/.jsonl files, sorted) or glob patterns, read in order."""
    txt_split: TxtSplit = "paragraphs"
    """How a .txt file becomes documents: "paragraphs" (split on blank lines) or "file" (one document)."""
    hf_dataset: str = ""
    """kind="hf": the dataset id on the Hub, e.g. "HuggingFaceFW/fineweb"."""
    hf_config: str | None = None
    """kind="hf": the dataset configuration (subset), if it has several."""
    hf_split: str = "train"
    """kind="hf": the split to stream."""
    text_field: str = "text"
    """Field (jsonl key or dataset column) holding a plain document's text."""
    messages_field: str = "messages"
    """Field (jsonl key or dataset column) holding a chat document's turns."""
    parts: tuple[CorpusSpec, ...] = ()
    """kind="mix": the sources to interleave."""
    weights: tuple[float, ...] = ()
    """kind="mix": relative share of each part, e.g. (0.5, 0.5) for the paper's web text + chat mix."""
    select: Select = "all"
    """Keep "all" documents, only "plain" ones or only "chat" ones."""
    max_docs: int | None = None
    """Stop after this many documents (required for kind="hf": a streamed dataset may never end)."""
    max_chars: int | None = None
    """Cut each document to at most this many characters (chat: later turns are dropped first)."""
    chat_format: ChatFormat = "plain"
    """How chat documents reach the models (top-level spec only): "plain" gives both models the same
    `User: …\\nAssistant: …` string, so token alignment sees identical text; "template" applies each
    model's own chat template, which is closer to deployment but gives the models different strings."""

    def __post_init__(self) -> None:
        for name, allowed in (("kind", CorpusKind), ("txt_split", TxtSplit), ("select", Select),
                              ("chat_format", ChatFormat)):
            if getattr(self, name) not in get_args(allowed):
                raise CorpusError(f"corpus {name}={getattr(self, name)!r} is not one of {get_args(allowed)}")
        for name in ("max_docs", "max_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CorpusError(f"corpus {name}={value} must be at least 1 (or None for no limit)")
        if self.kind == "files" and not self.paths:
            raise CorpusError("corpus kind='files' needs paths (files, directories or glob patterns)")
        if self.kind != "files" and self.paths:
            raise CorpusError(f"corpus paths are only read when kind='files', not kind={self.kind!r}")
        if self.kind == "hf" and (not self.hf_dataset or self.max_docs is None):
            raise CorpusError("corpus kind='hf' needs hf_dataset and max_docs (a stream may never end)")
        if self.kind == "mix" and (not self.parts or len(self.weights) != len(self.parts)
                                   or any(w <= 0 for w in self.weights)):
            raise CorpusError("corpus kind='mix' needs parts and one positive weight per part")

    @classmethod
    def files(cls, *paths: str | Path, **options: Any) -> CorpusSpec:
        """Local .txt/.jsonl files, directories or glob patterns, read in the order given."""
        return cls(kind="files", paths=tuple(str(p) for p in paths), **options)

    @classmethod
    def hf(cls, dataset: str, *, max_docs: int, config: str | None = None, split: str = "train",
           **options: Any) -> CorpusSpec:
        """The first `max_docs` documents of a Hugging Face dataset, streamed."""
        return cls(kind="hf", hf_dataset=dataset, hf_config=config, hf_split=split, max_docs=max_docs,
                   **options)

    @classmethod
    def mix(cls, *weighted_parts: tuple[CorpusSpec, float], **options: Any) -> CorpusSpec:
        """Parts interleaved deterministically by weight, e.g. `mix((web, 0.5), (chat, 0.5))`."""
        return cls(kind="mix", parts=tuple(p for p, _ in weighted_parts),
                   weights=tuple(float(w) for _, w in weighted_parts), **options)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CorpusSpec:
        """Build a spec from its JSON form (lists for tuples, nested dicts for parts)."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise CorpusError(f"unknown corpus field(s) {unknown}; known fields are {sorted(known)}")
        values = dict(data)
        if isinstance(values.get("paths"), str):
            values["paths"] = [values["paths"]]
        for name in ("paths", "weights"):
            if name in values:
                values[name] = tuple(values[name])
        if "parts" in values:
            values["parts"] = tuple(p if isinstance(p, CorpusSpec) else cls.from_dict(p)
                                    for p in values["parts"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form that `from_dict` reads back."""
        return json.loads(json.dumps(asdict(self)))

    def describe(self) -> str:
        """A short name for errors and reports, e.g. `mix(builtin[plain] x1, builtin[chat] x1)`."""
        name = "builtin"
        if self.kind == "files":
            name = f"files({', '.join(self.paths)})"
        elif self.kind == "hf":
            config = f"/{self.hf_config}" if self.hf_config else ""
            name = f"hf({self.hf_dataset}{config}:{self.hf_split})"
        elif self.kind == "mix":
            parts = zip(self.parts, self.weights, strict=True)
            name = "mix(" + ", ".join(f"{p.describe()} x{w:g}" for p, w in parts) + ")"
        return name if self.select == "all" else f"{name}[{self.select}]"


class CorpusDigest(NamedTuple):
    """The identity of a corpus: its content hash and size."""

    sha256: str
    n_docs: int
    n_chars: int


class CorpusHasher:
    """Incremental sha256 of documents' canonical form, fed in corpus order in bounded memory.

    The canonical form is one compact JSON line per document, `{"text": …}` or `{"messages": [[role,
    content], …]}`: ids, sources and spec spelling are left out, so only content and order count.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256(_HASH_HEADER)
        self.n_docs = 0
        self.n_chars = 0

    def update(self, doc: Document) -> None:
        """Add the next document."""
        payload: dict[str, Any]
        if doc.is_chat and doc.messages is not None:
            payload = {"messages": [[m["role"], m["content"]] for m in doc.messages]}
        else:
            payload = {"text": doc.text}
        self._sha.update(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        self.n_docs += 1
        self.n_chars += len(doc.text)

    def result(self) -> CorpusDigest:
        """The digest of everything fed so far."""
        return CorpusDigest(self._sha.hexdigest(), self.n_docs, self.n_chars)


def corpus_digest(source: CorpusSpec | Iterable[Document]) -> CorpusDigest:
    """Hash a corpus (a spec, read in full, or documents already in hand) and count it."""
    hasher = CorpusHasher()
    for doc in iter_documents(source) if isinstance(source, CorpusSpec) else source:
        hasher.update(doc)
    return hasher.result()


def corpus_hash(source: CorpusSpec | Iterable[Document]) -> str:
    """The sha256 hex digest of a corpus's content; equal for equal documents however the spec is spelled."""
    return corpus_digest(source).sha256


def corpus_key(spec: CorpusSpec) -> str:
    """The corpus part of an activation cache key: the content hash, plus the chat format when it changes
    what the models see (with "template" the strings depend on each model's tokenizer)."""
    digest = corpus_hash(spec)
    return digest if spec.chat_format == "plain" else f"{digest}-template"


def iter_documents(spec: CorpusSpec) -> Iterator[Document]:
    """Stream a corpus's documents in their fixed order, numbered from 0.

    Raises CorpusError when a source is unreadable, malformed, unreachable, or yields no documents.
    """
    for doc_id, doc in enumerate(_documents(spec)):
        yield replace(doc, doc_id=doc_id)


def render_plain(messages: Messages) -> str:
    """Chat turns in the shared plain format, one `Role: content` line per turn."""
    return "\n".join(f"{_ROLE_LABELS.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def render_for_model(doc: Document, tokenizer: Any = None, *, chat_format: ChatFormat = "template") -> str:
    """The string a model is fed for `doc`: its chat template applied to a chat document when asked for
    and the tokenizer has one, else the shared plain text.

    With templates the two models of an audit see different strings for the same chat document (special
    tokens, headers), and token alignment only pairs positions whose content text matches; the pipeline
    therefore passes `spec.chat_format`, "plain" by default. A template string usually carries its own
    BOS, so tokenise it with `add_special_tokens=False`.
    """
    if chat_format == "plain" or not doc.is_chat or doc.messages is None:
        return doc.text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return doc.text
    try:
        rendered = tokenizer.apply_chat_template(doc.messages, tokenize=False)
    except Exception as err:  # Jinja templates raise anything (TemplateError, their own exceptions)
        raise CorpusError(f"{doc.source}: the tokenizer's chat template rejected this conversation ({err}); "
                          "use chat_format='plain'") from err
    return str(rendered)


# --- sources ---------------------------------------------------------------------------------------


def _documents(spec: CorpusSpec) -> Iterator[Document]:
    """One spec's documents (ids unset), with its select, max_chars and max_docs applied."""
    readers = {"builtin": _iter_builtin, "files": _iter_files, "hf": _iter_hf, "mix": _iter_mix}
    count = 0
    for doc in readers[spec.kind](spec):
        if spec.select != "all" and doc.is_chat != (spec.select == "chat"):
            continue
        doc = _truncate(doc, spec.max_chars)
        if not doc.text.strip():
            continue
        yield doc
        count += 1
        if count == spec.max_docs:  # stop before pulling one more row from a stream
            return
    if count == 0:
        raise CorpusError(f"corpus {spec.describe()} produced no documents; check its paths, fields, select")


def _truncate(doc: Document, max_chars: int | None) -> Document:
    if max_chars is None or len(doc.text) <= max_chars:
        return doc
    if not doc.is_chat or doc.messages is None:
        return replace(doc, text=doc.text[:max_chars])
    kept: Messages = []
    for message in doc.messages:
        # Budget each turn against its plain rendering so `text` and `messages` stay the same conversation.
        room = max_chars - len(render_plain([*kept, {**message, "content": ""}]))
        if room <= 0:
            break
        kept.append({"role": message["role"], "content": message["content"][:room]})
        if len(message["content"]) > room:
            break
    return replace(doc, text=render_plain(kept), messages=kept)


def _record_to_doc(record: Any, where: str, text_field: str, messages_field: str) -> Document:
    if not isinstance(record, Mapping):
        raise CorpusError(f"{where}: expected a JSON object with a '{text_field}' or '{messages_field}' "
                          f"field, got {type(record).__name__}")
    if record.get(messages_field) is not None:
        messages = _parse_messages(record[messages_field], where)
        return Document(-1, render_plain(messages), where, is_chat=True, messages=messages)
    text = record.get(text_field)
    if not isinstance(text, str):
        raise CorpusError(f"{where}: no string '{text_field}' field and no '{messages_field}' list "
                          f"(fields: {sorted(record)}); set text_field/messages_field to the right names")
    return Document(-1, text, where)


def _parse_messages(value: Any, where: str) -> Messages:
    if not isinstance(value, list):
        raise CorpusError(f"{where}: chat messages must be a list of {{'role', 'content'}}, "
                          f"got {type(value).__name__}")
    messages: Messages = []
    for i, turn in enumerate(value):
        if not (isinstance(turn, Mapping) and isinstance(turn.get("role"), str)
                and isinstance(turn.get("content"), str)):
            raise CorpusError(f"{where}: chat turn {i} must be {{'role': str, 'content': str}}, "
                              f"got {turn!r:.80}")
        messages.append({"role": turn["role"], "content": turn["content"]})  # drop extras: canonical form
    return messages


def _iter_jsonl_lines(lines: Iterable[str], name: str, text_field: str,
                      messages_field: str) -> Iterator[Document]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{name}:{lineno}: not valid JSON ({err.msg}, column {err.colno}); each "
                              "line of a .jsonl corpus must be one JSON object") from None
        yield _record_to_doc(record, f"{name}:{lineno}", text_field, messages_field)


def _iter_builtin(spec: CorpusSpec) -> Iterator[Document]:
    package, name = BUILTIN_RESOURCE
    with resources.files(package).joinpath(name).open("r", encoding="utf-8") as lines:
        yield from _iter_jsonl_lines(lines, "builtin", "text", "messages")


def _iter_txt(path: Path, split: TxtSplit) -> Iterator[Document]:
    with path.open(encoding="utf-8") as lines:
        if split == "file":
            yield Document(-1, re.sub(r"\A\s*\n", "", lines.read()).rstrip(), str(path))
            return
        paragraph: list[str] = []
        start = 0
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                start = start if paragraph else lineno
                paragraph.append(line)
            elif paragraph:
                yield Document(-1, "".join(paragraph).rstrip(), f"{path}:{start}")
                paragraph = []
        if paragraph:
            yield Document(-1, "".join(paragraph).rstrip(), f"{path}:{start}")


def _iter_files(spec: CorpusSpec) -> Iterator[Document]:
    for path in _resolve_paths(spec.paths):
        try:
            if path.suffix == ".jsonl":
                with path.open(encoding="utf-8") as lines:
                    yield from _iter_jsonl_lines(lines, str(path), spec.text_field, spec.messages_field)
            else:
                yield from _iter_txt(path, spec.txt_split)
        except UnicodeDecodeError as err:
            raise CorpusError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                              "convert it to UTF-8") from None


def _resolve_paths(patterns: Iterable[str]) -> list[Path]:
    """Expand globs and directories (sorted), keep the given order, and read each file once."""
    seen: set[Path] = set()
    resolved: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if any(c in pattern for c in "*?["):
            anchor = Path(path.anchor) if path.is_absolute() else Path()
            matches = sorted(p for p in anchor.glob(str(path.relative_to(anchor))) if p.is_file())
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
        elif path.is_file():
            matches = [path]
        else:
            raise CorpusError(f"corpus path '{pattern}' does not exist")
        if not matches:
            raise CorpusError(f"corpus pattern '{pattern}' matched no .txt or .jsonl files")
        for match in matches:
            if match.suffix not in CORPUS_SUFFIXES:
                raise CorpusError(f"corpus file '{match}' is not .txt or .jsonl; narrow the pattern")
            if (real := match.resolve()) not in seen:
                seen.add(real)
                resolved.append(real)
    return resolved


def _iter_hf(spec: CorpusSpec) -> Iterator[Document]:
    try:
        import datasets  # optional: only this source needs it, and importing it is slow
    except ImportError:
        raise CorpusError("corpus kind='hf' needs the optional 'datasets' package (pip install datasets); "
                          "or use a local file corpus (kind='files')") from None
    name = spec.describe()
    try:
        dataset = datasets.load_dataset(spec.hf_dataset, spec.hf_config, split=spec.hf_split, streaming=True)
        rows = iter(dataset)
        first = next(rows, None)  # a streamed dataset may only touch the network on its first row
    except (ConnectionError, OSError) as err:  # offline, DNS failure, or no such dataset (FileNotFoundError)
        raise CorpusError(f"HF dataset {name} could not be reached ({err}); on an offline machine use a "
                          "local file corpus instead (kind='files' with .txt/.jsonl paths) or kind='builtin'"
                          ) from err
    except Exception as err:  # datasets raises its own errors for bad configs, splits and builders
        raise CorpusError(f"HF dataset {name} could not be loaded ({type(err).__name__}: {err}); check "
                          "hf_config and hf_split") from err
    if first is None:
        return
    for row_index, row in enumerate(itertools.chain([first], rows)):
        yield _record_to_doc(row, f"hf:{spec.hf_dataset}#{row_index}", spec.text_field, spec.messages_field)


def _iter_mix(spec: CorpusSpec) -> Iterator[Document]:
    """Interleave parts so every prefix is within one document of the weights; stop when a part runs out,
    so the ratio holds over the whole corpus."""
    total = sum(spec.weights)
    shares = [w / total for w in spec.weights]
    streams = [_documents(part) for part in spec.parts]
    counts = [0] * len(streams)
    try:
        for step in itertools.count(1):
            # The part furthest behind its share goes next; ties go to the earlier part.
            i = max(range(len(streams)), key=lambda j: shares[j] * step - counts[j])
            doc = next(streams[i], None)
            if doc is None:
                return
            counts[i] += 1
            yield doc
    finally:
        for stream in streams:
            stream.close()
