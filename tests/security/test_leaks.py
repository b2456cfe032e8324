"""SECURITY.md §10, L-02: no secret in any log line, response or stored activity row.

The shared federation of this part of the suite (``tests.security.test_headers.surface``: a
hub and sites ``x`` and ``y``, each serving with its jobs process, mail to a real SMTP server on
loopback, every event sent to a webhook receiver on loopback) goes through a full flow over
HTTP: register, a failed login, login, refresh, reset by link and by code, change of password,
SSO from ``x`` to ``y``, and a delivered webhook.
Then every log line of every process, every response body and header, every webhook request
the receiver got, and every stored activity row (the sites' ``hk_audit``, the hub's
``hub_events``) is searched for each password used, the reset token and code, every refresh
token, every full access token and SSO assertion, the site secrets, the webhook secret, the
pairwise exchange keys, the sites' and the hub's master secrets and the PEM bodies of the
sites' private keys. Only the fields of
the responses that hand a token to its owner are left out of the search, and nothing else.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import typing as t
from email.message import Message
from urllib.parse import quote
from urllib.parse import quote_plus

import pytest
import requests

from tests.conftest import Mailbox
from tests.integration.test_sso import Agent
from tests.integration.test_sso import Federation
from tests.integration.test_sso import k
from tests.security.test_headers import WEBHOOK_SECRET
from tests.security.test_headers import Receiver
from tests.security.test_headers import surface


class Flow:
    """Everything the flow sent, received and must never find again."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}  # what -> the secret
        self.seen: list[tuple[str, str]] = []  # (where, text) to search

    def secret(self, what: str, value: str) -> str:
        assert value, what
        self.secrets[what] = value
        return value

    def response(self, label: str, response: requests.Response, *,
                 owner_fields: tuple[str, ...] = (), status: int = 200) -> dict[str, t.Any]:
        """Keep ``response`` to search, without exactly the fields that hand a token to its
        owner; return its JSON body."""
        assert response.status_code == status, f"{label}: {response.status_code} {response.text}"
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.seen.append((f"{label} headers", headers))
        body = response.json() if response.content else {}
        kept = {key: value for key, value in body.items() if key not in owner_fields}
        assert set(owner_fields) <= set(body), (label, body.keys())
        self.seen.append((f"{label} body", json.dumps(kept)))
        return t.cast(dict[str, t.Any], body)


@pytest.fixture(scope="module")
def fed(request: pytest.FixtureRequest, mail: Mailbox) -> Federation:
    return surface(request, mail)


def text_of(message: Message) -> str:
    parts = message.walk() if message.is_multipart() else [message]
    texts = []
    for part in parts:
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            texts.append(payload.decode(part.get_content_charset() or "utf-8"))
    return "\n".join(texts)


def reset_mail(agent: Agent, box: Mailbox, flow: Flow, login: str, to: str,
               delivery: str) -> str:
    """Ask for a reset by ``delivery``; the text of the reset mail it sends."""
    def resets() -> list[Message]:
        return [m for m in box.to(to) if m["Subject"].startswith("Reset your")]

    before = len(resets())
    flow.response(f"forgot-password {delivery}", agent.post(
        "/forgot-password", json={"login": login, "delivery": delivery}))
    deadline = time.monotonic() + 10
    while len(resets()) <= before:
        assert time.monotonic() < deadline, f"no reset mail to {to}"
        time.sleep(0.05)
    return text_of(resets()[-1])


def pem_body(pem: bytes) -> list[str]:
    """The base64 lines of a PEM private key (each long enough to mean something)."""
    return [line for line in pem.decode().splitlines()
            if line and not line.startswith("-----") and len(line) >= 40]


def forms(value: str) -> set[str]:
    """A secret as it could be written: as is, URL-encoded, JSON-escaped."""
    return {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}


@pytest.mark.case("L-02")
def test_L02_no_secret_in_logs_responses_or_activity(fed: Federation, mail: Mailbox) -> None:
    """After the full flow, none of the secrets it used appears in any process's log, any
    response (bar the token fields handed to their owner), any webhook request or any stored
    activity row; and the search does find them where they legitimately are (the mails, the
    token responses), so it is not searching the wrong text."""
    a, b = fed["x"], fed["y"]
    mailbox = mail
    flow = Flow()
    webhooks_before = len(Receiver.seen)
    name = f"leak{secrets.token_hex(4)}"
    email = f"{name}@example.com"
    passwords = [flow.secret(f"password {i}", f"pw-{i}-{secrets.token_urlsafe(12)}")
                 for i in range(5)]
    wrong = flow.secret("a wrong password", f"guess-{secrets.token_urlsafe(12)}")

    flow.response("register", a.post("/register", json={
        "username": name, "email": email, "password": passwords[0]}), status=201)
    flow.response("failed login", a.post("/token", json={"username": name, "password": wrong}),
                  status=401)
    tokens = ("token", "refresh_token")
    first = flow.response("login", a.post("/token", json={"username": name,
                                                          "password": passwords[0]}),
                          owner_fields=tokens)
    flow.secret("access token 1", first["token"])
    flow.secret("refresh token 1", first["refresh_token"])
    refreshed = flow.response("refresh", a.post("/token/refresh", json={
        "refresh_token": first["refresh_token"]}), owner_fields=tokens)
    flow.secret("access token 2", refreshed["token"])
    flow.secret("refresh token 2", refreshed["refresh_token"])
    flow.response("validate", a.post("/token/validate", token=refreshed["token"]))
    flow.response("me", a.get("/me", token=refreshed["token"]))

    link_mail = reset_mail(a, mailbox, flow, name, email, "link")
    match = re.search(r"token=([A-Za-z0-9_\-]+)", link_mail)
    assert match, link_mail
    reset_token = flow.secret("reset token", match.group(1))
    flow.response("reset by link", a.post("/reset-password", json={
        "login": name, "token": reset_token, "password": passwords[1]}))

    code_mail = reset_mail(a, mailbox, flow, email, email, "otp")
    codes = re.findall(r"^\s+(\d{6,10})\s*$", code_mail, re.MULTILINE)  # the indented code
    assert len(set(codes)) == 1, code_mail
    code = flow.secret("reset code", codes[0])
    flow.response("reset by code", a.post("/reset-password", json={
        "login": name, "otp": code, "password": passwords[2]}))

    third = flow.response("login 3", a.post("/token", json={"username": name,
                                                            "password": passwords[2]}),
                          owner_fields=tokens)
    flow.secret("access token 3", third["token"])
    flow.secret("refresh token 3", third["refresh_token"])
    flow.response("change password", a.post("/change-password", token=third["token"], json={
        "current_password": passwords[2], "new_password": passwords[3]}))
    fourth = flow.response("login 4", a.post("/login", json={"username": name,
                                                             "password": passwords[3]}),
                           owner_fields=tokens)
    flow.secret("access token 4", fourth["token"])
    flow.secret("refresh token 4", fourth["refresh_token"])

    assertion = flow.response("sso issue", a.post("/sso/issue", token=fourth["token"],
                                                  json={"target": b.site_key}),
                              owner_fields=("token", "signature"))
    flow.secret("SSO assertion", assertion["token"])
    flow.secret("SSO assertion signature", assertion["signature"])
    exchanged = flow.response("sso exchange", b.post("/sso/exchange", json={
        key: assertion[key] for key in ("site_key", "token", "signature")}), owner_fields=tokens)
    flow.secret("access token at b", exchanged["token"])
    flow.secret("refresh token at b", exchanged["refresh_token"])
    flow.response("revoke", a.post("/token/revoke", token=fourth["token"],
                                   json={"refresh_token": fourth["refresh_token"]}))
    flow.response("failed login 2", a.post("/token", json={"username": name,
                                                           "password": passwords[4]}),
                  status=401)

    # Key material of the federation.
    for agent in (a, b):
        flow.secret(f"site secret of {agent.name}", agent.secret)
        flow.secret(f"raw site secret of {agent.name}", agent.raw_secret.hex())
        flow.secret(f"raw site secret of {agent.name} (base64url)",
                    base64.urlsafe_b64encode(agent.raw_secret).decode().rstrip("="))
        for pem in ("federation-key.pem", "signing-key.pem"):
            lines = pem_body((agent.instance / pem).read_bytes())
            assert lines, pem
            for i, line in enumerate(lines):
                flow.secret(f"{pem} of {agent.name}, line {i}", line)
        for stored in ("secret.key", "hub-secret.key"):
            flow.secret(f"{stored} of {agent.name}", (agent.instance / stored).read_text().strip())
    for src, dst in (("x", "y"), ("y", "x")):
        key = k(fed, src, dst)
        flow.secret(f"pairwise key {src}->{dst}", key.hex())
        flow.secret(f"pairwise key {src}->{dst} (base64url)",
                    base64.urlsafe_b64encode(key).decode().rstrip("="))
    flow.secret("webhook secret", WEBHOOK_SECRET)
    flow.secret("webhook secret (key)", WEBHOOK_SECRET.removeprefix("whsec_"))
    hub_master = fed.hub.instance / "master.key"
    for i, line in enumerate(hub_master.read_text().split()):
        flow.secret(f"hub master key {i}", line.strip())

    # A webhook delivery, then everything the processes wrote.
    deadline = time.monotonic() + 20
    while len(Receiver.seen) <= webhooks_before or a.rows(
            "SELECT count(*) FROM hk_webhook_outbox WHERE status = 'pending'")[0][0]:
        assert time.monotonic() < deadline, "the flow's webhooks were not all delivered"
        time.sleep(0.2)
    time.sleep(0.5)  # let the processes flush their logs
    for i, (headers, body) in enumerate(Receiver.seen):
        flow.seen.append((f"webhook {i} headers", json.dumps(headers)))
        flow.seen.append((f"webhook {i} body", body))
    services = {"hub": fed.hub.service, "x": a.service, "y": b.service}
    for label, service in services.items():
        assert service is not None
        flow.seen.append((f"log of {label}", service.logs()))
    for agent in (a, b):
        for row in agent.rows("SELECT * FROM hk_audit"):
            flow.seen.append((f"hk_audit of {agent.name}", repr(row)))
        for row in agent.rows("SELECT * FROM hk_webhook_outbox"):
            flow.seen.append((f"hk_webhook_outbox of {agent.name}", repr(row)))
    for row in fed.hub.rows("SELECT * FROM hub_events"):
        flow.seen.append(("hub_events", repr(row)))
    assert len(flow.seen) > 40

    leaks = []
    for what, value in flow.secrets.items():
        pattern = re.compile("|".join(
            (r"(?<![\d.:])" + re.escape(v) + r"(?!\d)") if v.isdigit() else re.escape(v)
            for v in forms(value)))
        for where, text in flow.seen:
            if pattern.search(text):
                leaks.append(f"{what} in {where}")
    assert not leaks, "\n".join(leaks)

    # The search looks at the right text: the logs hold the requests, the activity rows the
    # flow's events, the webhook bodies its events; the secrets are where they belong.
    logs = dict(flow.seen)
    assert "/token/refresh" in logs["log of x"] and "/sso/exchange" in logs["log of y"]
    events = {row[0] for row in a.rows("SELECT event FROM hk_audit")}
    assert {"login.failed", "password.changed"} <= events, events
    assert reset_token in link_mail and code in code_mail
    assert first["token"] and exchanged["refresh_token"]
