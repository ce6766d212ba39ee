"""Helpers that run real services (Debian daemons, hostile servers) for the fingerprint tests."""
