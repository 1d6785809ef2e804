"""The error tree: every code is unique, maps to one class and one HTTP status."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol import errors
from protocol.errors import (
    ERROR_CLASSES,
    LocalProtocolError,
    MercatoError,
    PeerTimeoutError,
    PeerUnavailableError,
    RemoteProtocolError,
    error_from_code,
    http_status,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def every_error_class() -> list[type[MercatoError]]:
    """The wire's error tree: classes defined in protocol/ (node/ and market/ add local
    errors that never travel, and may be imported by other tests in the same session)."""
    out: list[type[MercatoError]] = []
    todo: list[type[MercatoError]] = [MercatoError]
    while todo:
        cls = todo.pop()
        if cls not in out:
            out.append(cls)
            todo.extend(cls.__subclasses__())
    return [c for c in out if c.__module__.startswith("protocol.")]


class TestErrorTree:
    def test_codes_are_unique_across_the_tree(self) -> None:
        codes = [cls.code for cls in every_error_class()]
        assert len(codes) == len(set(codes)), sorted(codes)
        # a subclass that forgot its own code would inherit its parent's and collide
        assert set(ERROR_CLASSES) == set(codes)

    def test_codes_are_snake_case(self) -> None:
        for code in ERROR_CLASSES:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", code), code

    @pytest.mark.parametrize("code", sorted(ERROR_CLASSES))
    def test_code_round_trips_through_a_peer_answer(self, code: str) -> None:
        err = error_from_code(code, "why")
        assert type(err) is ERROR_CLASSES[code]
        assert err.code == code
        assert err.reason == "why"
        assert str(err) == f"{code}: why"

    def test_unknown_code_from_a_peer_becomes_a_remote_error(self) -> None:
        err = error_from_code("something_new", "a future peer")
        assert type(err) is RemoteProtocolError
        assert err.reason == "a future peer"

    def test_peer_faults_are_4xx_and_our_faults_are_5xx(self) -> None:
        for cls in every_error_class():
            status = http_status(cls("x"))
            if issubclass(cls, RemoteProtocolError):
                assert 400 <= status < 500, cls
            elif issubclass(cls, LocalProtocolError):
                assert status == 500
            else:
                assert 400 <= status < 600, cls

    def test_timeouts_and_unreachable_peers_are_standard_exceptions(self) -> None:
        # asyncio code catches TimeoutError / ConnectionError; ours must be caught too.
        assert isinstance(PeerTimeoutError("slow"), TimeoutError)
        assert isinstance(PeerUnavailableError("down"), ConnectionError)

    def test_every_code_is_documented_with_its_status(self) -> None:
        text = DOC.read_text()
        for code, cls in ERROR_CLASSES.items():
            row = re.search(rf"^\|\s*`{code}`\s*\|\s*(\d{{3}})\s*\|", text, re.MULTILINE)
            assert row is not None, f"{code} missing from the error table in {DOC.name}"
            assert int(row.group(1)) == cls.http_status, code

    def test_module_exports_every_class_it_maps(self) -> None:
        for cls in ERROR_CLASSES.values():
            assert getattr(errors, cls.__name__) is cls
