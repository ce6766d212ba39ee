"""The exporter-toolkit web config: exact error messages, TLS contexts, bcrypt basic auth."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import bcrypt
import pytest

from exporter.config import ConfigError
from exporter.web.basic_auth import BasicAuthenticator
from exporter.web.config_source import WebConfigSource
from exporter.web.tls import build_ssl_context
from exporter.web.webconfig import (
    RateLimit,
    WebConfig,
    WebConfigError,
    load_web_config,
    parse_web_config,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "webconfig"
BAD = sorted((FIXTURES / "bad").glob("*.yml"))

requires_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl binary (Debian package openssl)"
)


def make_cert(
    directory: Path,
    name: str,
    *,
    cn: str = "localhost",
    san: str = "DNS:localhost,IP:127.0.0.1",
) -> tuple[Path, Path]:
    """A self-signed P-256 certificate (by default for localhost and 127.0.0.1): (cert, key)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN={cn}", "-addext", f"subjectAltName={san}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


def hash_password(password: str) -> str:
    # Cost 4 keeps the tests fast; htpasswd writes the $2y$ prefix, which must be accepted.
    return "$2y$" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()[4:]


# --- bad files: one fixture per mistake, each with its exact message ---------------------------


@pytest.mark.parametrize("fixture", BAD, ids=[path.stem for path in BAD])
def test_bad_fixture_reports_exact_message(fixture: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = fixture.with_suffix(".expected").read_text().strip()
    monkeypatch.chdir(fixture.parent)
    with pytest.raises(WebConfigError) as caught:
        load_web_config(fixture.name)
    assert str(caught.value) == expected
    # The message always names the file and, but for syntax errors, the key.
    assert str(caught.value).startswith(f"{fixture.name}:")
    assert caught.value.line is not None


def test_every_bad_fixture_has_an_expected_message() -> None:
    assert {p.stem for p in BAD} == {p.stem for p in (FIXTURES / "bad").glob("*.expected")}
    assert len(BAD) >= 20


def test_web_config_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_web_config("basic_auth_user:\n  alice: x\n", "web.yml")
    assert str(caught.value) == (
        "web.yml:1: basic_auth_user: unknown key (did you mean 'basic_auth_users'?)"
    )
    assert caught.value.key == "basic_auth_user"


def test_a_missing_file_is_reported() -> None:
    with pytest.raises(WebConfigError, match=r"^/nonexistent/web\.yml: cannot read: "):
        load_web_config("/nonexistent/web.yml")


def test_the_error_for_a_bad_hash_never_echoes_it() -> None:
    with pytest.raises(WebConfigError) as caught:
        parse_web_config("basic_auth_users:\n  alice: 'secret-password'\n", "web.yml")
    assert "secret-password" not in str(caught.value)


# --- good files --------------------------------------------------------------------------------


def test_empty_file_means_no_tls_and_no_auth() -> None:
    config = load_web_config(FIXTURES / "good" / "empty.yml")
    assert config.tls_server_config is None
    assert not config.auth_enabled
    assert config.path == FIXTURES / "good" / "empty.yml"


def test_basic_auth_users_and_excluded_paths() -> None:
    config = load_web_config(FIXTURES / "good" / "basic-auth.yml")
    assert config.auth_enabled
    assert sorted(config.basic_auth_users) == ["alice", "bob"]
    assert config.auth_excluded_paths == ("/-/healthy",)
    # The hashes are kept as written, whatever quoting the file used.
    assert all(h.startswith("$2y$04$") for h in config.basic_auth_users.values())
    assert "$2y$" not in repr(config)


def test_headers_http2_and_rate_limit() -> None:
    config = load_web_config(FIXTURES / "good" / "headers-and-rate-limit.yml")
    assert dict(config.headers) == {
        "X-Frame-Options": "deny",
        "X-Content-Type-Options": "nosniff",
        "Strict-Transport-Security": "max-age=31536000",
    }  # a blank value leaves the header unset
    assert config.http2 is False
    assert config.rate_limit == RateLimit(interval=0.1, burst=20)


def test_empty_tls_section_and_zero_rate_limit_are_off() -> None:
    config = load_web_config(FIXTURES / "good" / "tls-section-empty.yml")
    assert config.tls_server_config is None
    assert config.rate_limit is None


# --- the same YAML as the main config --------------------------------------------------------


def web_error(text: str) -> str:
    with pytest.raises(WebConfigError) as caught:
        parse_web_config(text, "web.yml")
    return str(caught.value)


def test_merge_keys_work_as_in_the_main_config() -> None:
    scraper, bob = hash_password("scraper"), hash_password("bob")
    config = parse_web_config(
        "basic_auth_users:\n"
        "  <<: &scrapers\n"
        f"    prometheus: {scraper}\n"
        f"    bob: {scraper}\n"
        f"  bob: {bob}\n"  # written next to the merge key: wins over the merged one
        "http_server_config:\n"
        "  headers:\n"
        "    <<: [{X-Frame-Options: deny}, {X-Frame-Options: sameorigin, X-XSS-Protection: '0'}]\n"
        "rate_limit:\n"
        "  <<: {interval: 1s, burst: 5}\n"
        "  burst: 10\n",
        "web.yml",
    )
    assert config.basic_auth_users == {"prometheus": scraper, "bob": bob}
    # In a merged list the first mapping wins, as YAML says.
    assert dict(config.headers) == {"X-Frame-Options": "deny", "X-XSS-Protection": "0"}
    assert config.rate_limit == RateLimit(interval=1.0, burst=10)


def test_errors_inside_a_merged_mapping_point_at_where_it_was_written() -> None:
    assert web_error(
        "tls_server_config:\n  <<: &strict\n    min_version: TLS14\n  cert_file: a.crt\n"
    ) == (
        "web.yml:3: tls_server_config.min_version: unknown value 'TLS14'"
        " (valid: TLS10, TLS11, TLS12, TLS13)"
    )
    assert web_error("tls_server_config:\n  <<: {cert_fil: a.crt}\n") == (
        "web.yml:2: tls_server_config.cert_fil: unknown key (did you mean 'cert_file'?)"
    )
    assert web_error("basic_auth_users:\n  <<: [alice]\n") == (
        "web.yml:2: basic_auth_users: << must merge a mapping or a list of mappings"
    )


def test_user_names_are_taken_as_written() -> None:
    digest = hash_password("pw")
    config = parse_web_config(f"basic_auth_users:\n  yes: {digest}\n  1234: {digest}\n", "w.yml")
    assert sorted(config.basic_auth_users) == ["1234", "yes"]


def test_syntax_and_value_errors_read_as_in_the_main_config() -> None:
    # A control character is a syntax error on its line.
    assert web_error("basic_auth_users:\n  alice: a\x07b\n") == (
        "web.yml:2: invalid YAML: unacceptable character #x0007: special characters are not allowed"
    )
    # YAML 1.1 would read 1:30 as the number 90; as in the main config it is a typo.
    assert web_error("rate_limit:\n  interval: 1:30\n  burst: 1\n") == (
        "web.yml:2: rate_limit.interval: '1:30' is not a duration"
        " (use e.g. 500ms, 30s, 5m, 12h, 1d)"
    )
    assert web_error("rate_limit:\n  interval: 1s\n  burst: 2.5\n") == (
        "web.yml:3: rate_limit.burst: expected an integer >= 0, got number 2.5"
    )
    assert web_error("auth_excluded_paths: [/-/healthy, !!python/name:os.getcwd '']\n") == (
        "web.yml:1: auth_excluded_paths[1]: could not determine a constructor for the tag"
        " 'tag:yaml.org,2002:python/name:os.getcwd'"
    )


# --- TLS ---------------------------------------------------------------------------------------


@requires_openssl
def test_tls_paths_are_relative_to_the_file_and_build_a_context(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    make_cert(tmp_path / "certs", "server")
    ca, _ = make_cert(tmp_path, "clients")
    web = tmp_path / "web.yml"
    web.write_text(
        "tls_server_config:\n"
        "  cert_file: certs/server.crt\n"
        "  key_file: certs/server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        "  client_ca_file: clients.crt\n"
        "  min_version: TLS13\n"
        "  curve_preferences: [CurveP256]\n"
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
    )
    config = load_web_config(web)
    tls = config.tls_server_config
    assert tls is not None
    assert tls.cert_file == tmp_path / "certs" / "server.crt"
    assert tls.client_ca_file == ca
    context = build_ssl_context(tls)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.maximum_version == ssl.TLSVersion.TLSv1_3
    assert len(context.get_ca_certs()) == 1
    tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 == ["ECDHE-ECDSA-AES128-GCM-SHA256"]


@requires_openssl
def test_inline_certificate_and_key(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server")
    indent = "    "
    text = (
        "tls_server_config:\n  cert: |\n"
        + "".join(indent + line + "\n" for line in cert.read_text().splitlines())
        + "  key: |\n"
        + "".join(indent + line + "\n" for line in key.read_text().splitlines())
    )
    config = parse_web_config(text, tmp_path / "web.yml")
    assert config.tls_server_config is not None
    assert "PRIVATE KEY" not in repr(config)
    assert build_ssl_context(config.tls_server_config).verify_mode == ssl.CERT_NONE


@requires_openssl
def test_certificate_problems_name_the_key_and_line(tmp_path: Path) -> None:
    make_cert(tmp_path, "a")
    make_cert(tmp_path, "b")
    web = tmp_path / "web.yml"

    def error(cert: str, key: str) -> str:
        web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
        with pytest.raises(WebConfigError) as caught:
            load_web_config(web)
        return str(caught.value)

    assert error("missing.crt", "a.key") == (
        f"{web}:2: tls_server_config.cert_file: cannot read {tmp_path}/missing.crt:"
        " No such file or directory"
    )
    assert error("a.crt", "a.crt") == (
        f"{web}:3: tls_server_config.key_file: {tmp_path}/a.crt: no PEM private key found"
    )
    assert error("a.key", "a.key") == (
        f"{web}:2: tls_server_config.cert_file: {tmp_path}/a.key: no PEM certificate found"
    )
    assert error("a.crt", "b.key") == (
        f"{web}:3: tls_server_config.key_file: the private key does not match the certificate"
    )
    subprocess.run(
        ["openssl", "pkey", "-in", str(tmp_path / "a.key"), "-aes256", "-passout", "pass:x",
         "-out", str(tmp_path / "locked.key")],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    assert error("a.crt", "locked.key") == (
        f"{web}:3: tls_server_config.key_file: encrypted private keys are not supported"
    )


# --- the file changing under a running server --------------------------------------------------


def test_source_rereads_the_file_when_it_changes(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text("")
    source = WebConfigSource(load_web_config(web))
    assert not source.current().auth_enabled
    web.write_text(f"basic_auth_users:\n  alice: {hash_password('pw')}\n")
    assert source.current().auth_enabled
    assert source.changes == 1
    assert source.current().auth_enabled and source.changes == 1  # unchanged: not re-read
    web.write_text("basic_auth_users: [alice]\n")
    # A broken file fails closed, and keeps failing until it is fixed.
    for _ in range(2):
        with pytest.raises(WebConfigError, match="expected a mapping"):
            source.current()
    web.write_text("")
    assert not source.current().auth_enabled
    web.unlink()
    with pytest.raises(WebConfigError, match="cannot read"):
        source.current()


def test_a_config_built_in_code_is_never_reread() -> None:
    config = WebConfig(basic_auth_users={"alice": hash_password("pw")})
    source = WebConfigSource(config)
    assert source.current() is config
    assert source.ssl_context() is None


@requires_openssl
def test_source_rebuilds_the_tls_context_when_a_certificate_changes(tmp_path: Path) -> None:
    make_cert(tmp_path, "server", cn="first")
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    source = WebConfigSource(load_web_config(web))
    first = source.ssl_context()
    assert first is not None and source.ssl_context() is first
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    make_cert(renewed, "server", cn="second")
    os.replace(renewed / "server.key", tmp_path / "server.key")
    os.replace(renewed / "server.crt", tmp_path / "server.crt")
    second = source.ssl_context()
    assert second is not None and second is not first


# --- basic auth --------------------------------------------------------------------------------


class CountingAuthenticator(BasicAuthenticator):
    """Records each bcrypt comparison (the hash it was against) and how many ran at once."""

    def __init__(self, *, cache_size: int = 128) -> None:
        super().__init__(cache_size=cache_size)
        self.hashes_checked: list[bytes] = []
        self.most_at_once = 0
        self._running = 0
        self._counting = threading.Lock()

    def check_password(self, password: bytes, hashed: bytes) -> bool:
        with self._counting:
            self.hashes_checked.append(hashed)
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
        try:
            return super().check_password(password, hashed)
        finally:
            with self._counting:
                self._running -= 1

    @property
    def bcrypt_checks(self) -> int:
        return len(self.hashes_checked)


async def test_authenticator_accepts_htpasswd_style_hashes_from_a_file() -> None:
    config = load_web_config(FIXTURES / "good" / "basic-auth.yml")
    auth = BasicAuthenticator()
    users = config.basic_auth_users
    assert await auth.verify(users, "alice", "correct horse battery staple")
    assert await auth.verify(users, "bob", "hunter2")
    assert not await auth.verify(users, "bob", "hunter3")
    assert not await auth.verify(users, "alice", "hunter2")
    assert not await auth.verify(users, "mallory", "hunter2")
    assert not await auth.verify(users, "", "")


async def test_authenticator_caches_successes_without_keeping_the_password() -> None:
    password = "s3cret-ünïcode-pässword"
    users = {"alice": hash_password(password)}
    auth = CountingAuthenticator(cache_size=2)
    assert await auth.verify(users, "alice", password)
    assert auth.bcrypt_checks == 1
    for _ in range(3):
        assert await auth.verify(users, "alice", password)
    assert auth.bcrypt_checks == 1  # answered from the cache
    keys = list(auth._cache)
    assert len(keys) == 1 and len(keys[0]) == 32
    assert password.encode() not in keys[0]
    # Wrong passwords are checked every time: a cache hit needs the right one.
    for _ in range(2):
        assert not await auth.verify(users, "alice", "wrong")
    assert auth.bcrypt_checks == 3
    # A changed hash (the file was edited) does not reuse the old answer.
    users = {"alice": hash_password("new password")}
    assert not await auth.verify(users, "alice", password)
    assert await auth.verify(users, "alice", "new password")


async def test_authenticator_unknown_users_cost_a_bcrypt_check() -> None:
    users = {"alice": hash_password("pw")}
    auth = CountingAuthenticator()
    started = time.perf_counter()
    assert not await auth.verify(users, "nobody", "pw")
    # The decoy hash has cost 10 (as exporter-toolkit's): an unknown user is no faster to
    # reject than a known user with a typical hash.
    assert time.perf_counter() - started > 0.01
    (decoy,) = auth.hashes_checked
    assert decoy.startswith(b"$2b$10$")
    assert decoy.decode() not in users.values()


async def test_authenticator_long_passwords_follow_bcrypt_72_byte_rule() -> None:
    long_password = "x" * 72 + "ignored by bcrypt"
    users = {"alice": "$2b$" + bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(4)).decode()[4:]}
    auth = BasicAuthenticator()
    assert await auth.verify(users, "alice", long_password)
    assert not await auth.verify(users, "alice", "x" * 71)


async def test_authenticator_checks_run_one_at_a_time() -> None:
    users = {f"user{i}": hash_password(f"pw{i}") for i in range(4)}
    auth = CountingAuthenticator()
    results = await asyncio.gather(*(auth.verify(users, f"user{i}", f"pw{i}") for i in range(4)))
    assert results == [True] * 4
    assert auth.bcrypt_checks == 4
    assert auth.most_at_once == 1
