"""``mercato ledger``: balances per counterparty, export and verification of evidence.

* ``mercato ledger [--home H] [--json]``: per counterparty, what is booked (countersigned),
  what is billed but unsigned, and how many of their notes lapsed or bills we refused.
* ``mercato ledger export FILE``: the countersigned evidence as a ``mercato-settlement/1``
  JSON document (docs/settlement.md), for an external payment system.
* ``mercato ledger verify FILE``: checks every signature, hash link and sum of such a
  document (market.evidence) without trusting whoever produced it; exit 1 with the
  reason if anything fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from node.cli.common import EXIT_OK, add_json, add_store_home


def add_ledger_parser(sub: Any) -> None:
    """Hook the ``ledger`` command into the CLI's subparsers (node.cli.main.build_parser)."""
    ledger = sub.add_parser(
        "ledger",
        help="balances per counterparty; export or verify settlement evidence",
        description="Balances per counterparty from a node's or the tenant's store; "
        "'export FILE' writes the countersigned evidence (docs/settlement.md), "
        "'verify FILE' checks every signature and sum in such a file.",
    )
    add_store_home(ledger)
    add_json(ledger)
    ledger.set_defaults(func=cmd_ledger)
    actions = ledger.add_subparsers(dest="ledger_command", required=False, metavar="ACTION")
    export = actions.add_parser("export", help="write the countersigned evidence to FILE")
    export.add_argument("file", help="where to write the JSON document ('-' for stdout)")
    export.set_defaults(func=cmd_ledger_export)
    check = actions.add_parser("verify", help="check every signature and sum in FILE")
    check.add_argument("file", help="a mercato-settlement/1 JSON document")
    # SUPPRESS: `mercato ledger --json verify F` and `mercato ledger verify F --json` agree.
    check.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    check.set_defaults(func=cmd_ledger_verify)


def _me(store: Any) -> str:
    """This store's node id, from the side it took in its leases ('' if it has none)."""
    for lease in store.list_leases():
        return str(lease.provider if lease.side == "provider" else lease.tenant)
    return ""


def cmd_ledger(args: argparse.Namespace) -> int:
    from node.cli.tenant import _credits, _store_path
    from node.store.node_store import Store

    with Store(_store_path(args)) as store:
        rows = store.balances(_me(store))
        balance = store.ledger_balance()
    if args.json:
        print(json.dumps({"counterparties": rows, "balance_micro_credits": balance}, indent=2))
        return EXIT_OK
    print(f"{'counterparty':34} {'booked':>14} {'unsigned':>14} {'lapsed':>6} {'refused':>7}")
    for r in rows:
        print(
            f"{r['counterparty']:34} {_credits(r['booked']):>14} {_credits(r['unsigned']):>14}"
            f" {r['lapsed']:>6} {r['refused']:>7}"
        )
    print(f"ledger balance: {_credits(balance)} credits (positive: earned)")
    return EXIT_OK


def export(store: Any) -> dict[str, Any]:
    """The store's countersigned bills per lease as a ``mercato-settlement/1`` document.

    Checked with the same verifier before it is written: a store that holds something
    that does not verify (it should not) fails here, not at the payment system.
    """
    from market.evidence import FORMAT, totals, verify_lease

    leases = []
    for lease in store.list_leases():
        bills = [
            r for r in store.list_receipts(lease.lease_id, kind=None) if r.countersign is not None
        ]
        if not bills:
            continue
        entry = {
            "lease_id": lease.lease_id,
            "provider": lease.provider,
            "tenant": lease.tenant,
            "award": lease.award.hex(),
            "accept": lease.accept.hex(),
            "bills": [
                {"kind": r.kind, "bill": r.receipt.hex(), "countersign": r.countersign.hex()}
                for r in bills
            ],
            "amount_micro_credits": max(r.amount for r in bills),
        }
        verify_lease(entry)
        leases.append(entry)
    debts = [verify_lease(e) for e in leases]
    return {
        "format": FORMAT,
        "exported_by": _me(store),
        "leases": leases,
        "totals": [
            {"provider": p, "tenant": t, "amount_micro_credits": amount}
            for (p, t), amount in sorted(totals(debts).items())
        ],
    }


def cmd_ledger_export(args: argparse.Namespace) -> int:
    from node.cli.tenant import _store_path
    from node.store.node_store import Store

    with Store(_store_path(args)) as store:
        doc = export(store)
    text = json.dumps(doc, indent=2) + "\n"
    if args.file == "-":
        print(text, end="")
    else:
        Path(args.file).write_text(text, "utf-8")
        print(f"wrote {len(doc['leases'])} leases to {args.file}")
    return EXIT_OK


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from market.evidence import EvidenceError, totals, verify
    from node.cli.tenant import _credits

    try:
        doc = json.loads(Path(args.file).read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise EvidenceError(f"cannot read {args.file}: {e}") from None
    debts = verify(doc)
    proven = totals(debts)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "leases": len(debts),
                    "bills": sum(d.bills for d in debts),
                    "totals": [
                        {"provider": p, "tenant": t, "amount_micro_credits": a}
                        for (p, t), a in sorted(proven.items())
                    ],
                },
                indent=2,
            )
        )
        return EXIT_OK
    bills = sum(d.bills for d in debts)
    print(f"ok: {len(debts)} leases, {bills} countersigned bills, every signature and sum holds")
    for (p, t), amount in sorted(proven.items()):
        print(f"  tenant {t} owes provider {p}: {_credits(amount)} credits")
    return EXIT_OK
