"""The operator's CLI side: find the running daemon, read its status, send price updates.

``mercato provider status`` and ``mercato provider prices`` use these. The daemon's
answers are validated against the status document's models, so a field the CLI
prints is a field the daemon sent. When the daemon is down, :func:`read_status`
builds what it can from the store (node.operator.document ``offline_status``).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import JsonValue, ValidationError

from node.home import READY_FILE
from node.operator.document import STATUS_PATH, StatusDocument, offline_status, ready_info
from node.operator.prices import PRICES_PATH, PricesAnswer
from protocol.envelope import seal
from protocol.errors import MercatoError, error_from_code
from protocol.messages import PriceUpdate

if TYPE_CHECKING:
    from node.config import NodeConfig

ENVELOPE_CONTENT_TYPE = "application/x-mercato-envelope"  # node.net.transport


class DaemonUnreachableError(MercatoError):
    """The operator CLI could not reach the daemon's control endpoint."""

    code = "daemon_unreachable"


def control_url(home: Path) -> tuple[str, dict[str, JsonValue]]:
    """The running daemon's control base URL and its daemon.json, or raise."""
    info = ready_info(home)
    if not info:
        raise DaemonUnreachableError(f"the daemon is not running (no {home / READY_FILE})")
    pid = info.get("pid")
    if isinstance(pid, int) and not _pid_alive(pid):
        raise DaemonUnreachableError(f"the daemon is not running (pid {pid} is gone)")
    url = info.get("control_url") or info.get("address")
    if not isinstance(url, str) or not url:
        raise DaemonUnreachableError(f"{home / READY_FILE} names no address")
    return url.rstrip("/"), info


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process (the daemon runs as another user)
        return True
    return True


def _http(url: str, data: bytes | None = None, timeout_s: float = 5.0) -> bytes:
    """GET (or POST ``data`` as an envelope) and return the answer; typed errors."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", ENVELOPE_CONTENT_TYPE)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body: bytes = resp.read()
            return body
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read())["error"]
            raise error_from_code(str(err["code"]), str(err["reason"])) from None
        except (ValueError, KeyError, TypeError):
            raise DaemonUnreachableError(f"{url} answered HTTP {e.code}") from None
    except OSError as e:
        raise DaemonUnreachableError(f"cannot reach the daemon at {url}: {e}") from e


def read_status(home: Path, config: NodeConfig | None = None) -> StatusDocument:
    """The daemon's status document, or what the store knows when the daemon is down."""
    try:
        url, _ = control_url(home)
        raw = _http(url + STATUS_PATH)
    except DaemonUnreachableError as e:
        return offline_status(home, config, e.reason)
    try:
        return StatusDocument.model_validate_json(raw)
    except ValidationError as e:
        raise DaemonUnreachableError(
            f"{url}{STATUS_PATH} is not a status document this CLI knows: {e}"
        ) from None


def send_price_update(home: Path, floors: Mapping[str, int], reset: bool = False) -> PricesAnswer:
    """Seal a price_update with the node's own key and POST it to its daemon."""
    from node.home import NodeHome

    try:
        url, info = control_url(home)
    except DaemonUnreachableError as e:
        raise DaemonUnreachableError(
            f"{e.reason}: prices are set on the running daemon; start it, or change "
            "price_floor under [[devices]] in its config"
        ) from None
    h = NodeHome(home)
    if not h.key_path.exists():
        raise MercatoError(f"no identity key at {h.key_path}: is {home} the daemon's home?")
    identity = h.load_or_create_identity()
    if info.get("node_id") and info["node_id"] != identity.node_id:
        raise MercatoError(
            f"the key in {home} is node {identity.node_id}, but the daemon there runs as "
            f"{info['node_id']}"
        )
    sealed = seal(
        identity,
        PriceUpdate(floors=dict(floors), reset=reset),
        now_ms=time.time_ns() // 1_000_000,
        nonce=os.urandom(16),
        to=identity.node_id,
    )
    raw = _http(url + PRICES_PATH, sealed)
    try:
        return PricesAnswer.model_validate_json(raw)
    except ValidationError as e:
        raise DaemonUnreachableError(f"{url}{PRICES_PATH} answered something else: {e}") from None
