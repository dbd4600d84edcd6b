"""Specification of the OpenAI-compatible client (workers/analysis/llm.py), over real HTTP to a loopback stand-in."""

from __future__ import annotations

import socket

import pytest

from dfc.analysis.explain import Snippet, detect, explain
from tests.fixtures.llm_server import KEY, MODEL, serve_llm
from workers.analysis.llm import ChatClient, ExplainerError, ExplainerSettings

ASK = [{"role": "user", "content": "Below are text excerpts\n1. a <<cat>> sat   (activation 1)"}]


def client(url: str, *, key: str | None = KEY, model: str = MODEL, waits: list[float] | None = None,
           **settings) -> ChatClient:  # fmt: skip
    config = ExplainerSettings(url=url, model=model, api_key=key, **settings)
    return ChatClient(config, sleep=(waits if waits is not None else []).append)


def test_a_reply_is_the_first_choices_content_and_the_request_is_an_openai_chat_completion():
    with serve_llm() as server:
        chat = client(server.url)
        assert chat(ASK) == 'Explanation: fires on the token "cat"'

    body, headers = server.requests[0], server.headers[0]
    assert body == {"model": MODEL, "messages": ASK, "stream": False, "temperature": 0.0}  # no max_tokens unless set
    assert headers["Authorization"] == f"Bearer {KEY}" and headers["Content-Type"] == "application/json"
    assert chat.requests == 1 and chat.tokens > 0


def test_rate_limits_and_server_errors_are_retried_honouring_retry_after():
    waits: list[float] = []
    with serve_llm(faults=[429, 503]) as server:
        chat = client(server.url, waits=waits, max_tokens=64)
        assert chat(ASK).startswith("Explanation")

    assert len(server.requests) == 3 and server.requests[-1]["max_tokens"] == 64
    assert waits == [0.0, 0.0]  # the server's Retry-After: 0, not our own backoff


def test_an_endpoint_that_keeps_failing_is_given_up_on_after_max_attempts():
    waits: list[float] = []
    with serve_llm(faults=[503] * 5) as server, pytest.raises(ExplainerError, match="3 tries: HTTP 503") as failed:
        client(server.url, waits=waits, max_attempts=3)(ASK)
    assert not failed.value.fatal and len(server.requests) == 3 and len(waits) == 2


def test_a_refused_key_is_fatal_at_once_and_says_what_to_set():
    with serve_llm() as server, pytest.raises(ExplainerError, match=r"HTTP 401.*DFC_EXPLAINER_API_KEY") as failed:
        client(server.url, key="sk-wrong")(ASK)
    assert failed.value.fatal and len(server.requests) == 1
    assert "sk-wrong" not in str(failed.value)


def test_an_unknown_model_is_fatal_and_names_the_setting():
    refused = r"HTTP 404.*DFC_EXPLAINER_MODEL='gpt-nonexistent'"
    with serve_llm() as server, pytest.raises(ExplainerError, match=refused) as failed:
        client(server.url, model="gpt-nonexistent")(ASK)
    assert failed.value.fatal


def test_a_closed_port_is_retried_with_exponential_backoff_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    waits: list[float] = []
    with pytest.raises(ExplainerError, match="did not answer after 4 tries: URLError"):
        client(f"http://127.0.0.1:{port}/v1", waits=waits)(ASK)
    assert waits == [1.0, 2.0, 4.0]


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({}, "DFC_EXPLAINER_URL is empty"),
        ({"url": "ftp://host/v1", "model": MODEL}, "must be an http"),
        ({"url": "http://127.0.0.1:1/v1"}, "DFC_EXPLAINER_MODEL is empty"),
    ],
)
def test_settings_that_cannot_reach_a_model_are_refused_before_any_request(settings, problem):
    config = ExplainerSettings(**settings)
    assert problem in config.problem()
    with pytest.raises(ExplainerError, match=problem):
        ChatClient(config)


def test_settings_come_from_the_environment_and_the_key_never_leaves_it(monkeypatch):
    monkeypatch.setenv("DFC_EXPLAINER_URL", "http://vllm.llm.svc:8000/v1")
    monkeypatch.setenv("DFC_EXPLAINER_MODEL", "Qwen/Qwen3-32B")
    monkeypatch.setenv("DFC_EXPLAINER_API_KEY", "sk-secret-value")
    monkeypatch.setenv("DFC_EXPLAINER_TEMPERATURE", "")  # empty: the server's default

    config = ExplainerSettings()

    assert config.problem() is None and config.temperature is None
    assert config.public_env() == {"DFC_EXPLAINER_URL": "http://vllm.llm.svc:8000/v1",
                                   "DFC_EXPLAINER_MODEL": "Qwen/Qwen3-32B", "DFC_EXPLAINER_TIMEOUT_S": "120.0",
                                   "DFC_EXPLAINER_MAX_ATTEMPTS": "4"}  # fmt: skip
    assert "sk-secret-value" not in repr(config)


def test_explain_and_detect_run_end_to_end_over_http():
    contexts = [Snippet("I am ", "sorry", " about that", 3.0), Snippet("So ", "sorry", " to hear", 2.0)]
    with serve_llm() as server:
        chat = client(server.url)
        text = explain(chat, contexts)
        found = detect(chat, text, [c.text for c in contexts], ["the weather is fine", "prices rose", "sorry state"])

    assert text == 'fires on the token "sorry"'
    # The stand-in judge says yes wherever the word occurs: both top contexts, and one of three random ones.
    assert found.score == pytest.approx((1 + 2 / 3) / 2) and len(server.requests) == 2
