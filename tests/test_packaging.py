"""What ships: the wheel carries its data files, the image runs as non-root with a health check."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from exporter.commands.run import DEFAULT_LISTEN_ADDRESS
from exporter.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_data_files_and_console_script(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("portscan_exporter-*.whl")
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
