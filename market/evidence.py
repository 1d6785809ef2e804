"""Settlement evidence: the countersigned bills of a lease, checked without trusting anyone.

An export (docs/settlement.md, format ``mercato-settlement/1``) lists, per lease, the
award (signed by the tenant), the accept (signed by the provider, naming the award's
hash) and each bill (a cumulative ``debit_note`` or the closing ``receipt``, signed by
the provider) with the tenant's countersignature. A lease's debt is the largest
cumulative amount the tenant countersigned. ``verify`` re-checks every signature,
every hash link and every sum, and recomputes the totals; the totals the producer wrote
are only compared, never believed.

Pure: no files, no clock (envelopes are opened without the freshness window: evidence
is old by nature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from market.settlement import amount_owed
from protocol.envelope import Envelope, open_envelope
from protocol.errors import MercatoError
from protocol.messages import Accept, Award, DebitNote, Receipt

FORMAT = "mercato-settlement/1"


class EvidenceError(MercatoError):
    """An export does not prove what it claims; the reason names the lease and the check."""

    code = "bad_evidence"


@dataclass(frozen=True, slots=True)
class LeaseDebt:
    """What one lease's countersigned bills prove the tenant owes its provider."""

    lease_id: str
    provider: str
    tenant: str
    price: int
    bills: int
    amount: int  # micro-credits: the largest countersigned cumulative amount


def _open(hex_bytes: object, what: str) -> Envelope:
    if not isinstance(hex_bytes, str):
        raise EvidenceError(f"{what} is not a hex string")
    try:
        raw = bytes.fromhex(hex_bytes)
    except ValueError:
        raise EvidenceError(f"{what} is not hex") from None
    try:
        return open_envelope(raw, now_ms=0, replay=None)
    except MercatoError as e:
        raise EvidenceError(f"{what}: {e.reason}") from None


def verify_lease(entry: dict[str, Any]) -> LeaseDebt:
    """Check one lease's evidence; return the debt it proves."""
    lease_id = entry.get("lease_id")
    where = f"lease {lease_id}"
    award_env = _open(entry.get("award"), f"{where}: award")
    accept_env = _open(entry.get("accept"), f"{where}: accept")
    award, accept = award_env.body, accept_env.body
    if not isinstance(award, Award) or not isinstance(accept, Accept):
        raise EvidenceError(f"{where}: award and accept are not an award and an accept")
    if award.lease_id != lease_id or accept.lease_id != lease_id:
        raise EvidenceError(f"{where}: award or accept names another lease")
    if accept_env.sender != award.provider or accept.award_hash != award_env.digest:
        raise EvidenceError(f"{where}: the accept is not the awarded provider's of this award")
    provider, tenant, price = award.provider, award_env.sender, award.price
    if entry.get("provider") != provider or entry.get("tenant") != tenant:
        raise EvidenceError(f"{where}: provider or tenant differs from the signed award")
    bills = entry.get("bills")
    if not isinstance(bills, list) or not bills:
        raise EvidenceError(f"{where}: no bills")
    top = 0
    for i, pair in enumerate(bills):
        what = f"{where}: bill {i}"
        if not isinstance(pair, dict):
            raise EvidenceError(f"{what} is not an object")
        bill_env = _open(pair.get("bill"), what)
        cs_env = _open(pair.get("countersign"), f"{what} countersignature")
        bill, cs = bill_env.body, cs_env.body
        if not isinstance(bill, DebitNote | Receipt) or type(cs) is not type(bill):
            raise EvidenceError(f"{what}: not a debit note or receipt and its countersignature")
        if bill_env.sender != provider or bill.provider != provider or bill.tenant != tenant:
            raise EvidenceError(f"{what}: not signed by the lease's provider for its tenant")
        if bill.lease_id != lease_id or bill.countersigns is not None:
            raise EvidenceError(f"{what}: names another lease, or is not the provider's bill")
        if cs_env.sender != tenant or cs.countersigns != bill_env.digest:
            raise EvidenceError(f"{what}: the countersignature is not the tenant's of this bill")
        if cs.model_copy(update={"countersigns": None}) != bill:
            raise EvidenceError(f"{what}: the countersignature changes the bill's figures")
        if bill.price != price:
            raise EvidenceError(f"{what}: price {bill.price} is not the awarded {price}")
        if bill.amount != amount_owed(bill.device_ms, bill.price):
            raise EvidenceError(
                f"{what}: amount {bill.amount} is not ceil(device_ms x price / 1 h)"
            )
        top = max(top, bill.amount)
    debt = LeaseDebt(str(lease_id), provider, tenant, price, len(bills), top)
    claimed = entry.get("amount_micro_credits")
    if claimed != debt.amount:
        raise EvidenceError(
            f"{where}: claims {claimed} micro-credits, its countersigned bills prove {debt.amount}"
        )
    return debt


def verify(doc: object) -> list[LeaseDebt]:
    """Check a whole export: every lease, then the totals per counterparty pair."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise EvidenceError(f"not a {FORMAT} document")
    leases = doc.get("leases")
    if not isinstance(leases, list):
        raise EvidenceError("leases is not a list")
    debts = [verify_lease(e if isinstance(e, dict) else {}) for e in leases]
    if len({d.lease_id for d in debts}) != len(debts):
        raise EvidenceError("a lease appears twice (its debt would count twice)")
    proven = totals(debts)
    claimed = doc.get("totals")
    if not isinstance(claimed, list):
        raise EvidenceError("totals is not a list")
    as_claimed = {
        (t.get("provider"), t.get("tenant")): t.get("amount_micro_credits")
        for t in claimed
        if isinstance(t, dict)
    }
    if as_claimed != proven:
        raise EvidenceError(f"totals {as_claimed} differ from the proven {proven}")
    return debts


def totals(debts: list[LeaseDebt]) -> dict[tuple[str, str], int]:
    """Micro-credits each tenant owes each provider, summed over proven leases."""
    out: dict[tuple[str, str], int] = {}
    for d in debts:
        out[(d.provider, d.tenant)] = out.get((d.provider, d.tenant), 0) + d.amount
    return out
