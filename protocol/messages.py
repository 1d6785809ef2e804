"""Message bodies: frozen, strict pydantic models, one per message type.

Conventions that hold for every message (docs/protocol.md repeats them):

* money is an integer number of micro-credits (1 credit = 1_000_000); prices are
  micro-credits per device-hour;
* times are integer milliseconds since the Unix epoch (``*_ms``), durations are
  integer milliseconds (``*_ms``) unless the name says otherwise;
* sizes and rates are integers in bytes and bytes per second; FLOP/s are integers;
* node ids are 32-character base32 strings (see protocol.identity);
* hashes are lowercase hex SHA-256 (64 characters);
* validation is strict: no coercion ("5" is not 5, 1.0 is not 1, true is not 1);
  unknown fields are rejected.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import operator
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    model_validator,
)

PROTOCOL_VERSION = 1

MAX_U63 = 2**63 - 1
#: Longest list or map a schema may allow: the codec's limit (protocol.codec.Limits), so
#: every valid message can also be received.
MAX_ITEMS = 10_000
#: Longest string in UTF-8 bytes, the codec's limit. Schema limits in characters stay at
#: a quarter of it (a character takes up to 4 bytes); longer fields count bytes instead.
MAX_STR_BYTES = 65_536


def _utf8_at_most(limit: int) -> Any:
    def check(value: str) -> str:
        size = len(value.encode("utf-8", errors="surrogatepass"))
        if size > limit:
            raise ValueError(f"{size} bytes of UTF-8 exceeds {limit} bytes")
        return value

    return AfterValidator(check)


#: A string of at most 65,536 bytes of UTF-8 (not characters: the codec counts bytes).
LongText = Annotated[str, _utf8_at_most(MAX_STR_BYTES)]

NodeId = Annotated[str, StringConstraints(pattern=r"^[a-z2-7]{32}$")]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
Text = Annotated[str, StringConstraints(max_length=1024)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]
#: A peer's base URL: scheme, host and optional port, nothing else. Requests go to
#: ``{address}/p2p``, so an address with a path, user info, query or fragment could
#: point a node's POSTs anywhere on a host (blind SSRF); those are refused here.
#: Which hosts a node will actually call (loopback, private ranges) is node policy.
ADDRESS_PATTERN = (
    r"^https?://"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # DNS name or IPv4: labels
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]{2,45}\])"  # or an IPv6 literal in brackets
    r"(?::[0-9]{1,5})?$"
)


@functools.lru_cache(maxsize=8192)
def _check_address(value: str) -> str:
    """The rules ADDRESS_RE cannot say: port 1-65535, a valid IPv6 literal.

    Memoised (a pure function of the string; errors are not kept): every peer list
    carries 50 addresses a node mostly has seen before.
    """
    host_port = value.split("://", 1)[1]
    if host_port.startswith("["):
        literal, _, rest = host_port[1:].partition("]")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise ValueError(f"{literal!r} is not an IPv6 address") from None
        port = rest.removeprefix(":")
    else:
        port = host_port.partition(":")[2]
    if port and not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return value


Address = Annotated[
    str,
    StringConstraints(max_length=250, pattern=ADDRESS_PATTERN),
    AfterValidator(_check_address),
]
MicroCredits = Annotated[int, Field(ge=0, le=MAX_U63)]
TimeMs = Annotated[int, Field(ge=0, le=MAX_U63)]
DurationMs = Annotated[int, Field(ge=0, le=MAX_U63)]
Count = Annotated[int, Field(ge=0, le=1_000_000)]
Units = Annotated[int, Field(ge=1, le=100_000)]
Seq = Annotated[int, Field(ge=0, le=MAX_U63)]
Bytes_ = Annotated[int, Field(ge=0, le=MAX_U63)]
Rate = Annotated[int, Field(ge=0, le=MAX_U63)]
Flops = Annotated[int, Field(ge=0, le=MAX_U63)]


def _metric(value: Any) -> float | int:
    # By exact type: pydantic's float accepts an int even when strict, which would turn
    # an int past 2^63 - 1 into a float instead of refusing it.
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError("a metric float must be finite")
        return value
    if type(value) is int:
        if not -(2**63) <= value <= MAX_U63:
            raise ValueError("a metric int must fit in signed 64 bits")
        return value
    raise ValueError(f"a metric is a float or an int, not {type(value).__name__}")


#: A metric a trial reported: a finite float 64, or a signed 64-bit integer
#: (-2^63 .. 2^63 - 1), kept as the type it was sent in.
Metric = Annotated[float | int, PlainValidator(_metric, json_schema_input_type=float | int)]

DeviceKind = Literal["gpu", "ipu", "cpu"]
WorkloadClass = Literal["sweep", "training", "service"]


class Body(BaseModel):
    """Base of all message bodies."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, defer_build=True)

    TYPE: ClassVar[str] = ""


class Part(BaseModel):
    """Base of nested records inside bodies."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, defer_build=True)


# --- capacity -------------------------------------------------------------------


class DeviceGroup(Part):
    """Identical devices on one provider, with their published figures and price."""

    model: Name  # catalog name, e.g. "H100-SXM", "Bow-IPU", or "sim-*" in test clusters
    kind: DeviceKind
    ids: Annotated[list[Ident], Field(min_length=1, max_length=1024)]  # concrete device ids
    free: Annotated[list[Ident], Field(max_length=1024)]  # ids not leased nor reserved
    memory_bytes: Bytes_
    fp16_flops: Flops  # dense FP16/BF16 FLOP/s per device
    memory_bandwidth: Rate  # bytes/s per device
    price_floor: MicroCredits  # per device-hour
    simulated: bool = False

    @model_validator(mode="after")
    def _free_subset(self) -> DeviceGroup:
        if not set(self.free) <= set(self.ids):
            raise ValueError("free ids must be a subset of ids")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("device ids must be unique")
        return self


class Interconnect(Part):
    """How the provider's devices talk to each other."""

    kind: Literal["nvlink", "infinity-fabric", "ipu-link", "pcie", "ethernet", "none"]
    bandwidth: Rate  # bytes/s per direction per device, inside the gang
    gang_size: Count  # devices that share this fabric
    latency_us: Count = 0


# --- discovery ------------------------------------------------------------------


class PeerInfo(Part):
    node_id: NodeId
    address: Address
    role: Literal["provider", "bootstrap", "tenant"]


class Hello(Body):
    """First contact: who I am and where I listen (tenants give no address)."""

    TYPE = "hello"
    role: Literal["provider", "bootstrap", "tenant"]
    address: Address | None
    agent: Text  # software name and version


class PeerList(Body):
    """Answer to Hello: peers the responder knows."""

    TYPE = "peer_list"
    peers: Annotated[list[PeerInfo], Field(max_length=1000)]


class Advert(Body):
    """A provider's signed statement of its capacity and prices."""

    TYPE = "advert"
    provider: NodeId  # must equal the signer's node id
    address: Address
    devices: Annotated[list[DeviceGroup], Field(min_length=1, max_length=64)]
    interconnect: Interconnect
    seq: Seq  # strictly increasing per provider; the highest wins
    expires_ms: TimeMs

    @property
    def free_units(self) -> int:
        return sum(len(g.free) for g in self.devices)


#: One packed digest record: the provider's 32 ASCII node-id bytes, then the advert's seq
#: as 8 bytes big-endian (u63, so the first of them is below 0x80).
DIGEST_RECORD = 40
MAX_DIGEST_RECORDS = 20_000
_DIGEST_RE = re.compile(rb"(?:[a-z2-7]{32}[\x00-\x7f][\x00-\xff]{7})*", re.DOTALL)


class _DigestMemo:
    """Packed digests that passed ``DirectoryRequest``'s checks, at most ``max_bytes`` of
    them (oldest forgotten first).

    The checks are a pure function of the bytes, and nodes whose directories agree send
    the same digest: every node receives one per gossip round, and checking it (one
    record per provider) grew with the directory. Only digests that passed are kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._held: dict[bytes, None] = {}
        self._size = 0

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._held

    def add(self, digest: bytes) -> None:
        if len(digest) > self.max_bytes or digest in self._held:
            return
        self._held[digest] = None
        self._size += len(digest)
        while self._size > self.max_bytes:
            old = next(iter(self._held))
            del self._held[old]
            self._size -= len(old)


#: 512 KiB in a daemon: several digests of a 2,000-provider directory (80 KB each), a
#: bounded cost next to its ~64 MB; bench/simulate.py, whose 10,000 simulated nodes
#: share one process and one 400 KB digest, raises it (``remember_checked_digests``).
_CHECKED_DIGESTS = _DigestMemo(512 << 10)


def remember_checked_digests(max_bytes: int) -> None:
    """Bound the process-wide memo of checked ``directory_request`` digests."""
    _CHECKED_DIGESTS.max_bytes = max_bytes


def pack_digest(held: Mapping[str, int]) -> bytes:
    """Pack ``provider -> seq`` as a ``directory_request`` digest (sorted by provider)."""
    return b"".join(p.encode("ascii") + s.to_bytes(8, "big") for p, s in sorted(held.items()))


def unpack_digest(packed: bytes) -> Iterator[tuple[str, int]]:
    """(provider, seq) records of a digest that ``DirectoryRequest`` validated."""
    for i in range(0, len(packed), DIGEST_RECORD):
        yield (
            packed[i : i + 32].decode("ascii"),
            int.from_bytes(packed[i + 32 : i + DIGEST_RECORD], "big"),
        )


class DirectoryRequest(Body):
    """Anti-entropy: what I hold (provider, seq); send what is newer or missing.

    ``digest`` is packed (see ``pack_digest``): one 40-byte record per held advert,
    sorted by provider without repeats. Packed rather than a list of maps because every
    node sends its whole digest every gossip round: a list of N maps costs the sender
    and the receiver O(N) objects to build, encode, decode and validate each time.
    """

    TYPE = "directory_request"
    digest: bytes
    limit: Annotated[int, Field(ge=1, le=2000)] = 500

    @model_validator(mode="after")
    def _packed(self) -> DirectoryRequest:
        d = self.digest
        if d in _CHECKED_DIGESTS:
            return self
        if len(d) % DIGEST_RECORD:
            raise ValueError(f"digest length {len(d)} is not a multiple of {DIGEST_RECORD}")
        if len(d) > MAX_DIGEST_RECORDS * DIGEST_RECORD:
            raise ValueError(f"digest holds more than {MAX_DIGEST_RECORDS} records")
        if _DIGEST_RE.fullmatch(d) is None:
            raise ValueError("digest record with a malformed node id or a seq above 2^63-1")
        ids = [d[i : i + 32] for i in range(0, len(d), DIGEST_RECORD)]
        if any(map(operator.ge, ids, ids[1:])):  # pairwise, in C
            raise ValueError("digest records not sorted by provider, or repeated")
        _CHECKED_DIGESTS.add(d)
        return self


class Directory(Body):
    """Sealed Advert envelopes, verbatim as their providers signed them."""

    TYPE = "directory"
    adverts: Annotated[list[bytes], Field(max_length=2000)]
    wanted: Annotated[list[NodeId], Field(max_length=MAX_ITEMS)] = []  # newer at requester
    more: bool = False  # the limit cut the answer; ask again


# --- auction --------------------------------------------------------------------


class Requirement(Part):
    """What one unit of the order needs (HTCondor-style Requirements, evaluated locally)."""

    kind: Literal["gpu", "ipu", "cpu", "any"] = "any"
    model: Name | None = None
    min_memory_bytes: Bytes_ = 0
    min_fp16_flops: Flops = 0
    devices_per_unit: Annotated[int, Field(ge=1, le=1024)] = 1
    min_interconnect: Rate = 0  # bytes/s inside the gang; 0 = any
    gang: bool = False  # all units on one provider, all or nothing


class Order(Body):
    """A tenant's call for bids."""

    TYPE = "order"
    order_id: Ident
    tenant: NodeId
    job_spec_hash: Sha256Hex
    workload: WorkloadClass
    requirement: Requirement
    units: Units
    max_price: MicroCredits  # per device-hour
    bid_deadline_ms: TimeMs
    expected_flop: Annotated[int, Field(ge=0, le=MAX_U63)] = 0  # work per unit, 0 = unknown
    lease_ms: DurationMs  # how long the tenant expects to hold the lease


class Bid(Body):
    """A provider's offer; the named devices stay reserved until ``expires_ms``."""

    TYPE = "bid"
    order_id: Ident
    bid_id: Ident
    provider: NodeId
    units: Units
    devices: Annotated[list[Ident], Field(min_length=1, max_length=MAX_ITEMS)]
    model: Name
    price: MicroCredits  # per device-hour
    expires_ms: TimeMs


NoBidReason = Literal[
    "no_matching_devices",
    "all_reserved",
    "price_below_floor",
    "gang_too_small",
    "interconnect_too_slow",
    "deadline_passed",
    "draining",
    "tenant_limit",
    "unpaid_notes",
    "other",
]


class NoBid(Body):
    TYPE = "no_bid"
    order_id: Ident
    provider: NodeId
    reason: NoBidReason
    detail: Text = ""


class Award(Body):
    """The tenant picks a bid; the provider's Accept makes the lease."""

    TYPE = "award"
    order_id: Ident
    bid_id: Ident
    lease_id: Ident
    provider: NodeId
    units: Units
    price: MicroCredits
    heartbeat_interval_ms: Annotated[int, Field(ge=100, le=3_600_000)]
    lease_end_ms: TimeMs
    # Settlement terms (market.debit): a cumulative DebitNote falls due every interval;
    # one not countersigned within the timeout ends the lease. The provider declines
    # terms outside its configured bounds.
    debit_interval_ms: Annotated[int, Field(ge=100, le=3_600_000)] = 10_000
    payment_timeout_ms: Annotated[int, Field(ge=100, le=3_600_000)] = 10_000


class Accept(Body):
    """Provider's countersignature: binds the award by the hash of its envelope."""

    TYPE = "accept"
    lease_id: Ident
    order_id: Ident
    award_hash: Sha256Hex  # SHA-256 of the Award envelope bytes
    start_ms: TimeMs


class Decline(Body):
    TYPE = "decline"
    lease_id: Ident
    order_id: Ident
    reason: Text


class Release(Body):
    """Tenant frees a bid's reservation (lost auction) or ends a lease early."""

    TYPE = "release"
    order_id: Ident
    bid_id: Ident | None = None
    lease_id: Ident | None = None
    reason: Text = ""


# --- execution ------------------------------------------------------------------


class TaskAssign(Body):
    TYPE = "task_assign"
    lease_id: Ident
    task_id: Ident
    job_spec_hash: Sha256Hex
    workspace_hash: Sha256Hex
    command: Annotated[
        list[Annotated[str, StringConstraints(max_length=4096)]],
        Field(min_length=1, max_length=256),
    ]
    env: Annotated[
        dict[str, Annotated[str, StringConstraints(max_length=4096)]], Field(max_length=256)
    ] = {}
    timeout_ms: Annotated[int, Field(ge=1, le=7 * 24 * 3_600_000)]
    max_output_bytes: Annotated[int, Field(ge=0, le=1 << 30)] = 10 << 20
    attempt: Annotated[int, Field(ge=0, le=1000)] = 0
    network: bool = False
    # Small files written into the trial's directory before it starts (e.g. params.json).
    files: Annotated[
        dict[
            Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")],
            LongText,
        ],
        Field(max_length=8),
    ] = {}


TaskState = Literal["queued", "running", "succeeded", "failed", "timed_out", "cancelled"]


class TaskStatus(Body):
    """Progress of a task, with the next piece of its log and its latest metrics."""

    TYPE = "task_status"
    lease_id: Ident
    task_id: Ident
    state: TaskState
    detail: Text = ""
    log: LongText = ""
    log_offset: Bytes_ = 0  # byte offset of the log just after ``log``
    metrics: Annotated[dict[Name, Metric], Field(max_length=256)] = {}


class TaskQuery(Body):
    """Tenant asks how a task is doing; the provider may hold the answer up to ``wait_ms``.

    The answer is a TaskStatus while the task runs or log remains past ``log_offset``,
    and the signed TaskResult once it has finished and the whole log was delivered.
    """

    TYPE = "task_query"
    lease_id: Ident
    task_id: Ident
    log_offset: Bytes_ = 0
    wait_ms: Annotated[int, Field(ge=0, le=30_000)] = 0


class WorkspaceChunk(Body):
    """One piece of a content-addressed workspace archive (tar), uploaded in order.

    An empty chunk at offset 0 asks what the provider already has (no re-upload).
    """

    TYPE = "workspace_chunk"
    lease_id: Ident
    workspace_hash: Sha256Hex  # SHA-256 of the whole archive
    offset: Bytes_
    total_size: Annotated[int, Field(ge=1, le=1 << 40)]
    data: Annotated[bytes, Field(max_length=512 * 1024)]


class WorkspaceStatus(Body):
    """How much of a workspace the provider holds; ``complete`` once hash-verified."""

    TYPE = "workspace_status"
    workspace_hash: Sha256Hex
    received: Bytes_
    complete: bool


class Usage(Part):
    """Measured usage, the basis of the receipt."""

    wall_ms: DurationMs
    cpu_ms: DurationMs
    device_ms: DurationMs  # wall time x devices held
    max_rss_bytes: Bytes_ = 0
    output_bytes: Bytes_ = 0


class TaskResult(Body):
    TYPE = "task_result"
    lease_id: Ident
    task_id: Ident
    state: TaskState
    exit_code: Annotated[int, Field(ge=-255, le=255)] | None
    metrics: Annotated[dict[Name, Metric], Field(max_length=256)] = {}
    usage: Usage
    started_ms: TimeMs
    finished_ms: TimeMs
    output_hash: Sha256Hex | None = None
    output_truncated: bool = False


class Receipt(Body):
    """Provider signs measured usage and the amount; the tenant countersigns.

    ``task_id`` and ``result_hash`` name the task a receipt pays for; both are nil in a
    receipt for a lease's held time. ``countersigns`` is nil in the provider's receipt
    and holds the SHA-256 of the provider's receipt envelope in the tenant's
    countersignature (which repeats every other field unchanged).
    """

    TYPE = "receipt"
    lease_id: Ident
    task_id: Ident | None = None
    provider: NodeId
    tenant: NodeId
    device_ms: DurationMs
    price: MicroCredits  # per device-hour
    amount: MicroCredits  # ceil(device_ms * price / 3_600_000), see market.settlement
    result_hash: Sha256Hex | None = None  # SHA-256 of the TaskResult envelope
    countersigns: Sha256Hex | None = None


class DebitNote(Body):
    """The provider's cumulative bill for a lease so far; the tenant countersigns it.

    The provider's note is the reply to a Heartbeat once a note is due (the tenant stays
    behind NAT). ``device_ms`` and ``amount`` count from the lease's start, so a later
    note supersedes every earlier one and a lost note loses nothing. ``countersigns`` is
    nil in the provider's note and holds the SHA-256 of its envelope in the tenant's
    countersignature, which repeats every other field unchanged.
    """

    TYPE = "debit_note"
    lease_id: Ident
    provider: NodeId
    tenant: NodeId
    seq: Seq
    device_ms: DurationMs  # cumulative since the lease started
    price: MicroCredits  # per device-hour
    amount: MicroCredits  # ceil(device_ms * price / 3_600_000), cumulative
    countersigns: Sha256Hex | None = None


class Heartbeat(Body):
    TYPE = "heartbeat"
    lease_id: Ident
    seq: Seq
    running: Annotated[list[Ident], Field(max_length=MAX_ITEMS)] = []


class Cancel(Body):
    TYPE = "cancel"
    lease_id: Ident
    task_id: Ident | None = None
    reason: Text = ""


# --- DiLoCo outer steps --------------------------------------------------------------

#: Largest blob (a worker's pseudo-gradient or the global parameters) one outer step may
#: carry: 2^32 bytes, a billion fp32 parameters. Providers may cap it lower.
MAX_SYNC_BLOB = 1 << 32
SyncSeq = Annotated[int, Field(ge=0, le=1_000_000)]


class SyncQuery(Body):
    """Tenant asks for the blob a DiLoCo worker handed its provider's daemon (from ``offset``).

    ``seq`` counts the worker's hand-overs: 0 is its starting parameters (it joins), then
    one pseudo-gradient per outer step. The provider may hold the answer ``wait_ms``;
    the answer is a ``sync_chunk`` or, if the worker has not handed ``seq`` over yet, a
    ``sync_status`` with ``received`` 0.
    """

    TYPE = "sync_query"
    lease_id: Ident
    task_id: Ident
    seq: SyncSeq
    offset: Bytes_ = 0
    wait_ms: Annotated[int, Field(ge=0, le=30_000)] = 0


class SyncChunk(Body):
    """One piece of an outer-step blob: worker -> tenant as the reply to ``sync_query``,
    tenant -> worker (the new global parameters) as a request, in order.

    ``blob_hash`` is the SHA-256 of the whole blob: the receiver refuses a blob whose
    bytes do not hash to it.
    """

    TYPE = "sync_chunk"
    lease_id: Ident
    task_id: Ident
    seq: SyncSeq
    blob_hash: Sha256Hex
    offset: Bytes_
    total_size: Annotated[int, Field(ge=1, le=MAX_SYNC_BLOB)]
    data: Annotated[bytes, Field(max_length=512 * 1024)]

    @model_validator(mode="after")
    def _inside(self) -> SyncChunk:
        if self.offset + len(self.data) > self.total_size:
            raise ValueError("data runs past total_size")
        return self


class SyncStatus(Body):
    """How much of an outer-step blob the receiver holds; ``complete`` once hash-verified."""

    TYPE = "sync_status"
    lease_id: Ident
    task_id: Ident
    seq: SyncSeq
    received: Bytes_
    complete: bool


# --- operator -------------------------------------------------------------------


class PriceUpdate(Body):
    """Operator to its own daemon: new price floors per device model.

    Accepted only at the daemon's ``POST /control/prices``, and only when sealed with
    the node's own key and addressed to the node; never sent to or accepted from peers.
    """

    TYPE = "price_update"
    floors: Annotated[dict[Name, MicroCredits], Field(max_length=64)] = {}  # per device-hour
    reset: bool = False  # first drop every earlier update: back to the config's floors


MESSAGE_TYPES: dict[str, type[Body]] = {
    m.TYPE: m
    for m in (
        Hello,
        PeerList,
        Advert,
        DirectoryRequest,
        Directory,
        Order,
        Bid,
        NoBid,
        Award,
        Accept,
        Decline,
        Release,
        TaskAssign,
        TaskStatus,
        TaskQuery,
        TaskResult,
        WorkspaceChunk,
        WorkspaceStatus,
        Receipt,
        DebitNote,
        Heartbeat,
        Cancel,
        PriceUpdate,
        SyncQuery,
        SyncChunk,
        SyncStatus,
    )
}


def body_to_wire(body: Body) -> dict[str, Any]:
    """The body as a plain dict for the canonical codec (defaults included)."""
    return body.model_dump(mode="python")
