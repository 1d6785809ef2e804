"""What the daemon hands the operator endpoints: a :class:`StatusSource`, and where they are.

Kept apart from node.operator.document (the status document's models and how they are
collected) so that a daemon nobody asks for its status never imports the document:
building the source is all a serving daemon does with it (docs/benchmarks.md, "Idle
provider RSS"; tests/node/test_idle_imports.py).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.net.node import Node
    from node.operator.prices import PriceFloors
    from node.provider.endpoint import EndpointService
    from node.provider.service import ProviderService
    from node.provider.slurm import ClusterStatus
    from node.provider.work import WorkService
    from node.store.node_store import Store

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Loopback only: what ``[status] allow_from`` defaults to.
LOOPBACK: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)

#: Where the daemon serves the status document as JSON (node.operator.status_page).
STATUS_PATH = "/status.json"


@dataclass
class StatusSource:
    """Everything the operator endpoints read; the daemon builds one."""

    node: Node
    info: Mapping[str, object]  # daemon.json as the daemon wrote it
    store: Store | None = None
    provider: ProviderService | None = None
    work: WorkService | None = None
    endpoint: EndpointService | None = None
    floors: PriceFloors | None = None
    allow_from: Sequence[Network] = LOOPBACK
    refresh_s: int = 5
    started_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    #: What the cluster behind the executor is doing (node.provider.slurm).
    cluster: Callable[[], ClusterStatus] | None = None


def local_url(listen_host: str, port: int) -> str:
    """How a process on this host reaches a daemon listening on ``listen_host``."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(listen_host, listen_host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
