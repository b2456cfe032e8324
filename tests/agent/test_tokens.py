"""Login, validate, refresh with rotation, revoke: over HTTP, for HS256, RS256 and ES256."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import os
import types
import typing as t

import jwt
import pytest
import requests
from sqlalchemy import event

from tests.conftest import PASSWORD
from tests.conftest import Site


def claims_of(token: str) -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], jwt.decode(token, options={"verify_signature": False}))


def test_login_returns_the_plugin_shape(site: Site, algorithm: str) -> None:
    r = site.api.post("/token", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert 890 <= body["expires_in"] <= 900
    assert body["expiration"].endswith("Z")
    assert body["refreshable"] is True
    assert body["refresh_token"].startswith("hkr_")
    assert body["refresh_token_expires_in"] > 86400
    assert body["user"] == {
        "ID": 1,
        "user_login": "alice",
        "user_email": "alice@example.com",
        "display_name": "alice",
        "roles": ["subscriber"],
    }
    header = jwt.get_unverified_header(body["token"])
    assert header["alg"] == algorithm
    assert header["typ"] == "at+jwt"
    assert header["kid"]
    claims = claims_of(body["token"])
    assert claims["iss"] == site.state.settings.issuer
    assert claims["sub"] == "1"
    assert claims["jti"] == body["jti"]
    assert claims["sid"] == body["sid"]
    assert claims["data"] == {"ID": 1, "user_login": "alice"}
    assert claims["exp"] - claims["iat"] == 900
    # The session is a row in the database, with the refresh token stored as a digest only.
    assert site.scalar("SELECT count(*) FROM hk_sessions WHERE id = :sid", sid=body["sid"]) == 1
    assert site.scalar(
        "SELECT count(*) FROM hk_refresh_tokens WHERE token_hash = :t", t=body["refresh_token"]
    ) == 0


def test_login_by_email_and_case_insensitive_username(site: Site) -> None:
    assert site.api.login("ALICE@example.com")["user"]["user_login"] == "alice"
    assert site.api.login("Alice")["user"]["ID"] == 1


def test_profile_login_returns_full_profile(site: Site) -> None:
    r = site.api.post("/login", json={"email": "alice@example.com", "password": PASSWORD})
    assert r.status_code == 200
    user = r.json()["user"]
    assert user["user_registered"].endswith("Z")
    assert user["email_verified"] is False
    assert user["status"] == "active"


@pytest.mark.parametrize(
    "body",
    [
        {"username": "alice", "password": "wrong password here"},
        {"username": "nobody", "password": PASSWORD},
        {"email": "nobody@example.com", "password": PASSWORD},
    ],
)
def test_failed_logins_are_indistinguishable(make_site: t.Any, body: dict[str, str]) -> None:
    s = make_site()
    s.create_user("alice")
    r = s.api.post("/token", json=body)
    assert r.status_code == 401
    assert r.json() == {
        "code": "invalid_credentials",
        "message": "The username, email or password is incorrect.",
        "data": {"status": 401},
    }
    assert s.scalar("SELECT count(*) FROM hk_sessions") == 0


def test_disabled_user_cannot_log_in(site: Site) -> None:
    with site.state.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE hk_users SET status = 'disabled'")
    r = site.api.post("/token", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_credentials"


def test_validate_by_body_bearer_and_fallback_header(site: Site) -> None:
    token = site.api.login()["token"]
    by_body = site.api.post("/token/validate", json={"token": token})
    assert by_body.status_code == 200
    assert by_body.json()["valid"] is True
    assert by_body.json()["data"]["sub"] == "1"
    assert site.api.post("/token/validate", token=token).status_code == 200
    fallback = site.api.post(
        "/token/validate", headers={"X-HeadlessKey-Authorization": f"Bearer {token}"}
    )
    assert fallback.status_code == 200
    assert site.api.get("/me", headers={"X-HeadlessKey-Authorization": token}).status_code == 200


def test_me_requires_a_token(site: Site) -> None:
    r = site.api.get("/me")
    assert r.status_code == 401
    assert r.json()["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # Another scheme is not ours: it is ignored, not parsed.
    assert site.api.get("/me", headers={"Authorization": "Basic YWxpY2U6eA=="}).status_code == 401


def test_refresh_rotates_and_old_tokens_stop_working(site: Site) -> None:
    first = site.api.login()
    r = site.api.post("/token/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 200
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["token"] != first["token"]
    assert second["sid"] == first["sid"]
    assert site.api.get("/me", token=second["token"]).status_code == 200
    # Past the grace window the refreshed access token is refused...
    site.clock.advance(11)
    assert site.api.get("/me", token=first["token"]).status_code == 401
    # ...and the new one still works.
    assert site.api.get("/me", token=second["token"]).status_code == 200


def test_refresh_accepts_the_plugin_token_field(site: Site) -> None:
    first = site.api.login()
    r = site.api.post("/token/refresh", json={"token": first["refresh_token"]})
    assert r.status_code == 200
    assert r.json()["refresh_token"].startswith("hkr_")


def test_access_token_is_not_a_refresh_token(site: Site) -> None:
    first = site.api.login()
    r = site.api.post("/token/refresh", json={"token": first["token"]})
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_grant"


def test_parallel_refresh_within_grace_gets_the_same_pair(site: Site) -> None:
    first = site.api.login()

    def refresh() -> t.Any:
        return site.api.post("/token/refresh", json={"refresh_token": first["refresh_token"]})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: refresh(), range(4)))
    assert [r.status_code for r in results] == [200] * 4
    assert len({r.json()["refresh_token"] for r in results}) == 1
    assert len({r.json()["jti"] for r in results}) == 1
    newest = results[0].json()
    assert site.api.get("/me", token=newest["token"]).status_code == 200
    # Only one rotation happened.
    assert site.scalar("SELECT count(*) FROM hk_refresh_tokens") == 2


@pytest.mark.skipif(not os.environ.get("HEADLESSKEY_TEST_DATABASE_URL"),
                    reason="on SQLite a refresh holds the write lock from its first read: no "
                           "logout can commit in the middle of it")
def test_a_logout_in_the_middle_of_a_refresh_is_no_reuse(make_site: t.Any) -> None:
    """A refresh within the grace window reads the session, then a logout commits, then the
    refresh finds its token spent: the session had ended, which is an ``invalid_grant``, as
    for a refresh after the logout; neither ``refresh_token_reused`` nor a
    ``token.reuse_detected`` row (nor webhook) for a token no one stole."""
    site = make_site()
    site.create_user("alice")
    first = site.api.login()
    child = site.api.post("/token/refresh", json={"refresh_token": first["refresh_token"]})
    assert child.status_code == 200, child.text
    logouts: list[int] = []

    def logout_first(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        if statement.startswith("UPDATE hk_refresh_tokens SET used_at") and not logouts:
            r = requests.post(site.api.url("/token/revoke"),
                              json={"token": child.json()["refresh_token"]}, timeout=30)
            logouts.append(r.status_code)

    event.listen(site.state.engine, "before_cursor_execute", logout_first)
    try:
        r = site.api.post("/token/refresh", json={"refresh_token": first["refresh_token"]})
    finally:
        event.remove(site.state.engine, "before_cursor_execute", logout_first)
    assert logouts == [200]
    assert (r.status_code, r.json()["code"]) == (400, "invalid_grant"), r.text
    assert site.scalar("SELECT revoke_reason FROM hk_sessions") == "revoked"
    assert site.scalar("SELECT count(*) FROM hk_audit WHERE event = 'token.reuse_detected'") == 0


def test_reuse_after_grace_revokes_the_whole_family(site: Site) -> None:
    rt1 = site.api.login()["refresh_token"]
    chain = [rt1]
    for _ in range(3):
        site.clock.advance(1)
        chain.append(site.api.post("/token/refresh",
                                   json={"refresh_token": chain[-1]}).json()["refresh_token"])
    latest_access = site.api.post("/token/refresh", json={"refresh_token": chain[-1]}).json()
    site.clock.advance(30)
    reused = site.api.post("/token/refresh", json={"refresh_token": rt1})
    assert reused.status_code == 400
    assert reused.json()["code"] == "refresh_token_reused"
    # Every token of the session is dead now, the newest included.
    assert site.api.post("/token/refresh",
                         json={"refresh_token": latest_access["refresh_token"]}).status_code == 400
    assert site.api.get("/me", token=latest_access["token"]).status_code == 401
    assert site.scalar("SELECT revoke_reason FROM hk_sessions") == "refresh_reuse"


def test_refresh_after_session_lifetime_fails(make_site: t.Any) -> None:
    s = make_site(HEADLESSKEY_SESSION_MAX_AGE=3600, HEADLESSKEY_REFRESH_TOKEN_TTL=600)
    s.create_user("alice")
    rt = s.api.login()["refresh_token"]
    s.clock.advance(601)  # unused longer than the refresh token's lifetime
    r = s.api.post("/token/refresh", json={"refresh_token": rt})
    assert r.status_code == 400
    assert r.json()["code"] == "session_expired"
    # Refreshing before each inactivity deadline still stops at the absolute lifetime.
    rt = s.api.login()["refresh_token"]
    for _ in range(6):
        s.clock.advance(590)
        r = s.api.post("/token/refresh", json={"refresh_token": rt})
        assert r.status_code == 200
        rt = r.json()["refresh_token"]
    s.clock.advance(100)
    assert s.api.post("/token/refresh", json={"refresh_token": rt}).status_code == 400


def test_revoke_access_token_ends_the_session(site: Site) -> None:
    pair = site.api.login()
    other = site.api.login()
    r = site.api.post("/token/revoke", token=pair["token"])
    assert r.status_code == 200
    assert r.json()["success"] is True
    assert site.api.get("/me", token=pair["token"]).status_code == 401
    assert site.api.post("/token/validate", json={"token": pair["token"]}).status_code == 401
    assert site.api.post("/token/refresh",
                         json={"refresh_token": pair["refresh_token"]}).status_code == 400
    # Another session of the same user is untouched.
    assert site.api.get("/me", token=other["token"]).status_code == 200


def test_revoke_refresh_token_ends_the_session(site: Site) -> None:
    pair = site.api.login()
    assert site.api.post("/token/revoke",
                         json={"refresh_token": pair["refresh_token"]}).status_code == 200
    assert site.api.get("/me", token=pair["token"]).status_code == 401


@pytest.mark.parametrize("garbage", ["", "garbage", "a.b.c", "hkr_unknown", 12, None])
def test_revoke_is_quiet(site: Site, garbage: t.Any) -> None:
    pair = site.api.login()
    r = site.api.post("/token/revoke", json={"token": garbage})
    assert r.status_code == 200
    assert site.api.get("/me", token=pair["token"]).status_code == 200


def test_expired_access_token_is_refused(make_site: t.Any) -> None:
    s = make_site(HEADLESSKEY_ACCESS_TOKEN_TTL=60, HEADLESSKEY_LEEWAY=0)
    s.create_user("alice")
    s.clock.advance(-120)  # minted two minutes ago, so already past its exp
    token = s.api.login()["token"]
    s.clock.advance(120)
    assert s.api.get("/me", token=token).status_code == 401


def test_jwks_has_an_etag_and_answers_304(site: Site) -> None:
    r = site.api.get("/.well-known/jwks.json")
    assert "max-age=" in r.headers["Cache-Control"]
    etag = r.headers["ETag"]
    again = site.api.get("/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other = site.api.get("/.well-known/jwks.json", headers={"If-None-Match": '"other"'})
    assert other.status_code == 200 and other.json() == r.json()


def test_jwks_publishes_public_keys_only(site: Site, algorithm: str) -> None:
    r = site.api.get("/.well-known/jwks.json")
    assert r.status_code == 200
    keys = r.json()["keys"]
    if algorithm == "HS256":
        assert keys == []  # HMAC secrets are never published
        return
    (key,) = keys
    assert key["alg"] == algorithm
    assert key["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(key)
    token = site.api.login()["token"]
    assert jwt.get_unverified_header(token)["kid"] == key["kid"]
    # A relying party can verify the token with the published key.
    public = jwt.PyJWK(key).key
    claims = jwt.decode(token, public, algorithms=[algorithm], options={"verify_aud": False})
    assert claims["sub"] == "1"


def forge(claims: dict[str, t.Any], key: t.Any, alg: str, **headers: t.Any) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def test_algorithm_is_bound_to_the_key(make_site: t.Any, key_files: t.Any) -> None:
    """An RS256 site refuses HS256 tokens MACed with its public key (CVE-2016-10555)."""
    s = make_site("RS256")
    s.create_user("alice")
    good = s.api.login()["token"]
    claims = claims_of(good)
    kid = jwt.get_unverified_header(good)["kid"]
    jwk = s.api.get("/.well-known/jwks.json").json()["keys"][0]
    public = jwt.PyJWK(jwk).key
    from cryptography.hazmat.primitives import serialization

    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    import base64
    import hashlib
    import hmac as hmac_mod
    import json

    def hs256(secret: bytes) -> str:
        def seg(obj: t.Any) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        signing_input = f"{seg({'alg': 'HS256', 'typ': 'at+jwt', 'kid': kid})}.{seg(claims)}"
        mac = hmac_mod.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    for secret in (pem, pem.rstrip(b"\n"), public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ), json.dumps(jwk).encode()):
        assert s.api.get("/me", token=hs256(secret)).status_code == 401
    assert s.api.get("/me", token=good).status_code == 200


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(site: Site, alg: str) -> None:
    import base64
    import json

    good = site.api.login()["token"]
    header, payload, signature = good.split(".")
    head = json.loads(base64.urlsafe_b64decode(header + "=="))
    head["alg"] = alg
    forged_header = base64.urlsafe_b64encode(json.dumps(head).encode()).rstrip(b"=").decode()
    for token in (f"{forged_header}.{payload}.", f"{forged_header}.{payload}.{signature}"):
        assert site.api.get("/me", token=token).status_code == 401
    assert site.api.get("/me", token=good).status_code == 200


def test_tampered_and_non_canonical_signatures_are_refused(site: Site) -> None:
    good = site.api.login()["token"]
    # Accepted first, so its signature is among the verified ones: no variant rides on that.
    assert site.api.get("/me", token=good).status_code == 200
    header, payload, signature = good.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for token in (
        f"{header}.{payload}.",
        f"{header}.{payload}.{signature[:-4]}",
        f"{header}.{payload}.{flipped}",
        f"{header}.{payload}.{signature}=",
        f"{header}=.{payload}.{signature}",
        good + ".x",
        good.replace("-", "+").replace("_", "/") if ("-" in good or "_" in good) else good + "+",
    ):
        assert site.api.get("/me", token=token).status_code == 401, token
    assert site.api.get("/me", token=good).status_code == 200


def test_token_kinds_and_headers_are_checked(make_site: t.Any) -> None:
    s = make_site("HS256")
    s.create_user("alice")
    good = s.api.login()["token"]
    claims = claims_of(good)
    kid = jwt.get_unverified_header(good)["kid"]
    key = s.state.ring.active.signing_key
    cases = [
        forge(claims, key, "HS256", kid=kid),  # typ missing
        forge(claims, key, "HS256", kid=kid, typ="JWT"),
        forge(claims, key, "HS256", kid=kid, typ="hk-sso+jwt"),
        forge(claims, key, "HS256", kid="other", typ="at+jwt"),
        forge(claims, key, "HS256", typ="at+jwt"),  # no kid
        forge(claims, key, "HS256", kid=kid, typ="at+jwt", crit=["exp"]),
        forge({**claims, "iss": claims["iss"] + "/"}, key, "HS256", kid=kid, typ="at+jwt"),
        forge({**claims, "aud": "someone"}, key, "HS256", kid=kid, typ="at+jwt"),
        forge({**claims, "aud": ""}, key, "HS256", kid=kid, typ="at+jwt"),
        forge({**claims, "aud": []}, key, "HS256", kid=kid, typ="at+jwt"),
        forge({**claims, "aud": None}, key, "HS256", kid=kid, typ="at+jwt"),
        forge({**claims, "sub": 1}, key, "HS256", kid=kid, typ="at+jwt"),
        forge({**claims, "sub": "2"}, key, "HS256", kid=kid, typ="at+jwt"),  # session of user 1
        forge({k: v for k, v in claims.items() if k != "exp"}, key, "HS256", kid=kid, typ="at+jwt"),
        forge({**claims, "jti": "not-the-session-token"}, key, "HS256", kid=kid, typ="at+jwt"),
    ]
    for token in cases:
        r = s.api.get("/me", token=token)
        assert r.status_code == 401, jwt.get_unverified_header(token)
        assert r.json()["code"] == "invalid_token"
    # The same claims, signed as the site signs them, are accepted: the cases above fail
    # for their one defect, not by accident.
    assert s.api.get("/me",
                     token=forge(claims, key, "HS256", kid=kid, typ="at+jwt")).status_code == 200


def test_claims_are_checked_one_by_one(make_site: t.Any) -> None:
    """Each claim rule of the access-token check refuses a token validly signed by the site."""
    s = make_site("HS256", HEADLESSKEY_AUDIENCE="shop", HEADLESSKEY_LEEWAY="5")
    s.create_user("alice")
    good = s.api.login()["token"]
    claims = claims_of(good)
    kid = jwt.get_unverified_header(good)["kid"]
    key = s.state.ring.active.signing_key
    now = int(dt.datetime.now(dt.UTC).timestamp())

    def signed(**changes: t.Any) -> str:
        # Signed as bytes: PyJWT's encoder would refuse some of these claims itself.
        payload = json.dumps({**claims, **changes}).encode()
        return jwt.api_jws.PyJWS().encode(payload, key, "HS256",
                                          headers={"kid": kid, "typ": "at+jwt"})

    def by_hand(header: dict[str, t.Any]) -> str:
        # PyJWT drops a "b64": true header when it signs.
        import base64
        import hashlib
        import hmac as hmac_mod

        def seg(obj: t.Any) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        signing_input = f"{seg(header)}.{seg(claims)}"
        mac = hmac_mod.new(key, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    cases = {
        "exp passed": signed(exp=now - 10),
        "exp a string": signed(exp=str(claims["exp"])),
        "exp a boolean": signed(exp=True),
        "iat ahead": signed(iat=now + 60),
        "nbf ahead": signed(nbf=now + 60),
        "nbf null": signed(nbf=None),
        "iss not a string": signed(iss=[claims["iss"]]),
        "aud a list": signed(aud=["shop"]),
        "aud missing": forge({k: v for k, v in claims.items() if k != "aud"}, key, "HS256",
                             kid=kid, typ="at+jwt"),
        "jti not a string": signed(jti=123),
        "sid empty": signed(sid=""),
        "roles not a list": signed(roles="administrator"),
        "b64 header": by_hand({"alg": "HS256", "kid": kid, "typ": "at+jwt", "b64": True}),
        "cty header": by_hand({"alg": "HS256", "kid": kid, "typ": "at+jwt", "cty": "JWT"}),
        "zip header": by_hand({"alg": "HS256", "kid": kid, "typ": "at+jwt", "zip": "DEF"}),
        "header over 512 characters": by_hand({"alg": "HS256", "kid": kid, "typ": "at+jwt",
                                               "x": "h" * 400}),
        "payload not an object": jwt.api_jws.PyJWS().encode(
            b'["not", "claims"]', key, "HS256", headers={"kid": kid, "typ": "at+jwt"}),
        "payload not JSON": jwt.api_jws.PyJWS().encode(
            b"exp=1", key, "HS256", headers={"kid": kid, "typ": "at+jwt"}),
    }
    for name, token in cases.items():
        r = s.api.get("/me", token=token)
        assert r.status_code == 401, name
        assert r.json()["code"] == "invalid_token", name
    # Within the leeway, and with the claims as minted, the same key is accepted.
    assert s.api.get("/me", token=signed(iat=now + 3, nbf=now + 3)).status_code == 200
    assert s.api.get("/me", token=signed()).status_code == 200
    assert s.api.get("/me", token=by_hand({"alg": "HS256", "kid": kid, "typ": "at+jwt"})
                     ).status_code == 200


def test_audience_when_configured(make_site: t.Any) -> None:
    s = make_site("ES256", HEADLESSKEY_AUDIENCE="shop")
    s.create_user("alice")
    token = s.api.login()["token"]
    assert claims_of(token)["aud"] == "shop"
    assert s.api.get("/me", token=token).status_code == 200


def test_tokens_of_another_site_are_refused(make_site: t.Any, algorithm: str) -> None:
    a = make_site(algorithm)
    b = make_site(algorithm)
    a.create_user("alice")
    b.create_user("alice")
    token_a = a.api.login()["token"]
    assert b.api.get("/me", token=token_a).status_code == 401


def test_timestamps_are_utc(site: Site) -> None:
    body = site.api.login()
    expiration = dt.datetime.fromisoformat(body["expiration"].replace("Z", "+00:00"))
    assert abs((expiration - dt.datetime.now(dt.UTC)).total_seconds() - 900) < 5


def test_verified_tokens_are_remembered_per_key_and_bounded() -> None:
    from agent.services.keys import KeyRing
    from agent.services.keys import SigningKey
    from agent.services.tokens import VerifiedTokens

    key = SigningKey.hmac(b"k" * 32)
    same_material = SigningKey.hmac(b"k" * 32)
    ring = KeyRing(key)
    cache = VerifiedTokens(3)
    cache.add("t1", key.kid, key, '{"sub": "1"}')
    assert cache.claims_text("t1", ring) == '{"sub": "1"}'
    # Only while the ring holds the very key object that verified it under its kid: a key
    # read again (rotated, retired and restored, reloaded) verifies the token again.
    assert cache.claims_text("t1", KeyRing(same_material)) is None
    assert cache.claims_text("t1", KeyRing(SigningKey.hmac(b"o" * 32))) is None
    assert cache.claims_text("t2", ring) is None
    for name in ("t2", "t3", "t4"):
        cache.add(name, key.kid, key, "{}")
    assert cache.claims_text("t1", ring) is None  # the oldest went first
    assert all(cache.claims_text(name, ring) == "{}" for name in ("t2", "t3", "t4"))


def test_a_remembered_token_has_its_claims_checked_on_every_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A remembered token skips its shape, header and signature checks, never its claims:
    it expires, and answers only to its own issuer and audience."""
    import time

    from agent.errors import InvalidToken
    from agent.services import tokens
    from agent.services.keys import KeyRing
    from agent.services.keys import SigningKey

    ring = KeyRing(SigningKey.hmac(b"s" * 32))
    now = int(time.time())
    token = tokens.mint_access_token(ring, issuer="https://a.example", audience="shop",
                                     user_id=7, user_login="alice", roles=[], sid="s1",
                                     jti="j1", iat=now, exp=now + 60)

    def check(issuer: str = "https://a.example", audience: str | None = "shop") -> str:
        claims = tokens.verify_access_token(token, ring, issuer=issuer, audience=audience,
                                            leeway=0)
        return str(claims["sub"])

    assert check() == "7"
    assert tokens.verified_tokens.claims_text(token, ring) is not None  # remembered
    assert check() == "7"
    for issuer, audience in (("https://b.example", "shop"), ("https://a.example", "blog"),
                             ("https://a.example", None)):
        with pytest.raises(InvalidToken):
            check(issuer, audience)
    # The module's clock only, a minute on: not the time of the whole process.
    monkeypatch.setattr(tokens, "time", types.SimpleNamespace(time=lambda: now + 61.0))
    with pytest.raises(InvalidToken):
        check()
    # Another ring (the site's keys rotated or reloaded) verifies the token afresh.
    with pytest.raises(InvalidToken):
        tokens.verify_access_token(token, KeyRing(SigningKey.hmac(b"o" * 32)),
                                   issuer="https://a.example", audience="shop", leeway=0)


def test_access_tokens_are_what_pyjwt_makes_of_their_claims(
    site: Site, algorithm: str
) -> None:
    """A login's access token is the token jwt.encode makes of its claims and header, byte for
    byte where the signature is deterministic (HS256, RS256), and one PyJWT verifies with the
    site's key (ES256 signatures are randomised), including a claim a filter adds outside
    ASCII."""
    site.state.filters["token_claims"].append(lambda extra, _user: {**extra, "team": "Zürich ✓"})
    token = site.api.login()["token"]
    header = jwt.get_unverified_header(token)
    claims = claims_of(token)
    assert claims["team"] == "Zürich ✓"
    key = site.state.ring.get(header["kid"])
    assert key is not None
    decoded = jwt.decode(token, key.verify_key, algorithms=[algorithm],
                         audience=site.state.settings.audience,
                         issuer=site.state.settings.issuer)
    assert decoded == claims
    if algorithm != "ES256":
        assert token == jwt.encode(claims, key.signing_key, algorithm=algorithm,
                                   headers={"kid": key.kid, "typ": "at+jwt"})
