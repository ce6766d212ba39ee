"""SQLite persistence of the exporter's state: see `exporter.store.database`."""

from .codec import CodecError, decode_state, encode_state
from .database import (
    DEFAULT_BUSY_TIMEOUT_SECONDS,
    DEFAULT_RETENTION_SECONDS,
    LOCK_SUFFIX,
    History,
    Interval,
    PruneResult,
    ScanRecord,
    SchemaTooNewError,
    StaleStateError,
    Store,
    StoredEvent,
    StoreError,
    StoreInUseError,
    StoreReplacedError,
    lock_path,
    lost_store,
)
from .schema import MIGRATIONS

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_SECONDS",
    "DEFAULT_RETENTION_SECONDS",
    "LOCK_SUFFIX",
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
    "StoreInUseError",
    "StoreReplacedError",
    "StoredEvent",
    "decode_state",
    "encode_state",
    "lock_path",
    "lost_store",
]
