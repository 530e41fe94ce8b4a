"""Command-line parsing with the agent's exit codes (docs/INTERFACE.md: 0 / 78 / 1).

argparse exits 2 on a usage mistake; for the agent a wrong command line is a configuration
error like a wrong config file: one line ``config error: command line: ...``, exit 78.
``--help`` still exits 0. The simulators use the same parser and port type.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_CONFIG = 78     # EX_CONFIG from sysexits.h


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors exit 78 (its subparsers are Parsers too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"config error: command line: {message} (see {self.prog} --help)\n")


def port(text: str) -> int:
    """A TCP port for ``--port``: 0 (any free one) to 65535, else a usage error (78)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value
