"""TCP scanning: returns values, touches no state, storage or metrics."""

from exporter.scanner.connect import ScanOptions, scan_host
from exporter.scanner.engine import ProbeEngine
from exporter.scanner.limits import raise_fd_limit

__all__ = ["ProbeEngine", "ScanOptions", "raise_fd_limit", "scan_host"]
