"""The hub's signed API in one round trip (the full cases live in test_api.py)."""

from __future__ import annotations

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
