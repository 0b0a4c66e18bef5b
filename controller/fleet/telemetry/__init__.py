"""Telemetry: exactly-once ingest, gaps and resends, reports."""
