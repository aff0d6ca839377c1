"""`edgecv rollback --device ID [--to VERSION]`: make a device go back to its previous (or a named) model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edgecv.tools.fleet.broker_options import add_broker_arguments


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rollback", help="switch a device back to its previous model",
        description="Ask a device to re-activate its previous model (or --to an installed version). The device "
                    "re-verifies it, swaps it in without a restart and publishes model/state rolled_back.")
    parser.add_argument("--device", required=True, help="device id")
    parser.add_argument("--to", help="installed version to go back to (default: the previous one)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the result (default 30)")
    add_broker_arguments(parser)
    parser.set_defaults(handler=rollback_cmd)


def rollback_cmd(args: argparse.Namespace) -> int:
    from edgecv.tools.commands.cmd import send_command

    result = send_command(args, "rollback", {"to": args.to} if args.to else {})
    if not result.get("ok"):
        print(f"edgecv: rollback of {args.device} failed: {result.get('error')}", file=sys.stderr)
        return 1
    model = result.get("model") or {}
    print(f"{args.device}: now running {model.get('name')} {model.get('version')}")
    return 0
