"""The long-running exporter: scheduler, scan pipeline, snapshot, /metrics and HTTP."""
