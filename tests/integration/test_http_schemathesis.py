"""Property-based API tests: schemathesis drives every operation of the live OpenAPI document.

Generated requests (valid and invalid) go to a real uvicorn server over a real fleet home with
devices, a model and a rollout in it. Every response must be a declared status with a JSON
body; no input may cause a 500.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # controller-only (not in the slim device env)
pytest.importorskip("schemathesis")  # controller-only (not in the slim device env)
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

from controller.fleet.registry import Fleet
from controller.fleet.rollout.policy import Policy, parse_waves
from controller.http.auth import ensure_local_token
from controller.http.server import HttpServer

DATA = Path(__file__).resolve().parent.parent / "data"
# What uvicorn (h11) answers, as 400 text/plain, to a request that is not valid HTTP/1.1 (a
# negative case sent `Content-Length:` with no value): the server's refusal, outside the API.
NOT_HTTP = b"Invalid HTTP request received."
# Examples per operation: ~14 operations in well under 60 s on two cores.
EXAMPLES = 8
# The heavier run (`-m slow`) explores much further.
SLOW_EXAMPLES = 150


def config(token: str) -> schemathesis.config.SchemathesisConfig:
    """Schemathesis sends the token itself (so its negative cases may also drop or spoil it).

    A request the schema allows may still name an unknown profile or model, or waves like
    "50,10" that only the service layer can judge: that is a 400 with its message, not a crash.
    """
    return schemathesis.config.SchemathesisConfig.from_dict(
        {
            "auth": {"openapi": {"HTTPBearer": {"bearer": token}}},
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "409"]}
            },
        }
    )


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, module_db: str | None
) -> Iterator[tuple[HttpServer, str]]:
    """A server on a free port over a fleet with two devices, a model and a rollout."""
    home = tmp_path_factory.mktemp("schemathesis") / "home"
    fleet = Fleet(home, db=module_db)
    for device in ("cam-1", "cam-2"):
        fleet.register_device(device, "rpi4")
    fleet.add_model(DATA / "tiny_int8.tflite", name="tiny", version="1")
    fleet.start_rollout("tiny:1", "all", Policy(waves=parse_waves("1d,100")))
    fleet.close()
    token = ensure_local_token(home, module_db)
    server = HttpServer(home, "127.0.0.1", 0, db=module_db).start()
    yield server, token
    server.stop()


def run_schemathesis(server: HttpServer, token: str, mode: str, examples: int) -> int:
    """Every operation with `examples` generated cases of `mode`; return the operations run."""
    schema = schemathesis.openapi.from_url(
        f"{server.url}/api/v1/openapi.json", config=config(token)
    )
    # The event stream never ends by design; test_http_api.py reads it.
    operations = [
        op for r in schema.get_all_operations() if not (op := r.ok()).path.endswith("/stream")
    ]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def call(case: schemathesis.Case) -> None:
            """One generated request; schemathesis's default checks judge the response."""
            response = case.call()
            if response.status_code == 400 and response.content == NOT_HTTP:
                return  # uvicorn refused it before the API saw it (docs/http-api.md)
            case.validate_response(response)

        call()
    return len(operations)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_conforms_to_its_openapi_document(live: tuple[HttpServer, str], mode: str) -> None:
    assert run_schemathesis(*live, mode, EXAMPLES) == 15


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_conforms_at_length(live: tuple[HttpServer, str], mode: str) -> None:
    assert run_schemathesis(*live, mode, SLOW_EXAMPLES) == 15
