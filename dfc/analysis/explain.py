"""Feature explanations written by a language model, and the detection score that judges them (SCIENCE.md §6).

An *explainer* reads a feature's top-activating contexts (the token it fired on marked) and, when measured,
the tokens it promotes and what removing it takes from its model, and writes a short phrase. A *judge* then
sees the explanation and a shuffled mix of the feature's top contexts and contexts where it does not fire,
unmarked, and says which ones the feature fires in; its balanced accuracy is the detection score
(≥ 0.8: interpretable; the paper found 87.8%).

The language model is any ``Chat``: a function from chat messages to the reply's text, so this runs against a
notebook's model or an HTTP endpoint alike (``workers/analysis/llm.py`` is the OpenAI-compatible client).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": …}``."""
Chat = Callable[[list[Message]], str]
"""A language model: the messages of a conversation in, the text of its next reply out."""
T = TypeVar("T")

MAX_EXPLANATION_CHARS = 300
MAX_SNIPPET_CHARS = 400
"""Longer contexts are cut around the marked token: the judge and the explainer need the neighbourhood."""

EXPLAINER_SYSTEM = (
    "You are an interpretability researcher. A sparse dictionary (a crosscoder) was trained on the internal "
    "activations of two language models; each of its features is a direction that fires on some tokens. "
    "You explain what one feature detects or does, from the text where it fires most strongly."
)
JUDGE_SYSTEM = (
    "You are an interpretability researcher checking an explanation of a feature of a language model: "
    "given the explanation, you decide in which text excerpts the feature fires."
)


class ExplanationError(ValueError):
    """The language model's reply could not be read as what was asked for."""


class Snippet(NamedTuple):
    """A context a feature fired in: the text before, the token it fired on, the text after."""

    prefix: str
    token: str
    suffix: str
    activation: float = 0.0

    @property
    def text(self) -> str:
        """The plain text, as the judge sees it (nothing marked)."""
        return self.prefix + self.token + self.suffix


class Detection(NamedTuple):
    """How well a judge, given only the explanation, told the feature's contexts from random ones."""

    score: float
    """Balanced accuracy: the mean of the accuracy on activating and on random contexts."""
    activating: int
    random: int
    predicted: list[bool]
    """The judge's verdict per context, in the order it was shown."""
    truth: list[bool]
    """Whether each context shown was an activating one."""


def one_line(text: str) -> str:
    """``text`` on one line: line breaks shown as ↵ (one context per line in a prompt)."""
    return text.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", " ")


def _clip(prefix: str, token: str, suffix: str) -> tuple[str, str, str]:
    room = max(0, MAX_SNIPPET_CHARS - len(token))
    before = min(len(prefix), max(room * 3 // 4, room - len(suffix)))
    after = room - before
    return prefix[len(prefix) - before :], token, suffix[:after]


def explanation_prompt(
    contexts: Sequence[Snippet], promoted: Sequence[str] = (), says: Sequence[str] = (), owner: str = "the model"
) -> list[Message]:
    """The explainer's conversation: numbered contexts with the token marked ``<<like this>>`` and its activation."""
    if not contexts:
        raise ValueError("a feature with no contexts cannot be explained; it never fired on the analysed text")
    lines = []
    for i, c in enumerate(contexts, start=1):
        prefix, token, suffix = (one_line(part) for part in _clip(c.prefix, c.token, c.suffix))
        lines.append(f"{i}. {prefix}<<{token}>>{suffix}   (activation {c.activation:.3g})")
    parts = [
        f"Below are text excerpts where a feature of {owner} fires most strongly, strongest first. The token it "
        "fires on is marked <<like this>>; ↵ is a line break.",
        "\n".join(lines),
    ]
    if promoted:
        parts.append("Tokens whose probability the feature raises: " + ", ".join(json.dumps(t) for t in promoted))
    if says:
        parts.append(
            "Where it fires, removing it makes the model less likely to continue with: "
            + ", ".join(json.dumps(t) for t in says)
        )
    parts.append(
        "In one short phrase (at most 15 words), what does this feature detect or do? Be specific: name the "
        "concept, behaviour or token pattern. Reply with the phrase only."
    )
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def without_thinking(reply: str) -> str:
    """The reply without a reasoning model's ``<think>…</think>`` block (served without a reasoning parser)."""
    reply = re.sub(r"<think>.*?</think>", "", reply, flags=re.S)
    return reply.split("<think>", 1)[0]  # an unclosed block: it ran out of tokens while thinking


def parse_explanation(reply: str) -> str:
    """The phrase in an explainer's reply: its first non-empty line, without a label or quotes."""
    for line in without_thinking(reply).strip().splitlines():
        line = re.sub(r"^\s*(?:\*\*)?(?:explanation|answer|feature)\s*:\s*(?:\*\*)?\s*", "", line, flags=re.I)
        line = line.strip().strip("*").strip()
        if len(line) >= 2 and line[0] in "\"“'" and line[-1] in "\"”'":  # the whole phrase quoted
            line = line[1:-1].strip()
        if line:
            return line[:MAX_EXPLANATION_CHARS]
    raise ExplanationError(f"the explainer's reply has no explanation in it: {reply[:200]!r}")


def detection_prompt(explanation: str, texts: Sequence[str]) -> list[Message]:
    """The judge's conversation: the explanation and the numbered, unmarked excerpts."""
    lines = "\n".join(f"{i}. {one_line(t)}" for i, t in enumerate(texts, start=1))
    question = (
        f"A feature of a language model is explained as: {json.dumps(explanation)}\n\n"
        f"Here are {len(texts)} numbered text excerpts (↵ is a line break):\n{lines}\n\n"
        f"For each excerpt, decide whether the feature fires somewhere in it. Reply with only a JSON list of "
        f"{len(texts)} numbers in the excerpts' order: 1 if it fires in that excerpt, 0 if it does not."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": question}]


_VERDICTS = {"1": True, "0": False, "true": True, "false": False, "yes": True, "no": False}


def parse_judgements(reply: str, n: int) -> list[bool]:
    """The judge's ``n`` verdicts: the first JSON-like list in its reply, of 0/1 (or true/false, yes/no)."""
    for found in re.finditer(r"\[([^\[\]]*)\]", without_thinking(reply)):
        items = [item.strip().strip("'\"").lower() for item in found.group(1).split(",") if item.strip()]
        if items and all(item in _VERDICTS for item in items):
            if len(items) != n:
                raise ExplanationError(f"the judge gave {len(items)} verdicts for {n} excerpts: {found.group(0)}")
            return [_VERDICTS[item] for item in items]
    raise ExplanationError(f"the judge's reply has no list of {n} 0/1 verdicts: {reply[:200]!r}")


def _ask(chat: Chat, messages: list[Message], parse: Callable[[str], T], correction: str) -> T:
    """One question, and once more with a correction when the reply cannot be read."""
    reply = chat(messages)
    try:
        return parse(reply)
    except ExplanationError:
        again = [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": correction}]
        return parse(chat(again))


def explain(
    chat: Chat, contexts: Sequence[Snippet], promoted: Sequence[str] = (), says: Sequence[str] = (),
    owner: str = "the model",
) -> str:  # fmt: skip
    """A short explanation of the feature whose top contexts are ``contexts``."""
    messages = explanation_prompt(contexts, promoted, says, owner)
    return _ask(chat, messages, parse_explanation, "Reply with the short phrase only, on one line.")


def detect(
    chat: Chat, explanation: str, activating: Sequence[str], random_texts: Sequence[str], seed: int = 0
) -> Detection:
    """The detection score of ``explanation``: can a judge pick the feature's contexts out of random ones?"""
    if not activating or not random_texts:
        raise ValueError(
            f"detection needs activating and random contexts (got {len(activating)} and {len(random_texts)})"
        )
    shown = [(t, True) for t in activating] + [(t, False) for t in random_texts]
    random.Random(seed).shuffle(shown)
    texts, truth = [t for t, _ in shown], [is_top for _, is_top in shown]
    n = len(texts)
    verdicts = _ask(
        chat, detection_prompt(explanation, texts), lambda reply: parse_judgements(reply, n),
        f"Reply with only a JSON list of exactly {n} numbers (1 or 0), e.g. [{', '.join(['0'] * min(n, 3))}, …].",
    )  # fmt: skip
    hits = [p == t for p, t in zip(verdicts, truth, strict=True)]
    on_top = sum(h for h, t in zip(hits, truth, strict=True) if t) / len(activating)
    on_random = sum(h for h, t in zip(hits, truth, strict=True) if not t) / len(random_texts)
    return Detection((on_top + on_random) / 2, len(activating), len(random_texts), verdicts, truth)
