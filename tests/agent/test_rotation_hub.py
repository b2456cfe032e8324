"""Rotation through the hub: the SSO key's four steps and the hub secret, with the hub up and
down (a real hub app on a port of its own; the agent talks to it over HTTP)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import select
from sqlalchemy import text

from agent import federation
from agent import rotation
from agent.models import StoredKey
from agent.services import keystore
from tests.agent.test_hub_client import rewrite
from tests.agent.test_replay_store import Federation
from tests.agent.test_rotation import age_keys
from tests.agent.test_sso_directory import counted
from tests.agent.test_sso_directory import fed  # noqa: F401 - the fixture, for this module
from tests.agent.test_uplink import Member
from tests.agent.test_uplink import member  # noqa: F401, F811 - the fixture, for this module
from tests.hub.conftest import make_hub  # noqa: F401 - the fixture, for this module


def hub_keys(m: Member) -> dict[str, str]:
    """kid -> status of the member's keys at the hub."""
    with m.hub.state.engine.connect() as conn:
        found = conn.execute(text(
            "SELECT k.kid, k.status FROM hub_site_keys k JOIN hub_sites s ON s.id = k.site_id "
            "WHERE s.site_key = :k"), {"k": m.site_key}).fetchall()
    return {kid: status for kid, status in found}


def secret_versions(m: Member) -> int:
    return int(m.hub.scalar(
        "SELECT count(*) FROM hub_site_secrets x JOIN hub_sites s ON s.id = x.site_id "
        "WHERE s.site_key = :k", k=m.site_key))


def test_the_sso_key_is_published_activated_and_retired_at_the_hub(member: Member) -> None:  # noqa: F811
    m, state = member, member.site.state
    old = state.keys.signing(keystore.FEDERATION)
    assert old is not None
    from agent.cli import _publish_federation_key  # what `serve` does at start

    _publish_federation_key(state)
    assert hub_keys(m) == {old.kid: "active"}

    done = rotation.rotate_federation_key(state, force=True)
    new = state.keys.newest(keystore.FEDERATION)
    assert new is not None and new.kid != old.kid
    assert done[0].startswith("new SSO key") and "published" in done[1]
    assert hub_keys(m) == {old.kid: "active", new.kid: "next"}  # peers learn it first
    assert state.keys.signing(keystore.FEDERATION).kid == old.kid  # type: ignore[union-attr]

    age_keys(m.site, rotation.sso_publish_delay(state.settings).total_seconds() + 1)
    assert state.keys.signing(keystore.FEDERATION).kid == new.kid  # type: ignore[union-attr]
    assert rotation.rotate_federation_key(state) == [f"SSO key {new.kid} active"]
    assert hub_keys(m) == {old.kid: "retiring", new.kid: "active"}

    age_keys(m.site, rotation.sso_retire_after(state.settings).total_seconds() + 1)
    assert rotation.rotate_federation_key(state) == [f"SSO key {old.kid} retired"]
    assert hub_keys(m) == {old.kid: "retired", new.kid: "active"}
    assert rotation.rotate_federation_key(state) == []  # nothing more to do


def test_the_sso_key_waits_for_the_hub(member: Member) -> None:  # noqa: F811
    m, state = member, member.site.state
    m.port.close()
    done = rotation.rotate(state, force={"federation"})
    assert any(line.startswith("hub unavailable") for line in done)
    pending = [e for e in state.keys.entries(keystore.FEDERATION) if e.active_from is None]
    assert len(pending) == 1  # stored, not published: it cannot sign
    m.port.open()
    done = rotation.rotate(state)
    assert any("published" in line for line in done)
    assert hub_keys(m)[pending[0].kid] == "next"


def test_the_hub_secret_rotates_and_the_old_one_keeps_working(member: Member) -> None:  # noqa: F811
    m, state = member, member.site.state
    first = state.keys.hub_secret()
    assert rotation.rotate_hub_secret(state, force=True) == ["hub secret rotated"]
    assert secret_versions(m) == 2
    second = state.keys.hub_secret()
    assert second is not None and second != first
    # Calls to the hub use the new secret at once; SSO signatures wait for the peers.
    assert state.keys.sso_secret() == first
    with state.session_factory() as db:
        federation.directory(db, state, force=True)  # a signed call, accepted
    age_keys(m.site, rotation.sso_publish_delay(state.settings).total_seconds() + 1)
    assert state.keys.sso_secret() == second


def test_a_hub_secret_rotation_the_hub_refuses_is_retried(member: Member) -> None:  # noqa: F811
    m, state = member, member.site.state
    m.port.close()
    assert rotation.rotate_hub_secret(state, force=True) == []
    m.port.open()
    assert secret_versions(m) == 1
    # The claim was given back: the next run rotates.
    assert rotation.rotate_hub_secret(state, force=True) == ["hub secret rotated"]
    assert secret_versions(m) == 2


@pytest.mark.parametrize(("grace", "kept"), [
    ("1e999", 30 * 86400), ("-1e999", 0), ("NaN", 0), (str(10**30), 30 * 86400),
    ("-5", 0), ('"600"', 0), ("true", 0), ("null", 0), ("[]", 0), ("600", 600)])
def test_a_hub_secret_rotation_with_any_grace_keeps_the_new_secret(
        member: Member, grace: str, kept: int) -> None:  # noqa: F811
    """The hub has rotated before the agent reads ``grace_seconds``: whatever it says (infinite,
    huge, negative, not a number) the new secret is stored and used, and the old one is kept for
    at most 30 days."""
    m, state = member, member.site.state

    def hub_says(body: bytes) -> bytes:
        secret = json.loads(body)["secret"]
        return f'{{"secret": "{secret}", "grace_seconds": {grace}}}'.encode()

    state.hub_transport = rewrite("/api/v1/secret/rotate", hub_says)
    first = state.keys.hub_secret()
    assert rotation.rotate_hub_secret(state, force=True) == ["hub secret rotated"]
    assert secret_versions(m) == 2
    assert state.keys.hub_secret() != first
    with state.session_factory() as db:
        federation.directory(db, state, force=True)  # signed with the new secret: accepted
        old = db.scalars(select(StoredKey).where(StoredKey.purpose == keystore.HUB_SECRET)
                         .order_by(StoredKey.id)).first()
    assert old is not None and old.retire_at is not None and old.rotated_at is not None
    assert old.retire_at - old.rotated_at == pytest.approx(dt.timedelta(seconds=kept),
                                                             abs=dt.timedelta(seconds=5))


def test_rotation_is_due_by_the_configured_period(member: Member) -> None:  # noqa: F811
    state = member.site.state
    assert rotation.rotate(state) == []  # fresh keys: nothing due
    age_keys(member.site, 31 * 86400)
    done = rotation.rotate(state)
    assert any(line.startswith("new access-token key") for line in done)
    assert any(line.startswith("new SSO key") for line in done)
    assert "hub secret rotated" not in done  # 90 days


def test_a_peers_new_sso_key_signs_in_at_once(fed: Federation) -> None:  # noqa: F811
    """B's directory, fresh for its refresh interval, predates A's new key: the unknown kid
    makes B fetch it again once, and the user gets in at once."""
    a, b = fed.a, fed.b
    first = b.api.post("/sso/exchange", json=fed.assertion("rhea"))
    assert first.status_code == 200, first.text  # B has cached its directory
    old = a.state.keys.signing(keystore.FEDERATION)
    rotation.rotate_federation_key(a.state, force=True)
    age_keys(a, rotation.sso_publish_delay(a.state.settings).total_seconds() + 1)
    new = a.state.keys.signing(keystore.FEDERATION)
    assert old is not None and new is not None and new.kid != old.kid
    counter = counted(b)
    b.clock.advance(6)  # past the refetch cooldown, well within B's refresh interval
    r = b.api.post("/sso/exchange", json=fed.assertion("rhea"))
    assert r.status_code == 200, r.text
    assert r.json()["user"]["ID"] == first.json()["user"]["ID"]
    assert counter.directory_gets == 1


def test_a_peers_new_hub_secret_signs_in_at_once(fed: Federation) -> None:  # noqa: F811
    """B's directory predates A's new secret (the exchange keys of A's old one only): the HMAC
    that fails makes B fetch it again once, and the user gets in at once."""
    a, b = fed.a, fed.b
    first = b.api.post("/sso/exchange", json=fed.assertion("sigrid"))
    assert first.status_code == 200, first.text
    old = a.state.keys.sso_secret()
    assert rotation.rotate_hub_secret(a.state, force=True) == ["hub secret rotated"]
    age_keys(a, rotation.sso_publish_delay(a.state.settings).total_seconds() + 1)
    assert a.state.keys.sso_secret() != old
    counter = counted(b)
    b.clock.advance(6)
    r = b.api.post("/sso/exchange", json=fed.assertion("sigrid"))
    assert r.status_code == 200, r.text
    assert r.json()["user"]["ID"] == first.json()["user"]["ID"]
    assert counter.directory_gets == 1
