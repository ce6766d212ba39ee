"""Process limits the scanner depends on.

The daemon's file descriptors (RLIMIT_NOFILE) are split three ways, so that neither side can
starve the other:

    probe sockets (scan.max_probes, lowered to fit)
  + HTTP_CONNECTIONS      the web server's connection cap (exporter.web.connections enforces it)
  + HTTP_REFUSALS         connections past the cap that linger until their 503 is read
  + RESERVED_DESCRIPTORS  everything else: SQLite (database, WAL, shared memory, journal), log
                          files, the signature files, listening sockets, epoll, DNS lookups
  + identification connections (fingerprint.concurrency), counted by the daemon
  <= RLIMIT_NOFILE

The probe budget is what is left once the others are set aside, and the HTTP server refuses
connections past its cap, so a flood of HTTP clients cannot take a descriptor a probe needs
and a scan at full concurrency leaves the HTTP side its share.
"""

from __future__ import annotations

import resource

# Descriptors the process needs besides probe sockets and HTTP connections.
RESERVED_DESCRIPTORS = 256
# Concurrent HTTP connections the web server accepts; it refuses those beyond.
HTTP_CONNECTIONS = 256
# Connections refused past that cap that may wait at once for the client to read its 503.
HTTP_REFUSALS = 16


def probes_that_fit(probes: int, soft_limit: int, reserved: int) -> int:
    """How many of `probes` sockets fit under `soft_limit` once `reserved` are set aside
    (at least one: a scanner that cannot open a socket at all fails loudly soon enough)."""
    return max(1, min(probes, soft_limit - reserved))


def raise_fd_limit(probes: int, *, reserved: int = RESERVED_DESCRIPTORS) -> int:
    """Raise RLIMIT_NOFILE so `probes` sockets fit besides `reserved` other descriptors;
    return how many probes fit now.

    The soft limit is raised up to the hard limit (an unprivileged process may do that).
    When even the hard limit is too low the caller gets a smaller number and should lower
    its concurrency (and say so) rather than fail with EMFILE mid-scan.
    """
    wanted = probes + reserved
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    if soft == resource.RLIM_INFINITY:
        return probes
    return probes_that_fit(probes, soft, reserved)
