"""Schemathesis against the app's own OpenAPI schema: valid and invalid inputs, never a 500.

Every API operation is fuzzed with generated inputs that fit its schema (positive) and that break it
(negative); the answer must not be a server error, must have a documented content type, and must
match its documented schema. The job runner is off (run_jobs=False), so generated runs stay queued
and nothing trains. (Schemathesis' own pytest fixture loader does not work with pytest 9, hence
plain Hypothesis `@given` over each operation's strategy.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from app.config import Settings
from app.main import create_app

MAX_EXAMPLES = 8  # per operation and mode (33 pairs): the file runs in about 15 s


def _cases() -> list[tuple[str, GenerationMode]]:
    """('METHOD /path', mode) for every API operation; invalid inputs only where it takes any input."""
    app = create_app(Settings(home=Path("/nonexistent/stepscope-openapi")), run_jobs=False)  # touches no disk
    cases = []
    for path, operations in app.openapi()["paths"].items():
        for method, spec in operations.items():
            if path.startswith("/api/"):
                cases.append((f"{method.upper()} {path}", GenerationMode.POSITIVE))
                if spec.get("parameters") or spec.get("requestBody"):
                    cases.append((f"{method.upper()} {path}", GenerationMode.NEGATIVE))
    return cases


@pytest.mark.parametrize(("operation", "mode"), _cases(), ids=lambda v: v if isinstance(v, str) else v.value)
def test_no_input_makes_the_api_fail(settings: Settings, operation: str, mode: GenerationMode) -> None:
    app = create_app(settings.model_copy(update={"max_upload_bytes": 4096}), run_jobs=False)
    method, path = operation.split(" ", 1)
    api = schemathesis.openapi.from_asgi("/openapi.json", app)[path][method]

    @given(case=api.as_strategy(generation_mode=mode))
    @hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=[not_a_server_error, content_type_conformance, response_schema_conformance])

    check()
