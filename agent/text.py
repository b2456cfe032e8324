"""What text the agent and the hub accept in names, ids, addresses and filters."""

from __future__ import annotations

import ipaddress
import unicodedata


def holds_controls(text: str) -> bool:
    """Whether ``text`` holds a C0/C1 control character (NUL, CR, DEL, U+0085...) or a lone
    surrogate: never part of a name, address or id, and NUL is not storable in PostgreSQL text
    (SQLite would store it)."""
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def ip_address_text(text: str) -> str:
    """An IP address in its one written form (RFC 5952 for IPv6: lower case, zeros
    compressed; an IPv4-mapped one as its IPv4 address); ValueError if ``text`` is none."""
    address = ipaddress.ip_address(text)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:203.0.113.9 is an IPv4 client
    return str(mapped or address)


def canonical_address(text: str) -> str:
    """:func:`ip_address_text`, or ``text`` as given when it is no IP address: the activity
    log, the sessions list and the log's ``ip`` filter agree however a proxy or an admin wrote
    an address."""
    try:
        return ip_address_text(text)
    except ValueError:
        return text
