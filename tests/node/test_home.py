"""The node home on a real file system: layout, key creation, key permission checks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from node.home import (
    InsecureKeyFileError,
    KeyFileError,
    NodeHome,
    resolve_home,
)
from protocol.identity import Identity


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TestResolveHome:
    def test_mercato_home_wins(self, tmp_path: Path) -> None:
        assert resolve_home({"MERCATO_HOME": str(tmp_path / "h")}) == tmp_path / "h"

    def test_default_is_dot_mercato_in_the_user_home(self) -> None:
        assert resolve_home({}) == Path.home() / ".mercato"
        assert resolve_home({"MERCATO_HOME": ""}) == Path.home() / ".mercato"

    def test_tilde_is_expanded(self) -> None:
        assert resolve_home({"MERCATO_HOME": "~/elsewhere"}) == Path.home() / "elsewhere"

    def test_reads_the_process_environment_by_default(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("MERCATO_HOME", str(tmp_path))
        assert resolve_home() == tmp_path


class TestLayout:
    def test_creates_a_private_directory_with_logs(self, tmp_path: Path) -> None:
        home = NodeHome(tmp_path / "deep" / "home")
        assert home.path.is_dir()
        assert _mode(home.path) & 0o077 == 0
        assert home.log_dir.is_dir()
        assert home.key_path == home.path / "identity.pem"
        assert home.store_path == home.path / "node.sqlite"
        assert home.log_dir == home.path / "logs"

    def test_reopening_an_existing_home_is_fine(self, tmp_path: Path) -> None:
        NodeHome(tmp_path / "h")
        assert NodeHome(tmp_path / "h").path.is_dir()


class TestIdentity:
    @pytest.fixture(autouse=True, params=[False, True], ids=["in_process", "codec_in_child"])
    def _codec(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        # Every case holds both ways: the CLI's (the PEM converted in this process) and
        # the daemon's (converted by cryptography in a child, node.keycodec).
        real = NodeHome.load_or_create_identity

        def load(home: NodeHome, **_: bool) -> Identity:
            return real(home, codec_in_child=request.param)

        monkeypatch.setattr(NodeHome, "load_or_create_identity", load)

    def test_first_run_creates_a_0600_key_and_leaves_no_temp_files(self, tmp_path: Path) -> None:
        home = NodeHome(tmp_path)
        identity = home.load_or_create_identity()
        assert home.key_path.is_file()
        assert _mode(home.key_path) == 0o600
        assert Identity.from_pem(home.key_path.read_bytes()).node_id == identity.node_id
        assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.pem", "logs"]

    def test_same_identity_on_reload(self, tmp_path: Path) -> None:
        first = NodeHome(tmp_path).load_or_create_identity()
        pem = (tmp_path / "identity.pem").read_bytes()
        second = NodeHome(tmp_path).load_or_create_identity()
        assert second.node_id == first.node_id
        assert second.public_key == first.public_key
        assert (tmp_path / "identity.pem").read_bytes() == pem

    @pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700 | 0o020])
    def test_key_accessible_by_others_is_refused_with_the_fix(
        self, tmp_path: Path, mode: int
    ) -> None:
        home = NodeHome(tmp_path)
        home.load_or_create_identity()
        pem = home.key_path.read_bytes()
        home.key_path.chmod(mode)
        with pytest.raises(InsecureKeyFileError) as info:
            home.load_or_create_identity()
        assert f"chmod 600 {home.key_path}" in info.value.reason
        assert f"{mode:04o}" in info.value.reason
        assert info.value.code == "insecure_key_file"
        # Refused, not repaired or replaced behind the user's back.
        assert home.key_path.read_bytes() == pem
        assert _mode(home.key_path) == mode

    def test_after_the_suggested_chmod_the_same_identity_loads(self, tmp_path: Path) -> None:
        home = NodeHome(tmp_path)
        identity = home.load_or_create_identity()
        home.key_path.chmod(0o644)
        with pytest.raises(InsecureKeyFileError):
            home.load_or_create_identity()
        home.key_path.chmod(0o600)
        assert home.load_or_create_identity().node_id == identity.node_id

    def test_garbage_key_file_is_a_key_error_and_is_kept(self, tmp_path: Path) -> None:
        home = NodeHome(tmp_path)
        fd = os.open(home.key_path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"not a key\n")
        os.close(fd)
        with pytest.raises(KeyFileError, match="move it aside") as info:
            home.load_or_create_identity()
        assert not isinstance(info.value, InsecureKeyFileError)
        assert home.key_path.read_bytes() == b"not a key\n"

    def test_empty_key_file_is_a_key_error(self, tmp_path: Path) -> None:
        home = NodeHome(tmp_path)
        os.close(os.open(home.key_path, os.O_CREAT | os.O_WRONLY, 0o600))
        with pytest.raises(KeyFileError, match="Ed25519"):
            home.load_or_create_identity()

    def test_a_non_ed25519_key_is_refused(self, tmp_path: Path) -> None:
        home = NodeHome(tmp_path)
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(home.key_path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, pem)
        os.close(fd)
        with pytest.raises(KeyFileError, match="Ed25519"):
            home.load_or_create_identity()

    def test_a_directory_in_place_of_the_key_is_a_key_error(self, tmp_path: Path) -> None:
        home = NodeHome(tmp_path)
        home.key_path.mkdir(mode=0o700)
        with pytest.raises(KeyFileError, match="not a regular file"):
            home.load_or_create_identity()

    def test_a_dangling_symlink_is_a_key_error_not_overwritten(self, tmp_path: Path) -> None:
        home = NodeHome(tmp_path)
        home.key_path.symlink_to(tmp_path / "missing.pem")
        with pytest.raises(KeyFileError, match="cannot read key file"):
            home.load_or_create_identity()
        assert home.key_path.is_symlink()
        assert not (tmp_path / "missing.pem").exists()

    def test_losing_the_creation_race_simulated_in_process_adopts_the_winner(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Another process writes its key between our failed load and our install.
        home = NodeHome(tmp_path)
        winner = Identity.generate()
        real_generate = Identity.generate

        def generate_after_the_winner() -> Identity:
            fd = os.open(home.key_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.write(fd, winner.to_pem())
            os.close(fd)
            return real_generate()

        monkeypatch.setattr(Identity, "generate", generate_after_the_winner)
        assert home.load_or_create_identity().node_id == winner.node_id
        assert Identity.from_pem(home.key_path.read_bytes()).node_id == winner.node_id
        assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.pem", "logs"]

    def test_concurrent_first_runs_agree_on_one_identity(self, tmp_path: Path) -> None:
        # Real processes, imports done, released together at a barrier file on an empty home.
        go = tmp_path / "go"
        home = tmp_path / "home"
        script = textwrap.dedent(
            f"""
            import os, sys, time
            from node.home import NodeHome
            open(os.path.join({str(tmp_path)!r}, "ready-" + sys.argv[1]), "w").close()
            while not os.path.exists({str(go)!r}):
                time.sleep(0.001)
            print(NodeHome({str(home)!r}).load_or_create_identity().node_id)
            """
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(i)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(4)
        ]
        try:
            while len(list(tmp_path.glob("ready-*"))) < len(procs):
                if any(p.poll() is not None for p in procs):
                    break  # one died early; its stderr is reported below
                time.sleep(0.01)
            go.touch()
            results = [p.communicate(timeout=60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert all(p.returncode == 0 for p in procs), [err for _, err in results]
        node_ids = {out.strip() for out, _ in results}
        assert len(node_ids) == 1
        on_disk = Identity.from_pem((home / "identity.pem").read_bytes())
        assert node_ids == {on_disk.node_id}
        assert sorted(p.name for p in home.iterdir()) == ["identity.pem", "logs"]


def test_a_key_codec_that_cannot_run_is_a_key_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = NodeHome(tmp_path)
    identity = home.load_or_create_identity()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(KeyFileError, match="cannot run the key codec"):
        home.load_or_create_identity(codec_in_child=True)
    monkeypatch.undo()
    assert home.load_or_create_identity(codec_in_child=True).node_id == identity.node_id
