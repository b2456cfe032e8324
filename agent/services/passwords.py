"""Password hashing (argon2id) and the password policy (NIST SP 800-63B §3.1.1.2).

Policy: a minimum and a maximum length in characters (Unicode NFKC-normalised first), no
composition rules, and a refusal of passwords that are common, repetitive, sequential or built
from the account's own name or email. Every character is significant: argon2 has no 72-byte
truncation.
"""

from __future__ import annotations

import functools
import re
import secrets
import unicodedata
from importlib import resources

from argon2 import PasswordHasher
from argon2 import exceptions as argon2_exceptions

from ..errors import WeakPassword

_TRAILING_JUNK = re.compile(r"[\W\d_]+$")
_LEADING_JUNK = re.compile(r"^[\W\d_]+")


@functools.cache
def common_passwords() -> frozenset[str]:
    """The bundled list of common passwords, lower case."""
    text = resources.files("agent").joinpath("data/common-passwords.txt").read_text("utf-8")
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def normalise(password: str) -> str:
    """NFKC, as NIST asks, so visually equal passwords hash equal."""
    return unicodedata.normalize("NFKC", password)


class Hasher:
    """argon2id with parameters from the settings; verifies with the same cost for unknown users."""

    def __init__(self, time_cost: int, memory_cost: int, parallelism: int) -> None:
        self._ph = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
        )
        # A real hash of a random string: verifying against it costs what a real check costs,
        # so an unknown username answers no faster than a wrong password.
        self._dummy = self._ph.hash(secrets.token_urlsafe(24))

    def hash(self, password: str) -> str:
        return self._ph.hash(normalise(password))

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """Check ``password``. With ``stored_hash`` None (no such account) or one that is no
        argon2 hash (an account made by SSO, which has no password), spend the time a real
        check takes and return False: the answer's timing does not tell such accounts apart."""
        try:
            return self._ph.verify(stored_hash or self._dummy, normalise(password)) and (
                stored_hash is not None
            )
        except argon2_exceptions.VerificationError:  # a wrong password
            return False
        except argon2_exceptions.InvalidHashError:
            self.verify(None, password)
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        try:
            return self._ph.check_needs_rehash(stored_hash)
        except argon2_exceptions.InvalidHashError:
            return True


# Runs a person types without thinking: digits (wrapping 9 -> 0), the alphabet, keyboard rows.
_RUNS = ("0123456789" * 4, "abcdefghijklmnopqrstuvwxyz", "qwertyuiopasdfghjklzxcvbnm")


def _is_trivial(text: str) -> bool:
    """Repeated or sequential: 'aaaaaaaa', 'abababab', '123456789012', '0987654321', 'zyxwvuts'."""
    if len(set(text)) <= 2:
        return True
    for unit in range(3, 5):
        if len(text) % unit == 0 and text == text[:unit] * (len(text) // unit):
            return True
    return any(text in run or text in run[::-1] for run in _RUNS)


def policy_problems(
    password: str,
    *,
    min_length: int,
    max_length: int,
    context: tuple[str, ...] = (),
) -> list[str]:
    """Every reason ``password`` is refused (empty: acceptable)."""
    problems: list[str] = []
    text = normalise(password)
    if len(text) < min_length:
        problems.append(f"Use at least {min_length} characters.")
    elif len(text) > max_length:
        problems.append(f"Use at most {max_length} characters.")
    else:
        folded = text.casefold()
        stripped = _LEADING_JUNK.sub("", _TRAILING_JUNK.sub("", folded))
        common = common_passwords()
        if folded in common or (len(stripped) >= 4 and stripped in common):
            problems.append("This password is too common; choose a less guessable one.")
        elif _is_trivial(folded):
            problems.append("Avoid repeated or sequential characters such as 'aaaa' or '1234'.")
        else:
            for word in context:
                word = word.casefold()
                if len(word) >= 4 and word in folded:
                    problems.append("The password must not contain your username or email.")
                    break
    return problems


def check_policy(
    password: str,
    *,
    min_length: int,
    max_length: int,
    context: tuple[str, ...] = (),
) -> None:
    """Raise :class:`WeakPassword` naming every reason ``password`` is refused."""
    problems = policy_problems(
        password, min_length=min_length, max_length=max_length, context=context
    )
    if problems:
        raise WeakPassword(fields={"password": problems})
