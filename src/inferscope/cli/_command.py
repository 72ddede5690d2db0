"""What a command module declares, and the argument types the commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Command", "bounded"]

Number = TypeVar("Number", int, float)


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


@dataclass(frozen=True)
class Command:
    """One ``inferscope`` subcommand.

    ``help`` is its line in ``inferscope --help``; ``description`` (default: ``help``) heads
    ``inferscope NAME --help``. ``add_arguments`` declares its options on its own parser, so that a
    bad value is reported with this command's usage. ``run`` gets the parsed arguments and returns
    the exit status.
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    description: str | None = None


def _plain(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def bounded(kind: Callable[[str], Number], low: Number, high: Number) -> Callable[[str], Number]:
    """An argparse ``type`` that accepts ``low <= value <= high``; anything else is a usage error
    of the command that declared it.

    >>> parser = argparse.ArgumentParser(prog="inferscope demo")
    >>> _ = parser.add_argument("--threads", type=bounded(int, 1, 64))
    >>> parser.parse_args(["--threads", "4"]).threads
    4
    """

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not low <= value <= high:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be from {_plain(low)} to {_plain(high)}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
