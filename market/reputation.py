"""A tenant's own record of each provider, and the success probability it implies.

There is no global reputation to trust in a market without a centre: each tenant
counts what *it* saw. The estimate is the mean of a Beta(1, 1) posterior (Laplace's
rule of succession), so a newcomer starts at 1/2 rather than at 0 or 1, and a long
good record outweighs one failure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction


@dataclass(frozen=True, slots=True)
class Reputation:
    """Outcomes this tenant observed with one provider."""

    completed: int = 0  # leases that ran to the end with results accepted
    failed: int = 0  # leases lost (missed heartbeats, crashed trials on their side)
    declined: int = 0  # declined after being awarded
    rejected: int = 0  # results the tenant rejected (bad signature, spec mismatch)

    @property
    def bad(self) -> int:
        return self.failed + self.declined + self.rejected

    def success(self) -> Fraction:
        """P(a lease with this provider completes), exact: (completed+1) / (total+2)."""
        return Fraction(self.completed + 1, self.completed + self.bad + 2)

    def record(self, outcome: str) -> Reputation:
        """A copy with one more ``outcome`` (completed, failed, declined or rejected)."""
        if outcome not in ("completed", "failed", "declined", "rejected"):
            raise ValueError(f"unknown outcome {outcome!r}")
        return replace(self, **{outcome: getattr(self, outcome) + 1})


NEUTRAL = Reputation()
