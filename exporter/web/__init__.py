"""The HTTP surface: routes, the request guard (web config, TLS, basic auth), the listener,
the status page, the JSON views and the /metrics renderer.

It reads the daemon only through `exporter.daemon.snapshot` (the immutable `Snapshot` and the
`Control` protocol); the daemon imports nothing from here.
"""
