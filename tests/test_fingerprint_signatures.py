"""Signature database, PCRE on `regex` and sanitizing: the parts of fingerprinting without I/O."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from exporter.fingerprint import SignatureDB, SignatureError, sanitize, tls_service_name
from exporter.fingerprint.pcre import UnsupportedPattern, compile_pcre, pcre_to_regex, search
from exporter.fingerprint.probefile import PortRanges, decode_payload
from exporter.fingerprint.signatures import MATCH_TIME_LIMIT, NULL_PROBE, RULE_TIME_LIMIT
from exporter.model import ServiceIdentity

NMAP_PROBES = Path("/usr/share/nmap/nmap-service-probes")

# -- sanitize -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", "SSH-2.0-OpenSSH_9.2p1\\r\\n"),
        (b"a\x00b\x1b[31mc", "a\\x00b\\x1b[31mc"),
        (b"caf\xc3\xa9 ok", "caf\u00e9 ok"),  # printable UTF-8 is kept
        (b"bad \xff\xfe utf8", "bad \\xff\\xfe utf8"),  # invalid bytes shown as bytes
        ("line\u2028sep\u200bzw", "line\\u2028sep\\u200bzw"),  # invisible code points escaped
        ("tab\there", "tab\\there"),
        ("", ""),
    ],
)
def test_sanitize_escapes(raw: str | bytes, expected: str) -> None:
    assert sanitize(raw) == expected


def test_sanitize_caps_length_and_marks_the_cut() -> None:
    assert sanitize("x" * 300, 10) == "x" * 9 + "\u2026"
    assert sanitize("x" * 10, 10) == "x" * 10
    # An escape is never split in half by the cut.
    cut = sanitize(b"abcdefgh\x00\x00\x00", 11)
    assert cut == "abcdefgh\u2026" and len(cut) <= 11
    assert sanitize("anything", 0) == ""


def test_sanitize_handles_a_10_mb_banner_quickly() -> None:
    banner = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    started = time.monotonic()
    text = sanitize(banner, 256)
    assert time.monotonic() - started < 0.1
    assert len(text) <= 256 and text.isprintable() and text.endswith("\u2026")


# -- the file format ---------------------------------------------------------------------------

INLINE = r"""
Exclude 9100-9102,U:53
Probe TCP NULL q||
totalwaitms 2000
ports 22,2222
match ssh m|^SSH-([\d.]+)-OpenSSH_([\w.]+)\r?\n| p/OpenSSH/ v/$2/ i/protocol $1/
softmatch ftp m|^220[ -]|

Probe TCP hello q|HELLO {host}\r\n\x00|
rarity 3
ports 7000-7010
sslports 7443
fallback other
match demo m|^OK demo/([\d_]+)\.(\d) b=(\S+) h=(\S+)| p/Demo/ v/$SUBST(1,"_",".").$2/ i/$P(3)/ h/$4/
match demo-bin m|^BIN(..)|s p/Binary demo/ v/$I(1,">")/
softmatch demo m|^OK |

Probe TCP other q|X|
rarity 8
match demo m|^OK legacy| p/Demo legacy/
"""


def test_inline_database_parses_probes_rules_and_excludes() -> None:
    db = SignatureDB.from_text(INLINE)
    assert [p.name for p in db.probes] == [NULL_PROBE, "hello", "other"]
    hello = db.probe("hello")
    assert hello is not None
    assert hello.payload == b"HELLO {host}\r\n\x00" and hello.templated
    assert hello.render("www.example.test:7001") == b"HELLO www.example.test:7001\r\n\x00"
    assert hello.rarity == 3 and 7005 in hello.ports and 7443 in hello.ssl_ports
    assert 9101 in db.excluded and 53 not in db.excluded and 9103 not in db.excluded
    null = db.probe(NULL_PROBE)
    assert null is not None and null.wait == 2.0


def test_templates_fill_captures() -> None:
    db = SignatureDB.from_text(INLINE)
    found = db.match("hello", b"OK demo/4_1.7 b=\x01ab\x7fc h=h1.example\r\n")
    assert found is not None
    assert (found.service, found.product, found.version) == ("demo", "Demo", "4.1.7")
    assert found.extra == "abc; host: h1.example"
    binary = db.match("hello", b"BIN\x01\x02")
    assert binary is not None and binary.version == "258"


def test_hard_match_beats_soft_and_fallbacks_and_null_apply() -> None:
    db = SignatureDB.from_text(INLINE)
    soft = db.match("hello", b"OK something else")
    assert soft is not None and soft.soft and soft.service == "demo"
    # The fallback probe's rules apply to answers to "hello".
    legacy = db.match("hello", b"OK legacy")
    assert legacy is not None and legacy.product == "Demo legacy" and not legacy.soft
    # NULL's rules apply to every answer: a late banner is still recognised.
    late = db.match("other", b"SSH-2.0-OpenSSH_9.2p1\r\n")
    assert late is not None and (late.product, late.version) == ("OpenSSH", "9.2p1")
    # ... but a probe's rules do not apply to other probes' answers.
    assert db.match(NULL_PROBE, b"BIN\x01\x02") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("match ssh m|^SSH| p/x/", "before the first Probe"),
        ("Probe TCP NULL q||\nmatch ssh m|^SSH-(| p/x/", "bad pattern"),
        ("Probe TCP NULL q||\nmatch ssh m|^SSH p/x/", "unterminated pattern"),
        ("Probe TCP NULL q||\nmatch ssh m|^SSH| p/x", "unterminated product field"),
        ("Probe TCP NULL q||\nmatch ssh m|^SSH|x p/x/", "unknown pattern option 'x'"),
        ("Probe TCP NULL q||\nwaitfor 3", "unknown directive 'waitfor'"),
        ("Probe TCP NULL q||\nports 80-70", "bad port range"),
        ("Probe TCP NULL q||\ntotalwaitms soon", "expected a number"),
        ("Probe TCP hello HELLO", "expected a payload"),
    ],
)
def test_bad_lines_are_reported_with_their_line_number(text: str, message: str) -> None:
    with pytest.raises(SignatureError) as raised:
        SignatureDB.from_text("# comment\n" + text, source="inline")
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"inline:{text.count(chr(10)) + 2}:")


def test_payload_escapes() -> None:
    assert decode_payload(r"a\r\n\0\x41\\\t\xzz") == b"a\r\n\x00A\\\t" + b"xzz"


def test_port_ranges() -> None:
    ranges = PortRanges.parse("T:21-23,80,U:53,161,T:443")
    assert [p for p in (21, 22, 23, 24, 53, 80, 161, 443) if p in ranges] == [21, 22, 23, 80, 443]
    with pytest.raises(ValueError, match="bad port range"):
        PortRanges.parse("70000")


# -- the built-in database --------------------------------------------------------------------


def test_builtin_database_loads() -> None:
    db = SignatureDB.builtin()
    assert db is SignatureDB.builtin()  # parsed once
    names = {rule.service for _, rule in db.rules}
    for service in ("ssh", "http", "smtp", "imap", "pop3", "ftp", "mysql", "postgresql"):
        assert service in names
    for service in ("redis", "memcached", "mongodb"):
        assert service in names
    assert 9100 in db.excluded  # printers print what they receive


def test_plan_orders_probes_by_port_then_rarity() -> None:
    db = SignatureDB.builtin()
    assert [p.name for p in db.plan(6379, 7)][:2] == ["redis", "http-get"]
    assert db.plan(443, 7)[0].tls_handshake
    assert db.plan(993, 7)[0].tls_handshake
    unknown = [p.name for p in db.plan(40000, 7)]
    assert unknown[:2] == ["http-get", "tls-handshake"]
    assert "mongodb" not in [p.name for p in db.plan(40000, 5)]  # rarity 6 > intensity 5
    assert db.plan(9100, 9) == []
    assert db.inner_plan(443, 7)[0].name == "http-get"


def test_mongodb_probe_is_a_well_formed_op_msg() -> None:
    probe = SignatureDB.builtin().probe("mongodb")
    assert probe is not None
    payload = probe.payload
    length, _request, response_to, opcode, flags, kind = struct.unpack_from("<iiiiIB", payload)
    assert (length, response_to, opcode, flags, kind) == (len(payload), 0, 2013, 0, 0)
    (doc_length,) = struct.unpack_from("<i", payload, 21)
    assert 21 + doc_length == len(payload)
    assert b"\x10buildinfo\x00\x01\x00\x00\x00" in payload and b"admin\x00" in payload


def test_postgresql_probe_is_a_startup_packet_with_an_unsupported_version() -> None:
    probe = SignatureDB.builtin().probe("postgresql")
    assert probe is not None
    assert struct.unpack("!ihh", probe.payload) == (8, 0, 0)


def _identity(probe: str, answer: bytes) -> ServiceIdentity:
    found = SignatureDB.builtin().match(probe, answer)
    assert found is not None, answer
    return ServiceIdentity(found.service, found.product, found.version, found.extra)


def _mysql_greeting(version: bytes, thread: int, salt: bytes) -> bytes:
    body = b"\x0a" + version + b"\x00" + struct.pack("<I", thread) + salt[:8] + b"\x00"
    body += b"\xfe\xf7\x08\x02\x00\xff\x81\x15" + b"\x00" * 10 + salt[8:] + b"\x00"
    body += b"mysql_native_password\x00"
    return struct.pack("<I", len(body))[:3] + b"\x00" + body


# Pairs of answers from the same server that differ only in volatile parts: uptime
# counters, timestamps, salts, connection ids, cookies. Their identities must be equal.
VOLATILE = [
    (
        NULL_PROBE,
        _mysql_greeting(b"5.5.5-10.11.19-MariaDB-0+deb12u1", 4, b"Zx!9a0bC#dE%fG^hIj&k"),
        _mysql_greeting(b"5.5.5-10.11.19-MariaDB-0+deb12u1", 91823, b"q1w2e3r4t5y6u7i8o9p0"),
    ),
    (
        NULL_PROBE,
        b"220 mx.example.org ESMTP Exim 4.96 Thu, 26 Nov 2026 09:44:39 +0000\r\n",
        b"220 mx.example.org ESMTP Exim 4.96 Fri, 27 Nov 2026 23:01:02 +0000\r\n",
    ),
    (
        NULL_PROBE,
        b"220 mx.example.org ESMTP Sendmail 8.17.1/8.17.1; Thu, 26 Nov 2026 09:44:39 GMT\r\n",
        b"220 mx.example.org ESMTP Sendmail 8.17.1/8.17.1; Sat, 28 Nov 2026 01:02:03 GMT\r\n",
    ),
    (
        NULL_PROBE,
        b"+OK Dovecot (Debian) ready. <1f2e.3@mail.example.org>\r\n",
        b"+OK Dovecot (Debian) ready. <9a8b.1@mail.example.org>\r\n",
    ),
    (
        "redis",
        b"$120\r\n# Server\r\nredis_version:7.0.15\r\nrun_id:0a1b2c\r\nredis_mode:standalone\r\n"
        b"uptime_in_seconds:12\r\n",
        b"$120\r\n# Server\r\nredis_version:7.0.15\r\nrun_id:ffee99\r\nredis_mode:standalone\r\n"
        b"uptime_in_seconds:864000\r\n",
    ),
    (
        "http-get",
        b"HTTP/1.1 200 OK\r\nDate: Thu, 26 Nov 2026 09:44:39 GMT\r\nSet-Cookie: sid=abc\r\n"
        b'Server: Apache/2.4.57 (Debian)\r\nETag: "1"\r\n\r\n',
        b"HTTP/1.1 200 OK\r\nDate: Sun, 29 Nov 2026 11:00:00 GMT\r\nSet-Cookie: sid=zzz\r\n"
        b'Server: Apache/2.4.57 (Debian)\r\nETag: "2"\r\n\r\n',
    ),
]


@pytest.mark.parametrize(("probe", "first", "second"), VOLATILE)
def test_volatile_parts_never_reach_the_fingerprint(
    probe: str, first: bytes, second: bytes
) -> None:
    one, two = _identity(probe, first), _identity(probe, second)
    assert one.product and one == two
    assert one.fingerprint == two.fingerprint


def test_distribution_patch_level_goes_to_extra_not_version() -> None:
    ssh = _identity(NULL_PROBE, b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10\r\n")
    assert (ssh.product, ssh.version) == ("OpenSSH", "9.2p1")
    assert "Debian-2+deb12u10" in ssh.extra
    maria = _identity(
        NULL_PROBE, _mysql_greeting(b"5.5.5-10.11.19-MariaDB-0+deb12u1", 1, b"x" * 20)
    )
    assert (maria.product, maria.version, maria.extra) == ("MariaDB", "10.11.19", "0+deb12u1")


def test_captured_text_is_sanitized_and_capped() -> None:
    hostile = b"HTTP/1.1 200 OK\r\nServer: " + b"\x1b[2J" + b"A" * 500 + b"\r\n\r\n"
    found = SignatureDB.builtin().match("http-get", hostile)
    assert found is not None
    assert found.product.isprintable() and len(found.product) <= 80


def test_tls_answers_to_plain_http_point_to_tls() -> None:
    nginx_400 = (
        b"HTTP/1.1 400 Bad Request\r\nServer: nginx/1.22.1\r\n\r\n<html><body>"
        b"The plain HTTP request was sent to HTTPS port</body></html>"
    )
    found = SignatureDB.builtin().match("http-get", nginx_400)
    assert found is not None and found.service == "ssl/http"


@pytest.mark.parametrize(
    ("inner", "name"),
    [("http", "https"), ("imap", "imaps"), ("pop3", "pop3s"), ("smtp", "smtps"),
     ("https", "https"), ("", "tls"), ("unknown", "tls"), ("redis", "tls/redis")],
)  # fmt: skip
def test_tls_service_names(inner: str, name: str) -> None:
    assert tls_service_name(inner) == name


# -- PCRE on the regex package ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pcre", "rewritten"),
    [
        (r"^a\Q.*+?\Eb", r"^a\.\*\+\?b"),
        (r"[\Q]\E]x", r"[\]]x"),
        (r"^x\Z", r"^x(?=\n?\z)"),
        (r"a\hb[\h]", r"a[\t \xa0]b[\t \xa0]"),
        (r"\v\V\H\N", r"[\n\x0b\x0c\r\x85][^\n\x0b\x0c\r\x85][^\t \xa0][^\n]"),
        (r"\e\cA\x{41}\x7\x", r"\x1b\x01\x41\x07\x00"),
        (r"(?<v>\d+)-\k<v>-\k{v}", r"(?<v>\d+)-(?P=v)-(?P=v)"),
        (r"(?'v'a)\k'v'", r"(?P<v>a)(?P=v)"),
        (r"a{2}b{2,}c{2,3}\d+{i}{,3}[{]", r"a{2}b{2,}c{2,3}\d+\{i}\{,3}[{]"),
    ],
)
def test_what_regex_lacks_is_rewritten(pcre: str, rewritten: str) -> None:
    assert pcre_to_regex(pcre) == rewritten
    compile_pcre(pcre)


@pytest.mark.parametrize(
    "pcre",
    [
        r"^SSH-([\d.]+)-OpenSSH_([\w._-]+)\r\n",
        r"(a|(?R))",
        r"a\Kb",
        r"(?|(a)|(b))",
        r"(a)?(?(1)b|c)",
        r"a(?i)b",
        r"a*+b++(?>c)",
        r"[[:alpha:][:digit:]_]",
        r"[]a[]",
        r"\x41\0\012",
    ],
)
def test_what_regex_runs_is_left_as_written(pcre: str) -> None:
    assert pcre_to_regex(pcre) == pcre


@pytest.mark.parametrize(
    ("pcre", "data", "expected"),
    [
        # Features Python's re lacks, with PCRE's meaning.
        (r"^(\((?:[^()]|(?1))*\))", b"((a)(b))c", b"((a)(b))"),  # recursion
        (r"^KEEP\K(\d+)", b"KEEP42", b"42"),  # \K: the match starts at 42
        (r"^(?:(a)|b)(?(1)x|y)", b"by", b"by"),  # conditional
        (r"^(?|v(\d+)|ver (\d+))", b"ver 7", b"ver 7"),  # branch reset: both are group 1
        (r"^A(?i)bc", b"ABC", b"ABC"),  # a flag switched on halfway...
        (r"^A(?i)bc", b"aBC", None),  # ... applies from there on only
        (r"^(a(?i)b)c", b"aBC", None),  # ... and only to the end of its group
        (r"^x\Z", b"x\n", b"x"),  # PCRE's \Z allows a final newline
        (r"^x\z", b"x\n", None),
        (r"^[[:punct:]]+", b"$+<=>^`|~!", b"$+<=>^`|~!"),
        (r"^\w+", b"caf\xe9", b"caf"),  # ASCII semantics, as PCRE on bytes
    ],
)
def test_patterns_mean_what_they_mean_to_pcre(pcre: str, data: bytes, expected: bytes) -> None:
    found = compile_pcre(pcre).search(data)
    assert (found.group(0) if found else None) == expected
    if pcre == r"^(?|v(\d+)|ver (\d+))" and found is not None:
        assert found.group(1) == b"7"


@pytest.mark.parametrize(
    "pcre", [r"\x{263a}", r"(\d)\g{1}", r"(?<n>a)\g<n>", r"a\Cb", r"\k", r"\x{zz}"]
)
def test_what_regex_would_misread_is_refused(pcre: str) -> None:
    with pytest.raises(UnsupportedPattern):
        pcre_to_regex(pcre)


# A pattern that backtracks exponentially when the answer almost matches.
PATHOLOGICAL = "^(a|aa)+$"
ALMOST = b"a" * 64 + b"!"


def test_a_pathological_pattern_costs_at_most_the_rule_limit() -> None:
    slow = compile_pcre(PATHOLOGICAL)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        search(slow, ALMOST, 0.2)
    assert time.monotonic() - started < 0.2 + 0.3


def test_matching_a_hostile_answer_is_bounded() -> None:
    # One slow rule times out and does not match; the rule after it still does.
    one = SignatureDB.from_nmap_text(
        f"Probe TCP NULL q||\nmatch slow m/{PATHOLOGICAL}/\nmatch fine m|^a+!| p/Fine/\n"
    )
    started = time.monotonic()
    found = one.match(NULL_PROBE, ALMOST)
    assert RULE_TIME_LIMIT * 0.9 <= time.monotonic() - started < RULE_TIME_LIMIT + 0.3
    assert found is not None and found.product == "Fine"
    # Many slow rules: the whole call stops at its own limit, not at many rule limits.
    many = SignatureDB.from_nmap_text(
        "Probe TCP NULL q||\n" + f"match slow m/{PATHOLOGICAL}/\n" * 40
    )
    assert 40 * RULE_TIME_LIMIT > 2 * MATCH_TIME_LIMIT
    started = time.monotonic()
    assert many.match(NULL_PROBE, ALMOST) is None
    assert MATCH_TIME_LIMIT * 0.9 <= time.monotonic() - started < MATCH_TIME_LIMIT + 0.3


NMAP_STYLE = r"""
Exclude T:9100-9107
Probe TCP NULL q||
totalwaitms 6000
match ssh m|^SSH-([\d.]+)-Fancy_([\w.]+)\r\n| p/Fancy SSH/ v/$2/ cpe:/a:fancy:ssh:$2/
match recursive m/^(\((?:[^()]|(?1))*\))/ p/Lisp/
match keep m|^KEEP\K(\d+)| p/Keeper/ v/$1/
match wide m|^\x{263a}| p/skipped: code point above 0xFF/
match broken m|^(unbalanced| p/skipped: regex rejects it/
softmatch thing m|^THING| p/Thing/
Probe UDP DNSStatusRequest q|\0\0\x10\0|
match dns m|^\0\0\x90| p/UDP only/
Probe TCP GetRequest q|GET / HTTP/1.0\r\n\r\n|
rarity 1
ports 80
sslports 443
match http m|^HTTP/1\.[01] \d\d\d .*\r\nServer: Fancy/(\d+)|s p/Fancy httpd/ v/$1/
"""


def test_nmap_dialect_skips_and_counts_what_cannot_run(tmp_path: Path) -> None:
    nmap = SignatureDB.from_nmap_text(NMAP_STYLE)
    assert nmap.skipped_nmap_rules == 2
    assert nmap.nmap_rules == 5  # the UDP probe and its rule are ignored
    assert [p.name for p in nmap.probes] == [NULL_PROBE, "GetRequest"]
    lisp = nmap.match(NULL_PROBE, b"((a)(b))")
    assert lisp is not None and lisp.product == "Lisp"
    keeper = nmap.match(NULL_PROBE, b"KEEP42")
    assert keeper is not None and keeper.version == "42"

    path = tmp_path / "nmap-service-probes"
    path.write_text(NMAP_STYLE, encoding="latin-1")
    merged = SignatureDB.builtin().merged_with_nmap(path)
    assert merged.skipped_nmap_rules == 2
    assert [p.name for p in merged.probes][-1] == "GetRequest"
    fancy = merged.match(NULL_PROBE, b"SSH-2.0-Fancy_1.2\r\n")
    assert fancy is not None and (fancy.product, fancy.version) == ("Fancy SSH", "1.2")
    # Built-in rules keep priority over nmap's for the same answer.
    openssh = merged.match(NULL_PROBE, b"SSH-2.0-OpenSSH_9.2p1\r\n")
    assert openssh is not None and openssh.rule.source == "builtin"
    # Our HTTP probe falls back to nmap's GetRequest rules.
    answer = b"HTTP/1.0 200 OK\r\nX: y\r\nServer: Fancy/7\r\n\r\n"
    http = merged.match("http-get", answer)
    assert http is not None and (http.product, http.version) == ("Fancy httpd", "7")


@pytest.mark.skipif(not NMAP_PROBES.exists(), reason="nmap not installed (Debian package nmap)")
def test_the_installed_nmap_database_loads() -> None:
    merged = SignatureDB.builtin().merged_with_nmap(NMAP_PROBES)
    assert merged.nmap_rules > 10000
    # The regex package runs every one of them (bench/nmap_probe_rules.py counts them).
    assert merged.skipped_nmap_rules == 0
    assert 9100 in merged.excluded
    found = merged.match("Memcache", b"STAT pid 1\r\nSTAT uptime 5\r\nSTAT time 1\r\n")
    assert found is not None and found.service == "memcached"
