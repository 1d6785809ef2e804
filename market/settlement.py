"""Settlement arithmetic: integers only, one rounding rule.

Prices are micro-credits per device-hour; usage is device-milliseconds. The amount
owed for a task is

    amount = ceil(device_ms * price / 3_600_000)

rounded *up* to the next micro-credit, computed exactly on integers. Rounding up
means a provider is never paid less than its price for work done; the most a tenant
overpays is one micro-credit (10^-6 credit) per receipt.
"""

from __future__ import annotations

MS_PER_HOUR = 3_600_000
MICRO_PER_CREDIT = 1_000_000


def amount_owed(device_ms: int, price: int) -> int:
    """Micro-credits owed for ``device_ms`` at ``price`` micro-credits per device-hour."""
    if device_ms < 0 or price < 0:
        raise ValueError("device_ms and price must be non-negative")
    return -((-device_ms * price) // MS_PER_HOUR)


def expected_cost(
    price: int, devices: int, flop: int, device_flops: int, utilisation_pct: int
) -> int:
    """Micro-credits to complete ``flop`` of work on ``devices`` devices at ``price``.

    Runtime = flop / (devices x device_flops x utilisation); cost = runtime x devices x
    price, so the device count cancels: what matters is price per delivered FLOP/s.
    Rounded up, exact on integers.
    """
    if device_flops <= 0 or utilisation_pct <= 0:
        raise ValueError("device_flops and utilisation_pct must be positive")
    num = price * flop * 100
    den = device_flops * utilisation_pct * 3600
    return -((-num) // den) if devices > 0 else 0


def format_credits(micro: int) -> str:
    """People-facing credits ("2.5"), exact; stores and the wire keep integers."""
    sign = "-" if micro < 0 else ""
    micro = abs(micro)
    whole, frac = divmod(micro, MICRO_PER_CREDIT)
    return sign + f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
