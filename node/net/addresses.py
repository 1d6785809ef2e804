"""Which peer addresses this node will call: loopback and private ranges are node policy.

An address is anyone's word: adverts, hellos and peer lists are signed by whoever made
them. The wire rule (protocol.messages.Address) already limits an address to scheme,
host and port; this module decides which *hosts* may be called, so that a stranger's
advert cannot point the node at its own loopback services, its LAN, or a cloud
metadata endpoint. The check is made on the IP the connection really uses (literal,
or each resolved address), so a DNS name that resolves to a refused range is refused.

Rules (docs/protocol.md, "Addresses"; docs/operators.md):

* never: unspecified, multicast, link-local (169.254/16, fe80::/10: metadata
  services), reserved addresses;
* loopback (127/8, ::1, "localhost"): only when ``allow_loopback``;
* other non-global ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, ...):
  only when ``allow_private``;
* everything else (public unicast) is allowed.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from protocol.errors import AddressRefusedError

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _host_of(address: str) -> str:
    host = urlsplit(address).hostname
    if not host:
        raise AddressRefusedError(f"{address!r} names no host")
    return host


def _as_ip(host: str) -> IP | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, whatever it looks like
    return ip


@dataclass(frozen=True)
class AddressPolicy:
    """Which classes of peer address this node calls (public unicast always)."""

    allow_loopback: bool = False
    allow_private: bool = False

    @classmethod
    def for_node(
        cls, own_address: str, loopback: bool | None = None, private: bool | None = None
    ) -> AddressPolicy:
        """The policy of a node listening at ``own_address``; None settings mean "auto".

        Auto allows the class of the node's own address: a node on loopback (the local
        cluster, tests) calls loopback peers, one on a private network calls private
        peers, a public node calls neither.
        """
        host = urlsplit(own_address).hostname or ""
        ip = _as_ip(host)
        own_loopback = host == "localhost" or (ip is not None and ip.is_loopback)
        own_private = ip is not None and not ip.is_loopback and not ip.is_global
        return cls(
            allow_loopback=own_loopback if loopback is None else loopback,
            allow_private=own_private if private is None else private,
        )

    def check_ip(self, ip: IP, address: str) -> None:
        """Raise AddressRefusedError unless this node may connect to ``ip``."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback:
            if not self.allow_loopback:
                raise AddressRefusedError(f"{address}: loopback peers are not allowed here")
            return
        if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved:
            raise AddressRefusedError(f"{address}: {ip} is never a peer address")
        if not ip.is_global and not self.allow_private:
            raise AddressRefusedError(f"{address}: private-range peers are not allowed here")

    def check(self, address: str) -> None:
        """Check what can be checked without DNS: IP literals and ``localhost``."""
        host = _host_of(address)
        if host.rstrip(".").lower() == "localhost" or host.lower().endswith(".localhost"):
            self.check_ip(ipaddress.IPv4Address("127.0.0.1"), address)
            return
        ip = _as_ip(host)
        if ip is not None:
            self.check_ip(ip, address)


class PolicyResolver(AbstractResolver):
    """DNS resolution that drops every result the policy refuses (no rebinding past it).

    aiohttp connects to what the resolver returns, so filtering here checks the address
    actually used, not a lookup made earlier that a hostile DNS server could change.
    """

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner: AbstractResolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept = []
        for r in results:
            ip = _as_ip(r["host"])
            if ip is None:
                continue
            try:
                self._policy.check_ip(ip, host)
            except AddressRefusedError:
                continue
            kept.append(r)
        if not kept:
            raise AddressRefusedError(f"{host} resolves only to addresses this node refuses")
        return kept

    async def close(self) -> None:
        await self._inner.close()
