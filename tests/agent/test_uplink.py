"""Activity to the hub (issue 5, item 5): a member agent uploads its activity log in signed
batches, buffered in its own database while the hub is down, and the hub console shows it.

Real HTTP both ways: a hub (``make_hub``) served on a port of this test's own, which the test
closes and reopens to take the hub down and bring it back, and a member agent (``make_site``
with a hub URL, site key, secret file and federation key). Events are made over HTTP against
the agent (logins that succeed and fail, registrations); :func:`upload_pending` is called
directly, and once through the jobs scheduler. A small WSGI wrapper records the status of every
request the hub answers, so a test can count the batches that reached it.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import update
from werkzeug.serving import make_server

from agent import uplink
from agent.jobs import UPLINK_JOB_ID
from agent.jobs import run_scheduler
from agent.models import AuditEvent
from agent.models import FederationCache
from agent.services.keys import generate_private_key_pem
from agent.uplink import cursor_of
from agent.uplink import upload_pending
from hub.models import Event
from tests.agent.test_hub_client import NESTED
from tests.agent.test_hub_client import rewrite
from tests.agent.test_webhooks import register
from tests.conftest import PASSWORD
from tests.conftest import SERVER_POLL
from tests.conftest import Site
from tests.conftest import free_port
from tests.hub.conftest import Hub
from tests.hub.conftest import make_hub  # noqa: F401 - the fixture, for this module
from tests.hub.test_console import Console
from tests.hub.test_console import make_admin

EVENTS = "/api/v1/events"
WRONG = "not the password at all"
USER = "marta"  # not the console admin's name (alice), so the pages show it for the events


class HubPort:
    """The hub app served on a port of its own: ``close()`` takes the hub down, ``open()`` back.

    Records ``(method, path, status)`` of every request it answers.
    """

    def __init__(self, app: t.Any) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._server: t.Any = None
        self._thread: threading.Thread | None = None
        self.open()

    def _wsgi(self, environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        def recording_start(status: str, headers: t.Any, exc_info: t.Any = None) -> t.Any:
            with self._lock:
                self.requests.append(
                    (environ["REQUEST_METHOD"], environ["PATH_INFO"], int(status.split()[0]))
                )
            return start_response(status, headers, exc_info)

        return self.app(environ, recording_start)

    def open(self) -> None:
        self._server = make_server("127.0.0.1", self.port, self._wsgi, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": SERVER_POLL}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5)
            self._server = None

    def uploads(self) -> list[int]:
        """The statuses of the event batches the hub answered, in order."""
        with self._lock:
            return [status for method, path, status in self.requests
                    if (method, path) == ("POST", EVENTS)]


@dataclass
class Member:
    hub: Hub
    port: HubPort
    site: Site
    site_key: str

    @property
    def state(self) -> t.Any:
        return self.site.state

    def upload(self, **kw: t.Any) -> int:
        return upload_pending(self.site.state, **kw)

    def local(self) -> list[AuditEvent]:
        """The agent's activity log, oldest first."""
        with self.site.db() as db:
            return list(db.scalars(select(AuditEvent).order_by(AuditEvent.id)))

    def at_hub(self) -> list[Event]:
        """The events this site uploaded, as the hub stored them, oldest first."""
        with self.hub.state.session_factory() as db:
            return list(db.scalars(select(Event).where(Event.source == "site")
                                   .order_by(Event.id)))

    def assert_all_at_hub_once(self) -> None:
        local = self.local()
        remote = self.at_hub()
        assert sorted(int(e.remote_id or 0) for e in remote) == [e.id for e in local]
        assert {e.site_key for e in remote} == {self.site_key}

    def set_cursor(self, last_id: int) -> None:
        with self.site.db() as db:
            db.execute(update(FederationCache).where(FederationCache.name == "uplink")
                       .values(body={"last_id": last_id}))
            db.commit()

    def activity(self, count: int) -> None:
        """``count`` events over HTTP: alternately a failed login and a good one."""
        for i in range(count):
            if i % 2:
                assert self.site.api.post("/token", json={"username": USER, "password": WRONG}
                                          ).status_code == 401
            else:
                self.site.api.login(USER)


@pytest.fixture
def member(make_hub: t.Callable[..., Hub], make_site: t.Callable[..., Site],  # noqa: F811
           tmp_path: Path) -> t.Iterator[Member]:
    hub = make_hub()
    port = HubPort(hub.app)
    site_key, secret = hub.add_site("Shop", "https://shop.example.com")
    secret_file = tmp_path / "hub-secret.key"
    secret_file.write_text(secret + "\n")
    key_file = tmp_path / "federation-key.pem"
    key_file.write_bytes(generate_private_key_pem("ES256"))
    site = make_site(
        HEADLESSKEY_HUB_URL=port.url,
        HEADLESSKEY_HUB_SITE_KEY=site_key,
        HEADLESSKEY_HUB_SECRET_FILE=str(secret_file),
        HEADLESSKEY_FEDERATION_KEY_FILE=str(key_file),
        # Every request comes from 127.0.0.1: no lock may get in the way of the failures made.
        HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES=1000,
        HEADLESSKEY_LOCKOUT_MAX_FAILURES=100,
    )
    assert site.state.settings.federated
    site.create_user(USER)
    yield Member(hub, port, site, site_key)
    port.close()


# ---------------------------------------------------------------------------------------------


def test_events_reach_the_hub_once_with_their_fields(member: Member) -> None:
    member.activity(4)  # login ok, failed, ok, failed
    register(member.site, "bruno")
    # An email already taken: a registration that failed, an event too.
    assert member.site.api.post("/register", json={
        "username": "bruna", "email": "bruno@example.com", "password": PASSWORD,
    }).status_code < 500
    local = member.local()
    assert [(e.event, e.outcome) for e in local] == [
        ("login.succeeded", "success"), ("login.failed", "failure"),
        ("login.succeeded", "success"), ("login.failed", "failure"),
        ("user.registered", "success"), ("user.registered", "failure"),
    ]

    assert member.upload() == len(local)
    assert member.port.uploads() == [200]  # one batch
    assert cursor_of(member.state) == local[-1].id
    remote = member.at_hub()
    assert [(e.remote_id, e.source, e.site_key, e.event, e.outcome, e.ip) for e in remote] == [
        (str(e.id), "site", member.site_key, e.event, e.outcome, e.ip) for e in local
    ]
    assert all(e.ip == "127.0.0.1" for e in remote)
    assert [e.created_at for e in remote] == [e.created_at for e in local]
    by_id = {e.remote_id: e for e in remote}
    for event in local:
        stored = by_id[str(event.id)]
        # The console's actor is the login as typed (the user id, if any, goes to the details).
        assert stored.actor == event.login, (event.event, stored.actor)
        expected = dict(event.details)
        if event.user_id is not None and event.login:
            expected["user_id"] = str(event.user_id)
        if event.device:
            expected["device"] = event.device
        assert stored.details == expected
    failed = [e for e in remote if e.event == "login.failed"]
    assert failed and all(e.outcome == "failure" and e.actor == USER for e in failed)
    registered = [(e.actor, e.outcome) for e in remote if e.event == "user.registered"]
    assert registered == [("bruno", "success"), ("bruna", "failure")]
    assert remote[-1].details["reason"] == "email_taken"

    # Nothing new: no request at all.
    assert member.upload() == 0
    assert member.port.uploads() == [200]
    # New events: only they go.
    member.activity(1)
    assert member.upload() == 1
    assert member.port.uploads() == [200, 200]
    member.assert_all_at_hub_once()

    # A lost answer, as if: the cursor goes back and everything is sent again, stored once.
    member.set_cursor(0)
    total = len(member.local())
    assert member.upload() == total
    assert member.port.uploads() == [200, 200, 200]
    member.assert_all_at_hub_once()
    assert cursor_of(member.state) == member.local()[-1].id


def test_a_backlog_goes_in_batches(member: Member) -> None:
    member.activity(7)
    assert member.upload(batch=3, max_batches=2) == 6  # two batches per run at most
    assert member.port.uploads() == [200, 200]
    assert cursor_of(member.state) == member.local()[5].id
    assert member.upload(batch=3) == 1
    member.assert_all_at_hub_once()


def test_nothing_is_lost_while_the_hub_is_down(member: Member) -> None:
    member.activity(2)
    assert member.upload() == 2
    before = cursor_of(member.state)

    member.port.close()
    member.activity(3)
    assert member.upload() == 0  # unreachable: the cursor stays
    assert cursor_of(member.state) == before
    member.activity(2)  # more activity while it is down
    member.site.clock.advance(uplink.LEASE.total_seconds() + 1)
    assert member.upload() == 0
    assert cursor_of(member.state) == before

    member.port.open()
    # The failed attempt holds the lease: the next try is LEASE after it, not on every tick.
    assert member.upload() == 0
    assert member.port.uploads() == [200]
    member.site.clock.advance(uplink.LEASE.total_seconds() + 1)
    assert member.upload() == 5
    assert member.port.uploads() == [200, 200]
    member.assert_all_at_hub_once()
    assert len(member.at_hub()) == 7
    assert cursor_of(member.state) == member.local()[-1].id


def test_an_acknowledgement_of_another_shape_still_moves_the_cursor(member: Member) -> None:
    """The hub took the batch (2xx); an answer nested past the stack is no exception."""
    member.activity(2)
    member.state.hub_transport = rewrite(uplink.EVENTS_PATH, lambda _: NESTED)
    assert member.upload() == 2
    assert cursor_of(member.state) == member.local()[-1].id
    member.assert_all_at_hub_once()


def test_a_refusing_hub_moves_nothing(member: Member) -> None:
    make_admin(member.hub)
    console = Console(member.hub)
    assert console.login().status_code == 302
    page = f"/console/sites/{member.site_key}"
    member.activity(2)
    assert console.post(f"{page}/suspend", form_page=page).status_code in (302, 303)

    assert member.upload() == 0  # the hub answers 401 to a suspended site
    assert member.port.uploads() == [401]
    assert cursor_of(member.state) == 0
    assert member.at_hub() == []

    assert console.post(f"{page}/resume", form_page=page).status_code in (302, 303)
    member.site.clock.advance(uplink.LEASE.total_seconds() + 1)
    assert member.upload() == 2
    assert member.port.uploads() == [401, 200]
    member.assert_all_at_hub_once()


def test_a_hub_with_a_small_body_limit_gets_smaller_batches(
    make_hub: t.Callable[..., Hub], make_site: t.Callable[..., Site],  # noqa: F811
    tmp_path: Path,
) -> None:
    hub = make_hub(HEADLESSKEY_HUB_MAX_BODY=2000)
    port = HubPort(hub.app)
    try:
        site_key, secret = hub.add_site("Shop", "https://shop.example.com")
        (tmp_path / "secret").write_text(secret)
        (tmp_path / "key.pem").write_bytes(generate_private_key_pem("ES256"))
        site = make_site(HEADLESSKEY_HUB_URL=port.url, HEADLESSKEY_HUB_SITE_KEY=site_key,
                         HEADLESSKEY_HUB_SECRET_FILE=str(tmp_path / "secret"),
                         HEADLESSKEY_FEDERATION_KEY_FILE=str(tmp_path / "key.pem"))
        member = Member(hub, port, site, site_key)
        site.create_user(USER)
        member.activity(12)
        assert member.upload() == 12
        statuses = port.uploads()
        assert statuses[0] == 413 and statuses[-1] == 200, statuses
        assert statuses.count(200) >= 2
        member.assert_all_at_hub_once()
    finally:
        port.close()


def test_two_uploaders_at_once_send_each_event_once(member: Member) -> None:
    member.activity(12)
    barrier = threading.Barrier(4)
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(10)
            results.append(member.upload(batch=3))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert sorted(results) == [0, 0, 0, 12]  # one of them had the lease
    assert member.port.uploads() == [200] * 4  # 12 events, batches of 3, each sent once
    member.assert_all_at_hub_once()


def test_an_event_committed_late_is_waited_for(member: Member) -> None:
    """On PostgreSQL a later id can commit first: the upload never steps over a young gap."""
    member.activity(2)
    assert member.upload() == 2
    last = cursor_of(member.state)

    def insert(row_id: int) -> None:
        with member.site.db() as db:
            db.add(AuditEvent(id=row_id, created_at=member.site.clock(), event="user.updated",
                              outcome="success", login=USER, ip="127.0.0.1", details={}))
            db.commit()

    insert(last + 2)  # committed before last + 1
    assert member.upload() == 0
    assert cursor_of(member.state) == last
    insert(last + 1)  # the late one
    assert member.upload() == 2
    # A gap that never fills (a rolled-back transaction) is passed once it is old enough.
    insert(last + 4)
    assert member.upload() == 0
    member.site.clock.advance(uplink.GAP_SETTLE.total_seconds() + 1)
    assert member.upload() == 1
    assert cursor_of(member.state) == last + 4
    member.assert_all_at_hub_once()
    assert [e.id for e in member.local()][-4:] == [last, last + 1, last + 2, last + 4]


def test_ids_that_restart_are_uploaded(member: Member) -> None:
    """SQLite reuses ids once every row is gone (all pruned): a cursor past the highest id
    starts again from the beginning."""
    member.activity(3)
    assert member.upload() == 3
    # As if the ids had reached 1000 and the rows were all pruned since, here and at the hub.
    member.set_cursor(1000)
    with member.hub.state.engine.begin() as conn:
        conn.execute(text("DELETE FROM hub_events WHERE source = 'site'"))
    member.activity(1)
    assert member.upload() == 4
    assert cursor_of(member.state) == member.local()[-1].id
    member.assert_all_at_hub_once()
    assert member.upload() == 0


def rows_of(html: str, event: str) -> list[str]:
    """The table rows of a console page that show ``event``."""
    return [row for row in re.findall(r"<tr>(.*?)</tr>", html, re.S)
            if f"<code>{event}</code>" in row]


def test_the_hub_console_shows_the_uploaded_activity(member: Member) -> None:
    member.activity(2)
    assert member.upload() == 2
    make_admin(member.hub)
    console = Console(member.hub)
    assert console.login().status_code == 302
    for path in (f"/console/activity?site={member.site_key}", f"/console/sites/{member.site_key}",
                 "/console/activity?event=login.failed"):
        page = console.get(path)
        assert page.status_code == 200, path
        (row,) = rows_of(page.text, "login.failed")
        assert "(site)" in row and USER in row and "127.0.0.1" in row, (path, row)
        assert "failure" in row, (path, row)
    page = console.get(f"/console/activity?site={member.site_key}").text
    (row,) = rows_of(page, "login.succeeded")
    assert member.site_key in row and USER in row and '<span class="k">user_id</span>=1' in row, row
    other = console.get("/console/activity?site=nosuchsite").text
    assert rows_of(other, "login.failed") == [] and "No events." in other


def test_the_jobs_process_uploads_when_federated(member: Member) -> None:
    scheduler = run_scheduler(member.site.app, webhook_interval=60, prune_interval=3600,
                              uplink_interval=0.2)
    try:
        assert UPLINK_JOB_ID in {job.id for job in scheduler.get_jobs()}
        member.activity(3)
        deadline = time.monotonic() + 10
        while len(member.at_hub()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        scheduler.shutdown(wait=True)
    member.assert_all_at_hub_once()


def test_a_site_outside_any_federation_uploads_nothing(make_site: t.Callable[..., Site]) -> None:
    site = make_site()
    site.create_user("alice")
    site.api.login("alice")
    assert upload_pending(site.state) == 0
    assert site.scalar("SELECT count(*) FROM hk_federation_cache") == 0
    scheduler = run_scheduler(site.app, webhook_interval=60, prune_interval=3600)
    try:
        assert UPLINK_JOB_ID not in {job.id for job in scheduler.get_jobs()}
    finally:
        scheduler.shutdown(wait=True)


def test_items_carry_no_user_agent_and_a_utc_time(member: Member) -> None:
    member.site.api.login(USER, headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; "
                                         "rv:128.0) Gecko/20100101 Firefox/128.0"})
    (event,) = [e for e in member.local() if e.event == "login.succeeded"]
    assert "Firefox" in event.user_agent
    item = uplink._item(event)  # noqa: SLF001 - the wire format
    assert set(item) == {"id", "time", "event", "outcome", "user_id", "login", "ip", "device",
                         "details"}
    assert "Firefox/128.0" not in repr(item)  # the raw User-Agent stays on the site
    assert item["time"].endswith("Z")
    assert dt.datetime.fromisoformat(item["time"].replace("Z", "+00:00")) == event.created_at
    assert item["device"] == event.device and "Firefox" in event.device
