"""Config loading and validation: exact error messages, defaults, targets, paths."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

import pytest

from exporter.config import (
    SECTIONS,
    TARGET_FIELDS,
    Config,
    ConfigError,
    HostSpec,
    load_config,
    parse_config,
)
from exporter.durations import DurationError, parse_duration
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
    assert config.scan.max_concurrent_hosts == 4
    assert config.scan.max_probes == 4096
    assert (config.scan.jitter_fraction, config.scan.jitter_seconds) == (0.1, None)
    assert config.scan.max_cidr_hosts == 65536
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
    assert config.scan.max_cidr_hosts == 1024
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

    assert error_of("scan: {max_cidr_hosts: 8}\ntargets: [192.0.2.0/28]") == (
        "config.yaml:2: targets[0]: 192.0.2.0/28: block has 16 hosts, "
        "more than scan.max_cidr_hosts (8)"
    )
    assert hosts("scan: {max_cidr_hosts: 8}\ntargets: [192.0.2.0/29]")[-1] == "192.0.2.6"


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
