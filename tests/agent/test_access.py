"""Access rules, ``@hk.require`` on a site's own routes, filters and signals, over real HTTP."""

from __future__ import annotations

import base64
import os
import threading
import time
import typing as t
from pathlib import Path

import jwt
import pytest
import requests
from flask import Flask
from flask import request
from werkzeug.serving import make_server

import agent
from agent import HeadlessKey
from agent import signals
from agent.errors import ConfigError
from agent.events import Event
from tests.conftest import FAST_HASH
from tests.conftest import PASSWORD
from tests.conftest import SERVER_POLL
from tests.conftest import Api
from tests.conftest import Clock
from tests.conftest import Site
from tests.conftest import free_port
from tests.conftest import fresh_schema
from tests.conftest import schema_migrated

NEW_USER = {"username": "dave", "email": "dave@example.com", "password": PASSWORD}


def claims_of(token: str) -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], jwt.decode(token, options={"verify_signature": False}))


# --- a site of our own, with its own routes ---------------------------------------------------


class OwnSite:
    """A Flask app with ``hk = HeadlessKey(app)``: add routes and filters, then :meth:`serve`."""

    def __init__(self, tmp_path: Path, index: int, settings: dict[str, t.Any]) -> None:
        self.port = free_port()
        db_url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
        if db_url:
            # Schemas 50+ so they never meet make_site's (0, 1, ...) in the same test.
            db_url = fresh_schema(db_url, 50 + index)
        else:
            db_url = f"sqlite:///{tmp_path / f'own{index}.db'}"
        self.app = Flask(f"own{index}", instance_path=str(tmp_path / f"own-instance{index}"))
        self.app.config.update(FAST_HASH)
        self.app.config.update(
            {
                "HEADLESSKEY_SECRET_KEY": f"own-secret-{index}-" + "y" * 40,
                "HEADLESSKEY_ALGORITHM": "HS256",
                "HEADLESSKEY_SITE_URL": f"http://127.0.0.1:{self.port}",
                "HEADLESSKEY_DATABASE_URL": db_url,
                "HEADLESSKEY_MAIL_BACKEND": "null",
            }
        )
        self.app.config.update(settings)
        self.clock = Clock()
        self.hk = HeadlessKey(self.app, clock=self.clock)
        schema_migrated(self.app.config["HEADLESSKEY_DATABASE_URL"])
        self.server: t.Any = None
        self.thread: threading.Thread | None = None

    def serve(self) -> Site:
        self.server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": SERVER_POLL}, daemon=True)
        self.thread.start()
        prefix = self.app.extensions["headlesskey"].settings.prefix
        return Site(self.app, Api(f"http://127.0.0.1:{self.port}", prefix), self.clock, None)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            assert self.thread is not None
            self.thread.join(5)
        state = self.app.extensions["headlesskey"]
        state.background.shutdown()  # its tasks may still queue mail
        state.mailer.shutdown()
        state.engine.dispose()


@pytest.fixture
def own_site(tmp_path: Path) -> t.Iterator[t.Callable[..., OwnSite]]:
    made: list[OwnSite] = []

    def factory(**settings: t.Any) -> OwnSite:
        site = OwnSite(tmp_path, len(made), settings)
        made.append(site)
        return site

    yield factory
    for site in made:
        site.close()


def host_get(site: Site, path: str, **kw: t.Any) -> requests.Response:
    """GET a route of the host app (outside the API prefix)."""
    headers = dict(kw.pop("headers", None) or {})
    token = kw.pop("token", None)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.get(site.api.base + path, headers=headers, timeout=30, **kw)


# --- HEADLESSKEY_ACCESS ---------------------------------------------------------------------


def test_register_for_administrators_only(make_site: t.Callable[..., Site]) -> None:
    s = make_site("HS256", HEADLESSKEY_ACCESS={"register": ["administrator"]})
    s.create_user("alice")
    s.create_user("root", roles=["administrator"])
    anonymous = s.api.post("/register", json=NEW_USER)
    assert anonymous.status_code == 401
    assert anonymous.json()["code"] == "unauthorized"
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    subscriber = s.api.post("/register", json=NEW_USER, token=s.api.login("alice")["token"])
    assert subscriber.status_code == 403
    assert subscriber.json()["code"] == "forbidden"
    assert s.scalar("SELECT count(*) FROM hk_users WHERE user_login = 'dave'") == 0
    admin = s.api.post("/register", json=NEW_USER, token=s.api.login("root")["token"])
    assert admin.status_code == 201, admin.text
    assert s.scalar("SELECT count(*) FROM hk_users WHERE user_login = 'dave'") == 1
    # Other endpoints keep their defaults.
    assert s.api.post("/token", json={"username": "dave", "password": PASSWORD}).status_code == 200


def test_public_me_still_needs_a_caller(make_site: t.Callable[..., Site]) -> None:
    s = make_site("HS256", HEADLESSKEY_ACCESS={"me": "public"})
    s.create_user("alice")
    r = s.api.get("/me")
    assert r.status_code == 401
    assert r.json()["code"] == "unauthorized"
    assert s.api.get("/me", token=s.api.login()["token"]).status_code == 200


def test_unknown_endpoint_in_access_stops_start_up(make_site: t.Callable[..., Site]) -> None:
    with pytest.raises(ConfigError, match="HEADLESSKEY_ACCESS"):
        make_site("HS256", HEADLESSKEY_ACCESS={"no_such_endpoint": "public"})


@pytest.mark.parametrize("rule", ["public", "authenticated"])
def test_the_admin_api_is_only_ever_for_named_roles(make_site: t.Callable[..., Site],
                                                    rule: str) -> None:
    """Public, the admin API handed anyone the activity log and the power to disable accounts."""
    with pytest.raises(ConfigError, match="HEADLESSKEY_ACCESS: admin must be a list of roles"):
        make_site("HS256", HEADLESSKEY_ACCESS={"admin": rule})


@pytest.mark.parametrize(("role", "access"), [("administrator", {}),
                                             ("editor", {"admin": ["editor"]})])
def test_new_accounts_never_get_a_role_of_the_admin_api(
        make_site: t.Callable[..., Site], role: str, access: dict[str, t.Any]) -> None:
    """With open registration, anyone would sign up as an administrator."""
    with pytest.raises(ConfigError, match="HEADLESSKEY_DEFAULT_ROLE: .* may use the admin API"):
        make_site("HS256", HEADLESSKEY_DEFAULT_ROLE=role, HEADLESSKEY_ACCESS=access)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/logs"),
        ("POST", "/admin/users/1/unlock"),
        ("POST", "/admin/users/1/disable"),
        ("POST", "/admin/users/1/enable"),
        ("GET", "/admin/users/1/sessions"),
        ("DELETE", "/admin/sessions/abc"),
    ],
)
def test_admin_endpoints_need_an_administrator(
    make_site: t.Callable[..., Site], method: str, path: str
) -> None:
    s = make_site("HS256")
    s.create_user("alice")
    s.create_user("root", roles=["administrator"])
    anonymous = s.api.request(method, path)
    assert anonymous.status_code == 401
    assert anonymous.json()["code"] == "unauthorized"
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    subscriber = s.api.request(method, path, token=s.api.login("alice")["token"])
    assert subscriber.status_code == 403
    assert subscriber.json() == {
        "code": "forbidden",
        "message": "You are not allowed to do this.",
        "data": {"status": 403},
    }
    admin = s.api.request(method, path, token=s.api.login("root")["token"])
    assert admin.status_code in (200, 404), admin.text  # 404: no session "abc"
    assert admin.status_code == (404 if path.endswith("/abc") else 200)


# --- @hk.require on the site's own routes ----------------------------------------------------


@pytest.fixture
def guarded(own_site: t.Callable[..., OwnSite]) -> Site:
    """A site with its own routes: /api/profile (any user), /api/reports (editors), /open."""
    own = own_site()
    hk = own.hk

    @own.app.get("/api/profile")
    @hk.require()
    def profile() -> t.Any:
        identity = agent.current_identity
        assert identity
        return {
            "user_id": identity.user_id,
            "user_login": identity.user_login,
            "roles": list(identity.roles),
            "session_id": identity.session_id,
            "claims": identity.claims,
        }

    @own.app.get("/api/reports")
    @hk.require(roles=["editor"])
    def reports() -> t.Any:
        assert agent.current_identity
        return {"reports": [], "user_id": agent.current_identity.user_id}

    @own.app.get("/open")
    def open_route() -> t.Any:
        return {
            "authorization": request.headers.get("Authorization"),
            # current_identity is a proxy: its truth value is the caller's (None: no caller).
            "identity": bool(agent.current_identity),
        }

    site = own.serve()
    assert site.create_user("alice") == 1
    assert site.create_user("eddie", roles=["editor"]) == 2
    return site


def test_require_needs_a_token(guarded: Site) -> None:
    r = host_get(guarded, "/api/profile")
    assert r.status_code == 401
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.json()["code"] == "unauthorized"
    bad = host_get(guarded, "/api/profile", token="not.a.token")
    assert bad.status_code == 401
    assert bad.json()["code"] == "invalid_token"
    assert bad.headers["WWW-Authenticate"].startswith("Bearer")
    pair = guarded.api.login("alice")
    ok = host_get(guarded, "/api/profile", token=pair["token"])
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["user_id"] == 1
    assert body["user_login"] == "alice"
    assert body["roles"] == ["subscriber"]
    assert body["session_id"] == pair["sid"]
    assert body["claims"]["sub"] == "1"
    assert body["claims"]["jti"] == pair["jti"]
    assert body["claims"] == claims_of(pair["token"])
    # A revoked session's token no longer opens the route.
    assert guarded.api.post("/token/revoke", token=pair["token"]).status_code == 200
    assert host_get(guarded, "/api/profile", token=pair["token"]).status_code == 401


def test_require_roles(guarded: Site) -> None:
    subscriber = host_get(guarded, "/api/reports", token=guarded.api.login("alice")["token"])
    assert subscriber.status_code == 403
    assert subscriber.headers["Content-Type"].startswith("application/json")
    assert subscriber.json()["code"] == "forbidden"
    editor = host_get(guarded, "/api/reports", token=guarded.api.login("eddie")["token"])
    assert editor.status_code == 200, editor.text
    assert editor.json() == {"reports": [], "user_id": 2}
    assert host_get(guarded, "/api/reports").status_code == 401


def test_undecorated_routes_get_foreign_authorization_untouched(guarded: Site) -> None:
    basic = "Basic " + base64.b64encode(b"alice:secret").decode()
    foreign = jwt.encode({"sub": "42", "iss": "https://elsewhere.example"}, "x" * 32, "HS256")
    ours = guarded.api.login("alice")["token"]
    for value in (basic, f"Bearer {foreign}", f"Bearer {ours}", "Bearer garbage"):
        r = requests.get(guarded.api.base + "/open", headers={"Authorization": value}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"authorization": value, "identity": False}
    plain = requests.get(guarded.api.base + "/open", timeout=30)
    assert plain.json() == {"authorization": None, "identity": False}


# --- filters --------------------------------------------------------------------------------


def test_token_claims_filter_adds_claims_but_cannot_replace_registered_ones(
    own_site: t.Callable[..., OwnSite],
) -> None:
    own = own_site()

    @own.hk.filter("token_claims")
    def add_tenant(claims: dict[str, t.Any], user: t.Any) -> dict[str, t.Any]:
        return {**claims, "tenant": "acme"}

    @own.hk.filter("token_claims")
    def try_to_escalate(claims: dict[str, t.Any], user: t.Any) -> dict[str, t.Any]:
        return {
            **claims,
            "sub": "999",
            "roles": ["administrator"],
            "iss": "https://evil.example",
            "sid": "other",
        }

    site = own.serve()
    site.create_user("alice")
    body = site.api.login()
    claims = claims_of(body["token"])
    assert claims["tenant"] == "acme"
    assert claims["sub"] == "1"
    assert claims["roles"] == ["subscriber"]
    assert claims["iss"] == site.state.settings.issuer
    assert claims["sid"] == body["sid"]
    assert site.api.get("/me", token=body["token"]).json()["ID"] == 1
    # A refreshed token carries the extra claim as well.
    refreshed = site.api.post("/token/refresh", json={"refresh_token": body["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text
    again = claims_of(refreshed.json()["token"])
    assert (again["tenant"], again["sub"], again["roles"]) == ("acme", "1", ["subscriber"])


@pytest.mark.parametrize("audience", [None, "https://api.example"])
def test_token_claims_filter_cannot_set_the_audience(
    own_site: t.Callable[..., OwnSite], audience: str | None,
) -> None:
    """``aud`` is the configured one, or none at all: an ``aud`` from a filter never reaches a
    token (with none configured, it made every token this site minted invalid here)."""
    own = own_site(HEADLESSKEY_AUDIENCE=audience) if audience else own_site()

    @own.hk.filter("token_claims")
    def add_audience(claims: dict[str, t.Any], user: t.Any) -> dict[str, t.Any]:
        return {**claims, "aud": "https://elsewhere.example", "tenant": "acme"}

    site = own.serve()
    site.create_user("alice")
    body = site.api.login()
    claims = claims_of(body["token"])
    assert claims.get("aud") == audience
    assert claims["tenant"] == "acme"
    assert site.api.get("/me", token=body["token"]).status_code == 200
    refreshed = site.api.post("/token/refresh", json={"refresh_token": body["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text
    assert site.api.get("/me", token=refreshed.json()["token"]).status_code == 200


def test_login_response_filter(own_site: t.Callable[..., OwnSite]) -> None:
    own = own_site()

    @own.hk.filter("login_response")
    def welcome(body: dict[str, t.Any], user: t.Any) -> dict[str, t.Any]:
        return {**body, "welcome": f"Hello {user.display_name}"}

    site = own.serve()
    site.create_user("alice")
    token = site.api.post("/token", json={"username": "alice", "password": PASSWORD})
    assert token.status_code == 200
    assert token.json()["welcome"] == "Hello alice"
    assert token.json()["token"]
    profile = site.api.post("/login", json={"username": "alice", "password": PASSWORD})
    assert profile.json()["welcome"] == "Hello alice"


def test_user_payload_filter(own_site: t.Callable[..., OwnSite]) -> None:
    own = own_site()

    @own.hk.filter("user_payload")
    def avatar(payload: dict[str, t.Any], user: t.Any) -> dict[str, t.Any]:
        return {**payload, "avatar": f"https://avatars.example/{user.id}.png"}

    site = own.serve()
    site.create_user("alice")
    body = site.api.login()
    assert body["user"]["avatar"] == "https://avatars.example/1.png"
    me = site.api.get("/me", token=body["token"])
    assert me.status_code == 200
    assert me.json()["avatar"] == "https://avatars.example/1.png"
    assert me.json()["user_login"] == "alice"


def test_allow_registration_filter(own_site: t.Callable[..., OwnSite]) -> None:
    own = own_site()
    seen: list[dict[str, t.Any]] = []

    @own.hk.filter("allow_registration")
    def company_only(allowed: bool, fields: dict[str, t.Any]) -> bool:
        seen.append(fields)
        return allowed and fields["email"].endswith("@acme.example")

    site = own.serve()
    r = site.api.post("/register", json=NEW_USER)
    assert r.status_code == 403
    assert r.json()["code"] == "registration_refused"
    assert site.scalar("SELECT count(*) FROM hk_users") == 0
    assert seen == [{"username": "dave", "email": "dave@example.com", "display_name": None}]
    ok = site.api.post("/register", json={**NEW_USER, "email": "dave@acme.example"})
    assert ok.status_code == 201, ok.text
    assert site.scalar("SELECT count(*) FROM hk_users") == 1


def test_password_policy_filter(own_site: t.Callable[..., OwnSite]) -> None:
    own = own_site()
    message = "Do not use the company's name in a password."

    @own.hk.filter("password_policy")
    def no_company_name(problems: list[str], password: str, context: dict[str, t.Any]) -> list[str]:
        if "acme" in password.casefold():
            return [*problems, message]
        return problems

    site = own.serve()
    r = site.api.post("/register", json={**NEW_USER, "password": "ACME rockets launch at dawn"})
    assert r.status_code == 400
    assert r.json()["code"] == "weak_password"
    assert message in r.json()["data"]["fields"]["password"]
    assert site.scalar("SELECT count(*) FROM hk_users") == 0
    assert site.api.post("/register", json=NEW_USER).status_code == 201


# --- signals --------------------------------------------------------------------------------


class Receiver:
    """Collects the events a signal sends for one app."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, sender: t.Any, event: Event, **_: t.Any) -> None:
        if sender is self.app:
            with self.lock:
                self.events.append(event)

    def names(self) -> list[str]:
        with self.lock:
            return [e.name for e in self.events]


@pytest.fixture
def receivers(make_site: t.Callable[..., Site]) -> t.Iterator[tuple[Site, Receiver, Receiver]]:
    s = make_site("HS256")
    s.create_user("alice")
    on_login = Receiver(s.app)
    on_any = Receiver(s.app)
    signals.login_succeeded.connect(on_login, weak=False)
    signals.any_event.connect(on_any, weak=False)
    try:
        yield s, on_login, on_any
    finally:
        signals.login_succeeded.disconnect(on_login)
        signals.any_event.disconnect(on_any)


def test_signals_are_sent_for_a_login(receivers: tuple[Site, Receiver, Receiver]) -> None:
    s, on_login, on_any = receivers
    body = s.api.login(headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) "
                                "Gecko/20100101 Firefox/128.0"})
    (event,) = on_login.events
    assert isinstance(event, Event)
    assert event.name == "login.succeeded"
    assert event.outcome == "success"
    assert event.user_id == 1
    assert event.ip == "127.0.0.1"
    assert event.session_id == body["sid"]
    assert event.device == "Firefox 128 on Linux"
    assert on_any.names() == ["login.succeeded"]
    assert on_any.events[0] == event


def test_no_success_signal_for_a_failed_login(receivers: tuple[Site, Receiver, Receiver]) -> None:
    s, on_login, on_any = receivers
    r = s.api.post("/token", json={"username": "alice", "password": "wrong password here"})
    assert r.status_code == 401
    assert on_login.events == []
    assert on_any.names() == ["login.failed"]
    assert on_any.events[0].outcome == "failure"
    assert on_any.events[0].user_id == 1


def broken_receiver(sender: t.Any, event: Event, **_: t.Any) -> None:
    raise RuntimeError("the receiver is broken")


def test_a_receiver_that_raises_neither_fails_the_login_nor_stops_the_others(
    receivers: tuple[Site, Receiver, Receiver], caplog: pytest.LogCaptureFixture,
) -> None:
    """The login is committed when its signals are sent: a broken receiver is logged, the
    login still answers 200 with its token, and every other receiver still gets the event."""
    s, on_login, on_any = receivers
    signals.login_succeeded.connect(broken_receiver, weak=False)
    signals.any_event.connect(broken_receiver, weak=False)
    try:
        r = s.api.post("/token", json={"username": "alice", "password": PASSWORD})
    finally:
        signals.login_succeeded.disconnect(broken_receiver)
        signals.any_event.disconnect(broken_receiver)
    assert r.status_code == 200, r.text
    body = r.json()
    assert claims_of(body["token"])["sid"] == body["sid"]
    assert s.scalar("SELECT count(*) FROM hk_sessions WHERE id = :sid AND user_id = 1",
                    sid=body["sid"]) == 1
    assert [e.name for e in on_login.events] == ["login.succeeded"]
    assert on_any.names() == ["login.succeeded"]
    # The token works: the session is the login's.
    assert s.api.get("/me", token=body["token"]).status_code == 200
    failed = [rec for rec in caplog.records if rec.levelname == "ERROR"
              and "broken_receiver" in rec.getMessage()]
    assert sorted(rec.getMessage().split(" of signal ")[1].split(" ")[0] for rec in failed) == [
        "any-event", "login.succeeded"]
    assert all(rec.exc_info and "the receiver is broken" in str(rec.exc_info[1])
               for rec in failed)
    assert body["token"] not in caplog.text


def _refuse_login_rows(s: Site, refuse: bool) -> None:
    """Make the database refuse (or accept again) audit rows of ``login.succeeded``."""
    postgres = bool(os.environ.get("HEADLESSKEY_TEST_DATABASE_URL"))
    with s.state.engine.begin() as conn:
        if not refuse:
            conn.exec_driver_sql(
                "DROP TRIGGER hk_test_refuse ON hk_audit" if postgres
                else "DROP TRIGGER hk_test_refuse"
            )
        elif postgres:
            conn.exec_driver_sql(
                "CREATE FUNCTION hk_test_refuse() RETURNS trigger AS $$ BEGIN "
                "IF NEW.event = 'login.succeeded' THEN RAISE EXCEPTION 'refused by the test'; "
                "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER hk_test_refuse BEFORE INSERT ON hk_audit FOR EACH ROW "
                "EXECUTE FUNCTION hk_test_refuse()"
            )
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER hk_test_refuse BEFORE INSERT ON hk_audit "
                "WHEN NEW.event = 'login.succeeded' "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )


def test_no_signal_for_a_rolled_back_transaction(
    receivers: tuple[Site, Receiver, Receiver],
) -> None:
    """The login's transaction fails at commit: no session, no row, and no signal."""
    s, on_login, on_any = receivers
    _refuse_login_rows(s, True)
    r = s.api.post("/token", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 500
    assert "token" not in r.text
    assert s.scalar("SELECT count(*) FROM hk_sessions") == 0
    assert on_login.events == []
    assert on_any.events == []
    _refuse_login_rows(s, False)
    assert s.api.post("/token", json={"username": "alice", "password": PASSWORD}).status_code == 200
    assert [e.name for e in on_login.events] == ["login.succeeded"]
    assert on_any.names() == ["login.succeeded"]


def test_an_account_with_no_password_costs_a_login_a_whole_hash(
    make_site: t.Callable[..., Site],
) -> None:
    """An account made by SSO has no password (its hash field holds no argon2 hash): a login to
    it is refused as a wrong password is, after the same argon2 work, so its timing does not
    tell which logins exist as federated accounts."""
    import statistics
    import time

    from sqlalchemy import text

    # A hash of tens of milliseconds, so skipping it would stand far out of the noise.
    s = make_site("HS256", HEADLESSKEY_ARGON2_TIME_COST=2, HEADLESSKEY_ARGON2_MEMORY_COST=19456,
                  HEADLESSKEY_LOCKOUT_MAX_FAILURES=100, HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES=1000)
    s.create_user("alice")
    s.create_user("fed")
    with s.state.engine.begin() as conn:
        conn.execute(text("UPDATE hk_users SET password_hash = '!sso-only' "
                          "WHERE user_login = 'fed'"))

    def timed(username: str) -> float:
        started = time.perf_counter()
        r = s.api.post("/token", json={"username": username, "password": "not the password"})
        elapsed = time.perf_counter() - started
        assert r.status_code == 401 and r.json()["code"] == "invalid_credentials", r.text
        return elapsed

    wrong, no_password = [], []
    for _ in range(5):
        wrong.append(timed("alice"))
        no_password.append(timed("fed"))
    # Skipping the hash would make the second group cost a small fraction of the first.
    assert statistics.median(no_password) > statistics.median(wrong) / 2, (wrong, no_password)


@pytest.mark.parametrize("meanwhile", ["rehash", "new_password"])
def test_a_rehash_by_another_login_during_the_hash_is_no_change(
    make_site: t.Callable[..., Site], meanwhile: str,
) -> None:
    """While a login checks the password against the hash it read, another login of the same
    account stores the same password at new parameters (a rehash): the first login still gets
    its token (it was refused as if the password had changed). A new password stored meanwhile
    still refuses it."""
    from argon2 import PasswordHasher
    from sqlalchemy import text

    s = make_site("HS256")
    s.create_user("alice")
    # Stored at dearer, older parameters: its check takes long enough to write in between.
    slow = PasswordHasher(time_cost=8, memory_cost=65536, parallelism=1)
    started = time.monotonic()
    old = slow.hash(PASSWORD)
    hash_time = time.monotonic() - started
    assert hash_time > 0.1, hash_time
    written = s.state.hasher.hash(PASSWORD if meanwhile == "rehash" else "a new one entirely")
    with s.state.engine.begin() as conn:
        conn.execute(text("UPDATE hk_users SET password_hash = :h WHERE user_login = 'alice'"),
                     {"h": old})

    def write_meanwhile() -> None:
        time.sleep(hash_time / 3)
        with s.state.engine.begin() as conn:
            conn.execute(text("UPDATE hk_users SET password_hash = :h"
                              " WHERE user_login = 'alice'"), {"h": written})

    writer = threading.Thread(target=write_meanwhile)
    writer.start()
    r = s.api.post("/token", json={"username": "alice", "password": PASSWORD})
    writer.join(10)
    if meanwhile == "rehash":
        assert r.status_code == 200, r.text
        assert s.api.post("/token/validate", token=r.json()["token"]).status_code == 200
        # The rehash stored meanwhile stands (not overwritten by this login's own).
        assert s.scalar("SELECT password_hash FROM hk_users WHERE user_login = 'alice'") == written
    else:
        assert r.status_code == 401, r.text
        assert s.scalar("SELECT count(*) FROM hk_sessions") == 0


def test_a_login_rehashes_a_password_stored_at_older_parameters(
    make_site: t.Callable[..., Site],
) -> None:
    """Raising the argon2 cost upgrades each stored hash at its owner's next login."""
    from argon2 import PasswordHasher
    from sqlalchemy import text

    s = make_site("HS256", HEADLESSKEY_ARGON2_TIME_COST=2)
    s.create_user("alice")
    old = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    with s.state.engine.begin() as conn:
        conn.execute(text("UPDATE hk_users SET password_hash = :h WHERE user_login = 'alice'"),
                     {"h": old})
    assert s.api.post("/token", json={"username": "alice", "password": PASSWORD}).status_code == 200
    stored = s.scalar("SELECT password_hash FROM hk_users WHERE user_login = 'alice'")
    assert stored != old and ",t=2," in stored
    assert PasswordHasher().verify(stored, PASSWORD)
    assert s.api.post("/token", json={"username": "alice", "password": PASSWORD}).status_code == 200
    assert s.scalar("SELECT password_hash FROM hk_users WHERE user_login = 'alice'") == stored


# --- roles: changed by an administrator, in force from the next request ----------------------


def put_roles(site: Site, user_id: int, body: t.Any, token: str) -> requests.Response:
    return site.api.request("PUT", f"/admin/users/{user_id}/roles", json=body, token=token)


def test_roles_an_administrator_changes_hold_from_the_next_request(guarded: Site) -> None:
    """A role given or taken away counts from the account's next request, with the token it
    already holds: a demoted administrator or editor loses access at once, not when the token
    expires. The change is logged with who made it, and later tokens carry the new roles."""
    s = guarded
    assert s.create_user("root", roles=["administrator"]) == 3
    root = s.api.login("root")["token"]
    alice = s.api.login("alice")
    eddie = s.api.login("eddie")
    received: list[Event] = []

    def receiver(_sender: t.Any, event: Event) -> None:
        received.append(event)

    signals.user_roles_changed.connect(receiver)
    try:
        assert host_get(s, "/api/reports", token=alice["token"]).status_code == 403
        assert s.api.get("/admin/logs", token=alice["token"]).status_code == 403

        r = put_roles(s, 1, {"roles": ["editor", "administrator", "editor"]}, root)
        assert r.status_code == 200, r.text
        assert r.json() == {"success": True, "code": "roles_updated", "message": "Roles updated.",
                            "roles": ["editor", "administrator"]}
        # The same token, issued when alice was a subscriber, now opens both.
        assert host_get(s, "/api/reports", token=alice["token"]).status_code == 200
        assert s.api.get("/admin/logs", token=alice["token"]).status_code == 200
        profile = host_get(s, "/api/profile", token=alice["token"]).json()
        assert profile["roles"] == ["editor", "administrator"]
        assert profile["claims"]["roles"] == ["subscriber"]  # what the token was issued with

        # Eddie is demoted: his editor token stops opening the editors' route at once.
        assert host_get(s, "/api/reports", token=eddie["token"]).status_code == 200
        assert put_roles(s, 2, {"roles": []}, root).status_code == 200
        assert host_get(s, "/api/reports", token=eddie["token"]).status_code == 403
        assert host_get(s, "/api/profile", token=eddie["token"]).status_code == 200
        assert s.api.get("/me", token=eddie["token"]).json()["roles"] == []

        # An administrator who takes the role from itself loses the admin API on its next call.
        assert put_roles(s, 3, {"roles": ["subscriber"]}, root).status_code == 200
        assert s.api.get("/admin/logs", token=root).status_code == 403
    finally:
        signals.user_roles_changed.disconnect(receiver)

    # Giving the roles an account already has changes and logs nothing.
    assert put_roles(s, 1, {"roles": ["editor", "administrator"]}, alice["token"]).status_code \
        == 200
    logs = s.api.get("/admin/logs", params={"event": "user.roles_changed"},
                     token=alice["token"]).json()["events"]
    assert [(e["user_id"], e["details"]) for e in logs] == [
        (3, {"by": 3, "before": ["administrator"], "after": ["subscriber"]}),
        (2, {"by": 3, "before": ["editor"], "after": []}),
        (1, {"by": 3, "before": ["subscriber"], "after": ["editor", "administrator"]}),
    ]
    assert [(e.user_id, e.details["after"]) for e in received] == [
        (1, ["editor", "administrator"]), (2, []), (3, ["subscriber"])]
    fresh = s.api.login("alice")
    assert claims_of(fresh["token"])["roles"] == ["editor", "administrator"]
    assert fresh["user"]["roles"] == ["editor", "administrator"]


@pytest.mark.parametrize("body", [
    {},
    {"roles": "editor"},
    {"roles": None},
    {"roles": {"editor": True}},
    {"roles": ["editor", 7]},
    {"roles": [["editor"]]},
    {"roles": [""]},
    {"roles": [" editor"]},
    {"roles": ["edi\ntor"]},
    {"roles": ["e" * 65]},
    {"roles": [f"role{i}" for i in range(33)]},
])
def test_roles_refused_change_nothing(guarded: Site, body: dict[str, t.Any]) -> None:
    s = guarded
    s.create_user("root", roles=["administrator"])
    root = s.api.login("root")["token"]
    r = put_roles(s, 2, body, root)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_request"
    assert list(r.json()["data"]["fields"]) == ["roles"]
    assert s.scalar("SELECT roles FROM hk_users WHERE id = 2") in ('["editor"]', ["editor"])
    assert s.scalar("SELECT count(*) FROM hk_audit WHERE event = 'user.roles_changed'") == 0


def test_roles_of_an_unknown_user_or_by_a_non_administrator(guarded: Site) -> None:
    s = guarded
    s.create_user("root", roles=["administrator"])
    root = s.api.login("root")["token"]
    missing = put_roles(s, 999, {"roles": ["editor"]}, root)
    assert missing.status_code == 404 and missing.json()["code"] == "user_not_found"
    eddie = s.api.login("eddie")["token"]
    assert put_roles(s, 2, {"roles": ["administrator"]}, eddie).status_code == 403
    assert put_roles(s, 2, {"roles": ["administrator"]}, None).status_code == 401
    assert s.scalar("SELECT count(*) FROM hk_audit WHERE event = 'user.roles_changed'") == 0
    assert host_get(s, "/api/reports", token=eddie).status_code == 200


# --- finding accounts: GET /admin/users, GET /admin/users/{id} --------------------------------


def test_administrators_find_accounts_by_login_status_and_page(
        make_site: t.Callable[..., Site]) -> None:
    s = make_site("HS256")
    names = ["alice", "Bob", "carol", "dave", "erin"]
    for name in names:
        s.create_user(name)
    root_id = s.create_user("root", roles=["administrator"])
    root = s.api.login("root")["token"]
    assert s.api.post("/admin/users/4/disable", token=root).status_code == 200

    first = s.api.get("/admin/users", params={"limit": 4}, token=root)
    assert first.status_code == 200, first.text
    body = first.json()
    assert [u["user_login"] for u in body["users"]] == names[:4]
    assert body["next_cursor"] == "4"
    rest = s.api.get("/admin/users", params={"limit": 4, "cursor": body["next_cursor"]},
                     token=root).json()
    assert [u["ID"] for u in rest["users"]] == [5, root_id] and rest["next_cursor"] is None
    assert set(body["users"][0]) >= {"ID", "user_login", "user_email", "display_name", "roles",
                                     "status", "email_verified", "user_registered"}

    # A login finds the account as a login would: username or email, in any case.
    for login in ("BOB", "bob@EXAMPLE.com"):
        found = s.api.get("/admin/users", params={"login": login}, token=root).json()
        assert [u["ID"] for u in found["users"]] == [2], login
    assert s.api.get("/admin/users", params={"login": "nobody"}, token=root).json() == {
        "users": [], "next_cursor": None}
    disabled = s.api.get("/admin/users", params={"status": "disabled"}, token=root).json()
    assert [(u["ID"], u["status"]) for u in disabled["users"]] == [(4, "disabled")]

    one = s.api.get("/admin/users/2", token=root)
    assert one.status_code == 200 and one.json()["user_login"] == "Bob"
    assert one.json()["roles"] == ["subscriber"] and one.json()["status"] == "active"
    missing = s.api.get("/admin/users/999", token=root)
    assert missing.status_code == 404 and missing.json()["code"] == "user_not_found"

    alice = s.api.login("alice")["token"]
    assert s.api.get("/admin/users", token=alice).status_code == 403
    assert s.api.get("/admin/users/1", token=alice).status_code == 403
    assert s.api.get("/admin/users").status_code == 401


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": "0"}, "limit"),
    ({"limit": "501"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "\uff15"}, "limit"),
    ({"cursor": "-1"}, "cursor"),
    ({"cursor": "abc"}, "cursor"),
    ({"cursor": str(2**31)}, "cursor"),
    ({"status": "locked"}, "status"),
    ({"login": "a" * 255}, "login"),
    ({"login": "al\x01ice"}, "login"),
])
def test_bad_account_filters_are_named(make_site: t.Callable[..., Site],
                                       params: dict[str, str], field: str) -> None:
    s = make_site("HS256")
    s.create_user("root", roles=["administrator"])
    r = s.api.get("/admin/users", params=params, token=s.api.login("root")["token"])
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_request"
    assert list(r.json()["data"]["fields"]) == [field]
