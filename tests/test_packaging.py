"""What ships: the wheel carries its data files, the image runs as non-root with a health check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from exporter.commands.run import DEFAULT_LISTEN_ADDRESS
from exporter.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (built,) = out.glob("portscan_exporter-*.whl")
    return built


def test_wheel_contains_data_files_and_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = zf.read(entry_points).decode()
    assert "exporter/data/top-ports-tcp.txt" in names
    assert any(n.startswith("exporter/data/fingerprint") for n in names)
    assert "exporter/py.typed" in names
    assert "portscan-exporter = exporter.cli:main" in scripts


def test_dockerfile_conventions() -> None:
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    port = DEFAULT_LISTEN_ADDRESS.rsplit(":", 1)[1]
    assert re.search(rf"^EXPOSE\s+{port}\b", text, re.MULTILINE)
    healthcheck = re.search(r"^HEALTHCHECK.*?CMD (.*)$", text, re.MULTILINE | re.DOTALL)
    assert healthcheck and "/-/healthy" in healthcheck.group(1)
    assert "curl" not in healthcheck.group(1) and "wget" not in healthcheck.group(1)
    assert re.search(r"^VOLUME\b", text, re.MULTILINE)
    assert "/etc/portscan-exporter/config.yaml" in text


def test_container_config_is_valid_and_keeps_state_in_the_volume() -> None:
    config = load_config(ROOT / "docker" / "config.yaml")
    assert config.storage.path == Path("/var/lib/portscan-exporter/portscan.sqlite")


def test_installed_wheel_runs_without_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    """What the image does: install the wheel (not the checkout) and run the console script
    from elsewhere, so a data file or module left out of the package shows up here."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(wheel)], check=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    exe = str(venv / "bin" / "portscan-exporter")

    def run(*args: str) -> str:
        proc = subprocess.run(
            [exe, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "portscan-exporter" in run("--version")
    assert "ok (1 hosts, 1000 host ports)" in run("check-config", str(ROOT / "docker/config.yaml"))
    # The data files load from the installed package: ranked top ports and signatures.
    probe = (
        "from exporter.portsets import top_ports; from exporter.fingerprint import SignatureDB;"
        "import exporter; print(exporter.__file__, len(top_ports(1000)), SignatureDB.builtin())"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(venv) in out and " 1000 " in out
