"""The ``headlesskey-hub`` command: init, serve, jobs, admins, sites, db.

Configuration problems (a bad ``hub.toml``, a missing master key, a database that cannot be
reached) are one line on stderr and exit status 2; user mistakes (a weak password, an unknown
site) are one line and exit status 1.
Secrets are printed once, when they are made, and never again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import typing as t
from pathlib import Path
from urllib.parse import urlsplit

import click

from agent.db import DATABASE_ERRORS
from agent.db import _cause
from agent.errors import AgentError
from agent.errors import ConfigError
from agent.text import holds_controls

from .crypto import MasterKeyError

if t.TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy.orm import Session as DBSession

    from .models import Site
    from .state import HubState

INSTANCE = click.option(
    "--instance",
    "instance",
    envvar="HEADLESSKEY_HUB_INSTANCE",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The hub's instance folder (hub.toml, master.key, SQLite database).",
)
ACTOR = "cli"


def _describe(exc: AgentError) -> str:
    """One line: the error's message and, if any, its field problems."""
    details = "; ".join(f"{k}: {' '.join(v)}" for k, v in (exc.fields or {}).items())
    return f"{exc.message} {details}".strip().replace("\n", " ")


class _Group(click.Group):
    """Configuration errors → one line, exit 2; service refusals → one line, exit 1."""

    def invoke(self, ctx: click.Context) -> t.Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, MasterKeyError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except DATABASE_ERRORS as exc:  # no server there, refused, a file that cannot be opened
            click.echo(f"error: the database cannot be reached ({_cause(exc)}); check "
                       "HEADLESSKEY_HUB_DATABASE_URL and that the database is up", err=True)
            sys.exit(2)
        except AgentError as exc:
            raise click.ClickException(_describe(exc)) from None


def _app(instance: Path) -> Flask:
    """The instance's app, its schema brought to the newest version (idempotent)."""
    from . import create_app
    from .db import upgrade
    from .state import get_state

    app = create_app(instance_path=str(instance))
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # the command's connections are closed when it ends
        ctx.call_on_close(get_state(app).engine.dispose)
    upgrade(get_state(app).engine)
    return app


class _Context(t.NamedTuple):
    app: Flask
    state: HubState


def _open(instance: Path) -> _Context:
    from .state import get_state

    app = _app(instance)
    state = get_state(app)
    _check_master_key(state)
    return _Context(app, state)


def _check_master_key(state: HubState) -> None:
    """Stop now, not at the first API call, if the master key cannot read what is stored."""
    from sqlalchemy import select

    from .models import HubKey
    from .models import SiteSecret

    with state.session_factory() as db:
        blob = db.scalar(select(HubKey.private_ciphertext).limit(1))
        if blob is None:
            blob = db.scalar(select(SiteSecret.ciphertext).limit(1))
    if blob is not None:
        try:
            state.vault.decrypt(blob)
        except MasterKeyError as exc:
            raise ConfigError(
                f"HEADLESSKEY_HUB_MASTER_KEY / master.key: {exc} (wrong or missing key; "
                "restore the key that encrypted this database)"
            ) from None


@click.group(cls=_Group)
@click.version_option(package_name="headlesskey")
def main() -> None:
    """HeadlessKey hub: site registry, signed site API, federation JWKS, admin console."""


# ---------------------------------------------------------------------------------------------
# init


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_url(url: str) -> str:
    # No space or control character anywhere (urlsplit drops a tab, so it would be checked
    # without it and written with it), nor a byte that is no UTF-8 (hub.toml could not hold it).
    bad = holds_controls(url) or any(c.isspace() for c in url.strip())
    parts = urlsplit(url.strip())
    if (bad or parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment):
        raise click.BadParameter("an http(s)://host[:port][/path] URL", param_hint="--url")
    return url.strip().rstrip("/")


@main.command()
@click.option(
    "--instance",
    "instance",
    envvar="HEADLESSKEY_HUB_INSTANCE",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The folder to create (mode 0700).",
)
@click.option("--url", default="http://127.0.0.1:9000", show_default=True,
              help="Public base URL of the hub (its issuer).")
def init(instance: Path, url: str) -> None:
    """Create an instance: master.key, hub.toml, the database and the hub's signing key."""
    from . import CONFIG_FILE
    from . import MASTER_KEY_FILE
    from .crypto import new_master_key
    from .crypto import write_private
    from .services import keys

    url = _check_url(url)
    existing = [n for n in (CONFIG_FILE, MASTER_KEY_FILE, "hub.db") if (instance / n).exists()]
    if existing:
        raise click.ClickException(
            f"{instance} already holds a hub ({', '.join(existing)}); refusing to overwrite it"
        )
    made_folder = not instance.exists()
    instance.mkdir(parents=True, exist_ok=True)
    os.chmod(instance, 0o700)
    key_from_env = bool(os.environ.get("HEADLESSKEY_HUB_MASTER_KEY"))
    config = "\n".join(
        [
            "# HeadlessKey hub settings: keys without the HEADLESSKEY_HUB_ prefix, in lower",
            "# case (see docs/hub.md). Environment variables HEADLESSKEY_HUB_* override them.",
            f"url = {_toml(url)}",
            "",
        ]
    ).encode()
    try:
        if not key_from_env:
            write_private(instance / MASTER_KEY_FILE, new_master_key() + b"\n")
        write_private(instance / CONFIG_FILE, config)
        app, state = _open(instance)
        with app.app_context(), state.session_factory() as db:
            hub_key = keys.ensure_hub_key(db, state)
            db.commit()
        _protect_sqlite(state)
    except BaseException:
        # Nothing of a failed init stays (a database that cannot be reached, say): its master
        # key or hub.toml would make the next init refuse the folder as a hub's.
        for name in (MASTER_KEY_FILE, CONFIG_FILE, "hub.db", "hub.db-wal", "hub.db-shm"):
            (instance / name).unlink(missing_ok=True)
        if made_folder and not any(instance.iterdir()):
            instance.rmdir()
        raise
    click.echo(f"Initialised the hub in {instance} (issuer {url}, signing key {hub_key.kid}).")
    if key_from_env:
        click.echo("The master key comes from HEADLESSKEY_HUB_MASTER_KEY; no master.key written.")
    else:
        click.echo(f"Back up {instance / MASTER_KEY_FILE} apart from the database: without it "
                   "no site secret can be read.")
    click.echo("Next:")
    click.echo(f"  headlesskey-hub admins create --instance {instance} --username admin "
               "--password-stdin")
    click.echo(f"  headlesskey-hub serve --instance {instance}")


def _protect_sqlite(state: HubState) -> None:
    """Make a SQLite database file (and its WAL) readable by the owner only."""
    url = state.engine.url
    database = url.database if url.get_backend_name() == "sqlite" else None
    if not database:
        return
    for suffix in ("", "-wal", "-shm"):
        path = Path(database + suffix)
        if path.exists():
            os.chmod(path, 0o600)


# ---------------------------------------------------------------------------------------------
# serve and jobs


@main.command()
@INSTANCE
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--no-jobs", is_flag=True,
              help="Do not start the jobs process (run `headlesskey-hub jobs` yourself).")
def serve(instance: Path, host: str, port: int, workers: int, no_jobs: bool = False) -> None:
    """Serve the hub with gunicorn (migrations run first) and, beside it, the jobs process."""
    from agent import serving

    app, state = _open(instance)
    state.engine.dispose()  # no connection may cross the fork into the workers

    click.echo(f"Serving the hub {state.setting('URL')} on http://{host}:{port}")
    serving.serve(app, host=host, port=port, workers=workers,
                  jobs_module=None if no_jobs else "hub.cli", instance=str(instance.resolve()))


@main.command("jobs")
@INSTANCE
@click.option("--parent-pid", type=int, default=None, hidden=True,
              help="Stop when this process (serve) is gone.")
def jobs_command(instance: Path, parent_pid: int | None) -> None:
    """Run the scheduled jobs (nonces, expired secrets, old events, hub key) until SIGTERM.

    `serve` starts this beside gunicorn unless given --no-jobs. Any number may run at once, on
    one host or several: each run of a job is claimed in the database, so it happens once.
    """
    import logging

    from . import jobs

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [hub-jobs] %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    app, _state = _open(instance)
    click.echo(f"Hub jobs running (pid {os.getpid()}).")
    jobs.run_forever(app, parent_pid=parent_pid)
    click.echo("Hub jobs stopped.")


# ---------------------------------------------------------------------------------------------
# admins


@main.group()
def admins() -> None:
    """Console administrators."""


@admins.command("create")
@INSTANCE
@click.option("--username", required=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (required).")
def admins_create(instance: Path, username: str, password_stdin: bool) -> None:
    """Create a console admin; the password is read from standard input, never from arguments."""
    from .services import admins as admin_service

    if not password_stdin:
        raise click.UsageError("give --password-stdin and pipe the password in")
    password = sys.stdin.readline().rstrip("\r\n")
    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        admin = admin_service.create(db, state, username, password)
        db.commit()
    click.echo(f"Created admin {admin.username}.")


def _when(value: dt.datetime | None) -> str | None:
    return None if value is None else (
        value.replace(microsecond=0).isoformat().replace("+00:00", "Z"))


@admins.command("list")
@INSTANCE
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def admins_list(instance: Path, as_json: bool) -> None:
    """List the console admins (never their password hashes)."""
    from .services import admins as admin_service

    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        now = state.clock()
        rows = [{
            "username": a.username,
            "status": "active" if a.active else "disabled",
            "created_at": _when(a.created_at),
            "last_login_at": _when(a.last_login_at),
            "locked_until": (_when(a.locked_until)
                             if admin_service.is_locked(state, a, now) else None),
        } for a in admin_service.list_admins(db)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No admins yet: add one with `headlesskey-hub admins create`.")
        return
    click.echo(f"{'USERNAME':<24} {'STATUS':<9} {'CREATED':<21} {'LAST SIGN-IN':<21} LOCKED UNTIL")
    for row in rows:
        click.echo(f"{row['username']:<24} {row['status']:<9} {row['created_at']:<21} "
                   f"{row['last_login_at'] or '-':<21} {row['locked_until'] or '-'}")


@admins.command("set-password")
@INSTANCE
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (required).")
def admins_set_password(instance: Path, username: str, password_stdin: bool) -> None:
    """Give an admin a new password, read from standard input; every console session of theirs
    ends and their lock is cleared."""
    from .services import admins as admin_service

    if not password_stdin:
        raise click.UsageError("give --password-stdin and pipe the password in")
    password = sys.stdin.readline().rstrip("\r\n")
    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        # Locked as sign-in locks it: a sign-in checking the old password meanwhile is waited
        # for, and the session it opens ends with the others.
        admin = admin_service.get(db, username, lock=True)
        admin_service.set_password(db, state, admin, password, actor=ACTOR)
        db.commit()
    click.echo(f"New password set for admin {username}; their console sessions have ended.")


@admins.command("unlock")
@INSTANCE
@click.argument("username")
def admins_unlock(instance: Path, username: str) -> None:
    """Clear an admin's failed sign-ins and lock, so they can sign in at once."""
    from .services import admins as admin_service

    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        admin = admin_service.get(db, username, lock=True)
        was_locked = admin_service.unlock(db, state, admin, actor=ACTOR)
        db.commit()
    click.echo(f"Unlocked admin {username}." if was_locked else
               f"Admin {username} was not locked; their failed sign-ins are cleared.")


def _set_active(instance: Path, username: str, active: bool) -> None:
    from .services import admins as admin_service

    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        admin = admin_service.get(db, username, lock=True)
        changed = admin_service.set_active(db, state, admin, active, actor=ACTOR)
        db.commit()
    status = "active" if active else "disabled"
    click.echo(f"Admin {username} is {status}." if changed else
               f"Admin {username} was {status} already.")


@admins.command("disable")
@INSTANCE
@click.argument("username")
def admins_disable(instance: Path, username: str) -> None:
    """Disable an admin: every console session of theirs ends, and they cannot sign in."""
    _set_active(instance, username, False)


@admins.command("enable")
@INSTANCE
@click.argument("username")
def admins_enable(instance: Path, username: str) -> None:
    """Let a disabled admin sign in again."""
    _set_active(instance, username, True)


# ---------------------------------------------------------------------------------------------
# sites


@main.group()
def sites() -> None:
    """Member sites: onboarding, status, secrets."""


def _site_dict(db: DBSession, state: HubState, site: Site) -> dict[str, t.Any]:
    from .services import keys as key_service
    from .services import sites as site_service

    return {
        "site_key": site.site_key,
        "name": site.name,
        "base_url": site.base_url,
        "issuer": site.issuer,
        "status": site.status,
        "allowed_origins": list(site.allowed_origins or []),
        "redirect_uris": list(site.redirect_uris or []),
        "contact": site.contact,
        "valid_secrets": len(site_service.valid_secrets(db, state, site)),
        "keys": len(key_service.site_keys(db, site)),
        "created_at": site.created_at.isoformat().replace("+00:00", "Z"),
    }


def _show_secret(site_key: str, secret: str) -> None:
    click.echo(f"  site key: {site_key}")
    click.echo(f"  secret:   {secret}")
    click.echo("  The secret is shown only this once: put it in the site's configuration now.")


@sites.command("add")
@INSTANCE
@click.option("--name", required=True, help="Display name (unique).")
@click.option("--url", "base_url", required=True, help="Base URL of the site (https://...).")
@click.option("--key", "site_key", default=None,
              help="Site key (lower-case letters, digits, -); default: from the name.")
@click.option("--origin", "origins", multiple=True,
              help="An allowed browser origin (repeat for several).")
@click.option("--redirect-uri", "redirect_uris", multiple=True,
              help="An allowed redirect URI (repeat for several).")
@click.option("--contact", default="", help="Who runs the site (e-mail).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def sites_add(
    instance: Path,
    name: str,
    base_url: str,
    site_key: str | None,
    origins: tuple[str, ...],
    redirect_uris: tuple[str, ...],
    contact: str,
    as_json: bool,
) -> None:
    """Onboard a site and print its key and secret, once."""
    from .services import sites as site_service

    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        onboarded = site_service.add_site(
            db, state, ACTOR, name=name, base_url=base_url, site_key=site_key,
            allowed_origins=list(origins), redirect_uris=list(redirect_uris), contact=contact,
        )
        db.commit()
        site = onboarded.site
    if as_json:
        click.echo(json.dumps({"site_key": site.site_key, "secret": onboarded.secret,
                               "name": site.name, "base_url": site.base_url}))
        return
    click.echo(f"Added site {site.name} ({site.base_url}).")
    _show_secret(site.site_key, onboarded.secret)


@sites.command("list")
@INSTANCE
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def sites_list(instance: Path, as_json: bool) -> None:
    """List the member sites (never their secrets)."""
    from .services import sites as site_service

    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        rows = [_site_dict(db, state, s) for s in site_service.list_sites(db)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No sites yet: add one with `headlesskey-hub sites add`.")
        return
    click.echo(f"{'KEY':<24} {'STATUS':<10} {'NAME':<24} URL")
    for row in rows:
        click.echo(f"{row['site_key']:<24} {row['status']:<10} {row['name']:<24} {row['base_url']}")


def _set_status(instance: Path, site_key: str, status: str) -> None:
    from .services import sites as site_service

    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        # Locked as the console's forms lock it: a change of the site made meanwhile is seen,
        # and a site removed meanwhile is unknown.
        site = site_service.get(db, site_key, lock=True)
        site_service.set_status(db, state, site, status, actor=ACTOR)
        db.commit()
    click.echo(f"Site {site_key} is {status}.")


@sites.command("suspend")
@INSTANCE
@click.argument("site_key")
def sites_suspend(instance: Path, site_key: str) -> None:
    """Suspend a site: its API calls are refused and it leaves its peers' directories."""
    _set_status(instance, site_key, "suspended")


@sites.command("resume")
@INSTANCE
@click.argument("site_key")
def sites_resume(instance: Path, site_key: str) -> None:
    """Make a suspended site active again."""
    _set_status(instance, site_key, "active")


@sites.command("remove")
@INSTANCE
@click.argument("site_key")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def sites_remove(instance: Path, site_key: str, yes: bool) -> None:
    """Delete a site with its secrets and keys (its events stay in the log)."""
    from .services import sites as site_service

    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        name = site_service.get(db, site_key).name
        db.rollback()  # nothing is held (SQLite's write lock) while the question waits
        if not yes:
            click.confirm(
                f"Remove {name} ({site_key}) with its secrets and keys? This cannot be undone",
                abort=True,
            )
        # Locked as the console's forms lock it: a site removed meanwhile is unknown.
        site = site_service.get(db, site_key, lock=True)
        site_service.remove(db, state, site, actor=ACTOR)
        db.commit()
    click.echo(f"Removed site {site_key}.")


@sites.command("rotate-secret")
@INSTANCE
@click.argument("site_key")
@click.option("--grace", type=click.IntRange(0, 30 * 86400), default=None,
              help="Seconds the previous secret stays valid [default: the console's "
              "setting, else HEADLESSKEY_HUB_SECRET_GRACE].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def sites_rotate_secret(instance: Path, site_key: str, grace: int | None, as_json: bool) -> None:
    """Give a site a new secret (printed once); the previous one works for the grace period."""
    from .services import settings as settings_service
    from .services import sites as site_service

    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        site = site_service.get(db, site_key)
        if grace is None:
            grace = settings_service.effective(db, state, "SECRET_GRACE")
        now = state.clock()
        secret = site_service.rotate_secret(db, state, site, actor=ACTOR, grace=grace)
        db.commit()
    until = (now + dt.timedelta(seconds=grace)).replace(microsecond=0)
    until_text = until.isoformat().replace("+00:00", "Z")
    if as_json:
        click.echo(json.dumps({"site_key": site_key, "secret": secret, "grace_seconds": grace,
                               "previous_valid_until": until_text}))
        return
    click.echo(f"New secret for {site_key}:")
    _show_secret(site_key, secret)
    click.echo(f"  The previous secret stays valid for {grace} s (until {until_text}).")


@sites.command("import")
@INSTANCE
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def sites_import(instance: Path, file: Path) -> None:
    """Add or update the sites of a registry file (see sites.example.toml); idempotent.

    New sites get a secret, printed once; existing sites (matched by id) are updated in place
    and keep their secrets. Nothing is written unless every entry is valid.
    """
    from .services import sites as site_service

    app, state = _open(instance)
    with app.app_context(), state.session_factory() as db:
        results = site_service.import_file(db, state, file, actor=ACTOR)
        db.commit()
    for site_key, outcome, secret in results:
        click.echo(f"{outcome:<9} {site_key}")
        if secret is not None:
            _show_secret(site_key, secret)
    counts = {o: sum(1 for r in results if r[1] == o) for o in ("added", "updated", "unchanged")}
    click.echo(", ".join(f"{n} {o}" for o, n in counts.items()))


# ---------------------------------------------------------------------------------------------
# db


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@INSTANCE
def db_upgrade(instance: Path) -> None:
    """Bring the database schema to the newest version."""
    _app(instance)
    click.echo("Database is up to date.")


if __name__ == "__main__":
    main()
