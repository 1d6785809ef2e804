"""The advert directory every node keeps: newest advert per provider, expiry, digests.

Pure bookkeeping, no I/O and no clock: ``now_ms`` comes in with every call. Adverts
enter already verified (the node layer opens the envelope); the directory decides
only whether an advert is news, and what a peer lacks (anti-entropy).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

from protocol.messages import DIGEST_RECORD, Advert, pack_digest

#: No advert expires at or after this (ms): the bound of an empty directory.
NEVER_MS = 2**63


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


@dataclass(frozen=True, slots=True)
class _Digest:
    """The live digest as of ``made_ms``, valid until ``until_ms`` (the first expiry)."""

    packed: bytes
    made_ms: int
    until_ms: int
    live: list[Entry]  # in directory order, as ``live()`` yields them
    position: dict[bytes, int]  # packed record -> its entry's index in ``live``


@functools.lru_cache(maxsize=64)
def _splitter(records: int) -> struct.Struct:
    """Cuts a packed digest of ``records`` records into them in one C call (``diff_packed``
    does it for every pull it answers; a set comprehension of slices took twice as long).
    Digests of a few sizes recur (the directory's size, give or take a few adverts)."""
    return struct.Struct(f"{DIGEST_RECORD}s" * records)


def _record(provider: str, seq: int) -> bytes:
    """One ``pack_digest`` record: the provider's 32 ASCII bytes, seq as 8 bytes."""
    return provider.encode("ascii") + seq.to_bytes(8, "big")


class Directory:
    """Newest live advert per provider."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        # provider -> its digest record (pack_digest of one), in the order of _entries.
        self._records: dict[str, bytes] = {}
        # The digest's cache, or None once an advert was added or removed.
        self._packed: _Digest | None = None
        # At most the earliest expires_ms of any held advert (a lower bound: replacing
        # or removing an advert leaves it low, which only costs one needless scan).
        # Every node runs expire() every second: without the bound each run scans the
        # whole directory, O(providers) per node per second.
        self._next_expiry = NEVER_MS
        #: Counts every change of what is held (added, replaced, removed, expired), so a
        #: reader can tell that nothing changed since it last looked.
        self.version = 0

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
            held_seq = held.advert.seq
            if advert.seq < held_seq:
                return Offer.OLDER
            if advert.seq == held_seq:
                return Offer.DUPLICATE
        self._entries[advert.provider] = Entry(advert, envelope, now_ms)
        self._records[advert.provider] = _record(advert.provider, advert.seq)
        self._packed = None
        self._next_expiry = min(self._next_expiry, advert.expires_ms)
        self.version += 1
        return Offer.NEW if held is None else Offer.NEWER

    def remove(self, provider: str) -> bool:
        self._packed = None
        self.version += 1
        self._records.pop(provider, None)
        return self._entries.pop(provider, None) is not None

    def expire(self, now_ms: int) -> list[str]:
        """Drop expired adverts; return their providers."""
        if now_ms < self._next_expiry:
            return []  # none expires before the earliest expiry
        gone = [p for p, e in self._entries.items() if e.advert.expires_ms <= now_ms]
        for p in gone:
            del self._entries[p]
            del self._records[p]
        if gone:
            self._packed = None
            self.version += 1
        self._next_expiry = min(
            (e.advert.expires_ms for e in self._entries.values()), default=NEVER_MS
        )
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
        return self._digest(now_ms).packed

    def _digest(self, now_ms: int) -> _Digest:
        cached = self._packed
        if cached is not None and cached.made_ms <= now_ms < cached.until_ms:
            return cached
        if now_ms < self._next_expiry:
            # Every held advert is live: the records are kept, so the digest is one
            # C-level sort and join, valid until the first expiry (or a change).
            records = list(self._records.values())
            cached = self._packed = _Digest(
                b"".join(sorted(records)),
                now_ms,
                self._next_expiry,
                list(self._entries.values()),
                dict(zip(records, range(len(records)), strict=True)),
            )
        else:
            live = list(self.live(now_ms))
            until = min((e.advert.expires_ms for e in live), default=NEVER_MS)
            packed = pack_digest({e.provider: e.seq for e in live})
            position = {self._records[e.provider]: i for i, e in enumerate(live)}
            cached = self._packed = _Digest(packed, now_ms, until, live, position)
        return cached

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

    def diff_packed(
        self, packed: bytes, now_ms: int, limit: int
    ) -> tuple[list[Entry], list[str], bool]:
        """``diff`` against a packed digest that ``DirectoryRequest`` validated (sorted,
        no repeats), with the same result, in O(differences) Python steps.

        Every node answers one pull per gossip round, each carrying one record per
        provider; comparing record by record in Python made the answers O(providers)
        each, the largest cost of a 10,000-node simulation. Whole records (provider and
        seq) are compared as sets of bytes; only the ones that differ are looked at.
        """
        ours = self._digest(now_ms)
        if packed == ours.packed:
            return [], [], False
        theirs = set(_splitter(len(packed) // DIGEST_RECORD).unpack(packed))
        only_theirs = theirs.difference(ours.position)
        their_seq = {r[:32]: int.from_bytes(r[32:], "big") for r in only_theirs}
        missing: list[Entry] = []
        more = False
        for i in sorted(ours.position[r] for r in ours.position.keys() - theirs):
            e = ours.live[i]
            # Not held alike: they hold another seq of it, or nothing.
            if their_seq.get(e.provider.encode("ascii"), -1) < e.seq:
                if len(missing) >= limit:
                    more = True
                    break
                missing.append(e)
        wanted = []
        for r in sorted(only_theirs):
            provider = r[:32].decode("ascii")
            if their_seq[r[:32]] > self._seq_of(provider):
                wanted.append(provider)
        return missing, wanted, more

    def _seq_of(self, provider: str) -> int:
        e = self._entries.get(provider)
        return -1 if e is None else e.seq
