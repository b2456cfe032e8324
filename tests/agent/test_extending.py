"""The example of docs/extending.md, run as written: access rules, filters and signals."""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
import typing as t
from pathlib import Path

import jwt
import pytest
import requests
from werkzeug.serving import make_server

from tests.conftest import SERVER_POLL
from tests.conftest import free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def example(tmp_path: Path) -> t.Iterator[t.Any]:
    """Import the doc's first python block as a module and serve its app on loopback."""
    source = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert source, "docs/extending.md has no python example"
    path = tmp_path / "extending_example.py"
    path.write_text(source.group(1))
    spec = importlib.util.spec_from_file_location("extending_example", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["extending_example"] = module
    spec.loader.exec_module(module)
    server = make_server("127.0.0.1", free_port(), module.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": SERVER_POLL},
                              daemon=True)
    thread.start()
    module.base = f"http://127.0.0.1:{server.server_port}"
    yield module
    server.shutdown()
    thread.join(5)
    module.app.extensions["headlesskey"].engine.dispose()
    sys.modules.pop("extending_example", None)
    from agent import signals

    signals.login_succeeded.disconnect(module.remember_login)


def make_user(module: t.Any, username: str, email: str, roles: list[str]) -> None:
    from agent.services import accounts

    state = module.app.extensions["headlesskey"]
    with module.app.app_context(), state.session_factory() as db:
        accounts.create_user(db, state, username=username, email=email, password=PASSWORD,
                             roles=roles)
        db.commit()


def login(module: t.Any, username: str) -> dict[str, t.Any]:
    r = requests.post(f"{module.base}/wp-json/headlesskey/v1/token",
                      json={"username": username, "password": PASSWORD}, timeout=10)
    assert r.status_code == 200, r.text
    return t.cast(dict[str, t.Any], r.json())


def test_the_documented_example_behaves_as_documented(example: t.Any) -> None:
    api = f"{example.base}/wp-json/headlesskey/v1"
    make_user(example, "root", "root@acme.example", ["administrator"])
    make_user(example, "eddie", "eddie@acme.example", ["editor"])
    make_user(example, "sub", "sub@acme.example", ["subscriber"])
    admin = login(example, "root")["token"]

    # Access rule: registration is for administrators only.
    new = {"username": "alice", "email": "alice@acme.example", "password": PASSWORD}
    assert requests.post(f"{api}/register", json=new, timeout=10).status_code == 401
    sub = login(example, "sub")["token"]
    r = requests.post(f"{api}/register", json=new, headers={"Authorization": f"Bearer {sub}"},
                      timeout=10)
    assert r.status_code == 403
    # allow_registration: company addresses only.
    r = requests.post(f"{api}/register", json={**new, "email": "alice@gmail.example"},
                      headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    assert r.status_code == 403
    assert r.json()["code"] == "registration_refused"
    # password_policy: the company's name is refused.
    r = requests.post(f"{api}/register", json={**new, "password": "acme rocket launch pad"},
                      headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    assert r.status_code == 400
    assert "Do not use the company's name in a password." in r.json()["data"]["fields"]["password"]
    r = requests.post(f"{api}/register", json=new, headers={"Authorization": f"Bearer {admin}"},
                      timeout=10)
    assert r.status_code == 201

    # Filters on the login response, the user payload and the token claims.
    body = login(example, "alice")
    assert body["welcome"] == "Hello alice"
    assert body["user"]["avatar"].endswith(f"/{body['user']['ID']}.png")
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["tenant"] == "acme"
    me = requests.get(f"{api}/me", headers={"Authorization": f"Bearer {body['token']}"},
                      timeout=10)
    assert me.json()["avatar"] == body["user"]["avatar"]

    # The site's own routes.
    profile = f"{example.base}/api/profile"
    assert requests.get(profile, timeout=10).status_code == 401
    r = requests.get(profile, headers={"Authorization": f"Bearer {body['token']}"}, timeout=10)
    assert r.json() == {"user": body["user"]["ID"], "roles": ["subscriber"]}
    reports = f"{example.base}/api/reports"
    r = requests.get(reports, headers={"Authorization": f"Bearer {body['token']}"}, timeout=10)
    assert r.status_code == 403
    editor = login(example, "eddie")["token"]
    r = requests.get(reports, headers={"Authorization": f"Bearer {editor}"}, timeout=10)
    assert r.json() == {"reports": [], "tenant": "acme"}

    # Signals: every successful login above reached the receiver, with the client's IP.
    # root, sub, alice, eddie
    assert [ip for _user, ip, _device in example.logins] == ["127.0.0.1"] * 4
