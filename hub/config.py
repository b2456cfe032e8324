"""Settings of the hub, each with its default. Load order (``create_app``):

1. these defaults;
2. ``hub.toml`` in the instance folder (keys without the prefix, lower case);
3. environment variables ``HEADLESSKEY_HUB_*`` (values JSON-decoded where they parse);
4. ``test_config`` last.
"""

from __future__ import annotations

import typing as t

PREFIX = "HEADLESSKEY_HUB_"

DEFAULTS: dict[str, tuple[t.Any, str]] = {
    "URL": ("http://127.0.0.1:9000", "Public base URL of the hub; its issuer."),
    "DATABASE_URL": (None, "SQLAlchemy URL; default SQLite in the instance folder."),
    "MASTER_KEY": (None, "Fernet key encrypting site secrets at rest; default master.key file."),
    "SECRET_GRACE": (86400, "Seconds an old site secret stays valid after a rotation."),
    "REDIS_URL": (None, "Redis for request nonces (SET NX EX); unset: the database."),
    "NONCE_TTL": (900, "Seconds a request nonce is remembered (more than twice the 300 s skew)."),
    "JWKS_MAX_AGE": (300, "Cache-Control max-age of the JWKS and the directory, seconds."),
    "KEY_ROTATION_DAYS": (90, "Age at which a member's key is flagged for rotation."),
    "HUB_KEY_ROTATION_DAYS": (90, "Age at which the hub's own signing key is rotated."),
    "EVENT_RETENTION_DAYS": (180, "Federation events older than this are pruned."),
    "SESSION_IDLE_TIMEOUT": (1800, "Console sessions end after this many idle seconds."),
    "SECURE_COOKIES": (True, "Console cookie is __Host-, Secure (false only for plain-http dev)."),
    "REAUTH_SECONDS": (600, "Console: rotating or showing a secret, or removing a site, needs a "
                            "password entered within this many seconds."),
    "ADMIN_MAX_FAILURES": (5, "Failed console logins before a lock."),
    "ADMIN_LOCK_SECONDS": (900, "Console lock duration."),
    "ADMIN_IP_MAX_FAILURES": (20, "Failed console logins from one client address within "
                                  "ADMIN_LOCK_SECONDS before its logins are refused (0: none)."),
    "MAX_BODY": (1048576, "Largest request body accepted, bytes."),
    "TRUSTED_PROXIES": (0, "Proxies in front of the hub whose X-Forwarded-For/-Proto are trusted."),
    "AUTO_MIGRATE": (False,
                     "Upgrade the schema in create_app (tests; serve and init do it anyway)."),
}

DAY = 86400
RANGES: dict[str, tuple[int, int]] = {
    "SECRET_GRACE": (60, 30 * DAY),
    "NONCE_TTL": (0, DAY),  # at least twice the signature skew, whatever is set
    "JWKS_MAX_AGE": (0, DAY),
    "KEY_ROTATION_DAYS": (1, 3650),
    "HUB_KEY_ROTATION_DAYS": (1, 3650),
    "EVENT_RETENTION_DAYS": (1, 3650),
    "SESSION_IDLE_TIMEOUT": (60, 7 * DAY),
    "REAUTH_SECONDS": (1, DAY),
    "ADMIN_MAX_FAILURES": (1, 1000),
    "ADMIN_LOCK_SECONDS": (1, DAY),
    "ADMIN_IP_MAX_FAILURES": (0, 100000),
    "MAX_BODY": (1024, 10 * 1024 * 1024),
    "TRUSTED_PROXIES": (0, 10),
}
"""The whole-number settings and the range each must lie in (the console's for those it edits)."""
