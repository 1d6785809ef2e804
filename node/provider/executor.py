"""The executor interface: how a provider runs one trial, whatever runs it.

A provider hands an :class:`Executor` a :class:`TrialSpec` and gets back a
:class:`TrialOutcome`. Nothing in ``market/`` or ``protocol/`` knows which executor
ran a trial, so a Kubernetes Job, a Slurm batch step or a Ray task can be added as
one more class in ``node/`` that implements the two methods below. The default is
:class:`node.provider.sandbox.SandboxExecutor` (a local process inside bubblewrap).

Contract
--------

``await executor.run(spec, on_output, on_metrics) -> TrialOutcome``
    Runs the trial to the end and always returns an outcome, also when the trial
    fails, times out or is cancelled; it raises only when the trial could not be
    started at all (a typed :class:`~protocol.errors.MercatoError`: a bad spec, a
    task id already running, network asked of an executor that forbids it, the
    sandbox missing). When ``run`` itself is cancelled (``asyncio.CancelledError``)
    the trial's processes are killed before the cancellation propagates: an
    executor never leaves a trial running that nobody waits for.

    ``on_output(data)`` is called with the trial's merged stdout and stderr in whole
    lines (a batch of lines per read, newlines included) while it is kept within
    ``spec.max_output_bytes``; ``on_metrics(values)`` with the metric values kept
    from a metrics record (never empty; see the rules below). Both are called from
    the event loop and must not block; an exception they raise is logged and does
    not stop the trial.

``await executor.cancel(task_id) -> bool``
    Stops a running trial (its whole process tree) and returns once ``run`` has
    finished with state ``cancelled``; ``False`` if no such trial was running (a
    cancel racing the trial's natural end is not an error).

Trial I/O conventions (the same on every executor)
--------------------------------------------------

* The trial starts in a fresh, writable work directory holding a copy of the
  workspace; ``HOME`` points at it. Its environment is ``spec.env`` plus what the
  executor sets, never the provider's environment.
* ``spec.device_env`` (e.g. ``CUDA_VISIBLE_DEVICES=1`` or the IPU partition
  variable ``IPUOF_VIPU_API_PARTITION_ID``) is applied last, so the tenant's env
  cannot point the trial at devices it did not lease.
* Metrics: every output line that is a JSON object is a metrics record (print it
  yourself or call :func:`mercato_trial.report`). Its numeric values become
  ``metrics`` (last value per key wins) if they pass the provider's boundary
  (:func:`metric_drop`): a name of 1-64 characters, a finite float or a signed
  64-bit int, at most ``MAX_METRIC_KEYS`` names per trial. Other numeric values
  are dropped and counted by reason in ``metrics_dropped``; strings, booleans and
  the like are annotations, not metrics. The whole object is appended to
  ``metric_history`` (up to ``MAX_METRIC_HISTORY_BYTES``). At most
  ``MAX_METRIC_RECORDS_PER_S`` records are parsed per second; the latest skipped
  one is parsed later, so the last record a trial prints always counts. Other
  lines are log lines.
* Output beyond ``max_output_bytes`` is dropped and ``output_truncated`` set; the
  trial keeps running (the timeout bounds it) and metric lines past the cap still
  update ``metrics`` and reach ``on_metrics``, so the final result of a chatty
  trial is not lost. ``metric_history`` keeps only records within the cap.
* ``exit_code`` follows the shell convention: the exit status, or 128 + N when the
  trial died of signal N. ``state`` is ``succeeded`` for exit 0, ``failed`` for any
  other end of the trial's own making, ``timed_out`` after ``spec.timeout_s`` and
  ``cancelled`` after ``cancel``; in the last two the trial first gets SIGTERM (or
  the backend's equivalent) so it can save its state, and is killed after a grace
  period, with every process it started.
* ``wall_ms`` runs from start to end; ``cpu_ms`` and ``max_rss_bytes`` are what the
  trial itself used (each backend documents how it measures them).

Adding a backend
----------------

Implement ``run`` and ``cancel`` in a new ``node/`` module, feed the bytes of the
trial's log to an :class:`OutputCollector` (so the output cap and the metrics rules
stay the same), map the backend's end states to :class:`TrialState`, and raise the
typed errors below for what cannot start. The provider picks the executor from its
configuration; nothing else changes.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from market.lifecycle import EXECUTOR_OUTCOMES, TrialState
from protocol.errors import MercatoError

logger = logging.getLogger(__name__)

#: Output lines longer than this are cut into pieces of this size and never parsed
#: as metrics; it bounds the memory one line can take.
MAX_LINE_BYTES = 64 * 1024
#: At most this many distinct metric keys are kept per trial (a result carries 256).
MAX_METRIC_KEYS = 256
#: A metric name is 1 to 64 characters (the wire's ``Name``).
MAX_METRIC_NAME = 64
#: Metric ints are signed 64-bit; floats are finite.
METRIC_INT_MIN, METRIC_INT_MAX = -(1 << 63), (1 << 63) - 1
#: ``metric_history`` keeps records whose lines add up to at most this many bytes.
MAX_METRIC_HISTORY_BYTES = 1 << 20
#: At most this many metric records are parsed per second of a trial's output (with a
#: burst of as many); the others are skipped and counted, except the latest, which is
#: parsed once the budget allows (or at the end), so a trial's last word is never lost.
MAX_METRIC_RECORDS_PER_S = 1000
DEFAULT_MAX_OUTPUT_BYTES = 8 * 1024 * 1024

OutputCallback = Callable[[bytes], None]
MetricsCallback = Callable[[dict[str, Any]], None]

_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_MAX_ENV_VARS = 256
_MAX_ARGV = 4096
_MAX_ARGV_BYTES = 1024 * 1024
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
_MAX_FILES = 64
_MAX_FILES_BYTES = 1024 * 1024


class ExecutorError(MercatoError):
    """A trial could not be started or controlled by its executor."""

    code = "executor_error"


class InvalidTrialSpecError(ExecutorError):
    """A trial spec has a bad field (id, command, environment, limits, workspace)."""

    code = "invalid_trial_spec"
    http_status = 400


class TrialAlreadyRunningError(ExecutorError):
    """A trial with this task id is already running on this executor."""

    code = "trial_already_running"
    http_status = 409


class NetworkNotAllowedError(ExecutorError):
    """The trial asks for network access and this provider does not grant it."""

    code = "network_not_allowed"
    http_status = 403


@dataclass(frozen=True, kw_only=True, slots=True)
class ResourceLimits:
    """What one trial may use; ``None`` leaves the limit off. Defaults suit strangers' code.

    Whole-trial limits (all its processes together): ``trial_memory_bytes`` (anonymous
    and shared memory, proportionally), ``disk_bytes`` (its work directory), ``max_processes``
    (processes and threads: RLIMIT_NPROC, counted per trial in the sandbox's own user
    namespace), ``tmp_bytes`` and ``shm_bytes`` (its RAM-backed ``/tmp`` and
    ``/dev/shm``). Per-process limits (setrlimit(2)): ``memory_bytes`` is address space
    (RLIMIT_AS; leave it unset for GPU trials, since CUDA reserves far more virtual
    memory than it uses), ``max_file_bytes`` (RLIMIT_FSIZE), ``open_files``
    (RLIMIT_NOFILE), ``cpu_seconds`` (RLIMIT_CPU; off by default, since the trial's
    timeout bounds its time and a multi-threaded process spends CPU seconds faster
    than wall seconds). node.provider.sandbox says how each is enforced.
    """

    memory_bytes: int | None = None
    max_processes: int | None = 1024
    max_file_bytes: int | None = 1 << 30
    cpu_seconds: int | None = None
    tmp_bytes: int | None = 256 << 20
    shm_bytes: int | None = 256 << 20
    trial_memory_bytes: int | None = 8 << 30
    disk_bytes: int | None = 10 << 30
    open_files: int | None = 4096

    def __post_init__(self) -> None:
        for name in _LIMIT_NAMES:
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise InvalidTrialSpecError(f"limit {name} must be a positive int, got {value!r}")


_LIMIT_NAMES = tuple(ResourceLimits.__dataclass_fields__)


def _check_env(what: str, env: Mapping[str, str]) -> dict[str, str]:
    if len(env) > _MAX_ENV_VARS:
        raise InvalidTrialSpecError(f"{what} has {len(env)} variables (max {_MAX_ENV_VARS})")
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise InvalidTrialSpecError(f"{what}: bad variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise InvalidTrialSpecError(f"{what}: bad value for {key}")
        out[key] = value
    return out


@dataclass(frozen=True, kw_only=True)
class TrialSpec:
    """Everything an executor needs to run one trial; invalid fields are refused here.

    ``workspace`` is the unpacked workspace (never modified: each trial works on its
    own copy). ``device_nodes`` are host device files the trial may open (e.g.
    ``/dev/nvidia0``, ``/dev/nvidiactl``); ``device_env`` assigns the leased
    ``device_ids`` to the trial and overrides ``env``. ``network`` asks for the
    host's network; the executor refuses it unless the provider allows it.
    ``metric`` names the metric the sweep optimises (reported back as
    ``TrialOutcome.metric_value``). ``files`` are small files (name -> text) written
    into the trial's own copy of the workspace, over what the workspace holds (a
    sweep's parameters file): plain names, no directories. ``warm_key`` lets an
    executor that can run consecutive trials in one kept sandbox (node.provider.sandbox)
    do so for trials with the same key (the provider uses the lease id); ``None``: a
    fresh sandbox for this trial.
    """

    task_id: str
    argv: Sequence[str]
    workspace: Path
    timeout_s: float
    env: Mapping[str, str] = field(default_factory=dict)
    device_ids: Sequence[str] = ()
    device_env: Mapping[str, str] = field(default_factory=dict)
    device_nodes: Sequence[str] = ()
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    network: bool = False
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    metric: str | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    warm_key: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not _TASK_ID.fullmatch(self.task_id):
            raise InvalidTrialSpecError(
                f"task id {self.task_id!r} must be 1-128 of [A-Za-z0-9._-], not starting with . - _"
            )
        if isinstance(self.argv, str | bytes) or not self.argv:
            raise InvalidTrialSpecError("argv must be a non-empty list of strings")
        argv = tuple(self.argv)
        if len(argv) > _MAX_ARGV or any(not isinstance(a, str) or "\0" in a for a in argv):
            raise InvalidTrialSpecError("argv must hold at most 4096 strings without NUL")
        if sum(len(a.encode()) for a in argv) > _MAX_ARGV_BYTES:
            raise InvalidTrialSpecError("argv is longer than 1 MiB")
        object.__setattr__(self, "argv", argv)
        object.__setattr__(self, "workspace", Path(self.workspace))
        object.__setattr__(self, "env", _check_env("env", self.env))
        object.__setattr__(self, "device_env", _check_env("device_env", self.device_env))
        object.__setattr__(self, "device_ids", tuple(str(d) for d in self.device_ids))
        nodes = tuple(self.device_nodes)
        for node in nodes:
            if (
                not isinstance(node, str)
                or not node.startswith("/dev/")
                or ".." in node.split("/")
                or "\0" in node
            ):
                raise InvalidTrialSpecError(f"device node {node!r} is not a path under /dev/")
        object.__setattr__(self, "device_nodes", nodes)
        timeout = self.timeout_s
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise InvalidTrialSpecError(f"timeout_s must be positive and finite, got {timeout!r}")
        cap = self.max_output_bytes
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise InvalidTrialSpecError(f"max_output_bytes must be an int >= 0, got {cap!r}")
        if not isinstance(self.limits, ResourceLimits):
            raise InvalidTrialSpecError("limits must be a ResourceLimits")
        files = dict(self.files)
        if len(files) > _MAX_FILES:
            raise InvalidTrialSpecError(f"at most {_MAX_FILES} files, got {len(files)}")
        for name, text in files.items():
            if (
                not isinstance(name, str)
                or not _FILE_NAME.fullmatch(name)
                or name in (".", "..")
                or not isinstance(text, str)
            ):
                raise InvalidTrialSpecError(f"file name {name!r} must be a plain file name")
        if sum(len(t.encode()) for t in files.values()) > _MAX_FILES_BYTES:
            raise InvalidTrialSpecError("files hold more than 1 MiB")
        object.__setattr__(self, "files", files)
        if self.warm_key is not None and (
            not isinstance(self.warm_key, str) or not _TASK_ID.fullmatch(self.warm_key)
        ):
            raise InvalidTrialSpecError(f"warm key {self.warm_key!r} is not a valid id")


@dataclass(frozen=True, kw_only=True)
class TrialOutcome:
    """How a trial ended and what it used.

    ``cpu_ms`` and ``max_rss_bytes`` come from the trial's own rusage (wait4(2)),
    so concurrent trials do not blur each other; see the executor for what it counts.
    ``log_path`` holds the output kept within the cap.
    """

    task_id: str
    state: TrialState
    exit_code: int | None
    metrics: dict[str, int | float]
    metric_history: list[dict[str, Any]]
    metric_value: int | float | None
    wall_ms: int
    cpu_ms: int
    max_rss_bytes: int
    output_bytes: int
    output_truncated: bool
    log_path: Path
    #: Metric values the trial printed that were not kept, by :class:`MetricDrop` reason.
    metrics_dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A pending or pruned trial is the tenant's word, never how a run ends.
        if self.state not in EXECUTOR_OUTCOMES:
            raise ValueError(f"{self.state} is not how a run of a trial ends")


@runtime_checkable
class Executor(Protocol):
    """Runs trials on some backend; see the module docstring for the full contract."""

    async def run(
        self,
        spec: TrialSpec,
        on_output: OutputCallback | None = None,
        on_metrics: MetricsCallback | None = None,
    ) -> TrialOutcome:
        """Run ``spec`` to its end and return its outcome."""
        ...

    async def cancel(self, task_id: str) -> bool:
        """Stop a running trial; ``False`` if it was not running."""
        ...

    def discard(self, task_id: str) -> None:
        """Free what a finished trial left behind (work dir, log) once its result shipped."""
        ...


@runtime_checkable
class LeaseAwareExecutor(Protocol):
    """An executor that holds backend resources per lease (a Slurm allocation).

    The provider calls ``lease_open`` before each trial of a lease (idempotent: the
    first call acquires, later ones return at once; a typed error if the backend
    cannot give the lease its resources, which fails the trial with that reason) and
    ``lease_close`` once the lease ends, which stops whatever still runs in it.
    """

    async def lease_open(self, lease_id: str, device_ids: Sequence[str]) -> None:
        """Hold the backend resources of this lease's devices."""
        ...

    async def lease_close(self, lease_id: str) -> None:
        """Give them back; trials still running in them end."""
        ...


@runtime_checkable
class PreparingExecutor(Protocol):
    """An executor that can set a queued trial's work dir up before the trial starts.

    The provider calls ``prepare`` for a task that waits in a lease's queue (the spec
    it will run, but for the devices, which are chosen at its start) and ``unprepare``
    when such a task is cancelled before it starts. Neither may change what the trial
    sees: the copy must be out of every running trial's reach (node.provider.sandbox).
    """

    async def prepare(self, spec: TrialSpec) -> None:
        """Copy what the trial will start with; errors are the executor's to drop."""
        ...

    async def unprepare(self, task_id: str) -> None:
        """Remove what ``prepare`` made for a trial that will not start."""
        ...


@runtime_checkable
class WarmingExecutor(Protocol):
    """An executor that can start a lease's sandboxes before its first trials come.

    The provider calls ``warm_up`` once per lease, when its workspace starts to arrive,
    with one spec per slot in the shape the lease's trials most likely have.
    """

    async def warm_up(self, specs: Sequence[TrialSpec]) -> None:
        """Start what trials like ``specs`` will run in; a wrong guess costs only that."""
        ...


def parse_metrics_line(line: bytes) -> dict[str, Any] | None:
    """The JSON object on ``line``, or ``None`` if the line is not one (a log line)."""
    text = line.strip()
    if not (text.startswith(b"{") and text.endswith(b"}")):
        return None
    try:
        obj = json.loads(text)
    # RecursionError: deeply nested input; ValueError: bad JSON or an over-long int.
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


class MetricDrop(enum.StrEnum):
    """Why a value a trial printed as a metric was not kept."""

    BAD_NAME = "bad_name"  # empty, or longer than MAX_METRIC_NAME characters
    NOT_FINITE = "not_finite"  # NaN, Infinity, -Infinity
    INT_RANGE = "int_out_of_range"  # outside signed 64 bits
    TOO_MANY_KEYS = "too_many_keys"  # a new name past MAX_METRIC_KEYS
    RATE = "rate_limited"  # a record past MAX_METRIC_RECORDS_PER_S, not the latest


def metric_drop(key: str, value: int | float) -> MetricDrop | None:
    """Why the numeric ``value`` under ``key`` may not be a metric, or ``None`` if it may.

    The provider's boundary: whatever passes fits a ``TaskResult`` (names as ``Name``,
    finite float 64, signed 64-bit ints), so no trial output can make a result invalid.
    """
    if not 1 <= len(key) <= MAX_METRIC_NAME:
        return MetricDrop.BAD_NAME
    if isinstance(value, float):
        return None if math.isfinite(value) else MetricDrop.NOT_FINITE
    return None if METRIC_INT_MIN <= value <= METRIC_INT_MAX else MetricDrop.INT_RANGE


def numeric_metrics(
    obj: Mapping[str, Any], dropped: Counter[str] | None = None
) -> dict[str, int | float]:
    """The metric values of a record: int/float (not bool) that pass :func:`metric_drop`.

    Values of other types (strings, booleans, lists, null) are annotations, not metrics,
    and are skipped silently; numeric values refused are counted in ``dropped`` by reason.
    """
    out: dict[str, int | float] = {}
    for key, value in obj.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        reason = metric_drop(key, value)
        if reason is None:
            out[key] = value
        elif dropped is not None:
            dropped[reason] += 1
    return out


class OutputCollector:
    """Turns a trial's raw output into log lines and metrics, under the output cap.

    Backend-neutral: every executor feeds it the bytes it reads, so the cap and the
    metrics rules are the same everywhere. ``log`` receives the kept lines.

    Everything here runs on the event loop for every chunk a trial prints, so the work
    per chunk is bounded: at most ``MAX_METRIC_RECORDS_PER_S`` records are parsed per
    second, ``on_metrics`` is called only for records that hold metrics, and kept keys
    and history are capped. ``dropped`` counts, by :class:`MetricDrop` reason, every
    value (or record, for ``rate_limited``) that was not kept.
    """

    def __init__(
        self,
        log: IO[bytes],
        max_output_bytes: int,
        on_output: OutputCallback | None = None,
        on_metrics: MetricsCallback | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._cap = max_output_bytes
        self._on_output = on_output
        self._on_metrics = on_metrics
        self._clock = clock
        self._pending = b""
        self._continued = False
        self._tokens = float(MAX_METRIC_RECORDS_PER_S)
        self._refilled = clock()
        self._deferred: bytes | None = None  # the latest record skipped for the rate
        self._history_bytes = 0
        self.output_bytes = 0
        self.truncated = False
        self.metrics: dict[str, int | float] = {}
        self.metric_history: list[dict[str, Any]] = []
        self.dropped: Counter[str] = Counter()

    def feed(self, data: bytes) -> None:
        """Take the next chunk of output."""
        self._refill()
        buf = self._pending + data
        if self.truncated and b"{" not in buf:
            # Past the cap only metric lines matter: skip line splitting for chunks
            # that cannot hold one, so an endless printer costs little to drain.
            newline = buf.rfind(b"\n")
            if newline >= 0:
                self._continued = False
                buf = buf[newline + 1 :]
            if len(buf) >= MAX_LINE_BYTES:
                self._continued = True
                buf = b""
            self._pending = buf
            return
        cut = buf.rfind(b"\n") + 1
        if cut:
            self._lines(buf[:cut])
        rest = buf[cut:]
        while len(rest) >= MAX_LINE_BYTES:
            # A piece of an over-long line: log text, and so is the rest of that line.
            self._continued = True
            self._keep(rest[:MAX_LINE_BYTES])
            rest = rest[MAX_LINE_BYTES:]
        self._pending = rest

    def close(self) -> None:
        """End of output: a last line without a newline still counts."""
        self._take_deferred(force=True)
        if self._pending:
            self._lines(self._pending + b"\n", newline_added=True)
            self._pending = b""
        self._take_deferred(force=True)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._refilled)
        self._refilled = now
        self._tokens = min(
            float(MAX_METRIC_RECORDS_PER_S), self._tokens + elapsed * MAX_METRIC_RECORDS_PER_S
        )
        self._take_deferred(force=False)

    def _take_deferred(self, *, force: bool) -> None:
        # The deferred record is older than anything still unread, so taking it first
        # keeps "last value wins" in print order.
        if self._deferred is not None and (force or self._tokens >= 1):
            line, self._deferred = self._deferred, None
            self._tokens -= 1
            self._record(line, history=False)

    def _keep(self, data: bytes) -> int:
        """Log what fits under the cap, in whole lines; how many bytes of ``data`` were kept."""
        if self.truncated:
            return 0
        room = self._cap - self.output_bytes
        kept = len(data) if len(data) <= room else data.rfind(b"\n", 0, room) + 1
        if kept < len(data):
            self.truncated = True
        if kept:
            self._log.write(data[:kept])
            self.output_bytes += kept
            if self._on_output is not None:
                _call(self._on_output, data[:kept])
        return kept

    def _lines(self, block: bytes, *, newline_added: bool = False) -> None:
        """Whole lines (``block`` ends with a newline): logged in one go, records parsed.

        One write and one callback per block, and a C-level scan for record lines,
        keep the per-line cost of a flood of tiny lines low on the event loop.
        """
        kept = self._keep(block[:-1] if newline_added else block)
        if newline_added and kept == len(block) - 1:
            kept += 1  # the last line was kept whole; only its newline was never printed
        # The first line may end an over-long one: log text, never a record.
        pos = block.find(b"\n") + 1 if self._continued else 0
        self._continued = False
        while self._tokens >= 1:
            m = _RECORD_LINE.search(block, pos)
            if m is None:
                return
            pos = m.end()
            if pos - m.start() <= MAX_LINE_BYTES:
                self._tokens -= 1
                self._record(m.group(1), history=pos <= kept)
        # Out of budget: only the latest record is kept for later, the others counted.
        skipped = _RECORD_LINE.findall(block, pos)
        while skipped and len(skipped[-1]) > MAX_LINE_BYTES:
            skipped.pop()
        if skipped:
            lost = len(skipped) - 1 + (self._deferred is not None)
            if lost:
                self.dropped[MetricDrop.RATE] += lost
            self._deferred = skipped[-1]

    def _record(self, line: bytes, *, history: bool) -> None:
        obj = parse_metrics_line(line)
        if obj is None:
            return
        values: dict[str, int | float] = {}
        for key, value in numeric_metrics(obj, self.dropped).items():
            if key in self.metrics or len(self.metrics) < MAX_METRIC_KEYS:
                self.metrics[key] = value
                values[key] = value
            else:
                self.dropped[MetricDrop.TOO_MANY_KEYS] += 1
        if history and self._history_bytes + len(line) <= MAX_METRIC_HISTORY_BYTES:
            self._history_bytes += len(line)
            self.metric_history.append(obj)
        if values and self._on_metrics is not None:
            _call(self._on_metrics, values)


#: A line that may be a metrics record: a JSON object, maybe padded with whitespace.
_RECORD_LINE = re.compile(rb"^[ \t\r\f\v]*(\{[^\n]*\})[ \t\r\f\v]*\n", re.MULTILINE)


def _call(callback: Callable[[Any], None], arg: Any) -> None:
    try:
        callback(arg)
    except Exception:
        # A broken consumer (say, a dropped stream to the tenant) must not kill the
        # trial the tenant is paying for; the outcome still carries everything.
        logger.exception("trial output callback failed")
