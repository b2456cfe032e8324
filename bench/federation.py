"""The federation figures of ``bench/run.py``: ``/sso/exchange`` and the hub's JWKS and directory.

A hub and agents run as processes made with the real commands (``init``, ``sites add``,
``join``, ``serve``), as ``scripts/demo.py`` and the integration tests start them.
"""

from __future__ import annotations

import json
import subprocess
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import text

from agent.db import make_engine

if t.TYPE_CHECKING:
    from bench.run import Backend
    from bench.run import Bench

PREFIX = "/wp-json/headlesskey/v1"
ISSUE_SECONDS = 25  # assertions live 60 s: issue for at most this long before sending them


def cli(bench: Bench, command: str, *args: str, env: dict[str, str],
        stdin: str | None = None) -> str:
    from bench.run import BIN

    result = subprocess.run([str(BIN / command), *args], input=stdin, text=True,  # noqa: S603
                            capture_output=True, env=env, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command} {' '.join(args[:2])}: {result.stdout}{result.stderr}")
    return result.stdout


def count(url: str, sql: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


def start_hub(bench: Bench, backend: Backend, name: str) -> tuple[Path, str, dict[str, str], str]:
    """``hub init`` of a new instance: (instance, url, env, database url); not started yet."""
    from bench.run import free_port

    instance = bench.work / backend.name / name
    db_url = backend.url(f"{backend.name}_{name}") if not backend.sqlite else \
        f"sqlite:///{instance / 'hub.db'}"
    env = dict(bench.base_env, HEADLESSKEY_HUB_DATABASE_URL=db_url)
    url = f"http://127.0.0.1:{free_port()}"
    cli(bench, "headlesskey-hub", "init", "--instance", str(instance), "--url", url, env=env)
    return instance, url, env, db_url


def serve_hub(bench: Bench, backend: Backend, name: str, instance: Path, url: str,
              env: dict[str, str]) -> None:
    from bench.run import BIN

    port = url.rsplit(":", 1)[1]
    bench.procs.start(f"{backend.name}-{name}",
                      [str(BIN / "headlesskey-hub"), "serve", "--instance", str(instance),
                       "--port", port, "--workers", "2", "--no-jobs"],
                      env, f"{url}/.well-known/headlesskey-federation")


def measure_sso(bench: Bench, backend: Backend) -> dict[str, t.Any]:
    from bench.run import BIN
    from bench.run import PASSWORD
    from bench.run import Request
    from bench.run import free_port
    from bench.run import http_json
    from bench.run import log

    p = bench.profile
    hub_instance, hub_url, hub_env, hub_db = start_hub(bench, backend, "sso-hub")
    sites = {"a": "ES256", "b": "RS256"}
    urls = {k: f"http://127.0.0.1:{free_port()}" for k in sites}
    secrets_ = {}
    for key in sites:
        out = cli(bench, "headlesskey-hub", "sites", "add", "--instance", str(hub_instance),
                  "--name", f"Site {key.upper()}", "--url", urls[key], "--key", f"site-{key}",
                  "--json", env=hub_env)
        secrets_[key] = json.loads(out)["secret"]
    serve_hub(bench, backend, "sso-hub", hub_instance, hub_url, hub_env)
    refresh = 60
    for key, alg in sites.items():
        instance = bench.work / backend.name / f"sso-{key}"
        env = dict(bench.base_env, HEADLESSKEY_MAIL_BACKEND="null",
                   HEADLESSKEY_DIRECTORY_REFRESH=str(refresh),
                   HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES="10000")
        if not backend.sqlite:
            env["HEADLESSKEY_DATABASE_URL"] = backend.url(f"{backend.name}_sso_{key}")
        cli(bench, "headlesskey-agent", "init", "--instance", str(instance), "--algorithm", alg,
            "--site-url", urls[key], "--site-name", f"Site {key.upper()}", env=env)
        cli(bench, "headlesskey-agent", "join", "--instance", str(instance), "--hub", hub_url,
            "--site-key", f"site-{key}", "--secret-stdin", env=env, stdin=secrets_[key] + "\n")
        bench.procs.start(f"{backend.name}-sso-{key}",
                          [str(BIN / "headlesskey-agent"), "serve", "--instance", str(instance),
                           "--port", urls[key].rsplit(":", 1)[1], "--workers", "2", "--no-jobs"],
                          env, urls[key] + "/")

    a, b = urls["a"], urls["b"]
    status, body = http_json("POST", a + PREFIX + "/register", {
        "username": "walker", "email": "walker@example.com", "password": PASSWORD})
    if status != 201:
        raise RuntimeError(f"register at site A: {status} {body}")
    status, body = http_json("POST", a + PREFIX + "/token",
                             {"username": "walker", "password": PASSWORD})
    token = body["token"]

    def issue(_: int) -> str:
        status, body = http_json("POST", a + PREFIX + "/sso/issue", {"target": "site-b"},
                                 token=token)
        if status != 200:
            raise RuntimeError(f"/sso/issue: {status} {body}")
        return json.dumps({k: body[k] for k in ("site_key", "token", "signature")})

    # One exchange first: site B caches the directory and links the identity (steady state).
    status, body = http_json("POST", b + PREFIX + "/sso/exchange", json.loads(issue(0)))
    if status != 200:
        raise RuntimeError(f"/sso/exchange: {status} {body}")
    started = time.monotonic()
    bodies: list[str] = []
    with ThreadPoolExecutor(8) as pool:
        while len(bodies) < p.sso_assertions and time.monotonic() - started < ISSUE_SECONDS:
            bodies += pool.map(issue, range(200))
    log(f"  issued {len(bodies)} assertions at site A in {time.monotonic() - started:.1f} s")
    nonces = "SELECT count(*) FROM hub_nonces"
    before = count(hub_db, nonces)
    requests = [Request("POST", PREFIX + "/sso/exchange", body=body,
                        headers={"Content-Type": "application/json"}) for body in bodies]
    run = bench.load.run(b, p.duration, once=requests, workdir=bench.work)
    calls = count(hub_db, nonces) - before
    errors = run["err_status"] + run["err_connect"] + run["err_read"] + run["err_timeout"]
    result = {"rps": (run["requests"] - errors) / run["duration_s"], "p50_ms": run["p50_ms"],
              "p99_ms": run["p99_ms"], "requests": run["requests"] - errors, "errors": errors,
              "issued": len(bodies), "hub_calls": calls, "directory_refresh": refresh}
    if len(bodies) <= run["requests"]:
        result["note"] = "the assertions ran out before the end of the run"
    log(f"  {result['rps']:.0f} exchanges/s, p50 {run['p50_ms']:.1f} ms, p99 "
        f"{run['p99_ms']:.1f} ms, {errors} refused, {calls} hub calls")
    return result


def measure_hub(bench: Bench, backend: Backend) -> dict[str, t.Any]:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from agent.services.keys import jwk_thumbprint
    from agent.signing import sign_request
    from bench.run import Request
    from bench.run import http_json
    from bench.run import log
    from hub import create_app
    from hub.crypto import parse_site_secret
    from hub.services import keys as key_service
    from hub.services import sites as site_service

    p = bench.profile
    instance, url, env, db_url = start_hub(bench, backend, "hub")
    app = create_app({"HEADLESSKEY_HUB_DATABASE_URL": db_url}, instance_path=str(instance))
    state = app.extensions["headlesskey_hub"]
    first: tuple[str, bytes] | None = None
    with app.app_context(), state.session_factory() as db:
        for i in range(p.hub_sites):
            onboarded = site_service.add_site(db, state, "bench", name=f"Site {i:03d}",
                                              base_url=f"https://site{i:03d}.example.test")
            for n in range(3):
                public = ec.generate_private_key(ec.SECP256R1()).public_key()
                jwk = json.loads(ECAlgorithm.to_jwk(public))
                jwk.update(kid=jwk_thumbprint(jwk), alg="ES256", use="sig")
                key_service.register(db, state, onboarded.site, jwk,
                                     status="active" if n == 2 else "next")
            if first is None:
                first = (onboarded.site.site_key, parse_site_secret(onboarded.secret))
        db.commit()
    state.engine.dispose()
    assert first is not None
    serve_hub(bench, backend, "hub", instance, url, env)
    site_key, secret = first
    path = "/api/v1/directory"
    status, directory = http_json("GET", url + path,
                                  headers=sign_request(secret, site_key, "GET", path))
    if status != 200:
        raise RuntimeError(f"directory: {status} {directory}")
    status, jwks = http_json("GET", url + "/.well-known/jwks.json")
    # Each directory call needs a fresh nonce: enough signed requests for a fast hub.
    signed = [Request("GET", path, headers=sign_request(secret, site_key, "GET", path))
              for _ in range(p.duration * 3000)]
    endpoints: dict[str, list[dict[str, t.Any]]] = {"JWKS": [], "directory (signed)": []}
    for r in range(p.rounds):
        order = list(endpoints) if r % 2 == 0 else list(reversed(endpoints))
        for name in order:
            if name == "JWKS":
                run = bench.load.run(url, p.duration, Request("GET", "/.well-known/jwks.json"))
            else:
                batch = signed[r::p.rounds]
                run = bench.load.run(url, p.duration, once=batch, workdir=bench.work)
            endpoints[name].append(run)
    from bench.run import median

    out = {name: {"rps": median(x["rps"] for x in runs),
                  "p50_ms": median(x["p50_ms"] for x in runs),
                  "p99_ms": median(x["p99_ms"] for x in runs),
                  "errors": sum(x["err_status"] + x["err_connect"] + x["err_read"]
                                + x["err_timeout"] for x in runs)}
           for name, runs in endpoints.items()}
    for name, v in out.items():
        log(f"  {name}: {v['rps']:.0f} req/s, p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms")
    return {"sites": p.hub_sites, "jwks_keys": len(jwks["keys"]),
            "jwks_bytes": len(json.dumps(jwks)), "peers": len(directory["peers"]),
            "directory_bytes": len(json.dumps(directory)), "endpoints": out}
