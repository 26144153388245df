"""The ``unguide`` command line: one module per command (its parser beside its handler). Bad input ends with one
line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys

from ..errors import UnguideError
from . import attack, benchmark, demo, erase, evaluate, generate, influence, scorer, serve, toy
from .common import Parser, check_numbers, flag_words, show_library_log

COMMANDS = (generate, erase, toy, benchmark, evaluate, scorer, influence, attack, demo, serve)  # in --help order


def build_parser() -> Parser:
    parser = Parser(prog="unguide", description="Controlled concept erasure for text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    check_numbers(parser)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    show_library_log()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad flag (one line already printed) or --help: the code, for Python callers too
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except UnguideError as exc:
        print(f"unguide: error: {flag_words(str(exc), parser)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unguide: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
