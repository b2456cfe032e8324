"""The ``headlesskey-hub`` command as an admin runs it.

Most commands run in-process through click's runner (fast, same code path); what depends on the
real executable — exit statuses and stderr of a configuration error, ``serve`` with gunicorn,
the jobs process beside it, signals — runs as a separate process. The effect of each command is
checked the way a member site sees it: a secret printed by the CLI signs API requests.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from click.testing import Result
from cryptography.fernet import Fernet

from agent import signing
from agent.errors import ConfigError
from hub import create_app
from hub.cli import main
from hub.crypto import parse_site_secret
from tests.conftest import free_port
from tests.conftest import process_env as clean_env

HUB = shutil.which("headlesskey-hub", path=str(Path(sys.executable).parent)) or shutil.which(
    "headlesskey-hub"
)
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery staple"  # noqa: S105 - a test account's
DIRECTORY = "/api/v1/directory"


def hub_cmd(
    *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    assert HUB, "the headlesskey-hub executable is not installed next to the interpreter"
    return subprocess.run(  # noqa: S603 - our own executable
        [HUB, *args], input=stdin, capture_output=True, text=True, env=clean_env(),
        timeout=timeout,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> t.Callable[..., Result]:
    """Run ``headlesskey-hub ARGS`` in-process, with no HEADLESSKEY_* from the outside."""
    for name in list(os.environ):
        if name.startswith("HEADLESSKEY_"):
            monkeypatch.delenv(name)
    runner = CliRunner()

    def run(*args: str, input: str | None = None) -> Result:  # noqa: A002 - click's name
        return runner.invoke(main, list(args), input=input, catch_exceptions=False)

    return run


@pytest.fixture
def instance(tmp_path: Path, cli: t.Callable[..., Result]) -> Path:
    path = tmp_path / "hub"
    result = cli("init", "--instance", str(path), "--url", "https://hub.example.com")
    assert result.exit_code == 0, result.output
    return path


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def signed_get(instance: Path, site_key: str, secret: str, path: str = DIRECTORY) -> t.Any:
    """A signed request from the site to a hub app on ``instance`` (the app's test client)."""
    app = create_app(instance_path=str(instance))
    headers = signing.sign_request(parse_site_secret(secret), site_key, "GET", path)
    try:
        return app.test_client().get(path, headers=headers)
    finally:
        app.extensions["headlesskey_hub"].engine.dispose()


# ---------------------------------------------------------------------------------------------
# init


def test_init_creates_a_private_instance(tmp_path: Path, cli: t.Callable[..., Result]) -> None:
    path = tmp_path / "deep" / "hub"
    out = ok(cli("init", "--instance", str(path), "--url", "https://hub.example.com/"))
    assert "headlesskey-hub serve" in out
    assert mode(path) == 0o700
    for name in ("master.key", "hub.toml", "hub.db"):
        assert mode(path / name) == 0o600, name
    Fernet((path / "master.key").read_bytes().strip())  # a usable Fernet key
    assert 'url = "https://hub.example.com"' in (path / "hub.toml").read_text()
    # The hub is ready: its JWKS carries its own signing key, the issuer is the given URL.
    app = create_app(instance_path=str(path))
    client = app.test_client()
    keys = client.get("/.well-known/jwks.json").get_json()["keys"]
    assert [k["hk_site"] for k in keys] == ["hub"]
    assert keys[0]["alg"] == "ES256" and "d" not in keys[0]
    meta = client.get("/.well-known/headlesskey-federation").get_json()
    assert meta["issuer"] == "https://hub.example.com"
    app.extensions["headlesskey_hub"].engine.dispose()
    # The hub's private key is stored encrypted, never in clear.
    with sqlite3.connect(path / "hub.db") as conn:
        blob = conn.execute("SELECT private_ciphertext FROM hub_keys").fetchone()[0]
    assert b"PRIVATE KEY" not in blob


@pytest.mark.parametrize(("name", "value"), [
    ("SECRET_GRACE", "1e999"), ("SECRET_GRACE", "-1"), ("NONCE_TTL", str(10**20)),
    ("EVENT_RETENTION_DAYS", "0"), ("EVENT_RETENTION_DAYS", "10000000000"),
    ("MAX_BODY", "1.5"), ("TRUSTED_PROXIES", "true"), ("REAUTH_SECONDS", "ten")])
def test_a_setting_out_of_its_range_stops_the_hub(
        instance: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """A negative grace, a nonce lifetime or retention past any date Python holds (every signed
    call or the pruning job a 500), a fraction: the hub does not start, and says which."""
    monkeypatch.setenv(f"HEADLESSKEY_HUB_{name}", value)
    with pytest.raises(ConfigError, match=f"^HEADLESSKEY_HUB_{name}: expected a whole number"):
        create_app(instance_path=str(instance))


def test_init_refuses_to_overwrite_an_instance(
    instance: Path, cli: t.Callable[..., Result]
) -> None:
    key = (instance / "master.key").read_bytes()
    result = cli("init", "--instance", str(instance))
    assert result.exit_code == 1
    assert "refusing to overwrite" in one_line(result.stderr)
    assert (instance / "master.key").read_bytes() == key
    # A half-made instance (only a master key) is refused as well.
    half = instance.parent / "half"
    half.mkdir()
    (half / "master.key").write_bytes(b"x")
    assert cli("init", "--instance", str(half)).exit_code == 1
    assert (half / "master.key").read_bytes() == b"x"


def test_init_with_the_master_key_in_the_environment(
    tmp_path: Path, cli: t.Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADLESSKEY_HUB_MASTER_KEY", Fernet.generate_key().decode())
    path = tmp_path / "hub"
    out = ok(cli("init", "--instance", str(path)))
    assert "HEADLESSKEY_HUB_MASTER_KEY" in out
    assert not (path / "master.key").exists()
    shop = add(cli, path, "Shop", "https://shop.example.com")
    assert signed_get(path, "shop", shop["secret"]).status_code == 200
    monkeypatch.delenv("HEADLESSKEY_HUB_MASTER_KEY")
    result = cli("sites", "list", "--instance", str(path))
    assert result.exit_code == 2
    assert "MASTER_KEY" in one_line(result.stderr)


@pytest.mark.parametrize("url", [
    "ftp://hub.example.com",
    "https://hub.exa\tmple.com",  # urlsplit drops the tab: the issuer would hold it
    "https://hub.example.com/a b",
    "https://hub.example.com/\x01",  # hub.toml could not even be read back
    "https://hub\udcff.example.com",  # a byte of the command line that is no UTF-8
])
def test_init_refuses_a_bad_url(tmp_path: Path, cli: t.Callable[..., Result], url: str) -> None:
    result = cli("init", "--instance", str(tmp_path / "hub"), "--url", url)
    assert result.exit_code == 2
    assert "--url" in result.stderr
    assert not (tmp_path / "hub").exists()
    ok(cli("init", "--instance", str(tmp_path / "hub"), "--url", "https://hub.example.com"))


def test_init_that_fails_leaves_nothing_behind(
    tmp_path: Path, cli: t.Callable[..., Result]
) -> None:
    path = tmp_path / "hub"
    result = subprocess.run(  # noqa: S603 - our own executable
        [str(HUB), "init", "--instance", str(path)], capture_output=True, text=True,
        env=clean_env(HEADLESSKEY_HUB_DATABASE_URL=f"sqlite:///{tmp_path}"), timeout=60,
    )
    assert result.returncode == 2
    assert "database" in one_line(result.stderr)
    assert not path.exists()
    # Once the database is there, init is run again: no master key of the failed run is in the
    # way, nor a hub.toml.
    out = ok(cli("init", "--instance", str(path)))
    assert "Initialised" in out
    add(cli, path, "Shop", "https://shop.example.com")


# ---------------------------------------------------------------------------------------------
# admins


def test_admins_create(instance: Path, cli: t.Callable[..., Result]) -> None:
    from hub.services import admins
    from hub.state import get_state

    out = ok(cli("admins", "create", "--instance", str(instance), "--username", "root-admin",
                 "--password-stdin", input=PASSWORD + "\n"))
    assert "root-admin" in out and PASSWORD not in out
    app = create_app(instance_path=str(instance))
    state = get_state(app)
    with app.app_context(), state.session_factory() as db:
        assert admins.authenticate(db, state, "root-admin", PASSWORD, "127.0.0.1").username == (
            "root-admin"
        )
    state.engine.dispose()
    again = cli("admins", "create", "--instance", str(instance), "--username", "root-admin",
                "--password-stdin", input=PASSWORD + "\n")
    assert again.exit_code == 1
    assert "exists" in one_line(again.stderr)


@pytest.mark.parametrize("weak", ["short", "password1234", "root-admin-2024"])
def test_admins_create_refuses_a_weak_password(
    instance: Path, cli: t.Callable[..., Result], weak: str
) -> None:
    result = cli("admins", "create", "--instance", str(instance), "--username", "root-admin",
                 "--password-stdin", input=weak + "\n")
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert "password" in line.lower()
    assert weak not in result.stdout + result.stderr


@pytest.mark.parametrize("password", [PASSWORD + "\x00", "correct\x1bhorse battery staple"])
def test_admins_create_refuses_a_control_character_in_the_password(
    instance: Path, cli: t.Callable[..., Result], password: str
) -> None:
    # No one could sign in with it: the console refuses a form holding a NUL, and no keyboard
    # types an escape into a password field.
    result = cli("admins", "create", "--instance", str(instance), "--username", "root-admin",
                 "--password-stdin", input=password + "\n")
    assert result.exit_code == 1
    assert "control character" in one_line(result.stderr)
    ok(cli("admins", "create", "--instance", str(instance), "--username", "root-admin",
           "--password-stdin", input=PASSWORD + "\n"))


def test_admins_create_refuses_a_password_that_is_no_utf8(instance: Path) -> None:
    assert HUB
    result = subprocess.run(  # noqa: S603 - our own executable
        [HUB, "admins", "create", "--instance", str(instance), "--username", "root-admin",
         "--password-stdin"], input=b"correct horse \xff battery staple\n",
        capture_output=True, env=clean_env(), timeout=60,
    )
    assert result.returncode == 1
    assert "password" in one_line(result.stderr.decode())


def test_admins_create_reads_the_password_from_stdin_only(
    instance: Path, cli: t.Callable[..., Result]
) -> None:
    result = cli("admins", "create", "--instance", str(instance), "--username", "root-admin")
    assert result.exit_code == 2
    assert "--password-stdin" in result.stderr


NEW_PASSWORD = "a different long passphrase"  # noqa: S105 - a test account's


def create_admin(cli: t.Callable[..., Result], instance: Path, username: str) -> None:
    ok(cli("admins", "create", "--instance", str(instance), "--username", username,
           "--password-stdin", input=PASSWORD + "\n"))


def sign_in(instance: Path, username: str, password: str) -> bool:
    """Whether ``username`` signs in with ``password`` as the console checks it."""
    from hub.services import admins
    from hub.state import get_state

    app = create_app(instance_path=str(instance))
    state = get_state(app)
    try:
        with app.app_context(), state.session_factory() as db:
            try:
                admins.authenticate(db, state, username, password, "")
            except admins.LoginFailed:
                return False
            db.commit()
            return True
    finally:
        state.engine.dispose()


def admin_row(instance: Path, username: str) -> sqlite3.Row:
    with sqlite3.connect(instance / "hub.db") as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM hub_admins WHERE username = ?", (username,)).fetchone()
    conn.close()
    assert row is not None, username
    return t.cast(sqlite3.Row, row)


def cli_events(instance: Path, event: str) -> list[tuple[str, str]]:
    with sqlite3.connect(instance / "hub.db") as conn:
        rows = conn.execute("SELECT actor, details FROM hub_events WHERE event = ? ORDER BY id",
                            (event,)).fetchall()
    conn.close()
    return [(actor, details) for actor, details in rows]


def lock_out(instance: Path, username: str) -> None:
    """Wrong passwords until ``username`` is locked."""
    for _ in range(5):  # ADMIN_MAX_FAILURES
        assert not sign_in(instance, username, "not-the-password-at-all")
    assert admin_row(instance, username)["locked_until"] is not None
    assert not sign_in(instance, username, PASSWORD)


def test_admins_create_refuses_a_name_differing_in_case_only(
    instance: Path, cli: t.Callable[..., Result]
) -> None:
    create_admin(cli, instance, "admin")
    for name in ("Admin", "ADMIN"):
        result = cli("admins", "create", "--instance", str(instance), "--username", name,
                     "--password-stdin", input=PASSWORD + "\n")
        assert result.exit_code == 1
        line = one_line(result.stderr)
        assert "exists" in line and "admin" in line
    # Sign-in finds names as written: "Admin" is no admin.
    assert sign_in(instance, "admin", PASSWORD)
    assert not sign_in(instance, "Admin", PASSWORD)
    listed = json.loads(ok(cli("admins", "list", "--instance", str(instance), "--json")))
    assert [a["username"] for a in listed] == ["admin"]


def test_two_admins_differing_in_case_created_at_once_are_one(
    make_hub: t.Callable[..., t.Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create of "Admin" while another creates "admin" waits for it, then is refused."""
    from hub.services import admins

    hub = make_hub()  # on the suite's database (the cli fixture would hide it)
    runner = CliRunner()
    for name in ("HEADLESSKEY_HUB_DATABASE_URL", "HEADLESSKEY_HUB_MASTER_KEY"):
        monkeypatch.setenv(name, hub.app.config[name])
    with hub.app.app_context(), hub.state.session_factory() as db:
        admins.create(db, hub.state, "admin", PASSWORD)
        db.flush()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                runner.invoke, main, ["admins", "create", "--instance", hub.app.instance_path,
                                      "--username", "Admin", "--password-stdin"],
                input=PASSWORD + "\n", catch_exceptions=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not pending.done():
                if hub.state.engine.dialect.name != "postgresql":
                    time.sleep(1.5)
                    break
                if hub.scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                              "'Lock' AND query LIKE '%pg_advisory_xact_lock%'"):
                    break
                time.sleep(0.05)
            db.commit()
            result = pending.result(timeout=30)
    assert result.exit_code == 1, result.output
    assert "exists" in one_line(result.stderr)
    assert hub.scalar("SELECT count(*) FROM hub_admins") == 1


def test_admins_list(instance: Path, cli: t.Callable[..., Result]) -> None:
    assert "No admins yet" in ok(cli("admins", "list", "--instance", str(instance)))
    create_admin(cli, instance, "carol")
    create_admin(cli, instance, "bob")
    assert sign_in(instance, "bob", PASSWORD)
    lock_out(instance, "carol")
    listed = json.loads(ok(cli("admins", "list", "--instance", str(instance), "--json")))
    assert [set(a) for a in listed] == [
        {"username", "status", "created_at", "last_login_at", "locked_until"}] * 2
    bob, carol = listed
    assert (bob["username"], bob["status"], bob["locked_until"]) == ("bob", "active", None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", bob["last_login_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", bob["created_at"])
    assert (carol["username"], carol["status"], carol["last_login_at"]) == (
        "carol", "active", None)
    assert carol["locked_until"] > carol["created_at"]
    text = ok(cli("admins", "list", "--instance", str(instance)))
    assert re.search(rf"^bob\s+active\s+{bob['created_at']}\s+{bob['last_login_at']}\s+-$",
                     text, re.M), text
    assert re.search(rf"^carol\s+active\s+{carol['created_at']}\s+-\s+"
                     rf"{carol['locked_until']}$", text, re.M), text
    for output in (json.dumps(listed), text):
        assert "argon2" not in output and PASSWORD not in output


def test_admins_set_password(instance: Path, cli: t.Callable[..., Result]) -> None:
    create_admin(cli, instance, "alice")
    lock_out(instance, "alice")
    epoch = admin_row(instance, "alice")["session_epoch"]
    out = ok(cli("admins", "set-password", "--instance", str(instance), "alice",
                 "--password-stdin", input=NEW_PASSWORD + "\n"))
    assert "alice" in out and NEW_PASSWORD not in out
    row = admin_row(instance, "alice")
    assert row["session_epoch"] == epoch + 1  # every console session of alice's has ended
    assert row["failures"] == 0 and row["locked_until"] is None
    assert cli_events(instance, "admin.password_set") == [("cli", '{"username": "alice"}')]
    assert not sign_in(instance, "alice", PASSWORD)
    assert sign_in(instance, "alice", NEW_PASSWORD)


@pytest.mark.parametrize("password", ["short", "alice-is-my-name-2024",
                                      "correct\x1bhorse battery staple"])
def test_admins_set_password_refuses_what_create_refuses(
    instance: Path, cli: t.Callable[..., Result], password: str
) -> None:
    create_admin(cli, instance, "alice")
    result = cli("admins", "set-password", "--instance", str(instance), "alice",
                 "--password-stdin", input=password + "\n")
    assert result.exit_code == 1
    assert "password" in one_line(result.stderr).lower()
    assert password not in result.stdout + result.stderr
    assert sign_in(instance, "alice", PASSWORD)
    assert cli_events(instance, "admin.password_set") == []


def test_admins_set_password_reads_the_password_from_stdin_only(
    instance: Path, cli: t.Callable[..., Result]
) -> None:
    create_admin(cli, instance, "alice")
    result = cli("admins", "set-password", "--instance", str(instance), "alice", NEW_PASSWORD)
    assert result.exit_code == 2
    result = cli("admins", "set-password", "--instance", str(instance), "alice")
    assert result.exit_code == 2
    assert "--password-stdin" in result.stderr
    assert sign_in(instance, "alice", PASSWORD)


def test_admins_unlock(instance: Path, cli: t.Callable[..., Result]) -> None:
    create_admin(cli, instance, "alice")
    lock_out(instance, "alice")
    epoch = admin_row(instance, "alice")["session_epoch"]
    assert "Unlocked admin alice." in ok(cli("admins", "unlock", "--instance", str(instance),
                                             "alice"))
    row = admin_row(instance, "alice")
    assert row["failures"] == 0 and row["locked_until"] is None
    assert row["session_epoch"] == epoch  # sessions are left alone
    assert cli_events(instance, "admin.unlocked") == [
        ("cli", '{"username": "alice", "was_locked": true}')]
    assert sign_in(instance, "alice", PASSWORD)
    # An admin who is not locked: the failures counted so far are cleared.
    assert not sign_in(instance, "alice", "not-the-password-at-all")
    assert "was not locked" in ok(cli("admins", "unlock", "--instance", str(instance), "alice"))
    assert admin_row(instance, "alice")["failures"] == 0


def test_admins_disable_and_enable(instance: Path, cli: t.Callable[..., Result]) -> None:
    create_admin(cli, instance, "alice")
    epoch = admin_row(instance, "alice")["session_epoch"]
    assert "alice is disabled" in ok(cli("admins", "disable", "--instance", str(instance),
                                         "alice"))
    assert admin_row(instance, "alice")["session_epoch"] == epoch + 1
    assert not sign_in(instance, "alice", PASSWORD)
    listed = json.loads(ok(cli("admins", "list", "--instance", str(instance), "--json")))
    assert listed[0]["status"] == "disabled"
    assert "already" in ok(cli("admins", "disable", "--instance", str(instance), "alice"))
    assert "alice is active" in ok(cli("admins", "enable", "--instance", str(instance),
                                       "alice"))
    assert sign_in(instance, "alice", PASSWORD)
    assert [a for a, _ in cli_events(instance, "admin.disabled")] == ["cli"]
    assert [a for a, _ in cli_events(instance, "admin.enabled")] == ["cli"]


@pytest.mark.parametrize("verb", [["set-password", "--password-stdin"], ["unlock"],
                                  ["disable"], ["enable"]])
@pytest.mark.parametrize("username", ["Alice", "bob", "al\udcffice", "a" * 61])
def test_an_unknown_admin_is_one_line_and_exit_1(
    instance: Path, cli: t.Callable[..., Result], verb: list[str], username: str
) -> None:
    create_admin(cli, instance, "alice")
    result = cli("admins", verb[0], "--instance", str(instance), username, *verb[1:],
                 input=NEW_PASSWORD + "\n")
    assert result.exit_code == 1
    assert "No admin" in one_line(result.stderr)
    assert NEW_PASSWORD not in result.stdout + result.stderr
    assert sign_in(instance, "alice", PASSWORD)


def test_admin_commands_of_the_executable(instance: Path) -> None:
    created = hub_cmd("admins", "create", "--instance", str(instance), "--username", "alice",
                      "--password-stdin", stdin=PASSWORD + "\n")
    assert created.returncode == 0, created.stderr
    unknown = hub_cmd("admins", "unlock", "--instance", str(instance), "mallory")
    assert unknown.returncode == 1
    assert "No admin 'mallory'" in one_line(unknown.stderr)
    set_password = hub_cmd("admins", "set-password", "--instance", str(instance), "alice",
                           "--password-stdin", stdin=NEW_PASSWORD + "\n")
    assert set_password.returncode == 0, set_password.stderr
    listed = hub_cmd("admins", "list", "--instance", str(instance))
    assert listed.returncode == 0 and re.search(r"^alice\s+active\s", listed.stdout, re.M)
    assert sign_in(instance, "alice", NEW_PASSWORD)


# ---------------------------------------------------------------------------------------------
# sites


def add(
    cli: t.Callable[..., Result], instance: Path, name: str, url: str, *extra: str
) -> dict[str, t.Any]:
    out = ok(cli("sites", "add", "--instance", str(instance), "--name", name, "--url", url,
                 "--json", *extra))
    return t.cast(dict[str, t.Any], json.loads(out))


def test_sites_add_prints_the_secret_once_and_it_signs(
    instance: Path, cli: t.Callable[..., Result]
) -> None:
    shop = add(cli, instance, "Shop", "https://shop.example.com", "--origin",
               "https://shop.example.com")
    assert set(shop) == {"site_key", "secret", "name", "base_url"}
    assert shop["site_key"] == "shop" and shop["base_url"] == "https://shop.example.com"
    docs = add(cli, instance, "Docs portal", "https://docs.example.com", "--key", "docs")
    assert docs["site_key"] == "docs"

    r = signed_get(instance, shop["site_key"], shop["secret"])
    assert r.status_code == 200, r.get_json()
    assert [p["site_key"] for p in r.get_json()["peers"]] == ["docs"]

    listed = json.loads(ok(cli("sites", "list", "--instance", str(instance), "--json")))
    assert [s["site_key"] for s in listed] == ["docs", "shop"]
    assert listed[1]["allowed_origins"] == ["https://shop.example.com"]
    assert listed[1]["status"] == "active"
    text = ok(cli("sites", "list", "--instance", str(instance)))
    assert re.search(r"^shop\s+active\s+Shop\s+https://shop.example.com$", text, re.M), text
    for output in (json.dumps(listed), text):
        assert shop["secret"] not in output and docs["secret"] not in output
        assert "hks_" not in output


def _wait_until_blocked(hub: t.Any, pending: concurrent.futures.Future[t.Any]) -> None:
    """Until the command in ``pending`` has gone past its start and waits (or has ended): on
    PostgreSQL until a statement waits for a lock; elsewhere a while (SQLite's writers wait
    for the write lock as soon as they begin)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not pending.done():
        if hub.state.engine.dialect.name != "postgresql":
            time.sleep(1.5)
            return
        if hub.scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                      "AND query LIKE '%hub_sites%'"):
            return
        time.sleep(0.05)


@pytest.mark.parametrize("verb", [["suspend"], ["remove", "--yes"]])
def test_a_site_an_admin_removes_meanwhile_is_no_site(
    make_hub: t.Callable[..., t.Any], monkeypatch: pytest.MonkeyPatch, verb: list[str]
) -> None:
    """A command on a site the console is removing at that moment waits for the removal and
    answers that there is no such site (not a traceback)."""
    from hub.services import sites

    hub = make_hub()  # on the suite's database (the cli fixture would hide it)
    runner = CliRunner()

    def cli(*args: str) -> Result:
        return runner.invoke(main, list(args), catch_exceptions=False)

    hub.add_site("Shop", "https://shop.example.com", site_key="shop")
    for name in ("HEADLESSKEY_HUB_DATABASE_URL", "HEADLESSKEY_HUB_MASTER_KEY"):
        monkeypatch.setenv(name, hub.app.config[name])
    with hub.app.app_context(), hub.state.session_factory() as db:
        sites.remove(db, hub.state, sites.get(db, "shop", lock=True), "bob")
        db.flush()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(cli, "sites", verb[0], "--instance", hub.app.instance_path,
                                  "shop", *verb[1:])
            _wait_until_blocked(hub, pending)
            db.commit()
            result = pending.result(timeout=30)
    assert result.exit_code == 1
    assert "No site" in one_line(result.stderr)
    logged = hub.scalar("SELECT string_agg(event, ' ') FROM hub_events WHERE event LIKE 'site.%'"
                        if hub.state.engine.dialect.name == "postgresql" else
                        "SELECT group_concat(event, ' ') FROM hub_events WHERE event LIKE 'site.%'")
    assert logged == "site.added site.removed"


@pytest.mark.parametrize("verb", [["suspend"], ["resume"], ["rotate-secret"],
                                  ["remove", "--yes"]])
def test_a_site_key_that_is_no_utf8_is_no_site(
    instance: Path, cli: t.Callable[..., Result], verb: list[str]
) -> None:
    add(cli, instance, "Shop", "https://shop.example.com")
    # A byte of the command line that is no UTF-8 reaches the command as a lone surrogate.
    result = cli("sites", verb[0], "--instance", str(instance), "sh\udcffop", *verb[1:])
    assert result.exit_code == 1
    assert "No site" in one_line(result.stderr)
    listed = json.loads(ok(cli("sites", "list", "--instance", str(instance), "--json")))
    assert [(s["site_key"], s["status"]) for s in listed] == [("shop", "active")]


def test_sites_add_explains_mistakes(instance: Path, cli: t.Callable[..., Result]) -> None:
    add(cli, instance, "Shop", "https://shop.example.com")
    for args, words in (
        (["--name", "Shop", "--url", "https://other.example.com"], "exists"),
        (["--name", "Plain", "--url", "http://plain.example.com"], "https://"),
        (["--name", "Bad key", "--url", "https://b.example.com", "--key", "Not_OK"], "site_key"),
        (["--name", "Origin", "--url", "https://o.example.com", "--origin",
          "https://o.example.com/path"], "origin"),
    ):
        result = cli("sites", "add", "--instance", str(instance), *args)
        assert result.exit_code == 1, (args, result.output)
        assert words in one_line(result.stderr), (args, result.stderr)
        assert "hks_" not in result.output
    listed = json.loads(ok(cli("sites", "list", "--instance", str(instance), "--json")))
    assert [s["site_key"] for s in listed] == ["shop"]


def test_sites_suspend_and_resume(instance: Path, cli: t.Callable[..., Result]) -> None:
    shop = add(cli, instance, "Shop", "https://shop.example.com")
    assert "suspended" in ok(cli("sites", "suspend", "--instance", str(instance), "shop"))
    r = signed_get(instance, "shop", shop["secret"])
    assert r.status_code == 401 and r.get_json()["code"] == "bad_signature"
    listed = json.loads(ok(cli("sites", "list", "--instance", str(instance), "--json")))
    assert listed[0]["status"] == "suspended"
    assert "active" in ok(cli("sites", "resume", "--instance", str(instance), "shop"))
    assert signed_get(instance, "shop", shop["secret"]).status_code == 200
    result = cli("sites", "suspend", "--instance", str(instance), "nope")
    assert result.exit_code == 1
    assert "nope" in one_line(result.stderr)


def test_sites_rotate_secret(instance: Path, cli: t.Callable[..., Result]) -> None:
    shop = add(cli, instance, "Shop", "https://shop.example.com")
    rotated = json.loads(ok(cli("sites", "rotate-secret", "--instance", str(instance), "shop",
                                "--json")))
    assert rotated["site_key"] == "shop"
    assert rotated["grace_seconds"] == 86400
    assert rotated["secret"] != shop["secret"]
    # Both work during the grace period.
    assert signed_get(instance, "shop", shop["secret"]).status_code == 200
    assert signed_get(instance, "shop", rotated["secret"]).status_code == 200
    # With no grace, the previous secret stops at once.
    out = ok(cli("sites", "rotate-secret", "--instance", str(instance), "shop", "--grace", "0"))
    newest = re.search(r"secret:\s+(hks_\S+)", out)
    assert newest, out
    assert "0 s" in out
    assert signed_get(instance, "shop", rotated["secret"]).status_code == 401
    assert signed_get(instance, "shop", newest.group(1)).status_code == 200
    assert signed_get(instance, "shop", shop["secret"]).status_code == 200  # its grace goes on


def test_sites_rotate_secret_text_names_the_grace_period(
    instance: Path, cli: t.Callable[..., Result]
) -> None:
    add(cli, instance, "Shop", "https://shop.example.com")
    out = ok(cli("sites", "rotate-secret", "--instance", str(instance), "shop"))
    assert "86400 s" in out
    assert len(re.findall(r"hks_\S+", out)) == 1


def test_sites_remove_asks_first(instance: Path, cli: t.Callable[..., Result]) -> None:
    shop = add(cli, instance, "Shop", "https://shop.example.com")
    declined = cli("sites", "remove", "--instance", str(instance), "shop", input="n\n")
    assert declined.exit_code == 1
    assert signed_get(instance, "shop", shop["secret"]).status_code == 200
    ok(cli("sites", "remove", "--instance", str(instance), "shop", "--yes"))
    assert signed_get(instance, "shop", shop["secret"]).status_code == 401
    assert json.loads(ok(cli("sites", "list", "--instance", str(instance), "--json"))) == []


def test_sites_import_is_idempotent(instance: Path, cli: t.Callable[..., Result],
                                   tmp_path: Path) -> None:
    registry = ROOT / "sites.example.toml"
    first = ok(cli("sites", "import", "--instance", str(instance), str(registry)))
    assert re.search(r"^added\s+shop$", first, re.M), first
    assert re.search(r"^added\s+docs$", first, re.M), first
    secrets_ = dict(re.findall(r"site key: (\S+)\n\s+secret:\s+(hks_\S+)", first))
    assert set(secrets_) == {"shop", "docs"}
    assert signed_get(instance, "docs", secrets_["docs"]).status_code == 200

    second = ok(cli("sites", "import", "--instance", str(instance), str(registry)))
    assert re.search(r"^unchanged\s+shop$", second, re.M), second
    assert re.search(r"^unchanged\s+docs$", second, re.M), second
    assert "hks_" not in second and "secret" not in second
    # The secrets made by the first import still work.
    assert signed_get(instance, "shop", secrets_["shop"]).status_code == 200

    changed = tmp_path / "sites.toml"
    changed.write_text(registry.read_text().replace("docs-team@example.com", "ops@example.com"))
    third = ok(cli("sites", "import", "--instance", str(instance), str(changed)))
    assert re.search(r"^updated\s+docs$", third, re.M), third
    assert "hks_" not in third
    listed = {s["site_key"]: s for s in json.loads(ok(cli("sites", "list", "--instance",
                                                          str(instance), "--json")))}
    assert listed["docs"]["contact"] == "ops@example.com"


def test_sites_import_refuses_a_bad_file_and_writes_nothing(
    instance: Path, cli: t.Callable[..., Result], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "sites.example.toml").read_text()
                   + '\n[[site]]\nid = "x"\nname = "X"\nbase_url = "ftp://x"\n')
    result = cli("sites", "import", "--instance", str(instance), str(bad))
    assert result.exit_code == 1
    assert "base_url" in one_line(result.stderr)
    assert "hks_" not in result.output
    assert json.loads(ok(cli("sites", "list", "--instance", str(instance), "--json"))) == []


@pytest.mark.parametrize("field", ["allowed_origins", "redirect_uris"])
def test_sites_import_wants_a_list_of_urls(
    instance: Path, cli: t.Callable[..., Result], tmp_path: Path, field: str
) -> None:
    one = tmp_path / "one.toml"
    one.write_text('[[site]]\nid = "shop"\nname = "Shop"\nbase_url = "https://shop.example.com"'
                   f'\n{field} = "https://shop.example.com"\n')
    result = cli("sites", "import", "--instance", str(instance), str(one))
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert f"site #1: {field}: A list of URLs" in line, line
    assert len(line) < 200, line  # one message, not one per character of the string
    assert json.loads(ok(cli("sites", "list", "--instance", str(instance), "--json"))) == []


def test_an_import_while_an_admin_removes_a_site_adds_it_again(
    make_hub: t.Callable[..., t.Any]
) -> None:
    """An import updating a site that the console is removing at that moment waits for the
    removal and adds the site anew, with a new secret (not a traceback)."""
    from hub.services import sites

    hub = make_hub()
    hub.add_site("Shop", "https://shop.example.com", site_key="shop",
                 contact="someone@example.com")

    def run_import() -> list[tuple[str, str, str | None]]:
        with hub.app.app_context(), hub.state.session_factory() as db:
            results = sites.import_file(db, hub.state, ROOT / "sites.example.toml", actor="cli")
            db.commit()
            return results

    with hub.app.app_context(), hub.state.session_factory() as db:
        sites.remove(db, hub.state, sites.get(db, "shop", lock=True), "bob")
        db.flush()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(run_import)
            time.sleep(0.5)
            db.commit()
            results = pending.result(timeout=30)
    assert {(key, outcome) for key, outcome, _ in results} == {("shop", "added"),
                                                                ("docs", "added")}
    assert all(secret for _key, _outcome, secret in results)
    assert hub.scalar("SELECT contact FROM hub_sites WHERE site_key = 'shop'") == (
        "web-team@example.com")


def test_sites_import_refuses_a_site_twice_in_one_file(
    instance: Path, cli: t.Callable[..., Result], tmp_path: Path
) -> None:
    twice = tmp_path / "twice.toml"
    twice.write_text((ROOT / "sites.example.toml").read_text()
                     + '\n[[site]]\nid = "shop"\nname = "Shop 2"\n'
                     'base_url = "https://shop2.example.com"\n')
    result = cli("sites", "import", "--instance", str(instance), str(twice))
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert "site #3" in line and "site #1" in line and "id" in line, line
    assert "hks_" not in result.output
    assert json.loads(ok(cli("sites", "list", "--instance", str(instance), "--json"))) == []


def test_sites_import_names_the_entry_that_clashes_with_a_site(
    instance: Path, cli: t.Callable[..., Result], tmp_path: Path
) -> None:
    add(cli, instance, "Blog", "https://docs.example.com")
    result = cli("sites", "import", "--instance", str(instance), str(ROOT / "sites.example.toml"))
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert "sites.example.toml: site #2:" in line and "base url" in line, line
    assert "hks_" not in result.output
    listed = json.loads(ok(cli("sites", "list", "--instance", str(instance), "--json")))
    assert [s["site_key"] for s in listed] == ["blog"]


def test_db_upgrade(instance: Path, cli: t.Callable[..., Result]) -> None:
    assert "up to date" in ok(cli("db", "upgrade", "--instance", str(instance)))


# ---------------------------------------------------------------------------------------------
# configuration errors, as the real executable reports them


@pytest.mark.parametrize(
    "setting", ["bogus = 1", 'nonce_ttl = "soon"', "url = [", "master_key = 'not-a-key'"]
)
def test_a_bad_hub_toml_is_one_line_and_exit_2(instance: Path, setting: str) -> None:
    with (instance / "hub.toml").open("a") as fh:
        fh.write(setting + "\n")
    result = hub_cmd("sites", "list", "--instance", str(instance))
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_line(result.stderr)
    assert line.startswith("error: ")
    assert result.stdout == ""


def test_the_environment_overrides_hub_toml(
    instance: Path, cli: t.Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADLESSKEY_HUB_URL", "https://env-hub.example.com")
    monkeypatch.setenv("HEADLESSKEY_HUB_JWKS_MAX_AGE", "77")
    app = create_app(instance_path=str(instance))
    client = app.test_client()
    assert client.get("/.well-known/headlesskey-federation").get_json()["issuer"] == (
        "https://env-hub.example.com"
    )
    assert "max-age=77" in client.get("/.well-known/jwks.json").headers["Cache-Control"]
    app.extensions["headlesskey_hub"].engine.dispose()
    # The database can come from the environment too (how PostgreSQL is configured).
    other = instance.parent / "elsewhere.db"
    monkeypatch.setenv("HEADLESSKEY_HUB_DATABASE_URL", f"sqlite:///{other}")
    ok(cli("db", "upgrade", "--instance", str(instance)))
    assert other.exists()


def test_a_bad_environment_value_is_one_line_and_exit_2(instance: Path) -> None:
    env = clean_env(HEADLESSKEY_HUB_NONCE_TTL="soon")
    result = subprocess.run(  # noqa: S603 - our own executable
        [str(HUB), "sites", "list", "--instance", str(instance)], capture_output=True, text=True,
        env=env, timeout=60,
    )
    assert result.returncode == 2
    assert "HEADLESSKEY_HUB_NONCE_TTL" in one_line(result.stderr)


@pytest.mark.parametrize("command", [["sites", "list"], ["sites", "suspend", "shop"],
                                     ["admins", "list"], ["admins", "unlock", "alice"],
                                     ["db", "upgrade"]])
@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_database_that_cannot_be_reached_is_one_line_and_exit_2(
    instance: Path, command: list[str], database: str
) -> None:
    if database == "postgresql":
        pytest.importorskip("psycopg")
        url = f"postgresql://postgres@127.0.0.1:{free_port()}/hub"  # nothing listens there
    else:
        url = f"sqlite:///{instance}"  # a folder: SQLite cannot open it
    result = subprocess.run(  # noqa: S603 - our own executable
        [str(HUB), *command, "--instance", str(instance)], capture_output=True, text=True,
        env=clean_env(HEADLESSKEY_HUB_DATABASE_URL=url), timeout=60,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_line(result.stderr)
    assert line.startswith("error: ") and "database" in line, line
    assert result.stdout == ""


def test_a_missing_master_key_is_one_line_and_exit_2(instance: Path) -> None:
    (instance / "master.key").unlink()
    result = hub_cmd("sites", "list", "--instance", str(instance))
    assert result.returncode == 2
    assert "MASTER_KEY" in one_line(result.stderr)


def test_a_wrong_master_key_is_one_line_and_exit_2(instance: Path) -> None:
    result = hub_cmd("sites", "add", "--instance", str(instance), "--name", "Shop", "--url",
                     "https://shop.example.com", "--json")
    assert result.returncode == 0, result.stderr
    (instance / "master.key").chmod(0o600)
    (instance / "master.key").write_bytes(Fernet.generate_key() + b"\n")
    result = hub_cmd("sites", "rotate-secret", "--instance", str(instance), "shop")
    assert result.returncode == 2
    assert "master key" in one_line(result.stderr)


def test_a_missing_instance_is_a_usage_error(tmp_path: Path) -> None:
    result = hub_cmd("sites", "list", "--instance", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------------------------
# serve and jobs, as real processes


class Served:
    """``headlesskey-hub serve`` (or ``jobs``) in a subprocess; always stopped by the fixture."""

    def __init__(self, args: list[str], log_dir: Path, command: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = (log_dir / f"proc-{self.port}.log").open("w+")
        assert HUB
        self.proc = subprocess.Popen(  # noqa: S603 - our own executable
            [*(command or [HUB]), *[a.replace("{port}", str(self.port)) for a in args]],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env or clean_env(),
        )

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def wait_for(self, check: t.Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if check():
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or its workers still starting
            time.sleep(0.1)
        raise AssertionError(f"not ready within {timeout}s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"did not stop on signal {sig}:\n{self.logs()}") from None
        return t.cast(int, self.proc.returncode)


@pytest.fixture
def start(tmp_path: Path) -> t.Iterator[t.Callable[..., Served]]:
    started: list[Served] = []

    def run(args: list[str], **kw: t.Any) -> Served:
        served = Served(args, tmp_path, **kw)
        started.append(served)
        return served

    yield run
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(5)
        served.log.close()


def _jwks_ready(served: Served) -> bool:
    return requests.get(served.base + "/.well-known/jwks.json", timeout=2).status_code == 200


def test_serve_without_jobs(instance: Path, start: t.Callable[[list[str]], Served]) -> None:
    server = start(["serve", "--instance", str(instance), "--port", "{port}", "--workers", "2",
                    "--no-jobs"])
    server.wait_for(lambda: _jwks_ready(server))
    r = requests.get(server.base + "/.well-known/jwks.json?token=query-secret-xyz", timeout=10)
    assert r.status_code == 200
    assert [k["hk_site"] for k in r.json()["keys"]] == ["hub"]
    assert "max-age=" in r.headers["Cache-Control"]
    unsigned = requests.get(server.base + DIRECTORY, timeout=10)
    assert unsigned.status_code == 401 and unsigned.json()["code"] == "unsigned_request"
    assert server.stop() == 0
    logs = server.logs()
    assert "/.well-known/jwks.json" in logs  # the access log...
    assert "query-secret-xyz" not in logs  # ...without query strings
    assert "Hub jobs running" not in logs
    with sqlite3.connect(instance / "hub.db") as conn:
        assert conn.execute("SELECT count(*) FROM hub_job_runs").fetchone()[0] == 0


def test_gunicorn_serves_the_hub_of_the_instance_in_the_environment(
    instance: Path, start: t.Callable[..., Served]
) -> None:
    server = start(["--workers", "2", "--bind", "127.0.0.1:{port}", "--no-control-socket",
                    "hub:create_app()"], command=[sys.executable, "-m", "gunicorn"],
                   env=clean_env(HEADLESSKEY_HUB_INSTANCE=str(instance)))
    server.wait_for(lambda: _jwks_ready(server))
    meta = requests.get(server.base + "/.well-known/headlesskey-federation", timeout=10)
    assert meta.status_code == 200 and meta.json()["issuer"] == "https://hub.example.com"
    unsigned = requests.get(server.base + DIRECTORY, timeout=10)
    assert unsigned.status_code == 401 and unsigned.json()["code"] == "unsigned_request"
    assert server.stop() == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_runs_the_jobs_beside_and_stops_them(
    instance: Path, start: t.Callable[[list[str]], Served]
) -> None:
    server = start(["serve", "--instance", str(instance), "--port", "{port}", "--workers", "1"])
    server.wait_for(lambda: _jwks_ready(server))

    def jobs_ran() -> bool:
        with sqlite3.connect(instance / "hub.db") as conn:
            return bool(conn.execute("SELECT count(*) FROM hub_job_runs").fetchone()[0] == 4)

    server.wait_for(jobs_ran)
    found = re.search(r"Hub jobs running \(pid (\d+)\)", server.logs())
    assert found, server.logs()
    jobs_pid = int(found.group(1))
    assert _pid_alive(jobs_pid)
    assert server.stop() == 0
    assert not _pid_alive(jobs_pid), server.logs()
    assert "Hub jobs stopped." in server.logs()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_jobs_runs_until_a_signal(
    instance: Path, start: t.Callable[[list[str]], Served], sig: int
) -> None:
    jobs = start(["jobs", "--instance", str(instance)])
    jobs.wait_for(lambda: "Hub jobs running" in jobs.logs())
    assert jobs.stop(sig) == 0
    assert "Hub jobs stopped." in jobs.logs()
    assert "Traceback" not in jobs.logs()


def test_the_command_lists_its_verbs() -> None:
    result = hub_cmd("--help")
    assert result.returncode == 0
    for verb in ("init", "serve", "jobs", "admins", "sites", "db"):
        assert re.search(rf"^\s+{verb}\b", result.stdout, re.M), result.stdout
    sites_help = hub_cmd("sites", "--help").stdout
    for verb in ("add", "list", "suspend", "resume", "remove", "rotate-secret", "import"):
        assert verb in sites_help
    admins_help = hub_cmd("admins", "--help").stdout
    for verb in ("create", "list", "set-password", "unlock", "disable", "enable"):
        assert re.search(rf"^\s+{verb}\b", admins_help, re.M), admins_help
