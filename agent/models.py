"""Tables of the agent. Every table is prefixed ``hk_`` so the agent can share a host's database.

Everything that must hold across workers and instances (sessions and their revocation,
refresh-token families, reset codes) lives here, never in process memory.
"""

from __future__ import annotations

import datetime as dt
import typing as t

from sqlalchemy import JSON
from sqlalchemy import BigInteger
from sqlalchemy import Boolean
from sqlalchemy import DateTime
from sqlalchemy import ForeignKey
from sqlalchemy import Index
from sqlalchemy import Integer
from sqlalchemy import LargeBinary
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Text
from sqlalchemy import TypeDecorator
from sqlalchemy import UniqueConstraint
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Store naive UTC, return aware UTC: SQLite keeps no time zone, PostgreSQL would convert."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: t.Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: t.Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """An account of this site. ``ID`` in the plugin's payloads is :attr:`id`."""

    __tablename__ = "hk_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_login: Mapped[str] = mapped_column(String(60))
    # Case-folded copies carry the uniqueness, so "Alice" and "alice" are one account.
    login_key: Mapped[str] = mapped_column(String(60), unique=True)
    email: Mapped[str] = mapped_column(String(254))
    email_key: Mapped[str] = mapped_column(String(254), unique=True)
    display_name: Mapped[str] = mapped_column(String(250))
    password_hash: Mapped[str] = mapped_column(String(255))
    roles: Mapped[list[str]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="active")
    email_verified: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    password_changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Session(Base):
    """One login on one device. Revoking it ends its refresh tokens and access tokens at once.

    A session has exactly one live access token (``access_jti``); after a refresh the previous
    one (``prev_access_jti``) stays valid only for the refresh grace window, so a refreshed
    access token stops working while parallel tabs are not logged out.
    """

    __tablename__ = "hk_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("hk_users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoke_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ip: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(512), default="")
    device: Mapped[str] = mapped_column(String(128), default="")  # "Chrome 120 on Mac OS X"
    access_jti: Mapped[str] = mapped_column(String(64))
    access_iat: Mapped[int] = mapped_column(Integer)
    access_exp: Mapped[int] = mapped_column(Integer)
    prev_access_jti: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rotated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class RefreshToken(Base):
    """One generation of a session's refresh token, stored as a SHA-256 digest."""

    __tablename__ = "hk_refresh_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[str] = mapped_column(
        ForeignKey("hk_sessions.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    generation: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class PasswordReset(Base):
    """A reset link or one-time code, stored as a keyed digest (HMAC), never in clear."""

    __tablename__ = "hk_password_resets"
    __table_args__ = (Index("ix_hk_password_resets_user_active", "user_id", "used_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("hk_users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))  # "link" or "otp"
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class AuditEvent(Base):
    """One auth event: who, from where, what happened. Never holds a secret.

    ``user_id`` is not a foreign key: the trail outlives the account.
    """

    __tablename__ = "hk_audit"
    __table_args__ = (
        # The log reads newest first by (created_at, id); each filter has its own index in
        # that order, so a page is one index range scan whatever the filters and the time.
        Index("ix_hk_audit_user", "user_id", "created_at", "id"),
        Index("ix_hk_audit_event", "event", "created_at", "id"),
        Index("ix_hk_audit_ip", "ip", "created_at", "id"),
        Index("ix_hk_audit_created", "created_at", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    event: Mapped[str] = mapped_column(String(48))
    outcome: Mapped[str] = mapped_column(String(16))  # success, failure, blocked, info
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    login: Mapped[str] = mapped_column(String(254), default="")  # as typed, for failures
    session_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ip: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(512), default="")
    device: Mapped[str] = mapped_column(String(128), default="")
    details: Mapped[dict[str, t.Any]] = mapped_column(JSON, default=dict)


class Throttle(Base):
    """A brute-force counter for one key (``u:<id>``, ``l:<login>``, ``ip:<addr>``)."""

    __tablename__ = "hk_throttle"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lock_count: Mapped[int] = mapped_column(Integer, default=0)  # for escalating locks
    # Attempts reserved and still being checked; they count toward the limit until resolved.
    pending: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pending_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WebhookMessage(Base):
    """An event waiting for (or done with) delivery to one webhook endpoint: the outbox.

    Written in the same transaction as its audit row, so an event is never lost nor sent for a
    change that rolled back. ``body`` is the exact JSON sent on every attempt.
    """

    __tablename__ = "hk_webhook_outbox"
    __table_args__ = (Index("ix_hk_webhook_outbox_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[str] = mapped_column(String(40), unique=True)  # webhook-id, stable
    endpoint: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(48))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending, delivered, dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    claimed_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(String(200), default="")
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WebhookAttempt(Base):
    """One delivery attempt of an outbox message."""

    __tablename__ = "hk_webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(
        ForeignKey("hk_webhook_outbox.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str] = mapped_column(String(200), default="")
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)


class FederationCache(Base):
    """Hub data cached for every worker: the directory and the hub JWKS, with when and how fresh."""

    __tablename__ = "hk_federation_cache"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)  # "directory", "jwks"
    body: Mapped[dict[str, t.Any]] = mapped_column(JSON)
    etag: Mapped[str] = mapped_column(String(128), default="")
    fetched_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    attempted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)  # rate-limits refetches


class UsedAssertion(Base):
    """An SSO assertion already exchanged: its (issuer, jti) never works twice, on any worker."""

    __tablename__ = "hk_sso_used"

    issuer: Mapped[str] = mapped_column(String(255), primary_key=True)
    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class IdentityLink(Base):
    """A peer site's identity (issuer, sub) linked to a local account."""

    __tablename__ = "hk_identity_links"

    issuer: Mapped[str] = mapped_column(String(255), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("hk_users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class StoredKey(Base):
    """A key this site signs with: access-token keys, the SSO key, and the hub secret.

    The material is encrypted with a key derived from the site secret. Which key signs is a
    matter of timestamps, so every worker and instance agrees without talking to the others: a
    key signs from ``active_from`` until a successor's ``active_from`` comes, and keeps verifying
    until ``retire_at``, when the last token it signed has expired. ``rotated_at`` is the claim
    a rotation takes (a conditional update), so one rotation happens however many run at once.
    """

    __tablename__ = "hk_keys"
    __table_args__ = (UniqueConstraint("purpose", "kid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    purpose: Mapped[str] = mapped_column(String(16))  # "access", "federation", "hub-secret"
    kid: Mapped[str] = mapped_column(String(128))
    alg: Mapped[str] = mapped_column(String(8), default="")
    material: Mapped[bytes] = mapped_column(LargeBinary)  # Fernet token
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    active_from: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rotated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    retire_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The SSO key's state at the hub: "" (not sent), "next", "active" or "retired".
    hub_status: Mapped[str] = mapped_column(String(16), default="")


class JobRun(Base):
    """One run of a scheduled job: the job's period ``slot`` (start time // interval) is its key,
    so one process in all the workers and instances sharing the database runs each period."""

    __tablename__ = "hk_job_runs"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    runner: Mapped[str] = mapped_column(String(128))  # host:pid of the process that ran it
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


def save_cache(db: t.Any, name: str, body: dict[str, t.Any], now: dt.datetime) -> None:
    """Write a :class:`FederationCache` row (not committed). Every worker may write the same
    row at once (the first directory, a policy, a logout list): an upsert, never a duplicate."""
    from .db import upsert

    upsert(db, FederationCache.__table__, "name", name=name, body=body, etag="",
           fetched_at=now, attempted_at=now)
    cached = db.get(FederationCache, name, populate_existing=True)
    assert cached is not None
