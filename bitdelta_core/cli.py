"""``bitdelta`` command line: a thin layer over the Python API.

Each command group lives in its own ``add_*`` function so the groups stay independent.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import BitDeltaError

logger = logging.getLogger("bitdelta")


def add_core_commands(sub: argparse._SubParsersAction) -> None:
    """compress / inspect / apply (issue: core)."""
    # COMMANDS-CORE


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """finetune / distill / eval (issue: distillation & evaluation)."""
    # COMMANDS-DATA


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    """serve / demo / register / models (issue: service)."""
    # COMMANDS-SERVE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitdelta", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_core_commands(sub)
    add_data_commands(sub)
    add_serve_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except BitDeltaError as e:
        logger.debug("error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
