"""Hostile and broken input on every endpoint: always a clean 4xx in the JSON error shape.

Whatever a client sends (broken JSON, the wrong content type, wrong types, huge or binary
strings, huge or endlessly nested bodies, garbage tokens, unknown routes or methods), the API
answers with a 4xx, ``Content-Type: application/json`` and the WordPress REST error body
``{"code": str, "message": str, "data": {"status": <the HTTP status>}}``: never a 500, never
an HTML page, and never a half-written row in the database.
"""

from __future__ import annotations

import json
import socket
import typing as t
from dataclasses import dataclass
from dataclasses import field
from urllib.parse import urlsplit

import pytest
import requests
from sqlalchemy import text

from tests.conftest import PASSWORD
from tests.conftest import Site

NEW_PASSWORD = "violet lantern orbit 42"
# A refresh token of the right shape that this site never issued.
UNKNOWN_REFRESH = "hkr_" + "Q" * 43
MAX_BODY = 65536
# These tests send hundreds of bad requests from one address: keep the brute-force lockout
# (a correct 429 of its own) out of the way, so each answer is the one for the input itself.
NO_LOCKOUT = {"HEADLESSKEY_LOCKOUT_ALLOWLIST": ["127.0.0.1/32"]}


@dataclass(frozen=True)
class Endpoint:
    """One POST endpoint: a body that is valid apart from the field under test."""

    path: str
    base: dict[str, t.Any]
    required: tuple[str, ...]  # fields whose absence (null) is itself an error
    optional: tuple[str, ...] = ()  # fields that may be absent, but not of the wrong type
    auth: bool = False  # the endpoint needs a bearer token before it reads the body
    kind: str = "form"  # how a bad field is answered: form, token, grant, revoke
    defaults: dict[str, str] = field(default_factory=dict)  # values for absent optional fields

    @property
    def fields(self) -> tuple[str, ...]:
        return self.required + self.optional


ENDPOINTS = [
    Endpoint("/token", {"username": "alice", "password": PASSWORD}, ("username", "password")),
    Endpoint("/login", {"username": "alice", "password": PASSWORD}, ("username", "password")),
    Endpoint("/token/validate", {"token": "placeholder"}, ("token",), kind="token"),
    Endpoint(
        "/token/refresh", {"refresh_token": UNKNOWN_REFRESH}, ("refresh_token",), kind="grant"
    ),
    Endpoint(
        "/token/revoke",
        {"token": "placeholder"},
        ("token",),
        ("refresh_token",),
        kind="revoke",
        defaults={"refresh_token": UNKNOWN_REFRESH},
    ),
    Endpoint(
        "/register",
        {"username": "newbie", "email": "newbie@example.com", "password": NEW_PASSWORD},
        ("username", "email", "password"),
        ("display_name",),
        defaults={"display_name": "New Bie"},
    ),
    Endpoint("/forgot-password", {"login": "alice", "delivery": "otp"}, ("login",), ("delivery",)),
    Endpoint(
        "/reset-password",
        {"login": "alice", "password": NEW_PASSWORD, "otp": "123456"},
        ("login", "password", "otp"),
        ("token",),
        defaults={"token": "abcdefghijklmnopqrstuvwxyz"},
    ),
    Endpoint(
        "/change-password",
        {"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        ("current_password", "new_password"),
        auth=True,
    ),
]
BY_PATH = {e.path: e for e in ENDPOINTS}
PATHS = [e.path for e in ENDPOINTS]

WRONG_TYPES: list[t.Any] = [12, 0, -1.5, [], ["alice"], {}, {"$ne": None}, True, False]
CONTROLS = ["\x00", "\n", "\r\nBcc: victim@example.com", "\x1b[2J", "\x08", "\x7f", "\x85", "\x9b"]


# ---------------------------------------------------------------------------------------------
# helpers


def assert_error(
    r: requests.Response, status: int | None = None, code: str | None = None
) -> dict[str, t.Any]:
    """A 4xx in the API's JSON error shape, with the security headers; returns the body."""
    where = f"{r.request.method} {r.request.url} -> {r.status_code} {r.text[:300]!r}"
    assert 400 <= r.status_code < 500, where
    if status is not None:
        assert r.status_code == status, where
    assert r.headers.get("Content-Type", "").split(";")[0].strip() == "application/json", where
    assert "<html" not in r.text.lower(), where
    body = r.json()
    assert isinstance(body, dict), where
    assert set(body) == {"code", "message", "data"}, where
    assert isinstance(body["code"], str) and body["code"], where
    assert isinstance(body["message"], str) and body["message"], where
    assert isinstance(body["data"], dict), where
    assert body["data"].get("status") == r.status_code, where
    assert type(body["data"]["status"]) is int, where
    if code is not None:
        assert body["code"] == code, where
    assert r.headers.get("X-Content-Type-Options") == "nosniff", where
    assert r.headers.get("Cache-Control") == "no-store", where
    return t.cast(dict[str, t.Any], body)


def assert_rejected_field(endpoint: Endpoint, r: requests.Response, name: str) -> None:
    """The answer an endpoint gives when one field of its body is bad."""
    if endpoint.kind == "revoke":
        # RFC 7009 §2.2: revocation answers 200 whatever the token is.
        assert r.status_code == 200, (name, r.status_code, r.text[:300])
        assert r.json()["success"] is True
        return
    if endpoint.kind == "token":
        assert_error(r, 401, "invalid_token")
        return
    if endpoint.kind == "grant":
        assert_error(r, 400, "invalid_grant")
        return
    body = assert_error(r, 400, "invalid_request")
    assert name in body["data"].get("fields", {}), (name, body)


class Client:
    """Posts to the endpoints of one site; ``/change-password`` gets a valid token of alice."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self._token: str | None = None

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self.site.api.login()["token"]
        return self._token

    def post(self, path: str, **kw: t.Any) -> requests.Response:
        if BY_PATH[path].auth:
            kw["token"] = self.token
        return self.site.api.post(path, **kw)

    def raw(
        self, path: str, data: t.Any, content_type: str | None = "application/json", **headers: str
    ) -> requests.Response:
        h = dict(headers)
        if content_type is not None:
            h["Content-Type"] = content_type
        return self.post(path, data=data, headers=h)


@pytest.fixture
def s(make_site: t.Callable[..., Site]) -> Site:
    site = make_site("HS256", **NO_LOCKOUT)
    site.create_user("alice")
    return site


@pytest.fixture
def client(s: Site) -> Client:
    return Client(s)


def collect(checks: t.Iterable[tuple[str, t.Callable[[], None]]]) -> None:
    """Run every check and report every failure at once (one bad case must not hide others)."""
    failures = []
    for label, check in checks:
        try:
            check()
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# bodies that are not a JSON object


MALFORMED = [
    b'{"username":',
    b'{"username": "alice", "password": }',
    b"{'username': 'alice'}",
    b'{"username": "alice",}',
    b'{"a": 1}{"b": 2}',
    b"\xff\xfe\x00garbage",
    b'{"username": "\xff\xfe"}',
    b"NaN garbage",
    b'{"n": 1' + b"0" * 5000 + b"}",  # an integer beyond Python's digit limit
]
NOT_AN_OBJECT = [b"[]", b'[{"username": "alice"}]', b"42", b"-1.5e3", b'"alice"', b"null", b"true"]


# Requests that are refused before anything is done share one site and loop over the endpoints;
# every failing case is reported with its endpoint.


def test_malformed_json_is_400_invalid_json(client: Client) -> None:
    collect(
        (
            f"{path} {raw[:40]!r}",
            lambda path=path, raw=raw: assert_error(client.raw(path, raw), 400, "invalid_json"),
        )
        for path in PATHS
        for raw in MALFORMED
    )


def test_json_that_is_not_an_object_is_400_invalid_json(client: Client) -> None:
    collect(
        (
            f"{path} {raw!r}",
            lambda path=path, raw=raw: assert_error(client.raw(path, raw), 400, "invalid_json"),
        )
        for path in PATHS
        for raw in NOT_AN_OBJECT
    )


WRONG_CONTENT_TYPES = [
    ("text/plain", json.dumps({"username": "alice", "password": PASSWORD})),
    ("text/plain; charset=utf-8", json.dumps({"username": "alice", "password": PASSWORD})),
    ("application/x-www-form-urlencoded", f"username=alice&password={PASSWORD}"),
    (
        "multipart/form-data; boundary=xyz",
        '--xyz\r\nContent-Disposition: form-data; name="username"\r\n\r\nalice\r\n--xyz--\r\n',
    ),
    ("application/xml", "<login><username>alice</username></login>"),
    (None, json.dumps({"username": "alice", "password": PASSWORD})),
]


def test_wrong_content_type_is_415(client: Client, s: Site) -> None:
    collect(
        (
            f"{path} {content_type}",
            lambda path=path, content_type=content_type, data=data: assert_error(
                client.raw(path, data.encode(), content_type), 415, "unsupported_media_type"
            ),
        )
        for path in PATHS
        for content_type, data in WRONG_CONTENT_TYPES
    )
    # A correct login really was refused, not just answered oddly: only the one session of the
    # token used for /change-password exists.
    assert s.scalar("SELECT count(*) FROM hk_sessions") == 1
    assert s.scalar("SELECT count(*) FROM hk_users") == 1


def test_json_with_charset_parameter_is_accepted(client: Client) -> None:
    """The media type decides, not the exact header: the 415 above is not a blanket refusal."""
    r = client.raw(
        "/token",
        json.dumps({"username": "alice", "password": PASSWORD}).encode(),
        "application/json; charset=utf-8",
    )
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------
# missing and wrongly typed fields


EMPTY_BODY_ANSWER = {
    "/token": (400, "invalid_request"),
    "/login": (400, "invalid_request"),
    "/token/validate": (401, "invalid_token"),
    "/token/refresh": (400, "invalid_grant"),
    "/register": (400, "invalid_request"),
    "/forgot-password": (400, "invalid_request"),
    "/reset-password": (400, "invalid_request"),
    "/change-password": (400, "invalid_request"),
}


def test_missing_fields(client: Client) -> None:
    checks = []
    for endpoint in ENDPOINTS:
        path = endpoint.path
        for kw in ({"json": {}}, {"data": b""}, {"json": {"unrelated": "x"}}):

            def empty(
                path: str = path, endpoint: Endpoint = endpoint, kw: dict[str, t.Any] = kw
            ) -> None:
                r = client.post(path, **kw)
                if endpoint.kind == "revoke":
                    # RFC 7009: nothing to revoke is not an error.
                    assert r.status_code == 200, r.text
                    return
                status, code = EMPTY_BODY_ANSWER[path]
                body = assert_error(r, status, code)
                if code == "invalid_request":
                    assert body["data"]["fields"], body  # the missing fields are named

            checks.append((f"{path} {kw}", empty))
        # Each required field missing on its own is refused too, and named.
        for name in endpoint.required:
            without = {k: v for k, v in endpoint.base.items() if k != name}
            # Without otp nor token, /reset-password names the token.
            named = "token" if (path, name) == ("/reset-password", "otp") else name
            checks.append(
                (
                    f"{path} without {name}",
                    lambda endpoint=endpoint, without=without, named=named: assert_rejected_field(
                        endpoint, client.post(endpoint.path, json=without), named
                    ),
                )
            )
    collect(checks)


def test_wrongly_typed_fields(client: Client) -> None:
    checks = []
    for endpoint in ENDPOINTS:
        for name in endpoint.fields:
            values = [*WRONG_TYPES, None] if name in endpoint.required else WRONG_TYPES
            for value in values:
                body = {**endpoint.base, name: value}
                # Neither code nor token: /reset-password names the token.
                named = (
                    "token"
                    if (endpoint.path, name, value) == ("/reset-password", "otp", None)
                    else name
                )
                checks.append(
                    (
                        f"{endpoint.path} {name}={value!r}",
                        lambda endpoint=endpoint, body=body, named=named: assert_rejected_field(
                            endpoint, client.post(endpoint.path, json=body), named
                        ),
                    )
                )
    collect(checks)


def test_overlong_strings(client: Client) -> None:
    checks = []
    for endpoint in ENDPOINTS:
        for name in endpoint.fields:
            for value in ("a" * 10_000, "é" * 5_000, "alice@" + "e" * 9_990 + ".com"):
                body = {**endpoint.base, name: value}
                checks.append(
                    (
                        f"{endpoint.path} {name}=<{len(value)} chars>",
                        lambda endpoint=endpoint, body=body, name=name: assert_rejected_field(
                            endpoint, client.post(endpoint.path, json=body), name
                        ),
                    )
                )
    collect(checks)


# These two may change state when a case is wrongly accepted (a login, a password change), so
# each endpoint gets a site of its own.


@pytest.mark.parametrize("path", PATHS)
def test_control_characters(client: Client, path: str) -> None:
    """C0 controls, DEL and C1 controls (Unicode category Cc) are refused in every field."""
    endpoint = BY_PATH[path]
    checks = []
    for name in endpoint.fields:
        clean = endpoint.base.get(name, endpoint.defaults.get(name, "abc"))
        for ctrl in CONTROLS:
            for value in (clean + ctrl, ctrl + clean, clean[:2] + ctrl + clean[2:]):
                body = {**endpoint.base, name: value}
                checks.append(
                    (
                        f"{name}={value!r}",
                        lambda body=body, name=name: assert_rejected_field(
                            endpoint, client.post(path, json=body), name
                        ),
                    )
                )
    collect(checks)


@pytest.mark.parametrize("path", PATHS)
def test_lone_surrogates_are_refused_not_500(client: Client, path: str) -> None:
    """JSON may escape a lone UTF-16 surrogate (``"\\ud800"``): not text, so refused."""
    endpoint = BY_PATH[path]
    checks = []
    for name in endpoint.fields:
        clean = endpoint.base.get(name, endpoint.defaults.get(name, "abc"))
        for value in (clean + "\ud800", "\udfff" + clean):
            raw = json.dumps({**endpoint.base, name: value}).encode()  # ascii, with \\udXXX escapes

            def check(raw: bytes = raw) -> None:
                r = client.raw(path, raw)
                if endpoint.kind == "revoke" and r.status_code == 200:
                    return  # RFC 7009 may answer 200 for any token
                assert_error(r)

            checks.append((f"{name}={value!r}", check))
    collect(checks)


# ---------------------------------------------------------------------------------------------
# huge and deeply nested bodies


def oversized(endpoint: Endpoint, size: int = 70_000) -> bytes:
    """The endpoint's valid-looking body, padded with an unknown field past 64 KiB."""
    return json.dumps({**endpoint.base, "pad": "x" * size}).encode()


def chunks(data: bytes, size: int = 4096) -> t.Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_64_kib_is_413(client: Client, s: Site, chunked: bool) -> None:
    def check(path: str) -> None:
        data = oversized(BY_PATH[path])
        assert len(data) > MAX_BODY
        # A generator has no length: requests sends it with Transfer-Encoding: chunked.
        r = client.raw(path, chunks(data) if chunked else data)
        if chunked:
            assert r.request.headers.get("Transfer-Encoding") == "chunked"
            assert "Content-Length" not in r.request.headers
        assert_error(r, 413, "payload_too_large")

    collect((path, lambda path=path: check(path)) for path in PATHS)
    # Nothing was done with the oversized bodies: no login, no account, no password change.
    assert s.scalar("SELECT count(*) FROM hk_users") == 1
    assert s.scalar("SELECT count(*) FROM hk_sessions") == 1  # the token for /change-password
    assert s.api.login()["user"]["user_login"] == "alice"  # the password is unchanged


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_limit_is_exact(client: Client, chunked: bool) -> None:
    """A body of exactly MAX_BODY bytes is read; one byte more is refused."""
    base = json.dumps({"username": "alice", "password": PASSWORD, "pad": ""}).encode()
    at_limit = json.dumps(
        {"username": "alice", "password": PASSWORD, "pad": "x" * (MAX_BODY - len(base))}
    ).encode()
    assert len(at_limit) == MAX_BODY
    over = at_limit[:-2] + b'x"}'
    assert len(over) == MAX_BODY + 1
    ok = client.raw("/token", chunks(at_limit) if chunked else at_limit)
    assert ok.status_code == 200, ok.text[:300]
    assert_error(client.raw("/token", chunks(over) if chunked else over), 413, "payload_too_large")


NESTED = [
    b"[" * 100_000,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000,
    b'{"username": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
]


def test_deeply_nested_json_is_400(make_site: t.Callable[..., Site]) -> None:
    """100 000 nested brackets: the parser's recursion limit is a 400, never a 500."""
    # A larger body limit, so the nesting itself (not the size) reaches the JSON parser.
    site = make_site("HS256", HEADLESSKEY_MAX_BODY=1024 * 1024, **NO_LOCKOUT)
    site.create_user("alice")
    client = Client(site)
    collect(
        (
            f"{path} {raw[:12]!r}x{len(raw)}",
            lambda path=path, raw=raw: assert_error(client.raw(path, raw), 400, "invalid_json"),
        )
        for path in PATHS
        for raw in NESTED
    )


def test_deeply_nested_json_under_the_default_limit(client: Client) -> None:
    collect(
        (
            path,
            lambda path=path: assert_error(
                client.raw(path, b"[" * 100_000), 413, "payload_too_large"
            ),
        )
        for path in PATHS
    )
    collect(
        (path, lambda path=path: assert_error(client.raw(path, b"[" * 60_000), 400, "invalid_json"))
        for path in PATHS
    )


# ---------------------------------------------------------------------------------------------
# no partial rows


def bad_bodies(endpoint: Endpoint) -> t.Iterator[tuple[str, t.Any]]:
    """Every bad body of the tests above, as (kind, payload) for ``Client.raw`` or ``json=``."""
    for raw in MALFORMED + NOT_AN_OBJECT:
        yield "raw", raw
    yield "raw", oversized(endpoint)
    yield "chunked", oversized(endpoint)
    yield "raw", b"[" * 60_000
    yield "json", {}
    for name in endpoint.fields:
        values = [*WRONG_TYPES, None] if name in endpoint.required else list(WRONG_TYPES)
        values += ["a" * 10_000]
        clean = endpoint.base.get(name, endpoint.defaults.get(name, "abc"))
        if name != "delivery":
            values += [clean + c for c in CONTROLS] + [c + clean for c in CONTROLS]
            values += [clean + "\ud800"]
        for value in values:
            yield "json", {**endpoint.base, name: value}
    yield "text/plain", json.dumps(endpoint.base).encode()


def send(client: Client, path: str, kind: str, payload: t.Any) -> requests.Response:
    if kind == "json":
        return client.raw(path, json.dumps(payload).encode())
    if kind == "chunked":
        return client.raw(path, chunks(payload))
    if kind == "text/plain":
        return client.raw(path, payload, "text/plain")
    return client.raw(path, payload)


def test_bad_registrations_leave_no_rows(s: Site) -> None:
    client = Client(s)
    endpoint = BY_PATH["/register"]
    answers = [
        (kind, payload, send(client, "/register", kind, payload))
        for kind, payload in bad_bodies(endpoint)
    ]
    accepted = [
        (kind, repr(p)[:120], r.status_code) for kind, p, r in answers if r.status_code < 400
    ]
    server_errors = [
        (kind, repr(p)[:120], r.status_code) for kind, p, r in answers if r.status_code >= 500
    ]
    with s.state.engine.connect() as conn:
        rows = [f"{login} <{email}>" for login, email in
                conn.exec_driver_sql("SELECT user_login, email FROM hk_users")]
    assert not server_errors and not accepted, {"5xx": server_errors, "accepted": accepted}
    assert s.scalar("SELECT count(*) FROM hk_users") == 1, rows
    # The endpoint itself works: the one valid body creates exactly one account.
    r = s.api.post("/register", json=endpoint.base)
    assert r.status_code == 201, r.text
    assert s.scalar("SELECT count(*) FROM hk_users") == 2


@pytest.mark.parametrize("path", ["/token", "/login"])
def test_bad_logins_leave_no_session(s: Site, path: str) -> None:
    client = Client(s)
    endpoint = BY_PATH[path]
    answers = [
        (kind, payload, send(client, path, kind, payload)) for kind, payload in bad_bodies(endpoint)
    ]
    accepted = [
        (kind, repr(p)[:120], r.status_code) for kind, p, r in answers if r.status_code < 400
    ]
    server_errors = [
        (kind, repr(p)[:120], r.status_code) for kind, p, r in answers if r.status_code >= 500
    ]
    assert not server_errors and not accepted, {"5xx": server_errors, "accepted": accepted}
    assert s.scalar("SELECT count(*) FROM hk_sessions") == 0
    assert s.scalar("SELECT count(*) FROM hk_refresh_tokens") == 0
    # ...and a correct login does create one, so the count above is meaningful.
    assert s.api.post(path, json=endpoint.base).status_code == 200
    assert s.scalar("SELECT count(*) FROM hk_sessions") == 1


def raw_post(site: Site, path: str, body: dict[str, t.Any],
             user_agent: bytes) -> tuple[int, dict[str, t.Any]]:
    """POST over a socket of its own (HTTP clients refuse control characters in a header), as
    a WSGI server that passes them on (Werkzeug's, for one) hands them to the app."""
    parts = urlsplit(site.api.url(path))
    assert parts.hostname is not None and parts.port is not None
    data = json.dumps(body).encode()
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as conn:
        conn.sendall(head + b"User-Agent: " + user_agent + b"\r\n\r\n" + data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    return int(status.split(b" ")[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_a_user_agent_with_control_characters_is_stored_without_them(s: Site) -> None:
    """A NUL in User-Agent went into the session and activity-log rows: on PostgreSQL, which
    stores no NUL in text, every login or refresh sending one was a 500."""
    agent = b"Mozilla/5.0\x00 (X11;\x01 Linux x86_64)"
    status, body = raw_post(s, "/token", {"username": "alice", "password": PASSWORD}, agent)
    assert status == 200, body
    status, body = raw_post(s, "/token/refresh", {"refresh_token": body["refresh_token"]}, agent)
    assert status == 200, body
    status, body = raw_post(s, "/token", {"username": "alice", "password": "wrong"}, agent)
    assert status == 401, body
    with s.state.engine.connect() as conn:
        stored = {row[0] for row in conn.execute(text(
            "SELECT user_agent FROM hk_sessions UNION SELECT user_agent FROM hk_audit"))}
    assert stored == {"Mozilla/5.0 (X11; Linux x86_64)"}, stored


# ---------------------------------------------------------------------------------------------
# garbage tokens


def token_cases(real: str) -> dict[str, str | bytes]:
    header, payload, signature = real.split(".")
    return {
        "empty": "",
        "x": "x",
        "two-segments": "a.b",
        "three-segments": "a.b.c",
        "truncated": real[:-5],
        "20kb": f"{header}.{payload}{'A' * 20_000}.{signature}",
        "non-ascii-latin1": "tökén.ñ.ü",
        "non-ascii-utf8": "токен.😀.签名".encode(),
        "spaces": "a b c",
        "four-segments": real + ".x",
    }


@pytest.mark.parametrize(
    "target",
    ["GET /me", "POST /token/validate", "POST /token/validate body", "POST /change-password"],
)
def test_garbage_tokens_are_401(site: Site, target: str) -> None:
    real = site.api.login()["token"]
    method, path, *in_body = target.split()

    def check(case: str, value: str | bytes) -> None:
        if in_body:  # the token in the body of /token/validate
            text = value.decode() if isinstance(value, bytes) else value
            assert_error(site.api.post(path, json={"token": text}), 401, "invalid_token")
            return
        auth = (b"Bearer " + value) if isinstance(value, bytes) else f"Bearer {value}"
        body = (
            {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
            if "change" in path
            else None
        )
        r = site.api.request(method, path, headers={"Authorization": auth}, json=body)
        answer = assert_error(r, 401)
        if case == "empty" and path != "/token/validate":
            assert answer["code"] in {"unauthorized", "invalid_token"}
        else:
            assert answer["code"] == "invalid_token"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")

    collect(
        (case, lambda case=case, value=value: check(case, value))
        for case, value in token_cases(real).items()
    )
    # The real token still works, and no garbage call changed the password.
    assert site.api.get("/me", token=real).status_code == 200
    assert site.api.login()["user"]["user_login"] == "alice"


# ---------------------------------------------------------------------------------------------
# routing


UNKNOWN_ROUTES = ["/nope", "/token/nope", "/token/", "/", "/users/1", "/me/", "/sessions/a/b"]
WRONG_METHODS = [
    ("GET", "/token", "POST"),
    ("DELETE", "/token", "POST"),
    ("PUT", "/me", "GET"),
    ("POST", "/me", "GET"),
    ("PATCH", "/register", "POST"),
    ("GET", "/change-password", "POST"),
    ("GET", "/sessions/abc", "DELETE"),
    ("DELETE", "/openapi.json", "GET"),
]


def test_unknown_route_under_the_prefix_is_json_404(s: Site) -> None:
    collect(
        (
            f"{method} {path}",
            lambda method=method, path=path: assert_error(
                s.api.request(method, path), 404, "rest_no_route"
            ),
        )
        for path in UNKNOWN_ROUTES
        for method in ("GET", "POST", "DELETE")
    )


def test_wrong_method_is_json_405(s: Site) -> None:
    def check(method: str, path: str, allowed: str) -> None:
        r = s.api.request(method, path)
        assert_error(r, 405, "method_not_allowed")
        assert allowed in {m.strip() for m in r.headers["Allow"].split(",")}, r.headers["Allow"]

    collect((f"{m} {p}", lambda m=m, p=p, a=a: check(m, p, a)) for m, p, a in WRONG_METHODS)


def test_routes_outside_the_prefix_stay_the_hosts(s: Site) -> None:
    for path in ("/nope", "/wp-json/other/v1/token", "/wp-json/headlesskey/v2/token"):
        r = requests.get(s.api.base + path, timeout=10)
        assert r.status_code == 404
        assert not r.headers.get("Content-Type", "").startswith("application/json"), path
        assert "rest_no_route" not in r.text
        assert "X-Content-Type-Options" not in r.headers  # the agent did not decorate it


# ---------------------------------------------------------------------------------------------
# CORS


def preflight(site: Site, origin: str, path: str = "/token") -> requests.Response:
    return site.api.request(
        "OPTIONS",
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_default_allows_any_origin_without_credentials(s: Site) -> None:
    for path in ("/token", "/me", "/change-password", "/sessions/abc"):
        r = preflight(s, "https://anything.example", path)
        assert r.status_code == 204, (path, r.status_code)
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in r.headers
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert r.content == b""
    # Actual responses (errors included) carry it too, so the frontend can read them.
    r = s.api.get("/me", headers={"Origin": "https://anything.example"})
    assert r.status_code == 401
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in r.headers


def test_preflight_needs_no_token_and_changes_nothing(s: Site) -> None:
    r = preflight(s, "https://anything.example", "/change-password")
    assert r.status_code == 204
    assert s.scalar("SELECT count(*) FROM hk_sessions") == 0


def test_cors_allow_list_is_exact(make_site: t.Callable[..., Site]) -> None:
    site = make_site("HS256", HEADLESSKEY_CORS=["https://app.example"], **NO_LOCKOUT)
    site.create_user("alice")
    r = preflight(site, "https://app.example")
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Origin" in {v.strip() for v in r.headers.get("Vary", "").split(",")}
    assert "Access-Control-Allow-Credentials" not in r.headers
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    ok = site.api.post(
        "/token",
        json={"username": "alice", "password": PASSWORD},
        headers={"Origin": "https://app.example"},
    )
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Origin" in {v.strip() for v in ok.headers.get("Vary", "").split(",")}

    for origin in (
        "https://app.example.evil.com",
        "http://app.example",
        "https://app.example:8443",
        "https://evil-app.example",
        "https://sub.app.example",
        "null",
        "https://app.example/",
        "https://app.example, https://evil.example",
    ):
        r = preflight(site, origin)
        assert "Access-Control-Allow-Origin" not in r.headers, origin
        assert "Access-Control-Allow-Methods" not in r.headers, origin
        assert "Access-Control-Allow-Credentials" not in r.headers, origin
        # The answer depends on Origin, so caches must key on it.
        assert "Origin" in {v.strip() for v in r.headers.get("Vary", "").split(",")}, origin
        actual = site.api.get("/me", headers={"Origin": origin})
        assert "Access-Control-Allow-Origin" not in actual.headers, origin


def test_cors_allow_list_varies_on_origin_without_one(make_site: t.Callable[..., Site]) -> None:
    """An answer to a request without Origin is keyed on Origin too: a cache that kept the
    JWKS fetched by a server must not serve it to a browser's cross-origin fetch (nor the
    reverse)."""
    site = make_site("HS256", HEADLESSKEY_CORS=["https://app.example"], **NO_LOCKOUT)
    for r in (site.api.get("/.well-known/jwks.json"), site.api.get("/openapi.json")):
        assert r.status_code == 200
        assert "Access-Control-Allow-Origin" not in r.headers
        assert "Origin" in {v.strip() for v in r.headers.get("Vary", "").split(",")}
    star = make_site("HS256", HEADLESSKEY_CORS=True, **NO_LOCKOUT)
    r = star.api.get("/.well-known/jwks.json")
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Origin" not in r.headers.get("Vary", "")


def test_cors_allow_list_is_matched_as_browsers_send_origins(
        make_site: t.Callable[..., Site]) -> None:
    """An origin configured with its scheme's default port, in capitals or with an
    international host is matched as a browser writes it in Origin (no default port, lowercase,
    punycode); the forms a browser never sends are not allowed."""
    site = make_site("HS256", HEADLESSKEY_CORS=["https://App.Example:443", "http://shop.example:80",
                                                "https://bücher.example", "http://[::1]:80",
                                                "https://admin.example:8443"], **NO_LOCKOUT)
    for origin in ("https://app.example", "http://shop.example", "https://xn--bcher-kva.example",
                   "http://[::1]", "https://admin.example:8443"):
        for r in (preflight(site, origin), site.api.get("/me", headers={"Origin": origin})):
            assert r.headers.get("Access-Control-Allow-Origin") == origin, (origin, r.status_code)
            assert "Origin" in {v.strip() for v in r.headers.get("Vary", "").split(",")}
    for origin in ("https://app.example:443", "https://App.Example", "https://bücher.example",
                   "https://admin.example", "https://shop.example"):
        r = preflight(site, origin)
        assert "Access-Control-Allow-Origin" not in r.headers, origin


@pytest.mark.parametrize("cors", [True, ["https://app.example"]])
def test_cors_lets_the_frontend_read_retry_after(make_site: t.Callable[..., Site],
                                                 cors: t.Any) -> None:
    """A frontend on another origin can read Retry-After of a 429 (a browser shows a script
    only the safelisted headers, and Retry-After is not one), as the documentation tells it to;
    a preflight exposes nothing, a request from another origin is told nothing."""
    site = make_site("HS256", HEADLESSKEY_CORS=cors, HEADLESSKEY_LOCKOUT_MAX_FAILURES=1)
    site.create_user("alice")
    origin = {"Origin": "https://app.example"}
    wrong = site.api.post("/token", json={"username": "alice", "password": "wrong"},
                          headers=origin)
    assert wrong.status_code == 401
    locked = site.api.post("/token", json={"username": "alice", "password": PASSWORD},
                           headers=origin)
    assert locked.status_code == 429, locked.text
    assert int(locked.headers["Retry-After"]) > 0
    for r in (wrong, locked):
        exposed = {h.strip().lower()
                   for h in r.headers.get("Access-Control-Expose-Headers", "").split(",")}
        assert {"retry-after", "www-authenticate"} <= exposed, dict(r.headers)
    assert "Access-Control-Expose-Headers" not in preflight(site, "https://app.example").headers
    if cors is not True:
        other = site.api.get("/me", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Expose-Headers" not in other.headers


def test_cors_disabled_sends_no_cors_headers(make_site: t.Callable[..., Site]) -> None:
    site = make_site("HS256", HEADLESSKEY_CORS=False, **NO_LOCKOUT)
    site.create_user("alice")
    responses = [
        preflight(site, "https://app.example"),
        site.api.post(
            "/token",
            json={"username": "alice", "password": PASSWORD},
            headers={"Origin": "https://app.example"},
        ),
        site.api.get("/me", headers={"Origin": "https://app.example"}),
    ]
    for r in responses:
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], dict(
            r.headers
        )
    assert responses[1].status_code == 200


# ---------------------------------------------------------------------------------------------
# security headers


def test_every_api_response_has_nosniff_and_no_store(s: Site) -> None:
    client = Client(s)
    pair = s.api.login()
    responses = {
        "200 token": s.api.post("/token", json={"username": "alice", "password": PASSWORD}),
        "200 me": s.api.get("/me", token=pair["token"]),
        "200 sessions": s.api.get("/sessions", token=pair["token"]),
        "200 openapi": s.api.get("/openapi.json"),
        "200 refresh": s.api.post("/token/refresh", json={"refresh_token": pair["refresh_token"]}),
        "201 register": s.api.post("/register", json=BY_PATH["/register"].base),
        "204 preflight": preflight(s, "https://app.example"),
        "400": client.raw("/token", b"{"),
        "401": s.api.get("/me"),
        "404 route": s.api.get("/nope"),
        "404 session": s.api.delete("/sessions/none", token=pair["token"]),
        "405": s.api.get("/token"),
        "413": client.raw("/token", oversized(BY_PATH["/token"])),
        "415": client.raw("/token", b"x=1", "text/plain"),
    }
    for label, r in responses.items():
        assert str(r.status_code) == label.split()[0], (label, r.status_code, r.text[:200])
        assert r.headers.get("X-Content-Type-Options") == "nosniff", label
        assert r.headers.get("Cache-Control") == "no-store", label
    # The JWKS (outside the prefix) is public and cacheable, but still nosniff.
    jwks = s.api.get("/.well-known/jwks.json")
    assert jwks.headers.get("X-Content-Type-Options") == "nosniff"
