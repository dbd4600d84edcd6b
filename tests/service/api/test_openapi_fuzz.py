"""Schemathesis drives generated requests from the app's own OpenAPI document through the ASGI app.

A bounded, derandomised run (at most ``MAX_CASES`` requests): valid and deliberately invalid inputs for
every operation. No request may get a 5xx, and every response must match what the document promises
(status code listed, content type, body schema).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import create_app
from tests.service.conftest import API_KEY, FakeSubmitter, make_settings

POSITIVE_PER_OPERATION = 12
NEGATIVE_PER_OPERATION = 8
MAX_CASES = 200
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


def _run(operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode, examples: int) -> list[str]:
    """Send up to ``examples`` generated cases of ``operation``; return a line per problem found."""
    problems: list[str] = []

    @hypothesis.settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case: schemathesis.Case) -> None:
        response = case.call(headers=AUTH)
        _run.seen[(operation.label, response.status_code)] += 1  # type: ignore[attr-defined]
        if response.status_code >= 500:
            problems.append(f"{response.status_code} for {case.as_curl_command(headers=AUTH)}")
            return
        try:
            case.validate_response(response, checks=CHECKS, headers=AUTH)
        except BaseExceptionGroup as e:  # schemathesis' FailureGroup: one failure per failed check
            where = f"{case.operation.label} -> {response.status_code}"
            problems.extend(f"{where}: {str(failure).splitlines()[0]}" for failure in e.exceptions)

    with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # nothing to negate: no parameters, no body
        send()
    return problems


_run.seen = Counter()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_generated_requests_never_get_a_5xx_and_match_the_document(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "bucket"), FakeSubmitter())
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 10, [op.label for op in operations]

    _run.seen.clear()  # type: ignore[attr-defined]
    problems: list[str] = []
    for operation in operations:
        problems += _run(operation, schemathesis.GenerationMode.POSITIVE, POSITIVE_PER_OPERATION)
        problems += _run(operation, schemathesis.GenerationMode.NEGATIVE, NEGATIVE_PER_OPERATION)
    seen: Counter[tuple[str, int]] = _run.seen  # type: ignore[attr-defined]
    ran = seen.total()
    print(f"schemathesis: {ran} generated requests over {len(operations)} operations, {len(problems)} problems")
    for (label, status), count in sorted(seen.items()):
        print(f"  {label:45} {status}  x{count}")
    assert 50 <= ran <= MAX_CASES
    assert not problems, "\n".join(sorted(set(problems)))
