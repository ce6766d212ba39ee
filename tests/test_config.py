"""Config loading and validation: exact error messages, defaults, targets, paths."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest

from exporter.commands import check_config
from exporter.config import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_HOSTS,
    SECTIONS,
    TARGET_FIELDS,
    Config,
    ConfigError,
    HostSpec,
    load_config,
    parse_config,
)
from exporter.configfile import describe
from exporter.durations import DurationError, format_duration, parse_duration
from exporter.portsets import parse_port_set, top_ports

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "config"
BAD = sorted((FIXTURES / "bad").glob("*.yaml"))


def hosts(text: str, path: str | Path = "config.yaml") -> list[str]:
    return [spec.host for spec in parse_config(text, path).hosts]


def error_of(text: str, path: str | Path = "config.yaml") -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path)
    return str(caught.value)


# --- bad configurations: one fixture per mistake, each with its exact message ------------------


@pytest.mark.parametrize("fixture", BAD, ids=[path.stem for path in BAD])
def test_bad_fixture_reports_exact_message(fixture: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = fixture.with_suffix(".expected").read_text().strip()
    # Messages name the file as the caller gave it: load it by its bare name.
    monkeypatch.chdir(fixture.parent)
    with pytest.raises(ConfigError) as caught:
        load_config(fixture.name)
    error = caught.value
    assert str(error) == expected
    file, line, rest = expected.split(":", 2)
    assert (error.path, error.line) == (file, int(line))
    if error.key is not None:
        assert rest.startswith(f" {error.key}: ")
    assert str(error) == f"{file}:{line}: " + (
        f"{error.key}: {error.message}" if error.key else error.message
    )


def test_every_bad_fixture_has_an_expected_message() -> None:
    expected = {path.stem for path in (FIXTURES / "bad").glob("*.expected")}
    assert {path.stem for path in BAD} == expected
    # The mistakes operators make most; each must stay covered by a fixture.
    required = {
        "unknown-top-level-key",
        "unknown-defaults-key",
        "unknown-target-key",
        "bad-port-set",
        "port-out-of-range",
        "reversed-range",
        "bad-duration",
        "negative-retries",
        "zero-concurrency",
        "string-for-int",
        "bool-for-int",
        "missing-targets",
        "empty-targets",
        "target-without-host",
        "invalid-host",
        "invalid-ipv4",
        "cidr-too-large",
        "duplicate-host",
        "expected-not-scanned",
        "probes-file-missing",
        "yaml-syntax-error",
        "top-level-not-mapping",
    }
    assert required <= expected


def test_error_names_the_path_as_given(tmp_path: Path) -> None:
    config = tmp_path / "sub" / "portscan.yml"
    config.parent.mkdir()
    config.write_text("targets:\n  - host: 127.0.0.1\n    retries: many\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert str(caught.value) == (
        f"{config}:3: targets[0].retries: expected an integer, got string 'many'"
    )


def test_unreadable_and_undecodable_files(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == f"{missing}: cannot read: No such file or directory"
    assert caught.value.line is None

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"targets:\n  - host: caf\xe9.example.org\n")
    with pytest.raises(ConfigError) as caught:
        load_config(latin1)
    assert str(caught.value) == f"{latin1}:2: not valid UTF-8"


def test_control_character_is_a_syntax_error_with_a_line() -> None:
    assert error_of("targets:\n  - host: a\x07b\n") == (
        "config.yaml:2: invalid YAML: unacceptable character #x0007: "
        "special characters are not allowed"
    )


def test_python_tags_are_refused() -> None:
    assert error_of("targets:\n  - host: !!python/object/apply:os.getcwd []\n") == (
        "config.yaml:2: targets[0].host: unsupported YAML tag"
        " 'tag:yaml.org,2002:python/object/apply:os.getcwd'"
    )
    assert error_of("targets:\n  - host: !!python/name:os.getcwd ''\n") == (
        "config.yaml:2: targets[0].host: could not determine a constructor for the tag"
        " 'tag:yaml.org,2002:python/name:os.getcwd'"
    )


# --- defaults and overrides --------------------------------------------------------------------


def test_minimal_config_gets_the_documented_defaults() -> None:
    config = load_config(FIXTURES / "good" / "minimal.yaml")
    (host,) = config.hosts
    assert host == HostSpec(
        host="127.0.0.1",
        ports=tuple(sorted(top_ports(1000))),
        interval=12 * 3600.0,
        timeout=1.0,
        retries=1,
        concurrency=256,
        rate=0.0,
        confirmations=2,
        confirm_after=300.0,
        expected_open=None,
        source=f"{FIXTURES / 'good' / 'minimal.yaml'}:2",
    )
    assert config.scan.max_concurrent_hosts == 64
    assert config.scan.max_probes == 16384
    assert config.scan.processes == 0
    assert (config.scan.jitter_fraction, config.scan.jitter_seconds) == (0.1, None)
    assert config.scan.max_hosts == 65536
    assert config.fingerprint.enabled is True
    assert config.fingerprint.timeout == 5.0
    assert config.fingerprint.max_bytes == 16384
    assert config.fingerprint.concurrency == 32
    assert config.fingerprint.nmap_service_probes is None
    assert config.storage.path == FIXTURES / "good" / "portscan.sqlite"
    assert config.storage.retention == 400 * 86400.0


def test_full_config_every_key(tmp_path: Path) -> None:
    path = FIXTURES / "good" / "full.yaml"
    config = load_config(path)
    assert config.path == path
    assert config.vantage == "outside"
    assert config.scan.max_concurrent_hosts == 8
    assert config.scan.max_probes == 2048
    assert (config.scan.jitter_fraction, config.scan.jitter_seconds) == (None, 30.0)
    assert config.scan.max_hosts == 1024
    assert config.fingerprint.enabled is False
    assert config.fingerprint.timeout == 3.0
    assert config.fingerprint.max_bytes == 4096
    assert config.fingerprint.concurrency == 8
    assert config.fingerprint.nmap_service_probes == (
        FIXTURES / "good" / "probes" / "nmap-service-probes"
    )
    assert config.storage.path == FIXTURES / "state" / "portscan.sqlite"
    assert config.storage.retention == 90 * 86400.0

    by_host = {spec.host: spec for spec in config.hosts}
    assert list(by_host) == [
        "127.0.0.1",
        "192.0.2.1",
        "192.0.2.2",
        "2001:db8::",
        "2001:db8::1",
        "www.example.org",
        "db1",
    ]
    top100_without_25 = tuple(sorted(set(top_ports(100)) - {25}))
    inherited = by_host["127.0.0.1"]
    assert inherited.ports == top100_without_25
    assert (inherited.interval, inherited.timeout, inherited.retries) == (21600.0, 0.75, 2)
    assert (inherited.concurrency, inherited.rate) == (128, 250.5)
    assert (inherited.confirmations, inherited.confirm_after) == (3, 120.0)
    assert inherited.expected_open is None

    # A target's own keys beat `defaults`, and its own exclude replaces the default one.
    block = by_host["192.0.2.1"]
    assert block.ports == tuple(
        sorted((set(top_ports(100)) | set(range(8000, 8101)) | {9200}) - {8080, 8081})
    )
    assert 25 in block.ports
    assert (block.interval, block.timeout, block.retries) == (5400.0, 2.0, 0)
    assert (block.concurrency, block.rate) == (1, 0.0)
    assert (block.confirmations, block.confirm_after) == (1, 0.0)
    assert block.expected_open == (22, 443, 8000, 8001, 8002)
    assert dataclasses.replace(by_host["192.0.2.2"], host="192.0.2.1") == block
    assert block.source == f"{path}:33"

    named = by_host["www.example.org"]
    assert named.ports == (22, 80, 443)
    assert named.expected_open == (443,)
    assert named.interval == 21600.0

    # `<<: *base` merges the defaults mapping; keys written next to it win.
    merged = by_host["db1"]
    assert merged.ports == tuple(range(1024, 65536))
    assert merged.timeout == 0.75


def test_defaults_beat_built_ins_and_targets_beat_defaults() -> None:
    config = parse_config(
        """
defaults:
  interval: 2h
  retries: 3
targets:
  - host: 192.0.2.1
  - host: 192.0.2.2
    interval: 10m
  - host: 192.0.2.3
    retries: 0
    concurrency: 16
""",
        "config.yaml",
    )
    first, second, third = config.hosts
    assert (first.interval, first.retries, first.concurrency) == (7200.0, 3, 256)
    assert (second.interval, second.retries, second.concurrency) == (600.0, 3, 256)
    assert (third.interval, third.retries, third.concurrency) == (7200.0, 0, 16)


def test_merge_keys_share_settings_and_own_keys_win() -> None:
    config = parse_config(
        """
targets:
  - &web
    host: 192.0.2.1
    ports: [22, 80]
    interval: 1h
  - <<: *web
    host: 192.0.2.2
    interval: 2h
""",
        "config.yaml",
    )
    first, second = config.hosts
    assert (first.host, first.ports, first.interval) == ("192.0.2.1", (22, 80), 3600.0)
    assert (second.host, second.ports, second.interval) == ("192.0.2.2", (22, 80), 7200.0)
    assert second.source == "config.yaml:7"


def describe_defaults() -> str:
    """The built-in defaults written out as a config file, from the `Field` tables."""
    lines = []
    for section, fields in SECTIONS.items():
        lines.append(f"{section}:")
        for name, field in fields.items():
            lines.append(f"  {name}: {field.default}  # {field.help}")
    return "\n".join(lines) + "\n"


def test_the_field_defaults_written_out_are_the_built_ins() -> None:
    text = describe_defaults()
    assert set(re.findall(r"(?m)^(\w+):$", text)) == set(SECTIONS)
    for name in TARGET_FIELDS:
        assert f"\n  {name}: " in text
    spelled_out = parse_config(text + "targets: [127.0.0.1]\n", "config.yaml")
    built_in = parse_config("targets: [127.0.0.1]\n", "config.yaml")
    (spelled_host,) = spelled_out.hosts
    assert spelled_host == dataclasses.replace(built_in.hosts[0], source=spelled_host.source)
    assert spelled_out.scan == built_in.scan
    assert spelled_out.fingerprint == built_in.fingerprint
    assert spelled_out.storage == built_in.storage


# --- targets -----------------------------------------------------------------------------------


def test_ipv6_targets() -> None:
    assert hosts("targets: ['::1', '2001:db8::1', 'fe80::1%eth0']") == [
        "::1",
        "2001:db8::1",
        "fe80::1%eth0",
    ]
    # Unquoted works too, including forms YAML 1.1 would read as base-60 integers.
    assert hosts("targets:\n  - ::1\n  - host: 1:2:3:4:5:6:7:8\n") == ["::1", "1:2:3:4:5:6:7:8"]
    # The subnet-router anycast address (the block's first) is answered by routers: skipped.
    assert hosts("targets: ['2001:db8::/126']") == ["2001:db8::1", "2001:db8::2", "2001:db8::3"]
    assert hosts("targets: ['2001:DB8:0::/127', '2001:db8::5/128']") == [
        "2001:db8::",
        "2001:db8::1",
        "2001:db8::5",
    ]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("192.0.2.0/30", ["192.0.2.1", "192.0.2.2"]),  # network and broadcast left out
        ("192.0.2.0/29", [f"192.0.2.{n}" for n in range(1, 7)]),
        ("192.0.2.4/31", ["192.0.2.4", "192.0.2.5"]),  # RFC 3021 point-to-point: both
        ("192.0.2.9/32", ["192.0.2.9"]),
    ],
)
def test_ipv4_cidr_expansion(block: str, expected: list[str]) -> None:
    assert hosts(f"targets: [{block}]") == expected


def test_large_cidr_expansion_and_limit() -> None:
    config = parse_config("targets:\n  - host: 10.1.0.0/16\n    ports: 22\n", "config.yaml")
    assert len(config.hosts) == 65534
    assert (config.hosts[0].host, config.hosts[-1].host) == ("10.1.0.1", "10.1.255.254")
    # Expanded hosts share one resolved port tuple rather than 65534 copies.
    assert len({id(spec.ports) for spec in config.hosts}) == 1
    assert {spec.source for spec in config.hosts} == {"config.yaml:2"}

    assert error_of("scan: {max_hosts: 8}\ntargets: [192.0.2.0/28]") == (
        "config.yaml:2: targets[0]: 192.0.2.0/28: block has 14 hosts, more than scan.max_hosts (8)"
    )
    assert hosts("scan: {max_hosts: 14}\ntargets: [192.0.2.0/28]")[-1] == "192.0.2.14"


@pytest.mark.parametrize(
    ("targets", "error"),
    [
        # The limit counts the hosts of all targets together, blocks and single hosts alike.
        ("[192.0.2.0/29, 198.51.100.0/29]", None),
        (
            "[192.0.2.0/29, 198.51.100.0/29, 203.0.113.1]",
            "config.yaml:2: targets[2]: the targets up to here expand to 13 hosts,"
            " more than scan.max_hosts (12)",
        ),
        (
            "[203.0.113.1, 192.0.2.0/29, 198.51.100.0/29]",
            "config.yaml:2: targets[2]: 198.51.100.0/29: block has 6 hosts; with the 7 hosts of"
            " the targets before it that is more than scan.max_hosts (12)",
        ),
        ("[192.0.2.0/31, 192.0.2.4/30, 2001:db8::/126, 2001:db8::8/127]", None),
    ],
)
def test_max_hosts_counts_all_targets_together(targets: str, error: str | None) -> None:
    text = f"scan: {{max_hosts: 12}}\ntargets: {targets}"
    assert error_of(text) == error if error else len(hosts(text)) <= 12


@pytest.mark.parametrize(
    ("written", "label"),
    [
        ("localhost", "localhost"),
        ("db1", "db1"),
        ("WWW.Example.org", "www.example.org"),
        ("www.example.org.", "www.example.org"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("1password.example", "1password.example"),
        ("host.123abc", "host.123abc"),
    ],
)
def test_dns_names(written: str, label: str) -> None:
    assert hosts(f"targets: ['{written}']") == [label]


@pytest.mark.parametrize(
    "written",
    ["-lead.example", "trail-.example", "a..b", "under_score", "sp ace", "bücher.example", "1.2.3"],
)
def test_invalid_host_names(written: str) -> None:
    message = error_of(f"targets: ['{written}']")
    assert message.startswith("config.yaml:1: targets[0]: ")
    assert message.endswith(
        ("is not a DNS name, an IP address or a CIDR block", "is not a valid IP address")
    )


def test_ip_labels_are_normalized_and_compared_as_addresses() -> None:
    assert hosts("targets: ['2001:0DB8:0000::0001', '192.0.2.1']") == ["2001:db8::1", "192.0.2.1"]
    assert "is also listed by targets[0]" in error_of("targets: ['::1', '0:0::1']")


def test_expected_open_is_checked_after_exclude_and_may_be_empty() -> None:
    config = parse_config(
        "targets:\n  - host: 192.0.2.1\n    ports: 20-30\n    expected_open: []\n", "c.yaml"
    )
    assert config.hosts[0].expected_open == ()
    message = error_of(
        "defaults:\n  exclude: [23]\ntargets:\n  - host: 192.0.2.1\n    ports: 20-30\n"
        "    expected_open: [21-25]\n"
    )
    assert message == (
        "config.yaml:6: targets[0].expected_open: port 23 is not scanned (expected ports must"
        " be scanned: add them to ports or remove them from exclude)"
    )


def test_many_missing_expected_ports_are_summarized() -> None:
    message = error_of("targets:\n  - host: a\n    ports: 1\n    expected_open: 1-20\n")
    assert "ports 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 9 more are not scanned" in message


# --- paths -------------------------------------------------------------------------------------


def test_storage_path_is_relative_to_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc" / "portscan"
    config_dir.mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def storage(value: str, config_path: str | Path) -> Path:
        text = f"storage:\n  path: {value}\ntargets: [127.0.0.1]\n"
        return parse_config(text, config_path).storage.path

    config = config_dir / "config.yaml"
    assert storage("data.sqlite", config) == config_dir / "data.sqlite"
    assert storage("state/db.sqlite", config) == config_dir / "state" / "db.sqlite"
    assert storage("../../var/db.sqlite", config) == tmp_path / "var" / "db.sqlite"
    assert storage("/srv/portscan.sqlite", config) == Path("/srv/portscan.sqlite")
    # A config path relative to the working directory resolves against that directory.
    assert storage("db.sqlite", "conf/config.yaml") == elsewhere / "conf" / "db.sqlite"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage("~/db.sqlite", config) == tmp_path / "home" / "db.sqlite"

    default = parse_config("targets: [127.0.0.1]\n", config).storage.path
    assert default == config_dir / "portscan.sqlite"
    assert default.is_absolute()


def test_nmap_service_probes_path(tmp_path: Path) -> None:
    probes = tmp_path / "share" / "nmap-service-probes"
    probes.parent.mkdir()
    probes.write_text("Probe TCP NULL q||\n")
    config = tmp_path / "config.yaml"

    def load(value: str) -> Path | None:
        text = f"fingerprint:\n  nmap_service_probes: {value}\ntargets: [127.0.0.1]\n"
        return parse_config(text, config).fingerprint.nmap_service_probes

    assert load("share/nmap-service-probes") == probes
    assert load(str(probes)) == probes
    assert load("null") is None
    assert error_of(
        "fingerprint:\n  nmap_service_probes: share\ntargets: [127.0.0.1]\n", config
    ) == (
        f"{config}:2: fingerprint.nmap_service_probes: 'share' is not a file"
        " (relative paths are resolved against the config file's directory)"
    )


# --- the shipped example -----------------------------------------------------------------------


def test_example_config_loads_and_scans_this_machine() -> None:
    config = load_config(REPO / "config.example.yaml")
    assert isinstance(config, Config)
    (spec,) = config.hosts
    assert spec.host == "127.0.0.1"
    assert spec.ports == parse_port_set("top1000")
    assert spec.interval == 3600.0
    assert config.storage.path == REPO / "portscan.sqlite"


def test_example_config_commented_targets_are_valid() -> None:
    text = (REPO / "config.example.yaml").read_text()
    head, sep, targets = text.partition("\ntargets:\n")
    assert sep
    uncommented = re.sub(r"(?m)^  # (?=- |  \S)", "  ", targets)
    assert uncommented != targets
    config = parse_config(head + sep + uncommented, REPO / "config.example.yaml")
    labels = [spec.host for spec in config.hosts]
    assert labels[0] == "127.0.0.1"
    assert any(ipaddress.ip_address(label).version == 6 for label in labels if ":" in label)
    assert sum(label.startswith("192.0.2.") for label in labels) == 14
    with_baseline = [spec for spec in config.hosts if spec.expected_open is not None]
    assert [spec.host for spec in with_baseline] == ["www.example.org"]
    assert len(labels) == len(set(labels))


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("12h", 43200.0),
        ("1d", 86400.0),
        ("2w", 14 * 86400.0),
        ("1y", 365 * 86400.0),
        ("1h30m", 5400.0),
        ("1m30s500ms", 90.5),
        ("1s500ms", 1.5),
        ("400d", 400 * 86400.0),
        ("0s", 0.0),
        ("1.5h", 5400.0),
        (" 45s ", 45.0),
        ("90", 90.0),
        (90, 90.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration(written: object, seconds: float) -> None:
    assert parse_duration(written) == seconds


@pytest.mark.parametrize(
    "written", ["5x", "", "h", "1h 30m", "1h1h", "-5s", "1:30", "5 s", -1, True, None, [1]]
)
def test_parse_duration_rejects(written: object) -> None:
    with pytest.raises(DurationError, match=r"is not a duration \(use e\.g\. 500ms, 30s, 5m"):
        parse_duration(written)


def test_parse_duration_message() -> None:
    with pytest.raises(DurationError) as caught:
        parse_duration("5x")
    assert str(caught.value) == "'5x' is not a duration (use e.g. 500ms, 30s, 5m, 12h, 1d)"


def test_jitter_forms() -> None:
    def jitter(value: str) -> tuple[float | None, float | None]:
        scan = parse_config(f"scan: {{jitter: '{value}'}}\ntargets: [a]", "c.yaml").scan
        return scan.jitter_fraction, scan.jitter_seconds

    assert jitter("25%") == (0.25, None)
    assert jitter("0%") == (0.0, None)
    assert jitter("100%") == (1.0, None)
    assert jitter("2m") == (None, 120.0)
    assert jitter("0") == (None, 0.0)


# --- hostile input: bounded time and memory, one ConfigError naming file:line ----------------


def _levels_of_aliases(levels: int = 9, fan_out: int = 9) -> str:
    """Nested anchors, each list holding `fan_out` aliases of the previous one: a few hundred
    bytes that stand for fan_out ** levels values (387 million for 9 x 9)."""
    names = "abcdefghijklmnopqrstuvwxyz"[:levels]
    parts = [f"&{names[0]} [" + ",".join(['"80"'] * fan_out) + "]"]
    for previous, current in itertools.pairwise(names):
        parts.append(f"&{current} [" + ",".join([f"*{previous}"] * fan_out) + "]")
    return "[" + ",\n  ".join(parts) + "]"


def _load_bounded(path: Path, seconds: float = 5.0, megabytes: int = 64) -> ConfigError:
    """The ConfigError of loading `path`, checked to come within `seconds` and to allocate at
    most `megabytes` at its peak (tracemalloc slows the load; the machine may be busy: the
    bound is there to catch minutes, not to time it)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < seconds, f"{elapsed:.1f}s"
    assert peak < megabytes * 1024 * 1024, f"{peak / 1e6:.0f} MB"
    assert len(str(caught.value)) < 400
    return caught.value


def test_alias_bomb_is_refused_at_the_alias_quickly(tmp_path: Path) -> None:
    # The reproduction: under 400 bytes of nested anchors inside a port list made
    # check-config run for over a minute and 2 GB, building the expanded value (and a message
    # quoting it in full).
    config = tmp_path / "config.yaml"
    config.write_text(f"targets:\n  - host: 127.0.0.1\n    ports: [{_levels_of_aliases()}]\n")
    assert len(config.read_bytes()) < 443
    error = _load_bounded(config)
    assert (error.path, error.line) == (str(config), 8)
    assert str(error) == (
        f"{config}:8: alias *e: the aliases of this file stand for more than 1,000,000 values"
        " and characters (aliases nested in aliases multiply: write the values out instead)"
    )
    # The same bomb where a whole value is read at once (vantage), and in a mapping key.
    config.write_text(f"targets: [127.0.0.1]\nvantage: {_levels_of_aliases()}\n")
    assert _load_bounded(config).line == 7
    config.write_text(f"targets: [127.0.0.1]\n? {_levels_of_aliases()}\n: 1\n")
    assert "aliases of this file stand for more than" in str(_load_bounded(config))


def test_aliases_of_long_scalars_count_their_characters(tmp_path: Path) -> None:
    # Few aliases, each standing for a long string: the characters count, not only the nodes.
    long = "80," * 100_000
    config = tmp_path / "config.yaml"
    config.write_text(
        f"targets:\n  - host: 127.0.0.1\n    exclude: &long '{long}1'\n"
        "    ports: [" + ", ".join(["*long"] * 20) + "]\n"
    )
    error = _load_bounded(config)
    assert error.line == 4 and "stand for more than 1,000,000" in error.message


def test_aliases_below_the_limit_still_work() -> None:
    # Merge keys and repeated anchors are ordinary YAML: the limit only stops multiplication.
    config = parse_config(
        "targets:\n  - &base {host: 192.0.2.250, ports: [22, 443], interval: 1h}\n"
        + "".join(f"  - {{<<: *base, host: 192.0.2.{n}}}\n" for n in range(1, 201)),
        "config.yaml",
    )
    assert len(config.hosts) == 201
    assert {(spec.ports, spec.interval) for spec in config.hosts} == {((22, 443), 3600.0)}


def test_recursive_alias_is_refused() -> None:
    assert error_of("targets:\n  - &self\n    host: 127.0.0.1\n    ports: [22, *self]\n") == (
        "config.yaml:4: alias *self refers to a collection that contains it"
        " (a recursive alias stands for an infinite value)"
    )


@pytest.mark.parametrize(
    ("opening", "closing"), [("[", "]"), ("{a: ", "}"), ("- ", ""), ("{? ", ": 1}")]
)
def test_deep_nesting_is_an_error_not_a_recursion_error(
    tmp_path: Path, opening: str, closing: str
) -> None:
    depth = 500
    config = tmp_path / "config.yaml"
    if opening == "- ":  # block style: each level indented further
        nested = "\n".join(" " * (6 + 2 * level) + "-" for level in range(depth)) + " 22"
        config.write_text(f"targets:\n  - host: 127.0.0.1\n    ports:\n{nested}\n")
    else:
        body = opening * depth + "22" + closing * depth
        config.write_text(f"targets:\n  - host: 127.0.0.1\n    ports: {body}\n")
    error = _load_bounded(config)
    assert error.message == "lists and mappings nested more than 50 levels deep"
    assert error.line is not None and error.line >= 3


def test_nesting_up_to_the_limit_is_read() -> None:
    body = "[" * MAX_DEPTH + "22" + "]" * MAX_DEPTH  # with the top-level mapping: one too many
    assert "nested more than 50 levels deep" in error_of(f"vantage: {body}\ntargets: [a]\n")
    body = "[" * (MAX_DEPTH - 1) + "22" + "]" * (MAX_DEPTH - 1)
    assert error_of(f"vantage: {body}\ntargets: [a]\n").startswith(
        "config.yaml:1: vantage: expected a short name"
    )


def test_a_long_chain_of_merges_is_an_error() -> None:
    # Merges nest without nesting in the text: 300 anchors, each merging the previous one.
    chain = "".join(
        f"  - &m{n} {{<<: *m{n - 1}, host: 192.0.2.{n % 250 + 1}}}\n" for n in range(1, 300)
    )
    message = error_of("targets:\n  - &m0 {host: 192.0.2.1}\n" + chain)
    assert "<< merges nested more than 50 levels deep" in message


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    # 50 MB of flow list took 400 s and 6.3 GB; anything past 1 MiB is refused unread.
    config = tmp_path / "config.yaml"
    with config.open("w") as out:
        out.write("targets:\n  - host: 127.0.0.1\n    ports: [")
        out.write("1-65535," * (MAX_FILE_BYTES // 8 + 1))
        out.write("22]\n")
    error = _load_bounded(config, seconds=1.0, megabytes=4)
    assert str(error) == (
        f"{config}: larger than 1 MiB, the most a configuration file may hold"
        " (a CIDR block or a port range is one line: real configurations are a few KiB)"
    )
    # At most the limit and one byte are read: an endless file is refused as quickly.
    error = _load_bounded(Path("/dev/zero"), seconds=1.0, megabytes=4)
    assert error.message.startswith("larger than 1 MiB")
    # Text given directly is held to the same limit.
    assert error_of("#" * (MAX_FILE_BYTES + 1)).startswith("config.yaml: larger than 1 MiB")


def test_a_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    head = "targets: [127.0.0.1]\n"
    config.write_text(head + "#" * (MAX_FILE_BYTES - len(head) - 1) + "\n")
    assert config.stat().st_size == MAX_FILE_BYTES
    assert [spec.host for spec in load_config(config).hosts] == ["127.0.0.1"]


def test_many_cidr_blocks_are_bounded_in_hosts() -> None:
    blocks = "".join(f"  - 10.{n}.0.0/16\n" for n in range(256))
    started = time.perf_counter()
    message = error_of(f"scan: {{max_hosts: {MAX_HOSTS}}}\ntargets:\n" + blocks)
    assert time.perf_counter() - started < 10
    assert message == (
        "config.yaml:7: targets[4]: 10.4.0.0/16: block has 65534 hosts; with the 262136 hosts"
        f" of the targets before it that is more than scan.max_hosts ({MAX_HOSTS})"
    )


HOSTILE = {
    "alias bomb": f"targets: [127.0.0.1]\nvantage: {_levels_of_aliases()}\n",
    "recursive alias": "targets: &t [*t]\n",
    "recursive merge": "targets:\n  - &t {<<: *t, host: a}\n",
    "deep lists": "targets: " + "[" * 1000 + "]" * 1000 + "\n",
    "deep mappings": "targets: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n",
    "merge chain": "targets:\n  - &m0 {host: a}\n"
    + "".join(f"  - &m{n} {{<<: *m{n - 1}, host: b{n}}}\n" for n in range(1, 1200)),
    "huge integer": "targets:\n  - host: a\n    retries: " + "9" * 5000 + "\n",
    "huge integer port": "targets:\n  - host: a\n    ports: " + "9" * 5000 + "\n",
    "huge integer duration": "targets:\n  - host: a\n    interval: " + "9" * 4000 + "\n",
    "huge integer rate": "targets:\n  - host: a\n    rate: " + "9" * 4000 + "\n",
    "huge integer in a range": "targets:\n  - host: a\n    ports: 1-" + "9" * 100_000 + "\n",
    "huge float": "targets:\n  - host: a\n    rate: 1e999\n",
    "infinite duration": "targets:\n  - host: a\n    timeout: .inf\n",
    "not a number": "targets:\n  - host: a\n    rate: .nan\n",
    "digits duration": "targets:\n  - host: a\n    interval: " + "9" * 400 + "d\n",
    "huge percentage": "scan: {jitter: '" + "9" * 400 + "%'}\ntargets: [a]\n",
    "bad timestamp": "targets: [2001-13-45]\n",
    "bad binary": "targets:\n  - host: !!binary '%%%'\n",
    "python object": "targets:\n  - host: !!python/object/apply:os.system ['true']\n",
    "python name": "targets: [!!python/name:os.system '']\n",
    "set tag": "targets: !!set {a, b}\n",
    "omap tag": "targets: !!omap [a: 1]\n",
    "local tag": "targets: [!custom a]\n",
    "long tag": "targets: [!" + "t" * 100_000 + " a]\n",
    "long key": "targets: [a]\n" + "k" * 100_000 + ": 1\n",
    "long host": "targets: ['" + "h" * 100_000 + "']\n",
    "long ports": "targets:\n  - host: a\n    ports: '" + "1," * 50_000 + "x'\n",
    "list in ports": "targets:\n  - host: a\n    ports: [[" + ", ".join(["1"] * 10_000) + "]]\n",
    "mapping key": "targets: [a]\n? [a, b]\n: 1\n",
    "null key": "targets: [a]\n~: 1\n",
    "merge of a scalar": "targets:\n  - {<<: 5, host: a}\n",
    "undefined alias": "targets: [*nowhere]\n",
    "duplicate anchor": "targets: [&a x, &a y]\n",
    "two documents": "targets: [a]\n---\ntargets: [b]\n",
    "control characters": "targets: [a\x00b]\n",
    "tabs": "targets:\n\t- a\n",
    "only a scalar": "hello\n",
    "stray bytes": "targets: [a]\n\x1b[31m\n",
    "absurd values": "defaults: {retries: 1000000, concurrency: 10000000}\ntargets: [a]\n",
}


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_input_gives_only_config_error(text: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "config.yaml")
    assert time.perf_counter() - started < 2
    assert str(caught.value).startswith("config.yaml")
    assert len(str(caught.value)) <= 1200


def test_binary_garbage_gives_only_config_error(tmp_path: Path) -> None:
    rng = random.Random(10)
    config = tmp_path / "config.yaml"
    for size in (1, 100, 10_000, 100_000):
        for _ in range(5):
            config.write_bytes(bytes(rng.randrange(256) for _ in range(size)))
            with pytest.raises(ConfigError):
                load_config(config)
    # Text that decodes but means nothing: printable noise with YAML punctuation.
    alphabet = "[]{}:-?&*!|>'\"%@`#,\n \t" + "abc123"
    for _ in range(200):
        noise = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 400)))
        with contextlib.suppress(ConfigError):
            parse_config(noise, "config.yaml")


def test_values_quoted_in_messages_are_cut_short() -> None:
    message = error_of("targets:\n  - host: a\n    ports: '" + "x" * 5000 + "'\n")
    assert message == (
        "config.yaml:3: targets[0].ports: '" + "x" * 80 + "...' is not a port set"
        " (use top100, top1000, all, N, N-M or a list)"
    )
    message = error_of("targets:\n  - host: a\n    retries: '" + "y" * 5000 + "'\n")
    assert message == (
        "config.yaml:3: targets[0].retries: expected an integer, got string '" + "y" * 80 + "...'"
    )
    message = error_of("targets: [a]\n? " + "k" * 5000 + "\n: 1\n")
    assert message.startswith("config.yaml:2: " + "k" * 80 + "...: unknown key (valid keys: ")
    assert describe("z" * 1000) == "string '" + "z" * 80 + "...'"
    assert describe(int("9" * 4000)) == "integer " + "9" * 80 + "..."


# --- ranges ----------------------------------------------------------------------------------

# (section, key, smallest, largest, just below, just above): the documented ranges.
RANGES = [
    ("defaults", "interval", "1s", "365d", "999ms", "366d"),
    ("defaults", "timeout", "10ms", "5m", "9ms", "301s"),
    ("defaults", "retries", "0", "10", "-1", "11"),
    ("defaults", "concurrency", "1", "65535", "0", "65536"),
    ("defaults", "rate", "0", "1000000", "-0.5", "1000000.5"),
    ("defaults", "confirmations", "1", "10", "0", "11"),
    ("defaults", "confirm_after", "0s", "30d", "-1", "31d"),
    ("scan", "max_concurrent_hosts", "1", "4096", "0", "4097"),
    ("scan", "max_probes", "1", "1048576", "0", "1048577"),
    ("scan", "processes", "0", "64", "-1", "65"),
    ("scan", "jitter", "0s", "365d", "-1s", "366d"),
    ("scan", "max_hosts", "1", "262144", "0", "262145"),
    ("fingerprint", "timeout", "10ms", "10m", "9ms", "601s"),
    ("fingerprint", "max_bytes", "1", "16777216", "0", "16777217"),
    ("fingerprint", "concurrency", "1", "4096", "0", "4097"),
    ("storage", "retention", "1h", "3650d", "59m", "3651d"),
]


@pytest.mark.parametrize(
    ("section", "key", "low", "high", "below", "above"),
    RANGES,
    ids=[f"{section}.{key}" for section, key, *_ in RANGES],
)
def test_every_number_has_a_range_stated_in_its_message(
    section: str, key: str, low: str, high: str, below: str, above: str
) -> None:
    def text(written: str) -> str:
        return f"{section}:\n  {key}: {written}\ntargets: [127.0.0.1]\n"

    parse_config(text(low), "config.yaml")
    parse_config(text(high), "config.yaml")
    for bad in (below, above):
        message = error_of(text(bad))
        assert message.startswith(f"config.yaml:2: {section}.{key}: ")
        if key != "jitter" and bad != "-1":  # those two are not durations at all
            assert f"must be between {low} and {high}, got " in message, message


def test_the_ranges_cover_every_numeric_key_and_are_documented() -> None:
    numeric = {
        (section, name)
        for section, fields in SECTIONS.items()
        for name, field in fields.items()
        if name not in {"ports", "exclude", "expected_open", "enabled", "nmap_service_probes"}
        and name != "path"
    }
    assert numeric == {(section, key) for section, key, *_ in RANGES}
    example = (REPO / "config.example.yaml").read_text()
    readme = (REPO / "README.md").read_text()
    for _, key, low, high, *_ in RANGES:
        for document in (example, readme):
            documented = [
                line.replace(",", "").replace("_", "")
                for line in document.splitlines()
                if line.strip().startswith(f"{key}:")
            ]
            assert any(f"{low}..{high}" in line for line in documented), (key, documented)


def test_configs_the_tests_write_stay_valid() -> None:
    # Short settings the end-to-end tests rely on (fast daemons) stay inside the ranges.
    config = parse_config(
        "defaults:\n  interval: 1500ms\n  confirm_after: 700ms\n  timeout: 300ms\n"
        "scan:\n  jitter: 0s\nfingerprint:\n  timeout: 1s\ntargets: [127.0.0.1]\n",
        "config.yaml",
    )
    (spec,) = config.hosts
    assert (spec.interval, spec.confirm_after, spec.timeout) == pytest.approx((1.5, 0.7, 0.3))


@pytest.mark.parametrize(
    ("seconds", "written"),
    [
        (0.0, "0s"),
        (0.01, "10ms"),
        (1.0, "1s"),
        (1.5, "1500ms"),
        (300.0, "5m"),
        (86400.0 * 365, "365d"),
        (5400.0, "90m"),
        (0.0001, "0.0001s"),
    ],
)
def test_format_duration(seconds: float, written: str) -> None:
    assert format_duration(seconds) == written
    assert parse_duration(written) == pytest.approx(seconds)


def test_durations_too_long_for_a_float_are_refused() -> None:
    for written in ("9" * 400 + "s", 10**400, "9" * 400, float("inf")):
        with pytest.raises(DurationError, match="too long to be a duration"):
            parse_duration(written)


# --- paths checked by check-config -----------------------------------------------------------


def _check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = check_config.check(str(config))
    captured = capsys.readouterr()
    return code, (captured.err or captured.out).strip()


def test_check_config_refuses_an_unusable_storage_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-file").write_text("")

    def storage(path: str) -> tuple[int, str]:
        config.write_text(f"targets: [127.0.0.1]\nstorage:\n  path: {path}\n")
        return _check(config, capsys)

    assert storage("a-directory") == (
        1,
        f"{config}:3: storage.path: {tmp_path / 'a-directory'} is a directory"
        " (storage.path names the SQLite database file)",
    )
    assert storage("/dev/null") == (
        1,
        f"{config}:3: storage.path: /dev/null is not a regular file"
        " (storage.path names the SQLite database file)",
    )
    assert storage("a-file/db.sqlite") == (
        1,
        f"{config}:3: storage.path: {tmp_path / 'a-file' / 'db.sqlite'} cannot be created:"
        f" {tmp_path / 'a-file'} is not a directory",
    )
    # Usable: an existing database, a new one, a new one in directories still to be made.
    for usable in ("a-file", "new.sqlite", "state/deeper/new.sqlite"):
        code, out = storage(usable)
        assert code == 0 and out.endswith("ok (1 hosts, 1000 host ports)")
    # Plain loading (what `history` does on a read-only copy) does not check the store.
    config.write_text("targets: [127.0.0.1]\nstorage:\n  path: /dev/null\n")
    assert load_config(config).storage.path == Path("/dev/null")
    with pytest.raises(ConfigError):
        load_config(config, check_paths=True)


def _as_ordinary_user(text: str, path: Path) -> str:
    """The error of `parse_config(text, path, check_paths=True)` run as an ordinary user:
    permissions do not bind root, so as root the check runs in a child that drops to nobody."""

    def check() -> str:
        try:
            parse_config(text, path, check_paths=True)
        except ConfigError as exc:
            return str(exc)
        return "ok"

    if os.geteuid() != 0:
        return check()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, check, report, leave without cleanup
        status = 1
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, check().encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert status == 0
    return answer


def test_check_config_refuses_a_read_only_storage_location() -> None:
    # A directory an ordinary user can reach (pytest's own tmp_path is private to root).
    with tempfile.TemporaryDirectory() as name:
        top = Path(name)
        top.chmod(0o755)
        locked = top / "locked"
        locked.mkdir()
        (locked / "old.sqlite").write_text("")
        (locked / "old.sqlite").chmod(0o444)
        locked.chmod(0o555)
        config = top / "config.yaml"

        def storage(path: Path) -> str:
            return _as_ordinary_user(f"targets: [a]\nstorage:\n  path: {path}\n", config)

        assert storage(locked / "sub" / "db.sqlite") == (
            f"{config}:3: storage.path: {locked / 'sub' / 'db.sqlite'} cannot be created:"
            f" {locked} is not writable by this user"
        )
        assert storage(locked / "old.sqlite") == (
            f"{config}:3: storage.path: {locked / 'old.sqlite'} is not readable and writable"
            " by this user"
        )
        top.chmod(0o1777)
        assert storage(top / "new.sqlite") == "ok"
        locked.chmod(0o755)


def test_nmap_service_probes_must_look_like_the_probe_database(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"

    def probes(path: Path | str) -> str:
        return error_of(
            f"fingerprint:\n  nmap_service_probes: {path}\ntargets: [127.0.0.1]\n", config
        )

    # /etc/shadow is readable by root, and still no probe file.
    for system_file in ("/etc/shadow", "/etc/passwd"):
        if Path(system_file).exists():
            assert probes(system_file) == (
                f"{config}:2: fingerprint.nmap_service_probes: '{system_file}' is not an"
                " nmap-service-probes file (no 'Probe TCP' line in its first 64 KiB)"
            )
    assert probes("/dev/null").endswith("'/dev/null' is not a file")
    # A probe line past the first 64 KiB does not count: the check stays cheap.
    late = tmp_path / "late-probes"
    late.write_text("#" * 70_000 + "\nProbe TCP NULL q||\n")
    assert "is not an nmap-service-probes file" in probes(late)
    nmap = Path("/usr/share/nmap/nmap-service-probes")
    if nmap.exists():
        loaded = parse_config(
            f"fingerprint:\n  nmap_service_probes: {nmap}\ntargets: [127.0.0.1]\n", config
        )
        assert loaded.fingerprint.nmap_service_probes == nmap


def test_the_daemon_refuses_an_unusable_store_path_at_start(tmp_path: Path) -> None:
    """One line naming the file, line and key, instead of a traceback from SQLite."""
    config = tmp_path / "config.yaml"
    config.write_text("storage:\n  path: /dev/null\ntargets: [192.0.2.1]\n")
    started = subprocess.run(
        [sys.executable, "-m", "exporter", "--config", str(config), "--web.listen-address", ":0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 1
    assert started.stderr == (
        f"portscan-exporter: {config}:2: storage.path: /dev/null is not a regular file"
        " (storage.path names the SQLite database file)\n"
    )
