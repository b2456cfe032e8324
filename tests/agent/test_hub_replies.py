"""A member agent and hub answers that are not a directory: a 2xx HTML page (a proxy's), JSON
of another shape. Neither is a 500 nor replaces the last good directory; with none cached yet,
junk exchanges ask the hub at most once per cooldown.

Real HTTP: a hub served by ``make_hub`` and a member site by ``make_site``; the bad answers come
from a transport standing in for a misbehaving proxy between them.
"""

from __future__ import annotations

import secrets
import time
import typing as t
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent import federation
from agent.hub_client import Reply
from agent.hub_client import urllib_transport
from agent.models import FederationCache
from tests.agent.test_policy import hub  # noqa: F401  (the fixture)
from tests.agent.test_policy import join
from tests.conftest import Site
from tests.hub.conftest import Hub
from tests.hub.conftest import make_hub  # noqa: F401  (the fixture)

NOT_A_DIRECTORY = [b"<html>502 Bad Gateway</html>", b"[]", b'{"sites": "x"}',
                   b'{"site": {}, "peers": "x"}', b'{"site": {}, "peers": [1]}', b"\xff\xfe"]


class Proxy:
    """Passes requests to the hub, or answers 200 with ``body`` itself; counts directory GETs."""

    def __init__(self) -> None:
        self.body: bytes | None = None
        self.directory_gets = 0

    def __call__(self, method: str, url: str, headers: dict[str, str], body: bytes,
                 timeout: float) -> Reply:
        if url.endswith("/api/v1/directory"):
            self.directory_gets += 1
        if self.body is not None:
            return Reply(200, {"Content-Type": "text/html"}, self.body)
        return urllib_transport(method, url, headers, body, timeout)


def plausible(audience: str) -> str:
    """An assertion for ``audience`` from an unknown key: only the directory can refuse it."""
    now = int(time.time())
    claims = {"iss": "https://nobody.example", "aud": audience, "sub": "1", "iat": now,
              "exp": now + 30, "jti": secrets.token_urlsafe(8)}
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k", "typ": "hk-sso+jwt"})


def cached(site: Site) -> dict[str, t.Any] | None:
    with site.state.session_factory() as db:
        row = db.get(FederationCache, "directory")
        return None if row is None else dict(row.body)


def fetch(site: Site) -> dict[str, t.Any]:
    with site.app.app_context(), site.state.session_factory() as db:
        return federation.directory(db, site.state)


@pytest.mark.parametrize("junk", NOT_A_DIRECTORY)
def test_an_answer_that_is_no_directory_keeps_the_last_good_one(
        hub: Hub, make_site: t.Callable[..., Site], tmp_path: Path, junk: bytes) -> None:  # noqa: F811
    site = join(hub, make_site, tmp_path)
    proxy = Proxy()
    site.state.hub_transport = proxy
    good = fetch(site)
    assert good["site"]["site_key"] == "shop"
    proxy.body = junk
    site.clock.advance(61)  # the refresh is due
    assert fetch(site) == good  # served from the cache: the hub counts as down
    assert cached(site) == good
    assert proxy.directory_gets == 2


def test_with_no_directory_cached_junk_exchanges_ask_the_hub_once_per_cooldown(
        hub: Hub, make_site: t.Callable[..., Site], tmp_path: Path) -> None:  # noqa: F811
    site = join(hub, make_site, tmp_path)
    proxy = Proxy()
    proxy.body = b"<html>maintenance</html>"
    site.state.hub_transport = proxy
    exchange = {"site_key": "shop-2", "token": "a.b.c", "signature": "0" * 64}
    for _ in range(10):
        r = site.api.post("/sso/exchange", json=exchange)
        assert r.status_code == 401 and r.json()["code"] == "invalid_assertion"
    assert proxy.directory_gets == 0  # not even a JWT: refused before any directory is read
    exchange["token"] = plausible("shop")  # passes every check that needs no directory
    for _ in range(10):
        r = site.api.post("/sso/exchange", json=exchange)
        assert r.status_code == 503, r.text
    assert proxy.directory_gets == 1
    assert cached(site) is None
    site.clock.advance(6)  # past the cooldown: one more try, which the hub now answers
    proxy.body = None
    r = site.api.post("/sso/exchange", json=exchange)
    assert r.status_code == 401 and r.json()["code"] == "invalid_assertion"
    assert proxy.directory_gets == 2
    assert cached(site) is not None
