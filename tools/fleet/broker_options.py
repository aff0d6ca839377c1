"""The broker command-line options every fleet command shares (push, devices, watch, cmd, rollback)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from edgecv.agent.contract.topics import DEFAULT_PREFIX

if TYPE_CHECKING:  # keeps `edgecv --help` free of paho imports
    from edgecv.tools.fleet.mqtt_client import ClientOptions


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """--broker/--prefix and authentication/TLS flags shared by push, devices, watch, cmd and rollback."""
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
    from edgecv.tools.errors import FleetError
    from edgecv.tools.fleet.mqtt_client import ClientOptions

    password = None
    if getattr(args, "password_env", None):
        password = os.environ.get(args.password_env)
        if password is None:
            raise FleetError(f"Environment variable {args.password_env} (--password-env) is not set")
    return ClientOptions.from_address(args.broker, protocol=args.protocol, username=args.username,
                                      password=password, tls=bool(args.tls or args.ca_file), ca_file=args.ca_file,
                                      cert_file=args.cert_file, key_file=args.key_file)
