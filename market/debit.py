"""Pay as you go between strangers: the tenant's meter and the provider's debit schedule.

Pure: no clock reads, ``now`` is passed in (milliseconds on the caller's own clock).

**The tenant bills from its own clock.** A lease starts, for the tenant's bill, when the
tenant sent the award (``TenantMeter.start_ms``) and stops when the release's answer
is in (or when it stopped wanting the lease, ``stop``). The provider's
``Accept.start_ms`` is only checked: it must fall inside ``[award sent -
ACCEPT_SKEW_MS, accept received + ACCEPT_SKEW_MS]`` or the accept is refused. An honest
provider's interval (award received .. release received) lies inside the tenant's, and
durations do not depend on the offset between the two clocks, so the tenant never
countersigns a note or receipt for more than ``devices x (measured ms + measured ms x
CLOCK_RATE_PPM / 10^6 + BILLING_TOLERANCE_MS)``: the tolerance covers only millisecond
rounding on both clocks and a difference in their rates (1000 ppm, 20 x what an
undisciplined quartz clock drifts). That tolerance is all a lying provider can gain.

**Settlement during the lease.** Every ``interval_ms`` of a lease the provider signs a
cumulative debit note (device-ms and amount since the lease started, on its own clock).
The tenant countersigns each note that its meter covers. A note not countersigned
``timeout_ms`` after it fell due has *lapsed*: the provider stops the lease's work and
ends the lease. The provider's unpaid work is then at most the time since the last
countersigned note: one interval plus the timeout (``DebitSchedule.max_unpaid_ms``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from market.settlement import amount_owed

#: How far a provider's Accept.start_ms may lie outside the tenant's award round trip.
#: The same as the envelope's allowed clock skew (node.net.node.NodeSettings.clock_skew_ms).
ACCEPT_SKEW_MS = 30_000
#: Per device, what a note or receipt may exceed the tenant's measured time by:
#: millisecond rounding on both clocks...
BILLING_TOLERANCE_MS = 10
#: ...and a difference in clock rates, in parts per million of the measured time.
CLOCK_RATE_PPM = 1_000

#: A task's result may arrive this long after its timeout (sandbox start, log delivery)
#: before the tenant treats the provider as stalling and stops paying for the lease.
TASK_GRACE_MS = 5_000

#: Defaults a tenant proposes in its award, and the bounds a provider accepts by default.
DEFAULT_DEBIT_INTERVAL_MS = 10_000
DEFAULT_PAYMENT_TIMEOUT_MS = 10_000
MIN_DEBIT_INTERVAL_MS = 1_000
MAX_DEBIT_INTERVAL_MS = 300_000
MIN_PAYMENT_TIMEOUT_MS = 1_000
MAX_PAYMENT_TIMEOUT_MS = 300_000


def accept_start_problem(start_ms: int, sent_ms: int, received_ms: int) -> str | None:
    """Why an Accept's ``start_ms`` cannot be true, or None if the tenant's window holds it."""
    low, high = sent_ms - ACCEPT_SKEW_MS, received_ms + ACCEPT_SKEW_MS
    if start_ms < low:
        return f"accept says the lease started {sent_ms - start_ms} ms before the award was sent"
    if start_ms > high:
        return f"accept says the lease started {start_ms - received_ms} ms after it arrived"
    return None


@dataclass
class TenantMeter:
    """What one lease has cost by the tenant's own clock, and what it has countersigned."""

    devices: int
    price: int  # micro-credits per device-hour
    start_ms: int  # when the tenant sent the award
    stop_ms: int | None = None  # when the tenant stopped wanting the lease
    signed_device_ms: int = 0  # the largest cumulative note countersigned so far
    signed_amount: int = 0
    signed_seq: int = -1
    #: task_id -> when its result is due at the latest (timeout + grace); see ``overdue``.
    deadlines: dict[str, int] = field(default_factory=dict)
    overdue: str | None = None  # the first task whose result did not come in time

    def task_due(self, task_id: str, deadline_ms: int) -> None:
        """A task on this lease must have its result by ``deadline_ms``.

        If it has not by then, the lease's bill stops at that instant for good: a
        provider that stalls a trial past its timeout is not paid for holding it.
        """
        self.deadlines[task_id] = deadline_ms

    def task_queued(self, task_id: str, allowed_ms: int, units: int, now_ms: int) -> None:
        """The provider says the task waits for a free unit: its clock starts later.

        Believed only while the tenant has more open tasks on the lease than units
        (otherwise a unit must be free and "queued" is a stall).
        """
        if task_id in self.deadlines and len(self.deadlines) > units:
            self.deadlines[task_id] = max(self.deadlines[task_id], now_ms + allowed_ms)

    def task_done(self, task_id: str, now_ms: int) -> None:
        self._apply_deadlines(now_ms)
        self.deadlines.pop(task_id, None)

    def _apply_deadlines(self, now_ms: int) -> None:
        for task_id, deadline in sorted(self.deadlines.items(), key=lambda kv: kv[1]):
            if deadline < now_ms:
                self.stop(deadline)
                self.overdue = self.overdue or task_id

    def stop(self, now_ms: int) -> None:
        """The tenant no longer wants the lease (release sent, trial past its timeout).

        Time after this is never paid, whatever the provider says.
        """
        if self.stop_ms is None or now_ms < self.stop_ms:
            self.stop_ms = now_ms

    def measured_ms(self, now_ms: int) -> int:
        self._apply_deadlines(now_ms)
        end = now_ms if self.stop_ms is None else min(now_ms, self.stop_ms)
        return max(0, end - self.start_ms)

    def ceiling_device_ms(self, now_ms: int) -> int:
        """The most device-ms the tenant will sign for at ``now_ms``."""
        measured = self.measured_ms(now_ms)
        return self.devices * (
            measured + measured * CLOCK_RATE_PPM // 1_000_000 + BILLING_TOLERANCE_MS
        )

    def bill_problem(self, device_ms: int, price: int, amount: int, now_ms: int) -> str | None:
        """Why a note or receipt for ``device_ms`` must not be countersigned, or None."""
        problems = []
        if price != self.price:
            problems.append(f"price {price} is not the leased {self.price}")
        if amount != amount_owed(device_ms, price):
            problems.append(f"amount {amount} is not ceil(device_ms x price / 1 h)")
        ceiling = self.ceiling_device_ms(now_ms)
        if device_ms > ceiling:
            why = (
                "" if self.overdue is None else f"; billing stopped when {self.overdue} was overdue"
            )
            problems.append(
                f"usage {device_ms} device-ms exceeds the {ceiling} the tenant measured "
                f"({self.devices} devices x {self.measured_ms(now_ms)} ms "
                f"+ {CLOCK_RATE_PPM} ppm + {BILLING_TOLERANCE_MS} ms tolerance each{why})"
            )
        return "; ".join(problems) or None

    def note_problem(
        self, seq: int, device_ms: int, price: int, amount: int, now_ms: int
    ) -> str | None:
        """Like ``bill_problem``, and a note must move forward: cumulative, never less."""
        if seq <= self.signed_seq:
            return f"note {seq} is not after the last countersigned note {self.signed_seq}"
        if device_ms < self.signed_device_ms:
            return f"cumulative usage {device_ms} is below the {self.signed_device_ms} signed"
        return self.bill_problem(device_ms, price, amount, now_ms)

    def signed(self, seq: int, device_ms: int, amount: int) -> int:
        """Record a countersigned note; return the increment now owed (micro-credits)."""
        increment = max(0, amount - self.signed_amount)
        self.signed_seq, self.signed_device_ms = seq, device_ms
        self.signed_amount = max(self.signed_amount, amount)
        return increment


class NoteState(Enum):
    NONE = "none"  # no note outstanding
    OUTSTANDING = "outstanding"  # signed by the provider, waiting for the countersignature
    LAPSED = "lapsed"  # not countersigned within the payment timeout: stop the work


@dataclass(frozen=True, slots=True)
class NoteDue:
    """The figures of the next cumulative note (the provider's node signs them)."""

    seq: int
    device_ms: int
    amount: int


@dataclass
class DebitSchedule:
    """The provider's side of one lease's settlement: when notes fall due, when they lapse."""

    devices: int
    price: int
    start_ms: int  # provider's clock, the lease start it accepted
    interval_ms: int
    timeout_ms: int
    seq: int = -1  # the last note issued
    issued_due_ms: int = 0  # when that note fell due
    issued_amount: int = 0
    paid_seq: int = -1
    paid_amount: int = 0
    paid_due_ms: int = 0  # the time the last countersigned note covered up to

    def __post_init__(self) -> None:
        if self.interval_ms <= 0 or self.timeout_ms <= 0:
            raise ValueError("interval_ms and timeout_ms must be positive")
        self.paid_due_ms = self.start_ms

    def next_due_ms(self) -> int:
        return self.start_ms + (self.seq + 2) * self.interval_ms

    def issue(self, now_ms: int) -> NoteDue | None:
        """A new cumulative note if one fell due by ``now_ms`` (covering up to now)."""
        if now_ms < self.next_due_ms():
            return None
        self.seq += 1
        self.issued_due_ms = self.start_ms + (self.seq + 1) * self.interval_ms
        device_ms = self.devices * max(0, now_ms - self.start_ms)
        self.issued_amount = amount_owed(device_ms, self.price)
        return NoteDue(self.seq, device_ms, self.issued_amount)

    def final(self, now_ms: int) -> NoteDue:
        """The closing figures when the lease ends (the receipt's, cumulative)."""
        device_ms = self.devices * max(0, now_ms - self.start_ms)
        return NoteDue(self.seq + 1, device_ms, amount_owed(device_ms, self.price))

    def countersigned(self, seq: int, amount: int, covered_ms: int) -> int:
        """Record a countersignature; return the increment it pays (micro-credits)."""
        if seq <= self.paid_seq:
            return 0
        increment = max(0, amount - self.paid_amount)
        self.paid_seq, self.paid_amount = seq, max(self.paid_amount, amount)
        self.paid_due_ms = max(self.paid_due_ms, covered_ms)
        return increment

    def state(self, now_ms: int) -> NoteState:
        """Lapsed when the oldest unpaid due time is older than the payment timeout.

        A tenant that goes silent receives no note, but the note falls due anyway: the
        lapse is counted from when it was due, not from when it was delivered.
        """
        oldest_unpaid_due = self.start_ms + (self.paid_seq + 2) * self.interval_ms
        if now_ms >= oldest_unpaid_due + self.timeout_ms:
            return NoteState.LAPSED
        return NoteState.OUTSTANDING if self.seq > self.paid_seq else NoteState.NONE

    def lapse_ms(self) -> int:
        """When the schedule lapses if nothing more is countersigned (for timers)."""
        return self.start_ms + (self.paid_seq + 2) * self.interval_ms + self.timeout_ms

    def unpaid_amount(self, now_ms: int) -> int:
        """Value of the work done and not yet countersigned (the provider's exposure)."""
        owed = amount_owed(self.devices * max(0, now_ms - self.start_ms), self.price)
        return max(0, owed - self.paid_amount)

    def max_unpaid_ms(self) -> int:
        """The bound: work past the last paid note is at most one interval plus the timeout."""
        return self.interval_ms + self.timeout_ms


def interval_problem(
    interval_ms: int,
    timeout_ms: int,
    *,
    min_interval_ms: int = MIN_DEBIT_INTERVAL_MS,
    max_interval_ms: int = MAX_DEBIT_INTERVAL_MS,
    max_timeout_ms: int = MAX_PAYMENT_TIMEOUT_MS,
) -> str | None:
    """Why a provider refuses the settlement terms an award proposes, or None."""
    if not min_interval_ms <= interval_ms <= max_interval_ms:
        return (
            f"debit interval {interval_ms} ms is outside this provider's "
            f"{min_interval_ms}..{max_interval_ms} ms"
        )
    if not MIN_PAYMENT_TIMEOUT_MS <= timeout_ms <= max_timeout_ms:
        return (
            f"payment timeout {timeout_ms} ms is outside this provider's "
            f"{MIN_PAYMENT_TIMEOUT_MS}..{max_timeout_ms} ms"
        )
    return None


@dataclass(frozen=True, slots=True)
class SettlementPolicy:
    """A provider's settlement settings (``[settlement]`` in provider.toml)."""

    min_debit_interval_ms: int = MIN_DEBIT_INTERVAL_MS
    max_debit_interval_ms: int = MAX_DEBIT_INTERVAL_MS
    max_payment_timeout_ms: int = MAX_PAYMENT_TIMEOUT_MS
    #: Most micro-credits of work one tenant may hold unpaid across its leases; 0 = none.
    max_unpaid_per_tenant: int = 0
    #: How long a lapsed note keeps its tenant's orders refused.
    lapse_memory_ms: int = 86_400_000

    def terms_problem(self, interval_ms: int, timeout_ms: int) -> str | None:
        """Why this provider declines an award's settlement terms, or None."""
        return interval_problem(
            interval_ms,
            timeout_ms,
            min_interval_ms=self.min_debit_interval_ms,
            max_interval_ms=self.max_debit_interval_ms,
            max_timeout_ms=self.max_payment_timeout_ms,
        )

    def order_problem(
        self, lapsed: int, last_lapse_ms: int, unpaid_exposure: int, now_ms: int
    ) -> str | None:
        """Why an order from this tenant is refused (no-bid ``unpaid_notes``), or None."""
        if lapsed > 0 and now_ms - last_lapse_ms < self.lapse_memory_ms:
            return (
                f"{lapsed} debit note(s) from this tenant lapsed unpaid, the last "
                f"{(now_ms - last_lapse_ms) // 1000} s ago"
            )
        if self.max_unpaid_per_tenant and unpaid_exposure >= self.max_unpaid_per_tenant:
            return (
                f"unpaid work of {unpaid_exposure} micro-credits reaches this provider's "
                f"limit of {self.max_unpaid_per_tenant} per tenant"
            )
        return None
