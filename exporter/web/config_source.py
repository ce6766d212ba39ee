"""The web config in force while the server runs: re-read when its file changes.

exporter-toolkit re-reads `--web.config.file` on every request; here a request costs one
`stat` of the file, and the file is parsed again only when that changes (inode, size or
times: a Kubernetes secret update swaps a symlink, an editor rewrites in place). The TLS
context is cached the same way, keyed by the TLS settings and the stamps of the certificate
files, so a renewed certificate is picked up by the next connection.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from exporter.web.tls import build_ssl_context
from exporter.web.webconfig import WebConfig, WebConfigError, load_web_config

__all__ = ["WebConfigSource"]


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: Kubernetes swaps a symlink to update a secret
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class WebConfigSource:
    """The current web configuration, re-read when its file changes (as exporter-toolkit
    re-reads it on every request), and the TLS context, rebuilt when a certificate changes.

    A file that became invalid makes `current()` raise until it is fixed: requests fail
    closed (500) rather than run with a configuration the operator replaced.
    """

    def __init__(self, config: WebConfig) -> None:
        self._config = config
        self._error: WebConfigError | None = None
        self._stamp = None if config.path is None else _stamp(config.path)
        self._tls_key: tuple[object, ...] | None = None
        self._tls_context: ssl.SSLContext | None = None
        self.changes = 0  # successful re-reads, for logs and tests

    @property
    def path(self) -> Path | None:
        return self._config.path

    def current(self) -> WebConfig:
        path = self._config.path
        if path is not None:
            stamp = _stamp(path)
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._config = load_web_config(path)
                    self._error = None
                    self.changes += 1
                except WebConfigError as exc:
                    self._error = exc
        if self._error is not None:
            raise self._error
        return self._config

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context for a new TLS connection; None when the file no longer sets up TLS."""
        tls = self.current().tls_server_config
        if tls is None:
            return None
        key = (tls, *(_stamp(p) for p in tls.files))
        if key != self._tls_key or self._tls_context is None:
            self._tls_context = build_ssl_context(tls)
            self._tls_key = key
        return self._tls_context
