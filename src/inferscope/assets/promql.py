"""What a PromQL expression names, checked against what inferscope exports to Prometheus.

Rules and dashboard queries are generated from the metric specification; this is the check that
they stayed within it (a metric that was renamed, a label that no attribute becomes)::

    >>> unknown_names('rate(inferscope_inference_duration_seconds_count{model="x"}[5m])')
    ['label model']

It reads expressions as text (a lexer's worth, not a parser): enough for the expressions inferscope
writes, which the tests also load into a real Prometheus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..export import spec
from ..export.prometheus import prometheus_label_name

__all__ = ["TARGET_LABELS", "exported_labels", "exported_series", "names_in", "unknown_names"]

#: Labels Prometheus adds to every scraped series; the OTLP conversion sets them too (from
#: service.name and service.instance.id).
TARGET_LABELS = frozenset({"job", "instance"})
#: The bucket label of histogram series.
BUCKET_LABEL = "le"

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "and", "or"}
_KEYWORDS |= {"unless", "bool", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_DURATION = re.compile(r"\[\d+[smhdwy]\]|\boffset\s+\d+[smhdwy]")
# A name not followed by "(" (a function) and not part of a number or of a longer name.
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")
_TEMPLATE_LABEL = re.compile(r"\$labels\.(\w+)")


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names that a PromQL expression mentions.

    >>> metrics, labels = names_in('sum by (job, le) (rate(a_bucket{x="1"}[5m] offset 1w)) / b:c:rate5m')
    >>> sorted(metrics), sorted(labels)
    (['a_bucket', 'b:c:rate5m'], ['job', 'le', 'x'])
    """
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for block in _MATCHERS.findall(text):
        labels |= set(_MATCHER_LABEL.findall(block))
    text = _MATCHERS.sub(" ", text)
    for group in _GROUPING.findall(text):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    text = _DURATION.sub(" ", _GROUPING.sub(" ", text))
    metrics = {name for name in _IDENTIFIER.findall(text) if name not in _KEYWORDS}
    return metrics, labels


def template_labels(template: str) -> set[str]:
    """The labels an alert template reads (``{{ $labels.job }}``)."""
    return set(_TEMPLATE_LABEL.findall(template))


def exported_series() -> set[str]:
    """Every series name inferscope's Prometheus endpoint can serve, by the specification."""
    names: set[str] = set()
    for entry in spec.METRICS.values():
        if not entry.prometheus:
            continue
        if entry.kind == "histogram":
            names |= {entry.prometheus_name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(entry.prometheus_name)
    return names


def exported_labels() -> set[str]:
    """Every label inferscope's series carry, from the attributes of the specification."""
    return {
        prometheus_label_name(attribute)
        for entry in spec.METRICS.values()
        if entry.prometheus
        for attribute in entry.attributes
    }


def unknown_names(expr: str, *, series: Iterable[str] = (), labels: Iterable[str] = ()) -> list[str]:
    """What ``expr`` names that inferscope does not export, beyond the target labels, ``le``, and
    the ``series`` (recorded ones, say) and ``labels`` (added by a rule) given: ``"metric NAME"``
    and ``"label NAME"`` entries, sorted."""
    metrics, named = names_in(expr)
    known_series = exported_series() | set(series)
    known_labels = exported_labels() | TARGET_LABELS | {BUCKET_LABEL} | set(labels)
    return [f"metric {m}" for m in sorted(metrics - known_series)] + [
        f"label {label}" for label in sorted(named - known_labels)
    ]
