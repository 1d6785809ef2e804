"""Daemon configuration: a TOML file validated by pydantic.

A bad file never starts a half-configured daemon: ``load_config`` raises ConfigError
whose message names the file, each bad field (dotted path) and what was wrong.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from market.catalog import UnknownDeviceModel, lookup
from market.debit import SettlementPolicy
from node.provider.inventory import DeviceDecl, InterconnectDecl, PriceFloor
from protocol.errors import MercatoError
from protocol.messages import Address


class ConfigError(MercatoError):
    """The configuration file is missing, unparsable or invalid."""

    code = "bad_config"


def _network(value: object) -> object:
    """A client network as pydantic's IPvAnyNetwork reads one (``ipaddress.ip_network``:
    host bits set are refused), with its one clear error.

    IPvAnyNetwork itself lives in pydantic.networks, whose import every daemon would
    hold for this one field (~0.3 MB, docs/benchmarks.md "Idle provider RSS").
    """
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        return ipaddress.ip_network(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError("value is not a valid IPv4 or IPv6 network") from None


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _strip_slash(value: object) -> object:
    return value.removesuffix("/") if isinstance(value, str) else value


class NodeSection(_Section):
    """Identity and reachability."""

    role: Literal["provider", "bootstrap"] = "provider"
    listen_host: str = "127.0.0.1"
    listen_port: Annotated[int, Field(ge=0, le=65535)] = 7400  # 0 = any free port
    # The address peers use to reach this node; default http://{listen_host}:{bound port}.
    # Signed into adverts, so it must be a wire Address (docs/protocol.md, section 9).
    public_address: Annotated[Address, BeforeValidator(_strip_slash)] | None = None
    bootstrap: list[Annotated[str, Field(pattern=r"^https?://[^\s]+$")]] = []
    home: Path | None = None  # overrides MERCATO_HOME
    # Which peer addresses this node calls (adverts and peer lists are anyone's word;
    # docs/protocol.md "Addresses"). Unset: allowed when this node's own address is of
    # that class (a node on loopback calls loopback peers, e.g. the local cluster).
    allow_loopback_peers: bool | None = None
    allow_private_peers: bool | None = None


class GossipSection(_Section):
    """Discovery timing. Defaults suit a WAN; the local cluster shortens them."""

    interval_s: Annotated[float, Field(gt=0, le=3600)] = 2.0  # anti-entropy period
    fanout: Annotated[int, Field(ge=1, le=32)] = 3  # peers a new advert is pushed to
    request_timeout_s: Annotated[float, Field(gt=0, le=120)] = 3.0
    max_peer_failures: Annotated[int, Field(ge=1, le=1000)] = 3  # then the peer is dropped
    max_peers: Annotated[int, Field(ge=1, le=100_000)] = 1000


class AdvertSection(_Section):
    """How long an advert lives and when it is renewed."""

    ttl_s: Annotated[float, Field(ge=1, le=86_400)] = 60.0
    # Re-advertise after this fraction of the TTL, so a live provider never expires.
    refresh_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.4


class LimitsSection(_Section):
    """What a peer may send us."""

    max_message_bytes: Annotated[int, Field(ge=1024, le=64 << 20)] = 1 << 20
    rate_per_s: Annotated[float, Field(gt=0)] = 200.0  # per sender, sustained
    burst: Annotated[int, Field(ge=1)] = 400  # per sender, short bursts
    replay_window_s: Annotated[int, Field(ge=1, le=3600)] = 120
    clock_skew_s: Annotated[int, Field(ge=0, le=3600)] = 30


class HttpSection(_Section):
    """Bounds of the HTTP edge against slow and idle connections (node.net.edge)."""

    # A request's head must arrive within this time of the connection opening or going
    # idle (also the keep-alive timeout); a slow sender is disconnected.
    header_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    # A request's body must arrive within this time (1 MiB in 30 s is 35 KB/s).
    body_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 512  # open, in total
    max_connections_per_peer: Annotated[int, Field(ge=1, le=1_000_000)] = 64  # per IP


class MarketSection(_Section):
    """How this provider bids."""

    bid_ttl_s: Annotated[float, Field(gt=0, le=3600)] = 10.0  # how long a bid holds devices
    surge_pct: Annotated[int, Field(ge=0, le=1000)] = 50  # price rise at full utilisation
    # Share of this provider's devices one tenant identity may hold in unawarded bids
    # (bids are free to ask for): the rest stays biddable for other tenants.
    max_reserved_pct: Annotated[int, Field(ge=1, le=100)] = 50
    # Heartbeat intervals this provider accepts in an award: a lease is lost after three
    # missed heartbeats, so the maximum bounds how long a vanished tenant holds devices.
    min_heartbeat_s: Annotated[float, Field(ge=0.1, le=3600)] = 1.0
    max_heartbeat_s: Annotated[float, Field(ge=0.1, le=3600)] = 60.0

    @model_validator(mode="after")
    def _heartbeat_bounds(self) -> MarketSection:
        if self.min_heartbeat_s > self.max_heartbeat_s:
            raise ValueError("min_heartbeat_s is above max_heartbeat_s")
        return self


class SettlementSection(_Section):
    """Pay as you go (market.debit): the debit-note terms this provider accepts, and
    how much unpaid work it risks per tenant. Awards outside the bounds are declined."""

    min_debit_interval_s: Annotated[float, Field(ge=0.1, le=3600)] = 1.0
    max_debit_interval_s: Annotated[float, Field(ge=0.1, le=3600)] = 300.0
    max_payment_timeout_s: Annotated[float, Field(ge=0.1, le=3600)] = 300.0
    # Micro-credits of work one tenant may hold unpaid over all its leases; 0 = no limit.
    max_unpaid_per_tenant: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    # How long a tenant whose debit note lapsed gets no bids (no-bid unpaid_notes).
    lapse_memory_s: Annotated[int, Field(ge=0, le=365 * 86_400)] = 86_400

    @model_validator(mode="after")
    def _ordered(self) -> SettlementSection:
        if self.min_debit_interval_s > self.max_debit_interval_s:
            raise ValueError("min_debit_interval_s is above max_debit_interval_s")
        return self

    def policy(self) -> SettlementPolicy:
        return SettlementPolicy(
            min_debit_interval_ms=round(self.min_debit_interval_s * 1000),
            max_debit_interval_ms=round(self.max_debit_interval_s * 1000),
            max_payment_timeout_ms=round(self.max_payment_timeout_s * 1000),
            max_unpaid_per_tenant=self.max_unpaid_per_tenant,
            lapse_memory_ms=self.lapse_memory_s * 1000,
        )


#: A module a warm sandbox's runner may preload: a dotted Python name, nothing else.
PRELOAD_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
#: What a warm runner imports for its Python trials unless the operator says otherwise:
#: standard-library modules sweep programs commonly import (argparse and json are what
#: a trial parsing its parameters and printing a metric needs). None of them keeps a
#: state a child could share with the next: random reseeds in each forked child. shutil
#: and locale are what argparse imports on its first parser (the terminal's width, and
#: gettext's language), not at its own import: without them every trial that parses its
#: parameters imports them itself (3-4 ms of a warm trial's 11).
DEFAULT_WARM_PRELOAD = (
    "argparse",
    "json",
    "math",
    "random",
    "dataclasses",
    "pathlib",
    "logging",
    "shutil",
    "locale",
)


class SandboxSection(_Section):
    """How tenant code runs on this provider. Untrusted code is sandboxed by default."""

    # bubblewrap is required unless this is set: then trials run as plain processes with
    # limits but WITHOUT isolation from this machine (only for code you trust).
    allow_unsandboxed: bool = False
    allow_network: bool = False  # let trials that ask for it reach the network
    # Whole trial (every process of it together); see docs/operators.md for how each holds.
    trial_memory_bytes: Annotated[int, Field(gt=0)] | None = 8 << 30
    disk_bytes: Annotated[int, Field(gt=0)] | None = 10 << 30  # its work directory
    max_processes: Annotated[int, Field(gt=0)] | None = 1024  # processes and threads
    tmp_bytes: Annotated[int, Field(gt=0)] = 256 << 20  # /tmp, in RAM
    shm_bytes: Annotated[int, Field(gt=0)] = 256 << 20  # /dev/shm, in RAM
    # Per process.
    memory_bytes: Annotated[int, Field(gt=0)] | None = None  # address space (RLIMIT_AS)
    max_file_bytes: Annotated[int, Field(gt=0)] = 1 << 30  # RLIMIT_FSIZE
    open_files: Annotated[int, Field(gt=0)] = 4096  # RLIMIT_NOFILE
    cpu_seconds: Annotated[int, Field(gt=0)] | None = None  # RLIMIT_CPU per process
    max_workspace_bytes: Annotated[int, Field(gt=0)] = 256 << 20
    # When the daemon runs as root, trials run as this uid (never 0, never a login user's).
    trial_uid: Annotated[int, Field(gt=0, lt=1 << 31)] = 2_000_000_000
    # Keep one sandbox per lease slot across the lease's trials (a fresh work dir, /tmp,
    # /dev/shm and process tree per trial; see docs/operators.md); false: one per trial.
    warm: bool = True
    # Modules a warm sandbox's runner imports once, so Python trials forked from it find
    # them imported (multiprocessing's forkserver preload); see docs/operators.md.
    warm_preload: list[Annotated[str, Field(pattern=PRELOAD_NAME)]] = Field(
        default_factory=lambda: list(DEFAULT_WARM_PRELOAD), max_length=256
    )


class WorkspacesSection(_Section):
    """How much of this provider's disk tenants' workspaces may take, and for how long.

    Workspaces belong to the tenant that uploaded them (another tenant with the same
    hash uploads its own copy). Both budgets count an upload at its declared size from
    its first chunk; workspaces not in use (no queued or running task, no live lease
    they were uploaded or used under) are evicted, oldest use first, when a new one
    needs room, and expire after ``ttl_s``; unfinished uploads after ``partial_ttl_s``.
    """

    max_files: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000  # entries per workspace
    disk_bytes: Annotated[int, Field(gt=0)] = 8 << 30  # all tenants together
    tenant_bytes: Annotated[int, Field(gt=0)] = 2 << 30  # one tenant
    ttl_s: Annotated[float, Field(gt=0)] = 6 * 3600.0  # an unused workspace is removed after
    partial_ttl_s: Annotated[float, Field(gt=0)] = 600.0  # an upload left unfinished


class StatusSection(_Section):
    """The operator endpoints: status page (GET /), /status.json, POST /control/prices."""

    # Client networks allowed to use them. The page shows tenants' commands and metrics,
    # so by default only this host; /control/prices also needs the node's own signature.
    allow_from: list[Network] = [
        ipaddress.IPv4Network("127.0.0.0/8"),
        ipaddress.IPv6Network("::1/128"),
    ]
    refresh_s: Annotated[int, Field(ge=0, le=3600)] = 5  # page reload period; 0 = never


class SlurmGpuModel(_Section):
    """``[[slurm.gpus]]``: which catalog model a Slurm GRES type is sold as, and at what floor."""

    type: Annotated[str, Field(pattern=r"^(\*|[A-Za-z0-9_.-]{1,64})$")]  # "*": untyped / any
    model: str  # a catalog model name or alias
    price_floor: PriceFloor  # micro-credits per device-hour, or "2.50 credits"
    # No such hardware behind the GRES (test clusters, fake GPUs): advertised as simulated.
    simulated: bool = False

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        try:
            return lookup(value).name
        except UnknownDeviceModel as e:
            raise ValueError(e.reason) from None


class SlurmNodeDecl(_Section):
    """``[[slurm.nodes]]``: the fabric between one node's GPUs, as the operator knows it."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]
    interconnect: InterconnectDecl


_SLURM_CMD = Annotated[str, Field(min_length=1, max_length=4096)]


class SlurmSection(_Section):
    """``[slurm]``: the cluster this provider fronts when ``executor = "slurm"``
    (node.provider.slurm)."""

    partition: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")] | None = None
    account: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")] | None = None
    slurm_conf: Path | None = None  # passed to the tools as SLURM_CONF; unset: Slurm's default
    srun: _SLURM_CMD = "srun"
    salloc: _SLURM_CMD = "salloc"
    scontrol: _SLURM_CMD = "scontrol"
    scancel: _SLURM_CMD = "scancel"
    squeue: _SLURM_CMD = "squeue"
    gres_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,32}$")] = "gpu"
    gpus: Annotated[list[SlurmGpuModel], Field(max_length=64)] = []
    nodes: list[SlurmNodeDecl] = []
    cpus_per_trial: Annotated[int, Field(ge=1, le=4096)] = 1
    # How long a lease may wait for Slurm to grant its allocation (salloc --immediate).
    allocation_timeout_s: Annotated[int, Field(ge=1, le=3600)] = 30
    poll_s: Annotated[float, Field(ge=0.5, le=3600)] = 5.0  # cluster state refresh
    command_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0  # any one Slurm tool
    # Device files of the GPUs on the compute nodes: gpu_device with {index} (node-local
    # GRES index) under device_root; each trial's sandbox gets only its own.
    device_root: Path = Path("/dev")
    gpu_device: Annotated[str, Field(pattern=r"^[A-Za-z0-9_./-]*\{index\}[A-Za-z0-9_./-]*$")] = (
        "nvidia{index}"
    )


class NodeConfig(_Section):
    """The whole ``provider.toml``."""

    node: NodeSection = NodeSection()
    gossip: GossipSection = GossipSection()
    advert: AdvertSection = AdvertSection()
    limits: LimitsSection = LimitsSection()
    http: HttpSection = HttpSection()
    market: MarketSection = MarketSection()
    settlement: SettlementSection = SettlementSection()
    sandbox: SandboxSection = SandboxSection()
    workspaces: WorkspacesSection = WorkspacesSection()
    status: StatusSection = StatusSection()
    devices: list[DeviceDecl] = []
    interconnect: InterconnectDecl | None = None
    # What runs trials: "sandbox" (bubblewrap on this host) or "slurm" (job steps on the
    # cluster described in [slurm], whose GPUs are then what is sold).
    executor: Literal["sandbox", "slurm"] = "sandbox"
    slurm: SlurmSection = SlurmSection()
    # Check declared NVIDIA devices against what NVML finds (refuses to sell phantoms).
    detect_gpus: bool = True

    @model_validator(mode="after")
    def _bootstrap_has_no_devices(self) -> NodeConfig:
        if self.node.role == "bootstrap" and self.devices:
            raise ValueError("a bootstrap node sells nothing: remove [[devices]] or set role")
        if self.executor == "slurm":
            if not self.slurm.gpus:
                raise ValueError(
                    'executor = "slurm" sells the GPUs [[slurm.gpus]] maps to catalog models: '
                    "add at least one"
                )
            if self.devices or self.interconnect is not None:
                raise ValueError(
                    'with executor = "slurm" the cluster\'s GPUs are what is sold: remove '
                    "[[devices]] and [interconnect] (use [[slurm.gpus]] and [[slurm.nodes]])"
                )
        return self


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line per problem: ``file: dotted.path: message``."""
    lines = []
    for err in error.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; see deploy/provider.example.toml)"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")  # pydantic's prefix says nothing to people
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_config(text: str, source: str = "<config>") -> NodeConfig:
    """Parse and validate TOML text."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from e
    try:
        return NodeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from e


def load_config(path: Path) -> NodeConfig:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    return parse_config(text, str(path))
