"""The Slurm executor: a provider that sells a Slurm cluster's GPUs and runs trials as steps.

``executor = "slurm"`` in the provider config, with a ``[slurm]`` section
(node.config.SlurmSection; docs/executors.md has the operator's view).

What is sold: the GPUs (GRES ``gpu``, or ``gres_name``) of the nodes of ``partition``,
read from ``scontrol show node -o`` at start (node.provider.slurm_inventory parses it). Each
GRES type maps to a catalog model through ``[[slurm.gpus]]``; device ids (``gpu0``...)
are numbered model by model, node by node, and each stands for one node-local GRES
index. The advert's interconnect is the weakest one the operator declares in
``[[slurm.nodes]]``, with the gang size of the smallest node, so a gang fits one node.

A lease holds one Slurm allocation per node its devices are on, sized to them
(``--gres=gpu:<type>:<n>``, ``cpus_per_trial`` CPUs per device). The allocation is held
by a ``salloc`` child of the daemon whose command waits on a pipe from the daemon: when
the lease ends the daemon closes the pipe, and when the daemon dies (even by SIGKILL)
the kernel closes it, so salloc relinquishes the allocation and Slurm kills every step
in it. No lease outlives its provider on the cluster. A salloc not granted within
``allocation_timeout_s`` (``--immediate``) fails the trial with Slurm's reason.

Each trial is a job step in its lease's allocation: ``srun --jobid=J --overlap`` runs
node.provider.supervisor and bubblewrap on the node exactly as
node.provider.sandbox.SandboxExecutor runs them locally (this class *is* a
SandboxExecutor: only the launcher differs), so the
sandbox, limits, output cap, metrics, cancel and the trial timeout are the same code.
The timeout is the executor's own (Slurm's ``--time`` has minute granularity and is
checked every ~30 s): SIGTERM to srun, which forwards it to the step, SIGKILL after the
grace, and ``scancel`` of the step in any case once the trial has ended. The trial's
GPUs: ``CUDA_VISIBLE_DEVICES`` the allocation's granted indices for its devices, and
only their device files (``device_root``/``gpu_device``) in its sandbox.

Requirements: the trial directories (``<home>/sandbox``) and the Python of the daemon
must be visible at the same paths on the compute nodes (a shared file system, or the
daemon running on the node), bubblewrap installed there, and steps run as the
daemon's user. ``cpu_ms`` is not measured (no accounting is assumed): it reports 0;
``max_rss_bytes`` comes from the in-step supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from market.catalog import lookup
from market.lifecycle import TrialState
from node.config import SlurmSection
from node.provider.executor import (
    ExecutorError,
    MetricsCallback,
    OutputCallback,
    TrialOutcome,
    TrialSpec,
)
from node.provider.inventory import DeviceDecl, InterconnectDecl, Inventory, build_inventory
from node.provider.sandbox import NVIDIA_CONTROL_NODES, STATUS_FILE, SandboxExecutor
from node.provider.slurm_inventory import (
    SQUEUE_FORMAT,
    QueuedJob,
    SlurmDevice,
    SlurmNode,
    devices_by_model,
    parse_job_gpu_indices,
    parse_nodes,
    parse_pending,
    parse_squeue,
)

logger = logging.getLogger(__name__)

_OUTPUT_CAP = 1 << 20  # bytes kept of one Slurm tool's stdout/stderr
_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class SlurmError(ExecutorError):
    """Slurm refused or failed a request (a tool failed, timed out, or is missing)."""

    code = "slurm_error"
    http_status = 503


class AllocationError(SlurmError):
    """Slurm did not grant a lease its allocation (node drained or down, timeout...)."""

    code = "slurm_allocation_failed"


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What one Slurm tool printed and how it exited."""

    returncode: int
    stdout: str
    stderr: str


class SlurmTools:
    """Runs Slurm's command-line tools with a timeout, SLURM_CONF and bounded output."""

    def __init__(self, settings: SlurmSection) -> None:
        self.settings = settings
        self.env: dict[str, str] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if settings.slurm_conf is not None:
            self.env["SLURM_CONF"] = str(settings.slurm_conf)
        elif "SLURM_CONF" in os.environ:
            self.env["SLURM_CONF"] = os.environ["SLURM_CONF"]
        self.paths: dict[str, str] = {}
        for tool in ("srun", "salloc", "scontrol", "scancel", "squeue"):
            configured = getattr(settings, tool)
            found = shutil.which(configured)
            if found is None:
                raise SlurmError(f"slurm.{tool}: {configured!r} not found (install slurm-client)")
            self.paths[tool] = found

    def run_sync(self, tool: str, *args: str) -> ToolResult:
        """Blocking variant, for the daemon's start (before the event loop serves)."""
        import subprocess

        try:
            done = subprocess.run(
                [self.paths[tool], *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=self.settings.command_timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SlurmError(f"{tool} {' '.join(args)}: {exc}") from exc
        return ToolResult(done.returncode, done.stdout[:_OUTPUT_CAP], done.stderr[:_OUTPUT_CAP])

    async def run(self, tool: str, *args: str, check: bool = True) -> ToolResult:
        """Run a tool to its end (killed after ``command_timeout_s``)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                self.paths[tool],
                *args,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise SlurmError(f"cannot run {tool}: {exc.strerror}") from exc
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(), timeout=self.settings.command_timeout_s
            )
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        result = ToolResult(
            proc.returncode if proc.returncode is not None else -1,
            out[:_OUTPUT_CAP].decode(errors="replace"),
            err[:_OUTPUT_CAP].decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise SlurmError(f"{tool} {' '.join(args)}: {_last_line(result.stderr)}")
        return result


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "no output"


# --- inventory ------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmInventory:
    """What the provider sells from the cluster, and which node/GPU each device id is."""

    inventory: Inventory
    devices: dict[str, SlurmDevice]  # device id -> node and node-local GPU index
    nodes: tuple[SlurmNode, ...]


def build_slurm_inventory(settings: SlurmSection, nodes: Iterable[SlurmNode]) -> SlurmInventory:
    """Device groups from the cluster's GPUs, mapped to catalog models by ``[[slurm.gpus]]``."""
    nodes = tuple(nodes)
    floors = {g.type: g for g in settings.gpus}
    by_model = devices_by_model(
        nodes,
        {g.type: g.type for g in settings.gpus},
        partition=settings.partition,
        gres_name=settings.gres_name,
    )
    decls: list[DeviceDecl] = []
    order: list[list[SlurmDevice]] = []
    for gres_type, devs in by_model.items():
        g = floors[gres_type]
        decls.append(
            DeviceDecl(
                model=g.model, count=len(devs), price_floor=g.price_floor, simulated=g.simulated
            )
        )
        order.append(devs)
    if not decls:
        where = f"partition {settings.partition}" if settings.partition else "the cluster"
        types = ", ".join(g.type for g in settings.gpus)
        raise SlurmError(
            f"{where} has no {settings.gres_name} GRES of the types in [[slurm.gpus]] ({types})"
        )
    inventory = build_inventory(decls, _fabric(settings, nodes, order), detect=False)
    devices: dict[str, SlurmDevice] = {}
    for group, devs in zip(inventory.groups, order, strict=True):
        devices.update(zip(group.ids, devs, strict=True))
    return SlurmInventory(inventory=inventory, devices=devices, nodes=nodes)


def _fabric(
    settings: SlurmSection, nodes: tuple[SlurmNode, ...], order: list[list[SlurmDevice]]
) -> InterconnectDecl:
    """The advert's fabric: the weakest declared node's, gangs no larger than one node."""
    per_node: dict[str, int] = {}
    for devs in order:
        for d in devs:
            per_node[d.node] = per_node.get(d.node, 0) + 1
    declared = {n.name: n.interconnect for n in settings.nodes}
    fabrics = [declared.get(name) for name in per_node]
    if not fabrics or any(f is None for f in fabrics) or len(order) > 1:
        # An undeclared node (or several models) gives no fabric we can vouch for.
        return InterconnectDecl(kind="none")
    known = [f for f in fabrics if f is not None]
    model = lookup(
        next(g.model for g in settings.gpus if g.type == order[0][0].gres_type or g.type == "*")
    )

    def bandwidth(f: InterconnectDecl) -> int:
        # Undeclared: the catalog's figure when the model has that fabric, else 0.
        if f.bandwidth is not None:
            return f.bandwidth
        return model.interconnect_bandwidth if model.interconnect == f.kind else 0

    weakest = min(known, key=bandwidth)
    if weakest.kind == "none":
        return InterconnectDecl(kind="none")
    return InterconnectDecl(
        kind=weakest.kind,
        bandwidth=bandwidth(weakest),
        gang_size=min(per_node.values()),
        latency_us=weakest.latency_us,
    )


def load_slurm_inventory(settings: SlurmSection) -> tuple[SlurmTools, SlurmInventory]:
    """Ask the cluster (blocking; at the daemon's start) and build what is sold."""
    tools = SlurmTools(settings)
    done = tools.run_sync("scontrol", "show", "node", "-o")
    if done.returncode != 0:
        raise SlurmError(f"scontrol show node: {_last_line(done.stderr)}")
    return tools, build_slurm_inventory(settings, parse_nodes(done.stdout))


# --- allocations ----------------------------------------------------------------------


@dataclass
class Allocation:
    """One Slurm allocation a lease holds on one node, and the salloc that holds it."""

    lease_id: str
    node: str
    name: str
    devices: tuple[str, ...]
    state: str = "pending"  # pending | running | ended
    job_id: int | None = None
    gpu_index: dict[str, int] = field(default_factory=dict)  # device id -> granted index
    holder: asyncio.subprocess.Process | None = None
    drain: asyncio.Future[None] | None = None  # reads the holder's stderr
    since: float = field(default_factory=time.time)
    reason: str = ""


@dataclass(frozen=True)
class ClusterNode:
    """One cluster node that has GPUs sold here, as Slurm last said."""

    name: str
    state: str  # idle, mixed, allocated, drained, down... (SlurmNode.condition)
    slurm_state: str  # the raw state, e.g. IDLE+DRAIN
    reason: str
    cpus: int
    cpus_alloc: int
    gpus_sold: int


@dataclass(frozen=True)
class ClusterAllocation:
    """One allocation a lease holds, with the queue's word on it when it has one."""

    lease_id: str
    job_id: int | None
    node: str
    state: str  # pending, running, ended (or squeue's state, lower case)
    reason: str
    gpus: int
    steps: int


@dataclass(frozen=True)
class ClusterStatus:
    """What the cluster behind this provider is doing (node.operator.document shows it)."""

    executor: str
    partition: str | None
    polled_ms: int | None  # the last successful poll; None before the first
    error: str  # why the last poll failed ("" when it did not)
    nodes: list[ClusterNode]
    allocations: list[ClusterAllocation]
    pending: int
    running: int
    steps: int


def _safe(text: str) -> str:
    return _NAME.sub("_", text)[:100]


class SlurmExecutor(SandboxExecutor):
    """Trials as Slurm job steps in per-lease allocations, each inside bubblewrap.

    ``devices`` maps each sold device id to its node and node-local GPU index;
    ``owner`` (the provider's node id) names its allocations, so a restarted daemon
    finds and cancels what an earlier run of it left (and nobody else's).

    No warm sandboxes: each trial is its own job step (``srun``), which Slurm accounts,
    signals and cleans up per step; a runner kept across steps would sit outside that.
    """

    supports_warm = False

    def __init__(
        self,
        root_dir: Path | str,
        settings: SlurmSection,
        tools: SlurmTools,
        devices: Mapping[str, SlurmDevice],
        owner: str,
        **sandbox: Any,
    ) -> None:
        sandbox.setdefault("device_root", settings.device_root)
        super().__init__(root_dir, **sandbox)
        self.settings = settings
        self.tools = tools
        self.devices = dict(devices)
        self.prefix = f"mercato-{_safe(owner)[:16]}-"
        self.allocations: dict[str, list[Allocation]] = {}  # lease id -> per node
        self._locks: dict[str, asyncio.Lock] = {}
        self._steps: dict[str, tuple[Allocation, str]] = {}  # task id -> (alloc, step name)
        self._cancelling: set[str] = set()  # task ids whose cancel has begun
        self.nodes: list[SlurmNode] = []
        self.queue: list[QueuedJob] = []
        self.polled_at: float | None = None
        self.poll_error = ""

    # --- leases ---------------------------------------------------------------------

    async def lease_open(self, lease_id: str, device_ids: Iterable[str]) -> None:
        """Hold an allocation for each node of the lease's devices (idempotent)."""
        lock = self._locks.setdefault(lease_id, asyncio.Lock())
        async with lock:
            held = {a.node: a for a in self.allocations.get(lease_id, []) if a.state != "ended"}
            per_node: dict[str, list[str]] = {}
            for d in device_ids:
                dev = self.devices.get(d)
                if dev is None:
                    raise SlurmError(f"device {d} is not one of this cluster's")
                per_node.setdefault(dev.node, []).append(d)
            for node, ids in sorted(per_node.items()):
                if node not in held:
                    alloc = Allocation(
                        lease_id=lease_id,
                        node=node,
                        name=f"{self.prefix}{_safe(lease_id)}",
                        devices=tuple(ids),
                    )
                    self.allocations.setdefault(lease_id, []).append(alloc)
                    try:
                        await self._allocate(alloc)
                    except BaseException:
                        alloc.state = "ended"
                        await self._release(alloc)
                        raise

    async def lease_close(self, lease_id: str) -> None:
        """Give back every allocation of the lease: its steps end with it."""
        for alloc in self.allocations.pop(lease_id, []):
            await self._release(alloc)
        self._locks.pop(lease_id, None)

    async def _allocate(self, alloc: Allocation) -> None:
        s = self.settings
        types = {self.devices[d].gres_type for d in alloc.devices}
        gres = f"{s.gres_name}:{len(alloc.devices)}"
        if len(types) == 1 and (t := types.pop()) is not None:
            gres = f"{s.gres_name}:{t}:{len(alloc.devices)}"
        args = [
            f"--immediate={s.allocation_timeout_s}",
            f"--job-name={alloc.name}",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={s.cpus_per_trial * len(alloc.devices)}",
            f"--nodelist={alloc.node}",
            f"--gres={gres}",
        ]
        if s.partition:
            args.append(f"--partition={s.partition}")
        if s.account:
            args.append(f"--account={s.account}")
        # The command runs here, not on the node: it says the job id, then waits for
        # the pipe from this daemon to close (lease end, or the daemon's death).
        holder = await asyncio.create_subprocess_exec(
            self.tools.paths["salloc"],
            *args,
            "--",
            "/bin/sh",
            "-c",
            'echo "$SLURM_JOB_ID"; exec cat >/dev/null',
            env=self.tools.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        alloc.holder = holder
        assert holder.stdout is not None
        assert holder.stderr is not None
        stderr = bytearray()

        async def read_err() -> None:
            assert holder.stderr is not None
            while line := await holder.stderr.readline():
                if len(stderr) < _OUTPUT_CAP:
                    stderr.extend(line)
                pending = parse_pending(line.decode(errors="replace"))
                if pending is not None:
                    alloc.job_id = pending
                    alloc.reason = _slurm_message(line.decode(errors="replace"))

        err_task = asyncio.ensure_future(read_err())
        try:
            line = await asyncio.wait_for(
                holder.stdout.readline(),
                timeout=s.allocation_timeout_s + s.command_timeout_s,
            )
        except TimeoutError:
            line = b""
        finally:
            if not line.strip().isdigit():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(holder.wait(), s.command_timeout_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(err_task, 1.0)
            # Stderr is read for the holder's whole life (a full pipe would block
            # salloc); the allocation owns the reader and _release ends it.
            alloc.drain = err_task
        if not line.strip().isdigit():
            why = _why_not_granted(stderr.decode(errors="replace"))
            node = next((n for n in self.nodes if n.name == alloc.node), None)
            if node is not None and not node.available:
                why = f"node {node.name} is {node.condition}" + (
                    f" ({node.reason})" if node.reason else ""
                )
            raise AllocationError(f"Slurm did not grant an allocation on {alloc.node}: {why}")
        alloc.job_id = int(line.strip())
        detail = await self.tools.run("scontrol", "show", "job", "-d", "-o", str(alloc.job_id))
        granted = parse_job_gpu_indices(detail.stdout, s.gres_name).get(alloc.node, [])
        if len(granted) < len(alloc.devices):
            raise AllocationError(
                f"job {alloc.job_id} got GPUs {granted} on {alloc.node}, "
                f"fewer than the lease's {len(alloc.devices)}"
            )
        alloc.gpu_index = dict(zip(alloc.devices, granted, strict=False))
        alloc.state = "running"
        alloc.reason = ""
        alloc.since = time.time()
        logger.info(
            "lease %s holds Slurm job %s on %s (GPUs %s)",
            alloc.lease_id,
            alloc.job_id,
            alloc.node,
            ",".join(map(str, granted)),
        )

    async def _release(self, alloc: Allocation) -> None:
        alloc.state = "ended"
        holder = alloc.holder
        if holder is not None:
            if holder.stdin is not None and not holder.stdin.is_closing():
                holder.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(holder.wait(), self.settings.command_timeout_s)
            if holder.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    holder.kill()
                await holder.wait()
        if alloc.drain is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(alloc.drain, 1.0)
            alloc.drain.cancel()
        if alloc.job_id is not None:
            with contextlib.suppress(SlurmError):
                await self.tools.run("scancel", "--quiet", str(alloc.job_id), check=False)

    def _allocation_for(self, device_ids: Iterable[str]) -> Allocation:
        ids = list(device_ids)
        for allocs in self.allocations.values():
            for alloc in allocs:
                if alloc.state == "running" and set(ids) <= set(alloc.devices):
                    return alloc
        nodes = {self.devices[d].node for d in ids if d in self.devices}
        if len(nodes) > 1:
            raise SlurmError(
                f"devices {','.join(ids)} are on {len(nodes)} nodes; a trial runs on one node"
            )
        raise SlurmError(f"no Slurm allocation holds devices {','.join(ids)}")

    # --- trials ---------------------------------------------------------------------

    async def run(
        self,
        spec: TrialSpec,
        on_output: OutputCallback | None = None,
        on_metrics: MetricsCallback | None = None,
    ) -> TrialOutcome:
        """Run ``spec`` as a step of its lease's allocation (see the module docstring)."""
        alloc = self._allocation_for(spec.device_ids)
        indices = [alloc.gpu_index[d] for d in spec.device_ids]
        nodes = [f"/dev/{self.settings.gpu_device.format(index=i)}" for i in indices]
        root = Path(self.settings.device_root)
        if indices:
            nodes += [f"/dev/{n}" for n in NVIDIA_CONTROL_NODES if (root / n).exists()]
        device_env = dict(spec.device_env)
        device_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, indices))
        step_spec = dataclasses.replace(spec, device_env=device_env, device_nodes=nodes)
        step = f"{alloc.name}-{_safe(spec.task_id)}"[:200]
        self._steps[spec.task_id] = (alloc, step)
        try:
            outcome = await super().run(step_spec, on_output, on_metrics)
        finally:
            self._steps.pop(spec.task_id, None)
            cancelled = spec.task_id in self._cancelling
            self._cancelling.discard(spec.task_id)
            with contextlib.suppress(SlurmError):
                await self._scancel_step(alloc, step)
                if not (self.root_dir / spec.task_id / STATUS_FILE).exists():
                    await self._reap_node(alloc, step, spec.task_id)
        outcome = self._trial_status(outcome)
        if cancelled:
            outcome = dataclasses.replace(outcome, state=TrialState.CANCELLED)
        if outcome.state is TrialState.FAILED:
            why = await self._allocation_gone(alloc)
            if why and on_output is not None:
                on_output(f"[mercato] {why}\n".encode())
        return outcome

    def _trial_status(self, outcome: TrialOutcome) -> TrialOutcome:
        """The trial's own exit status, as the in-step supervisor wrote it.

        srun's status is not always the trial's: when Slurm cancels the step or its
        allocation, srun can exit 0 after "Job step aborted". No status file means the
        supervisor never saw the trial end (killed with its step): never a success.
        """
        if outcome.state is not TrialState.SUCCEEDED and outcome.state is not TrialState.FAILED:
            return outcome
        path = self.root_dir / outcome.task_id / STATUS_FILE
        try:
            code: int | None = int(path.read_text().strip())
        except (OSError, ValueError):
            code = None
        if code is None:
            state = TrialState.FAILED
            code = outcome.exit_code if outcome.exit_code else 128 + signal.SIGKILL
        else:
            state = TrialState.SUCCEEDED if code == 0 else TrialState.FAILED
        return dataclasses.replace(outcome, state=state, exit_code=code)

    def _launcher(self, spec: TrialSpec) -> tuple[list[str], dict[str, str]]:
        alloc, step = self._steps[spec.task_id]
        argv = [
            self.tools.paths["srun"],
            f"--jobid={alloc.job_id}",
            "--overlap",
            "--nodes=1",
            "--ntasks=1",
            f"--nodelist={alloc.node}",
            f"--cpus-per-task={self.settings.cpus_per_trial}",
            f"--job-name={step}",
            "--input=none",
            "--quiet",
            "--kill-on-bad-exit=1",
        ]
        return argv, self.tools.env

    async def _scancel_step(self, alloc: Allocation, step: str) -> None:
        """Cancel the trial's step if anything of it is left (a no-op when it ended)."""
        if alloc.job_id is None:
            return
        steps = await self.tools.run(
            "squeue", "--steps", "-h", "-j", str(alloc.job_id), "-o", "%i|%j", check=False
        )
        for line in steps.stdout.splitlines():
            step_id, _, name = line.strip().partition("|")
            if name == step:
                await self.tools.run("scancel", "--quiet", step_id, check=False)

    async def _reap_node(self, alloc: Allocation, step: str, task_id: str) -> None:
        """Kill what is left of a trial whose supervisor did not see it end.

        Killed at the instant between its fork and bubblewrap's exec, the in-step
        supervisor leaves bubblewrap orphaned on the node: joining the trial's user
        namespace resets bubblewrap's parent-death signal, and proctrack/linuxproc
        loses a process reparented to init, so neither the kernel nor Slurm ends it.
        A one-off step kills every process naming the trial's directory (bubblewrap's
        argv binds it); the sandbox's pid namespace goes with bubblewrap. Needs the
        allocation to be alive: ``proctrack/cgroup`` makes this unnecessary.
        """
        if alloc.job_id is None or alloc.state != "running":
            return
        pattern = str(self.root_dir / task_id / "work").replace(".", "[.]")
        await self.tools.run(
            "srun",
            f"--jobid={alloc.job_id}",
            "--overlap",
            "--nodes=1",
            "--ntasks=1",
            f"--nodelist={alloc.node}",
            f"--job-name={step}-reap"[:200],
            "--quiet",
            "pkill",
            "-KILL",
            "-f",
            "--",
            pattern,
            check=False,
        )

    async def _allocation_gone(self, alloc: Allocation) -> str:
        """Why the allocation is no longer running ('' if it is), marking it ended."""
        if alloc.job_id is None:
            return ""
        q = await self.tools.run(
            "squeue", "-h", "-j", str(alloc.job_id), "-o", SQUEUE_FORMAT, check=False
        )
        jobs = [j for j in parse_squeue(q.stdout) if j.job_id == str(alloc.job_id)]
        if jobs and jobs[0].state == "RUNNING":
            return ""
        alloc.state = "ended"
        state = jobs[0].state.lower() if jobs else "gone"
        return (
            f"Slurm allocation {alloc.job_id} on {alloc.node} ended ({state}) under the trial; "
            "the next trial of this lease gets a new one"
        )

    async def cancel(self, task_id: str) -> bool:
        """SIGTERM the trial's step through Slurm, then stop it as the sandbox does."""
        entry = self._steps.get(task_id)
        if entry is None:
            return await super().cancel(task_id)
        # Recorded first: the step may end of the SIGTERM before the sandbox's own stop
        # sees the cancel, and it must still end as cancelled, not failed.
        self._cancelling.add(task_id)
        if entry[0].job_id is not None:
            alloc, step = entry
            steps = await self.tools.run(
                "squeue", "--steps", "-h", "-j", str(alloc.job_id), "-o", "%i|%j", check=False
            )
            for line in steps.stdout.splitlines():
                step_id, _, name = line.strip().partition("|")
                if name == step:
                    await self.tools.run(
                        "scancel", "--quiet", "--signal=TERM", step_id, check=False
                    )
        await super().cancel(task_id)
        return True

    # --- cluster state -------------------------------------------------------------

    async def reap_orphans(self) -> list[str]:
        """Cancel allocations an earlier run of this provider left (by name prefix)."""
        q = await self.tools.run("squeue", "-h", "-o", SQUEUE_FORMAT, check=False)
        mine = {str(a.job_id) for allocs in self.allocations.values() for a in allocs}
        stale = [
            j.job_id
            for j in parse_squeue(q.stdout)
            if j.name.startswith(self.prefix) and j.job_id not in mine
        ]
        if stale:
            logger.warning("cancelling %d Slurm jobs left by an earlier run: %s", len(stale), stale)
            await self.tools.run("scancel", "--quiet", *stale, check=False)
        return stale

    async def poll(self) -> None:
        """Refresh the nodes' states and the queue (for the status page and advert)."""
        try:
            nodes = await self.tools.run("scontrol", "show", "node", "-o")
            queue = await self.tools.run("squeue", "-h", "-o", SQUEUE_FORMAT)
        except (SlurmError, TimeoutError) as exc:
            self.poll_error = str(exc)
            return
        self.nodes = parse_nodes(nodes.stdout)
        self.queue = [j for j in parse_squeue(queue.stdout) if j.name.startswith(self.prefix)]
        self.polled_at = time.time()
        self.poll_error = ""

    def unavailable_devices(self) -> set[str]:
        """Device ids on nodes where Slurm starts no new job (drained, down...)."""
        down = {n.name for n in self.nodes if not n.available}
        return {d for d, dev in self.devices.items() if dev.node in down}

    async def watch(self, on_poll: Callable[[], None]) -> None:
        """Poll the cluster every ``poll_s`` until cancelled; ``on_poll`` after each."""
        while True:
            await self.poll()
            try:
                on_poll()
            except Exception:
                logger.exception("slurm state update failed")
            await asyncio.sleep(self.settings.poll_s)

    async def close(self) -> None:
        """Give back every allocation (the daemon is stopping)."""
        for lease_id in list(self.allocations):
            await self.lease_close(lease_id)

    def status(self) -> ClusterStatus:
        """What the cluster is doing, for the status page and ``mercato provider status``."""
        per_node: dict[str, int] = {}
        for dev in self.devices.values():
            per_node[dev.node] = per_node.get(dev.node, 0) + 1
        queue = {j.job_id: j for j in self.queue}
        allocations = []
        for allocs in self.allocations.values():
            for a in allocs:
                q = queue.get(str(a.job_id))
                allocations.append(
                    ClusterAllocation(
                        lease_id=a.lease_id,
                        node=a.node,
                        job_id=a.job_id,
                        state=(q.state.lower() if q is not None else a.state),
                        reason=(q.reason if q is not None and q.reason != "None" else a.reason),
                        gpus=len(a.devices),
                        steps=sum(1 for al, _ in self._steps.values() if al is a),
                    )
                )
        return ClusterStatus(
            executor="slurm",
            partition=self.settings.partition,
            polled_ms=int(self.polled_at * 1000) if self.polled_at else None,
            error=self.poll_error,
            nodes=[
                ClusterNode(
                    name=n.name,
                    state=n.condition,
                    slurm_state=n.state,
                    reason=n.reason,
                    cpus=n.cpus,
                    cpus_alloc=n.cpus_alloc,
                    gpus_sold=per_node.get(n.name, 0),
                )
                for n in self.nodes
                if n.name in per_node
            ],
            allocations=allocations,
            pending=sum(1 for a in allocations if a.state == "pending"),
            running=sum(1 for a in allocations if a.state == "running"),
            steps=len(self._steps),
        )


def _slurm_message(line: str) -> str:
    return line.strip().removeprefix("salloc:").strip()[:300]


def _why_not_granted(stderr: str) -> str:
    lines = [
        _slurm_message(ln)
        for ln in stderr.splitlines()
        if ln.strip() and "Pending job allocation" not in ln
    ]
    return "; ".join(lines[-2:]) if lines else "no answer from Slurm"
