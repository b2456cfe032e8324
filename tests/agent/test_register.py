"""Registration over HTTP: the account it creates, the password policy, taken names and emails."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import typing as t

import pytest
import requests

from tests.conftest import PASSWORD
from tests.conftest import Mailbox
from tests.conftest import Site

GOOD_PASSWORD = "violet tugboat under marble skies"


def register(site: Site, **fields: t.Any) -> requests.Response:
    body = {"username": "bob", "email": "bob@example.com", "password": GOOD_PASSWORD}
    body.update(fields)
    return site.api.post("/register", json=body)


def users(site: Site) -> int:
    return t.cast(int, site.scalar("SELECT count(*) FROM hk_users"))


def row_count(site: Site, username: str) -> int:
    return t.cast(
        int, site.scalar("SELECT count(*) FROM hk_users WHERE login_key = :k", k=username.lower())
    )


def roles_of(site: Site, username: str) -> list[str]:
    value = site.scalar("SELECT roles FROM hk_users WHERE login_key = :k", k=username.lower())
    return t.cast(list[str], value if isinstance(value, list) else json.loads(value))


def assert_weak(r: requests.Response) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == "weak_password"
    assert body["data"]["status"] == 400
    assert body["data"]["fields"]["password"]


def test_register_creates_a_subscriber_who_can_log_in(site: Site) -> None:
    r = register(site)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["success"] is True
    assert body["code"] == "registration_received"
    assert body["message"]
    assert row_count(site, "bob") == 1
    assert roles_of(site, "bob") == ["subscriber"]
    login = site.api.post("/token", json={"username": "bob", "password": GOOD_PASSWORD})
    assert login.status_code == 200, login.text
    assert login.json()["user"] == {
        "ID": 2,
        "user_login": "bob",
        "user_email": "bob@example.com",
        "display_name": "bob",
        "roles": ["subscriber"],
    }
    assert site.api.get("/me", token=login.json()["token"]).status_code == 200


def test_default_role_is_configurable(make_site: t.Any) -> None:
    s = make_site(HEADLESSKEY_DEFAULT_ROLE="customer")
    assert register(s).status_code == 201
    assert roles_of(s, "bob") == ["customer"]
    assert s.api.login("bob", GOOD_PASSWORD)["user"]["roles"] == ["customer"]


def test_registration_closed(make_site: t.Any) -> None:
    s = make_site(HEADLESSKEY_REGISTRATION="closed")
    r = register(s)
    assert r.status_code == 403
    assert r.json()["code"] == "registration_closed"
    assert users(s) == 0
    assert s.api.post("/token",
                      json={"username": "bob", "password": GOOD_PASSWORD}).status_code == 401


@pytest.mark.parametrize(
    "password",
    [
        "seven77",  # 7 characters
        "password123",
        "Password1!",
        "qwertyuiop",
        "aaaaaaaaaa",
        "123456789012",
    ],
)
def test_weak_passwords_are_refused(make_site: t.Any, password: str) -> None:
    s = make_site()
    r = register(s, password=password)
    assert_weak(r)
    assert users(s) == 0


def test_password_containing_the_username_is_refused(make_site: t.Any) -> None:
    s = make_site()
    password = "Zebra-charlie-42-on-the-moon"
    assert_weak(register(s, username="charlie", email="c@example.com", password=password))
    assert users(s) == 0
    # Case does not help.
    assert_weak(register(s, username="Charlie", email="c@example.com", password=password.upper()))
    assert users(s) == 0
    # The same password is fine for someone else: it was refused because of the name.
    assert register(s, username="dora", email="dora@example.com",
                    password=password).status_code == 201


def test_long_passphrase_is_accepted(make_site: t.Any) -> None:
    s = make_site()
    words = "granite lantern orbit willow quiet thunder saffron meadow copper ferns drift"
    passphrase = (words + " ") * 3
    passphrase = passphrase[:200]
    assert len(passphrase) == 200
    assert register(s, password=passphrase).status_code == 201
    assert s.api.login("bob", passphrase)["user"]["user_login"] == "bob"


def test_every_byte_of_a_long_password_counts(make_site: t.Any) -> None:
    """No bcrypt-style truncation at 72 bytes."""
    s = make_site()
    password = base64.b64encode(hashlib.sha512(b"headlesskey").digest()).decode()[:80]
    assert len(password.encode()) == 80
    assert register(s, password=password).status_code == 201
    assert s.api.post("/token", json={"username": "bob", "password": password}).status_code == 200
    truncated = password.encode()[:72].decode()
    r = s.api.post("/token", json={"username": "bob", "password": truncated})
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_credentials"


def long_password(length: int) -> str:
    alphabet = "Tq9-mK2#vL7!pX4&"
    return "".join(alphabet[(i * 7 + i // 16) % len(alphabet)] for i in range(length))


def test_password_over_the_default_maximum_is_refused(make_site: t.Any) -> None:
    s = make_site()
    assert_weak(register(s, password=long_password(257)))
    assert users(s) == 0
    assert register(s, password=long_password(256)).status_code == 201


def test_password_over_a_configured_maximum_is_refused(make_site: t.Any) -> None:
    s = make_site(HEADLESSKEY_PASSWORD_MAX_LENGTH=100)
    assert_weak(register(s, password=long_password(101)))
    assert users(s) == 0
    assert register(s, password=long_password(100)).status_code == 201


def test_taken_username_is_a_conflict(make_site: t.Any) -> None:
    s = make_site()
    s.create_user("alice")
    r = register(s, username="ALICE", email="someone@example.com")
    assert r.status_code == 409
    assert r.json()["code"] == "existing_user_login"
    assert users(s) == 1
    assert s.scalar("SELECT count(*) FROM hk_users WHERE email_key = 'someone@example.com'") == 0


def test_taken_email_looks_like_a_new_registration(make_site: t.Any, smtp: Mailbox) -> None:
    s = make_site(mailbox=smtp)
    s.create_user("alice")
    fresh = register(s, username="carol", email="carol@example.com")
    assert fresh.status_code == 201
    before = users(s)
    taken = register(s, username="mallory", email="ALICE@Example.COM")
    assert taken.status_code == 201
    assert taken.json() == fresh.json()
    assert users(s) == before
    assert row_count(s, "mallory") == 0
    # The owner of the address learns about the attempt.
    (notice,) = smtp.wait_for("alice@example.com")
    assert "register" in notice["Subject"].lower()
    body = notice.get_payload(decode=True).decode()
    assert "alice" in body
    # Mallory cannot log in with the password she chose, and alice's still works.
    assert s.api.post("/token",
                      json={"username": "mallory", "password": GOOD_PASSWORD}).status_code == 401
    assert s.api.post("/token", json={"username": "alice@example.com",
                                      "password": GOOD_PASSWORD}).status_code == 401
    assert s.api.login("alice", PASSWORD)["user"]["ID"] == 1


def test_taken_email_as_username_looks_like_a_new_registration(
    make_site: t.Any, smtp: Mailbox
) -> None:
    """A username with @ is its account's email: taken, it is answered as a taken email (201),
    never with the 409 of a taken username, which would tell the address has an account."""
    s = make_site(mailbox=smtp)
    fresh = register(s, username="carol@example.com", email="carol@example.com")
    assert fresh.status_code == 201, fresh.text
    before = users(s)
    for username, email in (("carol@example.com", "carol@example.com"),
                            ("CAROL@example.com", "carol@EXAMPLE.com")):
        taken = register(s, username=username, email=email)
        assert taken.status_code == 201, taken.text
        assert taken.json() == fresh.json()
    assert users(s) == before
    assert len(smtp.wait_for("carol@example.com", count=2)) == 2  # the owner's notices


@pytest.mark.parametrize("email", [
    "=?utf-8?q?victim?=@example.com",  # a header would read it as victim@example.com
    "victim@example.com(",  # ...and this one too (an unclosed comment)
    "a,victim@example.com",  # two recipients
    "mallory@[example.com",  # breaks the header parser
    '"a b"@example.com', "a..b@example.com", ".a@example.com", "a.@example.com",
    "bob@example", "bob@-example.com", "bob@localhost", "b\u00f6b@example.com",
    "x" * 65 + "@example.com",
])
def test_email_that_mail_would_not_reach_as_written_is_refused(
    make_site: t.Any, email: str
) -> None:
    s = make_site()
    r = register(s, email=email)
    assert r.status_code == 400, (email, r.text)
    assert r.json()["code"] == "invalid_request"
    assert list(r.json()["data"]["fields"]) == ["email"]
    assert users(s) == 0


def test_unusual_but_exact_emails_are_accepted_and_mailed(make_site: t.Any, smtp: Mailbox) -> None:
    s = make_site(mailbox=smtp)
    for n, email in enumerate(["o'brien+news@mail.example.co.uk", "{x}=y@xn--bcher-kva.example"]):
        r = register(s, username=f"user{n}", email=email)
        assert r.status_code == 201, (email, r.text)
        forgot = s.api.post("/forgot-password", json={"login": email})
        assert forgot.status_code == 200, forgot.text
        (mail,) = smtp.wait_for(email)
        assert mail["To"] == email


def test_privileged_fields_in_the_body_are_ignored(make_site: t.Any) -> None:
    s = make_site()
    r = register(
        s,
        roles=["administrator"],
        role="administrator",
        status="x",
        email_verified=True,
        ID=99,
    )
    assert r.status_code == 201, r.text
    assert roles_of(s, "bob") == ["subscriber"]
    assert s.scalar("SELECT id FROM hk_users WHERE login_key = 'bob'") == 1
    assert s.scalar("SELECT count(*) FROM hk_users WHERE id = 99") == 0
    assert not s.scalar("SELECT email_verified FROM hk_users WHERE login_key = 'bob'")
    assert s.scalar("SELECT status FROM hk_users WHERE login_key = 'bob'") == "active"
    profile = s.api.post("/login",
                         json={"username": "bob", "password": GOOD_PASSWORD}).json()["user"]
    assert profile["ID"] == 1
    assert profile["roles"] == ["subscriber"]
    assert profile["email_verified"] is False
    assert profile["status"] == "active"


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"username": "ab"}, "username"),
        ({"username": "bad name"}, "username"),
        ({"email": "not-an-email"}, "email"),
        ({"email": "bob@localhost"}, "email"),
        ({"username": None}, "username"),
        ({"email": None}, "email"),
    ],
)
def test_invalid_fields_are_named(make_site: t.Any, fields: dict[str, t.Any], bad: str) -> None:
    s = make_site()
    body = {"username": "bob", "email": "bob@example.com", "password": GOOD_PASSWORD}
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    r = s.api.post("/register", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_request"
    assert bad in r.json()["data"]["fields"]
    assert users(s) == 0


def test_concurrent_registrations_of_one_username(make_site: t.Any) -> None:
    s = make_site()
    url = s.api.url("/register")

    def attempt(i: int) -> requests.Response:
        return requests.post(
            url,
            json={"username": "racer", "email": f"racer{i}@example.com", "password": GOOD_PASSWORD},
            timeout=30,
        )

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(attempt, range(10)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [201] + [409] * 9, [r.text for r in results]
    for r in results:
        if r.status_code == 409:
            assert r.json()["code"] == "existing_user_login"
    assert row_count(s, "racer") == 1
    assert users(s) == 1


def test_taken_email_notices_are_capped_per_hour(make_site: t.Any, smtp: Mailbox) -> None:
    """Registering with a taken email, over and over and many at once, mails its owner at most
    ``RESET_MAX_PER_HOUR`` notices an hour; every answer stays the same 201."""
    s = make_site(mailbox=smtp, HEADLESSKEY_RESET_MAX_PER_HOUR=3)
    s.create_user("alice")
    url = s.api.url("/register")

    def attempt(i: int) -> requests.Response:
        return requests.post(url, timeout=30, json={
            "username": f"mallory{i}", "email": "ALICE@example.com", "password": GOOD_PASSWORD})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(12)))
    assert [r.status_code for r in results] == [201] * 12, [r.text for r in results]
    assert all(r.json()["code"] == "registration_received" for r in results)
    # One mail thread sends in order: once this reset mail is in, every notice before it is too.
    assert s.api.post("/forgot-password", json={"login": "alice"}).status_code == 200
    mails = smtp.wait_for("alice@example.com", count=4)
    notices = [m for m in mails if "register" in m["Subject"].lower()]
    assert len(notices) == 3
    outcomes = s.scalar("SELECT count(*) FROM hk_audit WHERE event = 'user.registered' "
                        "AND outcome = 'blocked'")
    assert outcomes == 9
