"""Stored keys: the access-token keys, the SSO (federation) key and the hub secret.

Every key lives in ``hk_keys``, encrypted with a key derived from the site secret, so every
worker and instance of a site signs and verifies with the same keys (DESIGN §6–§7). The key
files of an instance only seed the table on first start.

Rotation is a matter of timestamps. A new key is stored with ``active_from`` in the future, is
published at once (JWKS, hub), and signs from ``active_from`` on; its predecessor gets
``retire_at``, the moment the last token it may have signed expires, and verifies until then.
Every worker reads the table every :data:`RELOAD` seconds (and on an unknown ``kid``), and the
publication delay is never shorter than that, so no worker meets a token it cannot check.

A rotation claims the current key with a conditional update of ``rotated_at``: however many
workers or instances run it at once, one key is made.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import threading
import time
import typing as t
from dataclasses import dataclass
from dataclasses import field

from cryptography.fernet import Fernet
from cryptography.fernet import InvalidToken
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from ..db import rowcount
from ..errors import ConfigError
from ..models import Session
from ..models import StoredKey
from .keys import KeyRing
from .keys import SigningKey
from .keys import b64url
from .keys import derive_key
from .keys import generate_private_key_pem

if t.TYPE_CHECKING:
    from sqlalchemy.orm import Session as DBSession
    from sqlalchemy.orm import sessionmaker

    from ..config import Settings

ACCESS = "access"
FEDERATION = "federation"
HUB_SECRET = "hub-secret"  # noqa: S105 - the purpose name of the hub secret's rows, not a secret
RELOAD = 2.0  # seconds a worker trusts its copy of the key table
MISS_RELOAD = 1.0  # an unknown kid rereads the table at most this often
CLAIM_LEASE = dt.timedelta(minutes=5)  # a rotation that died mid-way may be retried after this
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Entry:
    """One row of ``hk_keys``, decrypted and parsed once."""

    id: int
    purpose: str
    kid: str
    created_at: dt.datetime
    active_from: dt.datetime | None
    retire_at: dt.datetime | None
    hub_status: str
    key: SigningKey | None  # access and SSO keys
    secret: bytes | None = field(repr=False)  # the hub secret (raw bytes); never in a repr

    def verifies(self, now: dt.datetime) -> bool:
        return self.retire_at is None or now < self.retire_at


def hub_secret_kid(secret: bytes) -> str:
    """Names a hub secret without revealing it."""
    return "hks-" + b64url(hashlib.sha256(b"headlesskey|hub-secret-id|" + secret).digest()[:12])


def _parse(row: StoredKey, plain: bytes) -> Entry:
    key: SigningKey | None = None
    secret: bytes | None = None
    if row.purpose == HUB_SECRET:
        secret = plain
    elif row.alg == "HS256":
        key = SigningKey(kid=row.kid, alg="HS256", signing_key=plain, verify_key=plain)
    else:
        key = SigningKey.from_pem(row.alg, plain)
    return Entry(id=row.id, purpose=row.purpose, kid=row.kid, created_at=row.created_at,
                 active_from=row.active_from, retire_at=row.retire_at, hub_status=row.hub_status,
                 key=key, secret=secret)


class KeyStore:
    """This process's copy of ``hk_keys``, reread every :data:`RELOAD` seconds."""

    def __init__(self, session_factory: sessionmaker[DBSession], settings: Settings,
                 clock: t.Callable[[], dt.datetime]) -> None:
        self._session_factory = session_factory
        self._settings = settings
        self._clock = clock
        self._fernet = Fernet(
            base64.urlsafe_b64encode(derive_key(settings.secret_key, "key-store")))
        self._lock = threading.Lock()
        self._entries: tuple[Entry, ...] = ()
        self._loaded = -1e9
        self._missed = -1e9
        self._parsed: dict[int, Entry] = {}  # row id -> entry: keys are parsed once per process
        self._seeded = False
        self._current: t.Callable[[], Settings] | None = None
        self.ring = StoredKeyRing(self)

    def follow(self, current: t.Callable[[], Settings]) -> None:
        """Read the settings in force from ``current`` (the site's own overlaid by its hub
        policy, agent.policy) instead of the configuration the store was made with."""
        self._current = current

    # -- reading -------------------------------------------------------------------------------

    def encrypt(self, plain: bytes) -> bytes:
        return self._fernet.encrypt(plain)

    def reload(self) -> None:
        """Reread the key table (keys parsed once per process); a key that does not decrypt
        under this site's secret is a :class:`ConfigError` (start-up stops with one line)."""
        now = self._clock()
        with self._session_factory() as db:
            db.connection(execution_options={"hk_readonly": True})
            rows = db.scalars(
                select(StoredKey).where(
                    (StoredKey.retire_at.is_(None)) | (StoredKey.retire_at > now)
                ).order_by(StoredKey.id)
            ).all()
            entries = []
            for row in rows:
                cached = self._parsed.get(row.id)
                if cached is None or (cached.active_from, cached.retire_at, cached.hub_status) != (
                        row.active_from, row.retire_at, row.hub_status):
                    try:
                        plain = self._fernet.decrypt(row.material)
                    except InvalidToken:
                        raise ConfigError(
                            "HEADLESSKEY_SECRET_KEY: the keys stored in the database do not "
                            "decrypt with this secret; the database was set up under another "
                            "one (restored without its secret.key?): use the secret it was set "
                            "up with"
                        ) from None
                    cached = self._parsed[row.id] = _parse(row, plain)
                entries.append(cached)
        self._entries = tuple(entries)
        self._loaded = time.monotonic()

    def entries(self, purpose: str) -> list[Entry]:
        if not self._seeded:
            self.seed()
        if time.monotonic() - self._loaded > RELOAD:
            with self._lock:
                if time.monotonic() - self._loaded > RELOAD:
                    self.reload()
        return [e for e in self._entries if e.purpose == purpose]

    def signing(self, purpose: str) -> Entry | None:
        """The entry that signs now: the latest whose ``active_from`` has come."""
        now = self._clock()
        candidates = [e for e in self.entries(purpose) if e.active_from is not None]
        active = [e for e in candidates if e.active_from <= now]  # type: ignore[operator]
        if active:
            return max(active, key=lambda e: (e.active_from, e.id))
        # A clock running behind the one that stored the first key: use the earliest.
        return min(candidates, key=lambda e: (e.active_from, e.id), default=None)

    def find(self, purpose: str, kid: str) -> Entry | None:
        """The verifying entry named ``kid``; an unknown kid rereads the table (rate-limited)."""
        now = self._clock()
        for entry in self.entries(purpose):
            if entry.kid == kid and entry.verifies(now):
                return entry
        if time.monotonic() - self._missed > MISS_RELOAD:
            with self._lock:
                self._missed = time.monotonic()
                self.reload()
            for entry in self.entries(purpose):
                if entry.kid == kid and entry.verifies(now):
                    return entry
        return None

    def published(self, purpose: str) -> list[Entry]:
        """Entries to publish: every one that verifies, the next key included."""
        now = self._clock()
        return [e for e in self.entries(purpose)
                if e.verifies(now) and (purpose != FEDERATION or e.active_from is not None)]

    # -- the hub secret --------------------------------------------------------------------------

    def hub_secret(self) -> bytes | None:
        """The newest hub secret: requests to the hub are signed with it."""
        entries = self.entries(HUB_SECRET)
        return max(entries, key=lambda e: e.id).secret if entries else None

    def sso_secret(self) -> bytes | None:
        """The hub secret SSO signatures use: the newest one the peers have had time to learn."""
        entry = self.signing(HUB_SECRET)
        return entry.secret if entry else None

    # -- seeding -------------------------------------------------------------------------------

    def seed(self) -> None:
        """Store the instance's configured keys on first start, and switch algorithm if asked.

        Safe when several processes start at once: the rows are unique by (purpose, kid).
        """
        with self._lock:
            if self._seeded:
                return
            self._seed()
            self._seeded = True  # (not when the table is missing: the next call tries again)
        current = self.newest(ACCESS)
        wanted = self.settings.algorithm
        if current is not None and current.key is not None and current.key.alg != wanted:
            rotate_local(self, wanted)

    def _seed(self) -> None:
        s = self._settings
        now = self._clock()
        with self._session_factory() as db:
            known = {(p, k) for p, k in db.execute(select(StoredKey.purpose, StoredKey.kid))}
        purposes = {p for p, _ in known}
        if ACCESS not in purposes:
            if s.algorithm == "HS256":
                key = SigningKey.hmac(s.secret_key)
                material = key.signing_key
            else:
                assert s.private_key_pem is not None
                key = SigningKey.from_pem(s.algorithm, s.private_key_pem)
                material = s.private_key_pem
            self._insert(ACCESS, key.kid, key.alg, material, now, active_from=now)
        if s.federation_key_pem is not None and FEDERATION not in purposes:
            fed = _federation_key_from_pem(s.federation_key_pem)
            # `join` and `serve` publish the configured key to the hub as active.
            self._insert(FEDERATION, fed.kid, fed.alg, s.federation_key_pem, now,
                         active_from=now, hub_status="active")
        if s.hub_secret is not None:
            kid = hub_secret_kid(s.hub_secret)
            if (HUB_SECRET, kid) not in known:
                # A first secret, or a new one from `join`: the hub knows it already.
                self._insert(HUB_SECRET, kid, "", s.hub_secret, now, active_from=now)
        self.reload()

    def _insert(self, purpose: str, kid: str, alg: str, material: bytes, now: dt.datetime, *,
                active_from: dt.datetime | None, hub_status: str = "") -> None:
        with self._session_factory() as db:
            db.add(StoredKey(purpose=purpose, kid=kid, alg=alg, material=self.encrypt(material),
                             created_at=now, active_from=active_from, hub_status=hub_status))
            try:
                db.commit()
            except IntegrityError:
                db.rollback()  # another process stored it first

    def newest(self, purpose: str) -> Entry | None:
        """The key that signs last: the pending successor if there is one."""
        entries = [e for e in self.entries(purpose) if e.active_from is not None]
        return max(entries, key=lambda e: (e.active_from, e.id), default=None)

    @property
    def settings(self) -> Settings:
        return self._current() if self._current is not None else self._settings

    def session(self) -> DBSession:
        return self._session_factory()

    def now(self) -> dt.datetime:
        return self._clock()


class StoredKeyRing(KeyRing):
    """The access-token key ring, read from :class:`KeyStore`."""

    def __init__(self, store: KeyStore) -> None:  # noqa: D107 - no static keys
        self._store = store

    @property
    def active(self) -> SigningKey:
        entry = self._store.signing(ACCESS)
        assert entry is not None and entry.key is not None, "no access-token key stored"
        return entry.key

    def get(self, kid: str) -> SigningKey | None:
        entry = self._store.find(ACCESS, kid)
        return entry.key if entry else None

    def jwks(self) -> dict[str, t.Any]:
        return {"keys": [e.key.public_jwk for e in self._store.published(ACCESS)
                         if e.key is not None and e.key.public_jwk]}


def _federation_key_from_pem(pem: bytes) -> SigningKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = serialization.load_pem_private_key(pem, password=None)
    return SigningKey.from_pem("RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256", pem)


def new_material(algorithm: str) -> tuple[SigningKey, bytes]:
    """A fresh key for ``algorithm`` and the bytes stored for it."""
    if algorithm == "HS256":
        import secrets

        raw = secrets.token_bytes(32)
        kid = b64url(hashlib.sha256(b"headlesskey|hs256-kid|" + raw).digest()[:12])
        return SigningKey(kid=kid, alg="HS256", signing_key=raw, verify_key=raw), raw
    pem = generate_private_key_pem(algorithm)
    return SigningKey.from_pem(algorithm, pem), pem


def claim(db: DBSession, entry: Entry, now: dt.datetime) -> bool:
    """Take the right to make ``entry``'s successor; False when another process has it."""
    return rowcount(db.execute(
        update(StoredKey)
        .where(StoredKey.id == entry.id)
        .where((StoredKey.rotated_at.is_(None)) | (StoredKey.rotated_at < now - CLAIM_LEASE))
        .values(rotated_at=now)
    )) == 1


def access_publish_delay(settings: Settings, algorithm: str) -> dt.timedelta:
    """How long a new access-token key is known before it signs.

    Every worker rereads the keys within :data:`RELOAD`; a public key must also have reached
    the JWKS caches of whoever verifies the tokens elsewhere (``JWKS_MAX_AGE``).
    """
    seconds = 2 * RELOAD if algorithm == "HS256" else max(settings.jwks_max_age, 2 * RELOAD)
    return dt.timedelta(seconds=seconds)


def access_retire_after(settings: Settings) -> dt.timedelta:
    """How long a superseded access-token key still verifies: its last token's lifetime."""
    return dt.timedelta(seconds=settings.access_token_ttl + settings.leeway + 2 * RELOAD)


def _access_retire_at(db: DBSession, settings: Settings, starts: dt.datetime) -> dt.datetime:
    """When a key superseded at ``starts`` stops verifying: after the tokens it may still sign
    under the lifetime in force, and after every live session's token, which may have been
    signed under a longer lifetime before ``ACCESS_TOKEN_TTL`` was lowered."""
    retire = starts + access_retire_after(settings)
    latest = db.scalar(select(func.max(Session.access_exp)).where(Session.revoked_at.is_(None)))
    if latest is not None:
        margin = dt.timedelta(seconds=settings.leeway + 2 * RELOAD)
        retire = max(retire, dt.datetime.fromtimestamp(latest, dt.UTC) + margin)
    return retire


def rotate_local(store: KeyStore, algorithm: str | None = None, *,
                 succeeding: Entry | None = None) -> SigningKey | None:
    """Make the next access-token key (of ``algorithm``, default the current one's).

    The key is published at once and signs after :func:`access_publish_delay`; the current key
    verifies until the last token it may sign has expired. Returns the new key, or None when
    another process is rotating at the same moment (its key is the one that will sign).
    ``succeeding`` names the key found due, so a run that read the table before another
    process rotated does not rotate the fresh key again.
    """
    s = store.settings
    now = store.now()
    store.reload()
    current = succeeding or store.newest(ACCESS)
    assert current is not None and current.key is not None, "no access-token key stored"
    algorithm = algorithm or current.key.alg
    key, material = new_material(algorithm)
    starts = now + access_publish_delay(s, algorithm)
    with store.session() as db:
        if not claim(db, current, now):
            db.rollback()
            return None
        retire = _access_retire_at(db, s, starts)
        db.execute(update(StoredKey)
                   .where(StoredKey.purpose == ACCESS, StoredKey.retire_at.is_(None))
                   .values(retire_at=retire))
        db.add(StoredKey(purpose=ACCESS, kid=key.kid, alg=key.alg, material=store.encrypt(material),
                         created_at=now, active_from=starts, hub_status=""))
        db.commit()
    store.reload()
    return key


def rotation_due(entry: Entry | None, period: int, lead: dt.timedelta,
                 now: dt.datetime) -> bool:
    """Whether ``entry`` (the newest key) should get a successor now.

    The successor is made ``lead`` early, so it starts signing when ``entry`` is ``period`` old.
    """
    if entry is None or period <= 0 or entry.active_from is None or entry.active_from > now:
        return False
    return now - entry.active_from >= dt.timedelta(seconds=period) - lead


def rotate_local_if_due(store: KeyStore) -> SigningKey | None:
    """The scheduled rotation of the access-token key (``KEY_ROTATION``)."""
    s = store.settings
    current = store.newest(ACCESS)
    if current is None or current.key is None:
        return None
    if not rotation_due(current, s.key_rotation, access_publish_delay(s, current.key.alg),
                        store.now()):
        return None
    return rotate_local(store, succeeding=current)


def prune(db: DBSession, now: dt.datetime) -> int:
    """Delete keys whose last token has expired (the hub secret's record is kept, blanked)."""
    from sqlalchemy import delete

    gone = rowcount(db.execute(
        delete(StoredKey).where(StoredKey.purpose != HUB_SECRET, StoredKey.retire_at < now,
                                StoredKey.hub_status.in_(("", "retired")))))
    # The record of an expired hub secret stays, so a stale secret file never brings it back.
    rowcount(db.execute(update(StoredKey).where(
        StoredKey.purpose == HUB_SECRET, StoredKey.retire_at < now, StoredKey.material != b"")
        .values(material=b"")))
    return gone
