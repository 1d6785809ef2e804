"""deploy/ stays usable: what can be checked without a Docker engine or a systemd host.

The example config and every compose config parse with the daemon's own parser; the
compose file wires services to configs, volumes, ports and health checks that exist;
the image and the unit keep their hardening; the health check command works against a
real daemon; the unit passes `systemd-analyze verify` where that tool exists.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from node.config import ConfigError, NodeConfig, load_config, parse_config
from node.daemon import Daemon
from node.home import NodeHome
from node.provider.inventory import DeviceDecl, InterconnectDecl, build_inventory

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "provider.example.toml"
COMPOSE = DEPLOY / "compose.yaml"
UNIT = DEPLOY / "mercato-provider.service"
DOCKERFILE = DEPLOY / "Dockerfile"
PROMETHEUS = DEPLOY / "prometheus.yml"
NODE_SERVICES = ["bootstrap", "provider-1", "provider-2", "provider-3"]
CONTAINER_PORT = 7400

SETTING = re.compile(r"^(#\s*)?([a-z_][a-z0-9_]*)\s*=\s*(.*)$")
HEADER = re.compile(r"^\[\[?([a-z_]+)\]\]?\s*(#.*)?$")


def sections(text: str) -> dict[str, list[str]]:
    """Lines of the TOML file by section ("" = top level), commented lines included."""
    out: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            current = m[1]
            out.setdefault(current, [])
        else:
            out[current].append(line)
    return out


def settings_in(lines: list[str]) -> list[str]:
    """Names set or shown commented out (``# name = value``) in these lines."""
    return [m[2] for line in lines if (m := SETTING.match(line))]


def model_fields(name: str) -> list[str]:
    models: dict[str, type[BaseModel]] = {"devices": DeviceDecl, "interconnect": InterconnectDecl}
    if name in models:
        return list(models[name].model_fields)
    if name == "":
        return [
            f
            for f, info in NodeConfig.model_fields.items()
            if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel))
            and f not in models
        ]
    annotation = NodeConfig.model_fields[name].annotation
    assert isinstance(annotation, type)
    return list(annotation.model_fields)


def with_examples_enabled(text: str) -> str:
    """The file with every commented-out ``# name = value  # example`` line enabled
    (replacing the active line of the same name in its section)."""
    out: list[str] = []
    active: dict[str, int] = {}
    for line in text.splitlines():
        if HEADER.match(line):
            active = {}
            out.append(line)
            continue
        m = SETTING.match(line)
        if m and m[1] and "example" in m[3]:
            line = line.lstrip("#").lstrip()
        m = SETTING.match(line)
        if m and not m[1]:
            if m[2] in active:
                out[active[m[2]]] = "# (replaced by the example below)"
            active[m[2]] = len(out)
        out.append(line)
    return "\n".join(out) + "\n"


class TestExampleConfig:
    def test_parses_with_the_daemons_parser(self) -> None:
        config = load_config(EXAMPLE)
        assert config.node.role == "provider"
        assert config.devices, "the example sells something"
        build_inventory(config.devices, config.interconnect, detect=False)

    def test_every_setting_is_there_and_explained(self) -> None:
        text = EXAMPLE.read_text()
        found = sections(text)
        scalars = ("detect_gpus", "executor")  # top-level settings, not sections
        for name in ["", *(f for f in NodeConfig.model_fields if f not in scalars)]:
            assert name in found, f"no [{name}] section"
            shown = settings_in(found[name])
            missing = [f for f in model_fields(name) if f not in shown]
            assert not missing, f"[{name or 'top level'}] does not show {missing}"
        # Each setting line has a comment on it or right above it.
        lines = text.splitlines()
        for i, line in enumerate(lines):
            m = SETTING.match(line)
            if m is None or m[1]:
                continue
            explained = "#" in m[3] or (i > 0 and lines[i - 1].lstrip().startswith("#"))
            assert explained, f"line {i + 1} ({line!r}) has no comment"

    def test_shown_values_are_the_defaults(self) -> None:
        """The file says "values shown are the defaults": the code must agree."""
        config = load_config(EXAMPLE)
        defaults = NodeConfig()
        for name in ("node", "gossip", "advert", "limits", "market", "sandbox", "status"):
            assert getattr(config, name) == getattr(defaults, name), name
        assert config.detect_gpus == defaults.detect_gpus

    def test_every_example_is_valid_too(self) -> None:
        text = with_examples_enabled(EXAMPLE.read_text())
        assert "# public_address" not in text
        config = parse_config(text, "example with its examples enabled")
        assert config.node.public_address is not None
        assert config.node.bootstrap
        assert config.sandbox.memory_bytes is not None
        assert config.devices[0].fp16_flops is not None
        assert config.interconnect is not None
        assert config.interconnect.gang_size is not None
        build_inventory(config.devices, config.interconnect, detect=False)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def config_of(service: dict[str, Any]) -> Path:
    (mount,) = [v for v in service["volumes"] if v.split(":")[1] == "/etc/mercato/provider.toml"]
    source, _, mode = mount.split(":")
    assert mode == "ro"
    return (DEPLOY / source).resolve()


class TestCompose:
    def test_services_configs_and_volumes(self) -> None:
        doc = compose()
        services = doc["services"]
        assert [s for s in services if s in NODE_SERVICES] == NODE_SERVICES
        homes = []
        for name in NODE_SERVICES:
            svc = services[name]
            config = load_config(config_of(svc))
            assert config.node.role == ("bootstrap" if name == "bootstrap" else "provider")
            # Reached by its service name on the compose network, on the container port.
            assert config.node.public_address == f"http://{name}:{CONTAINER_PORT}"
            assert config.node.listen_host == "0.0.0.0"
            assert config.node.listen_port == CONTAINER_PORT
            if name != "bootstrap":
                assert config.node.bootstrap == [f"http://bootstrap:{CONTAINER_PORT}"]
                assert config.sandbox.allow_unsandboxed is False
                build_inventory(config.devices, config.interconnect, detect=config.detect_gpus)
            (home,) = [v for v in svc["volumes"] if v.endswith(":/var/lib/mercato")]
            homes.append(home.split(":")[0])
        # Each node keeps its own identity and store in its own named volume.
        assert len(set(homes)) == len(homes)
        assert set(homes) <= set(doc["volumes"])

    def test_health_checks_and_ports(self) -> None:
        services = compose()["services"]
        published = []
        for name in NODE_SERVICES:
            svc = services[name]
            assert any("/healthz" in part for part in svc["healthcheck"]["test"])
            (port,) = svc["ports"]
            host_ip, host_port, container = port.split(":")
            assert host_ip == "127.0.0.1"  # the demo is for this host's operator
            assert int(container) == CONTAINER_PORT
            published.append(host_port)
        assert len(set(published)) == len(published)
        boot = services["provider-1"]["depends_on"]["bootstrap"]
        assert boot == {"condition": "service_healthy"}

    def test_confinement(self) -> None:
        services = compose()["services"]
        for name in NODE_SERVICES:
            svc = services[name]
            assert svc["cap_drop"] == ["ALL"]
            assert "no-new-privileges:true" in svc["security_opt"]
            assert svc["read_only"] is True
            assert not svc.get("privileged")
            assert not svc.get("cap_add")
            unconfined = {o for o in svc["security_opt"] if o.endswith("=unconfined")}
            if name == "bootstrap":  # runs no tenant code: keeps Docker's defaults
                assert unconfined == set()
            else:  # exactly what bubblewrap needs inside a container
                assert unconfined == {
                    "seccomp=unconfined",
                    "apparmor=unconfined",
                    "systempaths=unconfined",
                }
                assert svc["pids_limit"] > 0

    def test_status_pages_are_open_to_the_host_only(self) -> None:
        doc = compose()
        (ipam,) = doc["networks"]["mercato"]["ipam"]["config"]
        gateway = ipaddress.ip_address(ipam["gateway"])
        subnet = ipaddress.ip_network(ipam["subnet"])
        for name in NODE_SERVICES:
            allow = load_config(config_of(doc["services"][name])).status.allow_from
            assert any(gateway in net for net in allow)
            # ...but not the other containers on the network.
            assert not any(net.overlaps(subnet) and net.num_addresses > 1 for net in allow)

    def test_build_and_monitoring_files_exist(self) -> None:
        services = compose()["services"]
        build = services["provider-1"]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        prom = services["prometheus"]
        assert prom["profiles"] == ["monitoring"]
        (mount,) = prom["volumes"]
        assert (DEPLOY / mount.split(":")[0]).resolve() == PROMETHEUS


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


class TestDockerfile:
    def test_multi_stage_non_root_with_health_check(self) -> None:
        steps = dockerfile()
        stages = [args for word, args in steps if word == "FROM"]
        assert len(stages) == 2
        assert stages[0].endswith("AS builder")
        runtime = steps[[i for i, (w, _) in enumerate(steps) if w == "FROM"][1] :]
        (user,) = [args for word, args in runtime if word == "USER"]
        assert user.split(":")[0] not in ("root", "0")
        assert any(w == "HEALTHCHECK" and "/healthz" in a for w, a in runtime)
        assert any(w == "RUN" and "bubblewrap" in a for w, a in runtime)
        entry = json.loads(dict(runtime)["ENTRYPOINT"])
        assert entry[-1] == "mercato"
        cmd = json.loads(dict(runtime)["CMD"])
        assert cmd == ["provider", "run", "--config", "/etc/mercato/provider.toml"]
        assert "MERCATO_HOME=/var/lib/mercato" in dict(runtime)["ENV"]
        assert json.loads(dict(runtime)["VOLUME"]) == ["/var/lib/mercato"]

    def test_copies_what_exists_and_the_ignore_file_lets_it_through(self) -> None:
        sources = [
            part
            for word, args in dockerfile()
            if word == "COPY" and not args.startswith("--from")
            for part in args.split()[:-1]
        ]
        assert sources
        ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert f"!{source}" in ignore, source

    async def test_health_check_command_tells_up_from_down(self, tmp_path: Path) -> None:
        """The image's HEALTHCHECK, run as Docker would, against a real daemon."""
        (check,) = [a for w, a in dockerfile() if w == "HEALTHCHECK"]
        argv = json.loads(check.split(" CMD ", 1)[1])
        assert argv[:2] == ["python", "-c"]
        config = parse_config(
            f'[node]\nrole = "bootstrap"\nlisten_port = 0\nhome = {json.dumps(str(tmp_path))}\n'
        )
        daemon = await Daemon.start(config, NodeHome(tmp_path))
        try:
            ok = await run_check(argv[2], daemon.address + "/healthz")
        finally:
            await daemon.close()
        down = await run_check(argv[2], daemon.address + "/healthz")
        assert (ok, down != 0) == (0, True)


async def run_check(code: str, url: str) -> int:
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        env={"MERCATO_HEALTHZ": url, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait()


def unit() -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


class TestSystemdUnit:
    def test_runs_the_daemon_as_a_dedicated_user(self) -> None:
        svc = unit()["Service"]
        assert svc["User"] == ["mercato"]
        assert shlex.split(svc["ExecStart"][0])[1:] == [
            *("provider", "run", "--config", "/etc/mercato/provider.toml")
        ]
        assert "MERCATO_HOME=/var/lib/mercato" in svc["Environment"]
        assert svc["Restart"] == ["on-failure"]
        assert svc["RestartSec"]
        assert int(svc["LimitNOFILE"][0]) >= 4096

    def test_hardening_that_bubblewrap_tolerates(self) -> None:
        svc = unit()["Service"]
        expected = {
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "NoNewPrivileges": "yes",
            "PrivateTmp": "yes",
            "CapabilityBoundingSet": "",
            "ReadWritePaths": "/var/lib/mercato",
        }
        for key, value in expected.items():
            assert svc.get(key) == [value], key
        # Each of these stops bwrap from building a sandbox (docs/operators.md).
        for key in (
            "RestrictNamespaces",
            "ProtectKernelTunables",
            "ProtectKernelLogs",
            "ProcSubset",
            "SystemCallFilter",
            "MemoryDenyWriteExecute",
            "PrivateUsers",
        ):
            assert key not in svc, key

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
    def test_systemd_accepts_it(self, tmp_path: Path) -> None:
        # verify also checks that ExecStart exists: point it at a binary that does.
        true = shutil.which("true")
        assert true is not None
        text = UNIT.read_text().replace("/opt/mercato/bin/mercato", true)
        path = tmp_path / UNIT.name
        path.write_text(text)
        proc = subprocess.run(
            ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
        )
        assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


class TestPrometheus:
    def test_scrapes_every_compose_node(self) -> None:
        doc = yaml.safe_load(PROMETHEUS.read_text())
        (job,) = doc["scrape_configs"]
        assert job["metrics_path"] == "/metrics"
        targets = [t for group in job["static_configs"] for t in group["targets"]]
        assert sorted(targets) == sorted(f"{s}:{CONTAINER_PORT}" for s in NODE_SERVICES)


class TestDocs:
    def test_the_operator_guide_covers_every_deploy_file(self) -> None:
        guide = (ROOT / "docs" / "operators.md").read_text()
        for path in sorted(DEPLOY.rglob("*")):
            if path.is_file():
                assert str(path.relative_to(ROOT)) in guide, path

    def test_system_packages_script_is_valid_shell(self) -> None:
        script = DEPLOY / "system-packages.sh"
        assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0


def test_the_config_error_points_at_the_example() -> None:
    """node.config tells people with a misspelt setting to look at the example."""
    with pytest.raises(ConfigError, match=re.escape("see deploy/provider.example.toml")):
        parse_config("[node]\nlisten_prot = 1\n")
