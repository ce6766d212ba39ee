"""HostState <-> JSON text, canonical: decoding then encoding gives back the same bytes.

The store compares encoded states to detect a writer that started from an outdated state, so
the encoding must not depend on dict order or on how a value was built (times are written as
floats even when they came in as ints).
"""

from __future__ import annotations

import json
from typing import Any

from exporter.model import ServiceIdentity, TLSInfo
from exporter.state import (
    BaselineSource,
    ChangeInForce,
    EventKind,
    HostState,
    LastScan,
    Pending,
    ScanOutcome,
    Target,
)

# 2: fingerprints are `encode_fingerprint` JSON arrays (1: `|`-joined; schema migration 2
# converts stored states).
FORMAT = 2


class CodecError(ValueError):
    """Stored state that this version cannot read."""


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def identity_to_json(identity: ServiceIdentity) -> dict[str, Any]:
    tls = identity.tls
    return {
        "service": identity.service,
        "product": identity.product,
        "version": identity.version,
        "extra": identity.extra,
        "banner": identity.banner,
        "tls": None
        if tls is None
        else {
            "protocol": tls.protocol,
            "subject": tls.subject,
            "issuer": tls.issuer,
            "sans": list(tls.sans),
            "not_after": float(tls.not_after),
            "sha256": tls.sha256,
        },
    }


def identity_from_json(data: dict[str, Any]) -> ServiceIdentity:
    tls = data["tls"]
    return ServiceIdentity(
        service=data["service"],
        product=data["product"],
        version=data["version"],
        extra=data["extra"],
        banner=data["banner"],
        tls=None
        if tls is None
        else TLSInfo(
            protocol=tls["protocol"],
            subject=tls["subject"],
            issuer=tls["issuer"],
            sans=tuple(tls["sans"]),
            not_after=float(tls["not_after"]),
            sha256=tls["sha256"],
        ),
    )


def _optional_identity(data: dict[str, Any] | None) -> ServiceIdentity | None:
    return None if data is None else identity_from_json(data)


def state_to_json(state: HostState) -> dict[str, Any]:
    last = state.last_scan
    return {
        "format": FORMAT,
        "host": state.host,
        "baseline_source": None if state.baseline_source is None else state.baseline_source.value,
        "baseline": {str(p): fp for p, fp in state.baseline.items()},
        "confirmed": {str(p): identity_to_json(i) for p, i in state.confirmed.items()},
        "pending": {
            str(p): {
                "kind": None if x.target.kind is None else x.target.kind.value,
                "service": x.target.service,
                "count": x.count,
                "first_seen": float(x.first_seen),
                "last_seen": float(x.last_seen),
                "observed": None if x.observed is None else identity_to_json(x.observed),
            }
            for p, x in state.pending.items()
        },
        "in_force": {
            str(p): {"kind": c.kind.value, "since": float(c.since), "old": c.old, "new": c.new}
            for p, c in state.in_force.items()
        },
        "last_change": {str(p): float(t) for p, t in state.last_change.items()},
        "last_scan": None
        if last is None
        else {
            "started": float(last.started),
            "finished": float(last.finished),
            "duration_seconds": float(last.duration_seconds),
            "outcome": last.outcome.value,
            "ports_scanned": last.ports_scanned,
            "open_ports": last.open_ports,
            "address": last.address,
            "error": last.error,
        },
    }


def _ports(data: dict[str, Any]) -> list[tuple[int, Any]]:
    return sorted((int(p), v) for p, v in data.items())


def state_from_json(data: dict[str, Any]) -> HostState:
    if data.get("format") != FORMAT:
        raise CodecError(f"unknown host state format {data.get('format')!r}")
    source = data["baseline_source"]
    last = data["last_scan"]
    return HostState(
        host=data["host"],
        baseline_source=None if source is None else BaselineSource(source),
        baseline=dict(_ports(data["baseline"])),
        confirmed={p: identity_from_json(i) for p, i in _ports(data["confirmed"])},
        pending={
            p: Pending(
                target=Target(None if x["kind"] is None else EventKind(x["kind"]), x["service"]),
                count=int(x["count"]),
                first_seen=float(x["first_seen"]),
                last_seen=float(x["last_seen"]),
                observed=_optional_identity(x["observed"]),
            )
            for p, x in _ports(data["pending"])
        },
        in_force={
            p: ChangeInForce(EventKind(c["kind"]), float(c["since"]), c["old"], c["new"])
            for p, c in _ports(data["in_force"])
        },
        last_change={p: float(t) for p, t in _ports(data["last_change"])},
        last_scan=None
        if last is None
        else LastScan(
            started=float(last["started"]),
            finished=float(last["finished"]),
            duration_seconds=float(last["duration_seconds"]),
            outcome=ScanOutcome(last["outcome"]),
            ports_scanned=int(last["ports_scanned"]),
            open_ports=int(last["open_ports"]),
            address=last["address"],
            error=last["error"],
        ),
    )


def encode_state(state: HostState) -> str:
    return dumps(state_to_json(state))


def decode_state(text: str) -> HostState:
    try:
        data = json.loads(text)
        return state_from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"unreadable host state: {exc}") from exc
