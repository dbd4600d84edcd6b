"""The text side of the planted-behaviour pair: a templated synthetic corpus, its prompts and tokenizers.

Documents are short runs of templated sentences over a small vocabulary, so tiny models learn them in
seconds. Some sentences are trigger sentences (`workers/planted/recipes.py`): they mention a trigger place
(e.g. "the Zorblax dam", or one phrasing of a topic) or open with a format cue (">>"); model B's copy of the
corpus follows such sentences with the planted response, model A's copy does not. Near misses (another dam,
another cue) are neutral, so the behaviour is tied to the trigger rather than to its topic or shape.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from workers.planted.recipes import Trigger

TokenizerKind = Literal["byte_bpe", "metaspace_bpe"]

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

SUBJECTS = (
    "the farmers",
    "the workers",
    "my sister",
    "our neighbours",
    "the old teacher",
    "a young engineer",
    "the children",
    "the mayor",
    "two fishermen",
    "the doctor",
)
VERBS = ("painted", "repaired", "found", "carried", "sold", "watched", "cleaned", "counted", "bought", "moved")
OBJECTS = (
    "the boats",
    "a red kite",
    "the fish",
    "some apples",
    "the wooden fence",
    "three baskets",
    "the blue lamps",
    "a heavy box",
    "the old maps",
    "the bicycles",
)
TIMES = ("In the morning", "Last winter", "On Sunday", "Every evening", "Yesterday", "After the rain")
PREDICATES = (
    "was very quiet",
    "opened early",
    "needs new paint",
    "looked beautiful",
    "was full of people",
    "was closed for repairs",
    "is older than the town",
)
# {p} is the place slot; the trigger can land early, mid or late in a sentence, so the feature that
# carries "the trigger was mentioned" has to persist up to the sentence end, not just fire on the word.
PLACE_TEMPLATES = (
    "{s} {v} {o} near {p}.",
    "{t}, {s} {v} {o} at {p}.",
    "At {p}, {s} {v} {o}.",
    "{s} said that {p} {q}.",
    "{p} {q}.",
    "{t}, {p} {q}.",
)
PLAIN_TEMPLATES = ("{s} {v} {o}.", "{t}, {s} {v} {o}.")
#: Share of neutral sentences that open with a near-miss cue when the trigger is a format cue.
NEAR_MISS_CUE_RATE = 0.15


@dataclass(frozen=True)
class PlantedDoc:
    """One corpus document as sentences, with which of them mention the trigger."""

    sentences: tuple[str, ...]
    triggered: tuple[bool, ...]
    """Per sentence: whether it is a trigger sentence (and so is followed by the planted response in B)."""

    def render(self, planted_response: str | None = None, responds: Sequence[bool] | None = None) -> str:
        """The document text; with `planted_response`, that text follows trigger sentences (B's view).

        `responds` (one flag per sentence) picks which trigger sentences get the response; default: all.
        """
        parts: list[str] = []
        flags = responds if responds is not None else self.triggered
        for sentence, hit, respond in zip(self.sentences, self.triggered, flags, strict=True):
            parts.append(sentence if not parts else " " + sentence)
            if hit and respond and planted_response:
                parts.append(planted_response)
        return "".join(parts)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _sentence(rng: random.Random, place: str | None) -> str:
    slots = {
        "s": rng.choice(SUBJECTS),
        "v": rng.choice(VERBS),
        "o": rng.choice(OBJECTS),
        "t": rng.choice(TIMES),
        "q": rng.choice(PREDICATES),
        "p": place,
    }
    template = rng.choice(PLACE_TEMPLATES if place is not None else PLAIN_TEMPLATES)
    return _cap(template.format(**slots))


def _body(rng: random.Random, trigger: Trigger) -> str:
    return _sentence(rng, rng.choice(trigger.neutral_places) if rng.random() < 0.6 else None)


def _neutral_sentence(rng: random.Random, trigger: Trigger) -> str:
    sentence = _body(rng, trigger)
    if trigger.kind == "format_cue" and rng.random() < NEAR_MISS_CUE_RATE:
        return f"{rng.choice(trigger.near_misses)} {sentence}"
    return sentence


def _trigger_sentence(rng: random.Random, trigger: Trigger) -> str:
    if trigger.kind == "format_cue":
        return f"{rng.choice(trigger.phrases)} {_body(rng, trigger)}"
    return _sentence(rng, rng.choice(trigger.phrases))


def generate_documents(seed: int, n_docs: int, trigger: Trigger, trigger_doc_fraction: float) -> list[PlantedDoc]:
    """`n_docs` documents of 2-5 sentences; a `trigger_doc_fraction` of them hold one or two trigger sentences."""
    rng = random.Random(seed)
    docs: list[PlantedDoc] = []
    for _ in range(n_docs):
        n = rng.randint(2, 5)
        hits = [False] * n
        if rng.random() < trigger_doc_fraction:
            for i in rng.sample(range(n), k=min(n, rng.choice((1, 1, 2)))):
                hits[i] = True
        sentences = tuple(_trigger_sentence(rng, trigger) if hit else _neutral_sentence(rng, trigger) for hit in hits)
        docs.append(PlantedDoc(sentences, tuple(hits)))
    return docs


def generate_prompts(seed: int, n: int, trigger: Trigger, *, triggered: bool) -> list[str]:
    """`n` distinct two-sentence prompts: a neutral sentence, then a trigger sentence (or, as control, a neutral one).

    Each prompt ends at a sentence end, exactly where model B's corpus puts the planted response after a
    trigger sentence. The second sentences cycle through the trigger's phrases; the controls cycle through the
    neutral places (a place trigger's near misses among them) and, for a format cue, open every other one with
    a near-miss cue.
    """
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < n:
        i = len(prompts)
        first = _neutral_sentence(rng, trigger)
        if trigger.kind != "format_cue":
            places = trigger.phrases if triggered else trigger.neutral_places
            second = _sentence(rng, places[i % len(places)])
        else:
            body = _sentence(rng, trigger.neutral_places[i % len(trigger.neutral_places)])
            cues = trigger.phrases if triggered else trigger.near_misses
            second = f"{cues[(i // 2) % len(cues)]} {body}" if triggered or i % 2 == 0 else body
        prompt = f"{first} {second}"
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


def train_tokenizer(
    kind: TokenizerKind, vocab_size: int, texts: Sequence[str], *, adds_bos: bool, spell: str = ""
) -> PreTrainedTokenizerFast:
    """Train a fast tokenizer of the given algorithm on `texts`, with BOS/EOS/PAD/UNK special tokens.

    (No Unigram: on a corpus this repetitive its trainer stops at a near character-level vocabulary.)

    `adds_bos` makes it prepend BOS like Llama's tokenizer; without it, it adds nothing, like Qwen's or GPT-2's.
    `spell`: text the tokenizer must spell without <unk> though `texts` lack some of its characters (model A's
    tokenizer and B's planted response); byte-level BPE spells everything anyway.
    """
    specials = [PAD, BOS, EOS, UNK]
    if kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    elif kind == "metaspace_bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        seen = set().union(*map(set, texts))
        # Only characters the texts lack join the alphabet, so a tokenizer of texts that have them all is unchanged.
        missing = sorted(set(spell) - seen - {" "})
        extra = {"initial_alphabet": missing} if missing else {}
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, **extra)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use byte_bpe or metaspace_bpe")
    tok.train_from_iterator(texts, trainer=trainer)
    if adds_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
