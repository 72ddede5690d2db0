"""The rules as a Prometheus operator ``PrometheusRule``, and a ``PodMonitor`` that scrapes
inferscope's ``/metrics`` on the pods that opt in.

Both are plain ``monitoring.coreos.com/v1`` objects without a namespace: ``kubectl apply -n NS -f``
puts them where the service runs. docs/deploy.md says which labels the operator's ``Prometheus``
must select them by.
"""

from __future__ import annotations

from typing import Any

from .rules import rule_groups

__all__ = ["POD_LABEL", "POD_PORT", "pod_monitor", "prometheus_rule"]

API_VERSION = "monitoring.coreos.com/v1"
#: The pod label that opts a pod into the PodMonitor.
POD_LABEL = ("inferscope/scrape", "true")
#: The name of the container port inferscope's /metrics is served on.
POD_PORT = "metrics"
#: The pod label whose value becomes the ``job`` label: the service, as the rules aggregate by it.
JOB_LABEL = "app.kubernetes.io/name"

_METADATA_LABELS = {"app.kubernetes.io/name": "inferscope", "app.kubernetes.io/component": "monitoring"}


def prometheus_rule() -> dict[str, Any]:
    """The recording and alert rules of ``rules.py`` as a ``PrometheusRule``."""
    return {
        "apiVersion": API_VERSION,
        "kind": "PrometheusRule",
        "metadata": {"name": "inferscope", "labels": dict(_METADATA_LABELS)},
        "spec": rule_groups(),
    }


def pod_monitor() -> dict[str, Any]:
    """A ``PodMonitor`` scraping ``/metrics`` on the port named ``metrics`` of the pods labelled
    ``inferscope/scrape: "true"``, with the pod's ``app.kubernetes.io/name`` as ``job``."""
    key, value = POD_LABEL
    return {
        "apiVersion": API_VERSION,
        "kind": "PodMonitor",
        "metadata": {"name": "inferscope", "labels": dict(_METADATA_LABELS)},
        "spec": {
            "jobLabel": JOB_LABEL,
            "selector": {"matchLabels": {key: value}},
            "podMetricsEndpoints": [
                {
                    "port": POD_PORT,
                    "path": "/metrics",
                    "interval": "30s",
                    "scrapeTimeout": "10s",
                }
            ],
        },
    }
