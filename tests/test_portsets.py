"""Port set syntax, errors, and the shipped top-ports list against nmap's own ranking."""

from __future__ import annotations

import importlib.resources
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from exporter.portsets import (
    PortSetError,
    main,
    parse_port_set,
    rank_nmap_services,
    render_data_file,
    resolve_ports,
    top_ports,
)

NMAP_SERVICES = Path("/usr/share/nmap/nmap-services")
NOT_A_SET = "is not a port set (use top100, top1000, all, N, N-M or a list)"
DATA_FILE = importlib.resources.files("exporter").joinpath("data", "top-ports-tcp.txt")


def nmap_top_ports(n: int) -> set[int]:
    """The set `nmap --top-ports n` would scan, read from nmap's XML scaninfo.

    No target is given, so nmap resolves the port list, prints it and sends nothing.
    (`-sL` would not do: a list scan prints no scaninfo.)
    """
    nmap = shutil.which("nmap")
    if nmap is None:
        pytest.skip("nmap is not installed (Debian package nmap)")
    done = subprocess.run(
        [nmap, "-sT", "-n", "--top-ports", str(n), "-oX", "-"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    match = re.search(r'<scaninfo [^>]* services="([^"]*)"', done.stdout)
    assert match, done.stdout
    return set(parse_port_set(match[1]))


# --- syntax ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (22, (22,)),
        ("22", (22,)),
        (" 443 ", (443,)),
        ("8000-8003", (8000, 8001, 8002, 8003)),
        ("8000 - 8001", (8000, 8001)),
        ("9-9", (9,)),
        ("22,80,8000-8002", (22, 80, 8000, 8001, 8002)),
        ("80, 22, 80", (22, 80)),
        ([9200, "8000-8001", 22], (22, 8000, 8001, 9200)),
        (["22,23", 23, "21-23"], (21, 22, 23)),
        ((1, 65535), (1, 65535)),
        ([], ()),
        ("1", (1,)),
        ("65535", (65535,)),
    ],
)
def test_parse_port_set(spec: object, expected: tuple[int, ...]) -> None:
    assert parse_port_set(spec) == expected


def test_named_sets() -> None:
    assert parse_port_set("all") == tuple(range(1, 65536))
    assert parse_port_set("ALL") == parse_port_set("all")
    assert parse_port_set("top100") == tuple(sorted(top_ports(100)))
    assert parse_port_set("top1000") == tuple(sorted(top_ports(1000)))
    assert parse_port_set(["top100", "8000-8100", 9200]) == tuple(
        sorted(set(top_ports(100)) | set(range(8000, 8101)) | {9200})
    )
    assert parse_port_set("top100,top1000") == parse_port_set("top1000")
    assert set(parse_port_set("top100")) < set(parse_port_set("top1000"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("top10000", f"'top10000' {NOT_A_SET}"),
        ("http", f"'http' {NOT_A_SET}"),
        ("", f"'' {NOT_A_SET}"),
        ("8000-", f"'8000-' {NOT_A_SET}"),
        ("-5", f"'-5' {NOT_A_SET}"),
        ("\uff12\uff12", f"'\uff12\uff12' {NOT_A_SET}"),  # fullwidth digits
        ("\uff12-\uff13", f"'\uff12-\uff13' {NOT_A_SET}"),
        (22.0, f"22.0 {NOT_A_SET}"),
        (True, f"true {NOT_A_SET}"),
        (None, f"null {NOT_A_SET}"),
        ({"a": 1}, "{'a': 1} " + NOT_A_SET),
        (70000, "port 70000 is out of range 1-65535"),
        (0, "port 0 is out of range 1-65535"),
        (-1, "port -1 is out of range 1-65535"),
        ("1-65536", "port 65536 is out of range 1-65535"),
        ("9000-8000", "range 9000-8000 is reversed"),
        ("22,,80", "'22,,80' has an empty element between commas"),
        ("22,", "'22,' has an empty element between commas"),
        ([22, [80]], "[80] is a list inside a port list"),
        ([22, "top10000"], f"'top10000' {NOT_A_SET}"),
    ],
)
def test_parse_port_set_errors(spec: object, message: str) -> None:
    with pytest.raises(PortSetError) as caught:
        parse_port_set(spec)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_resolve_ports_applies_exclude() -> None:
    assert resolve_ports("20-30", [22, "25-27"]) == (20, 21, 23, 24, 28, 29, 30)
    assert resolve_ports("20-30", "20-30") == ()
    assert resolve_ports([80, 22]) == (22, 80)
    assert resolve_ports("all", "1-1023") == tuple(range(1024, 65536))
    assert resolve_ports("22", []) == (22,)
    with pytest.raises(PortSetError, match="range 30-20 is reversed"):
        resolve_ports("22", "30-20")


# --- the top-ports list ------------------------------------------------------------------------


def test_top_ports_ranked_and_bounded() -> None:
    ranked = top_ports(1000)
    assert len(ranked) == len(set(ranked)) == 1000
    assert all(1 <= port <= 65535 for port in ranked)
    assert top_ports(100) == ranked[:100]
    # The head of the internet's open-port ranking is well known and stable across releases.
    assert set(top_ports(5)) == {80, 23, 443, 21, 22}
    with pytest.raises(ValueError):
        top_ports(1001)
    with pytest.raises(ValueError):
        top_ports(0)


def test_data_file_has_a_header_and_one_port_a_line() -> None:
    lines = DATA_FILE.read_text("ascii").splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert any("nmap-services" in line for line in header)
    assert any("frequency" in line for line in header)
    body = [line for line in lines if not line.startswith("#")]
    assert [int(line) for line in body] == list(top_ports(1000))


@pytest.mark.parametrize("n", [100, 1000])
def test_top_sets_equal_nmaps(n: int) -> None:
    assert set(parse_port_set(f"top{n}")) == nmap_top_ports(n)


@pytest.mark.parametrize("n", [1, 10, 20, 50, 200, 500, 999])
def test_top_ports_prefixes_equal_nmaps(n: int) -> None:
    # These cut through runs of equal frequency: the tie order must select what nmap selects.
    assert set(top_ports(n)) == nmap_top_ports(n)


def installed_services() -> str:
    if not NMAP_SERVICES.is_file():
        pytest.skip(f"{NMAP_SERVICES} is missing (Debian package nmap-common)")
    return NMAP_SERVICES.read_text(encoding="utf-8", errors="replace")


def test_ranking_follows_the_frequency_column() -> None:
    frequency: dict[int, float] = {}
    for line in installed_services().splitlines():
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("#") and fields[1].endswith("/tcp"):
            frequency[int(fields[1].split("/")[0])] = float(fields[2])
    ranked = top_ports(1000)
    keys = [(-frequency[port], port) for port in ranked]
    assert keys == sorted(keys)
    cutoff = frequency[ranked[-1]]
    assert all(freq <= cutoff for port, freq in frequency.items() if port not in ranked)


def test_data_file_is_what_the_installed_nmap_services_gives() -> None:
    services = installed_services()
    shipped = DATA_FILE.read_text("ascii")
    revision = re.search(r"\$Id: nmap-services (\d+)", services)
    if revision is None or f"nmap-services {revision[1]} " not in shipped:
        pytest.skip("the installed nmap-services is another revision than the shipped list's")
    assert render_data_file(services) == shipped


def test_rank_nmap_services_format() -> None:
    text = (
        "# comment\n"
        "http\t80/tcp\t0.484143\t# World Wide Web HTTP\n"
        "snmp\t161/udp\t0.433467\n"
        "b\t30/tcp\t0.000100\n"
        "a\t20/tcp\t0.000100\t# tie, lower port first\n"
        "ssh\t22/tcp\t0.182286\t# Secure Shell Login\n"
        "\n"
        "sctp\t80/sctp\t0.000000\n"
    )
    assert rank_nmap_services(text) == [80, 22, 20, 30]
    rendered = render_data_file("# $Id: nmap-services 1 x $\n" + text, count=3)
    assert rendered.splitlines()[-3:] == ["80", "22", "20"]
    assert "nmap-services 1 x" in rendered


def test_regenerate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    services = tmp_path / "nmap-services"
    services.write_text("ssh\t22/tcp\t0.2\nhttp\t80/tcp\t0.5\n")
    assert main([str(services)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-2:] == ["80", "22"]
    assert main([]) == 2


# --- bounded cost and bounded messages -------------------------------------------------------


def test_resolving_costs_what_was_written_not_what_it_stands_for() -> None:
    import time

    started = time.perf_counter()
    assert parse_port_set(["1-65535"] * 200_000 + ["all"] * 200_000) == tuple(range(1, 65536))
    distinct = [f"{low}-{low + 1000}" for low in range(1, 64000, 3)]
    assert parse_port_set(distinct) == tuple(range(1, 63997 + 1001))
    assert time.perf_counter() - started < 3


def test_ports_with_many_digits_are_refused_without_building_them() -> None:
    from exporter.portsets import PortSetError

    with pytest.raises(PortSetError, match=r"^port 9{80}\.\.\. is out of range 1-65535$"):
        parse_port_set("9" * 100_000)
    with pytest.raises(PortSetError, match=r"^port 65536 is out of range"):
        parse_port_set("1-065536")
    assert parse_port_set("000022") == (22,)


def test_show_cuts_long_values_without_rendering_them_whole() -> None:
    from exporter.portsets import show

    assert show("x" * 1000) == "'" + "x" * 80 + "...'"
    huge = [[1] * 1000] * 1_000_000  # a million elements: rendered only as far as needed
    text = show(huge)
    assert len(text) < 100 and text.endswith("...]")
    assert show({"a": 1}) == "{'a': 1}"
    assert show([True, None, "a"]) == "[true, null, 'a']"
