"""The ``headlesskey-agent`` command: init, serve, users, db."""

from __future__ import annotations

import os
import secrets
import sys
import typing as t
from pathlib import Path

import click

from .errors import AgentError
from .errors import ConfigError

INSTANCE = click.option(
    "--instance",
    "instance",
    envvar="HEADLESSKEY_INSTANCE",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The site's instance folder (site.toml, keys, SQLite database).",
)


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _app(instance: Path, overrides: dict[str, t.Any] | None = None) -> t.Any:
    """The instance's app, its schema brought to the newest version (idempotent)."""
    from .db import upgrade
    from .standalone import create_app

    app = create_app(instance, overrides)
    upgrade(app.extensions["headlesskey"].engine)
    app.extensions["headlesskey"].keys.seed()
    return app


class _Group(click.Group):
    """Turns a configuration error into one clear line and exit status 2."""

    def invoke(self, ctx: click.Context) -> t.Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="headlesskey")
def main() -> None:
    """HeadlessKey agent: a site's JWT auth API."""


@main.command()
@INSTANCE
@click.option("--algorithm", type=click.Choice(["HS256", "RS256", "ES256"]), default="ES256",
              show_default=True, help="Signing algorithm of access tokens.")
@click.option("--site-url", default="http://127.0.0.1:8000", show_default=True,
              help="Public base URL of the site (the token issuer).")
@click.option("--site-name", default="HeadlessKey site", show_default=True)
def init(instance: Path, algorithm: str, site_url: str, site_name: str) -> None:
    """Create an instance folder: site.toml, the secret, the signing key, the database."""
    from .config import _url
    from .db import make_engine
    from .db import upgrade
    from .services.keys import generate_private_key_pem
    from .standalone import SITE_FILE

    _url("--site-url", site_url)  # a bad URL stops here, before anything is written
    site_file = instance / SITE_FILE
    for existing in (site_file, instance / "secret.key", instance / "signing-key.pem"):
        if existing.exists():
            raise click.ClickException(f"{existing} exists; refusing to overwrite it")
    instance.mkdir(parents=True, exist_ok=True)
    os.chmod(instance, 0o700)
    _write_private(instance / "secret.key", secrets.token_urlsafe(48).encode() + b"\n")
    lines = [
        "# HeadlessKey agent settings; every key is documented in docs/config.md.",
        f"site_url = {_toml(site_url.rstrip('/'))}",
        f"site_name = {_toml(site_name)}",
        f"algorithm = {_toml(algorithm)}",
        'secret_key_file = "secret.key"',
    ]
    if algorithm != "HS256":
        _write_private(instance / "signing-key.pem", generate_private_key_pem(algorithm))
        lines.append('private_key_file = "signing-key.pem"')
    lines += ["", "[mail]", 'backend = "console"', ""]
    _write_private(site_file, "\n".join(lines).encode())
    app = _app(instance)  # checks the new settings
    upgrade(make_engine(app.extensions["headlesskey"].settings.database_url))
    click.echo(f"Initialised {instance} ({algorithm}); start it with:")
    click.echo(f"  headlesskey-agent serve --instance {instance}")


def _publish_federation_key(state: t.Any) -> None:
    """(Re)publish the SSO key at start; the hub being down never stops the site."""
    from .federation import client
    from .federation import federation_key
    from .hub_client import HubUnavailable

    key = federation_key(state)
    try:
        client(state).register_key(t.cast(dict[str, t.Any], key.public_jwk), "active")
    except HubUnavailable as exc:
        click.echo(f"warning: SSO key not published to the hub ({exc}); will serve anyway",
                   err=True)


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@main.command()
@INSTANCE
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--no-jobs", is_flag=True,
              help="Do not start the jobs process (run `headlesskey-agent jobs` yourself).")
def serve(instance: Path, host: str, port: int, workers: int, no_jobs: bool = False) -> None:
    """Serve the API with gunicorn (migrations run first) and, beside it, the jobs process."""
    from . import serving
    from .db import upgrade

    app = _app(instance)
    state = app.extensions["headlesskey"]
    upgrade(state.engine)
    if state.settings.federated:
        _publish_federation_key(state)
    state.engine.dispose()  # no connection may cross the fork into the workers

    click.echo(f"Serving {state.settings.site_name} at http://{host}:{port}{state.settings.prefix}")
    serving.serve(app, host=host, port=port, workers=workers,
                  jobs_module=None if no_jobs else "agent.cli", instance=str(instance.resolve()))


@main.group()
def users() -> None:
    """Manage the site's accounts."""


@users.command("create")
@INSTANCE
@click.option("--username", required=True)
@click.option("--email", required=True)
@click.option("--role", "roles", multiple=True,
              help="Role (repeat for several); default role if none.")
@click.option("--display-name", default=None)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (required).")
def users_create(
    instance: Path,
    username: str,
    email: str,
    roles: tuple[str, ...],
    display_name: str | None,
    password_stdin: bool,
) -> None:
    """Create an account; the password is read from standard input, never from arguments."""
    from .config import check_role
    from .services import accounts

    if not password_stdin:
        raise click.UsageError("give --password-stdin and pipe the password in")
    for role in roles:
        try:
            check_role("--role", role)
        except ConfigError as exc:
            raise click.BadParameter(str(exc).removeprefix("--role: "), param_hint="--role"
                                     ) from None
    password = sys.stdin.readline().rstrip("\r\n")
    app = _app(instance)
    state = app.extensions["headlesskey"]
    with app.app_context(), state.session_factory() as db:
        try:
            user = accounts.create_user(
                db,
                state,
                username=username,
                email=email,
                password=password,
                display_name=display_name,
                roles=list(roles) or None,
            )
            db.commit()
        except AgentError as exc:
            details = "; ".join(f"{k}: {' '.join(v)}" for k, v in (exc.fields or {}).items())
            raise click.ClickException(f"{exc.message} {details}".strip()) from None
    click.echo(f"Created user {user.user_login} (ID {user.id}, roles {', '.join(user.roles)})")


@users.command("unlock")
@INSTANCE
@click.option("--username", required=True, help="Login or email of the account.")
def users_unlock(instance: Path, username: str) -> None:
    """Clear an account's brute-force lock."""
    from . import events
    from .services import accounts
    from .services import lockout

    app = _app(instance)
    state = app.extensions["headlesskey"]
    with app.app_context(), state.session_factory() as db:
        user = accounts.find_user(db, username)
        if user is None:
            raise click.ClickException(f"no account {username!r}")
        cleared = lockout.unlock_user(db, state, user.id, (user.user_login, user.email))
        events.record(db, state, "user.unlocked", outcome="info", user_id=user.id,
                      details={"by": "cli"})
        db.commit()
    click.echo(f"Unlocked {user.user_login} ({cleared} counter(s) cleared)")


@users.command("set-roles")
@INSTANCE
@click.option("--username", required=True, help="Login or email of the account.")
@click.option("--role", "roles", multiple=True, help="A role; repeat for several.")
@click.option("--no-roles", is_flag=True, help="Take every role away.")
def users_set_roles(instance: Path, username: str, roles: tuple[str, ...], no_roles: bool) -> None:
    """Replace an account's roles; they hold from its next request on."""
    from . import events
    from .errors import ValidationFailed
    from .models import User
    from .services import accounts

    if bool(roles) == no_roles:
        raise click.UsageError("give --role (once per role) or --no-roles")
    try:
        wanted = accounts.role_list(list(roles))
    except ValidationFailed as exc:
        problems = " ".join((exc.fields or {}).get("roles", []))
        raise click.BadParameter(problems, param_hint="--role") from None
    app = _app(instance)
    state = app.extensions["headlesskey"]
    with app.app_context(), state.session_factory() as db:
        found = accounts.find_user(db, username)
        user = (db.get(User, found.id, with_for_update=True, populate_existing=True)
                if found is not None else None)
        if user is None:
            raise click.ClickException(f"no account {username!r}")
        before = accounts.set_roles(db, user, wanted)
        if before != wanted:
            events.record(db, state, "user.roles_changed", outcome="info", user_id=user.id,
                          details={"by": "cli", "before": before, "after": wanted})
        db.commit()
    click.echo(f"Roles of {user.user_login}: {', '.join(wanted) or '(none)'} "
               f"(were: {', '.join(before) or '(none)'})")


@main.group()
def sessions() -> None:
    """End sessions: a kill switch for one account or the whole site."""


@sessions.command("end-all")
@INSTANCE
@click.option("--username", default=None, help="Only this account's (login or email).")
@click.option("--yes", is_flag=True, help="Required without --username: every user is logged out.")
def sessions_end_all(instance: Path, username: str | None, yes: bool) -> None:
    """End every live session of the site (or of one account): their tokens stop working at once."""
    from . import events
    from .services import accounts
    from .services import sessions as session_service

    if username is None and not yes:
        raise click.UsageError("ending every session of the site needs --yes")
    app = _app(instance)
    state = app.extensions["headlesskey"]
    with app.app_context(), state.session_factory() as db:
        now = state.clock()
        user_id = None
        if username is not None:
            user = accounts.find_user(db, username)
            if user is None:
                raise click.ClickException(f"no account {username!r}")
            user_id = user.id
            ended = session_service.revoke_user_sessions(db, user.id, now, "ended_by_admin")
        else:
            ended = session_service.revoke_all_sessions(db, now, "ended_by_admin")
        events.record(db, state, "session.ended", outcome="success", user_id=user_id,
                      details={"by": "cli", "reason": "ended_by_admin", "all": True,
                               "sessions_ended": ended})
        db.commit()
    who = f"of {username} " if username else ""
    click.echo(f"Ended {ended} session(s) {who}at once")


@main.command()
@INSTANCE
@click.option("--user", "user", help="User ID.")
@click.option("--event", help="Event name, e.g. login.failed.")
@click.option("--outcome", help="success, failure, blocked, info or ignored.")
@click.option("--ip", help="Client IP.")
@click.option("--since", help="ISO 8601 time.")
@click.option("--until", help="ISO 8601 time.")
@click.option("--limit", default="50", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--follow", is_flag=True, help="Keep printing new events (Ctrl-C stops).")
def logs(instance: Path, as_json: bool, follow: bool, **filters: str | None) -> None:
    """Show the activity log, newest first (oldest first with --follow)."""
    import json
    import time

    from .services import audit

    app = _app(instance)
    state = app.extensions["headlesskey"]
    args = {k: v for k, v in filters.items() if v}
    try:
        parsed, limit, _cursor = audit.parse_filters(args)
    except AgentError as exc:
        details = "; ".join(f"--{k}: {' '.join(v)}" for k, v in (exc.fields or {}).items())
        raise click.ClickException(details or exc.message) from None

    def show(row: t.Any) -> None:
        item = audit.as_dict(row)
        if as_json:
            click.echo(json.dumps(item))
        else:
            who = item["user_id"] if item["user_id"] is not None else (item["login"] or "-")
            click.echo(
                f"{item['time']:<28} {item['event']:<26} {item['outcome']:<8} "
                f"{str(who):<12} {item['ip']:<16} {item['device']}"
            )

    with state.session_factory() as db:
        rows, _next = audit.query(db, parsed, limit)
        if not as_json and not follow:
            click.echo(f"{'TIME':<28} {'EVENT':<26} {'OUTCOME':<8} {'USER':<12} {'IP':<16} DEVICE")
        for row in reversed(rows) if follow else rows:
            show(row)
        last = max((r.id for r in rows), default=0)
        db.rollback()  # never hold a transaction (SQLite: the write lock) while waiting
        while follow:
            time.sleep(1)
            newer = [r for r in audit.query(db, parsed, 500)[0] if r.id > last]
            db.rollback()
            for row in reversed(newer):
                show(row)
                last = max(last, row.id)


@main.command()
@INSTANCE
@click.option("--hub", "hub_url", required=True, help="The hub's base URL.")
@click.option("--site-key", required=True, help="This site's key, as onboarded at the hub.")
@click.option("--secret-stdin", is_flag=True, help="Read the site secret from stdin (required).")
def join(instance: Path, hub_url: str, site_key: str, secret_stdin: bool) -> None:
    """Join a federation: check the membership with the hub, store it, publish the SSO key."""
    from .config import hub_url as check_hub_url
    from .config import parse_hub_secret
    from .federation import federation_key
    from .hub_client import HubClient
    from .hub_client import HubUnavailable
    from .services.keys import ensure_key_file
    from .services.keys import generate_private_key_pem
    from .standalone import SITE_FILE

    if not secret_stdin:
        raise click.UsageError("give --secret-stdin and pipe the secret in")
    hub_url = check_hub_url("--hub", hub_url)
    secret_text = sys.stdin.readline().strip()
    raw = parse_hub_secret("the secret", secret_text)
    client = HubClient(hub_url, site_key, raw)
    try:
        peers = client.directory().get("peers", [])  # proves the URL, the key and the secret
    except HubUnavailable as exc:
        raise click.ClickException(f"the hub did not accept this membership: {exc}") from None
    site_file = instance / SITE_FILE
    if not site_file.is_file():
        raise click.ClickException(f"{site_file} not found; run `headlesskey-agent init` first")
    secret_file = instance / "hub-secret.key"
    temporary = instance / "hub-secret.key.new"
    temporary.unlink(missing_ok=True)
    _write_private(temporary, secret_text.encode() + b"\n")
    os.replace(temporary, secret_file)
    ensure_key_file(instance / "federation-key.pem", lambda: generate_private_key_pem("ES256"))
    _set_toml_table(site_file, "hub", {"url": hub_url, "site_key": site_key,
                                       "secret_file": "hub-secret.key"})
    app = _app(instance)
    state = app.extensions["headlesskey"]
    key = federation_key(state)
    try:
        client.register_key(t.cast(dict[str, t.Any], key.public_jwk), "active")
    except HubUnavailable as exc:
        raise click.ClickException(f"joined, but the SSO key was not published: {exc}") from None
    click.echo(f"Joined {hub_url} as {site_key}: {len(peers)} peer site(s); "
               f"SSO key {key.kid} published.")


def _set_toml_table(path: Path, table: str, values: dict[str, str]) -> None:
    """Replace (or add) one ``[table]`` of a TOML file, keeping every other line."""
    kept: list[str] = []
    skipping = False
    for line in path.read_text("utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            skipping = stripped == f"[{table}]"
        if not skipping:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    kept += ["", f"[{table}]", *(f"{k} = {_toml(v)}" for k, v in values.items()), ""]
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    _write_private(temporary, "\n".join(kept).encode())
    os.replace(temporary, path)


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@INSTANCE
def db_upgrade(instance: Path) -> None:
    """Bring the database schema to the newest version."""
    from .db import upgrade

    app = _app(instance)
    upgrade(app.extensions["headlesskey"].engine)
    click.echo("Database is up to date.")


@main.group()
def keys() -> None:
    """Signing keys and the hub secret."""


@keys.command("list")
@INSTANCE
def keys_list(instance: Path) -> None:
    """The stored keys: purpose, kid, algorithm, when each signs and retires (never secrets)."""
    from .services.keystore import ACCESS
    from .services.keystore import FEDERATION
    from .services.keystore import HUB_SECRET

    store = _app(instance).extensions["headlesskey"].keys
    store.reload()
    for purpose in (ACCESS, FEDERATION, HUB_SECRET):
        signer = store.signing(purpose)
        for e in store.entries(purpose):
            alg = e.key.alg if e.key else "-"
            starts = e.active_from.strftime("%Y-%m-%d %H:%M:%S") if e.active_from else "unpublished"
            ends = e.retire_at.strftime("%Y-%m-%d %H:%M:%S") if e.retire_at else "-"
            mark = "*" if signer is not None and e.id == signer.id else " "
            click.echo(f"{mark} {purpose:<10} {e.kid:<44} {alg:<5} from {starts}  until {ends}"
                       + (f"  hub: {e.hub_status}" if e.hub_status else ""))


@keys.command("rotate")
@INSTANCE
@click.option("--what", "what", multiple=True, default=("access",), show_default=True,
              type=click.Choice(["access", "federation", "hub-secret", "all"]),
              help="Which to rotate now; repeat the option for several.")
def keys_rotate(instance: Path, what: tuple[str, ...]) -> None:
    """Rotate now. The new key is published first and signs after the publication delay;
    the old one verifies until its last token expires, so no request fails."""
    from .hub_client import HubUnavailable
    from .rotation import rotate

    state = _app(instance).extensions["headlesskey"]
    forced = {"access", "federation", "hub-secret"} if "all" in what else set(what)
    if forced - {"access"} and not state.settings.federated:
        raise click.UsageError("this site has not joined a hub (`headlesskey-agent join`)")
    try:
        done = rotate(state, force=forced)
    except HubUnavailable as exc:
        raise click.ClickException(f"the hub did not answer: {exc}") from None
    for line in done:
        click.echo(line)
    if any(line.startswith("hub unavailable") for line in done):
        raise SystemExit(1)


@main.command("jobs")
@INSTANCE
@click.option("--webhook-interval", default=2.0, show_default=True,
              type=click.FloatRange(0.1, 3600), help="Seconds between webhook delivery runs.")
@click.option("--prune-interval", default=3600, show_default=True,
              type=click.IntRange(1, 7 * 86400), help="Seconds between prunings of old rows.")
@click.option("--uplink-interval", default=5.0, show_default=True,
              type=click.FloatRange(0.1, 3600),
              help="Seconds between uploads of activity to the hub (federated sites only).")
@click.option("--parent-pid", type=int, default=None, hidden=True,
              help="Stop when this process (serve) is gone.")
def jobs_command(
    instance: Path, webhook_interval: float, prune_interval: int, parent_pid: int | None,
    uplink_interval: float = 5.0,
) -> None:
    """Run the background jobs (webhook delivery, pruning) until SIGTERM or Ctrl-C.

    `serve` starts this beside gunicorn unless given --no-jobs. Any number may run at once,
    on one host or several: no message is sent twice at the same time.
    """
    import logging
    import signal
    import threading

    from .jobs import run_scheduler

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [jobs] %(levelname)s %(name)s: %(message)s"
    )
    # "skipped: maximum number of running instances reached" every 2 s while a slow delivery
    # runs is expected (max_instances=1), not news.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin list, on every start
    # Its jobs run now and then: one idle connection is kept, those of a burst are closed after.
    app = _app(instance, {"HEADLESSKEY_DATABASE_POOL_SIZE": 1})
    state = app.extensions["headlesskey"]
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: t.Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    scheduler = run_scheduler(
        app, webhook_interval=webhook_interval, prune_interval=prune_interval,
        uplink_interval=uplink_interval,
    )
    click.echo(
        f"Jobs of {state.settings.site_name} running: {len(state.settings.webhooks)} webhook "
        f"endpoint(s), delivery every {webhook_interval:g}s, pruning every {prune_interval}s"
    )
    try:
        while not stop.wait(1.0):
            if parent_pid is not None and os.getppid() != parent_pid:
                click.echo("serve has exited; stopping the jobs", err=True)
                break
    finally:
        scheduler.shutdown(wait=True)
        state.engine.dispose()
    click.echo("Jobs stopped.")


if __name__ == "__main__":
    main()
