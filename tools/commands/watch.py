"""`edgecv watch`: print the fleet's predictions live, as a table or JSON lines."""

from __future__ import annotations

import argparse
from typing import Any

from edgecv.tools.commands.output import add_json_option
from edgecv.tools.fleet.broker_options import add_broker_arguments, add_target_arguments, client_options


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "watch", help="print predictions live (table or JSON lines)",
        description="Subscribe to <prefix>/+/predictions and print each prediction as it arrives: a table row "
                    "(TIME, DEVICE, CAMERA, TOP, SCORE, INFER, TOTAL, SEQ; region state changes as STATE rows), or "
                    "with --json the payloads as JSON lines. Runs until Ctrl+C, --count or --timeout. Exit status 0; "
                    "1 when fewer than --count predictions arrived (before --timeout or Ctrl+C) or the broker "
                    "cannot be reached; 2 on a usage error.")
    add_target_arguments(parser, filter=True, several_per_option=True)
    add_json_option(parser, "one JSON object per line (a stream, not one document)")
    parser.add_argument("--count", type=int, metavar="N",
                        help="stop after N predictions (exit 1 if fewer arrive in --timeout)")
    parser.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds (default: with --count 60)")
    add_broker_arguments(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from edgecv.tools.fleet.watch import run_watch

    timeout = args.timeout if args.timeout is not None else (60.0 if args.count is not None else None)
    return run_watch(client_options(args), args.prefix, args.device, args.group, args.json, args.count, timeout)
