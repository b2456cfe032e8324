"""Tables of the hub (prefixed ``hub_``)."""

from __future__ import annotations

import datetime as dt
import typing as t

from sqlalchemy import JSON
from sqlalchemy import Boolean
from sqlalchemy import Float
from sqlalchemy import ForeignKey
from sqlalchemy import Index
from sqlalchemy import Integer
from sqlalchemy import LargeBinary
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import UniqueConstraint
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from agent.models import NAMING_CONVENTION
from agent.models import UTCDateTime


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Site(Base):
    """A member site of the federation."""

    __tablename__ = "hub_sites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_key: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    base_url: Mapped[str] = mapped_column(String(2048))
    issuer: Mapped[str] = mapped_column(String(2048))
    allowed_origins: Mapped[list[str]] = mapped_column(JSON, default=list)
    redirect_uris: Mapped[list[str]] = mapped_column(JSON, default=list)
    contact: Mapped[str] = mapped_column(String(254), default="")
    status: Mapped[str] = mapped_column(String(16), default="active")  # active, suspended
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class SiteSecret(Base):
    """One version of a site's shared HMAC secret, encrypted at rest (Fernet).

    Valid while ``expires_at`` is empty or in the future: after a rotation the previous version
    gets an expiry (the grace period) and both verify until then.
    """

    __tablename__ = "hub_site_secrets"
    __table_args__ = (UniqueConstraint("site_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("hub_sites.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class SiteKey(Base):
    """A public signing key a member registered (RFC 7517 JWK), with its life cycle."""

    __tablename__ = "hub_site_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("hub_sites.id", ondelete="CASCADE"), index=True)
    kid: Mapped[str] = mapped_column(String(128), unique=True)
    alg: Mapped[str] = mapped_column(String(16))
    jwk: Mapped[dict[str, t.Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # next, active, retiring, retired
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    retired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class SiteHealth(Base):
    """The last health report of a member's agent (one row per site, replaced by each report)."""

    __tablename__ = "hub_site_health"

    site_id: Mapped[int] = mapped_column(ForeignKey("hub_sites.id", ondelete="CASCADE"),
                                         primary_key=True)
    reported_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)  # by the hub's clock
    agent_version: Mapped[str] = mapped_column(String(64))
    clock_skew_seconds: Mapped[float] = mapped_column(Float)  # agent time - hub time
    key_fingerprint: Mapped[str] = mapped_column(String(128))  # the federation key's kid
    last_exchange_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_sync_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The site policy the agent applied, the keys it pins, a refused policy, and its recent
    # webhook deliveries (hub.services.policies).
    policy_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pinned: Mapped[list[str]] = mapped_column(JSON, default=list)
    policy_error: Mapped[dict[str, t.Any] | None] = mapped_column(JSON, nullable=True)
    webhook_log: Mapped[list[dict[str, t.Any]]] = mapped_column(JSON, default=list)


class HubKey(Base):
    """The hub's own signing key pair (private part encrypted at rest)."""

    __tablename__ = "hub_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kid: Mapped[str] = mapped_column(String(128), unique=True)
    alg: Mapped[str] = mapped_column(String(16))
    private_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    jwk: Mapped[dict[str, t.Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # active, retiring, retired
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    retire_after: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Admin(Base):
    """A console administrator."""

    __tablename__ = "hub_admins"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(60), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Console sessions carry the epoch they began in; signing out bumps it, so a copied
    # session cookie stops working at once, although it is a signed cookie and not a row.
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Nonce(Base):
    """A request nonce already seen: a second use is a replay (unique across every worker)."""

    __tablename__ = "hub_nonces"

    site_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class Event(Base):
    """The federation's activity: the hub's own events and those uploaded by member sites."""

    __tablename__ = "hub_events"
    __table_args__ = (
        UniqueConstraint("site_key", "remote_id"),
        Index("ix_hub_events_site", "site_key", "id"),
        Index("ix_hub_events_event", "event", "id"),
        Index("ix_hub_events_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    source: Mapped[str] = mapped_column(String(8))  # hub or site
    site_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    remote_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # a site's event id
    event: Mapped[str] = mapped_column(String(48))
    outcome: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(120), default="")
    ip: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[dict[str, t.Any]] = mapped_column(JSON, default=dict)


class Setting(Base):
    """A console-editable setting (rotation periods, retention), overriding the config default."""

    __tablename__ = "hub_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[t.Any] = mapped_column(JSON)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_by: Mapped[str] = mapped_column(String(60), default="")


class JobRun(Base):
    """The last run of a scheduled job: a conditional update claims a run, once across workers."""

    __tablename__ = "hub_job_runs"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_run_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Logout(Base):
    """A "log out everywhere" of one identity (issuer, subject), published in every directory.

    Recorded by the identity's own site (signed API) or by an admin in the console; each member
    ends the sessions of the local account linked to (issuer, subject). A member that ends a
    linked account's sessions passes the logout on for its own user (``origin_id``: the first
    logout of the chain, whose time it keeps), so sites linked through it follow. Kept for 24 h.
    """

    __tablename__ = "hub_logouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    site_key: Mapped[str] = mapped_column(String(64))  # the origin site
    issuer: Mapped[str] = mapped_column(String(2048))
    subject: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    origin_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class SitePolicy(Base):
    """One version of a member site's policy: the settings the hub manages for it.

    Never updated: each change (a rollback too) adds a version. Webhook secrets in ``settings``
    are encrypted with the hub's vault (``secret_enc``); the rest is plain JSON.
    """

    __tablename__ = "hub_site_policies"
    __table_args__ = (UniqueConstraint("site_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("hub_sites.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    settings: Mapped[dict[str, t.Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(120))
    note: Mapped[str] = mapped_column(String(200), default="")


class WebhookRedelivery(Base):
    """An admin's request to deliver one of a site's webhook messages again (listed 24 h)."""

    __tablename__ = "hub_webhook_redeliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("hub_sites.id", ondelete="CASCADE"), index=True)
    message_id: Mapped[str] = mapped_column(String(64))
    requested_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    requested_by: Mapped[str] = mapped_column(String(120))
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
