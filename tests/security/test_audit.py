"""SECURITY.md §10, L-01, L-04 and L-05: the activity log and error answers.

The shared federation of this part of the suite (``tests.security.test_headers.surface``): a
hub and sites ``x`` and ``y`` with a tight account lockout (3 failures) and no refresh grace
window, mail to a real SMTP server on loopback. Each auth event is caused over HTTP and must leave
exactly one row in the site's ``hk_audit`` (or, for the hub's own actions, in ``hub_events``)
with its UTC time, actor, IP and outcome. The last test breaks the site's database on purpose.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import typing as t

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from agent import signing
from tests.conftest import PASSWORD
from tests.conftest import Mailbox
from tests.integration.test_sso import AGENT
from tests.integration.test_sso import PREFIX
from tests.integration.test_sso import Agent
from tests.integration.test_sso import Federation
from tests.integration.test_sso import new_user
from tests.integration.test_sso import run
from tests.security.test_headers import surface
from tests.security.test_leaks import Flow
from tests.security.test_leaks import reset_mail

NEW_PASSWORD = "violet lantern orbit 42 and more"
# What an error body must never show: a trace, SQL, a driver's words, a file path, key material.
INTERNALS = re.compile(r"Traceback|File \"|sqlalchemy|sqlite|psycopg|SELECT |INSERT |"
                       r"UPDATE |hk_[a-z_]+|/tmp/|\.py\b|BEGIN [A-Z ]*PRIVATE KEY|whsec_",
                       re.IGNORECASE)


@pytest.fixture(scope="module")
def fed(request: pytest.FixtureRequest, mail: Mailbox) -> Federation:
    return surface(request, mail)


@pytest.fixture(scope="module")
def admin(fed: Federation) -> str:
    """The bearer token of an administrator of ``x`` (made with the site's command)."""
    agent = fed["x"]
    name = f"auditadmin{secrets.token_hex(3)}"
    run(AGENT, "users", "create", "--instance", str(agent.instance), "--username", name,
        "--email", f"{name}@example.com", "--role", "administrator", "--password-stdin",
        stdin=PASSWORD + "\n", env=agent.env)
    r = agent.post("/token", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def rows_since(agent: Agent, mark: int) -> list[dict[str, t.Any]]:
    columns = ("id", "created_at", "event", "outcome", "user_id", "login", "ip", "details")
    return [dict(zip(columns, row, strict=True)) for row in agent.rows(
        f"SELECT {', '.join(columns)} FROM hk_audit"  # noqa: S608 - the fixed columns above
        " WHERE id > ? ORDER BY id", mark)]


def exactly_one(agent: Agent, mark: int, event: str, outcome: str, *,
                user_id: int | None = None, login: str | None = None) -> dict[str, t.Any]:
    """The one new ``event`` row since ``mark``: UTC time of now, the client's IP, the actor."""
    rows = [r for r in rows_since(agent, mark) if r["event"] == event]
    assert len(rows) == 1, (event, rows_since(agent, mark))
    row = rows[0]
    assert row["outcome"] == outcome, row
    at = dt.datetime.fromisoformat(row["created_at"]).replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - at).total_seconds()) < 60, row  # stored in UTC
    assert row["ip"] == "127.0.0.1", row
    if user_id is not None:
        assert row["user_id"] == user_id, row
    if login is not None:
        assert row["login"] == login or row["user_id"] is not None, row
    return row


@pytest.mark.case("L-01")
def test_L01_every_auth_event_is_one_audit_row(fed: Federation, mail: Mailbox,
                                              admin: str) -> None:
    """Registration, login success and failure, lockout, reset request and completion, password
    change, refresh-token reuse, revocation and an administrator's unlock and session end each
    write exactly one activity row with its UTC time, actor, IP and outcome."""
    agent = fed["x"]
    name = f"audit{secrets.token_hex(4)}"
    email = f"{name}@example.com"

    mark = agent.last_audit_id()
    r = agent.post("/register", json={"username": name, "email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    user_id = int(r.json()["data"]["user_id"]) if "user_id" in r.json().get("data", {}) else None
    row = exactly_one(agent, mark, "user.registered", "success", user_id=user_id)
    user_id = row["user_id"]
    assert isinstance(user_id, int)

    mark = agent.last_audit_id()
    first = agent.post("/token", json={"username": name, "password": PASSWORD}).json()
    exactly_one(agent, mark, "login.succeeded", "success", user_id=user_id)

    mark = agent.last_audit_id()
    assert agent.post("/token", json={"username": name, "password": "wrong" * 4}).status_code == 401
    exactly_one(agent, mark, "login.failed", "failure", login=name)

    mark = agent.last_audit_id()
    refreshed = agent.post("/token/refresh", json={"refresh_token": first["refresh_token"]})
    assert refreshed.status_code == 200
    exactly_one(agent, mark, "token.refreshed", "success", user_id=user_id)
    mark = agent.last_audit_id()
    reused = agent.post("/token/refresh", json={"refresh_token": first["refresh_token"]})
    assert reused.status_code in (400, 401)
    exactly_one(agent, mark, "token.reuse_detected", "blocked", user_id=user_id)

    current = agent.post("/token", json={"username": name, "password": PASSWORD}).json()
    mark = agent.last_audit_id()
    assert agent.post("/change-password", token=current["token"], json={
        "current_password": PASSWORD, "new_password": NEW_PASSWORD}).status_code == 200
    exactly_one(agent, mark, "password.changed", "success", user_id=user_id)

    flow = Flow()
    mark = agent.last_audit_id()
    link = reset_mail(agent, mail, flow, name, email, "link")
    exactly_one(agent, mark, "password.reset_requested", "success", user_id=user_id)
    token = re.search(r"token=([A-Za-z0-9_\-]+)", link)
    assert token
    mark = agent.last_audit_id()
    assert agent.post("/reset-password", json={"login": name, "token": token.group(1),
                                               "password": PASSWORD}).status_code == 200
    exactly_one(agent, mark, "password.reset", "success", user_id=user_id)

    pair = agent.post("/token", json={"username": name, "password": PASSWORD}).json()
    mark = agent.last_audit_id()
    assert agent.post("/token/revoke", token=pair["token"],
                      json={"refresh_token": pair["refresh_token"]}).status_code == 200
    exactly_one(agent, mark, "token.revoked", "success", user_id=user_id)

    # An administrator ends a session of the user, then the user locks the account out.
    pair = agent.post("/token", json={"username": name, "password": PASSWORD}).json()
    sessions = agent.get(f"/admin/users/{user_id}/sessions", token=admin).json()["sessions"]
    mark = agent.last_audit_id()
    assert agent.request("DELETE", f"/admin/sessions/{sessions[0]['id']}",
                         token=admin).status_code == 200
    exactly_one(agent, mark, "session.ended", "success")

    mark = agent.last_audit_id()
    for _ in range(3):
        agent.post("/token", json={"username": name, "password": "wrong" * 4})
    assert agent.post("/token", json={"username": name, "password": PASSWORD}).status_code in (
        401, 429)
    exactly_one(agent, mark, "lockout.started", "info")
    mark = agent.last_audit_id()
    assert agent.post(f"/admin/users/{user_id}/unlock", token=admin).status_code == 200
    exactly_one(agent, mark, "user.unlocked", "info", user_id=user_id)
    assert agent.post("/token", json={"username": name, "password": PASSWORD}).status_code == 200


@pytest.mark.case("L-01")
def test_L01_a_key_rotation_is_one_audit_row(fed: Federation, admin: str) -> None:
    """Rotating the site's access-token key (``headlesskey-agent keys rotate`` beside the
    running site) writes one ``key.rotated`` row naming the new key, in UTC; tokens issued
    before still work."""
    agent = fed["x"]
    user = new_user(agent, f"rot{secrets.token_hex(4)}")
    mark = agent.last_audit_id()
    out = run(AGENT, "keys", "rotate", "--instance", str(agent.instance), env=agent.env).stdout
    kid = out.strip().removeprefix("new access-token key ")
    rows = [r for r in rows_since(agent, mark) if r["event"] == "key.rotated"]
    assert len(rows) == 1, rows_since(agent, mark)
    assert rows[0]["outcome"] == "info"
    assert json.loads(rows[0]["details"]) == {"key": "access", "kid": kid}
    at = dt.datetime.fromisoformat(rows[0]["created_at"]).replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - at).total_seconds()) < 60
    assert agent.get("/me", token=user.token).status_code == 200


@pytest.mark.case("L-01")
def test_L01_hub_records_key_changes_once(fed: Federation) -> None:
    """A site publishing its next key through the signed API leaves one hub event naming the
    site, with the caller's IP and a UTC time."""
    hub, agent = fed.hub, fed["x"]

    def hub_events(after: int) -> list[tuple[t.Any, ...]]:
        return hub.rows("SELECT event, site_key, ip, created_at, outcome "
                        "FROM hub_events WHERE id > ? ORDER BY id", after)

    def last() -> int:
        return int(hub.rows("SELECT coalesce(max(id), 0) FROM hub_events")[0][0])

    jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    jwk.update(kid=f"audit-{secrets.token_hex(4)}", alg="ES256", use="sig")
    mark = last()
    body = json.dumps({"jwk": jwk, "status": "next"}).encode()
    headers = signing.sign_request(agent.raw_secret, agent.site_key, "POST", "/api/v1/keys", "",
                                   body)
    r = requests.post(hub.url + "/api/v1/keys", data=body, timeout=30,
                      headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    events = hub_events(mark)
    assert [e[0] for e in events] == ["key.registered"], events
    event, site_key, ip, created_at, outcome = events[0]
    assert site_key == agent.site_key and ip == "127.0.0.1" and outcome == "success"
    at = dt.datetime.fromisoformat(str(created_at)).replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - at).total_seconds()) < 60


@pytest.mark.case("L-04")
def test_L04_the_activity_log_cannot_be_changed_over_http(fed: Federation, admin: str) -> None:
    """An administrator can read the activity log but not write, change or delete it: every
    other method on ``/admin/logs`` (and on a row's would-be URL) is 405/404 and no row changes;
    a site re-sending one of its events to the hub with other content changes nothing there."""
    agent, hub = fed["x"], fed.hub
    before = agent.rows("SELECT * FROM hk_audit ORDER BY id")
    assert before
    last_id = before[-1][0]
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path in ("/admin/logs", f"/admin/logs/{last_id}"):
            r = agent.request(method, path, token=admin, json={"event": "forged", "id": last_id})
            assert r.status_code in (404, 405), (method, path, r.status_code)
    logs = agent.get("/admin/logs", token=admin)
    assert logs.status_code == 200
    assert agent.rows(
        f"SELECT * FROM hk_audit WHERE id <= {int(last_id)} ORDER BY id"  # noqa: S608 - an int
    ) == before

    # The hub stores a site's uploaded event once; a second upload of that id cannot rewrite it.
    remote = f"audit-{secrets.token_hex(4)}"
    now = dt.datetime.now(dt.UTC).isoformat()

    def upload(event: str) -> requests.Response:
        body = json.dumps({"events": [{"id": remote, "event": event, "time": now,
                                       "outcome": "success", "ip": "127.0.0.1"}]}).encode()
        headers = signing.sign_request(agent.raw_secret, agent.site_key, "POST",
                                       "/api/v1/events", "", body)
        return requests.post(hub.url + "/api/v1/events", data=body, timeout=30,
                             headers={**headers, "Content-Type": "application/json"})

    assert upload("login.failed").json() == {"accepted": 1}
    assert upload("login.succeeded").json() == {"accepted": 0}
    stored = hub.rows("SELECT event FROM hub_events WHERE site_key = ? AND remote_id = ?",
                      agent.site_key, remote)
    assert stored == [("login.failed",)]


def assert_generic(response: requests.Response, statuses: set[int]) -> None:
    """A JSON error in the API's shape, its status among ``statuses``, nothing internal."""
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"code", "message", "data"}, body
    assert not INTERNALS.search(response.text), response.text
    assert "access_token" not in body and "refresh_token" not in body and "token" not in body


@pytest.mark.case("L-05")
def test_L05_malformed_requests_get_generic_errors(fed: Federation, admin: str) -> None:
    """Broken JSON, the wrong content type, a body too large, a JSON array, an unknown route,
    numbers too large or not in ASCII digits (agent and hub): a 4xx in the API's JSON shape,
    with no trace, SQL, path or key material."""
    agent = fed["x"]
    user = new_user(agent, f"l05{secrets.token_hex(4)}")
    url = agent.base + PREFIX
    cases = [
        ("POST", "/token", {"data": "{\"username\": ",
                            "headers": {"Content-Type": "application/json"}}, {400}),
        ("POST", "/token", {"data": "username=a&password=b",
                            "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
         {415}),
        ("POST", "/token", {"data": "[1, 2]",
                            "headers": {"Content-Type": "application/json"}}, {400}),
        ("POST", "/register", {"data": b"\xff\xfe{",
                               "headers": {"Content-Type": "application/json"}}, {400}),
        ("POST", "/token", {"data": "{" + " " * 70000 + "}",
                            "headers": {"Content-Type": "application/json"}}, {413}),
        ("POST", "/change-password", {"data": "{", "headers": {
            "Content-Type": "application/json", "Authorization": f"Bearer {user.token}"}}, {400}),
        ("GET", "/no-such-route", {}, {404}),
    ]
    for method, path, kw, statuses in cases:
        assert_generic(requests.request(method, url + path, timeout=30, **kw), statuses)
    # Numbers beyond 64 bits, and digits that are not ASCII ("\xb2" on the wire is "²").
    for params in ({"user": str(2**63)}, {"limit": "\xb2"}, {"user": "\u00b2"}):
        assert_generic(agent.get("/admin/logs", token=admin, params=params), {400})
    headers = signing.sign_request(agent.raw_secret, agent.site_key, "GET", "/api/v1/directory")
    headers[signing.HEADER_TIMESTAMP] = headers[signing.HEADER_TIMESTAMP][:-1] + "\xb2"
    assert_generic(requests.get(fed.hub.url + "/api/v1/directory", headers=headers,
                                timeout=30), {401})
    assert agent.get("/me", token=user.token).status_code == 200


@pytest.mark.case("L-05")
def test_L05_database_down_is_a_generic_error(fed: Federation) -> None:
    """With the site's database made unusable (its SQLite file replaced by garbage, or its
    PostgreSQL schema renamed away), logins and registrations answer a generic 5xx JSON error
    (never a trace, SQL or path), a token check that cannot read the session a generic 5xx or
    401; once the database is back, the same token works."""
    agent = fed["y"]  # not ``x``, whose jobs process later tests need
    user = new_user(agent, f"dbdown{secrets.token_hex(4)}")
    with agent.store.unusable():
        for response in (
            agent.post("/token", json={"username": user.username, "password": PASSWORD}),
            agent.post("/register", json={"username": f"n{secrets.token_hex(4)}",
                                          "email": f"n{secrets.token_hex(4)}@example.com",
                                          "password": PASSWORD}),
        ):
            assert_generic(response, {500, 503})
        # Pooled connections notice that the database is gone: a token check fails closed,
        # generically, rather than reading the database set aside.
        for response in (agent.get("/me", token=user.token),
                         agent.post("/token/validate", token=user.token)):
            assert_generic(response, {401, 500, 503})
    assert agent.get("/me", token=user.token).status_code == 200
