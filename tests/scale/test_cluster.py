"""Security promises across two instances of one site on one PostgreSQL (and Redis).

Site B runs as B1 (``headlesskey-agent serve --workers 2``) and B2 (``gunicorn -w 2
'agent.standalone:create_app()'``), separate processes sharing only the database (and, in the
Redis variant, the Redis): see conftest. Requests alternate between the instances, or go to
both at once; what the tests check is what a client sees (status, JSON code) and the rows of
B's database.
"""

from __future__ import annotations

import subprocess
import time
import typing as t
import uuid
from concurrent.futures import ThreadPoolExecutor

import jwt

from tests.conftest import PASSWORD
from tests.integration.test_sso import AGENT
from tests.scale.conftest import MAX_FAILURES
from tests.scale.conftest import MAX_SESSIONS
from tests.scale.conftest import Cluster
from tests.scale.conftest import Instance

WRONG = "not the password at all"


def unique(name: str) -> str:
    return f"{name}{uuid.uuid4().hex[:8]}"


def register(instance: Instance, username: str) -> None:
    r = instance.post("/register", json={"username": username, "password": PASSWORD,
                                         "email": f"{username}@example.com"})
    assert r.status_code == 201, r.text


def user_id(cluster: Cluster, username: str) -> int:
    return int(cluster.scalar("SELECT id FROM hk_users WHERE user_login = :u", u=username))


def attempt(instance: Instance, username: str, password: str) -> t.Any:
    return instance.post("/token", json={"username": username, "password": password})


def at_once(calls: list[t.Callable[[], t.Any]]) -> list[t.Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def audit_count(cluster: Cluster, event: str, uid: int, outcome: str) -> int:
    return int(cluster.scalar(
        "SELECT count(*) FROM hk_audit WHERE event = :e AND user_id = :u AND outcome = :o",
        e=event, u=uid, o=outcome))


# ---------------------------------------------------------------------------------------------
# lockout


def test_failures_spread_across_instances_lock_the_account(cluster: Cluster) -> None:
    name = unique("lena")
    register(cluster.b1, name)
    for i in range(MAX_FAILURES):
        r = attempt(cluster.instances[i % 2], name, WRONG)
        assert r.status_code == 401 and r.json()["code"] == "invalid_credentials", r.text
    for instance in cluster.instances:  # locked at both, even with the right password
        r = attempt(instance, name, PASSWORD)
        assert r.status_code == 429, (instance.name, r.text)
        assert r.json()["code"] == "too_many_attempts"
        assert int(r.headers["Retry-After"]) > 0
    uid = user_id(cluster, name)
    assert audit_count(cluster, "login.failed", uid, "failure") == MAX_FAILURES
    assert audit_count(cluster, "lockout.started", uid, "info") == 1


def test_concurrent_guesses_on_both_instances_get_at_most_the_limit(cluster: Cluster) -> None:
    name = unique("milo")
    register(cluster.b2, name)
    guesses = 24
    results = at_once([lambda i=i: attempt(cluster.instances[i % 2], name, WRONG)
                       for i in range(guesses)])
    statuses = sorted(r.status_code for r in results)
    # Exactly the limit of password checks ran; every other guess was refused unchecked.
    assert statuses == [401] * MAX_FAILURES + [429] * (guesses - MAX_FAILURES), statuses
    uid = user_id(cluster, name)
    assert audit_count(cluster, "login.failed", uid, "failure") == MAX_FAILURES
    assert audit_count(cluster, "login.failed", uid, "blocked") == guesses - MAX_FAILURES


# ---------------------------------------------------------------------------------------------
# revocation and the device limit


def test_a_token_revoked_at_one_instance_is_refused_by_the_other(cluster: Cluster) -> None:
    name = unique("nora")
    register(cluster.b1, name)
    body = attempt(cluster.b1, name, PASSWORD).json()
    access, refresh = body["token"], body["refresh_token"]
    # Every worker of the other instance has just read (and leased) the session's row.
    for _ in range(6):
        assert cluster.b2.get("/me", token=access).status_code == 200
    r = cluster.b1.post("/token/revoke", token=access)
    assert r.status_code == 200 and r.json()["code"] == "jwt_auth_token_revoked", r.text
    # The very next requests, at either instance and whichever worker answers.
    for instance in (cluster.b2, cluster.b1, cluster.b2, cluster.b2, cluster.b1, cluster.b2):
        r = instance.get("/me", token=access)
        assert r.status_code == 401, (instance.name, r.text)
    r = cluster.b2.post("/token/refresh", json={"refresh_token": refresh})
    assert r.status_code in (400, 401), r.text
    assert cluster.scalar(
        "SELECT count(*) FROM hk_sessions WHERE user_id = :u AND revoked_at IS NULL",
        u=user_id(cluster, name)) == 0


def test_concurrent_logins_on_both_instances_keep_the_device_limit(cluster: Cluster) -> None:
    name = unique("otto")
    register(cluster.b2, name)
    logins = 20
    results = at_once([lambda i=i: attempt(cluster.instances[i % 2], name, PASSWORD)
                       for i in range(logins)])
    assert [r.status_code for r in results] == [200] * logins, [r.text for r in results]
    uid = user_id(cluster, name)
    assert cluster.scalar(
        "SELECT count(*) FROM hk_sessions WHERE user_id = :u AND revoked_at IS NULL", u=uid
    ) == MAX_SESSIONS
    # Exactly the newest MAX_SESSIONS tokens still work, at either instance.
    working = [r for i, r in enumerate(results)
               if cluster.instances[i % 2].get("/me", token=r.json()["token"]).status_code == 200]
    assert len(working) == MAX_SESSIONS
    assert audit_count(cluster, "session.evicted", uid, "info") == logins - MAX_SESSIONS


# ---------------------------------------------------------------------------------------------
# single sign-on


def sso_assertion(cluster: Cluster, username: str) -> dict[str, str]:
    """An assertion of A's user ``username`` for site B (the user made at A on first use)."""
    a = cluster.a
    a.post("/register", json={"username": username, "password": PASSWORD,
                              "email": f"{username}@example.com"})
    r = a.post("/token", json={"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    r = a.post("/sso/issue", json={"target": cluster.b.site_key}, token=r.json()["token"])
    assert r.status_code == 200, r.text
    return {k: r.json()[k] for k in ("site_key", "token", "signature")}


def test_an_assertion_replayed_to_the_other_instance_is_refused(cluster: Cluster) -> None:
    for first, second in (cluster.instances, tuple(reversed(cluster.instances))):
        assertion = sso_assertion(cluster, unique("pia"))
        r = first.post("/sso/exchange", json=assertion)
        assert r.status_code == 200, (first.name, r.text)
        r = second.post("/sso/exchange", json=assertion)
        assert r.status_code == 401, (second.name, r.text)
        assert r.json()["code"] == "invalid_assertion"
        jti = jwt.decode(assertion["token"], options={"verify_signature": False})["jti"]
        stored = cluster.scalar("SELECT count(*) FROM hk_sso_used WHERE jti = :j", j=jti)
        assert stored == (0 if cluster.redis_url else 1)  # in Redis when it is configured


def test_one_assertion_sent_to_both_instances_at_once_works_once(cluster: Cluster) -> None:
    assertion = sso_assertion(cluster, unique("quin"))
    results = at_once([lambda i=i: cluster.instances[i % 2].post("/sso/exchange", json=assertion)
                       for i in range(8)])
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] + [401] * 7, [r.text for r in results]
    reasons = cluster.rows(
        "SELECT details FROM hk_audit WHERE event = 'sso.rejected' ORDER BY id DESC LIMIT 7")
    assert all("replayed" in str(row[0]) for row in reasons), reasons


# ---------------------------------------------------------------------------------------------
# scheduled jobs


def test_a_job_every_second_on_both_instances_runs_once_per_period(cluster: Cluster) -> None:
    assert AGENT
    job = "headlesskey.prune"
    before = {row[0] for row in cluster.rows(
        "SELECT slot FROM hk_job_runs WHERE job = :j", j=job)}
    logs = [cluster.root / f"jobs-{n}-{uuid.uuid4().hex[:6]}.log" for n in (1, 2)]
    processes = []
    for instance, log in zip((cluster.b.instance, cluster.b2_instance), logs, strict=True):
        with log.open("w") as out:
            processes.append(subprocess.Popen(  # noqa: S603 - our own executable
                [AGENT, "jobs", "--instance", str(instance), "--prune-interval", "1",
                 "--webhook-interval", "5", "--uplink-interval", "60"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=cluster.env))
    try:
        deadline = time.monotonic() + 30
        while not all("running" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(p.poll() is None for p in processes), [log.read_text() for log in logs]
            time.sleep(0.1)
        both_from = time.time()
        time.sleep(5)
        processes[0].terminate()
        processes[0].wait(30)
        first_gone = time.time()
        time.sleep(4)
        assert processes[1].poll() is None, logs[1].read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
            process.wait(30)
    end = time.time()
    rows = [r for r in cluster.rows(
        "SELECT slot, runner, finished_at FROM hk_job_runs WHERE job = :j ORDER BY slot", j=job)
        if r[0] not in before]
    runners = {f":{p.pid}" for p in processes}
    slots = [slot for slot, _runner, _finished in rows]
    assert len(slots) == len(set(slots))
    assert all(any(runner.endswith(p) for p in runners) for _slot, runner, _f in rows), rows
    assert all(finished is not None for _slot, _runner, finished in rows), rows
    # Two processes every second for ~10 s would be ~20 runs without the claim: at most one
    # per second ran, and the periods kept running while either process was up.
    assert len(rows) <= int(end - both_from) + 3, rows
    assert len(rows) >= int(end - both_from) // 2, rows
    later = [slot for slot, runner, _f in rows
             if slot > first_gone + 1 and runner.endswith(f":{processes[1].pid}")]
    assert later, f"the second instance did not take over: {rows}"
