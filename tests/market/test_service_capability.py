"""market.capability.authorize: which requests a verified token allows."""

from __future__ import annotations

import pytest

from market.capability import authorize
from protocol.capability import (
    CapabilityExpiredError,
    CapabilityScopeError,
    decode_token,
    issue,
)
from protocol.identity import Identity

TENANT = Identity.from_seed(bytes(range(32)))
OTHER = Identity.from_seed(bytes(range(1, 33)))


def check(token: str, *, lease: str = "L1", method: str = "GET", path: str = "/", now: int = 0):
    authorize(
        decode_token(token),
        lease_id=lease,
        tenant=TENANT.node_id,
        method=method,
        path=path,
        now_ms=now,
    )


class TestAuthorize:
    def test_the_tenants_token_allows_its_lease(self) -> None:
        check(issue(TENANT, "L1", 1_000), method="POST", path="/predict", now=999)
        check(issue(TENANT, "L1", 1_000, methods=("GET",)), method="HEAD")

    def test_expired(self) -> None:
        with pytest.raises(CapabilityExpiredError):
            check(issue(TENANT, "L1", 1_000), now=1_000)

    def test_another_lease(self) -> None:
        with pytest.raises(CapabilityScopeError, match="lease L2"):
            check(issue(TENANT, "L2", 1_000))

    def test_signed_by_someone_else_than_the_tenant(self) -> None:
        with pytest.raises(CapabilityScopeError, match="tenant"):
            check(issue(OTHER, "L1", 1_000))

    def test_method_and_path(self) -> None:
        token = issue(TENANT, "L1", 1_000, methods=("POST",), path="/predict")
        check(token, method="POST", path="/predict/x")
        with pytest.raises(CapabilityScopeError):
            check(token, method="DELETE", path="/predict")
        with pytest.raises(CapabilityScopeError):
            check(token, method="POST", path="/predictions")
        for sneaky in ("/predict/../admin", "/predict/%2e%2e/admin", "/predict%2F..%2Fadmin"):
            with pytest.raises(CapabilityScopeError):
                check(token, method="POST", path=sneaky)
