"""The ``headlesskey-agent`` command as a user runs it: init, users create, serve, config errors.

Every test runs the real executable in a separate process; ``serve`` is the real gunicorn server
with two workers, reached over HTTP, sending mail to the real ``smtp`` fixture.
"""

from __future__ import annotations

import re
import secrets
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import tomllib
import typing as t
from pathlib import Path
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import PASSWORD
from tests.conftest import free_port
from tests.conftest import process_env as clean_env

AGENT = shutil.which("headlesskey-agent", path=str(Path(sys.executable).parent)) or shutil.which(
    "headlesskey-agent"
)
PREFIX = "/wp-json/headlesskey/v1"
SECOND_PASSWORD = "violet lantern orbit 42"
THIRD_PASSWORD = "quiet maple harbour 77"


def agent(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    assert AGENT, "the headlesskey-agent executable is not installed next to the interpreter"
    return subprocess.run(
        [AGENT, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env or clean_env(),
        timeout=timeout,
    )


def init(
    instance: Path, algorithm: str, site_url: str = "http://127.0.0.1:8000"
) -> subprocess.CompletedProcess[str]:
    return agent(
        "init", "--instance", str(instance), "--algorithm", algorithm, "--site-url", site_url
    )


def create_user(
    instance: Path, password: str, username: str = "bob", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return agent(
        "users",
        "create",
        "--instance",
        str(instance),
        "--username",
        username,
        "--email",
        f"{username}@example.com",
        "--password-stdin",
        stdin=password + "\n",
        env=env,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exactly one non-empty line on stderr and no traceback."""
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def with_top_level(text: str, line: str) -> str:
    """``site.toml`` with ``line`` as a top-level key (before the first table)."""
    head, sep, tables = text.partition("\n[")
    return f"{head.rstrip()}\n{line}\n{sep.lstrip(chr(10))}{tables}" if sep else f"{text}\n{line}\n"


def with_mail_table(text: str, mail: dict[str, t.Any]) -> str:
    """``site.toml`` with its ``[mail]`` table replaced (TOML forbids defining it twice)."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            skipping = stripped == "[mail]"
        if not skipping:
            out.append(line)
    out += ["", "[mail]"]
    for key, value in mail.items():
        out.append(
            f"{key} = {value!r}".replace("'", '"') if isinstance(value, str) else f"{key} = {value}"
        )
    return "\n".join(out) + "\n"


class Server:
    """``headlesskey-agent serve`` in a subprocess; always stopped by the fixture."""

    def __init__(self, instance: Path, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.out = (log_dir / f"serve-{self.port}.out").open("w+")
        self.err = (log_dir / f"serve-{self.port}.err").open("w+")
        assert AGENT
        self.proc = subprocess.Popen(
            [
                AGENT,
                "serve",
                "--instance",
                str(instance),
                "--port",
                str(self.port),
                "--workers",
                "2",
            ],
            stdout=self.out,
            stderr=self.err,
            stdin=subprocess.DEVNULL,
            env=env or clean_env(),
        )

    def logs(self) -> str:
        self.out.flush()
        self.err.flush()
        return Path(self.out.name).read_text() + Path(self.err.name).read_text()

    def wait_ready(self, timeout: float = 30) -> dict[str, t.Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                r = requests.get(self.base + "/", timeout=2)
                if r.status_code == 200:
                    return t.cast(dict[str, t.Any], r.json())
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve did not answer within {timeout}s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # gunicorn's arbiter stops its workers on SIGTERM
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.out.close()
        self.err.close()


@pytest.fixture
def serve(tmp_path: Path) -> t.Iterator[t.Callable[..., Server]]:
    started: list[Server] = []

    def start(instance: Path, env: dict[str, str] | None = None) -> Server:
        server = Server(instance, tmp_path, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One HS256 instance made by ``init``, copied by the tests that break its settings."""
    instance = tmp_path_factory.mktemp("template") / "site"
    result = init(instance, "HS256")
    assert result.returncode == 0, result.stderr
    return instance


@pytest.fixture
def instance(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "site"
    shutil.copytree(template, copy)
    return copy


# ---------------------------------------------------------------------------------------------
# init


@pytest.mark.parametrize("algorithm", ["HS256", "RS256", "ES256"])
def test_init_creates_an_instance(tmp_path: Path, algorithm: str) -> None:
    instance = tmp_path / "site"
    result = init(instance, algorithm, "https://shop.example/")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    site = instance / "site.toml"
    settings = tomllib.loads(site.read_text())
    assert settings["algorithm"] == algorithm
    assert settings["site_url"] == "https://shop.example"
    assert settings["mail"]["backend"] == "console"

    secret = instance / "secret.key"
    assert len(secret.read_bytes().strip()) >= 32
    private = [site, secret]
    if algorithm == "HS256":
        assert not (instance / "signing-key.pem").exists()
    else:
        pem = instance / "signing-key.pem"
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(pem.read_bytes(), password=None)
        assert isinstance(
            key, rsa.RSAPrivateKey if algorithm == "RS256" else ec.EllipticCurvePrivateKey
        )
        private.append(pem)
    for path in private:
        assert mode(path) == 0o600, (path.name, oct(mode(path)))
    assert mode(instance) & 0o077 == 0, oct(mode(instance))

    db = instance / "headlesskey.db"
    assert db.is_file()
    with sqlite3.connect(db) as conn:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    assert {"hk_users", "hk_sessions", "hk_refresh_tokens"} <= tables

    # A second init refuses to overwrite anything.
    before = {
        p.name: p.read_bytes()
        for p in instance.iterdir()
        if p.is_file() and p.suffix != ".db" and not p.name.endswith(("-wal", "-shm"))
    }
    again = init(instance, algorithm)
    assert again.returncode != 0
    assert "Traceback" not in again.stderr
    assert "overwrite" in again.stderr or "exists" in again.stderr, again.stderr
    after = {name: (instance / name).read_bytes() for name in before}
    assert after == before


def test_init_refuses_over_a_half_made_instance(tmp_path: Path) -> None:
    """A folder with a secret but no site.toml (an interrupted init) is not silently reused."""
    instance = tmp_path / "site"
    instance.mkdir()
    (instance / "secret.key").write_text("keep me " * 8)
    result = init(instance, "HS256")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert (instance / "secret.key").read_text() == "keep me " * 8


# ---------------------------------------------------------------------------------------------
# users create


def test_users_create(instance: Path) -> None:
    result = create_user(instance, PASSWORD)
    assert result.returncode == 0, result.stderr
    assert "bob" in result.stdout
    with sqlite3.connect(instance / "headlesskey.db") as conn:
        rows = conn.execute("SELECT user_login, email, password_hash FROM hk_users").fetchall()
    assert len(rows) == 1
    login, email, password_hash = rows[0]
    assert (login, email) == ("bob", "bob@example.com")
    assert password_hash.startswith("$argon2id$")
    # The password is on no file of the instance.
    for path in instance.iterdir():
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path.name

    # The same username again: one clear line, exit 1.
    again = create_user(instance, SECOND_PASSWORD)
    assert again.returncode == 1
    assert "already" in one_line_error(again).lower()


@pytest.mark.parametrize("weak", ["password", "short", "bobbobbob1", "aaaaaaaaaaaa", "12345678901"])
def test_users_create_refuses_a_weak_password(instance: Path, weak: str) -> None:
    result = create_user(instance, weak, username="bobbobbob")
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = one_line_error(result)
    assert "password" in line.lower()
    with sqlite3.connect(instance / "headlesskey.db") as conn:
        assert conn.execute("SELECT count(*) FROM hk_users").fetchone()[0] == 0


@pytest.mark.parametrize("role", ["edi\x07tor", " editor", "", "r" * 65])
def test_users_create_refuses_a_role_name_that_is_no_role(instance: Path, role: str) -> None:
    """A role with a control character, a space at an end, empty or past 64 characters is a
    usage error (exit 2), and no account is made with it."""
    result = agent("users", "create", "--instance", str(instance), "--username", "bob",
                   "--email", "bob@example.com", "--role", role, "--password-stdin",
                   stdin=PASSWORD + "\n")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "--role" in result.stderr and "printable" in result.stderr
    assert "Traceback" not in result.stderr
    with sqlite3.connect(instance / "headlesskey.db") as conn:
        assert conn.execute("SELECT count(*) FROM hk_users").fetchone()[0] == 0


def test_users_create_needs_password_stdin(instance: Path) -> None:
    result = agent(
        "users",
        "create",
        "--instance",
        str(instance),
        "--username",
        "bob",
        "--email",
        "bob@example.com",
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "password-stdin" in result.stderr


# ---------------------------------------------------------------------------------------------
# serve: the whole lifecycle over HTTP with real mail


def body_of(message: t.Any) -> str:
    return t.cast(bytes, message.get_payload(decode=True)).decode()


def test_serve_lifecycle_with_real_mail(
    tmp_path: Path, smtp: t.Any, serve: t.Callable[..., Server]
) -> None:
    instance = tmp_path / "site"
    assert init(instance, "ES256", "http://127.0.0.1:8000").returncode == 0
    created = create_user(instance, PASSWORD)
    assert created.returncode == 0, created.stderr
    site = instance / "site.toml"
    site.write_text(
        with_mail_table(
            site.read_text(),
            {
                "backend": "smtp",
                "host": "127.0.0.1",
                "port": smtp.port,
                "from": "auth@example.com",
            },
        )
    )
    assert tomllib.loads(site.read_text())["mail"]["port"] == smtp.port

    server = serve(instance)
    index = server.wait_ready()
    assert index["api"] == PREFIX
    api = server.base + PREFIX
    http = requests.Session()

    # Log in, validate, refresh.
    r = http.post(f"{api}/token", json={"username": "bob", "password": PASSWORD}, timeout=10)
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["user"]["user_login"] == "bob"
    v = http.post(
        f"{api}/token/validate", headers={"Authorization": f"Bearer {first['token']}"}, timeout=10
    )
    assert v.status_code == 200 and v.json()["valid"] is True
    r = http.post(
        f"{api}/token/refresh", json={"refresh_token": first["refresh_token"]}, timeout=10
    )
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"]
    # Several requests, so both workers answer: the session lives in the database, not a worker.
    for _ in range(6):
        me = http.get(
            f"{api}/me", headers={"Authorization": f"Bearer {second['token']}"}, timeout=10
        )
        assert me.status_code == 200
        assert me.json()["user_login"] == "bob"

    # Reset by one-time code.
    r = http.post(f"{api}/forgot-password", json={"login": "bob", "delivery": "otp"}, timeout=10)
    assert r.status_code == 200, r.text
    (mail,) = smtp.wait_for("bob@example.com", 1)
    assert mail["From"] == "auth@example.com"
    code = re.search(r"^\s+(\d{6})\s*$", body_of(mail), re.M)
    assert code, body_of(mail)
    r = http.post(
        f"{api}/reset-password",
        json={"login": "bob", "otp": code.group(1), "password": SECOND_PASSWORD},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    # The reset ended every session.
    me = http.get(f"{api}/me", headers={"Authorization": f"Bearer {second['token']}"}, timeout=10)
    assert me.status_code == 401
    smtp.wait_for("bob@example.com", 2)  # the "password changed" notice

    # Reset by link.
    r = http.post(
        f"{api}/forgot-password", json={"email": "bob@example.com", "delivery": "link"}, timeout=10
    )
    assert r.status_code == 200, r.text
    mails = smtp.wait_for("bob@example.com", 3)
    resets = [m for m in mails if "Reset" in m["Subject"]]
    assert len(resets) == 2
    link = re.search(r"https?://\S+", body_of(resets[-1]))
    assert link, body_of(resets[-1])
    url = urlsplit(link.group(0))
    assert f"{url.scheme}://{url.netloc}{url.path}" == "http://127.0.0.1:8000/reset-password"
    query = parse_qs(url.query)
    assert query["login"] == ["bob"]
    r = http.post(
        f"{api}/reset-password",
        json={"login": query["login"][0], "token": query["token"][0], "password": THIRD_PASSWORD},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    # The link works once.
    again = http.post(
        f"{api}/reset-password",
        json={"login": "bob", "token": query["token"][0], "password": PASSWORD},
        timeout=10,
    )
    assert again.status_code == 400

    # Only the final password logs in.
    for old in (PASSWORD, SECOND_PASSWORD):
        r = http.post(f"{api}/token", json={"username": "bob", "password": old}, timeout=10)
        assert r.status_code == 401, old
    r = http.post(f"{api}/token", json={"username": "bob", "password": THIRD_PASSWORD}, timeout=10)
    assert r.status_code == 200, r.text
    # No secret in the access log.
    assert query["token"][0] not in server.logs()


def test_environment_overrides_the_file(instance: Path, serve: t.Callable[..., Server]) -> None:
    site = instance / "site.toml"
    site.write_text(with_top_level(site.read_text(), 'rest_namespace = "file-ns"'))
    env = clean_env(HEADLESSKEY_REST_NAMESPACE="env-ns")
    assert create_user(instance, PASSWORD, env=env).returncode == 0
    server = serve(instance, env)
    assert server.wait_ready()["api"] == "/wp-json/env-ns/v1"
    r = requests.post(
        f"{server.base}/wp-json/env-ns/v1/token",
        json={"username": "bob", "password": PASSWORD},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    old = requests.post(
        f"{server.base}/wp-json/file-ns/v1/token",
        json={"username": "bob", "password": PASSWORD},
        timeout=10,
    )
    assert old.status_code == 404


def test_file_namespace_applies_without_the_environment(
    instance: Path, serve: t.Callable[..., Server]
) -> None:
    """The control for the test above: the file's namespace is used when nothing overrides it."""
    site = instance / "site.toml"
    site.write_text(with_top_level(site.read_text(), 'rest_namespace = "file-ns"'))
    server = serve(instance)
    assert server.wait_ready()["api"] == "/wp-json/file-ns/v1"
    assert (
        requests.get(f"{server.base}/wp-json/file-ns/v1/openapi.json", timeout=10).status_code
        == 200
    )


# ---------------------------------------------------------------------------------------------
# configuration errors: one line naming the setting, no traceback, non-zero exit


CONFIG_ERRORS = {
    "unknown-key": (lambda text: with_top_level(text, "colour = 'blue'"), {}, "colour"),
    "unknown-mail-key": (lambda text: text + "smtp_hostname = 'x'\n", {}, "mail_smtp_hostname"),
    "ttl-not-a-number": (
        lambda text: with_top_level(text, 'access_token_ttl = "abc"'),
        {},
        "access_token_ttl",
    ),
    "ttl-infinite": (
        lambda text: with_top_level(text, "access_token_ttl = inf"),
        {},
        "access_token_ttl",
    ),
    "ttl-too-small": (
        lambda text: with_top_level(text, "access_token_ttl = 1"),
        {},
        "access_token_ttl",
    ),
    "algorithm-hs512": (
        lambda text: text.replace('algorithm = "HS256"', 'algorithm = "HS512"'),
        {},
        "algorithm",
    ),
    "invalid-toml": (lambda text: text + "this is = = not toml [\n", {}, "site.toml"),
    "env-cors": (lambda text: text, {"HEADLESSKEY_CORS": '["not an origin"]'}, "cors"),
    "env-ttl": (lambda text: text, {"HEADLESSKEY_ACCESS_TOKEN_TTL": "soon"}, "access_token_ttl"),
    "pool-size-zero": (lambda text: with_top_level(text, "database_pool_size = 0"), {},
                       "database_pool_size"),
}


@pytest.mark.parametrize("command", ["serve", "users-create"])
@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_are_one_clear_line(instance: Path, case: str, command: str) -> None:
    edit, env_extra, setting = CONFIG_ERRORS[case]
    site = instance / "site.toml"
    original = site.read_text()
    site.write_text(edit(original))
    assert site.read_text() != original or env_extra
    env = clean_env(**env_extra)
    if command == "serve":
        try:
            result = agent(
                "serve",
                "--instance",
                str(instance),
                "--port",
                str(free_port()),
                env=env,
                timeout=20,
            )
        except subprocess.TimeoutExpired:  # it started serving: the bad setting was accepted
            pytest.fail(f"serve accepted the bad setting ({case}) and kept running")
    else:
        result = create_user(instance, PASSWORD, env=env)
    line = one_line_error(result)
    assert setting.lower() in line.lower(), line
    with sqlite3.connect(instance / "headlesskey.db") as conn:
        assert conn.execute("SELECT count(*) FROM hk_users").fetchone()[0] == 0


@pytest.mark.parametrize("command", ["serve", "users-create"])
def test_a_database_under_another_secret_is_one_clear_line(instance: Path, command: str) -> None:
    """A database restored without its secret.key: the stored keys do not decrypt. Start-up
    stops with one line naming the setting, nothing is written, and the original secret works
    again."""
    secret = instance / "secret.key"
    original = secret.read_bytes()
    secret.write_text(secrets.token_urlsafe(48) + "\n")
    if command == "serve":
        try:
            result = agent("serve", "--instance", str(instance), "--port", str(free_port()),
                           env=clean_env(), timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("serve started with a secret the stored keys do not decrypt under")
    else:
        result = create_user(instance, PASSWORD)
    line = one_line_error(result)
    assert "SECRET_KEY" in line and "secret.key" in line, line
    assert original.decode().strip() not in result.stderr + result.stdout
    with sqlite3.connect(instance / "headlesskey.db") as conn:
        assert conn.execute("SELECT count(*) FROM hk_users").fetchone()[0] == 0
    secret.write_bytes(original)
    result = create_user(instance, PASSWORD)
    assert result.returncode == 0, result.stderr


def test_a_good_config_is_accepted(instance: Path) -> None:
    """The control for the cases above: the untouched instance works with the same commands."""
    result = create_user(instance, PASSWORD)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# the agent does not need the hub


def test_agent_imports_without_hub() -> None:
    code = r"""
import importlib, pkgutil, sys
sys.modules["hub"] = None  # any `import hub` now raises ImportError
try:
    import hub  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("blocking hub did not work")
import agent, agent.standalone, agent.cli
for info in pkgutil.walk_packages(agent.__path__, "agent."):
    if not info.name.startswith("agent.migrations"):
        importlib.import_module(info.name)
app = agent.standalone.create_app
assert callable(app)
loaded = sorted(n for n, m in sys.modules.items() if n.split(".")[0] == "hub" and m is not None)
assert not loaded, loaded
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    # The command itself runs with hub unimportable too.
    help_code = (
        "import sys; sys.modules['hub'] = None; sys.argv = ['headlesskey-agent', '--help']; "
        "from agent.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", help_code],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "init" in result.stdout
