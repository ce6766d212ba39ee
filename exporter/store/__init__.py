"""SQLite persistence of the exporter's state: see `exporter.store.database`."""

from .codec import CodecError, decode_state, encode_state
from .database import (
    DEFAULT_BUSY_TIMEOUT_SECONDS,
    DEFAULT_RETENTION_SECONDS,
    History,
    Interval,
    PruneResult,
    ScanRecord,
    SchemaTooNewError,
    StaleStateError,
    Store,
    StoredEvent,
    StoreError,
)
from .schema import MIGRATIONS

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_SECONDS",
    "DEFAULT_RETENTION_SECONDS",
    "MIGRATIONS",
    "CodecError",
    "History",
    "Interval",
    "PruneResult",
    "ScanRecord",
    "SchemaTooNewError",
    "StaleStateError",
    "Store",
    "StoreError",
    "StoredEvent",
    "decode_state",
    "encode_state",
]
