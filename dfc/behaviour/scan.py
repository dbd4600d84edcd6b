"""Behaviour-first scan: where does one model (the owner) say something the other would not, feature or no feature?

Both models read the same documents, each in its own tokenizer. At every aligned position (a token of each ends at
the same character) the owner's ``top_k`` next tokens are scored as *text* under both models (``dfc.lm.scoring``):

``gap = Σ_t p_owner(t) · (log P_owner(t | context) − log P_other(t | context))`` in nats, logs floored,

the per-feature divergence (``dfc.behaviour.divergence``) applied per context with what the owner says as the
weight. It needs no dictionary, so it finds a behaviour the dictionary absorbed into a shared feature (SCIENCE.md
§11); ``dfc.behaviour.attribution`` then asks which features carry it. Two tiers of cost: one forward pass per
document and model screens every aligned position (``screen_under_other``, an estimate), the exact scorer runs on
the top N only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfc.lm.align import align_offsets
from dfc.lm.hooks import (
    input_device,
    pad_right,
    tokenize_document,
)
from dfc.lm.scoring import LOGPROB_FLOOR, Forwards, TokenTexts, continuation_logprob, eos_id, token_texts

BATCH_DOCUMENTS = 8
"""Documents per forward pass (fewer when ``MAX_BATCH_TOKENS`` would be exceeded)."""
MAX_BATCH_TOKENS = 4096
"""Padded tokens one document forward may hold: bounds the ``tokens × vocabulary`` logits it makes."""
_WORD = re.compile(r"\w")


class ScanDocument(NamedTuple):
    """One document as both models read it, with its aligned positions."""

    doc: int
    """The document's id."""
    owner_ids: Tensor
    """1-D token ids of the whole document in the owner's tokenizer, as the model reads it (special tokens too)."""
    other_ids: Tensor
    """The same document in the other model's tokenizer."""
    positions: Tensor
    """``[n, 2]`` aligned ``(owner position, other position)`` pairs: a token of each ends at the same character."""


def scan_documents(
    texts: Sequence[str], owner_tokenizer: Any, other_tokenizer: Any, *, max_length: int = 1024
) -> list[ScanDocument]:
    """``ScanDocument``s of ``texts`` (ids ``0..``), each tokenised with special tokens as the models read it and
    aligned by character offsets (``dfc.lm.align``); documents are cut at ``max_length`` tokens."""
    out: list[ScanDocument] = []
    for i, text in enumerate(texts):
        a = tokenize_document(owner_tokenizer, text, i, max_length=max_length)
        b = tokenize_document(other_tokenizer, text, i, max_length=max_length)
        pairs = align_offsets(text, a.offsets, b.offsets, special_a=a.special_mask.tolist(),
                              special_b=b.special_mask.tolist())  # fmt: skip
        out.append(ScanDocument(i, a.token_ids, b.token_ids, torch.stack([pairs.positions_a, pairs.positions_b], 1)))
    return out


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the owner says next at one aligned position, and how likely each model finds it (filled in stages)."""

    doc: int
    owner_position: int
    other_position: int
    token_ids: tuple[int, ...]
    """The owner's most probable next tokens (at most ``top_k``, each at least ``min_prob``)."""
    texts: tuple[str | None, ...]
    """The text each token appends; None for end-of-text (each model's own EOS)."""
    probs: tuple[float, ...]
    """``p_owner(t)``: the weights of the gap."""
    logprob_owner: tuple[float, ...]
    """``log P_owner(t)``: its own token's log-probability (floored), or its text score once ``owner_exact``."""
    owner_exact: bool = False
    """Whether ``logprob_owner`` is the owner's exact text score (``score_exact(..., as_owner=True)``)."""
    context: str | None = None
    """The owner's tokens up to and including its position, decoded without special tokens (``attach_contexts``)."""
    screen_logprobs: tuple[float, ...] | None = None
    """The other model's first-step estimate of each text (``screen_under_other``); None until screened."""
    logprob_other: tuple[float, ...] | None = None
    """``log P_other(t | context)``, the exact text score in its own tokenizer; None until ``score_exact``."""
    other_spells: tuple[bool, ...] | None = None
    """Whether the other tokenizer can spell each text token by token (``can_spell``). One it cannot (a character
    it only has as byte pieces, a case its normaliser folds) would score at the floor for want of a reading, not
    of a judgement, so its part of the gap counts as 0."""

    def _parts(self, other: tuple[float, ...] | None) -> list[float] | None:
        if other is None:
            return None
        spells = self.other_spells or (True,) * len(self.texts)
        return [p * (lo - lx) if ok else 0.0
                for p, lo, lx, ok in zip(self.probs, self.logprob_owner, other, spells, strict=True)]  # fmt: skip

    def _gap(self, other: tuple[float, ...] | None) -> float | None:
        parts = self._parts(other)
        return None if parts is None else sum(parts)

    @property
    def rough_gap(self) -> float | None:
        """The gap with the screen's estimate for the other model: only for choosing what to score exactly."""
        return self._gap(self.screen_logprobs)

    @property
    def gap(self) -> float | None:
        """``Σ_t p_owner(t) · (logprob_owner(t) − logprob_other(t))`` in nats; None until scored exactly."""
        return self._gap(self.logprob_other)

    @property
    def most_divergent(self) -> int | None:
        """Index of the text with the largest part ``p · (logprob_owner − logprob_other)`` of the gap."""
        parts = self._parts(self.logprob_other)
        return None if parts is None else max(range(len(parts)), key=parts.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rough_gap": self.rough_gap, "gap": self.gap}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class Example(NamedTuple):
    """Another context where the same divergent text came up."""

    doc: int
    owner_position: int
    other_position: int
    context: str | None
    gap: float

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


@dataclass(frozen=True)
class DivergentContext:
    """A continuation the owner gives and the other model would not, with the contexts it came up in."""

    text: str | None
    """The representative's most divergent text (None: end-of-text)."""
    score: float
    """Sum of the kept contexts' gaps (one per document), extrapolated by ratio to every document the screen has the
    text in when ``divergent_contexts`` is given them: a behaviour that recurs outranks a one-off."""
    gap: float
    """The representative's gap (the largest of the group), in nats."""
    prob_owner: float
    logprob_owner: float
    logprob_other: float
    """Both models' log-probabilities of ``text`` at the representative context."""
    n_documents: int
    """Documents it is said in: those scored exactly, or all the screen has it in when that count is given."""
    n_occurrences: int
    """Contexts with a positive gap whose most divergent text is this one, before keeping one per document."""
    prediction: Prediction
    """The representative context, with every text the owner predicted there."""
    examples: tuple[Example, ...]
    """The next best contexts of the group, from other documents."""

    def to_dict(self) -> dict[str, Any]:
        p = self.prediction
        head = {k: getattr(self, k) for k in ("text", "score", "gap", "prob_owner", "logprob_owner", "logprob_other",
                                              "n_documents", "n_occurrences")}  # fmt: skip
        place = {"doc": p.doc, "owner_position": p.owner_position, "other_position": p.other_position}
        return {**head, **place, "context": p.context, "prediction": p.to_dict(),
                "examples": [e.to_dict() for e in self.examples]}  # fmt: skip


# --- forward passes over documents -------------------------------------------------------------------------------


def _check_positions(document: ScanDocument) -> None:
    pos = document.positions
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"document {document.doc}: positions must be [n, 2] pairs, got shape {tuple(pos.shape)}")
    for side, ids, name in ((0, document.owner_ids, "owner"), (1, document.other_ids, "other")):
        if len(pos) and (int(pos[:, side].min()) < 0 or int(pos[:, side].max()) >= len(ids)):
            raise ValueError(f"document {document.doc}: an aligned {name} position lies outside its {len(ids)} tokens")


def _pad_id(tokenizer: Any) -> int:
    for pad in (tokenizer.pad_token_id, eos_id(tokenizer)):  # never attended to by real tokens: any id will do
        if pad is not None:
            return int(pad)
    return 0


@torch.no_grad()
def _position_logprobs(
    model: nn.Module, pad_id: int, jobs: Sequence[tuple[Tensor, Tensor]], batch_size: int, max_tokens: int
) -> Iterator[Tensor]:
    """For each ``(ids, positions)`` job in order: ``[len(positions), vocab]`` float32 next-token log-probabilities
    at those positions, on the model's device. Right padding keeps every real position exact under a causal mask."""
    device = input_device(model)
    start = 0
    while start < len(jobs):
        end = start + 1
        while end < len(jobs) and end - start < batch_size:
            if max(len(ids) for ids, _ in jobs[start : end + 1]) * (end + 1 - start) > max_tokens:
                break
            end += 1
        chunk = jobs[start:end]
        padded = pad_right([ids for ids, _ in chunk], pad_id)
        logits = model(input_ids=padded.input_ids.to(device), attention_mask=padded.attention_mask.to(device),
                       use_cache=False).logits  # fmt: skip
        for row, (_, positions) in enumerate(chunk):
            yield torch.log_softmax(logits[row, positions.to(logits.device)].float(), -1)
        start = end


def _speaks(text: str | None) -> bool:
    """Whether a token's text can be scored: not a special token (no text), not part of a character (U+FFFD)."""
    return text is None or (bool(text) and "\ufffd" not in text)


def owner_predictions(
    model: nn.Module,
    tokenizer: Any,
    documents: Sequence[ScanDocument],
    *,
    top_k: int = 3,
    min_prob: float = 0.05,
    batch_size: int = BATCH_DOCUMENTS,
    max_tokens_per_batch: int = MAX_BATCH_TOKENS,
) -> list[Prediction]:
    """The owner's ``top_k`` next tokens at every aligned position, from one forward per batch of documents.

    Tokens below ``min_prob``, special tokens other than EOS, and byte pieces of a character are left out, and a
    position with none left is dropped: it says nothing the gap could weigh. A document's first text token is no
    context: the owner may go on with a piece of that word ("A" → "t"), which the other model, unable to back off
    the only token it has (token healing needs one before it), would score as if the owner had spelt a new word.
    Contexts are not decoded here (``attach_contexts``), since only the few scored exactly need them.
    """
    for document in documents:
        _check_positions(document)
    texts, eos = token_texts(tokenizer).texts, eos_id(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    jobs = [(d.owner_ids, d.positions[:, 0]) for d in documents]
    out: list[Prediction] = []
    for document, logprobs in zip(
        documents, _position_logprobs(model, _pad_id(tokenizer), jobs, batch_size, max_tokens_per_batch), strict=True
    ):
        values, tokens = (t.cpu().tolist() for t in logprobs.topk(min(top_k, logprobs.shape[-1]), -1))
        first = next((i for i, t in enumerate(document.owner_ids.tolist()) if t not in special), -1)
        for (o, x), lps, ids in zip(document.positions.tolist(), values, tokens, strict=True):
            if o == first:
                continue
            kept = [(t, None if t == eos else texts[t], lp) for t, lp in zip(ids, lps, strict=True)]
            kept = [(t, s, lp) for t, s, lp in kept if math.exp(lp) >= min_prob and _speaks(s)]
            if kept:
                out.append(Prediction(document.doc, o, x, tuple(t for t, _, _ in kept), tuple(s for _, s, _ in kept),
                                      tuple(math.exp(lp) for _, _, lp in kept),
                                      tuple(max(lp, LOGPROB_FLOOR) for _, _, lp in kept)))  # fmt: skip
    return out


# --- a token that says no word: complete it --------------------------------------------------------------------


def _bare_space(text: str | None) -> bool:
    """A token that appends only spaces: what comes next is a word the owner spells after it, not this token."""
    return text is not None and text != "" and not text.strip(" \t")


def _ends_word(word: str, piece: str) -> bool:
    """Whether ``piece`` starts after the word ``word`` has ended: with whitespace, or with punctuation once the word
    has a letter or digit (" Call" ends at ".", a leading "(" does not end it)."""
    return piece[0].isspace() or (_WORD.search(word) is not None and _WORD.match(piece) is None)


def complete_words(
    model: nn.Module,
    tokenizer: Any,
    documents: Sequence[ScanDocument],
    predictions: Sequence[Prediction],
    *,
    max_steps: int = 6,
    batch_size: int = BATCH_DOCUMENTS,
    max_tokens_per_batch: int = MAX_BATCH_TOKENS,
) -> list[Prediction]:
    """``predictions`` whose bare-space texts (a token of spaces only) are completed by the owner's greedy next
    tokens up to the end of the word that follows (``_ends_word``: a token starting with whitespace, or with
    punctuation once the word has a letter; end-of-text, a special token or a byte piece end it too), at most
    ``max_steps`` tokens; ``logprob_owner`` becomes the log-probability of that tokenization. Run with the owner
    loaded, before the screen. Each step is one forward per batch of the open completions over their whole context
    (no cache): cheap where bare spaces are rare, as in the large vocabularies of real models.

    A fine-grained tokenizer spells a word it has no token for from a bare space and its letters (" Call" as
    " ", "C", "a", "ll"); scored as the bare space, the other model (which writes spaces too) agrees with it, and
    the word, where the two differ, is never compared. A completion equal to another text of its prediction is
    merged with it (weights summed): one text, one part of the gap."""
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    texts, eos = token_texts(tokenizer).texts, eos_id(tokenizer)
    by_id = {d.doc: d for d in documents}
    _by_doc(documents, predictions)
    # (prediction, text index) -> ids so far; greedy steps run all open completions together
    open_: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(predictions):
        for j, (t, text) in enumerate(zip(p.token_ids, p.texts, strict=True)):
            if _bare_space(text):
                doc = by_id[p.doc].owner_ids
                open_[(i, j)] = [*doc[: p.owner_position + 1].tolist(), t]
    added: dict[tuple[int, int], tuple[str, float]] = {k: ("", 0.0) for k in open_}
    pad = _pad_id(tokenizer)
    for _ in range(max_steps):
        if not open_:
            break
        keys = list(open_)
        jobs = [(torch.tensor(open_[k]), torch.tensor([len(open_[k]) - 1])) for k in keys]
        for key, logprobs in zip(keys, _position_logprobs(model, pad, jobs, batch_size, max_tokens_per_batch),
                                 strict=True):  # fmt: skip
            lp, t = (v.item() for v in logprobs[0].max(-1))
            piece = None if t == eos else texts[int(t)]
            text, logp = added[key]
            if not piece or not _speaks(piece) or _ends_word(text, piece):
                del open_[key]  # the word has ended (or cannot be spelled as text)
                continue
            added[key] = (text + piece, logp + max(lp, LOGPROB_FLOOR))
            open_[key].append(int(t))
    out = list(predictions)
    for i in sorted({i for i, _ in added}):
        p = out[i]
        merged: dict[str | None, tuple[int, float, float]] = {}  # text -> (token id, p, logprob)
        for j, (t, text, prob, lp) in enumerate(zip(p.token_ids, p.texts, p.probs, p.logprob_owner, strict=True)):
            word, more = added.get((i, j), ("", 0.0))
            text = (text or "") + word if word else text
            lp = max(lp + more, LOGPROB_FLOOR)
            if text in merged:
                t0, p0, lp0 = merged[text]
                merged[text] = (t0, p0 + prob, max(lp0, lp))
            else:
                merged[text] = (t, prob, lp)
        ids, probs, logs = zip(*merged.values(), strict=True)
        out[i] = replace(p, token_ids=ids, texts=tuple(merged), probs=probs, logprob_owner=logs)
    return out


def _by_doc(documents: Sequence[ScanDocument], predictions: Sequence[Prediction]) -> dict[int, list[int]]:
    """Indices of ``predictions`` per document id, checking each has its document."""
    known = {d.doc for d in documents}
    grouped: dict[int, list[int]] = {}
    for i, p in enumerate(predictions):
        if p.doc not in known:
            raise ValueError(f"a prediction is for document {p.doc}, which is not among the documents given")
        grouped.setdefault(p.doc, []).append(i)
    return grouped


def first_step_tokens(vocab: TokenTexts, text: str) -> list[int]:
    """Token ids a tokenization of ``text`` can start with: tokens spelling it (or more), or a proper prefix of it."""
    return sorted(set(vocab.starting_with(text)) | {t for t, _ in vocab.strict_prefixes(text)})


def can_spell(vocab: TokenTexts, text: str | None, eos: int | None) -> bool:
    """Whether some token sequence of ``vocab`` spells ``text`` (None: end-of-text, which needs an ``eos``)."""
    if text is None:
        return eos is not None
    known: dict[str, bool] = {}

    def spells(rest: str) -> bool:
        if rest not in known:
            known[rest] = bool(vocab.starting_with(rest)) or any(spells(t) for _, t in vocab.strict_prefixes(rest))
        return known[rest]

    return spells(text)


def _spelled(cache: dict[str | None, bool], vocab: TokenTexts, text: str | None, eos: int | None) -> bool:
    if text not in cache:
        cache[text] = can_spell(vocab, text, eos)
    return cache[text]


def screen_under_other(
    model: nn.Module,
    tokenizer: Any,
    documents: Sequence[ScanDocument],
    predictions: Sequence[Prediction],
    *,
    batch_size: int = BATCH_DOCUMENTS,
    max_tokens_per_batch: int = MAX_BATCH_TOKENS,
) -> list[Prediction]:
    """``predictions`` with ``screen_logprobs``: an *estimate* of how likely the other model finds each text, from
    one forward per batch of documents, to choose which contexts get the exact score (``select_for_exact``).

    The estimate is the first step of the exact search, at the aligned other position: the probability that the
    other's next token is one a tokenization of the text can start with (it spells the text, or a prefix of it;
    the text's own first token is one). Every tokenization starts with such a token, so it is never below the exact
    scorer's direct estimate after the same tokens; it can be far above it for a text of several tokens.
    """
    grouped = _by_doc(documents, predictions)
    vocab, eos = token_texts(tokenizer), eos_id(tokenizer)
    firsts: dict[str | None, list[int]] = {None: [] if eos is None else [eos]}
    spelled: dict[str | None, bool] = {}
    needed = [d for d in documents if d.doc in grouped]
    for document in needed:
        _check_positions(document)
    rows = [sorted({predictions[i].other_position for i in grouped[d.doc]}) for d in needed]
    jobs = [(d.other_ids, torch.tensor(r, dtype=torch.long)) for d, r in zip(needed, rows, strict=True)]
    out = list(predictions)
    forwards = _position_logprobs(model, _pad_id(tokenizer), jobs, batch_size, max_tokens_per_batch)
    for document, positions, logprobs in zip(needed, rows, forwards, strict=True):
        row_of = {x: r for r, x in enumerate(positions)}
        row_ids, token_ids, segment, n = [], [], [], 0  # one segment per (prediction, text): summed in one op
        for i in grouped[document.doc]:
            for text in predictions[i].texts:
                if text not in firsts:
                    firsts[text] = first_step_tokens(vocab, text)
                token_ids += firsts[text]
                row_ids += [row_of[predictions[i].other_position]] * len(firsts[text])
                segment += [n] * len(firsts[text])
                n += 1
        device = logprobs.device
        values = logprobs[torch.tensor(row_ids, dtype=torch.long, device=device),
                          torch.tensor(token_ids, dtype=torch.long, device=device)].exp()  # fmt: skip
        mass = torch.zeros(n, device=device).index_add_(0, torch.tensor(segment, dtype=torch.long, device=device),
                                                        values)  # fmt: skip
        logs = mass.clamp_min(1e-30).log().clamp(LOGPROB_FLOOR, 0.0).cpu().tolist()
        for i in grouped[document.doc]:
            texts = predictions[i].texts
            spells = tuple(_spelled(spelled, vocab, t, eos) for t in texts)
            out[i] = replace(predictions[i], screen_logprobs=tuple(logs[: len(texts)]), other_spells=spells)
            logs = logs[len(texts) :]
    return out


def _rough_key(p: Prediction) -> tuple[bool, str] | None:
    """The text a screened prediction diverges on most by the screen's estimate (None when it does not)."""
    parts = p._parts(p.screen_logprobs)
    if not parts or max(parts) <= 0:
        return None
    return _group_key(p.texts[max(range(len(parts)), key=parts.__getitem__)])


def documents_saying(predictions: Sequence[Prediction]) -> dict[tuple[bool, str], dict[int, float]]:
    """Per text (``_group_key``): the documents where the screen has the owner diverge on it most, each with its best
    rough gap there (clipped at 0).

    What a divergent context's score extrapolates from when only some of its documents are scored exactly."""
    docs: dict[tuple[bool, str], dict[int, float]] = {}
    for p in predictions:
        key = _rough_key(p)
        if key is not None:
            kept = docs.setdefault(key, {})
            kept[p.doc] = max(kept.get(p.doc, 0.0), max(p.rough_gap or 0.0, 0.0))
    return docs


def select_for_exact(predictions: Sequence[Prediction], n: int, *, per_text: int = 8) -> list[Prediction]:
    """``n`` screened predictions (or all, if fewer) to score exactly: half the largest rough gaps, half spread over
    the texts whose rough gaps sum highest over their documents (``per_text`` documents each, their best context),
    and the next largest rough gaps for what the texts leave over.

    The screen's first step can be far above the other model's real probability of a text of several tokens (a
    German word after an English sentence begins with a token English uses too), so a behaviour that recurs in many
    documents can have every single context below the top ``n``; its summed estimate still stands out."""
    if any(p.screen_logprobs is None for p in predictions):
        raise ValueError("select_for_exact needs screened predictions; run screen_under_other on them first")
    ranked = sorted(predictions, key=lambda p: -(p.rough_gap or 0.0))
    chosen: dict[int, Prediction] = {id(p): p for p in ranked[: n - n // 2]}
    best: dict[tuple[bool, str], dict[int, Prediction]] = {}
    for p in ranked:  # best first, so the first context of a document is its best
        key = _rough_key(p)
        if key is not None:
            best.setdefault(key, {}).setdefault(p.doc, p)
    totals = sorted(best.items(), key=lambda item: -sum(q.rough_gap or 0.0 for q in item[1].values()))
    for _, by_doc in totals:
        for p in list(by_doc.values())[:per_text]:
            if len(chosen) >= n:
                break
            chosen.setdefault(id(p), p)
        if len(chosen) >= n:
            break
    for p in ranked:  # what the texts left of the budget goes to the next largest rough gaps
        if len(chosen) >= n:
            break
        chosen.setdefault(id(p), p)
    return sorted(chosen.values(), key=lambda p: -(p.rough_gap or 0.0))


def attach_contexts(
    tokenizer: Any, documents: Sequence[ScanDocument], predictions: Sequence[Prediction]
) -> list[Prediction]:
    """``predictions`` with their owner context decoded (the owner's tokenizer; no model needed). Run it on the few
    chosen for the exact score: decoding every aligned position's prefix costs the square of a document's length."""
    by_id = {d.doc: d for d in documents}
    _by_doc(documents, predictions)
    missing = [i for i, p in enumerate(predictions) if p.context is None]
    decoded = tokenizer.batch_decode(
        [by_id[predictions[i].doc].owner_ids[: predictions[i].owner_position + 1].tolist() for i in missing],
        skip_special_tokens=True,
    )
    out = list(predictions)
    for i, context in zip(missing, decoded, strict=True):
        out[i] = replace(out[i], context=context)
    return out


def score_exact(
    model: nn.Module, tokenizer: Any, predictions: Sequence[Prediction], *, as_owner: bool
) -> list[Prediction]:
    """``predictions`` with every text scored exactly after its context (``continuation_logprob``, one ``Forwards``
    per context): under the other model (``as_owner=False``: ``logprob_other``), or under the owner itself
    (``as_owner=True``: ``logprob_owner`` becomes its text score, so both sides are scored alike and a model
    against itself has gap 0). Without the owner pass the owner side stays its own token's log-probability: one
    tokenization of the text, so (after the same context tokens) never above its text score: the gap errs low."""
    vocab, eos = token_texts(tokenizer), eos_id(tokenizer)
    spelled: dict[str | None, bool] = {}
    out: list[Prediction] = []
    for p in predictions:
        if p.context is None:
            raise ValueError(f"prediction at document {p.doc}, position {p.owner_position} has no context; "
                             "run attach_contexts with the owner's tokenizer first")  # fmt: skip
        forwards = Forwards(model)
        scores = tuple(continuation_logprob(model, tokenizer, p.context, t, forwards=forwards) for t in p.texts)
        if as_owner:
            out.append(replace(p, logprob_owner=scores, owner_exact=True))
        else:
            spells = tuple(_spelled(spelled, vocab, t, eos) for t in p.texts)
            out.append(replace(p, logprob_other=scores, other_spells=spells))
    return out


def _group_key(text: str | None) -> tuple[bool, str]:
    """Texts compared with their leading whitespace as one space and trailing whitespace dropped, case kept: " Y"
    (a word) is not "y" (the end of one), nor " The" (a sentence start) " the" (an article)."""
    if text is None:
        return (True, "")
    body = text.lstrip()
    return (False, (" " if body != text else "") + body.rstrip())


def divergent_contexts(
    predictions: Sequence[Prediction], *, max_entries: int = 20, n_examples: int = 3, min_gap: float = 1e-6,
    documents: Mapping[tuple[bool, str], Mapping[int, float]] | None = None,
) -> list[DivergentContext]:
    """The exactly scored contexts with a gap above ``min_gap`` nats (two scorings of one model differ by ~1e-9),
    grouped by their most divergent text (``_group_key``) and kept one per document (its best) in each group, best
    group (largest score) first. A group's score is the sum of its exact gaps; with ``documents`` (``documents_saying``
    of the screen) it is extrapolated to the documents the screen has it in that were not scored exactly, by ratio:
    each such document's rough gap times (exact gaps ÷ rough gaps) over the scored contexts the screen has saying the
    same text (none: no extrapolation).

    The ratio, not the mean exact gap: the exact score goes to the largest rough gaps, so a text said everywhere
    (a full stop) that diverges once has one large exact gap and hundreds of documents of tiny rough ones, and a
    mean times the count would rank it above every behaviour; a text the screen underestimates in every document
    (a word of several tokens) is scaled up alike."""
    groups: dict[tuple[bool, str], dict[int, tuple[float, Prediction]]] = {}
    occurrences: dict[tuple[bool, str], int] = {}
    for p in predictions:
        gap, top = p.gap, p.most_divergent
        if gap is None or top is None or gap <= min_gap:
            continue
        key = _group_key(p.texts[top])
        occurrences[key] = occurrences.get(key, 0) + 1
        kept = groups.setdefault(key, {})
        if p.doc not in kept or gap > kept[p.doc][0]:
            kept[p.doc] = (gap, p)
    entries: list[DivergentContext] = []
    for key, kept in groups.items():
        ranked = sorted(kept.values(), key=lambda item: -item[0])
        gap, rep = ranked[0]
        i, other = int(rep.most_divergent or 0), rep.logprob_other or ()
        examples = tuple(
            Example(p.doc, p.owner_position, p.other_position, p.context, g) for g, p in ranked[1 : 1 + n_examples]
        )
        score = sum(g for g, _ in ranked)
        rough = (documents or {}).get(key, {})
        unscored = [r for d, r in rough.items() if d not in kept]
        both = [(g, p.rough_gap or 0.0) for g, p in ranked if _rough_key(p) == key]  # the screen said this text too
        if unscored and sum(r for _, r in both) > 0:
            score += sum(g for g, _ in both) / sum(r for _, r in both) * sum(unscored)
        n_docs = len(kept) + len(unscored)
        entries.append(DivergentContext(rep.texts[i], score, gap, rep.probs[i], rep.logprob_owner[i], other[i],
                                        n_docs, occurrences[key], rep, examples))  # fmt: skip
    entries.sort(key=lambda e: (-e.score, _group_key(e.text)))
    return entries[:max_entries]


def salience(entries: Sequence[DivergentContext], background: int = 10) -> list[float | None]:
    """How far each entry stands out from the pair's background of differences: ``log(score)`` minus the median log
    score of the other entries among the first ``background + 1`` (None with no other entry to compare with).

    Two models always differ somewhere, and by how much depends on the pair (a weak model with a fine-grained
    tokenizer finds much of a strong model's text unlikely); a behaviour one model has and the other lacks is one
    difference far above the rest, whatever the scale. Scale-free, so a null threshold carries across pairs."""
    logs = [math.log(max(e.score, 1e-12)) for e in entries[: background + 1]]
    out: list[float | None] = []
    for i, e in enumerate(entries):
        others = sorted(v for j, v in enumerate(logs) if j != i)
        if not others:
            out.append(None)
            continue
        mid = len(others) // 2
        median = others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2
        out.append(math.log(max(e.score, 1e-12)) - median)
    return out
