"""The hub's signed API in one round trip (the full cases live in test_api.py)."""

from __future__ import annotations

import typing as t

from tests.conftest import TcpProxy
from tests.conftest import fresh_schema
from tests.hub.conftest import Hub


def test_signed_directory_round_trip(hub: Hub) -> None:
    shop, shop_secret = hub.add_site("Shop", "http://127.0.0.1:8001")
    hub.add_site("Docs", "http://127.0.0.1:8002")
    r = hub.signed("GET", "/api/v1/directory", shop, shop_secret)
    assert r.status_code == 200, r.text
    assert [p["site_key"] for p in r.json()["peers"]] == ["docs"]
    assert len(r.json()["peers"][0]["exchange_keys"]) == 1
    unsigned = hub.http.get(hub.url + "/api/v1/directory")
    assert unsigned.status_code == 401
    assert unsigned.json()["code"] == "unsigned_request"


def test_a_database_outage_is_a_503_and_the_hub_recovers(
    make_hub: t.Callable[..., Hub], pg_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, url = pg_proxy
    hub = make_hub(HEADLESSKEY_HUB_DATABASE_URL=fresh_schema(url, 190))
    shop, shop_secret = hub.add_site("Shop", "http://127.0.0.1:8001")
    assert hub.signed("GET", "/api/v1/directory", shop, shop_secret).status_code == 200

    proxy.cut()  # pooled connections dropped: replaced without a failed request
    assert hub.signed("GET", "/api/v1/directory", shop, shop_secret).status_code == 200

    proxy.stop()
    for r in (hub.signed("GET", "/api/v1/directory", shop, shop_secret),
              hub.http.get(hub.url + "/.well-known/jwks.json")):
        assert r.status_code == 503, r.text
        assert r.json() == {"code": "database_unavailable",
                            "message": "The database is unavailable. Try again shortly.",
                            "data": {"status": 503}}
        assert r.headers["Retry-After"] == "5"

    proxy.start()
    assert hub.signed("GET", "/api/v1/directory", shop, shop_secret).status_code == 200
    assert hub.http.get(hub.url + "/.well-known/jwks.json").status_code == 200
