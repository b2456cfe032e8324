"""What text the agent and the hub accept in names, ids, addresses and filters."""

from __future__ import annotations

import unicodedata


def holds_controls(text: str) -> bool:
    """Whether ``text`` holds a C0/C1 control character (NUL, CR, DEL, U+0085...) or a lone
    surrogate: never part of a name, address or id, and NUL is not storable in PostgreSQL text
    (SQLite would store it)."""
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)
