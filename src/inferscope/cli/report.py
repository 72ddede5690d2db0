"""``inferscope report``: the flight recorder as one self-contained HTML file, or served on 127.0.0.1.

The file holds its data, scripts and styles, and a Content-Security-Policy that forbids every network
request, so it opens from disk, in an air-gapped cluster or attached to a ticket. ``--serve`` serves
the same page on 127.0.0.1 and the page refreshes its data from the recorder while a service runs.
See docs/report.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ._command import Command, bounded
from .status import _recorder_path

__all__ = ["COMMAND", "parse_since", "report"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
#: At most the recorder's rollup retention (90 days), at least a minute.
_MAX_SINCE_SECONDS = 90 * 86400.0


def parse_since(text: str) -> float:
    """A period such as ``30d``, ``12h``, ``90m``, ``600s`` or ``600`` (seconds), in seconds.

    >>> parse_since("30d")
    2592000.0
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a period such as 30d, 12h, 90m or 600s, got {text!r}")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not 60.0 <= seconds <= _MAX_SINCE_SECONDS:
        raise argparse.ArgumentTypeError(f"must be from 60s to 90d, got {text}")
    return seconds


def _open(path: str) -> Any:
    from ..recorder import FlightRecorder

    recorder = FlightRecorder(path, create=False)
    return recorder if recorder.available else None


def _collect(
    path: str, since_seconds: float, model: str | None, compare: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any] | None:
    from ..config import load_settings
    from ..report import collect

    recorder = _open(path)
    if recorder is None:
        return None
    try:
        data = collect(
            recorder,
            since_unix=time.time() - since_seconds,
            model=model,
            now_seconds=load_settings().regression_sustain_seconds,
        )
    finally:
        recorder.close()
    data["compare"] = list(compare)
    return data


def _compare_sections(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The ``inferscope compare --output`` files as report sections; ValueError names a file that
    cannot be read."""
    if not paths:
        return []
    from ..compare import load, report_section

    sections = []
    for path in paths:
        try:
            sections.append(report_section(load(path)))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"--compare {path}: not a result of inferscope compare --output ({error})"
            ) from None
    return sections


def _handler(page: Callable[[], tuple[bytes, bytes] | None]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            built = page()
            if self.path.split("?")[0] in ("/", "/index.html") and built is not None:
                self._send(built[0], "text/html; charset=utf-8")
            elif self.path.split("?")[0] == "/data.json" and built is not None:
                self._send(built[1], "application/json")
            else:
                self.send_error(404 if built is not None else 503)

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def serve(
    path: str,
    since_seconds: float,
    model: str | None,
    *,
    port: int,
    refresh_seconds: float,
    stop: threading.Event,
    compare: Sequence[Mapping[str, Any]] = (),
) -> int:
    """Serve the report on 127.0.0.1:``port`` until ``stop`` is set; the page fetches ``data.json``
    (read from the recorder again, at most once per ``refresh_seconds``) every ``refresh_seconds``."""
    from ..report import render_html, to_json

    lock = threading.Lock()
    cache: dict[str, Any] = {"at": -1e18, "page": None}

    def page() -> tuple[bytes, bytes] | None:
        with lock:
            if time.monotonic() - cache["at"] >= refresh_seconds:
                data = _collect(path, since_seconds, model, compare)
                if data is not None:
                    data["refresh_seconds"] = refresh_seconds
                    cache["page"] = (render_html(data, served=True).encode(), to_json(data).encode())
                cache["at"] = time.monotonic()
            found: tuple[bytes, bytes] | None = cache["page"]
            return found

    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(page))
    server.daemon_threads = True
    print(
        f"inferscope report: serving http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return 0


def report(
    recorder_path: str | None,
    *,
    since_seconds: float,
    model: str | None,
    output: str,
    serve_port: int | None = None,
    refresh_seconds: float = 10.0,
    compare_paths: Sequence[str] = (),
) -> int:
    """Write the report of the recorder to ``output`` (or serve it); 2 when there is nothing to read.
    ``compare_paths``: results of ``inferscope compare --output``, shown as sections."""
    from ..report import render_html

    try:
        compare = _compare_sections(compare_paths)
    except ValueError as error:
        print(f"inferscope report: {error}", file=sys.stderr)
        return 2

    path = _recorder_path(recorder_path)
    if path is None:
        print("inferscope report: the flight recorder is off (INFERSCOPE_RECORDER=off)", file=sys.stderr)
        return 2
    if not os.path.exists(path):
        print(f"inferscope report: no flight recorder at {path} (has a service run here?)", file=sys.stderr)
        return 2
    if serve_port is not None:
        return serve(
            path,
            since_seconds,
            model,
            port=serve_port,
            refresh_seconds=refresh_seconds,
            stop=threading.Event(),
            compare=compare,
        )
    data = _collect(path, since_seconds, model, compare)
    if data is None:
        print(f"inferscope report: cannot read a flight recorder at {path}", file=sys.stderr)
        return 2
    if model is not None and not data["models"]:
        print(f"inferscope report: no model {model!r} in {path} over this period", file=sys.stderr)
        return 2
    page = render_html(data)
    with open(output, "w", encoding="utf-8") as file:
        file.write(page)
    print(f"inferscope report: {len(data['models'])} model(s), {len(page) / 1e6:.2f} MB written to {output}")
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recorder", help="the flight recorder file (default: INFERSCOPE_RECORDER or its default)"
    )
    parser.add_argument(
        "--since",
        type=parse_since,
        default=30 * 86400.0,
        metavar="PERIOD",
        help="how far back: 30d, 12h, 90m, 600s (default: 30d; at most 90d)",
    )
    parser.add_argument("--model", help="only this model")
    parser.add_argument(
        "-o", "--output", default="report.html", help="the HTML file to write (default: report.html)"
    )
    parser.add_argument(
        "--serve",
        nargs="?",
        const=8765,
        type=bounded(int, 0, 65535),
        metavar="PORT",
        help="serve the report on 127.0.0.1 instead (default port 8765; 0 picks a free one); "
        "the page refreshes from the recorder",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="FILE",
        help="add the result of `inferscope compare --output FILE` as a section (repeatable)",
    )
    parser.add_argument(
        "--refresh",
        type=bounded(float, 1.0, 3600.0),
        default=10.0,
        metavar="SECONDS",
        help="how often a served page refreshes its data (default: 10)",
    )


def _run(args: argparse.Namespace) -> int:
    return report(
        args.recorder,
        since_seconds=args.since,
        model=args.model,
        output=args.output,
        serve_port=args.serve,
        refresh_seconds=args.refresh,
        compare_paths=args.compare,
    )


COMMAND = Command(
    name="report",
    help="write the flight recorder as one self-contained HTML report (charts, regressions, the tax)",
    run=_run,
    add_arguments=_add_arguments,
    description="Per model, on one time axis: latency p50/p95/p99 against the anchor, throughput and "
    "errors, per-stage p95 and CPU against off-CPU time, CPU per inference, input size, memory, the "
    "machine canary, regressions with their cause and evidence, and the environment timeline; on top, "
    "the tax per model. One HTML file with everything inlined and no network request; --serve serves "
    "it on 127.0.0.1 instead, refreshing from the recorder.",
)
