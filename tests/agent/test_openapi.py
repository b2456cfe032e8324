"""The OpenAPI document describes the API actually served: same paths, same methods, same shapes."""

from __future__ import annotations

import re
import typing as t

import pytest
import requests

from tests.conftest import PASSWORD
from tests.conftest import Site

try:  # not a dependency of the project: used in addition to the checker below when present
    import jsonschema
except ImportError:  # pragma: no cover - depends on the environment
    jsonschema = None

IGNORED_METHODS = {"HEAD", "OPTIONS"}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
JWKS = "/.well-known/jwks.json"


def openapi_path(rule: str) -> str:
    """Flask's ``/sessions/<session_id>`` (or ``<string:id>``) as ``/sessions/{session_id}``."""
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule)


def served_routes(site: Site) -> dict[str, set[str]]:
    """Path -> methods of every rule the app registered under the prefix, plus the JWKS."""
    prefix = site.state.settings.prefix
    routes: dict[str, set[str]] = {}
    for rule in site.app.url_map.iter_rules():
        if not (rule.rule.startswith(prefix + "/") or rule.rule == JWKS):
            continue
        methods = set(rule.methods or ()) - IGNORED_METHODS
        routes.setdefault(openapi_path(rule.rule), set()).update(methods)
    return routes


def documented_routes(doc: dict[str, t.Any]) -> dict[str, set[str]]:
    return {
        path: {m.upper() for m in item if m in HTTP_METHODS} - IGNORED_METHODS
        for path, item in doc["paths"].items()
    }


# ---------------------------------------------------------------------------------------------
# a small JSON Schema checker: enough of draft 2020-12 for this document


def resolve(doc: dict[str, t.Any], schema: dict[str, t.Any]) -> dict[str, t.Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        node: t.Any = doc
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


TYPES: dict[str, t.Callable[[t.Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def problems(
    doc: dict[str, t.Any], schema: dict[str, t.Any], value: t.Any, at: str = "$"
) -> list[str]:
    """Every way ``value`` breaks ``schema`` (type, required, properties, items, enum/const,
    allOf/anyOf/oneOf, additionalProperties, min/maxLength)."""
    schema = resolve(doc, schema)
    found: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(TYPES[name](value) for name in types):
            return [f"{at}: expected {'/'.join(types)}, got {type(value).__name__} {value!r:.80}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{at}: expected {schema['const']!r}, got {value!r:.80}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r:.80} not one of {schema['enum']}")
    for sub in schema.get("allOf", []):
        found += problems(doc, sub, value, at)
    if "anyOf" in schema:
        branches = [problems(doc, sub, value, at) for sub in schema["anyOf"]]
        if all(branches):
            found.append(f"{at}: matches no anyOf branch: {branches}")
    if "oneOf" in schema:
        matching = [sub for sub in schema["oneOf"] if not problems(doc, sub, value, at)]
        if len(matching) != 1:
            found.append(f"{at}: matches {len(matching)} oneOf branches")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            found.append(f"{at}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{at}: longer than {schema['maxLength']}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                found.append(f"{at}: missing required {name!r}")
        props = schema.get("properties", {})
        for name, sub in props.items():
            if name in value:
                found += problems(doc, sub, value[name], f"{at}.{name}")
        extra = schema.get("additionalProperties", True)
        for name in set(value) - set(props):
            if extra is False:
                found.append(f"{at}: unexpected property {name!r}")
            elif isinstance(extra, dict):
                found += problems(doc, extra, value[name], f"{at}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += problems(doc, schema["items"], item, f"{at}[{i}]")
    return found


def check(doc: dict[str, t.Any], schema: dict[str, t.Any], value: t.Any) -> None:
    found = problems(doc, schema, value)
    assert not found, "\n".join(found)
    if jsonschema is not None:
        # The full validator, when the environment happens to have it.
        jsonschema.validate(value, {**schema, "components": doc["components"]})


def response_schema(doc: dict[str, t.Any], path: str, method: str, status: int) -> dict[str, t.Any]:
    responses = doc["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, (
        f"{method} {path} answered {status}, documented: {sorted(responses)}"
    )
    return t.cast(dict[str, t.Any], responses[str(status)]["content"]["application/json"]["schema"])


# ---------------------------------------------------------------------------------------------
# the tests of the checker itself: it must be able to say no


def test_the_schema_checker_catches_wrong_shapes() -> None:
    doc = {
        "components": {
            "schemas": {
                "E": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "string"},
                        "n": {"type": "integer"},
                        "k": {"const": "Bearer"},
                    },
                    "required": ["code"],
                }
            }
        }
    }
    ref = {"$ref": "#/components/schemas/E"}
    assert not problems(doc, ref, {"code": "x", "n": 1, "k": "Bearer"})
    assert problems(doc, ref, {"n": 1})  # missing required
    assert problems(doc, ref, {"code": 1})  # wrong type
    assert problems(doc, ref, {"code": "x", "n": True})  # a bool is not an integer
    assert problems(doc, ref, {"code": "x", "k": "bearer"})  # const
    assert problems(doc, ref, [])  # not an object
    assert problems(doc, {"anyOf": [ref, {"type": "string"}]}, 3)
    assert problems(doc, {"allOf": [ref, {"required": ["n"]}]}, {"code": "x"})


# ---------------------------------------------------------------------------------------------
# the document


@pytest.fixture
def s(make_site: t.Callable[..., Site]) -> Site:
    site = make_site("ES256")
    site.create_user("alice")
    return site


def fetch_document(site: Site) -> dict[str, t.Any]:
    r = site.api.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["Content-Type"].split(";")[0] == "application/json"
    return t.cast(dict[str, t.Any], r.json())


def test_document_is_openapi_3_1(s: Site) -> None:
    doc = fetch_document(s)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["servers"] == [{"url": s.state.settings.site_url}]

    # Every $ref points at something that exists.
    def refs(node: t.Any) -> t.Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    for ref in refs(doc):
        resolve(doc, {"$ref": ref})
    # Every operation documents a success and its errors in the Error shape.
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            assert any(code.startswith("2") for code in op["responses"]), (path, method)
            for code, response in op["responses"].items():
                if code.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, code)


def test_paths_are_exactly_the_registered_routes(s: Site) -> None:
    doc = fetch_document(s)
    served = served_routes(s)
    documented = documented_routes(doc)
    assert JWKS in served
    assert f"{s.state.settings.prefix}/sessions/{{session_id}}" in served
    assert set(documented) == set(served), {
        "documented, not served": sorted(set(documented) - set(served)),
        "served, not documented": sorted(set(served) - set(documented)),
    }
    mismatched = {p: (documented[p], served[p]) for p in served if documented[p] != served[p]}
    assert not mismatched, mismatched
    # Path parameters are declared.
    for path, item in doc["paths"].items():
        names = set(re.findall(r"{([^}]+)}", path))
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            declared = {
                p["name"]
                for p in op.get("parameters", []) + item.get("parameters", [])
                if p.get("in") == "path"
            }
            assert names == declared, (path, method, names, declared)


def test_documented_operations_answer_at_their_path(s: Site) -> None:
    """Each documented path/method reaches a view (no 404/405 from the router)."""
    doc = fetch_document(s)
    for path, item in doc["paths"].items():
        for method in item:
            if method not in HTTP_METHODS:
                continue
            url = s.api.base + re.sub(r"{[^}]+}", "1", path)
            r = requests.request(method.upper(), url, json={}, timeout=10)
            assert r.status_code not in (404, 405) or r.json().get("code") not in {
                "rest_no_route",
                "method_not_allowed",
            }, (method, path, r.status_code, r.text[:200])


def test_namespace_and_version_move_the_api_and_the_document(
    make_site: t.Callable[..., Site],
) -> None:
    site = make_site("HS256", HEADLESSKEY_REST_NAMESPACE="my-auth", HEADLESSKEY_REST_VERSION="v2")
    site.create_user("alice")
    assert site.api.prefix == "/wp-json/my-auth/v2"
    r = requests.post(
        site.api.base + "/wp-json/my-auth/v2/token",
        json={"username": "alice", "password": PASSWORD},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    me = requests.get(
        site.api.base + "/wp-json/my-auth/v2/me",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert me.status_code == 200
    old = requests.post(
        site.api.base + "/wp-json/headlesskey/v1/token",
        json={"username": "alice", "password": PASSWORD},
        timeout=10,
    )
    assert old.status_code == 404
    assert (
        requests.get(site.api.base + "/wp-json/headlesskey/v1/openapi.json", timeout=10).status_code
        == 404
    )

    doc = requests.get(site.api.base + "/wp-json/my-auth/v2/openapi.json", timeout=10).json()
    assert doc["openapi"] == "3.1.0"
    for path in doc["paths"]:
        assert path == JWKS or path.startswith("/wp-json/my-auth/v2/"), path
    assert "/wp-json/my-auth/v2/token" in doc["paths"]
    assert documented_routes(doc) == served_routes(site)


def test_token_and_error_responses_match_their_schemas(s: Site) -> None:
    doc = fetch_document(s)
    p = s.state.settings.prefix
    schemas = doc["components"]["schemas"]
    assert {"TokenResponse", "Error"} <= set(schemas)
    assert {"token", "token_type", "refresh_token", "user"} <= set(
        schemas["TokenResponse"]["required"]
    )
    assert set(schemas["Error"]["required"]) == {"code", "message", "data"}

    token = s.api.post("/token", json={"username": "alice", "password": PASSWORD})
    assert token.status_code == 200
    check(doc, response_schema(doc, f"{p}/token", "post", 200), token.json())
    check(doc, {"$ref": "#/components/schemas/TokenResponse"}, token.json())

    login = s.api.post("/login", json={"username": "alice", "password": PASSWORD})
    check(doc, response_schema(doc, f"{p}/login", "post", 200), login.json())

    refreshed = s.api.post("/token/refresh", json={"refresh_token": token.json()["refresh_token"]})
    check(doc, response_schema(doc, f"{p}/token/refresh", "post", 200), refreshed.json())

    # Errors: a 401, a 400 with field errors, a 400 without, a 404, a 413, a 415.
    errors = [
        (
            "/token",
            "post",
            s.api.post("/token", json={"username": "alice", "password": "wrong one here"}),
        ),
        ("/token", "post", s.api.post("/token", json={"username": 12})),
        (
            "/token",
            "post",
            s.api.post("/token", data=b"{", headers={"Content-Type": "application/json"}),
        ),
        (
            "/token",
            "post",
            s.api.post("/token", data=b"x" * 70_000, headers={"Content-Type": "application/json"}),
        ),
        (
            "/token",
            "post",
            s.api.post("/token", data=b"x=1", headers={"Content-Type": "text/plain"}),
        ),
        (
            "/token/refresh",
            "post",
            s.api.post("/token/refresh", json={"refresh_token": "hkr_nope"}),
        ),
        ("/me", "get", s.api.get("/me")),
        (
            "/sessions/{session_id}",
            "delete",
            s.api.delete("/sessions/nope", token=refreshed.json()["token"]),
        ),
    ]
    seen = set()
    for path, method, r in errors:
        assert 400 <= r.status_code < 500, r.text
        seen.add(r.status_code)
        check(doc, response_schema(doc, p + path, method, r.status_code), r.json())
        check(doc, {"$ref": "#/components/schemas/Error"}, r.json())
    assert seen == {400, 401, 404, 413, 415}
    # The field errors really were checked against the schema's `fields`.
    assert errors[1][2].json()["data"]["fields"]["username"]


def test_other_documented_responses_match(s: Site) -> None:
    doc = fetch_document(s)
    p = s.state.settings.prefix
    pair = s.api.login()
    cases = [
        ("/me", "get", s.api.get("/me", token=pair["token"])),
        ("/sessions", "get", s.api.get("/sessions", token=pair["token"])),
        ("/token/validate", "post", s.api.post("/token/validate", json={"token": pair["token"]})),
        (
            "/register",
            "post",
            s.api.post(
                "/register",
                json={
                    "username": "bobby",
                    "email": "bobby@example.com",
                    "password": "violet lantern orbit 42",
                },
            ),
        ),
        ("/forgot-password", "post", s.api.post("/forgot-password", json={"login": "alice"})),
        ("/token/revoke", "post", s.api.post("/token/revoke", json={"token": "whatever"})),
    ]
    for path, method, r in cases:
        assert r.status_code < 300, (path, r.status_code, r.text)
        check(doc, response_schema(doc, p + path, method, r.status_code), r.json())
    jwks = s.api.get(JWKS)
    check(doc, response_schema(doc, JWKS, "get", 200), jwks.json())
