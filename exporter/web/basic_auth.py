"""HTTP basic auth against the web config's `basic_auth_users` (bcrypt hashes).

As in exporter-toolkit, an unknown user costs the same bcrypt check as a wrong password, and
a check that succeeded is remembered so that Prometheus, which sends the same credentials on
every scrape, does not pay for bcrypt each time.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import secrets
from collections.abc import Mapping

import bcrypt

__all__ = ["BasicAuthenticator"]

# A bcrypt hash of a random password nobody knows, checked for unknown users so that the
# answer takes as long as for a known user with a wrong password (no user enumeration).
_DECOY_HASH = b"$2b$10$xq2Ydw9UeInGH2gHdGIk4em8KOWIdJ.A3N8alHxW1C5UkOl.R8iZq"
# bcrypt reads the first 72 bytes of a password (htpasswd hashes longer ones that way).
_BCRYPT_MAX_BYTES = 72


class BasicAuthenticator:
    """Checks credentials against `basic_auth_users`, remembering the pairs that matched.

    bcrypt is slow on purpose (~70 ms at cost 10), and Prometheus sends the same credentials
    on every scrape. The cache key is an HMAC of (user, hash, password) under a key made at
    start, so the cache holds no password, nor anything that can be tested offline for one.
    Only one bcrypt check runs at a time, in a thread: a flood of wrong passwords costs one
    core, never the event loop.
    """

    def __init__(self, *, cache_size: int = 128) -> None:
        self._secret = secrets.token_bytes(32)
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = asyncio.Lock()

    def _key(self, user: bytes, hashed: bytes, password: bytes) -> bytes:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in (user, hashed, password):
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()

    async def verify(self, users: Mapping[str, str], user: str, password: str) -> bool:
        known = users.get(user)
        hashed = _DECOY_HASH if known is None else known.encode()
        secret = password.encode("utf-8", "surrogateescape")
        key = self._key(user.encode("utf-8", "surrogateescape"), hashed, secret)
        if known is not None and key in self._cache:
            self._cache.move_to_end(key)
            return True
        async with self._lock:
            matches = await asyncio.to_thread(self.check_password, secret, hashed)
        if known is None or not matches:
            return False
        self._cache[key] = None
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True

    def check_password(self, password: bytes, hashed: bytes) -> bool:
        """One bcrypt comparison; slow, so `verify` runs it in a worker thread."""
        try:
            return bcrypt.checkpw(password[:_BCRYPT_MAX_BYTES], hashed)
        except ValueError:
            return False
