"""Which providers a tenant asks: Sybil-resistant sampling over the ranked candidates.

Keys are free, so one operator can put 50 identities in the directory and, if a tenant
simply asked the K cheapest, fill every one of its K questions. Two rules bound that:

* **one vote per host.** Identities whose adverts share a host (the address without
  the port) count as one: only the best-ranked of them is asked. A Sybil operator
  needs as many public addresses as identities. Loopback hosts keep their port (a
  local test cluster is one operator's machine; no remote tenant can reach a loopback
  advert anyway).
* **proven providers first, room for newcomers.** Of the K questions, ``newcomer_slots``
  (a quarter, at least one) go to providers this tenant has no completed lease with,
  drawn at random (a hash of ``key``, e.g. the order id) rather than by price, so the
  cheapest Sybils cannot take them all; the rest go to providers with a record, best
  expected cost (which counts their reputation) first. Slots one group cannot fill go
  to the other, so a market of newcomers still gets K questions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from market.matching import Candidate
from market.reputation import NEUTRAL, Reputation

_LOOPBACK = ("127.", "localhost", "::1")


def host_key(address: str) -> str:
    """What counts as one host: the address's host name, lowercased (port too on loopback)."""
    parts = urlsplit(address)
    host = (parts.hostname or address).lower()
    if host.startswith(_LOOPBACK):
        return f"{host}:{parts.port}"
    return host


def one_per_host(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The best-ranked candidate of each host (``candidates`` are best first)."""
    seen: set[str] = set()
    out = []
    for c in candidates:
        key = host_key(c.address)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def choose_asked(
    candidates: Sequence[Candidate],
    k: int,
    *,
    reputation: Mapping[str, Reputation],
    key: str,
    newcomer_share: tuple[int, int] = (1, 4),
) -> list[Candidate]:
    """Up to ``k`` candidates to send an order to, best-ranked first (see module doc)."""
    pool = one_per_host(candidates)
    if len(pool) <= k:
        return pool
    proven = [c for c in pool if reputation.get(c.provider, NEUTRAL).completed > 0]
    newcomers = [c for c in pool if reputation.get(c.provider, NEUTRAL).completed == 0]
    num, den = newcomer_share
    room = max(1, k * num // den)
    n_new = min(len(newcomers), max(room, k - len(proven)))
    drawn = sorted(
        newcomers, key=lambda c: hashlib.sha256(f"{key}:{c.provider}".encode()).digest()
    )[:n_new]
    chosen = set(id(c) for c in proven[: k - n_new]) | {id(c) for c in drawn}
    return [c for c in pool if id(c) in chosen]
