"""docs/protocol.md stays in step with the code it describes."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from protocol import messages
from protocol.messages import MESSAGE_TYPES

DOCS = Path(__file__).resolve().parents[2] / "docs"
TEXT = (DOCS / "protocol.md").read_text("utf-8")
RECORDS = ["DeviceGroup", "Interconnect", "PeerInfo", "Requirement", "Usage"]


def section(heading: str) -> str:
    """The text under ``heading`` up to the next heading of any level."""
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^#)", TEXT, re.MULTILINE | re.DOTALL)
    assert match is not None, f"no section {heading!r} in protocol.md"
    return match.group(1)


def table_fields(text: str) -> list[str]:
    return re.findall(r"^\| `([a-z_0-9]+)` \|", text, re.MULTILINE)


def model_for(name: str) -> type[BaseModel]:
    model: type[BaseModel] = getattr(messages, name)
    assert issubclass(model, BaseModel)
    return model


def nested_records(annotation: Any) -> set[type[BaseModel]]:
    out: set[type[BaseModel]] = set()
    if isinstance(annotation, type) and issubclass(annotation, messages.Part):
        out.add(annotation)
    for arg in typing.get_args(annotation):
        out |= nested_records(arg)
    return out


class TestMessageTables:
    @pytest.mark.parametrize("type_", sorted(MESSAGE_TYPES))
    def test_every_field_of_every_type_is_documented(self, type_: str) -> None:
        documented = table_fields(section(f"### `{type_}`"))
        assert documented == list(MESSAGE_TYPES[type_].model_fields)

    @pytest.mark.parametrize("name", RECORDS)
    def test_every_field_of_every_record_is_documented(self, name: str) -> None:
        documented = table_fields(section(f"#### `{name}`"))
        assert documented == list(model_for(name).model_fields)

    def test_every_record_used_by_a_body_is_documented(self) -> None:
        found: set[str] = set()
        todo: list[type[BaseModel]] = list(MESSAGE_TYPES.values())
        while todo:
            for field in todo.pop().model_fields.values():
                for record in nested_records(field.annotation):
                    if record.__name__ not in found:
                        found.add(record.__name__)
                        todo.append(record)
        assert found == set(RECORDS)


class TestWorkedExample:
    def test_annotated_bytes_are_the_first_vector(self) -> None:
        block = re.search(r"<!-- worked-example-envelope -->\n```text\n(.*?)```", TEXT, re.DOTALL)
        assert block is not None
        hex_text = "".join(
            line.split("#", 1)[0].replace(" ", "") for line in block.group(1).splitlines()
        )
        vector = json.loads((DOCS / "test-vectors.json").read_text("utf-8"))[0]
        assert hex_text == vector["envelope"]
        for key in ("seed", "public_key", "node_id", "nonce", "envelope_sha256"):
            assert vector[key] in TEXT, key


class TestRequestReplyTable:
    """Section 7.1 says, for every message type, who sends it and what comes back."""

    def table(self) -> str:
        return section("### 7.1 Who sends what, and what comes back")

    def test_every_type_is_a_request_row_or_a_named_reply(self) -> None:
        text = self.table()
        requests = set(re.findall(r"^\| `([a-z_]+)`", text, re.MULTILINE))
        replies_line = text[text.index("Replies, never requests") :]
        replies = set(re.findall(r"`([a-z_]+)`", replies_line.split(".")[0]))
        assert requests | replies | {"advert"} == set(MESSAGE_TYPES)
        assert "advert" in replies_line

    def test_nothing_is_deferred_to_the_implementation(self) -> None:
        assert "as implemented" not in TEXT.lower()
        assert "issue 3" not in TEXT
