"""`edgecv devices`: one line per device from retained status, model state and recent health.

Also home of the broker options every fleet command shares (`add_broker_arguments`, `client_options`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import TYPE_CHECKING, Any

from agent.contract.topics import DEFAULT_PREFIX

if TYPE_CHECKING:  # keeps `edgecv --help` free of paho imports
    from tools.fleet.mqtt_client import ClientOptions


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """--broker/--prefix and authentication/TLS flags shared by push, devices, cmd and rollback."""
    group = parser.add_argument_group("broker")
    group.add_argument("--broker", default=os.environ.get("EDGECV_BROKER", "127.0.0.1:1883"),
                       help="MQTT broker host:port (default $EDGECV_BROKER or 127.0.0.1:1883)")
    group.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})")
    group.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT protocol version")
    group.add_argument("--username", help="broker user name")
    group.add_argument("--password-env", metavar="VAR", help="read the broker password from this variable")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca-file", help="CA certificate for TLS")
    group.add_argument("--cert-file", help="client certificate for TLS")
    group.add_argument("--key-file", help="client key for TLS")


def client_options(args: argparse.Namespace) -> ClientOptions:
    from tools.errors import FleetError
    from tools.fleet.mqtt_client import ClientOptions

    password = None
    if getattr(args, "password_env", None):
        password = os.environ.get(args.password_env)
        if password is None:
            raise FleetError(f"Environment variable {args.password_env} (--password-env) is not set")
    return ClientOptions.from_address(args.broker, protocol=args.protocol, username=args.username,
                                      password=password, tls=bool(args.tls or args.ca_file), ca_file=args.ca_file,
                                      cert_file=args.cert_file, key_file=args.key_file)


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
    from tools.fleet.devices import HEADERS, discover, format_table

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
