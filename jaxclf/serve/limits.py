"""Per-client rate limiting: token buckets keyed by client, and who the client is behind proxies.

    key = client_key(client_address(peer, request.headers.get("X-Forwarded-For"), proxy_networks(trusted)))
    wait = limiter.acquire(key)

The client is the socket peer, unless that peer is a configured proxy: then X-Forwarded-For is read
from the right (the end the proxies append to), skipping further trusted proxies, and the first
address that is not one is the client. Entries to the left of it were written by that client and
are never believed. An IPv6 client is keyed by its /64: one host is usually given a whole /64, so
per-address buckets would let it rotate addresses past the limit and evict everyone else's buckets.
(waitress's own trusted_proxy takes a single address; werkzeug's ProxyFix trusts the header without
looking at the peer: neither does this.)
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from typing import Iterable

from jaxclf.config import ConfigError

MAX_CLIENTS = 10_000  # buckets remembered; past that the longest-idle client is forgotten (a fresh, full bucket)
IPV6_CLIENT_PREFIX = 64  # an IPv6 client is its /64 network

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def proxy_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or CIDR networks ("10.0.0.0/8", "::1") as networks; ConfigError naming a bad entry."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"trusted_proxies: {entry!r} is not an IP address or network (e.g. 10.0.0.5, "
                              f"10.0.0.0/8, fd00::/8)") from None
    return tuple(networks)


def _parse(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:192.0.2.1 is the IPv4 client 192.0.2.1
    return mapped or address


def _trusted(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The client's address: the peer, or what trusted proxies in front of it recorded (see the module doc)."""
    current = _parse(peer or "")
    if current is None:
        return peer or "unknown"
    if not forwarded_for or not _trusted(current, trusted):
        return str(current)
    for hop in reversed(forwarded_for.split(",")[-32:]):  # a real chain is a few hops long
        address = _parse(hop)
        if address is None:  # garbage a trusted proxy would not write: stop at the last hop known good
            break
        current = address
        if not _trusted(address, trusted):
            break
    return str(current)


def client_key(address: str) -> str:
    """The rate-limit bucket of an address: itself for IPv4, its /64 network for IPv6."""
    parsed = _parse(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.ip_network((parsed, IPV6_CLIENT_PREFIX), strict=False))
    return str(parsed) if parsed is not None else address[:64]


class TokenBucketLimiter:
    """Per-client token buckets: `rate` requests/s sustained, bursts of up to `burst` (default: one second's worth)."""

    def __init__(self, rate: float, burst: int | None = None, max_clients: int = MAX_CLIENTS):
        if not rate > 0:
            raise ConfigError(f"rate_limit must be > 0 requests/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1, math.ceil(rate)))
        if self.burst < 1:
            raise ConfigError(f"rate_burst must be >= 1, got {burst}")
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, t)
        self._lock = threading.Lock()

    def acquire(self, client: str) -> float:
        """0 if the request may go ahead, else the seconds until it would."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[client] = (tokens, now)  # most recently seen last
            if len(self._buckets) > self.max_clients:  # forget the longest-idle client
                self._buckets.popitem(last=False)
            return wait
