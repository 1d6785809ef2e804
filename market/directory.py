"""The advert directory every node keeps: newest advert per provider, expiry, digests.

Pure bookkeeping, no I/O and no clock: ``now_ms`` comes in with every call. Adverts
enter already verified (the node layer opens the envelope); the directory decides
only whether an advert is news, and what a peer lacks (anti-entropy).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

from protocol.messages import Advert, pack_digest


class Offer(Enum):
    """What happened to an offered advert."""

    NEW = "new"  # first advert from this provider
    NEWER = "newer"  # replaced an older sequence number
    DUPLICATE = "duplicate"  # same sequence number already held
    OLDER = "older"  # a newer one is held; dropped
    EXPIRED = "expired"  # past its expiry; dropped

    @property
    def accepted(self) -> bool:
        return self in (Offer.NEW, Offer.NEWER)


@dataclass(frozen=True, slots=True)
class Entry:
    """A verified advert and the envelope bytes its provider signed (relayed verbatim)."""

    advert: Advert
    envelope: bytes
    received_ms: int

    @property
    def provider(self) -> str:
        return self.advert.provider

    @property
    def seq(self) -> int:
        return self.advert.seq


class Directory:
    """Newest live advert per provider."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        # packed_digest's cache: (packed, made at, valid until) or None once changed.
        self._packed: tuple[bytes, int, int] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, provider: object) -> bool:
        return provider in self._entries

    def get(self, provider: str) -> Entry | None:
        return self._entries.get(provider)

    def offer(self, advert: Advert, envelope: bytes, now_ms: int) -> Offer:
        """Keep ``advert`` if it is live and newer than what is held."""
        if advert.expires_ms <= now_ms:
            return Offer.EXPIRED
        held = self._entries.get(advert.provider)
        if held is not None:
            if advert.seq < held.seq:
                return Offer.OLDER
            if advert.seq == held.seq:
                return Offer.DUPLICATE
        self._entries[advert.provider] = Entry(advert, envelope, now_ms)
        self._packed = None
        return Offer.NEW if held is None else Offer.NEWER

    def remove(self, provider: str) -> bool:
        self._packed = None
        return self._entries.pop(provider, None) is not None

    def expire(self, now_ms: int) -> list[str]:
        """Drop expired adverts; return their providers."""
        gone = [p for p, e in self._entries.items() if e.advert.expires_ms <= now_ms]
        for p in gone:
            del self._entries[p]
        if gone:
            self._packed = None
        return gone

    def live(self, now_ms: int) -> Iterator[Entry]:
        """Adverts that have not expired at ``now_ms`` (an expired one is never used)."""
        return (e for e in self._entries.values() if e.advert.expires_ms > now_ms)

    def digest(self, now_ms: int) -> dict[str, int]:
        """provider -> seq of every live advert: what a peer compares against."""
        return {e.provider: e.seq for e in self.live(now_ms)}

    def packed_digest(self, now_ms: int) -> bytes:
        """``digest`` packed for a ``directory_request`` (``protocol.messages.pack_digest``).

        A node sends it every gossip round and it changes far less often, so it is
        cached until an advert is added or removed or the first held advert expires.
        """
        cached = self._packed
        if cached is None or not cached[1] <= now_ms < cached[2]:
            live = list(self.live(now_ms))
            until = min((e.advert.expires_ms for e in live), default=2**63)
            cached = self._packed = (pack_digest({e.provider: e.seq for e in live}), now_ms, until)
        return cached[0]

    def diff(
        self, theirs: Iterable[tuple[str, int]], now_ms: int, limit: int
    ) -> tuple[list[Entry], list[str], bool]:
        """Anti-entropy against a peer's digest.

        Returns (entries the peer lacks or holds older, at most ``limit``; providers for
        which the peer holds a newer advert than we do; whether ``limit`` cut the list).
        """
        their = dict(theirs)
        missing: list[Entry] = []
        more = False
        for e in self.live(now_ms):
            if their.get(e.provider, -1) < e.seq:
                if len(missing) >= limit:
                    more = True
                    break
                missing.append(e)
        wanted = [p for p, seq in their.items() if seq > self._seq_of(p)]
        return missing, wanted, more

    def _seq_of(self, provider: str) -> int:
        e = self._entries.get(provider)
        return -1 if e is None else e.seq
