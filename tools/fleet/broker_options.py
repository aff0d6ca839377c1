"""The command-line options every fleet command shares (push, devices, watch, cmd, rollback): how to reach the broker,
and which devices a command addresses (`--device ID`, repeatable, and `--group G`, with the same meaning everywhere)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edgecv.agent.contract.topics import DEFAULT_PREFIX

if TYPE_CHECKING:  # keeps `edgecv --help` free of paho imports
    from edgecv.tools.fleet.mqtt_client import ClientOptions


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """--broker/--prefix and authentication/TLS flags shared by push, devices, watch, cmd and rollback."""
    group = parser.add_argument_group("broker")
    group.add_argument("--broker", default=os.environ.get("EDGECV_BROKER", "127.0.0.1:1883"),
                       help="MQTT broker host:port (default $EDGECV_BROKER or 127.0.0.1:1883)")
    group.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})")
    group.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                       help="MQTT protocol version (default 5; 3.1.1 for brokers such as NATS)")
    group.add_argument("--username", help="broker user name")
    group.add_argument("--password-env", metavar="VAR", help="read the broker password from this variable")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca-file", help="CA certificate for TLS")
    group.add_argument("--cert-file", help="client certificate for TLS")
    group.add_argument("--key-file", help="client key for TLS")


def add_target_arguments(parser: argparse.ArgumentParser, *, filter: bool = False, required: bool = True,
                         several_per_option: bool = False) -> None:
    """--device ID (repeatable) and --group G.

    For the commands that act on devices (push, cmd, rollback) they are the targets, one of the two required, and
    --wait-for-device S is added (targets.resolve_targets). With `filter` (devices, watch) they only narrow what is
    shown, and may be combined. `several_per_option` keeps the old `--device a b` spelling working (watch), with a
    deprecation warning."""
    group = parser.add_argument_group("devices")
    kind = "only this device" if filter else "send to this device"
    device_kw: dict[str, Any] = {"action": _DeviceIds, "dest": "device", "default": [], "metavar": "ID",
                                 "help": f"{kind}: a device id (repeatable: --device a --device b)"}
    if several_per_option:
        device_kw["nargs"] = "+"
    if filter:
        group.add_argument("--device", **device_kw)
        group.add_argument("--group", metavar="G", help="only devices whose retained status lists group G")
        return
    target = group.add_mutually_exclusive_group(required=required)
    target.add_argument("--device", **device_kw)
    target.add_argument("--group", metavar="G", help="send to every online device whose status lists group G")
    group.add_argument("--wait-for-device", type=float, metavar="S", default=None,
                       help="wait up to S seconds for the named devices to come online (default: a device id the "
                            "broker has never seen fails within about 2 s)")


class _DeviceIds(argparse.Action):
    """Collects --device values; several after one option (`--device a b`) still work but are deprecated."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        ids = [values] if isinstance(values, str) else list(values)
        if len(ids) > 1:
            print(f"edgecv: warning: '{option_string} {' '.join(ids)}' is deprecated; repeat the option instead: "
                  + " ".join(f"{option_string} {i}" for i in ids), file=sys.stderr)
        current = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, current + ids)


def target_names(args: argparse.Namespace) -> Sequence[str]:
    return tuple(dict.fromkeys(getattr(args, "device", None) or ()))


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
