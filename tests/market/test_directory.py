"""The advert directory as pure bookkeeping: newest seq wins, expiry, anti-entropy diffs.

Time is a plain integer passed in; nothing here sleeps or opens a socket.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from market.directory import Directory, Entry, Offer, OwnDevices, as_known
from protocol.codec import decode
from protocol.identity import Identity
from protocol.messages import Advert, pack_digest, unpack_digest

NOW = 1_700_000_000_000
TTL = 60_000

AdvertSealer = Callable[..., bytes]
Maker = Callable[..., tuple[Advert, bytes]]


@pytest.fixture
def make(sealed_advert: AdvertSealer) -> Maker:
    """(identity, seq, expires_ms) -> (advert, the envelope its provider signed)."""

    def build(identity: Identity, seq: int, expires_ms: int = NOW + TTL) -> tuple[Advert, bytes]:
        raw = sealed_advert(identity, seq=seq, expires_ms=expires_ms, now_ms=NOW)
        body = decode(raw)["body"]
        return Advert.model_validate(body), raw

    return build


@pytest.fixture
def ids() -> list[Identity]:
    return [Identity.from_seed(bytes([i]) * 32) for i in range(1, 6)]


class TestOffer:
    def test_first_advert_is_new_and_kept_verbatim(self, make: Maker, ids: list[Identity]) -> None:
        d = Directory()
        advert, raw = make(ids[0], seq=1)
        assert d.offer(advert, raw, NOW) is Offer.NEW
        entry = d.get(ids[0].node_id)
        assert entry == Entry(advert, raw, NOW)
        assert entry.envelope == raw  # relayed byte for byte, so the signature still holds
        assert ids[0].node_id in d
        assert len(d) == 1

    def test_newest_seq_wins(self, make: Maker, ids: list[Identity]) -> None:
        d = Directory()
        old, old_raw = make(ids[0], seq=5)
        new, new_raw = make(ids[0], seq=9)
        assert d.offer(old, old_raw, NOW) is Offer.NEW
        assert d.offer(new, new_raw, NOW + 1) is Offer.NEWER
        entry = d.get(ids[0].node_id)
        assert entry is not None
        assert entry.seq == 9
        assert entry.envelope == new_raw

    def test_older_and_duplicate_are_ignored(self, make: Maker, ids: list[Identity]) -> None:
        d = Directory()
        new, new_raw = make(ids[0], seq=9)
        old, old_raw = make(ids[0], seq=5)
        same, same_raw = make(ids[0], seq=9)  # same seq, other nonce: still not news
        d.offer(new, new_raw, NOW)
        assert d.offer(old, old_raw, NOW + 1) is Offer.OLDER
        assert d.offer(same, same_raw, NOW + 2) is Offer.DUPLICATE
        entry = d.get(ids[0].node_id)
        assert entry is not None
        assert entry.envelope == new_raw
        assert entry.received_ms == NOW
        assert not Offer.OLDER.accepted
        assert not Offer.DUPLICATE.accepted
        assert Offer.NEW.accepted
        assert Offer.NEWER.accepted

    def test_an_expired_advert_is_refused(self, make: Maker, ids: list[Identity]) -> None:
        d = Directory()
        advert, raw = make(ids[0], seq=1, expires_ms=NOW)
        assert d.offer(advert, raw, NOW) is Offer.EXPIRED
        assert ids[0].node_id not in d
        assert not Offer.EXPIRED.accepted

    def test_an_expired_newer_advert_does_not_replace_a_live_one(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        d = Directory()
        live, live_raw = make(ids[0], seq=1)
        dead, dead_raw = make(ids[0], seq=2, expires_ms=NOW - 1)
        d.offer(live, live_raw, NOW)
        assert d.offer(dead, dead_raw, NOW) is Offer.EXPIRED
        entry = d.get(ids[0].node_id)
        assert entry is not None
        assert entry.seq == 1


class TestExpiry:
    def test_live_never_returns_an_expired_advert_even_before_it_is_purged(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        d = Directory()
        for i, ident in enumerate(ids):
            advert, raw = make(ident, seq=1, expires_ms=NOW + 1000 * (i + 1))
            d.offer(advert, raw, NOW)
        later = NOW + 2500  # the first two have expired
        assert {e.provider for e in d.live(later)} == {i.node_id for i in ids[2:]}
        assert set(d.digest(later)) == {i.node_id for i in ids[2:]}
        assert len(d) == 5  # nothing purged yet
        assert sorted(d.expire(later)) == sorted(i.node_id for i in ids[:2])
        assert len(d) == 3
        assert d.expire(later) == []

    def test_expiry_boundary_is_exclusive(self, make: Maker, ids: list[Identity]) -> None:
        d = Directory()
        advert, raw = make(ids[0], seq=1, expires_ms=NOW + 10)
        d.offer(advert, raw, NOW)
        assert [e.provider for e in d.live(NOW + 9)] == [ids[0].node_id]
        assert list(d.live(NOW + 10)) == []

    def test_a_provider_can_come_back_after_expiry(self, make: Maker, ids: list[Identity]) -> None:
        d = Directory()
        advert, raw = make(ids[0], seq=1, expires_ms=NOW + 10)
        d.offer(advert, raw, NOW)
        d.expire(NOW + 10)
        again, again_raw = make(ids[0], seq=2, expires_ms=NOW + TTL)
        assert d.offer(again, again_raw, NOW + 20) is Offer.NEW

    def test_remove(self, make: Maker, ids: list[Identity]) -> None:
        d = Directory()
        advert, raw = make(ids[0], seq=1)
        d.offer(advert, raw, NOW)
        assert d.remove(ids[0].node_id)
        assert not d.remove(ids[0].node_id)
        assert d.get(ids[0].node_id) is None


class TestDiff:
    @pytest.fixture
    def full(self, make: Maker, ids: list[Identity]) -> Directory:
        """Five providers at seq 10."""
        d = Directory()
        for ident in ids:
            advert, raw = make(ident, seq=10)
            d.offer(advert, raw, NOW)
        return d

    def test_an_empty_peer_is_sent_everything(self, full: Directory, ids: list[Identity]) -> None:
        missing, wanted, more = full.diff([], NOW, limit=100)
        assert {e.provider for e in missing} == {i.node_id for i in ids}
        assert wanted == []
        assert more is False

    def test_a_peer_in_sync_is_sent_nothing(self, full: Directory) -> None:
        missing, wanted, more = full.diff(full.digest(NOW).items(), NOW, limit=100)
        assert (missing, wanted, more) == ([], [], False)

    def test_older_missing_and_newer_at_the_peer(
        self, full: Directory, ids: list[Identity]
    ) -> None:
        a, b, c, d, e = (i.node_id for i in ids)
        stranger = Identity.from_seed(b"\x99" * 32).node_id
        theirs = [(a, 10), (b, 3), (c, 11), (stranger, 1)]  # d and e missing
        missing, wanted, more = full.diff(theirs, NOW, limit=100)
        assert {x.provider for x in missing} == {b, d, e}
        assert sorted(wanted) == sorted([c, stranger])
        assert more is False

    def test_paging_cuts_at_the_limit_and_says_so(
        self, full: Directory, ids: list[Identity]
    ) -> None:
        seen: dict[str, int] = {}
        pages = 0
        while True:
            missing, _, more = full.diff(seen.items(), NOW, limit=2)
            assert len(missing) <= 2
            pages += 1
            for entry in missing:
                seen[entry.provider] = entry.seq
            if not more:
                break
        assert pages == 3  # 2 + 2 + 1
        assert set(seen) == {i.node_id for i in ids}

    def test_expired_adverts_are_neither_sent_nor_in_the_digest(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        d = Directory()
        short, short_raw = make(ids[0], seq=1, expires_ms=NOW + 5)
        long, long_raw = make(ids[1], seq=1)
        d.offer(short, short_raw, NOW)
        d.offer(long, long_raw, NOW)
        missing, _, _ = d.diff([], NOW + 5, limit=10)
        assert [e.provider for e in missing] == [ids[1].node_id]
        assert d.digest(NOW + 5) == {ids[1].node_id: 1}

    def test_an_expired_copy_does_not_make_us_want_an_old_seq(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        """We hold seq 1 expired (not yet purged); a peer with seq 1 has nothing newer."""
        d = Directory()
        advert, raw = make(ids[0], seq=1, expires_ms=NOW + 5)
        d.offer(advert, raw, NOW)
        _, wanted, _ = d.diff([(ids[0].node_id, 1)], NOW + 10, limit=10)
        assert wanted == []
        _, wanted, _ = d.diff([(ids[0].node_id, 2)], NOW + 10, limit=10)
        assert wanted == [ids[0].node_id]


class TestPackedDigest:
    """The digest a node sends every round is cached; the cache must never go stale."""

    def test_matches_the_live_digest_as_it_changes(self, make: Maker, ids: list[Identity]) -> None:
        d = Directory()
        assert d.packed_digest(NOW) == b""
        short, short_raw = make(ids[0], seq=1, expires_ms=NOW + 5)
        d.offer(short, short_raw, NOW)
        assert d.packed_digest(NOW) == pack_digest({ids[0].node_id: 1})
        advert, raw = make(ids[1], seq=7)
        d.offer(advert, raw, NOW + 1)  # added: cache dropped
        assert dict(unpack_digest(d.packed_digest(NOW + 1))) == {
            ids[0].node_id: 1,
            ids[1].node_id: 7,
        }
        # ids[0] expires at NOW + 5 without being purged: it leaves the digest anyway.
        assert d.packed_digest(NOW + 5) == pack_digest({ids[1].node_id: 7})
        newer, newer_raw = make(ids[1], seq=8)
        d.offer(newer, newer_raw, NOW + 6)
        assert d.packed_digest(NOW + 6) == pack_digest({ids[1].node_id: 8})
        d.remove(ids[1].node_id)
        assert d.packed_digest(NOW + 6) == b""

    def test_a_clock_that_steps_back_recomputes(self, make: Maker, ids: list[Identity]) -> None:
        d = Directory()
        advert, raw = make(ids[0], seq=1, expires_ms=NOW + 5)
        d.offer(advert, raw, NOW)
        assert d.packed_digest(NOW + 10) == b""  # expired, not purged
        assert d.packed_digest(NOW + 1) == pack_digest({ids[0].node_id: 1})


class TestDiffPacked:
    """The packed diff every node answers pulls with gives exactly what ``diff`` gives."""

    def test_same_answer_as_diff_on_random_digests(self, make: Maker, ids: list[Identity]) -> None:
        import random

        rng = random.Random(7)
        strangers = [Identity.from_seed(bytes([100 + i]) * 32) for i in range(3)]
        everyone = ids + strangers
        made = {
            (i.node_id, s, x): make(i, seq=s, expires_ms=NOW + x)
            for i in ids
            for s in (1, 2, 3)
            for x in (5, TTL)
        }
        compared = 0
        for _ in range(300):
            d = Directory()
            for ident in rng.sample(ids, rng.randint(0, len(ids))):
                for s in sorted(rng.sample((1, 2, 3), rng.randint(1, 3))):
                    advert, raw = made[(ident.node_id, s, rng.choice((5, TTL)))]
                    d.offer(advert, raw, NOW)
            now = NOW + rng.choice((0, 5, 10))
            theirs = {i.node_id: rng.randint(0, 4) for i in rng.sample(everyone, rng.randint(0, 8))}
            limit = rng.randint(1, 6)
            want = d.diff(unpack_digest(pack_digest(theirs)), now, limit)  # as received
            got = d.diff_packed(pack_digest(theirs), now, limit)
            assert ([e.provider for e in got[0]], got[1], got[2]) == (
                [e.provider for e in want[0]],
                want[1],
                want[2],
            )
            compared += bool(want[0] or want[1])
        assert compared > 100  # most cases had something to send or to want

    def test_a_peer_in_sync_is_sent_nothing(self, make: Maker, ids: list[Identity]) -> None:
        d = Directory()
        for ident in ids:
            advert, raw = make(ident, seq=10)
            d.offer(advert, raw, NOW)
        assert d.diff_packed(d.packed_digest(NOW), NOW, limit=100) == ([], [], False)


class TestExpire:
    def test_expire_drops_exactly_the_expired_as_adverts_come_and_go(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        """The earliest-expiry bound that lets expire() skip the scan never hides one."""
        d = Directory()
        a, a_raw = make(ids[0], seq=1, expires_ms=NOW + 10)
        b, b_raw = make(ids[1], seq=1, expires_ms=NOW + 20)
        d.offer(a, a_raw, NOW)
        d.offer(b, b_raw, NOW)
        assert d.expire(NOW + 9) == []
        assert d.expire(NOW + 10) == [ids[0].node_id]
        newer, newer_raw = make(ids[1], seq=2, expires_ms=NOW + 15)  # expires earlier
        d.offer(newer, newer_raw, NOW + 11)
        assert d.expire(NOW + 14) == []
        assert d.expire(NOW + 15) == [ids[1].node_id]
        assert len(d) == 0
        assert d.expire(NOW + 10**9) == []


class TestDigestKeptInPlace:
    """The digest is kept up to date as adverts come and go instead of rebuilt: after any
    sequence of offers, replacements, removals, expiries and clock steps (back too), it
    and the pull answers must be what the directory's live adverts give from scratch."""

    def test_same_as_rebuilt_after_random_changes(self, make: Maker) -> None:
        import random

        rng = random.Random(19)
        providers = [Identity.from_seed(bytes([40 + i]) * 32) for i in range(8)]
        strangers = [Identity.from_seed(bytes([90 + i]) * 32) for i in range(2)]
        expiries = (5, 20, 45, TTL)
        made = {
            (i.node_id, s, x): make(i, seq=s, expires_ms=NOW + x)
            for i in providers
            for s in range(1, 6)
            for x in expiries
        }
        d = Directory()
        now = NOW
        compared = 0
        for step in range(3000):
            op = rng.random()
            if op < 0.55:
                ident = rng.choice(providers)
                advert, raw = made[(ident.node_id, rng.randint(1, 5), rng.choice(expiries))]
                d.offer(advert, raw, now)
            elif op < 0.62:
                d.remove(rng.choice(providers).node_id)
            elif op < 0.72:
                held = [d.get(i.node_id) for i in providers]
                due = {e.provider for e in held if e is not None and e.advert.expires_ms <= now}
                assert set(d.expire(now)) == due
                assert all(d.get(p) is None for p in due)
            elif op < 0.97:
                now += rng.randint(0, 8)
            else:
                now -= rng.randint(1, 10)  # a clock that steps back
            if step % 97 == 0:
                now = NOW + rng.randint(0, 10)  # back to where the early adverts live
            assert d.packed_digest(now) == pack_digest(d.digest(now)), step
            for _ in range(2):
                theirs = {
                    i.node_id: rng.randint(0, 6)
                    for i in rng.sample(providers + strangers, rng.randint(0, 10))
                }
                limit = rng.randint(1, 8)
                want = d.diff(unpack_digest(pack_digest(theirs)), now, limit)
                got = d.diff_packed(pack_digest(theirs), now, limit)
                assert ([e.provider for e in got[0]], got[1], got[2]) == (
                    [e.provider for e in want[0]],
                    want[1],
                    want[2],
                ), step
                assert [e.envelope for e in got[0]] == [e.envelope for e in want[0]], step
                compared += bool(want[0])
            assert d.diff_packed(d.packed_digest(now), now, limit=100) == ([], [], False)
        assert compared > 1000


class TestAsKnown:
    """A tenant's own leases correct the adverts it holds (they lag by a hold-down)."""

    def advert(self, make: Maker, ids: list[Identity], free: list[str]) -> Advert:
        advert, _ = make(ids[0], seq=1)
        group = advert.devices[0].model_copy(update={"free": free})
        return advert.model_copy(update={"devices": [group]})

    def test_devices_we_hold_are_not_free_whatever_the_advert_says(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        stale = self.advert(make, ids, ["gpu0", "gpu1"])
        seen = as_known(stale, NOW, OwnDevices(held=frozenset({"gpu0"})))
        assert seen.devices[0].free == ["gpu1"]
        assert seen.free_units == 1

    def test_devices_released_after_the_advert_was_signed_are_free_again(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        stale = self.advert(make, ids, [])
        seen = as_known(stale, NOW, OwnDevices(released=((NOW + 5, frozenset({"gpu1"})),)))
        assert seen.devices[0].free == ["gpu1"]

    def test_an_advert_signed_after_the_release_is_believed(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        # Someone else leased the device since: the newer advert knows.
        fresh = self.advert(make, ids, [])
        released = OwnDevices(released=((NOW - 1, frozenset({"gpu0", "gpu1"})),))
        assert as_known(fresh, NOW, released) is fresh
        assert as_known(fresh, NOW - 1, released) is fresh  # same ms: not known to be after

    def test_a_device_released_then_leased_again_by_us_is_held(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        stale = self.advert(make, ids, [])
        own = OwnDevices(
            held=frozenset({"gpu0"}), released=((NOW + 5, frozenset({"gpu0", "gpu1"})),)
        )
        assert as_known(stale, NOW, own).devices[0].free == ["gpu1"]

    def test_ids_the_advert_does_not_list_are_never_added(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        stale = self.advert(make, ids, [])
        own = OwnDevices(released=((NOW + 5, frozenset({"gpu7", "h100-0"})),))
        assert as_known(stale, NOW, own) is stale

    def test_nothing_known_leaves_the_advert_as_it_is(
        self, make: Maker, ids: list[Identity]
    ) -> None:
        advert = self.advert(make, ids, ["gpu0"])
        assert as_known(advert, NOW, OwnDevices()) is advert
        assert as_known(advert, NOW, OwnDevices(held=frozenset({"gpu1"}))) is advert
