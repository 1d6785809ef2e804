"""Identities: Ed25519 keys, node ids, PEM files."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import BadSignatureError, LocalProtocolError
from protocol.identity import Identity, node_id_from_public_key, verify

# RFC 8032 section 7.1, TEST 1: secret key, public key and the signature of "".
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


class TestNodeId:
    def test_format_is_32_lowercase_base32_characters(self) -> None:
        node_id = Identity.generate().node_id
        assert re.fullmatch(r"[a-z2-7]{32}", node_id)

    @given(st.binary(min_size=32, max_size=32))
    def test_is_base32_of_the_first_20_bytes_of_sha256(self, key: bytes) -> None:
        expected = base64.b32encode(hashlib.sha256(key).digest()[:20]).decode().lower()
        assert node_id_from_public_key(key) == expected

    def test_known_value(self) -> None:
        # Pinned so that a change to the derivation (which would orphan every node) is loud.
        assert node_id_from_public_key(RFC8032_PUBLIC) == "eh7ddx5bksrgcytl7bkai36se4nxx3kl"

    @pytest.mark.parametrize("size", [0, 31, 33, 64])
    def test_wrong_key_size_is_refused(self, size: int) -> None:
        with pytest.raises(LocalProtocolError):
            node_id_from_public_key(b"\x01" * size)


class TestIdentity:
    def test_seed_is_rfc8032_private_key(self) -> None:
        ident = Identity.from_seed(RFC8032_SEED)
        assert ident.public_key == RFC8032_PUBLIC
        assert ident.sign(b"") == RFC8032_SIG
        assert ident.seed() == RFC8032_SEED

    @given(st.binary(min_size=32, max_size=32))
    def test_same_seed_same_identity(self, seed: bytes) -> None:
        a, b = Identity.from_seed(seed), Identity.from_seed(seed)
        assert (a.public_key, a.node_id) == (b.public_key, b.node_id)
        assert a.sign(b"m") == b.sign(b"m")  # Ed25519 signatures are deterministic

    def test_generated_identities_differ(self) -> None:
        assert len({Identity.generate().node_id for _ in range(20)}) == 20

    @pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
    def test_wrong_seed_size_is_refused(self, size: int) -> None:
        with pytest.raises(LocalProtocolError):
            Identity.from_seed(b"\x02" * size)

    def test_pem_round_trip_keeps_the_identity(self) -> None:
        ident = Identity.generate()
        pem = ident.to_pem()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
        again = Identity.from_pem(pem)
        assert again.node_id == ident.node_id
        assert again.seed() == ident.seed()

    def test_pem_is_the_pkcs8_file_cryptography_writes(self) -> None:
        # Key files written before the daemon stopped loading cryptography's
        # serialization module at start (and by any tool) read back, and new ones are
        # byte for byte what cryptography writes.
        for _ in range(20):
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            ident = Identity.from_pem(pem)
            assert ident.seed() == key.private_bytes_raw()
            assert ident.to_pem() == pem
            assert Identity.from_pem(pem.replace(b"\n", b"\r\n")).seed() == ident.seed()

    def test_an_encrypted_pem_is_refused(self) -> None:
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        with pytest.raises(TypeError):  # a password is needed: node.home names the file
            Identity.from_pem(pem)

    @pytest.mark.parametrize(
        "pem",
        [
            b"",
            b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----\n",
            b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 64 + b"\n-----END PRIVATE KEY-----\n",
        ],
    )
    def test_a_damaged_pem_is_refused(self, pem: bytes) -> None:
        with pytest.raises(ValueError, match=r"PEM file|key data"):
            Identity.from_pem(pem)

    def test_pem_of_another_key_type_is_refused(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with pytest.raises(LocalProtocolError):
            Identity.from_pem(pem)

    def test_repr_does_not_leak_the_private_key(self) -> None:
        ident = Identity.from_seed(RFC8032_SEED)
        text = repr(ident)
        assert ident.node_id in text
        assert RFC8032_SEED.hex() not in text
        assert "private" not in text.lower()


class TestVerify:
    def test_good_signature_passes(self) -> None:
        verify(RFC8032_PUBLIC, RFC8032_SIG, b"")

    def test_other_message_fails(self) -> None:
        with pytest.raises(BadSignatureError):
            verify(RFC8032_PUBLIC, RFC8032_SIG, b"x")

    def test_other_key_fails(self) -> None:
        with pytest.raises(BadSignatureError):
            verify(Identity.generate().public_key, RFC8032_SIG, b"")

    @pytest.mark.parametrize(
        ("key", "sig"),
        [
            ((2).to_bytes(32, "little"), RFC8032_SIG),  # canonical, not this signature's key
            (RFC8032_PUBLIC, RFC8032_SIG[:63]),
            (RFC8032_PUBLIC, b""),
        ],
    )
    def test_garbage_keys_and_signatures_fail_cleanly(self, key: bytes, sig: bytes) -> None:
        with pytest.raises(BadSignatureError) as info:
            verify(key, sig, b"")
        assert info.value.code == "bad_signature"
