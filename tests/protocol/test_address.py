"""The wire rule for peer addresses: a base URL, nothing a peer could aim elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from protocol.messages import ADDRESS_PATTERN, Address

ADDRESS: TypeAdapter[str] = TypeAdapter(Address, config={"strict": True})
SPEC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text("utf-8")


@pytest.mark.parametrize(
    "address",
    [
        "http://127.0.0.1:7400",
        "https://provider.example.org",
        "http://[2001:db8::7]:7400",
        "http://a-b.c:1",
        "http://x:65535",
    ],
)
def test_base_urls_are_addresses(address: str) -> None:
    assert ADDRESS.validate_python(address) == address


@pytest.mark.parametrize(
    "address",
    [
        "http://host/p2p/../admin",  # a path
        "http://host/",  # even "/"
        "http://user:pw@host",  # user info
        "http://host?x=1",  # a query
        "http://host#x",  # a fragment
        "http://host:0",
        "http://host:65536",
        "http://[not:an:ip]:80",
        "http://host\n",  # "$" is the end of the string
        "ftp://host",
        "http://-host",
        "http://" + "a" * 250,
    ],
)
def test_anything_else_is_refused(address: str) -> None:
    with pytest.raises(ValidationError):
        ADDRESS.validate_python(address)


def test_the_spec_quotes_the_pattern_the_code_uses() -> None:
    assert ADDRESS_PATTERN in SPEC
