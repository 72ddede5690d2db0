"""``inferscope baseline save|load``: baselines as versioned JSON files.

``save`` writes the anchors the flight recorder holds (``--from anchor``, the default), or a
baseline of the model's recorded windows of the last ``--last`` seconds (``--from windows``: a
benchmark's run, e.g. in CI), to one JSON file. ``load`` stores the baselines of such a file as the
anchors of their models: a service takes its anchor from the recorder when it starts, so the next
start of the service (or of its workers) compares itself with the file.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._command import Command, bounded

__all__ = ["COMMAND"]


def _open(path: str | None, *, create: bool) -> object | None:
    from ..config import RECORDER_OFF, load_settings
    from ..recorder import FlightRecorder

    path = path or load_settings().recorder
    if path == RECORDER_OFF:
        print("inferscope baseline: the flight recorder is off (INFERSCOPE_RECORDER=off)", file=sys.stderr)
        return None
    if not create and not os.path.exists(path):
        print(f"inferscope baseline: no flight recorder at {path}", file=sys.stderr)
        return None
    recorder = FlightRecorder(path, create=create)
    if not recorder.available:
        print(f"inferscope baseline: cannot open a flight recorder at {path}", file=sys.stderr)
        return None
    return recorder


def save(args: argparse.Namespace) -> int:
    """Write the selected baselines to ``args.output``; 1 when there is none to write."""
    from ..baseline import Baseline, save_baselines
    from ..config import load_settings
    from ..history import HistoryStore
    from ..recorder import FlightRecorder

    recorder = _open(args.recorder, create=False)
    if not isinstance(recorder, FlightRecorder):
        return 2
    try:
        store = HistoryStore(recorder)
        baselines: list[Baseline] = []
        if args.source == "anchor":
            baselines = [
                b
                for b in store.baselines(service=args.service)
                if args.model is None or b.model == args.model
            ]
        else:
            quantile = load_settings().regression_quantile
            for service, model, _, last in recorder.models():
                if (args.model is not None and model != args.model) or args.service not in (None, service):
                    continue
                windows = store.windows(service, model, last - args.last, last)
                if windows:
                    baselines.append(Baseline.from_windows(model, windows, source="ci", quantile=quantile))
    finally:
        recorder.close()
    if not baselines:
        what = "anchor" if args.source == "anchor" else "recorded window"
        print(f"inferscope baseline save: no {what} to save in {recorder.path}", file=sys.stderr)
        return 1
    try:
        save_baselines(args.output, baselines)
    except OSError as error:
        print(f"inferscope baseline save: cannot write {args.output}: {error}", file=sys.stderr)
        return 2
    for b in baselines:
        print(f"saved the {b.source} baseline of {b.model} ({b.seconds:.0f} s, {len(b.stages)} key(s))")
    print(f"to {args.output}")
    return 0


def load(args: argparse.Namespace) -> int:
    """Store the baselines of ``args.file`` as anchors in the recorder; 2 when it cannot be read."""
    from dataclasses import replace

    from ..baseline import BaselineFormatError, load_baselines
    from ..history import HistoryStore
    from ..recorder import FlightRecorder

    try:
        baselines = load_baselines(args.file)
    except (OSError, BaselineFormatError) as error:
        print(f"inferscope baseline load: {error}", file=sys.stderr)
        return 2
    recorder = _open(args.recorder, create=True)
    if not isinstance(recorder, FlightRecorder):
        return 2
    try:
        store = HistoryStore(recorder)
        for b in baselines:
            if args.model is not None and b.model != args.model:
                continue
            service = args.service if args.service is not None else b.service
            if not store.save_baseline(replace(b, service=service)):
                print(f"inferscope baseline load: cannot write to {recorder.path}", file=sys.stderr)
                return 2
            print(f"the anchor of {b.model} (service {service or '-'}) is now the {b.source} baseline of")
            print(f"  {args.file}")
    finally:
        recorder.close()
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    save_parser = actions.add_parser("save", help="write baselines from the flight recorder to a JSON file")
    save_parser.add_argument("output", metavar="FILE", help="the JSON file to write")
    save_parser.add_argument(
        "--from",
        dest="source",
        choices=("anchor", "windows"),
        default="anchor",
        help="the stored anchors (default), or a baseline of the recorded windows of the last --last seconds",
    )
    save_parser.add_argument(
        "--last",
        type=bounded(float, 1.0, 90 * 86400.0),
        default=3600.0,
        metavar="SECONDS",
        help="with --from windows: how much of the newest history (default 3600)",
    )
    load_parser = actions.add_parser("load", help="store the baselines of a JSON file as the models' anchors")
    load_parser.add_argument("file", metavar="FILE", help="a file written by `inferscope baseline save`")
    for sub in (save_parser, load_parser):
        sub.add_argument(
            "--recorder", help="the flight recorder file (default: INFERSCOPE_RECORDER or its default)"
        )
        sub.add_argument("--model", help="only this model")
        sub.add_argument("--service", help="only this service (load: store under this service name)")
    save_parser.set_defaults(action=save)
    load_parser.set_defaults(action=load)


def _run(args: argparse.Namespace) -> int:
    code: int = args.action(args)
    return code


COMMAND = Command(
    name="baseline",
    help="save the anchors (or a benchmark's run) to a JSON file, or load one as the anchors",
    run=_run,
    add_arguments=_add_arguments,
    description="Save the anchors that the flight recorder holds (or a baseline of a benchmark's recorded "
    "run) to a versioned JSON file, or load such a file as the anchors that services compare with when "
    "they start.",
)
