"""Signed webhooks, as in the Standard Webhooks spec (standardwebhooks.com).

Each request of an endpoint with signing on carries three headers:

- ``webhook-id``: the message's idempotency key for a single-message body; for
  a batch, ``batch_`` + a hash of its messages' keys (stable across retries of
  the same batch), so receivers can deduplicate either way;
- ``webhook-timestamp``: unix seconds when the request was signed;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256(id.timestamp.body)>`` for
  each live secret, space-separated. During a rotation both the new and the
  old secret sign, so receivers can switch keys without losing a request.

The signed body is the JSON as rendered, before any ``content-encoding:
gzip``: receivers verify what they read after decompressing it.

Secrets are ``whsec_`` + base64 of 32 random bytes; the HMAC key is the
decoded bytes. They are stored encrypted (``engine.secrets``) as a JSON list,
the current secret first, each older one with the unix time it expires.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from . import secrets
from .db import connection
from .errors import ConfigError
from .queries import QUERIES

PREFIX = "whsec_"
DEFAULT_GRACE_SECONDS = 24 * 3600
"""How long an old secret keeps signing after a rotation."""


def generate_secret() -> str:
    return PREFIX + base64.b64encode(os.urandom(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ConfigError (never quoting it) when it is malformed."""
    text = secret[len(PREFIX):] if secret.startswith(PREFIX) else secret
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not 24 <= len(key) <= 64:
        raise ConfigError("the signing secret is not a Standard Webhooks secret: want whsec_ followed by "
                          "base64 of 24 to 64 random bytes (make one with `pgsink endpoint rotate-secret` "
                          "or leave it out to have pgsink generate it)")
    return key


@dataclass(frozen=True)
class SigningSecret:
    secret: str = field(repr=False)
    expires_at: float | None = None  # unix seconds; None: the current secret

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True)
class SigningKeys:
    """An endpoint's secrets, the current one first. ``repr`` never shows them."""

    secrets: tuple[SigningSecret, ...]

    @property
    def current(self) -> str:
        return self.secrets[0].secret

    def live_keys(self, now: float) -> list[bytes]:
        return [secret_key(s.secret) for s in self.secrets if s.live(now)]

    def rotated(self, new_secret: str, *, grace_seconds: float, now: float | None = None) -> SigningKeys:
        """The new secret becomes current; the old ones sign on until ``grace_seconds`` from now."""
        now = time.time() if now is None else now
        expires = now + grace_seconds
        older = [SigningSecret(s.secret, expires if s.expires_at is None else min(s.expires_at, expires))
                 for s in self.secrets if s.live(now) and s.secret != new_secret]
        older = [s for s in older if s.live(now)]
        return SigningKeys((SigningSecret(new_secret), *older))

    def encrypt(self) -> bytes:
        data = [{"secret": s.secret, "expires_at": s.expires_at} for s in self.secrets]
        return secrets.encrypt(orjson.dumps(data))

    @classmethod
    def decrypt(cls, blob: bytes) -> SigningKeys:
        data = orjson.loads(secrets.decrypt(blob))
        return cls(tuple(SigningSecret(d["secret"], d.get("expires_at")) for d in data))

    @classmethod
    def of(cls, secret: str) -> SigningKeys:
        return cls((SigningSecret(secret),))


def batch_id(keys: Sequence[str]) -> str:
    """A stable id for a batch: the same messages give the same id on every retry."""
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    return f"batch_{digest[:32]}"


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def sign_headers(keys: list[bytes], msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for one request."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(signature(k, msg_id, ts, body) for k in keys),
    }


async def rotate_secret(dsn: str, endpoint: str, *, new_secret: str | None = None,
                        grace_seconds: float = DEFAULT_GRACE_SECONDS) -> str:
    """Make a new current secret for an endpoint (turning signing on if it was off); returns it.

    The previous secrets keep signing for ``grace_seconds`` (0: stop at once),
    so receivers can be switched to the new secret without rejecting requests.
    """
    secret = new_secret or generate_secret()
    secret_key(secret)
    async with connection(dsn, autocommit=True) as conn, conn.transaction():
        await conn.execute(QUERIES["config_lock"])
        cur = await conn.execute(QUERIES["endpoint_security_get"], {"name": endpoint})
        row = await cur.fetchone()
        if row is None:
            raise ConfigError(f"There is no endpoint named {endpoint!r} (see pgsink endpoint list).")
        keys = SigningKeys.decrypt(row[0]).rotated(secret, grace_seconds=grace_seconds) if row[0] \
            else SigningKeys.of(secret)
        await conn.execute(QUERIES["endpoint_signing_set"],
                           {"name": endpoint, "signing_secrets_encrypted": keys.encrypt()})
        await conn.execute(QUERIES["config_notify"], {"what": "rotate signing secret"})
    return secret


async def current_secret(dsn: str, endpoint: str) -> str | None:
    """The endpoint's current signing secret (None when it does not sign), for setting up receivers."""
    async with connection(dsn, autocommit=True) as conn:
        cur = await conn.execute(QUERIES["endpoint_signing_get"], {"name": endpoint})
        row = await cur.fetchone()
    if row is None:
        raise ConfigError(f"There is no endpoint named {endpoint!r} (see pgsink endpoint list).")
    return SigningKeys.decrypt(row[0]).current if row[0] else None
