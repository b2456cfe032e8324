"""Writes bench/RESULTS.md from the figures measured by ``bench/run.py``."""

from __future__ import annotations

import datetime as dt
import math
import statistics
import typing as t
from pathlib import Path

if t.TYPE_CHECKING:
    from bench.run import Bench

TITLES = {
    "protected": "Protected route: agent vs bare Flask vs flask-jwt-extended",
    "scale": "Protected route (HS256) with many revoked tokens and users",
    "login": "Login vs the argon2id bound",
    "sso": "/sso/exchange under 16 concurrent clients",
    "audit": "Admin log query with filters",
    "hub": "Hub JWKS and directory",
    "memory": "Peak memory of one agent worker",
}


def fmt(x: float, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{digits}f}"


def _load(value: t.Any) -> str:
    return f"{value[0]:.2f}" if value else "—"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def ratio(x: float, target: float) -> str:
    """``x`` to two decimals, or three where two would print a missed target as reached."""
    return f"{x:.3f}" if x < target and f"{x:.2f}" == f"{target:.2f}" else f"{x:.2f}"


def each_round(figure: dict[str, t.Any]) -> str:
    """Each round's req/s, as whole numbers."""
    return ", ".join(f"{x:.0f}" for x in figure["rounds"])


def round_ratios(num: dict[str, t.Any], den: dict[str, t.Any]) -> list[float]:
    """Each round's ratio of ``num``'s req/s to ``den``'s (each round measures both)."""
    return [a / b for a, b in zip(num["rounds"], den["rounds"], strict=True) if b]


def spread(num: dict[str, t.Any], den: dict[str, t.Any]) -> str:
    """The lowest and highest of :func:`round_ratios`, to show how far a median ratio moves
    from one round to the next."""
    ratios = round_ratios(num, den)
    if len(ratios) < 2:
        return "—"
    return f"{min(ratios):.2f}–{max(ratios):.2f}"


def paired(num: dict[str, t.Any], den: dict[str, t.Any]) -> float:
    """The ratio of ``num``'s req/s to ``den``'s: the median of each round's ratio. A round
    measures both within a minute, so a slow spell of the shared machine moves both; the ratio
    of the two medians would pair one round's figure with another's."""
    ratios = round_ratios(num, den)
    return statistics.median(ratios) if ratios else num["rps"] / den["rps"]


def cpu(v: dict[str, t.Any], scale: float = 1e3, digits: int = 0) -> str:
    """CPU per request: the workers', plus the database server's where measured."""
    text = fmt(v.get("cpu_ms", float("nan")) * scale, digits)
    db = v.get("db_cpu_ms", float("nan"))
    if not math.isnan(db):
        text += f" + {fmt(db * scale, digits)}"
    return text


def write_report(bench: Bench, out: Path, started: dt.datetime, finished: dt.datetime) -> None:
    from bench.run import machine
    from bench.run import package_versions

    m = machine()
    p = bench.profile
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    backends = ", ".join(bench.results) or "none"
    lines = [
        "# Benchmark results",
        "",
        f"Written by `./dev bench{' --quick' if p.label == 'quick' else ''}` "
        f"({p.label} run) on {started:%Y-%m-%d}, {started:%H:%M}–{finished:%H:%M} UTC.",
        "",
        f"**Machine:** {m['cpu']}, {m['cores']} cores, {m['ram_gb']:.1f} GB RAM, "
        f"Python {m['python']}, {m['os']}; backends: {backends}.  ",
        f"**Conditions:** the machine's 2 cores were shared with other work during the run "
        f"(load average {_load(getattr(bench, 'load_start', None))} at the start, "
        f"{m['loadavg'][0]:.2f} at the end, while the benchmark itself keeps about 2 busy); wrk "
        "runs on the same cores as the servers.  ",
        f"**Packages:** {versions}.  ",
        f"**Method:** gunicorn, 2 sync workers per app, on 127.0.0.1; load generator "
        f"{bench.load.name} `-t2 -c16 -d{p.duration}s`; {p.rounds} alternating round(s) per "
        "figure (each round runs every endpoint of the figure once, in a rotated order); "
        "req/s, latencies and CPU are medians of the rounds; a ratio is the median of the "
        "rounds' ratios (each round measures both endpoints within a minute). CPU per request "
        "is the user and system time the app's gunicorn workers spent during a run divided by "
        "the requests answered; on PostgreSQL the agent's rows add (after +) the time of the "
        "database server processes serving its connections. Absolute req/s depend on the "
        "machine and on what else runs on it; the ratios are the figures to carry, and CPU per "
        "request shows where a ratio comes from.",
        "",
    ]
    lines += [f"> {note}" for note in bench.notes]
    if bench.notes:
        lines.append("")
    for backend, res in bench.results.items():
        lines += [f"## {backend}", ""]
        for name in TITLES:
            if name in res.get("failed", {}):
                lines += [f"### {TITLES[name]}", "",
                          f"Not measured: the step failed ({res['failed'][name]}).", ""]
            elif name in res:
                lines += [f"### {TITLES[name]}", ""] + SECTIONS[name](res[name], res, p) + [""]
            else:
                lines += [f"### {TITLES[name]}", "", "Not measured in this run.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")


def _protected(r: dict[str, t.Any], res: dict[str, t.Any], p: t.Any) -> list[str]:
    bare = r["bare"]
    rows = ["| endpoint | req/s | ratio to bare | p50 ms | p99 ms | CPU µs/request | "
            "rounds (req/s) | errors |",
            "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, v in r.items():
        rows.append(f"| {LABELS.get(name, name)} | {fmt(v['rps'])} | {paired(v, bare):.2f} | "
                    f"{fmt(v['p50_ms'], 2)} | {fmt(v['p99_ms'], 2)} | {cpu(v)} | "
                    f"{each_round(v)} | {v['errors']} |")
    rows += ["", "| algorithm | agent / bare | agent / peer | target | | the target's ratio, "
             "lowest–highest round |",
             "|---|---:|---:|---|---|---:|"]
    for alg in ("HS256", "RS256", "ES256"):
        agent, peer = r[f"agent-{alg}"], r[f"fje-{alg}"]
        to_bare, to_peer = paired(agent, bare), paired(agent, peer)
        if alg == "HS256":
            target, ok, rounds = "≥ 1.25× the peer (≈ 0.70× bare)", to_peer >= 1.25, \
                spread(agent, peer)
        else:
            target, ok, rounds = "≥ 0.60× bare", to_bare >= 0.60, spread(agent, bare)
        rows.append(f"| {alg} | {ratio(to_bare, 0.60)} | {ratio(to_peer, 1.25)} | {target} | "
                    f"{verdict(ok)} | {rounds} |")
    rows += ["", "The agent's route parses and checks every registered claim and checks the "
             "session row (revocation, user status and roles, current access token) on every "
             "request: a worker reads the row again once its lease of `SESSION_LEASE_MS` (the "
             "default, 20 ms) is over, and every change that takes access away answers only "
             "after one lease, so a revocation holds at every worker and instance from its "
             "answer on; the row marked \"a read on every request\" reads it for each request. "
             "A token's shape, header (`typ`, `kid`, its key's algorithm only) and signature "
             "are checked once per worker and key: a worker does not check them again for a "
             "token it verified with the same key object (a bounded cache, as API gateways "
             "keep verified JWTs). The "
             "peer verifies every time, and is configured as the "
             "flask-jwt-extended docs show it: PEM strings for RS256/ES256, a blocklist "
             "loader looking the jti up in a per-process dict of 10^4 entries, so a token "
             "revoked at one worker still works at the others. Both use the same keys "
             "(RSA 2048, P-256)."]
    if "agent-HS256-read" in r:
        read = r["agent-HS256-read"]
        rows += ["", f"Reading the session row on every request, the HS256 route is at "
                 f"{paired(read, bare):.2f} of bare Flask and {paired(read, r['fje-HS256']):.2f} "
                 f"times the peer."]
    return rows


def _scale(r: dict[str, t.Any], res: dict[str, t.Any], p: t.Any) -> list[str]:
    base = r["base"]
    rows = ["| database holds | req/s | vs empty | lowest–highest round | CPU µs/request | "
            "rounds (req/s) | errors | within 5% |",
            "|---|---:|---:|---:|---:|---|---:|---|"]
    for name, v in r.items():
        label = "one user, one session" if name == "base" else \
            f"{v['rows']:,} {'revoked sessions' if 'revoked' in name else 'users'}"
        change = paired(v, base)
        rows.append(f"| {label} | {fmt(v['rps'])} | {change:.2f} | "
                    f"{'—' if name == 'base' else spread(v, base)} | {cpu(v)} | "
                    f"{each_round(v)} | {v['errors']} | "
                    f"{'—' if name == 'base' else verdict(abs(change - 1) <= 0.05)} |")
    rows += ["", "Every request here reads its session row (`SESSION_LEASE_MS=0`), so the "
             "figure is the read's cost as the tables grow. "
             "Rows are inserted with one `INSERT ... SELECT` over a generated series before "
             "the server starts (on PostgreSQL followed by `ANALYZE`, as autovacuum does after a "
             "bulk load); revoked sessions belong to 1,000 users."]
    return rows


def _login(r: dict[str, t.Any], res: dict[str, t.Any], p: t.Any) -> list[str]:
    bound = r["argon2-bound"]
    rows = ["| endpoint | req/s | ratio to the bound | p50 ms | p99 ms | CPU ms/request | "
            "rounds | errors |",
            "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, v in r.items():
        rows.append(f"| {LABELS.get(name, name)} | {fmt(v['rps'], 1)} | {paired(v, bound):.2f} | "
                    f"{fmt(v['p50_ms'], 1)} | {fmt(v['p99_ms'], 1)} | {cpu(v, 1, 2)} | "
                    f"{each_round(v)} | {v['errors']} |")
    agent = r["agent-login"]
    a = paired(agent, bound)
    rows += ["", f"Agent login / argon2id bound: **{ratio(a, 0.9)}** "
             f"({_rounds(agent, bound)}target ≥ 0.90: {verdict(a >= 0.9)}). "
             "The bound is a bare Flask route doing one argon2id verification at the same "
             "parameters (m=19 MiB, t=2, p=1) and nothing else; the agent's login also runs the "
             "lockout counters, opens a session, stores a refresh token and writes the "
             "activity log."]
    if "agent-login-redis" in r:
        b = paired(r["agent-login-redis"], bound)
        rows += ["", f"With the brute-force counters in Redis (`REDIS_URL`, the rest in "
                 f"PostgreSQL): **{ratio(b, 0.9)}** "
                 f"({_rounds(r['agent-login-redis'], bound)}target ≥ 0.90: "
                 f"{verdict(b >= 0.9)}); the attempt's "
                 "reservation and release are one Lua script each instead of a transaction."]
    db = agent.get("db_cpu_ms", math.nan)
    spent = agent.get("cpu_ms", math.nan) + (0 if math.isnan(db) else db)
    hashing = bound.get("cpu_ms", math.nan)
    if not math.isnan(spent) and not math.isnan(hashing):
        server = "" if math.isnan(db) else f" ({db:.1f} ms of it in the database server)"
        rows += ["", f"Where the rest goes: the bound's workers spent {hashing:.1f} ms of CPU "
                 f"per verification, the agent {spent:.1f} ms per login{server}, "
                 f"{spent - hashing:.1f} ms more. The 2 cores are "
                 "shared by both workers, wrk and the database, so throughput follows CPU: "
                 f"by CPU alone the login would reach {hashing / spent:.2f} of the bound. "
                 f"{_idle(agent, bound, hashing, spent)}"
                 "Besides the hash, a login reads the account (one statement, outside a "
                 "transaction), reserves the attempt on the brute-force counters (one "
                 "statement) and, after the hash, writes its session, refresh token and audit "
                 "row and releases the reservation (on PostgreSQL one statement in autocommit, "
                 "on SQLite five statements in one transaction), all on connections the worker "
                 "keeps (no pool checkout, no connection check), each statement compiled once; "
                 "on PostgreSQL the read and the reservation are one statement, committed "
                 "without waiting for the disk, so a login is 2 round trips through libpq, or "
                 "2 and 2 Redis calls with the counters in Redis. "
                 "The hash's 19 MiB evict the CPU caches, so the rest of the request "
                 "reads its code and data from memory again on every login, and costs more than "
                 "the same work in a warm loop. The peer's login is the hash and a token, with "
                 "nothing stored."]
    return rows


def _idle(agent: dict[str, t.Any], bound: dict[str, t.Any], hashing: float,
          spent: float) -> str:
    """The sentence on the time the cores sat idle per login and per verification (empty
    where not measured): a worker waiting on the database leaves its core with nothing to run
    when the other worker is busy on the other one."""
    waited, bound_waited = agent.get("idle_ms", math.nan), bound.get("idle_ms", math.nan)
    if math.isnan(waited) or math.isnan(bound_waited):
        return ""
    return (f"Meanwhile the machine's cores sat idle {waited:.2f} ms per login, against "
            f"{bound_waited:.2f} ms per verification: a worker waiting on the database "
            "leaves its core with nothing to run; counted with the CPU, that makes "
            f"{(hashing + bound_waited) / (spent + waited):.2f} of the bound. ")


def _rounds(num: dict[str, t.Any], den: dict[str, t.Any]) -> str:
    """"rounds 0.85–0.91; " for a sentence, or nothing with one round."""
    rounds = spread(num, den)
    return "" if rounds == "—" else f"rounds {rounds}; "


def _sso(r: dict[str, t.Any], res: dict[str, t.Any], p: t.Any) -> list[str]:
    return [
        "| exchanges/s | p50 ms | p99 ms | exchanges | refused | hub calls by the agents during "
        "the run |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {fmt(r['rps'], 1)} | {fmt(r['p50_ms'], 1)} | {fmt(r['p99_ms'], 1)} | "
        f"{r['requests']:,} | {r['errors']} | {r['hub_calls']} |",
        "",
        f"A hub and two agents (site A ES256, site B RS256; 2 workers each, directory refresh "
        f"{r['directory_refresh']} s) run as processes made with the real commands (`init`, "
        "`sites add`, `join`, `serve`). Site A issues the assertions beforehand through "
        "`/sso/issue` (each is single-use); wrk posts each once to site B. Hub calls are the "
        "signed API calls the hub recorded from both sites while the load ran (target: none "
        "beyond directory refreshes).",
    ]


def _audit(r: dict[str, t.Any], res: dict[str, t.Any], p: t.Any) -> list[str]:
    rows = [f"{r['rows']:,} audit rows (8 event kinds, 5,000 users, 1,000 addresses, "
            "spread over 30 days; on PostgreSQL `ANALYZE` after the bulk insert); "
            f"{r['requests']} sequential requests to `/admin/logs` (one client, keep-alive), "
            "a page of 50 unless said:", "",
            "| filters | p50 ms | p95 ms | events returned |", "|---|---:|---:|---:|"]
    for name, v in r["queries"].items():
        rows.append(f"| {name} | {fmt(v['p50_ms'], 1)} | {fmt(v['p95_ms'], 1)} | {v['events']} |")
    rows += ["", f"All filters together: p50 {fmt(r['p50_ms'], 1)} ms, **p95 "
             f"{fmt(r['p95_ms'], 1)} ms** (target < 50 ms: {verdict(r['p95_ms'] < 50)})."]
    return rows


def _hub(r: dict[str, t.Any], res: dict[str, t.Any], p: t.Any) -> list[str]:
    rows = [f"{r['sites']} sites with 3 keys each (JWKS: {r['jwks_keys']} keys, "
            f"{r['jwks_bytes']:,} bytes; directory: {r['peers']} peers, "
            f"{r['directory_bytes']:,} bytes); hub with 2 workers.", "",
            "| endpoint | req/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|"]
    for name, v in r["endpoints"].items():
        rows.append(f"| {name} | {fmt(v['rps'], 1)} | {fmt(v['p50_ms'], 1)} | "
                    f"{fmt(v['p99_ms'], 1)} | {v['errors']} |")
    rows += ["", "Directory calls are signed (each with its own nonce), as agents send them."]
    return rows


def _memory(r: dict[str, t.Any], res: dict[str, t.Any], p: t.Any) -> list[str]:
    if not r:
        return ["No agent worker was running."]
    rows = ["| agent app | peak RSS of its largest worker (MB) |", "|---|---:|"]
    for name, mb in r.items():
        rows.append(f"| {name} | {mb:.1f} |")
    peak = max(r.values())
    rows += ["", f"Largest: **{peak:.1f} MB** (target < 100 MB: {verdict(peak < 100)}); VmHWM "
             "of each gunicorn worker after all the load above. A worker's peak is its resident "
             "set plus one argon2id hash's memory (m=19 MiB): each worker hashes once as it starts "
             "(the decoy that makes a login for an unknown user cost what a real one does), then "
             "once per login; sources are byte-compiled beforehand, as installing does."]
    if any("Redis" in name for name in r):
        rows += ["", "The worker with the counters in Redis (`REDIS_URL`, the production layout "
                 "of docs/deploy.md) talks to Redis with the agent's own small client "
                 "(`agent/resp.py`), not redis-py, whose import alone costs about 7 MB."]
    return rows


SECTIONS: dict[str, t.Callable[[dict[str, t.Any], dict[str, t.Any], t.Any], list[str]]] = {
    "protected": _protected, "scale": _scale, "login": _login, "sso": _sso, "audit": _audit,
    "hub": _hub, "memory": _memory,
}
LABELS = {
    "bare": "bare Flask `/hello`",
    "fje-HS256": "flask-jwt-extended HS256", "fje-RS256": "flask-jwt-extended RS256",
    "fje-ES256": "flask-jwt-extended ES256",
    "agent-HS256": "agent `@hk.require()` HS256", "agent-RS256": "agent `@hk.require()` RS256",
    "agent-ES256": "agent `@hk.require()` ES256",
    "agent-HS256-read": "agent `@hk.require()` HS256, a read on every request "
                        "(`SESSION_LEASE_MS=0`)",
    "argon2-bound": "argon2id verification alone (the bound)",
    "agent-login": "agent `POST /token`", "fje-login": "flask-jwt-extended `POST /token`",
    "agent-login-redis": "agent `POST /token`, counters in Redis",
}
