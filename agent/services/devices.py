"""A short, human label for a user agent ("Firefox 128 on Windows"), for the sessions list.

The label names the browser (or the HTTP client) and its major version, and the operating
system, from the tokens every current browser sends. It is a label for people reading their
sessions and the activity log, never an input to a security decision (a client writes its own
User-Agent), so a short ordered table does the job: a full user-agent database (uap-core's
regexes) costs a worker about 3 MB and 100 ms to compile on its first login, for labels
nobody reads more closely than these.
"""

from __future__ import annotations

import functools
import re

MAX_LENGTH = 512  # of the User-Agent read; longer ones are cut (the label is 128 at most)

# Browsers, first match wins: a browser built on another names both (Edge says "Chrome/…
# Safari/… Edg/…", Chrome says "Safari/…"), so the more specific token comes first.
_BROWSERS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("Edge", r"\bEdg(?:e|A|iOS)?/(\d+)"),
        ("Opera", r"\b(?:OPR|OPT|Opera)/(\d+)"),
        ("Samsung Internet", r"\bSamsungBrowser/(\d+)"),
        ("Yandex Browser", r"\bYaBrowser/(\d+)"),
        ("Vivaldi", r"\bVivaldi/(\d+)"),
        ("Brave", r"\bBrave/(\d+)"),
        ("Firefox", r"\b(?:Firefox|FxiOS)/(\d+)"),
        ("Headless Chrome", r"\bHeadlessChrome/(\d+)"),
        ("Chrome", r"\b(?:Chrome|CriOS|Chromium)/(\d+)"),
        ("Safari", r"\bVersion/(\d+)[^ ]* (?:Mobile/\S+ )?Safari/"),
        ("Internet Explorer", r"\b(?:MSIE |Trident/.*\brv:)(\d+)"),
    )
)
# Operating systems, first match wins (Android says "Linux"; iOS says "like Mac OS X").
_SYSTEMS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("Windows", r"\bWindows\b"),
        ("Android", r"\bAndroid\b"),
        ("iOS", r"\b(?:iPhone|iPad|iPod)\b|\biOS\b"),
        ("Chrome OS", r"\bCrOS\b"),
        ("macOS", r"\bMac OS X\b|\bMacintosh\b"),
        ("Linux", r"\bLinux\b|\bX11\b"),
    )
)
# Anything else (HTTP libraries, apps): its first product token, "curl/8.5.0" -> "curl 8".
_PRODUCT = re.compile(r"([A-Za-z][\w.+-]{0,63})/v?(\d+)")


@functools.lru_cache(maxsize=1024)
def describe(user_agent: str) -> str:
    """Label the browser and OS of ``user_agent``; ``""`` when there is none."""
    if not user_agent or not user_agent.strip():
        return ""
    ua = user_agent[:MAX_LENGTH]
    name = next(
        (f"{browser} {m.group(1)}" for browser, pattern in _BROWSERS if (m := pattern.search(ua))),
        None,
    )
    if name is None:
        product = None if ua.startswith("Mozilla/") else _PRODUCT.match(ua)
        name = f"{product.group(1)} {product.group(2)}" if product else "Unknown client"
    system = next((os_name for os_name, pattern in _SYSTEMS if pattern.search(ua)), None)
    if system is not None:
        name = f"{name} on {system}"
    return name[:128]
