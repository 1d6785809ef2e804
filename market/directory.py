"""The advert directory every node keeps: newest advert per provider, expiry, digests.

Pure bookkeeping, no I/O and no clock: ``now_ms`` comes in with every call. Adverts
enter already verified (the node layer opens the envelope); the directory decides
only whether an advert is news, and what a peer lacks (anti-entropy).
"""

from __future__ import annotations

import bisect
import functools
import heapq
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


#: packed record -> (its entry's rank in directory order, the record, the entry). Ranks
#: are unique, so sorting these never compares further.
_Held = dict[bytes, tuple[int, bytes, Entry]]


@dataclass(frozen=True, slots=True)
class _Digest:
    """The live digest as of ``made_ms`` while a held advert has expired unpurged, valid
    until ``until_ms`` (the first expiry among the live)."""

    packed: bytes
    made_ms: int
    until_ms: int
    held: _Held  # the live entries only, ranked as ``live()`` yields them


@functools.lru_cache(maxsize=64)
def _splitter(records: int) -> struct.Struct:
    """Cuts a packed digest of ``records`` records into them in one C call (``diff_packed``
    does it for every pull it answers; a set comprehension of slices took twice as long).
    Digests of a few sizes recur (the directory's size, give or take a few adverts)."""
    return struct.Struct(f"{DIGEST_RECORD}s" * records)


class Directory:
    """Newest live advert per provider."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        # provider -> its digest record (pack_digest of one), in the order of _entries.
        self._records: dict[str, bytes] = {}
        # The digest of everything held, kept up to date by every change rather than
        # rebuilt after it (a node's directory changes between most of the pulls it
        # sends and answers): the records sorted (a replaced advert's record takes its
        # old one's place, the provider being the record's first 32 bytes), and every
        # record with its entry, ranked in the order of _entries (a new provider gets
        # the next rank; a newer advert keeps its provider's, as the dict keeps its key's
        # place). The joined bytes are made when first asked for after a change.
        self._sorted: list[bytes] = []
        self._held: _Held = {}
        self._rank = 0
        self._joined: bytes | None = None
        # The digest while some held advert has expired but is not purged yet, or None
        # once an advert was added or removed.
        self._packed: _Digest | None = None
        # At most the earliest expires_ms of any held advert (a lower bound: replacing
        # or removing an advert leaves it low, which only costs one needless scan).
        # Every node runs expire() every second: without the bound each run scans the
        # whole directory, O(providers) per node per second.
        self._next_expiry = NEVER_MS
        # (expires_ms, provider) of every advert offered and kept, a heap: the top is the
        # earliest expiry, unless its advert was replaced or removed since (then it is
        # dropped when it comes up). expire() and the bound above read it instead of
        # scanning every entry: a node's earliest expiry passes about once a second
        # (each provider re-advertises before its advert expires, and the bound stays
        # at the replaced advert's expiry), and each scan was O(providers).
        self._expiries: list[tuple[int, str]] = []
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
        """Keep ``advert`` if it is live and newer than what is held.

        Every node offers every advert it has not seen yet (millions in a 10,000-node
        simulation), so each step here is written out rather than called.
        """
        expires = advert.expires_ms
        if expires <= now_ms:
            return Offer.EXPIRED
        provider = advert.provider
        seq = advert.seq
        held = self._entries.get(provider)
        if held is not None:
            held_seq = held.advert.seq
            if seq < held_seq:
                return Offer.OLDER
            if seq == held_seq:
                return Offer.DUPLICATE
        entry = self._entries[provider] = Entry(advert, envelope, now_ms)
        # Its pack_digest record: the provider's 32 ASCII bytes, seq as 8 bytes.
        record = provider.encode("ascii") + seq.to_bytes(8, "big")
        if held is None:
            self._records[provider] = record
            bisect.insort(self._sorted, record)
            rank = self._rank
            self._rank += 1
        else:
            old = self._records[provider]
            self._records[provider] = record
            # Same provider, higher seq: sorts right after the old record and before
            # any other provider's, so it takes the old one's place.
            self._sorted[bisect.bisect_left(self._sorted, old)] = record
            rank = self._held.pop(old)[0]
        self._held[record] = (rank, record, entry)
        self._joined = None
        self._packed = None
        heapq.heappush(self._expiries, (expires, provider))
        if expires < self._next_expiry:
            self._next_expiry = expires
        self.version += 1
        return Offer.NEW if held is None else Offer.NEWER

    def remove(self, provider: str) -> bool:
        self._packed = None
        self.version += 1
        record = self._records.pop(provider, None)
        if record is not None:
            del self._held[record]
            del self._sorted[bisect.bisect_left(self._sorted, record)]
            self._joined = None
        return self._entries.pop(provider, None) is not None

    def expire(self, now_ms: int) -> list[str]:
        """Drop expired adverts; return their providers."""
        if now_ms < self._next_expiry:
            return []  # none expires before the earliest expiry
        gone = []
        while self._earliest() <= now_ms:  # the top is a held advert's now: due
            _, p = heapq.heappop(self._expiries)
            gone.append(p)
            del self._entries[p]
            del self._held[self._records.pop(p)]
        if gone:
            held = self._held
            self._sorted = [r for r in self._sorted if r in held]
            self._joined = None
            self._packed = None
            self.version += 1
        self._next_expiry = self._earliest()
        return gone

    def _earliest(self) -> int:
        """The earliest expires_ms of any held advert (NEVER_MS when none), exactly."""
        due = self._expiries
        entries = self._entries
        while due:
            expires, p = due[0]
            e = entries.get(p)
            if e is not None and e.advert.expires_ms == expires:
                return expires
            heapq.heappop(due)  # its advert was replaced or removed
        return NEVER_MS

    def live(self, now_ms: int) -> Iterator[Entry]:
        """Adverts that have not expired at ``now_ms`` (an expired one is never used)."""
        return (e for e in self._entries.values() if e.advert.expires_ms > now_ms)

    def digest(self, now_ms: int) -> dict[str, int]:
        """provider -> seq of every live advert: what a peer compares against."""
        return {e.provider: e.seq for e in self.live(now_ms)}

    def packed_digest(self, now_ms: int) -> bytes:
        """``digest`` packed for a ``directory_request`` (``protocol.messages.pack_digest``).

        A node sends it every gossip round and it changes far less often: the sorted
        records are kept up to date as adverts come and go, and joined once per change.
        """
        return self._digest(now_ms)[0]

    def _digest(self, now_ms: int) -> tuple[bytes, _Held]:
        """The packed live digest at ``now_ms`` and its records' entries."""
        if now_ms >= self._next_expiry:
            cached = self._packed
            if cached is not None and cached.made_ms <= now_ms < cached.until_ms:
                return cached.packed, cached.held
            # The bound may be stale (the advert that set it was replaced): make it exact,
            # which expire() also relies on.
            self._next_expiry = self._earliest()
            if now_ms >= self._next_expiry:
                # A held advert has expired and is not purged yet: the live ones only.
                live = list(self.live(now_ms))
                until = min((e.advert.expires_ms for e in live), default=NEVER_MS)
                packed = pack_digest({e.provider: e.seq for e in live})
                held = {
                    r: (i, r, e) for i, e in enumerate(live) for r in (self._records[e.provider],)
                }
                self._packed = _Digest(packed, now_ms, until, held)
                return packed, held
        # Every held advert is live.
        joined = self._joined
        if joined is None:
            joined = self._joined = b"".join(self._sorted)
        return joined, self._held

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
        seq) are compared as sets of bytes; only the ones that differ are looked at, and
        as records too: two records of one provider order as their seqs (big-endian after
        the same 32 bytes), so no seq is decoded.
        """
        ours, held = self._digest(now_ms)
        if packed == ours:
            return [], [], False
        theirs = set(_splitter(len(packed) // DIGEST_RECORD).unpack(packed))
        only_theirs = theirs.difference(held)
        their_record = {r[:32]: r for r in only_theirs}
        missing: list[Entry] = []
        more = False
        for _, r, e in sorted(held[r] for r in held.keys() - theirs):
            # Not held alike: they hold another seq of it, or nothing.
            t = their_record.get(r[:32])
            if t is None or t < r:
                if len(missing) >= limit:
                    more = True
                    break
                missing.append(e)
        wanted = []
        records = self._records  # every held advert, expired or not, as _seq_of sees them
        for r in sorted(only_theirs):
            provider = r[:32].decode("ascii")
            o = records.get(provider)
            if o is None or r > o:
                wanted.append(provider)
        return missing, wanted, more

    def _seq_of(self, provider: str) -> int:
        e = self._entries.get(provider)
        return -1 if e is None else e.seq


@dataclass(frozen=True, slots=True)
class OwnDevices:
    """What a tenant knows itself of one provider's devices, sooner than any advert.

    A provider re-advertises after a hold-down and the gossip carries it on, so the
    adverts a tenant pulls lag its own leases by a second or more: right after it
    leased a device the advert still says free (asking for it gets ``all_reserved``
    from our own lease), right after it released one the advert still says taken (the
    tenant does not ask, and leases fewer units than it could).
    """

    #: Device ids of the tenant's active leases on this provider: never free to it.
    held: frozenset[str] = frozenset()
    #: (when the tenant's lease ended, its device ids), the provider having confirmed
    #: the end (a receipt): free again as far as any advert signed before that knows.
    released: tuple[tuple[int, frozenset[str]], ...] = ()


def as_known(advert: Advert, signed_ms: int, own: OwnDevices) -> Advert:
    """``advert`` with the free devices the tenant knows better about (``own``).

    ``signed_ms`` is when the provider signed the advert (its envelope's timestamp):
    a device released after that is free again, unless the tenant holds it anew. That
    compares the provider's clock with the tenant's: a skewed clock only makes the
    tenant ask a provider that is busy after all (it answers ``all_reserved``) or skip
    one until its next advert, what it did before. Only device ids the advert lists
    are ever added, so nothing here makes a provider look larger than it says it is.
    Returns ``advert`` itself when nothing changes.
    """
    back = {d for ended_ms, ids in own.released if ended_ms > signed_ms for d in ids}
    if not own.held and not back:
        return advert
    groups = []
    changed = False
    for g in advert.devices:
        listed = set(g.ids)
        free = set(g.free) | (back & listed)
        free -= own.held
        if free != set(g.free):
            changed = True
            # In the advert's order of ids: the same inputs give the same lists.
            g = g.model_copy(update={"free": [d for d in g.ids if d in free]})
        groups.append(g)
    return advert.model_copy(update={"devices": groups}) if changed else advert
