"""URL settings at start-up: a URL Python cannot split, credentials in a URL, and the hub's URL
over plain http are each refused with a message naming the key, before anything starts."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest

from agent.config import build_settings
from agent.errors import ConfigError
from agent.services.keys import generate_private_key_pem

SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="

UNSPLITTABLE = [
    "https://[::1",  # an unclosed IPv6 bracket
    "https://app.example.com:99999",  # a port out of range
    "https://app.example.com:http",  # a port that is no number
    "https://evil.example\uff03@app.example.com",  # NFKC turns U+FF03 into "#"
]


def settings(tmp_path: Path, **values: t.Any) -> t.Any:
    config = {"HEADLESSKEY_SECRET_KEY": "s" * 40, "HEADLESSKEY_SITE_URL": "https://shop.example",
              "HEADLESSKEY_MAIL_BACKEND": "null", **values}
    return build_settings(config, str(tmp_path))


def with_hub(tmp_path: Path, url: str) -> t.Any:
    secret = tmp_path / "hub-secret.key"
    secret.write_text("hks_" + "A" * 43 + "\n")
    (tmp_path / "federation-key.pem").write_bytes(generate_private_key_pem("ES256"))
    return settings(tmp_path, HEADLESSKEY_HUB_URL=url, HEADLESSKEY_HUB_SITE_KEY="shop",
                    HEADLESSKEY_HUB_SECRET_FILE=str(secret),
                    HEADLESSKEY_FEDERATION_KEY_FILE=str(tmp_path / "federation-key.pem"))


@pytest.mark.parametrize("url", UNSPLITTABLE)
@pytest.mark.parametrize("key", ["SITE_URL", "RESET_URL", "CORS", "WEBHOOKS"])
def test_a_url_python_cannot_split_is_a_config_error(tmp_path: Path, key: str, url: str) -> None:
    value: t.Any = url
    if key == "CORS":
        value = [url]
    elif key == "WEBHOOKS":
        value = [{"url": url, "secret": SECRET}]
    with pytest.raises(ConfigError, match=f"HEADLESSKEY_{key}.*: not a URL"):
        settings(tmp_path, **{f"HEADLESSKEY_{key}": value})


@pytest.mark.parametrize("url", ["https://ops:hunter2@hooks.example/h", "https://ops@hooks.example/h"])
def test_a_webhook_url_with_credentials_is_refused(tmp_path: Path, url: str) -> None:
    """They would be shown wherever the URL is: delivery errors, logs, the console."""
    with pytest.raises(ConfigError, match=r"WEBHOOKS\[0\]\.url: no user name or password") as info:
        settings(tmp_path, HEADLESSKEY_WEBHOOKS=[{"url": url, "secret": SECRET}])
    assert "hunter2" not in str(info.value)


def test_an_origin_with_credentials_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not an origin"):
        settings(tmp_path, HEADLESSKEY_CORS=["https://user@app.example.com"])


@pytest.mark.parametrize("url", ["https://hub.example.com", "http://127.0.0.1:9000",
                                 "http://localhost:9000", "http://[::1]:9000",
                                 "http://10.0.0.5:9000", "http://192.168.1.2",
                                 "http://hub:9000"])
def test_the_hub_url_is_https_or_a_private_host(tmp_path: Path, url: str) -> None:
    assert with_hub(tmp_path, url).hub_url == url


@pytest.mark.parametrize("url", ["http://hub.example.com", "http://93.184.215.14:9000",
                                 "http://hub.example.com.:9000", "ftp://hub.example.com"])
def test_the_hub_url_over_http_to_a_public_host_is_refused(tmp_path: Path, url: str) -> None:
    """K-08: the keys of every peer come from the hub; over plain http on the internet anyone
    on the path could hand this site a key of their own."""
    with pytest.raises(ConfigError, match="HEADLESSKEY_HUB_URL: expected an"):
        with_hub(tmp_path, url)


@pytest.mark.parametrize(("key", "value"), [
    ("RESET_LINK_TTL", 10**12), ("RESET_LINK_TTL", 7 * 86400 + 1), ("RESET_OTP_TTL", 86401),
    ("ARGON2_TIME_COST", 65), ("ARGON2_MEMORY_COST", 2**32)])
def test_a_lifetime_or_cost_past_its_range_is_refused(tmp_path: Path, key: str,
                                                      value: int) -> None:
    """A reset lifetime past any date Python holds made every forgot-password a 500; an argon2
    cost that large held every login for ever. Each is refused at start, naming the key."""
    with pytest.raises(ConfigError, match=f"HEADLESSKEY_{key}: .*between"):
        settings(tmp_path, **{f"HEADLESSKEY_{key}": value})


def test_the_largest_lifetimes_and_costs_are_accepted(tmp_path: Path) -> None:
    s = settings(tmp_path, HEADLESSKEY_RESET_LINK_TTL=7 * 86400, HEADLESSKEY_RESET_OTP_TTL=86400,
                 HEADLESSKEY_ARGON2_TIME_COST=64, HEADLESSKEY_ARGON2_MEMORY_COST=4 * 2**20)
    assert (s.reset_link_ttl, s.reset_otp_ttl) == (7 * 86400, 86400)
    assert (s.argon2_time_cost, s.argon2_memory_cost) == (64, 4 * 2**20)


BAD_ROLES = ["edi\x00tor", "edi\ttor", "editor\n", " editor", "", "r" * 65, 7]


@pytest.mark.parametrize("role", BAD_ROLES)
def test_a_role_name_in_an_access_rule_is_printable(tmp_path: Path, role: t.Any) -> None:
    """A role in an endpoint's rule is 1 to 64 printable characters with no space at either
    end: a control character or a leading space made a rule no account's role could ever
    match (or, shown in a log or a page, look like another role)."""
    with pytest.raises(ConfigError, match=r"HEADLESSKEY_ACCESS: me: a role is 1 to 64"):
        settings(tmp_path, HEADLESSKEY_ACCESS={"me": ["editor", role]})


@pytest.mark.parametrize("role", BAD_ROLES)
def test_a_role_name_in_the_sso_role_map_is_printable(tmp_path: Path, role: t.Any) -> None:
    for table in ({"editor": role}, {role: "editor"} if isinstance(role, str) else {"x": role}):
        with pytest.raises(ConfigError, match="HEADLESSKEY_SSO_ROLE_MAP: a role is 1 to 64"):
            settings(tmp_path, HEADLESSKEY_SSO_ROLE_MAP=table)


def test_good_role_names_are_kept_as_written(tmp_path: Path) -> None:
    got = settings(tmp_path, HEADLESSKEY_ACCESS={"me": ["shop manager", "éditeur"]},
                   HEADLESSKEY_SSO_ROLE_MAP={"editor": "shop manager"},
                   HEADLESSKEY_DEFAULT_ROLE="  customer ")
    assert got.access["me"] == ("shop manager", "éditeur")
    assert got.sso_role_map == {"editor": "shop manager"}
    assert got.default_role == "customer"


def test_the_repr_of_the_settings_shows_no_secret(tmp_path: Path) -> None:
    """Settings end up in logs and tracebacks (a repr of the state, of a policy copy): the
    master secret, the keys, the passwords in the database and Redis URLs, the SMTP password,
    webhook secrets and the hub secret are never in their repr."""
    private = tmp_path / "jwt-key.pem"
    private.write_bytes(generate_private_key_pem("RS256"))
    previous = "whsec_" + "UFJFVklPVVNQUkVWSU9VU1BSRVZJT1VTUFJFVklPVVM="
    hub_secret = tmp_path / "hub-secret.key"
    hub_secret.write_text("hks_" + "B" * 43 + "\n")
    federation = tmp_path / "federation-key.pem"
    federation.write_bytes(generate_private_key_pem("ES256"))
    s = settings(
        tmp_path,
        HEADLESSKEY_SECRET_KEY="master-secret-never-shown-0123456789",
        HEADLESSKEY_ALGORITHM="RS256",
        HEADLESSKEY_PRIVATE_KEY_FILE=str(private),
        HEADLESSKEY_DATABASE_URL="postgresql://hk:db-password-4242@db.example/hk",
        HEADLESSKEY_REDIS_URL="redis://:redis-password-4242@cache.example:6379/0",
        HEADLESSKEY_MAIL_PASSWORD="smtp-password-4242",
        HEADLESSKEY_WEBHOOKS=[{"url": "https://hooks.example/h", "secret": SECRET,
                               "previous_secret": previous}],
        HEADLESSKEY_HUB_URL="https://hub.example",
        HEADLESSKEY_HUB_SITE_KEY="shop",
        HEADLESSKEY_HUB_SECRET_FILE=str(hub_secret),
        HEADLESSKEY_FEDERATION_KEY_FILE=str(federation),
    )
    assert s.webhooks[0].previous_secret == previous and s.hub_secret  # all of them are set
    shown = repr(s)
    for secret in ["master-secret-never-shown", "db-password-4242", "redis-password-4242",
                   "smtp-password-4242", SECRET.removeprefix("whsec_")[:16],
                   previous.removeprefix("whsec_")[:16], "B" * 16, "PRIVATE KEY",
                   private.read_text().splitlines()[1][:16],
                   federation.read_text().splitlines()[1][:16]]:
        assert secret not in shown
    # What is not secret is still there to read.
    assert "https://hub.example" in shown and "hooks.example" in shown


def test_the_repr_of_a_stored_hub_secret_does_not_show_it() -> None:
    """The key store's entries are read from the database on every hub call: a repr of one
    (a log line, a traceback's locals) shows its kid, never the secret."""
    import datetime as dt

    from agent.services.keystore import Entry

    entry = Entry(id=1, purpose="hub", kid="hks-abc", created_at=dt.datetime.now(dt.UTC),
                  active_from=None, retire_at=None, hub_status="", key=None,
                  secret=b"hks_stored-hub-secret-4242")
    assert "stored-hub-secret-4242" not in repr(entry)
    assert "hks-abc" in repr(entry)
