"""The Slurm executor against a real Slurm (issue 18).

A one-node cluster on this host (deploy/slurm/local-cluster.sh: munged, slurmctld and
slurmd as root, two fake GPUs as GRES ``gpu:sim:2``) is started once per session by the
``slurm`` fixture and stopped at the end. Without the Slurm binaries these tests skip
and say why; without root they cannot start slurmd and skip likewise.

The parsers are tested on output captured from that real Slurm 22.05
(tests/node/slurm_output/). Executor tests drive ``SlurmExecutor`` directly (as the
provider's WorkService does); the end-to-end tests run real provider daemons with
``executor = "slurm"`` and a real tenant ``mercato submit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
import yaml

from market.lifecycle import TrialState
from node.cli import localcluster as cluster
from node.config import ConfigError, SlurmSection, parse_config
from node.operator.console import print_status
from node.operator.document import StatusDocument
from node.operator.page import render_page
from node.provider.executor import TrialSpec
from node.provider.slurm import AllocationError, SlurmExecutor, SlurmTools, build_slurm_inventory
from node.provider.slurm_inventory import (
    Gres,
    parse_granted,
    parse_gres,
    parse_job_gpu_indices,
    parse_nodes,
    parse_squeue,
)
from node.store.job_store import JobStore, TrialRow
from node.store.node_store import Store

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "deploy" / "slurm" / "local-cluster.sh"
CAPTURED = Path(__file__).parents[1] / "slurm_output"
NODE = "mercato-node0"


# --- parsing captured output (no Slurm needed) ----------------------------------------


class TestParsing:
    def test_a_mixed_node_with_two_typed_gpus(self) -> None:
        [node] = parse_nodes((CAPTURED / "node_mixed.txt").read_text())
        assert node.name == NODE
        assert node.cpus == 8
        assert node.cpus_alloc == 1
        assert node.gres == (Gres("gpu", "sim", 2),)
        assert node.partitions == ("mercato",)
        assert node.available
        assert node.condition == "mixed"

    def test_a_drained_node_is_unavailable_and_keeps_its_reason_with_spaces(self) -> None:
        [node] = parse_nodes((CAPTURED / "node_drained.txt").read_text())
        assert node.state == "IDLE+DRAIN"
        assert not node.available
        assert node.condition == "drained"
        assert node.reason.startswith("disk check")

    def test_draining_while_jobs_run(self) -> None:
        [node] = parse_nodes((CAPTURED / "node_draining.txt").read_text())
        assert not node.available
        assert node.condition == "draining"

    def test_granted_gpu_indices_of_an_allocation(self) -> None:
        text = (CAPTURED / "job_running.txt").read_text()
        assert parse_job_gpu_indices(text) == {NODE: [0, 1]}

    def test_gres_lists_of_other_clusters(self) -> None:
        assert parse_gres("gpu:a100:4(S:0-1),gpu:v100:2,mps:200") == (
            Gres("gpu", "a100", 4),
            Gres("gpu", "v100", 2),
            Gres("mps", None, 200),
        )
        assert parse_gres("gpu:4") == (Gres("gpu", None, 4),)
        assert parse_gres("(null)") == ()
        assert parse_gres("gpu:a100") == (Gres("gpu", "a100", 1),)

    def test_garbage_yields_nothing_and_never_raises(self) -> None:
        assert parse_nodes("NodeName= State=\nnot slurm at all\n" + "x" * 100_000) == []
        assert parse_squeue("12|a|RUNNING\nfoo|bar|baz|q|n\n") == []
        assert parse_granted("salloc: error: Job submit/allocate failed") is None
        [node] = parse_nodes("NodeName=n1 State=FUTURE+WEIRD CPUTot=x Gres=gpu:a:b:c:d")
        assert not node.available
        assert node.cpus == 0

    def test_not_responding_and_down_nodes(self) -> None:
        [a, b] = parse_nodes("NodeName=a State=IDLE* CPUTot=4\nNodeName=b State=DOWN CPUTot=4\n")
        assert not a.available
        assert a.condition == "down"
        assert b.condition == "down"

    def test_inventory_maps_gres_types_to_catalog_models(self) -> None:
        nodes = parse_nodes(
            "NodeName=n2 State=IDLE CPUTot=64 Gres=gpu:a100:4(S:0-1) Partitions=gpu\n"
            "NodeName=n1 State=MIXED CPUTot=64 Gres=gpu:a100:2,gpu:t4:1 Partitions=gpu\n"
            "NodeName=n3 State=IDLE CPUTot=64 Gres=gpu:a100:8 Partitions=other\n"
        )
        settings = SlurmSection.model_validate(
            {
                "partition": "gpu",
                "gpus": [{"type": "a100", "model": "A100-80GB", "price_floor": 1_000_000}],
                "nodes": [
                    {"name": "n1", "interconnect": {"kind": "nvlink"}},
                    {"name": "n2", "interconnect": {"kind": "pcie", "bandwidth": 32 << 30}},
                ],
            }
        )
        inv = build_slurm_inventory(settings, nodes)
        [group] = inv.inventory.groups
        assert group.model.name == "A100-80GB"
        assert len(group.ids) == 6  # n3 is another partition; the t4 is not sold
        assert [(d.node, d.index) for d in inv.devices.values()] == [
            ("n1", 0),
            ("n1", 1),
            ("n2", 0),
            ("n2", 1),
            ("n2", 2),
            ("n2", 3),
        ]
        fabric = inv.inventory.interconnect
        assert fabric.kind == "pcie"  # the weakest declared node
        assert fabric.gang_size == 2  # a gang fits the smallest node


class TestConfig:
    def test_slurm_executor_needs_a_gpu_mapping(self) -> None:
        with pytest.raises(ConfigError, match=r"slurm\.gpus"):
            parse_config('executor = "slurm"\n')

    def test_slurm_executor_refuses_declared_devices(self) -> None:
        text = (
            'executor = "slurm"\n[slurm]\ngpus = [{ type = "a100", model = "A100-80GB", '
            'price_floor = 1 }]\n[[devices]]\nmodel = "T4"\ncount = 1\nprice_floor = 1\n'
        )
        with pytest.raises(ConfigError, match=r"remove \[\[devices\]\]"):
            parse_config(text)

    def test_an_unknown_model_in_the_mapping_is_refused_with_the_file_and_field(self) -> None:
        text = '[slurm]\ngpus = [{ type = "a100", model = "A100-800GB", price_floor = 1 }]\n'
        with pytest.raises(ConfigError, match=r"slurm\.gpus\.0\.model: .*A100-800GB"):
            parse_config(text)


class TestStatusRendering:
    DOC: ClassVar[dict[str, Any]] = {
        "executor": "slurm",
        "partition": None,
        "polled_ms": None,
        "error": "",
        "running": 1,
        "pending": 1,
        "steps": 2,
        "nodes": [
            {
                "name": "n1",
                "state": "drained",
                "slurm_state": "IDLE+DRAIN",
                "reason": "<b>fan</b>",
                "cpus": 8,
                "cpus_alloc": 2,
                "gpus_sold": 2,
            },
        ],
        "allocations": [
            {
                "lease_id": "L1",
                "job_id": 7,
                "node": "n1",
                "state": "pending",
                "reason": "Resources",
                "gpus": 2,
                "steps": 0,
            },
        ],
    }

    def test_the_page_and_the_cli_show_nodes_and_allocations(self) -> None:
        doc = StatusDocument.model_validate({"role": "provider", "cluster": self.DOC})
        page = render_page(doc)
        assert 'id="cluster-nodes"' in page
        assert "&lt;b&gt;fan&lt;/b&gt;" in page  # escaped
        assert 'data-state="pending"' in page
        from rich.console import Console

        console = Console(record=True, width=200)
        print_status(doc, console)
        text = console.export_text()
        assert "drained" in text
        assert "lease L1: Slurm job 7 on n1 pending Resources" in text


# --- a real cluster -------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running one-node Slurm cluster; yields its slurm.conf."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "srun") if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing): "
            "apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start this test cluster")
    state = tmp_path_factory.mktemp("slurm")
    done = subprocess.run(
        [str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    try:
        yield state / "slurm.conf"
    finally:
        subprocess.run([str(SCRIPT), "stop", str(state)], capture_output=True, timeout=120)


def squeue(conf: Path, *args: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%j|%T", *args],
        env={**os.environ, "SLURM_CONF": str(conf)},
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in out.stdout.splitlines() if line.strip()]


def scontrol(conf: Path, *args: str) -> str:
    out = subprocess.run(
        ["scontrol", *args],
        env={**os.environ, "SLURM_CONF": str(conf)},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def settings_for(conf: Path, **extra: object) -> SlurmSection:
    state = conf.parent
    return SlurmSection.model_validate(
        {
            "slurm_conf": str(conf),
            "partition": "mercato",
            "gpus": [{"type": "sim", "model": "T4", "price_floor": 100_000, "simulated": True}],
            "nodes": [{"name": NODE, "interconnect": {"kind": "nvlink"}}],
            "device_root": str(state / "dev"),
            "allocation_timeout_s": 2,
            "poll_s": 0.5,
            **extra,
        }
    )


@pytest.fixture
def executor(slurm: Path, tmp_path: Path) -> SlurmExecutor:
    settings = settings_for(slurm)
    tools = SlurmTools(settings)
    nodes = parse_nodes(tools.run_sync("scontrol", "show", "node", "-o").stdout)
    inv = build_slurm_inventory(settings, nodes)
    return SlurmExecutor(
        tmp_path / "sandbox",
        settings,
        tools,
        inv.devices,
        f"test{os.getpid()}x{tmp_path.name[-6:]}",
        hidden_paths=[tmp_path / "home"],
        kill_grace_s=1.0,
    )


def trial(
    tmp_path: Path, task_id: str, code: str, timeout_s: float = 60, **kw: object
) -> TrialSpec:
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    (ws / "t.py").write_text(code)
    return TrialSpec(
        task_id=task_id,
        argv=[sys.executable, "t.py"],
        workspace=ws,
        timeout_s=timeout_s,
        **kw,  # type: ignore[arg-type]
    )


def mine(conf: Path, ex: SlurmExecutor) -> list[str]:
    return [j for j in squeue(conf) if j.split("|")[1].startswith(ex.prefix)]


SHOW_DEVICES = """
import json, os
print(json.dumps({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "devs": sorted(d for d in os.listdir("/dev") if d.startswith("nvidia")),
                  "step": "SLURM_STEP_ID" in os.environ,
                  "loss": 0.5}))
"""


class TestExecutor:
    async def test_a_trial_runs_as_a_step_in_the_lease_allocation_sandboxed_on_its_gpu(
        self, executor: SlurmExecutor, slurm: Path, tmp_path: Path
    ) -> None:
        await executor.lease_open("lease-a", ["gpu0", "gpu1"])
        try:
            [job] = mine(slurm, executor)
            assert job.endswith("|RUNNING")
            spec = trial(tmp_path, "t1", SHOW_DEVICES, device_ids=["gpu1"], metric="loss")
            out = await executor.run(spec)
            log = out.log_path.read_text()
            assert out.state is TrialState.SUCCEEDED, log
            assert out.metric_value == 0.5
            granted = executor.allocations["lease-a"][0].gpu_index["gpu1"]
            assert f'"cuda": "{granted}"' in log
            assert f'"devs": ["nvidia{granted}"]' in log  # only its own GPU's device file
            assert '"step": false' in log  # bwrap cleared Slurm's environment
            executor.discard("t1")
        finally:
            await executor.lease_close("lease-a")
        assert await settled(lambda: mine(slurm, executor)) == []

    async def test_timeout_is_enforced_by_the_executor_not_slurm_minutes(
        self, executor: SlurmExecutor, slurm: Path, tmp_path: Path
    ) -> None:
        await executor.lease_open("lease-t", ["gpu0"])
        try:
            spec = trial(
                tmp_path,
                "slow",
                "import time\nprint('go', flush=True)\ntime.sleep(120)\n",
                timeout_s=1.5,
                device_ids=["gpu0"],
            )
            out = await executor.run(spec)
            assert out.state is TrialState.TIMED_OUT
            job = executor.allocations["lease-t"][0].job_id
            assert await settled(lambda: squeue(slurm, "--steps", "-j", str(job))) == []
        finally:
            await executor.lease_close("lease-t")

    async def test_cancel_stops_the_step(
        self, executor: SlurmExecutor, slurm: Path, tmp_path: Path
    ) -> None:
        await executor.lease_open("lease-c", ["gpu0"])
        try:
            spec = trial(tmp_path, "c1", "import time\ntime.sleep(120)\n", device_ids=["gpu0"])
            run = asyncio.ensure_future(executor.run(spec))
            await wait_for_step(slurm, executor, "lease-c")
            assert await executor.cancel("c1")
            out = await run
            assert out.state is TrialState.CANCELLED
        finally:
            await executor.lease_close("lease-c")
        assert await settled(lambda: mine(slurm, executor)) == []

    async def test_kill_9_of_the_step_process_fails_the_trial_and_leaves_no_step(
        self, executor: SlurmExecutor, slurm: Path, tmp_path: Path
    ) -> None:
        await executor.lease_open("lease-k", ["gpu0"])
        try:
            spec = trial(tmp_path, "k1", "import time\ntime.sleep(120)\n", device_ids=["gpu0"])
            run = asyncio.ensure_future(executor.run(spec))
            step = await wait_for_step(slurm, executor, "lease-k")
            for _ in range(200):  # the supervisor, bubblewrap and the sandbox's init
                pids = await step_pids(slurm, step)
                if len(pids) >= 3:
                    break
                await asyncio.sleep(0.1)
            assert pids
            for pid in pids:  # the in-step supervisor, bwrap and the trial
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            out = await run
            assert out.state is TrialState.FAILED, (pids, out.log_path.read_text())
            assert out.exit_code not in (0, None)
            job = executor.allocations["lease-k"][0].job_id
            assert await settled(lambda: squeue(slurm, "--steps", "-j", str(job))) == []
            assert trial_processes(tmp_path / "sandbox" / "k1") == []  # nothing escaped
            # The lease's allocation survives: the next trial runs in it.
            again = await executor.run(trial(tmp_path, "k2", "print(1)\n", device_ids=["gpu0"]))
            assert again.state is TrialState.SUCCEEDED
        finally:
            await executor.lease_close("lease-k")

    async def test_scancel_from_outside_fails_the_trial_with_the_reason_and_reallocates(
        self, executor: SlurmExecutor, slurm: Path, tmp_path: Path
    ) -> None:
        await executor.lease_open("lease-s", ["gpu0"])
        try:
            seen: list[bytes] = []
            spec = trial(tmp_path, "s1", "import time\ntime.sleep(120)\n", device_ids=["gpu0"])
            run = asyncio.ensure_future(executor.run(spec, on_output=seen.append))
            await wait_for_step(slurm, executor, "lease-s")
            job = executor.allocations["lease-s"][0].job_id
            scancel = await asyncio.create_subprocess_exec(
                "scancel", str(job), env={**os.environ, "SLURM_CONF": str(slurm)}
            )
            assert await scancel.wait() == 0
            out = await run
            assert out.state is TrialState.FAILED
            said = b"".join(seen).decode()
            assert f"Slurm allocation {job}" in said, said
            # The next trial of the lease gets a new allocation and runs.
            await executor.lease_open("lease-s", ["gpu0"])
            assert executor.allocations["lease-s"][-1].job_id != job
            again = await executor.run(trial(tmp_path, "s2", "print(1)\n", device_ids=["gpu0"]))
            assert again.state is TrialState.SUCCEEDED
        finally:
            await executor.lease_close("lease-s")
        assert await settled(lambda: mine(slurm, executor)) == []

    async def test_a_drained_node_refuses_new_allocations_with_the_reason(
        self, executor: SlurmExecutor, slurm: Path
    ) -> None:
        scontrol(slurm, "update", f"nodename={NODE}", "state=drain", "reason=maintenance")
        try:
            await executor.poll()
            assert executor.unavailable_devices() == {"gpu0", "gpu1"}
            status = executor.status()
            assert status.nodes[0].state == "drained"
            assert status.nodes[0].reason.startswith("maintenance")
            with pytest.raises(AllocationError, match="drained"):
                await executor.lease_open("lease-d", ["gpu0"])
            assert await settled(lambda: mine(slurm, executor)) == []  # withdrawn
        finally:
            scontrol(slurm, "update", f"nodename={NODE}", "state=resume")
        # Slurm may list a resumed node NOT_RESPONDING until its next ping.
        for _ in range(100):
            await executor.poll()
            if not executor.unavailable_devices():
                break
            await asyncio.sleep(0.2)
        assert executor.unavailable_devices() == set()


async def settled(listing: Callable[[], list[str]], timeout_s: float = 20) -> list[str]:
    """``listing()`` once it is empty, or as it is after ``timeout_s``: Slurm lists an
    ended job or step (COMPLETING) for a moment after it was told to end it."""
    for _ in range(int(timeout_s * 10)):
        now = listing()
        if not now:
            return now
        await asyncio.sleep(0.1)
    return listing()


def trial_processes(trial_dir: Path) -> list[int]:
    """Pids of live processes whose command line names the trial's work directory."""
    needle = str(trial_dir / "work").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes()
                stat = (proc / "stat").read_text()
                if needle in cmd and stat.rpartition(")")[2].split()[0] != "Z":
                    pids.append(int(proc.name))
    return pids


async def wait_for_step(conf: Path, ex: SlurmExecutor, lease: str) -> str:
    """The step id (J.S) of the lease's running trial, once Slurm lists it."""
    job = ex.allocations[lease][0].job_id
    for _ in range(200):
        steps = [s.split("|")[0] for s in squeue(conf, "--steps", "-j", str(job))]
        steps = [s for s in steps if not s.endswith((".extern", ".batch"))]
        # The in-step supervisor must be up before we act on the step.
        if steps and await step_pids(conf, steps[0]):
            return steps[0]
        await asyncio.sleep(0.1)
    raise AssertionError("the trial's step never appeared")


async def step_pids(conf: Path, step: str) -> list[int]:
    proc = await asyncio.create_subprocess_exec(
        "scontrol",
        "listpids",
        step,
        env={**os.environ, "SLURM_CONF": str(conf)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    stdout, _ = await proc.communicate()
    pids = []
    for line in stdout.decode().splitlines()[1:]:
        first = line.split()[0] if line.split() else ""
        if first.isdigit() and int(first) != os.getpid():
            pids.append(int(first))
    return pids


# --- end to end: real provider daemons with executor = "slurm", a real tenant ----------

JOBS = Path(__file__).parents[1] / "jobs"
DDP = ROOT / "examples" / "ddp-train"
SLURM_FLOOR = 100_000  # cheaper than the local provider, so the tenant prefers Slurm


@dataclass
class Market:
    """A bootstrap node, a local sandbox provider, and a provider fronting Slurm."""

    root: Path
    conf: Path
    boot: str
    local: cluster.NodeRecord
    slurm: cluster.NodeRecord
    proc: subprocess.Popen[bytes] | None = None

    def start_slurm_provider(self) -> None:
        self.proc = cluster._start(self.slurm)
        cluster._wait_ready(self.slurm, self.proc, time.monotonic() + 60)

    def kill_slurm_provider(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def mercato(
        self, home: Path, *args: str, timeout_s: float = 150
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MERCATO_HOME": str(home), "MERCATO_PEER": self.boot}
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def provider_status(self) -> dict[str, Any]:
        out = self.mercato(
            Path(self.slurm.home), "provider", "status", "--json", "--config", self.slurm.config
        )
        assert out.returncode == 0, out.stderr
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    def advertised_free(self) -> int | None:
        """Free devices in the slurm provider's advert, as the bootstrap's directory has it."""
        boot = cluster.cluster_root(self.root) / "bootstrap"
        out = self.mercato(boot, "provider", "status", "--json")
        assert out.returncode == 0, out.stderr
        for advert in json.loads(out.stdout)["adverts"]:
            if advert["provider"] == self.slurm.node_id:
                return sum(g["free"] for g in advert["devices"])
        return None

    def orphans(self) -> list[str]:
        return [j for j in squeue(self.conf) if j.split("|")[1].startswith("mercato-")]


def slurm_provider_config(home: Path, boot: str, conf: Path) -> str:
    return f"""detect_gpus = false
executor = "slurm"

[node]
role = "provider"
listen_host = "127.0.0.1"
listen_port = 0
home = {json.dumps(str(home))}
bootstrap = [{json.dumps(boot)}]

[gossip]
interval_s = 0.5
request_timeout_s = 2.0

[advert]
ttl_s = 6.0
refresh_fraction = 0.3

[http]
max_connections_per_peer = 512

[slurm]
slurm_conf = {json.dumps(str(conf))}
partition = "mercato"
allocation_timeout_s = 5
poll_s = 0.5
device_root = {json.dumps(str(conf.parent / "dev"))}
gpus = [{{ type = "sim", model = "sim-gpu-large", price_floor = {SLURM_FLOOR}, simulated = true }}]
nodes = [{{ name = "{NODE}", interconnect = {{ kind = "nvlink" }} }}]
"""


@pytest.fixture(scope="module")
def market(slurm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    root = tmp_path_factory.mktemp("market")
    # The other provider sells one cheaper-looking but pricier sim-gpu-large: somewhere
    # else for a sweep's retries, and too small for the two-device gang.
    nodes = cluster.up(
        1, home=root, templates=(cluster.Template("sim-gpu-large", 1, 900_000, "none"),)
    )
    boot = next(n for n in nodes if n.role == "bootstrap")
    local = next(n for n in nodes if n.role == "provider")
    home = cluster.cluster_root(root) / "provider-slurm"
    home.mkdir(parents=True)
    config = home / "provider.toml"
    config.write_text(slurm_provider_config(home, boot.address, slurm))
    rec = cluster.NodeRecord(
        name="provider-slurm", role="provider", home=str(home), config=str(config)
    )
    m = Market(root, slurm, boot.address, local, rec)
    try:
        m.start_slurm_provider()
        yield m
    finally:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.terminate()
            try:
                m.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
        cluster.down(home=root)


def sweep_job(where: Path, *, sleep: float = 0.0, steps: int = 1, retries: int = 3) -> Path:
    where.mkdir(parents=True)
    shutil.copy(JOBS / "quadratic" / "trial.py", where / "trial.py")
    spec = yaml.safe_load((JOBS / "quadratic" / "sweep.yaml").read_text())
    spec["sweep"]["parameters"]["x"] = {"values": [-1, 2]}
    spec["sweep"]["parameters"]["y"] = {"values": [-2, 0, 1]}
    spec["sweep"]["parameters"]["sleep"] = {"value": sleep}
    spec["sweep"]["parameters"]["steps"] = {"value": steps}
    spec["resources"] = {"accelerator": "sim-gpu-large"}
    spec["limits"]["retries"] = retries
    # These tests are about the executor: no canary or spot-check steps among the trials.
    spec["verify"] = False
    path = where / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trials_of(home: Path, job_id: str) -> list[TrialRow]:
    with Store(home / "tenant" / "node.sqlite") as store:
        return JobStore(store).trials(job_id)


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = 60.0) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class TestEndToEnd:
    def test_a_sweep_runs_as_slurm_steps_and_leaves_no_job_behind(
        self, market: Market, tmp_path: Path
    ) -> None:
        tenant = tmp_path / "tenant"
        out = market.mercato(
            tenant,
            "submit",
            str(sweep_job(tmp_path / "job")),
            "--quiet",
            "--json",
            "--parallel",
            "2",
        )
        assert out.returncode == 0, out.stdout + out.stderr
        summary = json.loads(out.stdout)
        assert summary["state"] == "done"
        assert summary["trials"] == {"succeeded": 6}
        best = summary["best"]
        assert best["params"]["x"] == 2
        assert best["params"]["y"] == 0
        trials = trials_of(tenant, summary["job_id"])
        on_slurm = [t for t in trials if t.provider == market.slurm.node_id]
        assert len(on_slurm) >= 3, [t.provider for t in trials]
        log = (Path(market.slurm.home) / "logs" / "node.log").read_text()
        assert "holds Slurm job" in log
        # The leases ended, so their allocations went back to Slurm.
        wait_for(lambda: market.orphans() == [] or None, "the allocations to end", 30)

    def test_a_two_process_ddp_gang_runs_in_one_allocation(
        self, market: Market, tmp_path: Path
    ) -> None:
        pytest.importorskip("torch", reason="the DDP example needs torch (the train extra)")
        job = tmp_path / "ddp"
        shutil.copytree(DDP, job)
        # The gang needs both GPUs: the previous test's lease may still be releasing.
        wait_for(lambda: market.advertised_free() == 2 or None, "an advert with 2 free")
        out = market.mercato(tmp_path / "tenant", "submit", str(job / "job.yaml"), "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        summary = json.loads(out.stdout)
        assert summary["state"] == "done"
        best = summary["best"]
        assert best["provider"] == market.slurm.node_id
        assert best["metrics"]["world_size"] == 2
        assert 0 < best["value"] < 1.0
        log = (Path(market.slurm.home) / "logs" / "node.log").read_text()
        assert re.search(r"holds Slurm job \d+ on mercato-node0 \(GPUs 0,1\)", log), log[-2000:]
        wait_for(lambda: market.orphans() == [] or None, "the allocation to end", 30)

    def test_a_drained_node_is_withdrawn_from_sale_and_shown(self, market: Market) -> None:
        scontrol(market.conf, "update", f"nodename={NODE}", "state=drain", "reason=fan failure")
        try:

            def drained() -> dict[str, Any] | None:
                doc = market.provider_status()
                nodes = doc.get("cluster", {}).get("nodes", [])
                free = [d for d in doc["devices"] if d["state"] == "free"]
                return doc if nodes and nodes[0]["state"] == "drained" and not free else None

            doc = wait_for(drained, "the provider to see the drained node")
            assert [d["state"] for d in doc["devices"]] == ["unavailable", "unavailable"]
            assert doc["cluster"]["nodes"][0]["reason"].startswith("fan failure")
            # What tenants see: the provider's advert offers nothing while it is drained.
            wait_for(lambda: market.advertised_free() == 0 or None, "an advert with 0 free")
            page = render_page(StatusDocument.model_validate(doc))
            assert "fan failure" in page
            assert 'data-state="drained"' in page
        finally:
            scontrol(market.conf, "update", f"nodename={NODE}", "state=resume")

        def back() -> bool:
            doc = market.provider_status()
            return sum(d["state"] == "free" for d in doc["devices"]) == 2

        wait_for(back, "the node's GPUs to be sold again")
        wait_for(lambda: market.advertised_free() == 2 or None, "an advert with 2 free")

    def test_provider_killed_and_restarted_while_steps_run(
        self, market: Market, tmp_path: Path
    ) -> None:
        tenant = tmp_path / "tenant"
        env = {**os.environ, "MERCATO_HOME": str(tenant), "MERCATO_PEER": market.boot}
        job = sweep_job(tmp_path / "job", sleep=4.0, steps=2)
        with (
            (tmp_path / "submit.out").open("wb") as out,
            (tmp_path / "submit.err").open("wb") as err,
        ):
            submit = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "node.cli",
                    "submit",
                    str(job),
                    "--quiet",
                    "--json",
                    "--parallel",
                    "2",
                ],
                env=env,
                stdout=out,
                stderr=err,
            )
        try:
            wait_for(
                lambda: [j for j in squeue(market.conf, "--steps") if "mercato-" in j] or None,
                "trials running as Slurm steps",
            )
            market.kill_slurm_provider()
            # The daemon's death hands its allocations back: no job outlives it.
            wait_for(
                lambda: market.orphans() == [] or None, "Slurm to end the dead provider's jobs", 30
            )
            market.start_slurm_provider()
            assert submit.wait(timeout=150) == 0, (tmp_path / "submit.err").read_text()
        finally:
            if submit.poll() is None:
                submit.kill()
                submit.wait()
        summary = json.loads((tmp_path / "submit.out").read_text())
        assert summary["trials"] == {"succeeded": 6}
        trials = trials_of(tenant, summary["job_id"])
        assert any(t.attempts >= 2 for t in trials), "no trial was caught by the kill"
        wait_for(lambda: market.orphans() == [] or None, "the allocations to end", 30)
