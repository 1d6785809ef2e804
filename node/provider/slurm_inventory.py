"""What a Slurm cluster holds and is doing, read from its own tools' text output.

Pure parsing (no subprocess here; node.provider.slurm runs the commands): ``scontrol show node
-o`` (one node per line), ``scontrol show job -d -o`` (which GPU indices an allocation
got) and ``squeue`` with a fixed ``-o`` format. Slurm's text formats are loose: values
may hold spaces (``Reason=disk check [root@...]``, ``OS=Linux 6.1 #1 SMP``), GRES lists
nest parentheses (``gpu:a100:4(S:0-1)``), missing values print as ``(null)`` or ``N/A``.
The parsers take what they understand and skip the rest: a line they cannot read
yields no node (never a crash), and a node with a state they do not know is treated as
unavailable. Tests run them on captured output of a real Slurm 22.05
(tests/node/slurm_output/).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Node state words (the base state and the ``+FLAG`` suffixes) under which Slurm
#: starts no new job on the node (sinfo(1), "NODE STATE CODES").
UNAVAILABLE = frozenset(
    {
        "DOWN",
        "DRAIN",
        "DRAINED",
        "DRAINING",
        "FAIL",
        "FAILING",
        "FUTURE",
        "MAINTENANCE",
        "NOT_RESPONDING",
        "POWERED_DOWN",
        "POWERING_DOWN",
        "POWERING_UP",
        "REBOOT_ISSUED",
        "REBOOT_REQUESTED",
        "RESERVED",
        "UNKNOWN",
        "INVALID_REG",
        "PLANNED",
    }
)
#: States a node may be in and still take jobs.
AVAILABLE = frozenset({"IDLE", "MIXED", "ALLOCATED", "COMPLETING"})

# Keys of `scontrol show node -o` whose values may contain spaces: everything up to the
# next " Key=" belongs to them.
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")
_GRES_ITEM = re.compile(r"^([A-Za-z0-9_.-]+)(?::([A-Za-z0-9_.-]+))?(?::(\d+)[KMG]?)?(?:\(.*\))?$")
_IDX = re.compile(r"GRES=([^\s]*)")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_GRANTED = re.compile(r"Granted job allocation (\d+)")
_PENDING = re.compile(r"Pending job allocation (\d+)")
MAX_LINE = 64 * 1024  # longer lines are not Slurm's; skipped
MAX_NODES = 10_000


@dataclass(frozen=True, slots=True)
class Gres:
    """One GRES entry of a node: ``gpu:a100:4`` is name gpu, type a100, count 4."""

    name: str
    type: str | None
    count: int


@dataclass(frozen=True, slots=True)
class SlurmNode:
    """A node as ``scontrol show node`` describes it."""

    name: str
    state: str  # the raw state, e.g. IDLE+DRAIN
    cpus: int
    cpus_alloc: int
    gres: tuple[Gres, ...]
    partitions: tuple[str, ...]
    reason: str = ""

    @property
    def flags(self) -> frozenset[str]:
        """The state's words: ``IDLE+DRAIN`` -> IDLE, DRAIN; ``DOWN*`` -> DOWN, NOT_RESPONDING."""
        words = set()
        for part in self.state.upper().split("+"):
            part = part.strip()
            if part.endswith("*"):  # sinfo/scontrol: not responding
                words.add("NOT_RESPONDING")
                part = part.rstrip("*")
            if part:
                words.add(part)
        return frozenset(words)

    @property
    def available(self) -> bool:
        """Whether Slurm would start a new job here."""
        flags = self.flags
        return not (flags & UNAVAILABLE) and bool(flags & AVAILABLE)

    @property
    def condition(self) -> str:
        """One word for people: drained, draining, down, or the state in lower case."""
        flags = self.flags
        if "DRAIN" in flags or "DRAINED" in flags or "DRAINING" in flags:
            busy = flags & {"ALLOCATED", "MIXED", "COMPLETING"}
            return "draining" if busy else "drained"
        if "DOWN" in flags or "NOT_RESPONDING" in flags or "FAIL" in flags:
            return "down"
        if self.available:
            base = self.state.split("+")[0].lower()
            return base or "unknown"
        return "unavailable"

    def gpus(self, gres_name: str = "gpu") -> list[Gres]:
        """The node's GRES entries of that name (GPUs by default)."""
        return [g for g in self.gres if g.name == gres_name and g.count > 0]


def _fields(line: str) -> dict[str, str]:
    """``Key=value`` pairs of one ``-o`` line; a value runs up to the next `` Key=``."""
    out: dict[str, str] = {}
    matches = list(_KEY.finditer(line))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        out.setdefault(m.group(1), line[m.end() : end].strip())
    return out


def _int(text: str | None, default: int = 0) -> int:
    if text is None:
        return default
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 9 else default


def _null(text: str | None) -> str:
    return "" if text is None or text in ("(null)", "N/A", "none", "None") else text


def split_gres(text: str) -> list[str]:
    """Split a GRES list on the commas outside parentheses."""
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [i.strip() for i in items if i.strip()]


def parse_gres(text: str) -> tuple[Gres, ...]:
    """``gpu:a100:4(S:0-1),gpu:v100:2,mps:200`` -> Gres entries; unreadable items skipped.

    A count-less item (``gpu:a100``) counts 1, as Slurm reads it. ``(null)`` is none.
    """
    text = _null(text.strip())
    out: list[Gres] = []
    for item in split_gres(text):
        m = _GRES_ITEM.match(item)
        if m is None:
            continue
        name, second, count = m.group(1), m.group(2), m.group(3)
        gtype: str | None = second
        if count is None and second is not None and second.isdigit():
            gtype, count = None, second  # gpu:4
        n = _int(count, 1) if count is not None else 1
        if item.split("(")[0].rstrip()[-1:] in "KMG" and count is not None:
            n = 0  # a size suffix (gpu:1G) is no device count we can sell
        out.append(Gres(name=name, type=gtype, count=n))
    return tuple(out)


def parse_nodes(text: str) -> list[SlurmNode]:
    """Nodes of ``scontrol show node -o`` output (one node per line); bad lines skipped."""
    nodes: list[SlurmNode] = []
    for line in text.splitlines():
        if len(line) > MAX_LINE or not line.startswith("NodeName="):
            continue
        f = _fields(line)
        name = f.get("NodeName", "").split()[0] if f.get("NodeName") else ""
        if not name:
            continue
        nodes.append(
            SlurmNode(
                name=name,
                state=f.get("State", "UNKNOWN").split()[0] if f.get("State") else "UNKNOWN",
                cpus=_int(f.get("CPUTot")),
                cpus_alloc=_int(f.get("CPUAlloc")),
                gres=parse_gres(f.get("Gres", "")),
                partitions=tuple(p for p in _null(f.get("Partitions")).split(",") if p),
                reason=_null(f.get("Reason")),
            )
        )
        if len(nodes) >= MAX_NODES:
            break
    return nodes


def _indices(text: str) -> list[int]:
    """``0-1,3`` -> [0, 1, 3]; bounded, unreadable parts skipped."""
    out: list[int] = []
    for part in text.split(","):
        m = _RANGE.match(part.strip())
        if m is None:
            continue
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo or hi - lo > 1024:
            continue
        out.extend(range(lo, hi + 1))
    return out


def parse_job_gpu_indices(text: str, gres_name: str = "gpu") -> dict[str, list[int]]:
    """Node -> GPU indices an allocation holds, from ``scontrol show job -d -o``.

    The detail lines read ``Nodes=n1 CPU_IDs=7 Mem=0 GRES=gpu:sim:2(IDX:0-1)``; with one
    node per detail record. Indices are node-local, the order of the node's gres.conf.
    """
    out: dict[str, list[int]] = {}
    for m in re.finditer(r"Nodes=(\S+)\s+CPU_IDs=\S+\s+Mem=\S+\s+GRES=(\S*)", text):
        node = m.group(1)
        idx: list[int] = []
        for item in split_gres(m.group(2)):
            if not item.startswith(gres_name):
                continue
            inner = re.search(r"\(IDX:([^)]*)\)", item)
            if inner:
                idx.extend(_indices(inner.group(1)))
        out[node] = sorted(set(idx))
    return out


def parse_granted(stderr: str) -> int | None:
    """The job id of ``salloc: Granted job allocation N``; None if it was not granted."""
    m = _GRANTED.search(stderr)
    return int(m.group(1)) if m else None


def parse_pending(stderr: str) -> int | None:
    """The job id of ``salloc: Pending job allocation N`` (it waited for resources)."""
    m = _PENDING.search(stderr)
    return int(m.group(1)) if m else None


#: The ``squeue -o`` format this module reads: id, name, state, reason, nodes.
SQUEUE_FORMAT = "%i|%j|%T|%r|%N"


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """One line of ``squeue -h -o SQUEUE_FORMAT``."""

    job_id: str  # "12", or "12.0" for a step (squeue --steps)
    name: str
    state: str  # PENDING, RUNNING, COMPLETING...
    reason: str
    nodes: str


def parse_squeue(text: str) -> list[QueuedJob]:
    """Jobs of ``squeue -h -o SQUEUE_FORMAT``; lines that do not fit are skipped."""
    out: list[QueuedJob] = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or not re.fullmatch(r"\d+(\.\w+)?", parts[0]):
            continue
        out.append(QueuedJob(*parts))
    return out


@dataclass(frozen=True, slots=True)
class SlurmDevice:
    """One sold device: which node and node-local GPU index (or CPU slot) it is."""

    node: str
    gres_type: str | None  # None: a CPU slot
    index: int


def devices_by_model(
    nodes: Iterable[SlurmNode],
    models: Mapping[str, str],
    *,
    partition: str | None = None,
    gres_name: str = "gpu",
) -> dict[str, list[SlurmDevice]]:
    """Catalog model -> the cluster's devices of it, node by node in name order.

    ``models`` maps a GRES type (``a100``) to a catalog model; ``*`` matches a GPU
    GRES without a type, or any type not named. GPUs of an unmapped type are not sold.
    Only nodes of ``partition`` (when given) count. Indices are node-local and follow
    the node's gres.conf order across its GRES entries.
    """
    out: dict[str, list[SlurmDevice]] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        if partition and partition not in node.partitions:
            continue
        index = 0
        for g in node.gpus(gres_name):
            model = models.get(g.type or "*") or models.get("*")
            for _ in range(g.count):
                if model is not None:
                    out.setdefault(model, []).append(SlurmDevice(node.name, g.type, index))
                index += 1
    return out
