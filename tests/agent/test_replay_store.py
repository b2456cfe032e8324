"""Replay caches on either store: the database (default) or Redis (``REDIS_URL``).

An SSO assertion is single-use across every worker and instance of the receiving site, and a
hub request nonce across every hub worker, whichever store keeps them. Each test runs once per
store; the Redis variant needs ``HEADLESSKEY_TEST_REDIS_URL`` (e.g. redis://127.0.0.1:6379/5).

In process, over real HTTP: a hub (``make_hub``), site A and site B joined to it (``make_site``
with the hub settings), and B2, a second app of site B on B's database (and Redis) -- another
worker or instance of B. A Redis that does not answer is a port nobody listens on: the request
is refused with 503 ``store_unavailable`` and nothing is used up.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import typing as t
from pathlib import Path

import jwt
import pytest
import requests
from sqlalchemy import select

from agent import federation
from agent import store
from agent.config import build_settings
from agent.config import from_environ
from agent.config import load_toml
from agent.errors import ConfigError
from agent.models import AuditEvent
from agent.models import save_cache
from agent.services.keys import generate_private_key_pem
from tests.conftest import PASSWORD
from tests.conftest import Site
from tests.conftest import free_port
from tests.hub.conftest import Hub
from tests.hub.conftest import make_hub  # noqa: F401 - the fixture, for this module

DIRECTORY = "/api/v1/directory"
LIMITS = {"HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": 1000, "HEADLESSKEY_LOCKOUT_MAX_FAILURES": 100}


def redis_from_env() -> str | None:
    return os.environ.get("HEADLESSKEY_TEST_REDIS_URL") or None


@pytest.fixture(params=["database", "redis"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    """None for the database variant; the test Redis URL for the Redis variant."""
    if request.param == "database":
        return None
    url = redis_from_env()
    if url is None:
        pytest.skip("HEADLESSKEY_TEST_REDIS_URL is not set: the Redis variant needs a Redis")
    return url


def dead_redis() -> str:
    """A Redis URL nobody answers at."""
    return f"redis://127.0.0.1:{free_port()}/0"


class Federation:
    def __init__(self, hub: Hub, make_site: t.Callable[..., Site], tmp_path: Path,
                 redis_url: str | None) -> None:
        self.hub = hub
        self.make_site = make_site
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.a = self.member("a")
        self.b = self.member("b")
        self.b2 = self.again(self.b)

    def member(self, name: str) -> Site:
        issuer = f"https://{name}.example"
        site_key, secret = self.hub.add_site(f"Site {name.upper()}", issuer,
                                             site_key=f"site-{name}")
        secret_file = self.tmp_path / f"{name}-hub-secret.key"
        secret_file.write_text(secret + "\n")
        key_file = self.tmp_path / f"{name}-federation-key.pem"
        key_file.write_bytes(generate_private_key_pem("ES256"))
        site = self.make_site(
            HEADLESSKEY_ISSUER=issuer,
            HEADLESSKEY_HUB_URL=self.hub.url,
            HEADLESSKEY_HUB_SITE_KEY=site_key,
            HEADLESSKEY_HUB_SECRET_FILE=str(secret_file),
            HEADLESSKEY_FEDERATION_KEY_FILE=str(key_file),
            HEADLESSKEY_REDIS_URL=self.redis_url,
            **LIMITS,
        )
        state = site.state
        federation.client(state).register_key(
            t.cast(dict[str, t.Any], federation.federation_key(state).public_jwk), "active")
        return site

    def again(self, site: Site, **changes: t.Any) -> Site:
        """Another app of ``site``: its database, secrets and keys (another worker or host)."""
        config = {k: v for k, v in site.app.config.items() if k.startswith("HEADLESSKEY_")}
        config.update(changes)
        return self.make_site(**config)

    def assertion(self, username: str) -> dict[str, str]:
        """A fresh assertion of A's user ``username`` (registered on first use) for B."""
        api = self.a.api
        api.post("/register", json={"username": username, "email": f"{username}@example.com",
                                    "password": PASSWORD})
        token = api.login(username)["token"]
        r = api.post("/sso/issue", json={"target": "site-b"}, token=token)
        assert r.status_code == 200, r.text
        return {k: r.json()[k] for k in ("site_key", "token", "signature")}


@pytest.fixture
def fed(make_hub: t.Callable[..., Hub], make_site: t.Callable[..., Site],  # noqa: F811
        tmp_path: Path, redis_url: str | None) -> Federation:
    return Federation(make_hub(), make_site, tmp_path, redis_url)


def used_rows(site: Site) -> int:
    return int(site.scalar("SELECT count(*) FROM hk_sso_used"))


def test_an_assertion_works_once_across_instances(fed: Federation) -> None:
    assertion = fed.assertion("ines")
    jti = jwt.decode(assertion["token"], options={"verify_signature": False})["jti"]
    first = fed.b.api.post("/sso/exchange", json=assertion)
    assert first.status_code == 200, first.text
    assert first.json()["user"]["user_email"] == "ines@example.com"
    for site in (fed.b2, fed.b):  # the other instance, then the same one
        replay = site.api.post("/sso/exchange", json=assertion)
        assert replay.status_code == 401, replay.text
        assert replay.json()["code"] == "invalid_assertion"
    with fed.b.db() as db:
        rejected = db.scalars(select(AuditEvent).where(AuditEvent.event == "sso.rejected"))
        assert [e.details.get("reason") for e in rejected] == ["replayed", "replayed"]
    if fed.redis_url is None:
        assert used_rows(fed.b) == 1
    else:
        # In Redis, for the assertion's life (at most 60 s) plus the leeway, not in the database.
        import redis

        client = redis.Redis.from_url(fed.redis_url)
        name = store.key("sso", fed.b.state.settings.issuer, fed.a.state.settings.issuer, jti)
        assert 0 < client.ttl(name) <= 60 + fed.b.state.settings.leeway + 1
        assert used_rows(fed.b) == 0
        client.close()


@pytest.mark.parametrize("redis_url", ["redis"], indirect=True)
def test_redis_down_refuses_the_exchange_and_uses_nothing(fed: Federation) -> None:
    down = fed.again(fed.b, HEADLESSKEY_REDIS_URL=dead_redis())
    assertion = fed.assertion("jonas")
    users = fed.b.scalar("SELECT count(*) FROM hk_users")
    sessions = fed.b.scalar("SELECT count(*) FROM hk_sessions")
    r = down.api.post("/sso/exchange", json=assertion)
    assert r.status_code == 503, r.text
    assert r.json() == {"code": "store_unavailable",
                        "message": "A shared store of this service is unavailable. "
                                   "Try again shortly.", "data": {"status": 503}}
    assert r.headers["Retry-After"] == "5"
    assert fed.b.scalar("SELECT count(*) FROM hk_users") == users
    assert fed.b.scalar("SELECT count(*) FROM hk_sessions") == sessions
    # Not burned: an instance whose Redis answers accepts it, once.
    assert fed.b.api.post("/sso/exchange", json=assertion).status_code == 200
    assert fed.b2.api.post("/sso/exchange", json=assertion).status_code == 401


# ---------------------------------------------------------------------------------------------
# the hub's request nonces


def test_a_hub_nonce_works_once_across_hub_workers(
    make_hub: t.Callable[..., Hub], redis_url: str | None  # noqa: F811
) -> None:
    first = make_hub(HEADLESSKEY_HUB_REDIS_URL=redis_url)
    second = make_hub(
        HEADLESSKEY_HUB_DATABASE_URL=first.app.config["HEADLESSKEY_HUB_DATABASE_URL"],
        HEADLESSKEY_HUB_MASTER_KEY=first.app.config["HEADLESSKEY_HUB_MASTER_KEY"],
        HEADLESSKEY_HUB_URL=first.app.config["HEADLESSKEY_HUB_URL"],
        HEADLESSKEY_HUB_REDIS_URL=redis_url,
    )
    shop, secret = first.add_site("Shop", "https://shop.example.com")
    nonce = "once-only-nonce-" + os.urandom(8).hex()
    assert first.signed("GET", DIRECTORY, shop, secret, nonce=nonce).status_code == 200
    for hub in (second, first):
        r = hub.signed("GET", DIRECTORY, shop, secret, nonce=nonce)
        assert r.status_code == 401, r.text
        assert r.json()["code"] == "replayed_request"
    stored = first.scalar("SELECT count(*) FROM hub_nonces")
    assert stored == (1 if redis_url is None else 0)


@pytest.mark.parametrize("redis_url", ["redis"], indirect=True)
def test_a_hub_whose_redis_is_down_refuses_signed_calls(make_hub: t.Callable[..., Hub],  # noqa: F811
                                                        redis_url: str | None) -> None:
    hub = make_hub(HEADLESSKEY_HUB_REDIS_URL=dead_redis())
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    r = hub.signed("GET", DIRECTORY, shop, secret)
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "store_unavailable"
    assert hub.scalar("SELECT count(*) FROM hub_nonces") == 0


# ---------------------------------------------------------------------------------------------
# the setting


@pytest.mark.parametrize("value", ["http://127.0.0.1:6379", "127.0.0.1:6379", 6379, "redis://"])
def test_a_bad_redis_url_stops_the_start_naming_the_setting(
    tmp_path: Path, value: t.Any
) -> None:
    with pytest.raises(ConfigError, match="HEADLESSKEY_REDIS_URL"):
        build_settings({"HEADLESSKEY_SECRET_KEY": "s" * 40, "HEADLESSKEY_REDIS_URL": value},
                       str(tmp_path))


def test_the_redis_url_comes_from_site_toml_or_the_environment(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_text('secret_key = "' + "s" * 40 + '"\n\n[redis]\n'
                                        'url = "redis://10.0.0.5:6379/2"\n')
    values = load_toml(tmp_path / "site.toml")
    assert build_settings(values, str(tmp_path)).redis_url == "redis://10.0.0.5:6379/2"
    values.update(from_environ({"REDIS_URL": "rediss://cache.internal:6380/0"}))
    assert build_settings(values, str(tmp_path)).redis_url == "rediss://cache.internal:6380/0"
    values.update(from_environ({"REDIS_URL": "redis://ignored", "HEADLESSKEY_REDIS_URL": ""}))
    assert build_settings(values, str(tmp_path)).redis_url is None


def test_a_directory_from_before_a_peers_secret_rotation_is_fetched_again(
        fed: Federation) -> None:
    """B's copy of the directory still holds the exchange keys of A's previous secret (B
    refreshes every DIRECTORY_REFRESH): A's assertion fails B's check once, B fetches the
    directory again at once (at most once per cooldown) and lets the user in."""
    assertion = fed.assertion("stella")
    site = fed.b
    with site.app.app_context(), site.state.session_factory() as db:
        body = federation.directory(db, site.state)
        for peer in body["peers"]:
            if peer["site_key"] == "site-a":
                peer["exchange_keys"] = [os.urandom(32).hex()]  # another secret's key
        save_cache(db, "directory", body, site.clock())
        db.commit()
    site.clock.advance(6)  # past the cooldown of the last fetch, well within the refresh
    r = site.api.post("/sso/exchange", json=assertion)
    assert r.status_code == 200, r.text
    with site.db() as db:
        assert not list(db.scalars(select(AuditEvent).where(AuditEvent.event == "sso.rejected")))


def test_concurrent_first_sign_ins_of_one_identity_make_one_account(fed: Federation) -> None:
    """Several first exchanges of one peer user at once (tabs, retries): every one gets in,
    to one local account with one link (the losers of the race find the winner's link)."""
    assertions = [fed.assertion("tess") for _ in range(8)]
    barrier = threading.Barrier(len(assertions))

    def exchange(assertion: dict[str, str]) -> requests.Response:
        barrier.wait()
        return requests.post(fed.b.api.url("/sso/exchange"), json=assertion, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(len(assertions)) as pool:
        answers = list(pool.map(exchange, assertions))
    assert [r.status_code for r in answers] == [200] * len(assertions), [r.text for r in answers]
    assert len({r.json()["user"]["ID"] for r in answers}) == 1
    assert fed.b.scalar("SELECT count(*) FROM hk_users WHERE email = 'tess@example.com'") == 1
    assert fed.b.scalar("SELECT count(*) FROM hk_identity_links") == 1
