"""Specification of the alignment stage and the paired reader, on synthetic shards with known pairs."""

import re

import pytest
import torch

from workers.activations.pairing import PairedActivations, align_activations, load_pairs, median_norms
from workers.activations.shards import CorruptShardError, ShardData, ShardWriter

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs", "while", "seven", "wizards", "quietly", "hex"]


def make_texts(n: int) -> dict[int, str]:
    g = torch.Generator().manual_seed(0)
    return {
        i: " ".join(
            WORDS[j] for j in torch.randint(0, len(WORDS), (int(torch.randint(5, 30, (1,), generator=g)),), generator=g)
        )
        for i in range(n)
    }


def words(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def pieces(text: str) -> list[tuple[int, int]]:
    """A different 'tokenizer': every word split into 2-character pieces."""
    return [(s, min(s + 2, e)) for ws, e in words(text) for s in range(ws, e, 2)]


def write_model(store, prefix: str, texts: dict[int, str], tokenize, d: int, per_shard: int) -> None:
    """Each activation row encodes (doc id, token end character) so pairs can be checked exactly."""
    writer = ShardWriter(store, prefix, tokens_per_shard=per_shard)
    for doc_id, text in texts.items():
        offsets = torch.tensor(tokenize(text), dtype=torch.int32)
        n = len(offsets)
        acts = torch.zeros(n, d)
        acts[:, 0] = doc_id
        acts[:, 1] = offsets[:, 1].float()
        acts[:, 2:] = torch.randn(n, d - 2)
        writer.add(ShardData(acts, torch.arange(n), torch.full((n,), doc_id), offsets, torch.arange(n)))
    writer.finish({"model": prefix})


@pytest.fixture
def paired_store(object_store):
    texts = make_texts(60)
    write_model(object_store, "act/a", texts, words, d=8, per_shard=150)
    write_model(object_store, "act/b", texts, pieces, d=12, per_shard=230)
    result = align_activations(object_store, "act/a", "act/b", texts.__getitem__, "audit/alignment")
    return object_store, texts, result


def test_alignment_pairs_tokens_ending_at_the_same_character(paired_store):
    store, texts, result = paired_store
    assert result.aligned_sequence_fraction == 1.0
    # Every word ends a window on both sides, so there is one pair per word.
    assert result.n_pairs == sum(len(words(t)) for t in texts.values())
    reader = PairedActivations(store, "act/a", "act/b", result.pairs_key, batch_size=64, shuffle_buffer=256, epochs=1)
    seen = 0
    for x_a, x_b in reader:
        assert x_a.shape == (64, 8) and x_b.shape == (64, 12)
        torch.testing.assert_close(x_a[:, :2], x_b[:, :2])  # same document, same end character
        seen += 64
    assert seen == result.n_pairs // 64 * 64


def test_reader_is_deterministic_and_shuffles_across_shards(paired_store):
    store, _, result = paired_store
    make = lambda seed: PairedActivations(  # noqa: E731
        store, "act/a", "act/b", result.pairs_key, batch_size=32, shuffle_buffer=128, seed=seed, epochs=1
    )
    first = [x_a[:, 0] for x_a, _ in make(0)]
    again = [x_a[:, 0] for x_a, _ in make(0)]
    other = [x_a[:, 0] for x_a, _ in make(1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=False))
    # A batch mixes documents rather than replaying the corpus in order.
    assert len(first[0].unique()) > 3


def test_reader_repeats_epochs_until_the_trainer_stops(paired_store):
    store, _, result = paired_store
    reader = PairedActivations(store, "act/a", "act/b", result.pairs_key, batch_size=64, shuffle_buffer=128)
    n = sum(1 for _ in zip(range(3 * reader.batches_per_epoch() + 1), reader, strict=False))
    assert n == 3 * reader.batches_per_epoch() + 1


def test_corrupt_shard_is_detected_by_the_reader(paired_store):
    store, _, result = paired_store
    key = next(k for k in store.list("act/b/") if k.endswith(".safetensors"))
    data = bytearray(store.get_bytes(key))
    data[-5] ^= 0xFF
    store.put_bytes(key, bytes(data))
    reader = PairedActivations(store, "act/a", "act/b", result.pairs_key, batch_size=64, shuffle_buffer=128, epochs=1)
    with pytest.raises(CorruptShardError, match="sha256 expected"):
        list(reader)


def test_stored_pairs_point_inside_both_models(paired_store):
    store, _, result = paired_store
    a, b = load_pairs(store, result.pairs_key)
    assert a.shape == b.shape and torch.all(a[1:] > a[:-1]) and torch.all(b[1:] > b[:-1])


def test_documents_in_a_different_order_are_refused(object_store):
    texts = make_texts(5)
    write_model(object_store, "x/a", texts, words, d=4, per_shard=50)
    write_model(object_store, "x/b", dict(reversed(list(texts.items()))), pieces, d=4, per_shard=50)
    with pytest.raises(ValueError, match="document order differs"):
        align_activations(object_store, "x/a", "x/b", texts.__getitem__, "x/al")


def test_median_norms_of_the_stream(paired_store):
    store, _, result = paired_store
    reader = PairedActivations(store, "act/a", "act/b", result.pairs_key, batch_size=64, shuffle_buffer=128)
    n_a, n_b = median_norms(iter(reader), n_batches=2)
    assert n_a > 0 and n_b > 0


@pytest.mark.parametrize("shorter", ["a", "b"])
def test_documents_one_budget_did_not_reach_are_left_unpaired_and_counted(object_store, shorter):
    texts = make_texts(10)
    fewer = dict(list(texts.items())[:7])
    write_model(object_store, "u/a", fewer if shorter == "a" else texts, words, d=4, per_shard=50)
    write_model(object_store, "u/b", fewer if shorter == "b" else texts, pieces, d=4, per_shard=50)
    result = align_activations(object_store, "u/a", "u/b", texts.__getitem__, "u/al")
    assert result.unpaired_documents == 3
    assert result.sequences == 7
    assert result.n_pairs == sum(len(words(t)) for t in fewer.values())
