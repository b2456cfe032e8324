"""HeadlessKey benchmarks: ``./dev bench`` (full run) or ``./dev bench --quick`` (CI smoke pass).

Every server is gunicorn with 2 sync workers on 127.0.0.1, every load is wrk (``-t2 -c16``);
endpoints compared with each other are measured in alternating rounds (each round runs every
endpoint once, in a rotated order) and the medians are reported with their ratios. Writes
``bench/RESULTS.md`` (or ``--out``) and prints each figure as it is measured. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import typing as t
import urllib.error
import urllib.request
from dataclasses import dataclass
from dataclasses import field
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
PREFIX = "/wp-json/headlesskey/v1"
ISSUER = "https://auth.example.test"
AUDIENCE = "example-api"
PASSWORD = "correct horse battery staple"  # noqa: S105 - the benchmark user's
ALGORITHMS = ("HS256", "RS256", "ES256")
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_DEFAULT = "redis://127.0.0.1:6379/8"
PG_DB_PREFIX = "hkbench_"  # every database this command creates (and drops) starts so


@dataclass
class Profile:
    """How long and how big: the full run, or the CI smoke pass (``--quick``)."""

    duration: int  # seconds of wrk per measurement
    rounds: int
    big: int  # "10^6" rows
    small: int  # "10^3" rows
    audit_rows: int
    audit_queries: int  # requests per filter set
    hub_sites: int
    sso_assertions: int

    @property
    def label(self) -> str:
        return "quick" if self.duration < 5 else "full"


FULL = Profile(duration=6, rounds=5, big=1_000_000, small=1_000, audit_rows=1_000_000,
               audit_queries=60, hub_sites=100, sso_assertions=3000)
QUICK = Profile(duration=1, rounds=1, big=10_000, small=1_000, audit_rows=10_000,
                audit_queries=10, hub_sites=10, sso_assertions=600)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: t.Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# load generation: wrk, or a clearly labelled Python fallback


def precompile() -> None:
    """Byte-compile our packages and the apps, as installing a package does. Where
    PYTHONDONTWRITEBYTECODE is set (and the checkout is installed editable), every worker would
    otherwise compile the sources again as it boots: slower starts, and the compiler's memory in
    each worker's peak."""
    import compileall

    for folder in (ROOT / "agent", ROOT / "hub", BENCH / "apps"):
        compileall.compile_dir(folder, quiet=1)


def ensure_wrk() -> str | None:
    """The wrk binary; installed with apt-get when missing (as root), else None (fallback)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("wrk is missing: installing Debian's package")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "install", "-y", "-qq", "wrk"],
                    ["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            subprocess.run(cmd, env=env, capture_output=True, check=False)  # noqa: S603
            if shutil.which("wrk"):
                return shutil.which("wrk")
    log("wrk is not available: using the Python load generator (numbers not comparable)")
    return None


@dataclass
class Request:
    method: str
    path: str
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class Load:
    """Sends load to 127.0.0.1 for a bounded time; returns wrk's summary as a dict."""

    def __init__(self, wrk: str | None, threads: int = 2, connections: int = 16) -> None:
        self.wrk = wrk
        self.threads = threads
        self.connections = connections
        self.name = "wrk" if wrk else "python-fallback"

    def run(self, url: str, seconds: int, request: Request | None = None,
            once: list[Request] | None = None, workdir: Path | None = None) -> dict[str, t.Any]:
        """``request`` repeated, or each of ``once`` sent once (split between the threads)."""
        if self.wrk is None:
            return self._python(url, seconds, request, once)
        cmd = [self.wrk, f"-t{self.threads}", f"-c{self.connections}", f"-d{seconds}s",
               "--timeout", "10s"]
        env = dict(os.environ, WRK_THREADS=str(self.threads))
        if once is not None:
            assert workdir is not None
            path = workdir / f"requests-{secrets.token_hex(4)}.tsv"
            path.write_text("".join(
                "\t".join([r.method, r.path, r.body, *(f"{k}: {v}" for k, v in r.headers.items())])
                + "\n" for r in once))
            env["WRK_REQUESTS"] = str(path)
            cmd += ["-s", str(BENCH / "wrk" / "replay.lua"), url]
        else:
            assert request is not None
            cmd += ["-s", str(BENCH / "wrk" / "bench.lua")]
            for k, v in request.headers.items():
                cmd += ["-H", f"{k}: {v}"]
            if request.method != "GET":
                env["WRK_METHOD"] = request.method
            if request.body:
                env["WRK_BODY"] = request.body
            cmd.append(url.rstrip("/") + request.path)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True,  # noqa: S603
                             timeout=seconds + 60, check=False)
        match = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
        if match is None:
            raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
        return t.cast(dict[str, t.Any], json.loads(match.group(1)))

    def _python(self, url: str, seconds: int, request: Request | None,
                once: list[Request] | None) -> dict[str, t.Any]:
        host, port = url.removeprefix("http://").split("/")[0].split(":")
        latencies: list[float] = []
        errors = {"status": 0, "connect": 0}
        lock = threading.Lock()
        pending = list(once or [])
        deadline = time.monotonic() + seconds

        def worker() -> None:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            mine: list[float] = []
            while time.monotonic() < deadline:
                if once is not None:
                    with lock:
                        if not pending:
                            break
                        req = pending.pop(0)
                else:
                    assert request is not None
                    req = request
                headers = dict(req.headers)
                if req.body:
                    headers["Content-Type"] = "application/json"
                start = time.perf_counter()
                try:
                    conn.request(req.method, req.path, body=req.body or None, headers=headers)
                    response = conn.getresponse()
                    response.read()
                except OSError:
                    errors["connect"] += 1
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=10)
                    continue
                mine.append(time.perf_counter() - start)
                if response.status >= 400:
                    errors["status"] += 1
            with lock:
                latencies.extend(mine)

        begin = time.monotonic()
        workers = [threading.Thread(target=worker) for _ in range(self.connections)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.monotonic() - begin
        latencies.sort()

        def pct(p: float) -> float:
            return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3 \
                if latencies else float("nan")

        return {"requests": len(latencies), "duration_s": elapsed,
                "rps": len(latencies) / elapsed, "p50_ms": pct(0.5), "p90_ms": pct(0.9),
                "p99_ms": pct(0.99), "err_status": errors["status"],
                "err_connect": errors["connect"], "err_read": 0, "err_write": 0,
                "err_timeout": 0}


# ---------------------------------------------------------------------------------------------
# processes


def http_json(method: str, url: str, body: t.Any = None, token: str | None = None,
              headers: dict[str, str] | None = None,
              timeout: float = 30) -> tuple[int, t.Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_http(url: str, proc: subprocess.Popen[bytes], logfile: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited {proc.returncode}\n{logfile.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {seconds:.0f} s\n{logfile.read_text()[-3000:]}")


class Processes:
    """Every process started by the run; all stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.servers: dict[str, Server] = {}  # gunicorn servers by name

    def start(self, name: str, argv: list[str], env: dict[str, str], ready: str,
              cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        logfile = self.logs / f"{name}.log"
        with logfile.open("wb") as out:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out,  # noqa: S603
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        wait_http(ready, proc, logfile)
        return proc

    def gunicorn(self, name: str, app: str, env: dict[str, str], ready_path: str = "/",
                 workers: int = 2) -> Server:
        port = free_port()
        argv = [str(BIN / "gunicorn"), "-w", str(workers), "-b", f"127.0.0.1:{port}",
                "--chdir", str(BENCH), "--log-level", "warning", app]
        url = f"http://127.0.0.1:{port}"
        proc = self.start(name, argv, env, url + ready_path)
        server = self.servers[name] = Server(name, url, proc)
        return server

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()
        self.servers.clear()


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pids: t.Iterable[int]) -> dict[int, float]:
    """User plus system CPU seconds of each process still running, by pid."""
    times = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited
        times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return times


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`cpu_times` samples (a process started between
    them counts from zero)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def system_idle() -> float:
    """Seconds all CPUs of the machine have spent idle (waiting for I/O included) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    # PostgreSQL: the server holding the app's database, and the database's name
    pg_url: str | None = None
    database: str | None = None

    def workers(self) -> list[int]:
        return children(self.proc.pid)

    def database_backends(self) -> list[int]:
        """Pids of the PostgreSQL server processes serving the app's database connections."""
        if self.pg_url is None:
            return []
        import psycopg

        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            return [r[0] for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,))]


# ---------------------------------------------------------------------------------------------
# databases


class Backend:
    """SQLite files under the work folder, or PostgreSQL databases named ``hkbench_*``."""

    def __init__(self, name: str, work: Path, pg_url: str | None = None) -> None:
        self.name = name
        self.work = work
        self.pg_url = pg_url

    def url(self, db: str) -> str:
        if self.pg_url is None:
            path = self.work / "db" / f"{db}.db"
            path.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return f"sqlite:///{path}"
        import psycopg

        name = PG_DB_PREFIX + db
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')  # our own, prefixed, only
            conn.execute(f'CREATE DATABASE "{name}"')
        base = self.pg_url.rsplit("/", 1)[0]
        return f"{base}/{name}"

    def drop_all(self) -> None:
        if self.pg_url is None:
            return
        import psycopg

        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            names = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (PG_DB_PREFIX + "%",))]
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @property
    def sqlite(self) -> bool:
        return self.pg_url is None

    def series(self, n: int) -> tuple[str, str]:
        """(WITH prefix, FROM source) producing rows x = 1..n in SQL."""
        if self.sqlite:
            return (f"WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s "  # noqa: S608
                    f"WHERE x < {int(n)}) ", "s")
        return "", f"generate_series(1, {int(n)}) AS s(x)"

    def seconds_ago(self, expr: str) -> str:
        """SQL for a UTC time ``expr`` seconds ago, as the agent stores it."""
        if self.sqlite:
            return (f"strftime('%Y-%m-%d %H:%M:%S', 'now', (-({expr})) || ' seconds') "
                    f"|| '.000000'")
        return f"(now() AT TIME ZONE 'utc') - ({expr}) * interval '1 second'"


def keys(folder: Path) -> Path:
    """HS256 secret, RS256 2048-bit and ES256 P-256 keys, shared by the peers and the agent."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric import rsa

    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "hs256.secret"
    if not secret.exists():
        secret.write_text(secrets.token_bytes(32).hex())
    makers = {"rs256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
              "es256": lambda: ec.generate_private_key(ec.SECP256R1())}
    for stem, make in makers.items():
        path = folder / f"{stem}_private.pem"
        if not path.exists():
            path.write_bytes(make().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
    return folder


# ---------------------------------------------------------------------------------------------
# the agent under test


@dataclass
class AgentSite:
    name: str
    algorithm: str
    env: dict[str, str]
    server: Server | None = None
    token: str = ""
    user_id: int = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.profile = dataclasses.replace(
            QUICK if args.quick else FULL,
            **{k: v for k, v in (("duration", args.duration), ("rounds", args.rounds)) if v})
        self.work = Path(args.work).resolve()
        if self.work.exists():
            shutil.rmtree(self.work)
        (self.work / "logs").mkdir(parents=True)
        self.keys = keys(self.work / "keys")
        self.procs = Processes(self.work / "logs")
        self.load = Load(ensure_wrk())
        self.results: dict[str, dict[str, t.Any]] = {}
        self.notes: list[str] = []
        self.base_env = {k: v for k, v in os.environ.items()
                         if not k.startswith(("HEADLESSKEY_", "JWT_", "ARGON2_"))
                         and k != "DATABASE_URL"}
        self.base_env.update(BENCH_KEYS=str(self.keys), JWT_ISSUER=ISSUER, JWT_AUDIENCE=AUDIENCE,
                             PYTHONUNBUFFERED="1")

    # -- helpers --------------------------------------------------------------------------

    def rounds(self, targets: dict[str, tuple[str, Request]],
               seconds: int | None = None) -> dict[str, dict[str, t.Any]]:
        """Alternating rounds over ``targets`` (name -> (base url, request)); medians by name,
        with each round's req/s and the CPU its server's workers (and, on PostgreSQL, the
        server processes of the app's database connections) spent per request."""
        seconds = seconds or self.profile.duration
        names = list(targets)
        servers = {s.url: s for s in self.procs.servers.values()}
        runs: dict[str, list[dict[str, t.Any]]] = {n: [] for n in names}
        for r in range(self.profile.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                url, request = targets[name]
                runs[name].append(self.measure(servers.get(url), url, seconds, request))
        out = {}
        for name, rs in runs.items():
            out[name] = {
                "rps": median(x["rps"] for x in rs),
                "p50_ms": median(x["p50_ms"] for x in rs),
                "p99_ms": median(x["p99_ms"] for x in rs),
                "rounds": [x["rps"] for x in rs],  # req/s of each round, unrounded
                "cpu_ms": median(x["cpu_ms"] for x in rs),
                "db_cpu_ms": median(x["db_cpu_ms"] for x in rs),
                "idle_ms": median(x["idle_ms"] for x in rs),
                "errors": sum(x["err_status"] + x["err_connect"] + x["err_read"]
                              + x["err_timeout"] for x in rs),
            }
            each = [round(x) for x in out[name]["rounds"]]
            cpu, idle = out[name]["cpu_ms"], out[name]["idle_ms"]
            log(f"  {name}: {out[name]['rps']:.0f} req/s (rounds {each}, "
                f"errors {out[name]['errors']}; worker CPU {cpu:.3f} ms/request, "
                f"cores idle {idle:.3f} ms/request)")
        return out

    def measure(self, server: Server | None, url: str, seconds: int,
                request: Request) -> dict[str, t.Any]:
        """One wrk run, with the CPU per request of ``server``'s workers and database
        connections (NaN where not known), and the time per request the machine's cores sat
        idle meanwhile."""
        workers = cpu_times(server.workers()) if server else {}
        backends = cpu_times(server.database_backends()) if server else {}
        idle = system_idle()
        result = self.load.run(url, seconds, request)
        nan = float("nan")
        served = result["requests"] or nan
        result["idle_ms"] = (system_idle() - idle) * 1e3 / served
        result["cpu_ms"] = (cpu_spent(workers, cpu_times(server.workers())) * 1e3 / served
                            if server else nan)
        result["db_cpu_ms"] = (cpu_spent(backends, cpu_times(server.database_backends()))
                               * 1e3 / served if server and server.pg_url else nan)
        return result

    def peer_env(self, algorithm: str) -> dict[str, str]:
        return dict(self.base_env, JWT_ALGORITHM=algorithm)

    def agent_env(self, backend: Backend, name: str, algorithm: str) -> dict[str, str]:
        instance = self.work / backend.name / name
        instance.mkdir(parents=True, exist_ok=True)
        env = dict(self.base_env,
                   HEADLESSKEY_INSTANCE=str(instance),
                   HEADLESSKEY_SECRET_KEY=secrets.token_urlsafe(48),
                   HEADLESSKEY_ALGORITHM=algorithm,
                   HEADLESSKEY_DATABASE_URL=backend.url(f"{backend.name}_{name}"),
                   HEADLESSKEY_SITE_URL=ISSUER,
                   HEADLESSKEY_ISSUER=ISSUER,
                   HEADLESSKEY_AUDIENCE=AUDIENCE,
                   HEADLESSKEY_ACCESS_TOKEN_TTL="7200",  # noqa: S106 - seconds
                   HEADLESSKEY_MAIL_BACKEND="null",
                   HEADLESSKEY_AUTO_MIGRATE="0")
        if algorithm != "HS256":
            pem = self.keys / f"{algorithm.lower()}_private.pem"
            env["HEADLESSKEY_PRIVATE_KEY_FILE"] = str(pem)
        return env

    def prepare_agent(self, backend: Backend, name: str, algorithm: str,
                      admin: bool = False, **extra: str) -> AgentSite:
        """Migrate the agent's database and create its user (in this process, before serving)."""
        env = dict(self.agent_env(backend, name, algorithm), **extra)
        from flask import Flask

        from agent import HeadlessKey
        from agent.services import accounts

        app = Flask(f"bench-{name}", instance_path=env["HEADLESSKEY_INSTANCE"])
        app.config.update({k: v for k, v in env.items() if k.startswith("HEADLESSKEY_")})
        app.config["HEADLESSKEY_AUTO_MIGRATE"] = True
        HeadlessKey(app)
        state = app.extensions["headlesskey"]
        with app.app_context(), state.session_factory() as db:
            user = accounts.create_user(db, state, username="alice", email="alice@example.com",
                                        password=PASSWORD, display_name="Alice",
                                        roles=["administrator"] if admin else None)
            db.commit()
            user_id = user.id
        state.engine.dispose()
        return AgentSite(name, algorithm, env, user_id=user_id)

    def serve_agent(self, backend: Backend, site: AgentSite) -> AgentSite:
        site.server = self.procs.gunicorn(f"{backend.name}-{site.name}", "apps.agent_site:app",
                                          site.env, PREFIX + "/openapi.json")
        if not backend.sqlite:
            site.server.pg_url = backend.pg_url
            site.server.database = site.env["HEADLESSKEY_DATABASE_URL"].rsplit("/", 1)[1]
        status, body = http_json("POST", site.url + PREFIX + "/token",
                                 {"username": "alice", "password": PASSWORD})
        if status != 200:
            raise RuntimeError(f"{site.name}: login failed: {status} {body}")
        site.token = body["token"]
        status, body = http_json("GET", site.url + "/protected", token=site.token)
        if status != 200:
            raise RuntimeError(f"{site.name}: /protected answered {status} {body}")
        return site

    def sql(self, site: AgentSite, statement: str) -> None:
        """Run one statement of ours (built from integers and constants only)."""
        from sqlalchemy import text

        from agent.db import make_engine

        engine = make_engine(site.env["HEADLESSKEY_DATABASE_URL"])
        with engine.begin() as conn:
            conn.execute(text(statement))
        if engine.dialect.name == "postgresql":
            # What autovacuum does soon after a bulk load: without statistics the planner
            # would scan the whole table for filters its indexes serve.
            with engine.connect() as conn:
                conn.execute(text("ANALYZE"))
        engine.dispose()

    # -- figures --------------------------------------------------------------------------

    def protected_routes(self, backend: Backend) -> None:
        log(f"[{backend.name}] protected route: agent vs bare Flask vs flask-jwt-extended")
        peers = {"bare": self.procs.gunicorn(f"{backend.name}-bare", "apps.bare:app",
                                             self.peer_env("HS256"), "/hello")}
        targets: dict[str, tuple[str, Request]] = {
            "bare": (peers["bare"].url, Request("GET", "/hello"))}
        for alg in ALGORITHMS:
            fje = self.procs.gunicorn(f"{backend.name}-fje-{alg}", "apps.fje:app",
                                      self.peer_env(alg), "/protected")
            status, body = http_json("POST", fje.url + "/token",
                                     {"username": "alice", "password": PASSWORD})
            assert status == 200, body
            token = body["access_token"]
            status, body = http_json("GET", fje.url + "/protected", token=token)
            assert status == 200, body
            targets[f"fje-{alg}"] = (fje.url, Request("GET", "/protected",
                                                      headers={"Authorization": f"Bearer {token}"}))
            site = self.serve_agent(backend, self.prepare_agent(backend, f"agent-{alg}", alg))
            targets[f"agent-{alg}"] = (site.url, Request(
                "GET", "/protected", headers={"Authorization": f"Bearer {site.token}"}))
            self.agents[alg] = site
        # The same HS256 route reading the session row on every request (no lease).
        site = self.serve_agent(backend, self.prepare_agent(
            backend, "agent-HS256-read", "HS256", HEADLESSKEY_SESSION_LEASE_MS="0"))
        targets["agent-HS256-read"] = (site.url, Request(
            "GET", "/protected", headers={"Authorization": f"Bearer {site.token}"}))
        self.agents["HS256-read"] = site
        self.results[backend.name]["protected"] = self.rounds(targets)
        self.bare_url = peers["bare"].url

    def scale(self, backend: Backend) -> None:
        """The HS256 protected route with many revoked sessions or users in the database, each
        request reading its session row (no lease: the read's cost is what is measured)."""
        p = self.profile
        log(f"[{backend.name}] protected route (HS256) with 10^3/10^6 revoked tokens and users")
        variants = {"revoked-small": ("revoked", p.small), "revoked-big": ("revoked", p.big),
                    "users-small": ("users", p.small), "users-big": ("users", p.big)}
        base = self.agents["HS256-read"]
        targets = {"base": (base.url, Request(
            "GET", "/protected", headers={"Authorization": f"Bearer {base.token}"}))}
        sizes = {}
        for name, (kind, n) in variants.items():
            site = self.prepare_agent(backend, f"scale-{name}", "HS256",
                                      HEADLESSKEY_SESSION_LEASE_MS="0")
            started = time.monotonic()
            if kind == "users":
                self.seed_users(backend, site, n)
            else:
                self.seed_revoked(backend, site, n)
            log(f"  seeded {n} {kind} for {name} in {time.monotonic() - started:.1f} s")
            self.serve_agent(backend, site)
            sizes[name] = n
            targets[name] = (site.url, Request(
                "GET", "/protected", headers={"Authorization": f"Bearer {site.token}"}))
        result = self.rounds(targets)
        for name, n in sizes.items():
            result[name]["rows"] = n
        self.results[backend.name]["scale"] = result

    def seed_users(self, backend: Backend, site: AgentSite, n: int) -> None:
        with_, source = backend.series(n)
        now = backend.seconds_ago("0")
        self.sql(site, (
            f"{with_}INSERT INTO hk_users (user_login, login_key, email, email_key, display_name, "  # noqa: S608
            "password_hash, roles, status, email_verified, created_at, password_changed_at) "
            "SELECT 'user' || x, 'user' || x, 'user' || x || '@example.com', "
            "'user' || x || '@example.com', 'User ' || x, "
            "'$argon2id$v=19$m=19456,t=2,p=1$c2VlZHNlZWRzZWVk$c2VlZHNlZWRzZWVkc2VlZHNlZWRzZWVkc2VlZA',"
            f" '[\"subscriber\"]', 'active', {'1' if backend.sqlite else 'true'}, {now}, {now} "
            f"FROM {source}"))

    def seed_revoked(self, backend: Backend, site: AgentSite, n: int) -> None:
        """``n`` revoked sessions (each an access token refused from then on) of 1000 users."""
        self.seed_users(backend, site, 1000)
        with_, source = backend.series(n)
        self.sql(site, (
            f"{with_}INSERT INTO hk_sessions (id, user_id, created_at, last_seen_at, expires_at, "  # noqa: S608
            "revoked_at, revoke_reason, ip, user_agent, device, access_jti, access_iat, "
            f"access_exp) SELECT 'revoked' || x, {site.user_id} + 1 + (x % 1000), "
            f"{backend.seconds_ago('3600')}, {backend.seconds_ago('3600')}, "
            f"{backend.seconds_ago('-86400')}, {backend.seconds_ago('60')}, 'revoked', "
            "'10.0.0.1', 'bench', 'bench', 'jti' || x, 0, 0 "
            f"FROM {source}"))

    def login(self, backend: Backend) -> None:
        log(f"[{backend.name}] login vs the argon2id bound")
        site = self.agents["HS256"]
        body = json.dumps({"username": "alice", "password": PASSWORD})
        bound = self.bare_url
        targets = {
            "argon2-bound": (bound, Request("POST", "/argon2", body=json.dumps(
                {"password": PASSWORD}))),
            "agent-login": (site.url, Request("POST", PREFIX + "/token", body=body)),
            "fje-login": (self.fje_login_url(backend), Request("POST", "/token", body=body)),
        }
        if not backend.sqlite and self.redis_answers():
            # The production layout: the brute-force counters in Redis, the rest in PostgreSQL.
            with_redis = self.serve_agent(backend, self.prepare_agent(
                backend, "login-redis", "HS256", HEADLESSKEY_REDIS_URL=self.args.redis))
            targets["agent-login-redis"] = (with_redis.url,
                                            Request("POST", PREFIX + "/token", body=body))
            self.agents["HS256, counters in Redis"] = with_redis  # its worker's memory too
        self.results[backend.name]["login"] = self.rounds(targets)

    def redis_answers(self) -> bool:
        import redis

        try:
            client = redis.Redis.from_url(self.args.redis, socket_timeout=2)
            client.flushdb()  # the bench's own database number: counters of earlier runs
            return True
        except (redis.RedisError, ValueError) as exc:
            self.notes.append(f"Redis at {self.args.redis} did not answer ({exc}): the "
                              "PostgreSQL + Redis login figure was not measured.")
            return False

    def fje_login_url(self, backend: Backend) -> str:
        """The HS256 peer started for the protected-route figure."""
        server = self.procs.servers.get(f"{backend.name}-fje-HS256")
        if server is None:
            raise RuntimeError("the flask-jwt-extended HS256 peer is not running")
        return server.url

    def audit_logs(self, backend: Backend) -> None:
        p = self.profile
        log(f"[{backend.name}] admin log query over {p.audit_rows} audit rows")
        site = self.prepare_agent(backend, "audit", "HS256", admin=True)
        started = time.monotonic()
        self.seed_audit(backend, site, p.audit_rows)
        log(f"  seeded {p.audit_rows} audit rows in {time.monotonic() - started:.1f} s")
        self.serve_agent(backend, site)
        since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
        until = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        day = [(dt.datetime.now(dt.UTC) - dt.timedelta(days=d)).strftime("%Y-%m-%dT%H:%M:%SZ")
               for d in (21, 20)]
        queries = {
            "event": "event=login.failed",
            "user": "user=4242",
            "ip": "ip=10.0.7.7",
            "outcome+since": f"outcome=failure&since={since}",
            "event+user": "event=login.succeeded&user=80",
            "one day, 20 days ago": f"since={day[0]}&until={day[1]}",
            "event+until+limit=200": f"event=token.refreshed&until={until}&limit=200",
            "none (newest page)": "",
        }
        host, port = site.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {"Authorization": f"Bearer {site.token}"}
        per_query: dict[str, list[float]] = {name: [] for name in queries}
        counts: dict[str, int] = {}
        for _ in range(p.audit_queries):
            for name, query in queries.items():
                start = time.perf_counter()
                conn.request("GET", f"{PREFIX}/admin/logs?{query}", headers=headers)
                response = conn.getresponse()
                raw = response.read()
                per_query[name].append((time.perf_counter() - start) * 1e3)
                if response.status != 200:
                    raise RuntimeError(f"/admin/logs?{query}: {response.status} {raw[:300]!r}")
                counts[name] = len(json.loads(raw)["events"])
        conn.close()
        every = sorted(x for xs in per_query.values() for x in xs)
        result = {"rows": p.audit_rows, "requests": len(every),
                  "p50_ms": pct(every, 0.5), "p95_ms": pct(every, 0.95),
                  "queries": {name: {"p50_ms": pct(sorted(xs), 0.5),
                                     "p95_ms": pct(sorted(xs), 0.95), "events": counts[name]}
                              for name, xs in per_query.items()}}
        log(f"  p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms")
        self.results[backend.name]["audit"] = result
        self.agents["audit"] = site

    def seed_audit(self, backend: Backend, site: AgentSite, n: int) -> None:
        """``n`` events over 30 days: 8 kinds, 5000 users, 50000 addresses."""
        with_, source = backend.series(n)
        events = ["login.succeeded", "login.failed", "token.refreshed", "token.revoked",
                  "session.ended", "user.registered", "sso.exchanged", "password.reset_requested"]
        event_case = "CASE x % 8 " + " ".join(
            f"WHEN {i} THEN '{e}'" for i, e in enumerate(events)) + " END"
        outcome_case = "CASE WHEN x % 8 = 1 THEN 'failure' ELSE 'success' END"
        span = 30 * 86400
        age = f"{span} - CAST(x AS BIGINT) * {span} / {n}"
        self.sql(site, (
            f"{with_}INSERT INTO hk_audit (created_at, event, outcome, user_id, login, session_id, "  # noqa: S608
            "ip, user_agent, device, details) "
            f"SELECT {backend.seconds_ago(age)}, {event_case}, "
            f"{outcome_case}, x % 5000, 'user' || (x % 5000), NULL, "
            "'10.0.' || (x % 250) || '.' || (x % 200), 'Mozilla/5.0 bench', 'Chrome on Linux', "
            f"'{{}}' FROM {source}"))

    def sso(self, backend: Backend) -> None:
        from bench.federation import measure_sso

        log(f"[{backend.name}] /sso/exchange under 16 concurrent clients")
        self.results[backend.name]["sso"] = measure_sso(self, backend)

    def hub(self, backend: Backend) -> None:
        from bench.federation import measure_hub

        log(f"[{backend.name}] hub JWKS and directory, {self.profile.hub_sites} sites x 3 keys")
        self.results[backend.name]["hub"] = measure_hub(self, backend)

    def memory(self, backend: Backend) -> None:
        peaks = {}
        for name, site in self.agents.items():
            if site.server is not None:
                workers = site.server.workers()
                if workers:
                    peaks[name] = max(peak_rss_mb(pid) for pid in workers)
        self.results[backend.name]["memory"] = peaks
        if peaks:
            log(f"  peak RSS of an agent worker: {max(peaks.values()):.1f} MB")

    # -- the run --------------------------------------------------------------------------

    def run_backend(self, backend: Backend) -> None:
        self.results[backend.name] = {"measured": [], "failed": {}}
        self.agents: dict[str, AgentSite] = {}
        steps = [("protected", self.protected_routes), ("scale", self.scale),
                 ("login", self.login), ("sso", self.sso), ("audit", self.audit_logs),
                 ("hub", self.hub), ("memory", self.memory)]
        only = set(self.args.only.split(",")) if self.args.only else None
        try:
            for name, step in steps:
                if only and name not in only and name not in ("protected", "memory"):
                    continue
                try:
                    step(backend)
                    self.results[backend.name]["measured"].append(name)
                except Exception as exc:  # noqa: BLE001 - reported in RESULTS.md, run goes on
                    log(f"  {name} failed: {type(exc).__name__}: {exc}")
                    self.results[backend.name]["failed"][name] = f"{type(exc).__name__}: {exc}"
                    if name == "protected":
                        break
        finally:
            self.procs.stop_all()

    def main(self) -> int:
        precompile()
        backends = []
        if "sqlite" in self.args.backends:
            backends.append(Backend("sqlite", self.work))
        if "postgresql" in self.args.backends:
            pg = self.args.postgres
            if pg_reachable(pg):
                backends.append(Backend("postgresql", self.work, pg))
            else:
                self.notes.append(f"PostgreSQL at {pg} was not reachable: not measured.")
                log(self.notes[-1])
        started = dt.datetime.now(dt.UTC)
        self.load_start = os.getloadavg()
        try:
            for backend in backends:
                try:
                    self.run_backend(backend)
                finally:
                    backend.drop_all()
        finally:
            self.procs.stop_all()
        from bench.report import write_report

        out = Path(self.args.out)
        write_report(self, out, started, dt.datetime.now(dt.UTC))
        log(f"wrote {out}")
        failed = any(r["failed"] for r in self.results.values())
        return 1 if failed or not backends else 0


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(round(p * (len(sorted_values) - 1))))]


def pg_reachable(url: str) -> bool:
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001
        return False


def package_versions() -> dict[str, str]:
    names = ["flask", "werkzeug", "sqlalchemy", "pyjwt", "cryptography", "argon2-cffi",
             "gunicorn", "psycopg", "flask-jwt-extended", "headlesskey"]
    out = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def machine() -> dict[str, t.Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 1024 / 1024
    load = os.getloadavg()
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram,
            "python": platform.python_version(), "os": platform.platform(terse=True),
            "loadavg": load}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke pass: 2 s per figure, one round, small tables")
    parser.add_argument("--backends", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql (default both)")
    parser.add_argument("--postgres", default=os.environ.get("HEADLESSKEY_BENCH_DATABASE_URL",
                                                             PG_DEFAULT),
                        help=f"PostgreSQL server (databases {PG_DB_PREFIX}* are created there)")
    parser.add_argument("--redis", default=os.environ.get("HEADLESSKEY_BENCH_REDIS_URL",
                                                          REDIS_DEFAULT),
                        help="Redis for the PostgreSQL + Redis login figure (skipped if down)")
    parser.add_argument("--only", default="",
                        help="comma-separated figures: scale, login, sso, audit, hub "
                             "(the protected-route figure and memory always run)")
    parser.add_argument("--duration", type=int, default=0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds per figure")
    parser.add_argument("--out", default=None, help="report file (default bench/RESULTS.md; "
                                                    "--quick: the work folder's RESULTS.md)")
    parser.add_argument("--work", default=str(BENCH / ".work"), help="scratch folder")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(Path(args.work) / "RESULTS.md") if args.quick else str(BENCH / "RESULTS.md")
    return Bench(args).main()


if __name__ == "__main__":
    sys.exit(main())
