"""What alignment needs to know of a vocabulary: each id's bytes, its normalised text, content and special flags.

Built once per tokenizer (:func:`token_table`), so the ids mode of :mod:`dfc.lm.align` never calls ``decode``
in its hot loop.
"""

from __future__ import annotations

import re
import unicodedata
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

_WHITESPACE = re.compile(r"\s+")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def normalise(text: str) -> str:
    """Compatibility-normalise (NFKD) and delete whitespace.

    NFKD and NFKC agree on which strings are equal; the decomposed form is additive, so a window's length
    grows token by token even where one side composed ``"e\\u0301"`` or Hangul jamo into one character.
    Whitespace is deleted rather than collapsed: both sides tokenised the same text, so it carries no
    content, and tokenizers disagree on which token carries it (``"▁a"`` vs ``" a"`` vs ``" ", "a"``).
    """
    return _WHITESPACE.sub("", unicodedata.normalize("NFKD", text))


@dataclass(frozen=True, eq=False)
class TokenTable:
    """Per-id raw bytes, normalised text and flags of a vocabulary, so alignment never calls ``decode``.

    ``keys[i]`` is :func:`normalise` of token ``i``'s text, or ``None`` when its bytes are not whole UTF-8
    characters (a byte fragment that only decodes inside a window).
    """

    pieces: list[bytes]
    keys: list[str | None]
    content: list[bool]
    special: list[bool]

    def __len__(self) -> int:
        return len(self.pieces)

    @classmethod
    def from_pieces(cls, pieces: Sequence[str | bytes], special_ids: Iterable[int] = ()) -> TokenTable:
        """Table from each id's raw text (``str`` is UTF-8 encoded); ``special_ids`` are never paired."""
        raw = [p.encode() if isinstance(p, str) else bytes(p) for p in pieces]
        special = [False] * len(raw)
        for i in special_ids:
            if not 0 <= i < len(raw):
                raise ValueError(f"special id {i} is outside the vocabulary of {len(raw)} pieces")
            special[i] = True
        keys = [_key(b) for b in raw]
        content = [not s and k != "" for s, k in zip(special, keys, strict=True)]
        return cls(raw, keys, content, special)

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> TokenTable:
        """Table from a fast tokenizer with a byte-level or SentencePiece (byte-fallback) decoder."""
        to_bytes = _piece_decoder(tokenizer)
        added = {i: t.content.encode() for i, t in tokenizer.added_tokens_decoder.items()}
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        pieces = [added[i] if i in added else to_bytes(t or "") for i, t in enumerate(tokens)]
        return cls.from_pieces(pieces, special_ids(tokenizer))


def _piece_decoder(tokenizer: PreTrainedTokenizerBase) -> Any:
    """A function from a vocabulary entry to the bytes it stands for, chosen from the backend's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = backend.decoder.__getstate__().decode() if backend and backend.decoder else ""
    if '"ByteLevel"' in decoder:
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        return lambda t: bytes(byte_of[c] for c in t) if all(c in byte_of for c in t) else t.encode()
    if '"ByteFallback"' in decoder or "\u2581" in decoder:

        def sentencepiece(token: str) -> bytes:
            match = _BYTE_PIECE.fullmatch(token)
            return bytes([int(match[1], 16)]) if match else token.replace("\u2581", " ").encode()

        return sentencepiece
    raise ValueError(
        f"tokenizer {tokenizer.name_or_path!r} has decoder {decoder[:60]!r}; ids mode reads byte-level and "
        "SentencePiece vocabularies only, so align its offsets with align_offsets instead"
    )


def _key(raw: bytes) -> str | None:
    """Normalised text of whole UTF-8 characters, or None for a byte fragment."""
    try:
        return normalise(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None


_TABLES: weakref.WeakKeyDictionary[Any, TokenTable] = weakref.WeakKeyDictionary()
_SPECIALS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, control tokens): never paired."""
    if tokenizer not in _SPECIALS:
        added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        _SPECIALS[tokenizer] = frozenset(tokenizer.all_special_ids) | added
    return _SPECIALS[tokenizer]


def token_table(tokenizer: PreTrainedTokenizerBase | TokenTable) -> TokenTable:
    """The tokenizer's :class:`TokenTable`, built once per tokenizer object (a second or so for 150k ids)."""
    if isinstance(tokenizer, TokenTable):
        return tokenizer
    if tokenizer not in _TABLES:
        _TABLES[tokenizer] = TokenTable.from_tokenizer(tokenizer)
    return _TABLES[tokenizer]
