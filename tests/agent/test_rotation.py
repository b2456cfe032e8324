"""Rotation of the access-token keys (DESIGN §6): stored for every worker, published before
they sign, kept until their last token expires, rotated once however many run the job."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import typing as t

import jwt
import pytest
from sqlalchemy import select

from agent.jobs import prune
from agent.models import StoredKey
from agent.services import keystore
from tests.conftest import Site

TTL = 60  # HEADLESSKEY_ACCESS_TOKEN_TTL of these sites
LEEWAY = 5


def kid_of(token: str) -> str:
    return t.cast(str, jwt.get_unverified_header(token)["kid"])


def jwks_kids(site: Site) -> set[str]:
    r = site.api.get("/.well-known/jwks.json")
    assert r.status_code == 200
    return {k["kid"] for k in r.json()["keys"]}


def age_keys(site: Site, seconds: float) -> None:
    """Move every key's times ``seconds`` into the past, as if that much time had gone by.

    (Tokens carry real-time ``iat``/``exp``, so the keys' schedule moves, not the clock.)
    """
    shift = dt.timedelta(seconds=seconds)
    with site.state.session_factory() as db:
        for row in db.scalars(select(StoredKey)):
            row.created_at -= shift
            for name in ("active_from", "retire_at", "rotated_at"):
                if getattr(row, name) is not None:
                    setattr(row, name, getattr(row, name) - shift)
        db.commit()
    site.state.keys.reload()


def valid(site: Site, token: str) -> bool:
    r = site.api.post("/token/validate", token=token)
    assert r.status_code in (200, 401, 403), r.text
    return r.status_code == 200


@pytest.fixture
def rotating(make_site: t.Callable[..., Site], algorithm: str) -> Site:
    s = make_site(algorithm, HEADLESSKEY_ACCESS_TOKEN_TTL=TTL, HEADLESSKEY_LEEWAY=LEEWAY,
                  HEADLESSKEY_JWKS_MAX_AGE=30, HEADLESSKEY_KEY_ROTATION=3600)
    s.create_user("alice")
    return s


def test_a_rotated_key_is_published_first_signs_later_and_retires_after_its_tokens(
    rotating: Site, algorithm: str
) -> None:
    site = rotating
    before = site.api.login("alice")["token"]
    old_kid = kid_of(before)
    new = keystore.rotate_local(site.state.keys)
    assert new is not None and new.kid != old_kid and new.alg == algorithm
    if algorithm != "HS256":  # public keys: the next key is in the JWKS before it signs
        assert jwks_kids(site) == {old_kid, new.kid}
    assert kid_of(site.api.login("alice")["token"]) == old_kid

    delay = keystore.access_publish_delay(site.state.settings, algorithm).total_seconds()
    age_keys(site, delay + 1)
    after = site.api.login("alice")["token"]
    assert kid_of(after) == new.kid
    assert valid(site, before) and valid(site, after)

    # The old key stays until the last token it could have signed has expired...
    age_keys(site, TTL - 2)
    if algorithm != "HS256":
        assert old_kid in jwks_kids(site)
    age_keys(site, LEEWAY + 2 * keystore.RELOAD + 3)
    # ...then it leaves the JWKS, its tokens are refused, and pruning deletes it.
    if algorithm != "HS256":
        assert jwks_kids(site) == {new.kid}
    assert not valid(site, before)
    assert valid(site, site.api.login("alice")["token"])
    assert prune(site.state)["keys"] == 1
    assert site.scalar("SELECT count(*) FROM hk_keys WHERE purpose = 'access'") == 1


def test_a_lowered_token_lifetime_retires_no_key_before_its_tokens(
    make_site: t.Callable[..., Site], algorithm: str
) -> None:
    """Tokens signed under the longer lifetime still expire late: the old key verifies them
    until then, even when the key rotates right after ``ACCESS_TOKEN_TTL`` was lowered."""
    site = make_site(algorithm, HEADLESSKEY_ACCESS_TOKEN_TTL=600, HEADLESSKEY_LEEWAY=LEEWAY,
                     HEADLESSKEY_JWKS_MAX_AGE=30)
    site.create_user("alice")
    before = site.api.login("alice")["token"]
    site.state.base_settings = dataclasses.replace(site.state.base_settings, access_token_ttl=30)
    assert keystore.rotate_local(site.state.keys) is not None
    delay = keystore.access_publish_delay(site.state.settings, algorithm).total_seconds()
    # Past the retirement a 30 s lifetime would give, not yet past the token's own exp.
    age_keys(site, delay + 30 + LEEWAY + 2 * keystore.RELOAD + 3)
    assert valid(site, before)
    age_keys(site, 600)
    assert not valid(site, before)


def test_keys_are_stored_encrypted(rotating: Site, algorithm: str) -> None:
    keystore.rotate_local(rotating.state.keys)
    with rotating.state.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT material FROM hk_keys").fetchall()
    assert len(rows) == 2
    for (material,) in rows:
        assert b"PRIVATE KEY" not in bytes(material)
    for entry in rotating.state.keys.entries(keystore.ACCESS):
        assert entry.key is not None
        if algorithm == "HS256":
            assert bytes(entry.key.signing_key) not in b"".join(bytes(m) for (m,) in rows)


def test_a_rotation_run_by_many_at_once_makes_one_key(make_site: t.Callable[..., Site]) -> None:
    site = make_site("ES256", HEADLESSKEY_KEY_ROTATION=3600)
    # Age the current key past the period: every one of the runs finds it due.
    age_keys(site, 3600)
    made: list[t.Any] = []
    start = threading.Barrier(8)

    def run() -> None:
        start.wait()
        made.append(keystore.rotate_local_if_due(site.state.keys))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len([k for k in made if k is not None]) == 1
    assert site.scalar("SELECT count(*) FROM hk_keys WHERE purpose = 'access'") == 2
    # Not due again: the new key is the newest and has not even started signing.
    assert keystore.rotate_local_if_due(site.state.keys) is None


def test_rotation_period_zero_never_rotates(make_site: t.Callable[..., Site]) -> None:
    site = make_site("HS256", HEADLESSKEY_KEY_ROTATION=0)
    age_keys(site, 10 * 86400)
    assert keystore.rotate_local_if_due(site.state.keys) is None


def test_switching_the_algorithm_keeps_old_tokens_valid(make_site: t.Callable[..., Site]) -> None:
    first = make_site("HS256", HEADLESSKEY_ACCESS_TOKEN_TTL=TTL, HEADLESSKEY_JWKS_MAX_AGE=1)
    first.create_user("alice")
    old = first.api.login("alice")["token"]
    settings = first.state.settings
    # The same site restarted with another algorithm: same database, same secret.
    second = make_site("ES256", HEADLESSKEY_ACCESS_TOKEN_TTL=TTL, HEADLESSKEY_JWKS_MAX_AGE=1,
                       HEADLESSKEY_DATABASE_URL=settings.database_url,
                       HEADLESSKEY_ISSUER=settings.issuer,
                       HEADLESSKEY_SECRET_KEY=settings.secret_key.decode())
    assert jwt.get_unverified_header(second.api.login("alice")["token"])["alg"] == "HS256"
    age_keys(second, keystore.access_publish_delay(second.state.settings, "ES256")
             .total_seconds() + 1)
    fresh = second.api.login("alice")["token"]
    assert jwt.get_unverified_header(fresh)["alg"] == "ES256"
    assert valid(second, old) and valid(second, fresh)
    assert jwks_kids(second) == {kid_of(fresh)}  # an HMAC key is never published


def test_a_token_signed_with_a_key_this_worker_has_not_read_yet_is_checked(
    make_site: t.Callable[..., Site],
) -> None:
    """Two apps on one database stand for two workers: one rotates, the other verifies."""
    a = make_site("RS256", HEADLESSKEY_JWKS_MAX_AGE=1)
    a.create_user("alice")
    b = make_site("RS256", HEADLESSKEY_JWKS_MAX_AGE=1,
                  HEADLESSKEY_DATABASE_URL=a.state.settings.database_url,
                  HEADLESSKEY_ISSUER=a.state.settings.issuer,
                  HEADLESSKEY_SECRET_KEY=a.state.settings.secret_key.decode())
    b.state.keys.entries(keystore.ACCESS)  # b has read the table before the rotation
    new = keystore.rotate_local(a.state.keys)
    assert new is not None
    age_keys(a, 10)
    token = a.api.login("alice")["token"]
    assert kid_of(token) == new.kid
    assert valid(b, token)  # an unknown kid makes b reread the table at once


def test_keys_rotate_command(tmp_path: t.Any) -> None:
    from tests.agent.test_cli import agent
    from tests.agent.test_cli import init

    instance = tmp_path / "site"
    assert init(instance, "ES256", "https://shop.example/").returncode == 0
    rotated = agent("keys", "rotate", "--instance", str(instance))
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith("new access-token key ")
    listed = agent("keys", "list", "--instance", str(instance))
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if " access " in line]
    assert len(lines) == 2
    assert lines[0].startswith("*")  # the old key signs until the new one's time comes
    assert "PRIVATE" not in listed.stdout
    refused = agent("keys", "rotate", "--instance", str(instance), "--what", "hub-secret")
    assert refused.returncode == 2 and "has not joined a hub" in refused.stderr



def test_each_rotation_is_one_activity_row(make_site: t.Callable[..., Site]) -> None:
    """A due rotation, run by the job, writes one ``key.rotated`` row naming the new key; a run
    with nothing due writes none (L-01)."""
    from agent.rotation import rotate

    site = make_site("ES256", HEADLESSKEY_KEY_ROTATION=3600)
    assert rotate(site.state) == []
    assert site.scalar("SELECT count(*) FROM hk_audit WHERE event = 'key.rotated'") == 0
    age_keys(site, 3600)
    (line,) = rotate(site.state)
    kid = line.removeprefix("new access-token key ")
    assert site.scalar("SELECT count(*) FROM hk_audit WHERE event = 'key.rotated'") == 1
    assert site.scalar("SELECT outcome FROM hk_audit WHERE event = 'key.rotated'") == "info"
    details = site.scalar("SELECT details FROM hk_audit WHERE event = 'key.rotated'")
    if isinstance(details, str):  # SQLite's JSON is text; PostgreSQL's comes back decoded
        details = json.loads(details)
    assert details == {"key": "access", "kid": kid}
    assert rotate(site.state) == []
    assert site.scalar("SELECT count(*) FROM hk_audit WHERE event = 'key.rotated'") == 1
