"""``inferscope compare module:attr --data FILE``: the variants of a model, checked and timed.

``module:attr`` names the model (``attr`` may be dotted: ``service.models:registry.fraud``), or a
function of no arguments that returns it. The current directory is importable, as for ``python -m``.
``--data`` is the example input, in the formats of ``inferscope bench``: ``.npy`` (one array),
``.npz`` (its arrays saved positionally are the model's inputs) or ``.jsonl`` (its first line: a
JSON array is the call's arguments). See docs/compare.md.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any

from ._command import Command, bounded

__all__ = ["COMMAND", "load_inputs", "resolve_model"]


class _UsageError(Exception):
    """A bad argument: printed with the command's name, exit status 2."""


def resolve_model(target: str) -> Any:
    """The object that ``module:attr`` names; a plain function is called to make the model."""
    from ..gate.data import resolve_target

    try:
        obj = resolve_target(target, "MODULE:ATTRIBUTE (such as service.model:pipeline)")
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    return obj() if inspect.isfunction(obj) else obj


def load_inputs(path: str) -> list[Any]:
    """The example input(s) in ``path``: the positional arguments of its first call, read as
    ``inferscope bench`` reads its data (``inferscope.gate.data``)."""
    import numpy as np

    from ..gate.data import load_calls

    try:
        args, kwargs = load_calls(path)[0]
    except (OSError, ValueError) as exc:
        raise _UsageError(f"cannot read {path}: {exc}") from None
    if kwargs or not args:
        raise _UsageError(
            f"{path}: compare takes the model's inputs as positional arguments; the first call has "
            f"{len(args)} positional and {len(kwargs)} keyword arguments"
        )
    return [np.asarray(a) if isinstance(a, list) else a for a in args]


def _variants(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected variant names separated by commas")
    return names


def _run(args: argparse.Namespace) -> int:
    from ..compare import compare

    try:
        model = resolve_model(args.target)
        inputs = load_inputs(args.data)
        result = compare(
            model,
            *inputs,
            variants=args.variants,
            method=args.method,
            rtol=args.rtol,
            atol=args.atol,
            seconds=args.seconds,
            rounds=args.rounds,
            confidence=args.confidence,
        )
    except (_UsageError, TypeError, ValueError) as exc:  # ConfigError is a ValueError
        print(f"inferscope compare: {exc}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(result.to_json() + "\n")
    print(result.to_json() if args.json else result.table())
    return 0 if result.baseline.status == "ok" else 1


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODULE:ATTR", help="the model, or a function that returns it")
    parser.add_argument(
        "--data", required=True, metavar="FILE", help="the example input: .npy, .npz or .jsonl (first line)"
    )
    parser.add_argument(
        "--variants",
        type=_variants,
        metavar="A,B",
        help="only these variants (the baseline always runs); default: all of the model's framework",
    )
    parser.add_argument(
        "--method", help="the scikit-learn method to compare (default: predict_proba if any, else predict)"
    )
    parser.add_argument("--rtol", type=bounded(float, 0.0, 1.0), default=1e-4, help="default: 1e-4")
    parser.add_argument("--atol", type=bounded(float, 0.0, 1e6), default=1e-5, help="default: 1e-5")
    parser.add_argument(
        "--seconds",
        type=bounded(float, 0.01, 3600.0),
        default=1.0,
        help="timed calls per variant, in seconds (default: 1)",
    )
    parser.add_argument(
        "--rounds", type=bounded(int, 3, 1000), default=10, help="interleaved rounds (default: 10)"
    )
    parser.add_argument(
        "--confidence",
        type=bounded(float, 0.5, 0.999),
        default=0.95,
        help="of the speed-up's interval (default: 0.95)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument(
        "--output", metavar="FILE", help="also write the result as JSON to FILE (for the report)"
    )


COMMAND = Command(
    name="compare",
    help="compare the ways of running a model (TorchScript, torch.compile, ONNX Runtime, XLA...)",
    description="Build the variants of a model that its framework offers (torch: eager, torch.jit.trace, "
    "torch.jit.script, torch.compile, ONNX Runtime; Keras: eager, tf.function, XLA; scikit-learn, "
    "xgboost, lightgbm: the model, the Booster's predictors, ONNX Runtime), check that each gives the "
    "baseline's outputs, time them in interleaved rounds, and name the fastest one. Exit status: 0, 1 "
    "when the baseline itself failed, 2 for a bad argument.",
    add_arguments=_add_arguments,
    run=_run,
)
