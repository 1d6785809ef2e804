"""Capability tokens: only the key a token names can have signed it, byte for byte."""

from __future__ import annotations

import msgpack
import pytest

from protocol.capability import (
    MAX_TOKEN_CHARS,
    BadCapabilityError,
    _b64,
    _unb64,
    decode_token,
    from_header,
    issue,
)
from protocol.codec import encode
from protocol.identity import Identity

TENANT = Identity.from_seed(bytes(range(32)))
OTHER = Identity.from_seed(bytes(range(1, 33)))


class TestTokens:
    def test_round_trip(self) -> None:
        token = issue(TENANT, "lease-1", 5_000, methods=("POST",), path="/predict", sub="app")
        cap = decode_token(token)
        assert (cap.lease, cap.key, cap.exp, cap.methods, cap.path, cap.sub) == (
            "lease-1",
            TENANT.public_key,
            5_000,
            ["POST"],
            "/predict",
            "app",
        )

    def test_every_flipped_bit_is_refused(self) -> None:
        token = issue(TENANT, "lease-1", 5_000)
        body, sig = token[len("mct1.") :].split(".")
        raw = _unb64(body)
        for i in range(len(raw) * 8):
            flipped = bytearray(raw)
            flipped[i // 8] ^= 1 << (i % 8)
            with pytest.raises(BadCapabilityError):
                decode_token(f"mct1.{_b64(bytes(flipped))}.{sig}")

    def test_a_forged_token_naming_the_tenants_key_is_refused(self) -> None:
        """Someone else signs a payload naming the tenant's key: the signature fails."""
        real = issue(TENANT, "lease-1", 5_000)
        forged = issue(OTHER, "lease-1", 5_000)
        body = real[len("mct1.") :].split(".")[0]
        forged_sig = forged.split(".")[2]
        with pytest.raises(BadCapabilityError, match="signature"):
            decode_token(f"mct1.{body}.{forged_sig}")

    def test_a_non_canonical_payload_is_refused(self) -> None:
        cap = decode_token(issue(TENANT, "lease-1", 5_000)).model_dump()
        # Same map, keys out of order: another byte string for the same token.

        payload = msgpack.packb(dict(reversed(list(cap.items()))), use_bin_type=True)
        assert payload != encode(cap)
        sig = TENANT.sign(b"mercato/capability/v1\n" + payload)
        with pytest.raises(BadCapabilityError, match=r"canonical|sorted"):
            decode_token(f"mct1.{_b64(payload)}.{_b64(sig)}")

    @pytest.mark.parametrize(
        "token",
        ["", "mct1.", "mct2.a.b", "mct1.a.b.c", "mct1.!!.AA", "mct1.AA==.AA", "x" * 3000],
    )
    def test_malformed_tokens(self, token: str) -> None:
        with pytest.raises(BadCapabilityError):
            decode_token(token)

    def test_header(self) -> None:
        assert from_header("Mercato abc") == "abc"
        for bad in (None, "", "Bearer abc", "Mercato"):
            with pytest.raises(BadCapabilityError):
                from_header(bad)
        assert len(issue(TENANT, "x" * 64, 1 << 50, sub="y" * 64)) <= MAX_TOKEN_CHARS
