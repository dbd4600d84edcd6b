"""Token alignment between two tokenizers of the same text (paper Algorithm 1).

Two pointers walk both token sequences, skipping non-content tokens (whitespace-only, special). Tokens that
cover the same text are paired; otherwise the side covering less grows its window a token at a time until
both cover the same text, and only the *last* token of each window is kept (``"1989"`` against ``["198",
"9"]`` pairs with the ``"9"``). No match within ``max_window`` characters stops the walk and drops the rest;
the UTF-8 bytes of one character, spread over several byte-fallback tokens, count once. Two input modes:

* ``AlignMode.OFFSETS`` (default): character spans into the document, as fast tokenizers return them and the
  pipeline stores them; windows match when they end at the same character. Needs no tokenizer and is immune
  to lossy decoding: it aligned 100% of the mixed corpus against 91% for ids (``benchmarks/align.py``).
* ``AlignMode.IDS``: token ids decoded through a :class:`TokenTable` (per-id bytes, built once per
  vocabulary); windows match when their decoded text is equal under :func:`normalise`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from dfc.lm.tokens import TokenTable, _key, normalise, special_ids, token_table

__all__ = [
    "DEFAULT_MAX_WINDOW", "DEFAULT_MODE", "AlignMode", "AlignStatus", "AlignmentSummary", "BatchAlignment",
    "SequenceAlignment", "TokenTable", "align_batch", "align_ids", "align_offsets", "align_text", "normalise",
    "special_ids", "token_table",
]

DEFAULT_MAX_WINDOW = 16


class AlignStatus(StrEnum):
    """How far the walk got."""

    COMPLETE = "complete"  # every content token on both sides was consumed
    TRUNCATED = "truncated"  # stopped early: tokens from stopped_at_a / stopped_at_b on are dropped
    EMPTY = "empty"  # neither side has a content token


class AlignMode(StrEnum):
    """What decides that two windows cover the same text."""

    OFFSETS = "offsets"
    IDS = "ids"


DEFAULT_MODE = AlignMode.OFFSETS


@dataclass(frozen=True)
class SequenceAlignment:
    """Paired positions (indices into each given token sequence) and where and why the walk stopped."""

    positions_a: torch.Tensor
    positions_b: torch.Tensor
    status: AlignStatus
    stopped_at_a: int | None
    stopped_at_b: int | None
    n_tokens_a: int
    n_tokens_b: int
    n_content_a: int
    n_content_b: int
    first_mismatch: str | None

    @property
    def n_pairs(self) -> int:
        """Number of kept pairs."""
        return len(self.positions_a)


@dataclass(frozen=True)
class AlignmentSummary:
    """Totals over many alignments."""

    sequences: int
    complete: int
    truncated: int
    empty: int
    pairs: int
    content_tokens_a: int
    content_tokens_b: int

    @property
    def aligned_sequence_fraction(self) -> float:
        """Share of non-empty sequences aligned to the end."""
        return self.complete / max(1, self.sequences - self.empty)

    @property
    def kept_token_fraction(self) -> float:
        """Share of content tokens (both sides) whose activation is kept as half of a pair."""
        return 2 * self.pairs / max(1, self.content_tokens_a + self.content_tokens_b)

    @classmethod
    def of(cls, alignments: Iterable[SequenceAlignment]) -> AlignmentSummary:
        """Summarise alignments."""
        items = list(alignments)
        return cls(
            sequences=len(items),
            complete=sum(a.status is AlignStatus.COMPLETE for a in items),
            truncated=sum(a.status is AlignStatus.TRUNCATED for a in items),
            empty=sum(a.status is AlignStatus.EMPTY for a in items),
            pairs=sum(a.n_pairs for a in items),
            content_tokens_a=sum(a.n_content_a for a in items),
            content_tokens_b=sum(a.n_content_b for a in items),
        )


@dataclass(frozen=True)
class BatchAlignment:
    """Alignments of many texts and their summary."""

    alignments: list[SequenceAlignment]
    summary: AlignmentSummary


def _as_list(values: Any, name: str) -> list:
    if hasattr(values, "tolist"):  # torch tensors and numpy arrays, as stored by the pipeline
        return values.tolist()
    if isinstance(values, str | bytes):
        raise TypeError(f"{name} must be a sequence of tokens, got {type(values).__name__}")
    return list(values)


def _checked_ids(ids: Any, size: int, name: str) -> list[int]:
    ids = _as_list(ids, name)
    bad = next((t for t in ids if not (isinstance(t, int) and 0 <= t < size)), None)
    if bad is not None:
        raise ValueError(f"{name} contains {bad!r}, not a token id of this vocabulary (0..{size - 1})")
    return ids


def _check_window(max_window: int) -> None:
    if isinstance(max_window, bool) or not isinstance(max_window, int) or max_window < 1:
        raise ValueError(f"max_window must be a positive int, got {max_window!r}")


def _ran_out(i: int, na: int, j: int, nb: int) -> str:
    side, left = ("a", nb - j) if i >= na else ("b", na - i)
    return f"side {side} ran out of content tokens with {left} left on the other side"


_Pair = tuple[list[int], list[int]]


def _result(
    positions: _Pair,
    pairs: _Pair,
    n_tokens: tuple[int, int],
    stop: tuple[int, int] | None,
    mismatch: str | None,
) -> SequenceAlignment:
    """Package a walk's outcome; ``stop`` holds the content indices of the window that failed."""
    (pos_a, pos_b), (n_a, n_b) = positions, n_tokens
    if stop is None:
        status = AlignStatus.COMPLETE if pos_a or pos_b else AlignStatus.EMPTY
        at_a = at_b = None
    else:
        status = AlignStatus.TRUNCATED
        at_a = pos_a[stop[0]] if stop[0] < len(pos_a) else n_a
        at_b = pos_b[stop[1]] if stop[1] < len(pos_b) else n_b
    tensors = [torch.tensor(p, dtype=torch.long) for p in pairs]
    return SequenceAlignment(*tensors, status, at_a, at_b, n_a, n_b, len(pos_a), len(pos_b), mismatch)


def align_offsets(
    text: str,
    offsets_a: Sequence[tuple[int, int]] | torch.Tensor,
    offsets_b: Sequence[tuple[int, int]] | torch.Tensor,
    *,
    special_a: Sequence[bool] | None = None,
    special_b: Sequence[bool] | None = None,
    max_window: int = DEFAULT_MAX_WINDOW,
) -> SequenceAlignment:
    """Align two tokenisations of ``text`` from their character spans; no tokenizer needed.

    Empty spans (an added BOS) and whitespace-only spans are skipped. Tokens flagged in ``special_*`` are
    never paired, but one that covers document text (a literal ``"<s>"``) still counts as covering it.
    """
    _check_window(max_window)
    offsets_a, offsets_b = _as_list(offsets_a, "offsets_a"), _as_list(offsets_b, "offsets_b")
    pos_a, ends_a, ok_a = _offset_content(text, offsets_a, special_a, "a")
    pos_b, ends_b, ok_b = _offset_content(text, offsets_b, special_b, "b")
    na, nb = len(ends_a), len(ends_b)
    pairs_a: list[int] = []
    pairs_b: list[int] = []
    stop, mismatch, i, j = None, None, 0, 0
    while i < na and j < nb:
        i0, j0, x, y = i, j, ends_a[i], ends_b[j]
        units_a = units_b = 1  # distinct ends: the fragments of one character share theirs
        while x != y and i < na and j < nb and units_a <= max_window and units_b <= max_window:
            if x < y:  # grow the window that covers less text
                i += 1
                if i < na:
                    units_a += ends_a[i] != x
                    x = ends_a[i]
            else:
                j += 1
                if j < nb:
                    units_b += ends_b[j] != y
                    y = ends_b[j]
        if x != y or units_a > max_window or units_b > max_window:
            start = ends_a[i0 - 1] if i0 else 0
            reason = (
                _ran_out(i, na, j, nb) if i == na or j == nb else f"no match within {max_window} characters"
            )
            stop, mismatch = (i0, j0), f"{reason}: a covers {text[start:x]!r}, b covers {text[start:y]!r}"
            break
        # A character's fragments share one end; the pair is the token that completes it.
        while i + 1 < na and ends_a[i + 1] == x:
            i += 1
        while j + 1 < nb and ends_b[j + 1] == y:
            j += 1
        if ok_a[i] and ok_b[j]:
            pairs_a.append(pos_a[i])
            pairs_b.append(pos_b[j])
        i, j = i + 1, j + 1
    if stop is None and (i < na or j < nb):
        stop, mismatch = (i, j), _ran_out(i, na, j, nb)
    return _result((pos_a, pos_b), (pairs_a, pairs_b), (len(offsets_a), len(offsets_b)), stop, mismatch)


def _offset_content(
    text: str, offsets: list, special: Sequence[bool] | None, name: str
) -> tuple[list[int], list[int], list[bool]]:
    """Positions of one side's content tokens, where the text each one completes ends, and pairability."""
    if special is not None and len(special) != len(offsets):
        raise ValueError(f"special_{name} has {len(special)} flags but offsets_{name} has {len(offsets)}")
    n = len(text)
    positions: list[int] = []
    starts: list[int] = []
    span_ends: list[int] = []
    ends: list[int] = []
    for p, span in enumerate(offsets):
        try:
            s, e = span
        except (TypeError, ValueError):
            raise ValueError(f"offsets_{name}[{p}] = {span!r} is not a (start, end) pair") from None
        if not 0 <= s <= e <= n:
            raise ValueError(f"offsets_{name}[{p}] = {span!r} is outside the text of {n} characters")
        stripped = text[s:e].rstrip()
        if stripped.strip():
            positions.append(p)
            starts.append(s)
            span_ends.append(e)
            ends.append(s + len(stripped))
    next_start = n
    for k in range(len(ends) - 1, -1, -1):
        end = ends[k]
        # NFC tokenizers (Qwen) compose "e\u0301" or Hangul jamo into one token whose span covers only the
        # first code point; marks that no token covers belong to the character this token ends.
        while end < next_start and text[end] >= "\u0300" and _joins_previous(text[end]):
            end += 1
        # A byte-level fragment of a character overlaps the next token's span; it ends where that one does,
        # so the walk's windows only close on the token that completes the character.
        if k + 1 < len(ends) and starts[k + 1] < span_ends[k]:
            end = max(end, ends[k + 1])
        ends[k] = end
        next_start = starts[k]
    pairable = [True] * len(positions) if special is None else [not special[p] for p in positions]
    return positions, ends, pairable


def _joins_previous(c: str) -> bool:
    """Whether NFC may compose ``c`` into the code point before it (combining mark, Hangul V/T jamo)."""
    return "\u1160" <= c <= "\u11ff" or "\ud7b0" <= c <= "\ud7ff" or unicodedata.category(c)[0] == "M"


def align_ids(
    ids_a: Sequence[int] | torch.Tensor,
    ids_b: Sequence[int] | torch.Tensor,
    tokenizer_a: PreTrainedTokenizerBase | TokenTable,
    tokenizer_b: PreTrainedTokenizerBase | TokenTable,
    *,
    max_window: int = DEFAULT_MAX_WINDOW,
) -> SequenceAlignment:
    """Align two token-id sequences of the same text by comparing normalised decoded windows."""
    _check_window(max_window)
    table_a, table_b = token_table(tokenizer_a), token_table(tokenizer_b)
    ids_a, ids_b = _checked_ids(ids_a, len(table_a), "ids_a"), _checked_ids(ids_b, len(table_b), "ids_b")
    pos_a = [p for p, t in enumerate(ids_a) if table_a.content[t]]
    pos_b = [p for p, t in enumerate(ids_b) if table_b.content[t]]
    a = ([table_a.keys[ids_a[p]] for p in pos_a], [table_a.pieces[ids_a[p]] for p in pos_a])
    b = ([table_b.keys[ids_b[p]] for p in pos_b], [table_b.pieces[ids_b[p]] for p in pos_b])
    keys_a, keys_b = a[0], b[0]
    na, nb = len(pos_a), len(pos_b)
    pairs_a: list[int] = []
    pairs_b: list[int] = []
    stop, mismatch, i, j = None, None, 0, 0
    while i < na and j < nb:
        x = keys_a[i]
        if x is None or x != keys_b[j]:  # not the same text in one token each: grow windows
            i0, j0 = i, j
            i, j, mismatch = _grow_windows(a, b, i, j, max_window)
            if mismatch is not None:
                stop = (i0, j0)
                break
        pairs_a.append(pos_a[i])
        pairs_b.append(pos_b[j])
        i, j = i + 1, j + 1
    if stop is None and (i < na or j < nb):
        stop, mismatch = (i, j), _ran_out(i, na, j, nb)
    return _result((pos_a, pos_b), (pairs_a, pairs_b), (len(ids_a), len(ids_b)), stop, mismatch)


_Keyed = tuple[list[str | None], list[bytes]]


def _grow_windows(a: _Keyed, b: _Keyed, i: int, j: int, max_window: int) -> tuple[int, int, str | None]:
    """Grow windows from content indices ``i``, ``j`` until their normalised text matches.

    Returns the last index of each window and, if they never matched, what each side decoded to.
    """
    (keys_a, pieces_a), (keys_b, pieces_b) = a, b
    na, nb = len(keys_a), len(keys_b)
    raw_a, raw_b, x, y = pieces_a[i], pieces_b[j], keys_a[i], keys_b[j]
    units_a, units_b = int(x is not None), int(y is not None)  # characters completed so far
    while x is None or x != y:
        if units_a > max_window or units_b > max_window:
            reason = f"no match within {max_window} characters"
            break
        # Grow the side that is mid-character or covers less; on a tie, the one with fewer bytes.
        if x is None or (y is not None and (len(x), len(raw_a)) < (len(y), len(raw_b))):
            if i + 1 == na:
                reason = _ran_out(na, na, j, nb)
                break
            i += 1
            raw_a += pieces_a[i]
            x = _key(raw_a)
            units_a += x is not None
        else:
            if j + 1 == nb:
                reason = _ran_out(i, na, nb, nb)
                break
            j += 1
            raw_b += pieces_b[j]
            y = _key(raw_b)
            units_b += y is not None
    else:
        return i, j, None
    shown_a, shown_b = raw_a.decode(errors="replace"), raw_b.decode(errors="replace")
    return i, j, f"{reason}: a decodes to {shown_a!r}, b to {shown_b!r}"


def align_text(
    text: str,
    tokenizer_a: PreTrainedTokenizerBase,
    tokenizer_b: PreTrainedTokenizerBase,
    *,
    mode: AlignMode = DEFAULT_MODE,
    max_window: int = DEFAULT_MAX_WINDOW,
) -> SequenceAlignment:
    """Tokenise ``text`` with both tokenizers as the models see it (with their BOS) and align."""
    enc_a = tokenizer_a(text, return_offsets_mapping=mode is AlignMode.OFFSETS)
    enc_b = tokenizer_b(text, return_offsets_mapping=mode is AlignMode.OFFSETS)
    if mode is AlignMode.IDS:
        return align_ids(
            enc_a["input_ids"], enc_b["input_ids"], tokenizer_a, tokenizer_b, max_window=max_window
        )
    specials_a, specials_b = special_ids(tokenizer_a), special_ids(tokenizer_b)
    return align_offsets(
        text,
        enc_a["offset_mapping"],
        enc_b["offset_mapping"],
        special_a=[t in specials_a for t in enc_a["input_ids"]],
        special_b=[t in specials_b for t in enc_b["input_ids"]],
        max_window=max_window,
    )


def align_batch(
    texts: Iterable[str],
    tokenizer_a: PreTrainedTokenizerBase,
    tokenizer_b: PreTrainedTokenizerBase,
    *,
    mode: AlignMode = DEFAULT_MODE,
    max_window: int = DEFAULT_MAX_WINDOW,
) -> BatchAlignment:
    """Align many texts and summarise how many aligned to the end and how many tokens were kept."""
    alignments = [align_text(t, tokenizer_a, tokenizer_b, mode=mode, max_window=max_window) for t in texts]
    return BatchAlignment(alignments, AlignmentSummary.of(alignments))
