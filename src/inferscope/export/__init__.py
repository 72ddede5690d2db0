"""Exporters: aggregates to OpenTelemetry metric points (push) and Prometheus families (pull)."""
