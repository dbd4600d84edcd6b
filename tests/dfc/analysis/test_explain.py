"""Specification of feature explanations and their detection score (dfc/analysis/explain.py), with rule-following
chats."""

from __future__ import annotations

import re

import pytest

from dfc.analysis.explain import (
    MAX_SNIPPET_CHARS,
    ExplanationError,
    Message,
    Snippet,
    detect,
    detection_prompt,
    explain,
    explanation_prompt,
    parse_explanation,
    parse_judgements,
)

CATS = ["my cat sleeps", "a cat on the mat", "the cat purrs", "feed the cat", "cat food"]
OTHER = ["stock prices fell", "it rained today", "the train was late"]


def excerpts(messages: list[Message]) -> list[str]:
    return re.findall(r"^\d+\. (.*)$", messages[-1]["content"], flags=re.M)


def judge(rule):
    """A chat that answers a detection prompt by applying ``rule`` to each excerpt."""

    def chat(messages: list[Message]) -> str:
        return "[" + ", ".join(str(int(rule(t))) for t in excerpts(messages)) + "]"

    return chat


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (lambda t: "cat" in t, 1.0),  # follows the explanation: every context classified right
        (lambda t: "cat" not in t, 0.0),  # inverted
        (lambda t: True, 0.5),  # says yes to everything: right on every top context, wrong on every random one
        (lambda t: "cat" in t and "food" not in t, (4 / 5 + 1) / 2),  # misses one of five top contexts
    ],
)
def test_the_detection_score_is_the_balanced_accuracy_of_the_judge(rule, expected):
    found = detect(judge(rule), "mentions of cats", CATS, OTHER, seed=3)

    assert found.score == pytest.approx(expected)
    assert (found.activating, found.random) == (5, 3) and sorted(found.truth) == [False] * 3 + [True] * 5


def test_the_judge_sees_every_context_once_unmarked_in_an_order_fixed_by_the_seed():
    seen: list[list[str]] = []

    def chat(messages: list[Message]) -> str:
        seen.append(excerpts(messages))
        return str([0] * len(seen[-1]))

    for seed in (0, 0, 1):
        detect(chat, "mentions of cats", CATS, OTHER, seed=seed)

    assert sorted(seen[0]) == sorted(CATS + OTHER) and not any("<<" in t for t in seen[0])
    assert seen[0] == seen[1] and seen[0] != seen[2]


def test_an_unreadable_reply_is_asked_again_once_with_the_reply_and_a_correction():
    calls: list[list[Message]] = []

    def chat(messages: list[Message]) -> str:
        calls.append(messages)
        return "I think the first few are about cats." if len(calls) == 1 else str([1] * 5 + [0] * 3)

    found = detect(chat, "cats", CATS, OTHER)

    assert len(calls) == 2 and calls[1][-2] == {"role": "assistant", "content": "I think the first few are about cats."}
    assert "exactly 8 numbers" in calls[1][-1]["content"]
    assert len(found.predicted) == 8

    with pytest.raises(ExplanationError, match="no list of 8"):
        detect(lambda messages: "no idea", "cats", CATS, OTHER)


def test_detection_needs_both_kinds_of_context():
    with pytest.raises(ValueError, match="activating and random"):
        detect(judge(lambda t: True), "cats", CATS, [])


@pytest.mark.parametrize(
    ("reply", "verdicts"),
    [
        ("[1, 0, 1]", [True, False, True]),
        ("Verdicts: [1,0,1]. Hope that helps [see above]", [True, False, True]),
        ('["yes", "no", "YES"]', [True, False, True]),
        ("```json\n[true, false, true]\n```", [True, False, True]),
        ("<think>Maybe [0, 0, 0]? No.</think>\n[1, 0, 1]", [True, False, True]),
    ],
)
def test_verdicts_are_read_from_the_first_list_of_zeros_and_ones(reply, verdicts):
    assert parse_judgements(reply, 3) == verdicts


def test_a_list_of_the_wrong_length_is_not_taken_as_verdicts():
    with pytest.raises(ExplanationError, match="2 verdicts for 3 excerpts"):
        parse_judgements("[1, 0]", 3)


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        ("Apologies and refusals", "Apologies and refusals"),
        ('\n\n**Explanation:** "The word Sorry at the start of a reply"\nMore detail…', "The word Sorry at the start "
         "of a reply"),
        ("Answer: dates in ISO format", "dates in ISO format"),
        ("<think>\nThe contexts all end a refusal.\n</think>\n\nRefusals to discuss a topic", "Refusals to discuss a "
         "topic"),
    ],
)  # fmt: skip
def test_the_explanation_is_the_first_line_without_label_or_quotes(reply, text):
    assert parse_explanation(reply) == text


@pytest.mark.parametrize("reply", ["  \n ** ** \n", "<think>It could be about dams, or"])
def test_an_empty_explanation_is_an_error(reply):
    with pytest.raises(ExplanationError):
        parse_explanation(reply)


def test_the_explainer_sees_each_context_on_one_line_with_the_token_marked_and_the_measured_behaviour():
    contexts = [Snippet("Hello.\nUser: hi\nBot:", " Sorry", ", I can't", 4.25), Snippet("x" * 2000, "!", "y" * 2000, 1)]
    messages = explanation_prompt(contexts, promoted=[" Sorry", " Unfortunately"], says=[" Sorry,"], owner="model B")
    prompt = messages[-1]["content"]

    lines = excerpts(messages)
    assert lines[0] == "Hello.↵User: hi↵Bot:<< Sorry>>, I can't   (activation 4.25)"
    assert "<<!>>" in lines[1] and len(lines[1]) < MAX_SNIPPET_CHARS + 40  # clipped around the token
    assert 'raises: " Sorry", " Unfortunately"' in prompt and 'continue with: " Sorry,"' in prompt
    assert "model B" in prompt and messages[0]["role"] == "system"


def test_explain_returns_the_phrase_the_chat_wrote_from_the_contexts():
    def chat(messages: list[Message]) -> str:
        tokens = re.findall(r"<<(.*?)>>", "\n".join(excerpts(messages)))
        return f"Explanation: the word {tokens[0].strip()}\n(with reasons)"

    assert explain(chat, [Snippet("a ", "cat", " sat")]) == "the word cat"
    with pytest.raises(ValueError, match="never fired"):
        explanation_prompt([])
    with pytest.raises(ExplanationError):
        explain(lambda messages: "", [Snippet("a ", "cat", " sat")])


def test_the_detection_prompt_names_the_explanation_and_the_number_of_answers():
    prompt = detection_prompt('the word "cat"', ["a\ncat", "dog"])[-1]["content"]

    assert 'explained as: "the word \\"cat\\""' in prompt and "1. a↵cat" in prompt and "JSON list of 2" in prompt
