"""`edgecv devices`: one line per device from retained status, model state and the latest health."""

from __future__ import annotations

import argparse
import time
from typing import Any

from edgecv.tools.commands.output import EXIT_CODES, add_json_option
from edgecv.tools.fleet.broker_options import add_broker_arguments, add_target_arguments, client_options


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "devices", help="list devices: state, model, last seen, fps, latency",
        description="List the devices the broker knows: their retained status and model state, and the fps and "
                    "median latency of their latest health report (online devices re-send it when asked by the "
                    "announce request, so the figures are there within a second). Prints a table (DEVICE, STATE, "
                    "MODEL, SHA, MODEL STATE, LAST SEEN, FPS, P50 MS, GROUPS, REGIONS), or a JSON array with "
                    "--json; no devices is not an error. " + EXIT_CODES)
    add_target_arguments(parser, filter=True)
    parser.add_argument("--wait", type=float, default=2.0, metavar="S",
                        help="seconds to listen for answers and health reports (default 2)")
    add_json_option(parser, "one object per device")
    add_broker_arguments(parser)
    parser.set_defaults(handler=devices_cmd)


def devices_cmd(args: argparse.Namespace) -> int:
    from edgecv.tools.commands.output import note, print_json, print_table
    from edgecv.tools.fleet.devices import HEADERS, discover

    infos = discover(client_options(args), prefix=args.prefix, wait=args.wait)
    rows = sorted(infos.values(), key=lambda i: i.device)
    if args.device:
        rows = [i for i in rows if i.device in args.device]
    if args.group:
        rows = [i for i in rows if args.group in i.groups]
    if args.json:
        print_json([{k: v for k, v in vars(i).items() if k != "extra"} for i in rows])
        return 0
    if not rows:
        note(f"No devices found under prefix {args.prefix!r} on {args.broker}"
             + (" matching --device/--group" if args.device or args.group else ""))
        return 0
    now = time.time()
    print_table(HEADERS, [i.row(now) for i in rows])
    return 0
