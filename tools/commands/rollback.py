"""`edgecv rollback --device ID|--group G [--to VERSION]`: make devices go back to their previous (or a named) model."""

from __future__ import annotations

import argparse
from typing import Any

from edgecv.tools.commands.output import add_json_option
from edgecv.tools.fleet.broker_options import add_broker_arguments, add_target_arguments


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rollback", help="switch devices back to their previous model",
        description="Ask devices to re-activate their previous model (or --to an installed version). Each device "
                    "re-verifies it, swaps it in without a restart and publishes model/state rolled_back. Prints "
                    "one row per device (DEVICE, RESULT, MODEL, SECONDS, DETAIL), or a JSON array with --json. Exit "
                    "status 0 when every device rolled back, 1 when any refused (nothing to go back to, no such "
                    "version) or did not answer within --timeout (or was never seen), 2 on a usage error. On the "
                    "device itself, without a broker: 'edgecv-agent rollback'.")
    add_target_arguments(parser)
    parser.add_argument("--to", metavar="VERSION",
                        help="installed version to go back to (default: the previous one)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="seconds to wait for the results (default 30)")
    add_json_option(parser, "one result per device")
    add_broker_arguments(parser)
    parser.set_defaults(handler=rollback_cmd)


def rollback_cmd(args: argparse.Namespace) -> int:
    from edgecv.tools.commands.cmd import run_command

    return run_command(args, "rollback", {"to": args.to} if args.to else {})
