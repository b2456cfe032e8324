"""A short, human label for a user agent ("Firefox 128 on Windows"), for the sessions list."""

from __future__ import annotations

import functools

from ua_parser import parse


@functools.lru_cache(maxsize=1024)
def describe(user_agent: str) -> str:
    """Label the browser and OS of ``user_agent``; ``""`` when there is none."""
    if not user_agent:
        return ""
    result = parse(user_agent[:512])
    browser = result.user_agent
    os_ = result.os
    name = browser.family if browser else "Unknown client"
    if browser and browser.major:
        name = f"{name} {browser.major}"
    if os_ and os_.family and os_.family != "Other":
        name = f"{name} on {os_.family}"
    return name[:128]
