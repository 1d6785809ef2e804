"""JSON views of an advert and a lease that several outputs share.

``mercato market --json``, the daemon's ``/directory.json``, ``mercato leases --json``
and the operator's ``/status.json`` each add their own fields to these; the fields
named here mean the same everywhere, so they are written once.
"""

from __future__ import annotations

from typing import Any

from node.store.node_store import LeaseRow
from protocol.messages import Advert


def advert_summary(advert: Advert, now_ms: int) -> dict[str, Any]:
    """Who sells, where, which advert, how many units are free, how long it holds."""
    return {
        "provider": advert.provider,
        "address": advert.address,
        "seq": advert.seq,
        "free_units": advert.free_units,
        "expires_in_ms": advert.expires_ms - now_ms,
    }


def lease_summary(lease: LeaseRow) -> dict[str, Any]:
    """A stored lease: what was leased, to whom, in which state, for how long."""
    return {
        "lease_id": lease.lease_id,
        "tenant": lease.tenant,
        "model": lease.model,
        "units": lease.units,
        "devices": list(lease.devices),
        "state": lease.state.value,
        "start_ms": lease.start_ms,
        "end_ms": lease.end_ms,
    }
