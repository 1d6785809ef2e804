"""A provider's sell side with one deliberate change, and a tenant, for the billing tests.

``start_sell_side`` is the daemon's wiring (node.daemon.Daemon.start: Node, BidEngine,
the daemon's aiohttp app on a real socket at port 0, a real SQLite file) with the
ProviderService subclass a test chooses: a provider that lies about time or money.
``new_tenant`` is a real tenant client on its own store. Each registers its own close
in ``closers``, which the test's fixture runs last to first.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from market.bidding import BidEngine, devices_from_groups
from node.daemon import build_app
from node.net.node import Node, NodeSettings
from node.net.transport import HttpTransport
from node.provider.inventory import DeviceDecl, build_inventory
from node.provider.service import ProviderService
from node.store.node_store import Store
from node.tenant.client import Tenant
from protocol.identity import Identity

Closers = list[Callable[[], Awaitable[None]]]
#: (node, engine, store) -> the sell side, started by start_sell_side.
ServiceFactory = Callable[[Node, BidEngine, Store], ProviderService]


@dataclass
class Server:
    """A provider on a real socket; ``store`` is its own SQLite file."""

    address: str
    node_id: str
    store: Store


async def start_sell_side(
    store_path: Path, closers: Closers, devices: DeviceDecl, service: ServiceFactory
) -> Server:
    """A provider selling ``devices`` through ``service``, serving on 127.0.0.1:0."""
    identity = Identity.generate()
    store = Store(store_path)
    transport = HttpTransport()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    address = f"http://127.0.0.1:{sock.getsockname()[1]}"
    node = Node(identity, NodeSettings(role="provider", address=address), transport)
    inventory = build_inventory([devices], detect=False)
    engine = BidEngine(
        identity.node_id,
        devices_from_groups(inventory.device_groups(free=set(inventory.ids))),
        inventory.interconnect_message(),
    )
    service(node, engine, store).start()
    runner = web.AppRunner(build_app(node, {"node_id": identity.node_id}), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    await node.start()

    async def close() -> None:
        await runner.cleanup()
        await node.close()
        await transport.close()
        store.close()

    closers.append(close)
    return Server(address, identity.node_id, store)


def new_tenant(
    store_path: Path, closers: Closers, cls: type[Tenant] = Tenant, **options: Any
) -> Tenant:
    """A fresh tenant identity on its own store (``options`` go to the Tenant)."""
    transport = HttpTransport()
    store = Store(store_path)

    async def close() -> None:
        await transport.close()
        store.close()

    closers.append(close)
    return cls(Identity.generate(), store, transport, **options)
