"""Property-based fuzzing of the agent's and the hub's HTTP APIs with schemathesis.

Each operation of the agent's OpenAPI document (``{prefix}/openapi.json``) and of the hub's
(``/api/openapi.json``) gets generated requests, valid and invalid against the document, sent to
the real processes of the fleet with authentication set up: the agent's protected operations
carry the bearer token of an administrator of site ``hs`` (logged in again after any request
that may end its session, so a generated ``/token/revoke`` cannot blind the rest); the hub's
``/api/v1`` operations are signed with the secret of a site added for this test, exactly as
``agent.hub_client`` signs them (a rotated secret is taken from the answer). Every response must
pass ``not_a_server_error``, ``status_code_conformance`` and ``response_schema_conformance``.

The run is bounded and deterministic (``derandomize``): ``HEADLESSKEY_FUZZ_EXAMPLES`` examples
per operation and generation mode (default 12, so 24 requests per operation). A longer run:
``HEADLESSKEY_FUZZ_EXAMPLES=500`` (see docs/security.md).
"""

from __future__ import annotations

import json
import os
import secrets
import typing as t
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from hypothesis import Phase
from hypothesis import given
from hypothesis import settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from schemathesis.specs.openapi.checks import status_code_conformance

from agent import signing
from agent.config import parse_hub_secret
from tests.conftest import PASSWORD
from tests.integration.test_sso import AGENT
from tests.integration.test_sso import PREFIX
from tests.integration.test_sso import Agent
from tests.integration.test_sso import run
from tests.security.conftest import Fleet

EXAMPLES = int(os.environ.get("HEADLESSKEY_FUZZ_EXAMPLES", "12"))
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# Operations that may end the admin's session: it logs in again after them.
ENDS_SESSIONS = ("/token/revoke", "/change-password", "/reset-password", "/sessions/{session_id}",
                 "/admin/sessions/{session_id}")
Send = t.Callable[[t.Any], requests.Response]


def fuzz(schema: t.Any, send: Send, statuses: dict[str, set[int]]) -> list[str]:
    """Run every operation of ``schema`` in both generation modes; the failures, one line each.

    ``statuses`` collects the statuses each operation answered to valid input.
    """
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations
    for operation in operations:
        for mode in MODES:
            seen = statuses.setdefault(operation.label, set())
            try:
                run_operation(operation, mode, send, seen)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label  # nothing to make invalid
            except (Exception, BaseExceptionGroup) as exc:  # every failure is reported below
                first = str(exc).strip().splitlines()
                failures.append(f"{operation.label} ({mode.value}): "
                                f"{type(exc).__name__}: {' | '.join(first[:12])}")
    return failures


def run_operation(operation: t.Any, mode: GenerationMode, send: Send, seen: set[int]) -> None:
    """Send ``EXAMPLES`` generated requests of one operation; raise on the first failure."""

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: t.Any) -> None:
        response = send(case)
        if mode is GenerationMode.POSITIVE:
            seen.add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    check()


def create_admin(agent: Agent) -> str:
    username = f"fuzzadmin{secrets.token_hex(3)}"
    run(AGENT, "users", "create", "--instance", str(agent.instance), "--username", username,
        "--email", f"{username}@example.com", "--role", "administrator", "--password-stdin",
        stdin=PASSWORD + "\n", env=agent.env)
    return username


@pytest.mark.case("L-05")
def test_L05_fuzz_the_agent_api(fleet: Fleet) -> None:
    """No generated request, valid or not, makes the agent answer 5xx, a status its document
    does not list, or a body that does not match the documented schema."""
    agent = fleet["hs"]
    admin = create_admin(agent)
    schema = schemathesis.openapi.from_url(agent.base + PREFIX + "/openapi.json")
    http = requests.Session()
    token: list[str] = []
    admin_id: list[int] = []

    def send(case: t.Any) -> requests.Response:
        if not token:
            login = http.post(agent.base + PREFIX + "/token", timeout=30,
                              json={"username": admin, "password": PASSWORD})
            assert login.status_code == 200, login.text
            token.append(login.json()["token"])
            admin_id[:] = [login.json()["user"]["ID"]]
        target = (case.path_parameters or {}).get("user_id")
        if case.path.endswith("/disable") and target in admin_id:
            case.path_parameters["user_id"] = admin_id[0] + 1  # the fuzzing admin stays enabled
        response = case.call(base_url=agent.base, session=http, timeout=30,
                             headers={"Authorization": f"Bearer {token[0]}"})
        if case.path.endswith(ENDS_SESSIONS) or response.status_code == 401:
            token.clear()  # the next request logs in afresh
        return t.cast(requests.Response, response)

    statuses: dict[str, set[int]] = {}
    failures = fuzz(schema, send, statuses)
    assert not failures, "\n".join(failures)
    # Authenticated: the protected operations answered more than 401.
    for label in ("GET /wp-json/headlesskey/v1/me", "GET /wp-json/headlesskey/v1/admin/logs",
                  "GET /wp-json/headlesskey/v1/sessions"):
        assert 200 in statuses[label], (label, statuses[label])
    assert agent.get("/openapi.json").status_code == 200


@pytest.mark.case("L-05")
def test_L05_fuzz_the_hub_api(fleet: Fleet) -> None:
    """The same for the hub's signed site API (each request signed by a site of its own) and
    its public documents."""
    hub = fleet.hub
    key = f"fuzz-{secrets.token_hex(3)}"
    added = json.loads(hub.cli("sites", "add", "--name", key, "--url", f"https://{key}.example",
                               "--key", key, "--json").stdout)
    secret = [parse_hub_secret("secret", added["secret"])]
    schema = schemathesis.openapi.from_url(hub.url + "/api/openapi.json")
    http = requests.Session()

    def send(case: t.Any) -> requests.Response:
        kwargs = case.as_transport_kwargs(base_url=hub.url)
        kwargs.pop("timeout", None)
        prepared = http.prepare_request(requests.Request(**{
            k: v for k, v in kwargs.items()
            if k in ("method", "url", "headers", "params", "json", "data", "files", "cookies")}))
        body = prepared.body or b""
        if isinstance(body, str):
            body = body.encode()
        parts = urlsplit(prepared.url or "")
        if parts.path.startswith("/api/v1/"):
            prepared.headers.update(signing.sign_request(
                secret[0], key, prepared.method or "GET", parts.path, parts.query, body))
        response = http.send(prepared, timeout=30, allow_redirects=False)
        if parts.path == "/api/v1/secret/rotate" and response.status_code == 200:
            secret[0] = parse_hub_secret("secret", response.json()["secret"])
        return response

    statuses: dict[str, set[int]] = {}
    failures = fuzz(schema, send, statuses)
    assert not failures, "\n".join(failures)
    # Signed: every site API operation was answered past the signature check.
    for label, seen in statuses.items():
        if label.split()[1].startswith("/api/v1/"):
            assert seen - {401}, (label, seen)
    directory = requests.Session()
    signed = signing.sign_request(secret[0], key, "GET", "/api/v1/directory")
    assert directory.get(hub.url + "/api/v1/directory", headers=signed,
                         timeout=30).status_code == 200
