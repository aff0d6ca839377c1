"""`edgecv watch`: print the fleet's predictions live, as a table or JSON lines."""

from __future__ import annotations

import argparse
from typing import Any

from edgecv.tools.fleet.broker_options import add_broker_arguments, client_options


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "watch", help="print predictions live (table or JSON lines)",
        description="Subscribe to <prefix>/+/predictions and print each prediction: time, device, camera, top "
                    "label, score and latency; or the raw payloads as JSON lines with --json.")
    add_broker_arguments(parser)
    parser.add_argument("--device", nargs="+", action="extend", default=[], metavar="ID",
                        help="only these devices")
    parser.add_argument("--group", help="only devices whose retained status lists this group")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--count", type=int, help="stop after N predictions (exit 1 if fewer arrive in --timeout)")
    parser.add_argument("--timeout", type=float, help="stop after this many seconds")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from edgecv.tools.fleet.watch import run_watch

    timeout = args.timeout if args.timeout is not None else (60.0 if args.count is not None else None)
    return run_watch(client_options(args), args.prefix, args.device, args.group, args.json, args.count, timeout)
