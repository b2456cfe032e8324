"""`headlesskey-agent users unlock` and `headlesskey-agent logs` on a real instance folder."""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.standalone import create_app

PASSWORD = "correct horse battery staple"
CHEAP = {
    "HEADLESSKEY_ARGON2_TIME_COST": "1",
    "HEADLESSKEY_ARGON2_MEMORY_COST": "8",
}


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key, value in CHEAP.items():
        monkeypatch.setenv(key, value)
    folder = tmp_path / "site"
    runner = CliRunner()
    result = runner.invoke(main, ["init", "--instance", str(folder), "--algorithm", "HS256"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        ["users", "create", "--instance", str(folder), "--username", "alice",
         "--email", "alice@example.com", "--password-stdin"],
        input=PASSWORD + "\n",
    )
    assert result.exit_code == 0, result.output
    return folder


def login(client: t.Any, password: str) -> int:
    r = client.post("/wp-json/headlesskey/v1/token",
                    json={"username": "alice", "password": password},
                    headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"})
    return t.cast(int, r.status_code)


def test_unlock_lets_a_locked_user_in_and_logs_show_it(instance: Path) -> None:
    app = create_app(instance)
    client = app.test_client()
    assert [login(client, "wrong password here") for _ in range(5)] == [401] * 5
    assert login(client, PASSWORD) == 429

    runner = CliRunner()
    result = runner.invoke(main, ["users", "unlock", "--instance", str(instance),
                                  "--username", "ALICE"])
    assert result.exit_code == 0, result.output
    assert "Unlocked alice" in result.output
    assert login(client, PASSWORD) == 200

    result = runner.invoke(main, ["logs", "--instance", str(instance), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    events = [r["event"] for r in rows]
    # Newest first: the login after the unlock, the unlock, the lock, the failures.
    assert events[:2] == ["login.succeeded", "user.unlocked"]
    assert events.count("login.failed") == 6  # five wrong passwords, one refused while locked
    assert "lockout.started" in events
    assert rows[0]["device"].startswith("Firefox 128")
    assert PASSWORD not in result.output

    table = runner.invoke(main, ["logs", "--instance", str(instance), "--event", "login.failed",
                                 "--outcome", "blocked"])
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["TIME", "EVENT", "OUTCOME"]
    assert len(lines) == 2 and "blocked" in lines[1]
    app.extensions["headlesskey"].engine.dispose()


def test_sessions_end_all_is_the_kill_switch(instance: Path) -> None:
    """S-15: ``sessions end-all --username`` ends one account's sessions; ``--yes`` every
    session of the site; without either it refuses. Tokens stop working at once."""
    runner = CliRunner()
    result = runner.invoke(main, ["users", "create", "--instance", str(instance), "--username",
                                  "bob", "--email", "bob@example.com", "--password-stdin"],
                           input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    app = create_app(instance)
    client = app.test_client()
    api = "/wp-json/headlesskey/v1"

    def session(name: str) -> str:
        r = client.post(f"{api}/token", json={"username": name, "password": PASSWORD})
        assert r.status_code == 200
        return t.cast(str, r.get_json()["token"])

    def works(token: str) -> bool:
        r = client.post(f"{api}/token/validate", headers={"Authorization": f"Bearer {token}"})
        return r.status_code == 200

    alice, alice2, bob = session("alice"), session("alice"), session("bob")
    refused = runner.invoke(main, ["sessions", "end-all", "--instance", str(instance)])
    assert refused.exit_code == 2 and "--yes" in refused.output
    assert works(alice)

    result = runner.invoke(main, ["sessions", "end-all", "--instance", str(instance),
                                  "--username", "alice"])
    assert result.exit_code == 0, result.output
    assert "Ended 2 session(s) of alice" in result.output
    assert not works(alice) and not works(alice2) and works(bob)

    alice = session("alice")
    result = runner.invoke(main, ["sessions", "end-all", "--instance", str(instance), "--yes"])
    assert result.exit_code == 0, result.output
    assert "Ended 2 session(s) at once" in result.output
    assert not works(alice) and not works(bob)
    assert works(session("bob"))  # a new login works

    logs = runner.invoke(main, ["logs", "--instance", str(instance), "--json",
                                "--event", "session.ended"])
    rows = [json.loads(line) for line in logs.output.splitlines()]
    assert [r["details"]["sessions_ended"] for r in rows] == [2, 2]
    app.extensions["headlesskey"].engine.dispose()


def test_cli_errors_are_one_clear_line(instance: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["users", "unlock", "--instance", str(instance),
                                  "--username", "nobody"])
    assert result.exit_code == 1
    assert "no account 'nobody'" in result.output
    result = runner.invoke(main, ["logs", "--instance", str(instance), "--since", "yesterday"])
    assert result.exit_code == 1
    assert "--since" in result.output
    assert "Traceback" not in result.output


def test_users_set_roles_holds_from_the_next_request(instance: Path) -> None:
    """``users set-roles`` replaces an account's roles: the token alice already holds opens the
    admin API at once, and stops opening it at once when the role is taken away."""
    app = create_app(instance)
    client = app.test_client()
    api = "/wp-json/headlesskey/v1"
    r = client.post(f"{api}/token", json={"username": "alice", "password": PASSWORD})
    auth = {"Authorization": f"Bearer {r.get_json()['token']}"}
    assert client.get(f"{api}/admin/logs", headers=auth).status_code == 403

    runner = CliRunner()
    result = runner.invoke(main, ["users", "set-roles", "--instance", str(instance),
                                  "--username", "alice@example.com", "--role", "administrator",
                                  "--role", "editor"])
    assert result.exit_code == 0, result.output
    assert result.output == "Roles of alice: administrator, editor (were: subscriber)\n"
    logs = client.get(f"{api}/admin/logs", headers=auth,
                      query_string={"event": "user.roles_changed"})
    assert logs.status_code == 200
    assert [e["details"] for e in logs.get_json()["events"]] == [
        {"by": "cli", "before": ["subscriber"], "after": ["administrator", "editor"]}]

    result = runner.invoke(main, ["users", "set-roles", "--instance", str(instance),
                                  "--username", "alice", "--no-roles"])
    assert result.exit_code == 0, result.output
    assert result.output == "Roles of alice: (none) (were: administrator, editor)\n"
    assert client.get(f"{api}/admin/logs", headers=auth).status_code == 403
    app.extensions["headlesskey"].engine.dispose()


@pytest.mark.parametrize(("args", "code", "says"), [
    ([], 2, "--no-roles"),
    (["--role", "editor", "--no-roles"], 2, "--no-roles"),
    (["--role", " editor"], 2, "--role"),
    (["--role", "edi\ttor"], 2, "--role"),
    (["--username", "nobody", "--role", "editor"], 1, "no account 'nobody'"),
])
def test_users_set_roles_refusals_are_one_line(instance: Path, args: list[str], code: int,
                                               says: str) -> None:
    if "--username" not in args:
        args = ["--username", "alice", *args]
    result = CliRunner().invoke(main, ["users", "set-roles", "--instance", str(instance), *args])
    assert result.exit_code == code, result.output
    assert says in result.output
    assert "Traceback" not in result.output
    app = create_app(instance)
    with app.app_context():
        from sqlalchemy import text

        with app.extensions["headlesskey"].engine.connect() as conn:
            roles = conn.execute(text("SELECT roles FROM hk_users")).scalar()
            changes = conn.execute(text(
                "SELECT count(*) FROM hk_audit WHERE event = 'user.roles_changed'")).scalar()
    assert roles == '["subscriber"]' and changes == 0
    app.extensions["headlesskey"].engine.dispose()
