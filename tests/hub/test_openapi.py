"""The hub's OpenAPI document describes the routes it serves: same paths, same methods."""

from __future__ import annotations

import re

from tests.hub.conftest import Hub

IGNORED = {"HEAD", "OPTIONS"}
HTTP_METHODS = {"get", "put", "post", "delete", "patch"}


def test_document_is_served_and_lists_every_api_route(hub: Hub) -> None:
    """``GET /api/openapi.json`` (public, JSON) documents exactly the hub's ``/api/`` and
    well-known routes with their methods; every signed operation names its 401."""
    response = hub.http.get(hub.url + "/api/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    doc = response.json()
    assert doc["openapi"] == "3.1.0"
    served: dict[str, set[str]] = {}
    for rule in hub.app.url_map.iter_rules():
        if rule.rule.startswith(("/api/", "/.well-known/")):
            path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)
            served.setdefault(path, set()).update(set(rule.methods or ()) - IGNORED)
    documented = {path: {m.upper() for m in item if m in HTTP_METHODS}
                  for path, item in doc["paths"].items()}
    assert documented == served
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS and path.startswith("/api/v1/"):
                assert op["security"] == [{"signedRequest": []}]
                assert "401" in op["responses"], (method, path)
