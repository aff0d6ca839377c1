"""`edgecv cmd DEVICE ping|reload|snapshot`: send one command and print its result."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from edgecv.tools.fleet.broker_options import add_broker_arguments, client_options


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cmd", help="send a command to a device (ping, reload, snapshot, rollback)",
        description="Publish a command with a request id to <prefix>/<device>/cmd/<name> and print the "
                    "device's result. Exit status 0 when the device answered ok.")
    parser.add_argument("device", help="device id")
    parser.add_argument("command", choices=("ping", "reload", "snapshot", "rollback"))
    parser.add_argument("--to", help="rollback: version to go back to (default: the previous one)")
    parser.add_argument("--out", type=Path, help="snapshot: write the JPEG here")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the result (default 15)")
    add_broker_arguments(parser)
    parser.set_defaults(handler=cmd_cmd)


def send_command(args: argparse.Namespace, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """Publish one command and return the device's result document (FleetError on timeout)."""
    from edgecv.agent.contract.topics import DeviceTopics
    from edgecv.tools.errors import FleetError
    from edgecv.tools.fleet.mqtt_client import MqttClient

    topics = DeviceTopics(args.prefix, args.device)
    request_id = uuid.uuid4().hex[:12]
    with MqttClient(client_options(args)) as client:
        client.subscribe(topics.cmd_result(name))
        client.publish(topics.cmd(name), {"id": request_id, **body})
        try:
            msg = client.wait_for(lambda m: _id(m) == request_id, timeout=args.timeout)
        except FleetError:
            raise FleetError(f"Device {args.device} did not answer {name} (request {request_id}) within "
                             f"{args.timeout:g} s; is it online? ('edgecv devices')") from None
    return msg.json()


def _id(msg: Any) -> Any:
    try:
        return msg.json().get("id")
    except ValueError:
        return None


def cmd_cmd(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.command == "rollback" and args.to:
        body["to"] = args.to
    result = send_command(args, args.command, body)
    if args.command == "snapshot" and result.get("ok") and result.get("jpeg"):
        jpeg = base64.b64decode(result.pop("jpeg"))
        out = args.out or Path(f"{args.device}-snapshot.jpg")
        out.write_bytes(jpeg)
        result["saved"] = str(out)
        result["jpeg_bytes"] = len(jpeg)
    print(json.dumps(result, indent=2, sort_keys=True))
    if not result.get("ok"):
        print(f"edgecv: {args.device} {args.command} failed: {result.get('error')}", file=sys.stderr)
        return 1
    return 0
