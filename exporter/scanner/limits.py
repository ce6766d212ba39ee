"""Process limits the scanner depends on."""

from __future__ import annotations

import resource

# Descriptors the process needs besides probe sockets: logs, SQLite, HTTP clients, epoll sets.
RESERVED_DESCRIPTORS = 256


def raise_fd_limit(probes: int) -> int:
    """Raise RLIMIT_NOFILE so `probes` sockets fit; return how many probes fit now.

    The soft limit is raised up to the hard limit (an unprivileged process may do that).
    When even the hard limit is too low the caller gets a smaller number and should lower
    its concurrency (and say so) rather than fail with EMFILE mid-scan.
    """
    wanted = probes + RESERVED_DESCRIPTORS
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
    return max(1, min(probes, soft - RESERVED_DESCRIPTORS))
