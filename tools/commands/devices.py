"""`edgecv devices`: one line per device from retained status, model state and recent health."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from edgecv.tools.fleet.broker_options import add_broker_arguments, client_options


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "devices", help="list devices: state, model, last seen, fps, latency",
        description="List the devices known to the broker from their retained status and model state, plus "
                    "health reports heard while listening.")
    add_broker_arguments(parser)
    parser.add_argument("--wait", type=float, default=2.0,
                        help="seconds to listen (health is not retained; default 2)")
    parser.add_argument("--group", help="only devices in this group")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=devices_cmd)


def devices_cmd(args: argparse.Namespace) -> int:
    from edgecv.tools.fleet.devices import HEADERS, discover, format_table

    infos = discover(client_options(args), prefix=args.prefix, wait=args.wait)
    rows = sorted(infos.values(), key=lambda i: i.device)
    if args.group:
        rows = [i for i in rows if args.group in i.groups]
    if args.json:
        print(json.dumps([{k: v for k, v in vars(i).items() if k != "extra"} for i in rows], indent=2, default=list))
        return 0
    if not rows:
        print(f"No devices found under prefix {args.prefix!r} on {args.broker}")
        return 0
    now = time.time()
    print(format_table(HEADERS, [i.row(now) for i in rows]))
    return 0
