"""Safer requests to endpoints: private-address block, CA bundles, Retry-After, rate limits.

- **Private-address block** (opt-in per endpoint, for deployments where users
  register URLs): a host that is, or resolves to, a private, loopback,
  link-local, multicast, reserved or unspecified address is refused before any
  connection is made. Names are checked by the resolver of the session that
  connects (``PublicOnlyResolver``), so the address checked is the address
  used: a DNS answer cannot change between the check and the connect.
- **CA bundle**: an endpoint may trust the CAs of a PEM file instead of the
  system's; verification stays on either way.
- **Retry-After** on 429 and 503 (seconds or an HTTP date) sets the minimum
  wait before the next attempt, capped at ``RETRY_AFTER_CAP``.
- **Rate limit**: requests per second for an endpoint across every worker,
  through a token bucket row in Postgres (``pgsink.take_rate_token``).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import ssl
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import psycopg
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from .queries import QUERIES

RETRY_AFTER_CAP = 3600.0
"""The longest Retry-After honoured, in seconds; a longer one waits this long."""

RETRY_AFTER_STATUSES = frozenset({429, 503})


class BlockedAddress(OSError):
    """The endpoint's host is a private address and the endpoint blocks those."""


def blocked_reason(address: str) -> str | None:
    """Why an IP address may not be contacted with the block on; None when it is public."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):  # an IPv4 address inside an IPv6 one is judged as itself
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None:
            reason = blocked_reason(str(inner))
            return f"{ip} carries {inner}: {reason}" if reason else None
    for attr, what in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                       ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                       ("is_private", "private"), ("is_reserved", "reserved"), ("is_site_local", "site-local")):
        if getattr(ip, attr, False):  # is_site_local: IPv6 only
            return f"{ip} is a {what} address"
    if not ip.is_global:  # shared (100.64/10, cloud metadata such as 100.100.100.200), site-local, ...
        return f"{ip} is not a public address"
    return None


def _refusal(host: str, reason: str) -> BlockedAddress:
    return BlockedAddress(errno.EACCES, f"refused to connect to {host}: {reason} and the endpoint has "
                                        "block_private_addresses on")


def check_url_host(url: str) -> None:
    """Refuse an IP-literal host at once (a resolver is never asked about those)."""
    host = urlsplit(url).hostname or ""
    reason = blocked_reason(host)
    if reason is not None:
        raise _refusal(host, reason)


class PublicOnlyResolver(AbstractResolver):
    """Resolves like the default resolver, then refuses hosts with any non-public address."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for r in results:
            reason = blocked_reason(r["host"])
            if reason is not None:
                raise _refusal(host, reason)
        return results

    async def close(self) -> None:
        await self._inner.close()


@functools.lru_cache(maxsize=64)
def ssl_context(ca_bundle: str) -> ssl.SSLContext:
    """A verifying TLS context trusting the CAs of ``ca_bundle`` (cached per path)."""
    return ssl.create_default_context(cafile=ca_bundle)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


async def take_rate_token(conn: psycopg.AsyncConnection, endpoint_id: UUID, rate: float) -> float:
    """Take a token of the endpoint's shared bucket; returns the seconds to wait before sending."""
    cur = await conn.execute(QUERIES["take_rate_token"], {"endpoint_id": endpoint_id, "rate": rate})
    row: Any = await cur.fetchone()
    return float(row[0]) if row else 0.0
