"""The ``inferscope`` command: try inferscope, check what this machine can measure, compare environments.

One module per subcommand. Each defines ``COMMAND``, an ``inferscope.cli._command.Command`` with its
name, its help line, a function that declares its arguments and the function that runs it::

    # src/inferscope/cli/status.py
    import argparse

    from ._command import Command

    def _run(args: argparse.Namespace) -> int:
        ...
        return 0

    COMMAND = Command(name="status", help="...", run=_run)

To add a command, write its module and add its module name to ``COMMANDS`` below: that line is the
whole registration. ``COMMANDS`` also sets the order in ``inferscope --help``. Options that take a
number use ``_command.bounded`` so that a bad value is reported with the subcommand's own usage.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from ._command import Command

__all__ = ["COMMANDS", "build_parser", "main"]

#: The modules of inferscope.cli that each define one subcommand, in the order --help lists them.
COMMANDS = (
    "demo",
    "status",
    "report",
    "baseline",
    "compare",
    "profile",
    "bench",
    "doctor",
    "env",
    "assets",
    "version",
)

_DESCRIPTION = """\
inferscope measures what each inference of a deployed model costs (latency, CPU time, memory and
other counters, per model and per stage) and exports it through OpenTelemetry and Prometheus.

Its commands try it out without writing code (demo), read what a service recorded and which of its
costs regressed, check what this machine can measure and at what cost (doctor), and record or
compare the environment a service runs in (env).
"""

_EPILOG = "Run `inferscope COMMAND --help` for the options of a command."


def load_command(module_name: str) -> Command:
    """The ``COMMAND`` that ``inferscope.cli.<module_name>`` defines."""
    module = importlib.import_module(f"{__name__}.{module_name}")
    command = getattr(module, "COMMAND", None)
    if not isinstance(command, Command):
        raise TypeError(f"{module.__name__}.COMMAND must be an inferscope.cli._command.Command")
    return command


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``inferscope`` command, with one subparser per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="inferscope",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for module_name in COMMANDS:
        command = load_command(module_name)
        subparser = subparsers.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``inferscope`` with ``argv`` (default: ``sys.argv[1:]``) and return its exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status
