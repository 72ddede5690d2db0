"""``inferscope report``: the flight recorder as one self-contained HTML page (see docs/report.md).

:func:`collect` gathers a recorder's history per model; :func:`render_html` writes it out with the
vendored uPlot (``vendor/``), its license and version beside it.
"""

from .render import DEFAULT_MAX_POINTS, REPORT_FORMAT, collect, render_html, to_json

__all__ = ["DEFAULT_MAX_POINTS", "REPORT_FORMAT", "collect", "render_html", "to_json"]
