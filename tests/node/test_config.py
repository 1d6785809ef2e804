"""provider.toml: a bad file is refused with its name and the dotted field, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import ConfigError, NodeConfig, load_config, parse_config

GOOD = """
detect_gpus = false

[node]
listen_port = 0
bootstrap = ["http://127.0.0.1:7400"]

[gossip]
interval_s = 0.5

[[devices]]
model = "RTX-4090"
count = 2
price_floor = 350000
simulated = true
"""

# name -> (file text, dotted field the message must name, words it must contain)
BAD: dict[str, tuple[str, str, str]] = {
    "unknown_model": (
        GOOD.replace('"RTX-4090"', '"RTX-9090"'),
        "devices.0.model",
        "RTX-9090",
    ),
    "count_zero": (GOOD.replace("count = 2", "count = 0"), "devices.0.count", "greater than"),
    "misspelled_key": (
        GOOD.replace("interval_s", "intervl_s"),
        "gossip.intervl_s",
        "unknown setting",
    ),
    "float_price": (
        GOOD.replace("price_floor = 350000", "price_floor = 0.35"),
        "devices.0.price_floor",
        "never a float",
    ),
    "bad_toml": (GOOD.replace("[gossip]", "[gossip"), "line", "not valid TOML"),
    "bad_port": (GOOD.replace("listen_port = 0", "listen_port = 70000"), "node.listen_port", ""),
    "bootstrap_with_devices": (
        GOOD.replace("[node]", '[node]\nrole = "bootstrap"'),
        "(top level)",
        "sells nothing",
    ),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "provider.toml"
    path.write_text(text)
    return path


class TestLoadConfig:
    def test_a_good_file_loads(self, tmp_path: Path) -> None:
        config = load_config(write(tmp_path, GOOD))
        assert isinstance(config, NodeConfig)
        assert config.node.role == "provider"
        assert config.node.listen_port == 0
        assert config.gossip.interval_s == 0.5
        assert config.devices[0].model == "RTX-4090"
        assert config.devices[0].price_floor == 350_000
        assert config.detect_gpus is False

    def test_prices_may_be_written_in_credits(self) -> None:
        config = parse_config(GOOD.replace("350000", '"0.35 credits"'))
        assert config.devices[0].price_floor == 350_000
        assert type(config.devices[0].price_floor) is int

    def test_model_aliases_resolve_to_the_catalog_name(self) -> None:
        config = parse_config(GOOD.replace('"RTX-4090"', '"4090"'))
        assert config.devices[0].model == "RTX-4090"

    @pytest.mark.parametrize("case", sorted(BAD))
    def test_a_bad_file_names_the_file_and_the_field(self, tmp_path: Path, case: str) -> None:
        text, field, words = BAD[case]
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        message = info.value.reason
        assert message.startswith(f"{path}: ")
        assert field in message
        assert words in message
        assert info.value.code == "bad_config"

    def test_every_bad_field_is_listed(self, tmp_path: Path) -> None:
        text = GOOD.replace("count = 2", "count = 0").replace("interval_s", "intervl_s")
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text))
        lines = info.value.reason.splitlines()
        assert len(lines) == 2
        assert any("devices.0.count" in line for line in lines)
        assert any("gossip.intervl_s" in line for line in lines)

    def test_status_allow_from_takes_networks_and_names_a_bad_one(self, tmp_path: Path) -> None:
        config = parse_config(GOOD + '[status]\nallow_from = ["10.0.0.0/8", "fd00::/8"]\n')
        assert [str(n) for n in config.status.allow_from] == ["10.0.0.0/8", "fd00::/8"]
        for bad in ('"10.0.0.1/8"', '"ten"', "1.5"):  # host bits set, not a network, a float
            text = GOOD + f'[status]\nallow_from = ["127.0.0.0/8", {bad}]\n'
            with pytest.raises(ConfigError) as info:
                load_config(write(tmp_path, text))
            lines = info.value.reason.splitlines()
            assert len(lines) == 1, lines
            assert "status.allow_from.1" in lines[0]
            assert "not a valid IPv4 or IPv6 network" in lines[0]

    def test_a_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "nope.toml"
        with pytest.raises(ConfigError, match="cannot read") as info:
            load_config(path)
        assert str(path) in info.value.reason


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


class TestProviderRunRefusesBadConfig:
    @pytest.mark.parametrize("case", ["unknown_model", "float_price", "misspelled_key"])
    def test_exits_non_zero_with_the_message_and_no_traceback(
        self, tmp_path: Path, case: str
    ) -> None:
        text, field, words = BAD[case]
        path = write(tmp_path, text)
        env = {**os.environ, "MERCATO_HOME": str(tmp_path / "home")}
        proc = run_cli("provider", "run", "--config", str(path), env=env)
        assert proc.returncode != 0
        assert f"{path}: " in proc.stderr
        assert field in proc.stderr
        assert words in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "home" / "daemon.json").exists()

    def test_a_missing_config_file(self, tmp_path: Path) -> None:
        proc = run_cli("provider", "run", "--config", str(tmp_path / "absent.toml"))
        assert proc.returncode != 0
        assert "absent.toml" in proc.stderr
        assert "Traceback" not in proc.stderr

    def test_an_unusable_home_is_a_clear_error(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        text = GOOD.replace("[node]", f'[node]\nhome = "{blocker / "home"}"')
        path = write(tmp_path, text)
        proc = run_cli("provider", "run", "--config", str(path))
        assert proc.returncode != 0
        assert f"{path}: node.home: cannot use {blocker / 'home'}" in proc.stderr
        assert "Traceback" not in proc.stderr

    def test_a_port_in_use_is_a_clear_error(self, tmp_path: Path) -> None:
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            text = GOOD.replace("listen_port = 0", f"listen_port = {port}")
            text = text.replace("[node]", f'[node]\nhome = "{tmp_path / "home"}"')
            proc = run_cli("provider", "run", "--config", str(write(tmp_path, text)))
        assert proc.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_the_configs_cluster_up_writes_are_valid() -> None:
    """`mercato cluster up` writes one config per node; each must pass this same parser."""
    from node.cli.localcluster import TEMPLATES, provider_config

    for template in (None, *TEMPLATES):
        text = provider_config("n", Path("/tmp/x"), "http://127.0.0.1:1", template, 3.0)
        config = parse_config(text)
        assert config.advert.ttl_s == 3.0
        assert config.node.role == ("bootstrap" if template is None else "provider")
