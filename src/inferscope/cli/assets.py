"""``inferscope assets --out DIR``: write the Prometheus rules and their tests, the Kubernetes
manifests and the collector configurations shipped with the package."""

from __future__ import annotations

import argparse
import sys

from ._command import Command

__all__ = ["COMMAND"]


def _run(args: argparse.Namespace) -> int:
    from ..assets import AssetExistsError, write_assets

    try:
        written = write_assets(args.out, overwrite=args.force)
    except AssetExistsError as error:
        print(f"inferscope assets: {error}; pass --force to replace them", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"inferscope assets: cannot write to {args.out}: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write them to (created)")
    parser.add_argument(
        "--force", action="store_true", help="replace files of the same names that differ from inferscope's"
    )


COMMAND = Command(
    name="assets",
    help="write the Prometheus rules and their tests, Grafana dashboards, Kubernetes manifests and "
    "collector configurations",
    description="Write what operators deploy beside inferscope, generated from its metric specification: "
    "Prometheus recording and alert rules with their promtool unit tests (prometheus/), a "
    "PrometheusRule and a PodMonitor for the Prometheus operator (kubernetes/), and configurations "
    "for a rotel agent and an OpenTelemetry Collector gateway (collectors/), and Grafana dashboards "
    "(grafana/). docs/alerts.md, docs/deploy.md and docs/dashboards.md explain them.",
    add_arguments=_add_arguments,
    run=_run,
)
