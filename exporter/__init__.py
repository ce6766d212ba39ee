"""portscan-exporter: continuous TCP port monitoring exported to Prometheus."""

__version__ = "0.1.0"
