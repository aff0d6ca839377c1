"""`edgecv cmd ping|reload|snapshot|rollback|samples --device ID|--group G`: send one command to devices and print their
results."""

from __future__ import annotations

import argparse
import base64
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecv.tools.commands.output import add_json_option
from edgecv.tools.fleet.broker_options import add_broker_arguments, add_target_arguments, client_options, target_names
from edgecv.tools.fleet.remote import COMMANDS

if TYPE_CHECKING:
    from edgecv.tools.fleet.remote import CommandResult

HEADERS = ["DEVICE", "RESULT", "MODEL", "SECONDS", "DETAIL"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cmd", help="send a command to devices (ping, reload, snapshot, rollback, samples)",
        usage="edgecv cmd {ping,reload,snapshot,rollback,samples} (--device ID | --group G) [options]",
        description="Publish a command with a request id to <prefix>/<device>/cmd/<name> of each target and print "
                    "every device's result: a table (DEVICE, RESULT, MODEL, SECONDS, DETAIL) or a JSON array with "
                    "--json. ping: agent version, model and uptime; reload: the active model reloaded in a fresh "
                    "runtime; snapshot: the latest frame saved as JPEG (--out) with its predictions; rollback: back "
                    "to the previous (or --to) installed model; samples: how many "
                    "samples the device keeps for labelling (its first page; 'edgecv collect' fetches them). Exit "
                    "status 0 when every device answered ok, 1 when "
                    "any failed or did not answer within --timeout (or was never seen), 2 on a usage error. The old "
                    "order 'edgecv cmd DEVICE NAME' still works, with a deprecation warning.")
    parser.add_argument("name", metavar="{ping,reload,snapshot,rollback,samples}", help="the command to send")
    parser.add_argument("legacy", nargs="?", help=argparse.SUPPRESS)  # `cmd DEVICE NAME`, the old order
    add_target_arguments(parser, required=False)
    parser.add_argument("--to", metavar="VERSION", help="rollback: version to go back to (default: the previous one)")
    parser.add_argument("--out", type=Path, metavar="PATH",
                        help="snapshot: the JPEG file (default <device>-snapshot.jpg); a folder for several devices")
    parser.add_argument("--timeout", type=float, default=15.0, metavar="S",
                        help="seconds to wait for the results (default 15)")
    add_json_option(parser, "one result per device")
    add_broker_arguments(parser)
    parser.set_defaults(handler=cmd_cmd)


def cmd_cmd(args: argparse.Namespace) -> int:
    from edgecv.tools.commands.output import note
    from edgecv.tools.errors import UsageError

    name, legacy = args.name, args.legacy
    if name not in COMMANDS and legacy in COMMANDS:
        note(f"edgecv: warning: 'edgecv cmd DEVICE {legacy}' is deprecated; write 'edgecv cmd {legacy} --device "
             f"{name}'")
        if args.group:
            raise UsageError("Give the device either as the old first argument or with --device/--group, not both")
        name, args.device = legacy, [name, *args.device]
    elif name not in COMMANDS:
        raise UsageError(f"Unknown command {name!r}; choose one of {', '.join(COMMANDS)}")
    elif legacy is not None:
        raise UsageError(f"Unexpected argument {legacy!r}; name the device with --device {legacy}")
    body: dict[str, Any] = {}
    if name == "rollback" and args.to:
        body["to"] = args.to
    elif args.to:
        raise UsageError("--to applies to rollback only")
    if args.out is not None and name != "snapshot":
        raise UsageError("--out applies to snapshot only")
    return run_command(args, name, body)


def run_command(args: argparse.Namespace, name: str, body: dict[str, Any]) -> int:
    """Resolve the targets, send `name`, print the results; 0 when every device answered ok."""
    from edgecv.tools.commands.output import note, print_json, print_table
    from edgecv.tools.errors import UsageError
    from edgecv.tools.fleet.devices import describe_offline
    from edgecv.tools.fleet.remote import send_commands, wait_until_answering
    from edgecv.tools.fleet.targets import resolve_targets

    if not target_names(args) and not args.group:
        raise UsageError("Name the target devices: --device ID (repeatable) or --group G")
    options = client_options(args)
    started = time.monotonic()
    targets = resolve_targets(options, args.prefix, target_names(args), args.group,
                              wait_for_device=args.wait_for_device)
    if args.wait_for_device:  # devices that just came online: make sure they hear commands before sending one
        wait_until_answering(options, args.prefix, targets.devices,
                             max(1.0, args.wait_for_device - (time.monotonic() - started)))
    for device in targets.offline():
        note(f"{describe_offline(targets.infos[device])}; waiting up to --timeout {args.timeout:g} s for its answer")
    results = send_commands(options, args.prefix, targets.devices, name, body, timeout=args.timeout)
    if name == "snapshot":
        _save_snapshots(results, getattr(args, "out", None))
    if args.json:
        print_json([r.to_dict() for r in results])
    else:
        print_table(HEADERS, [[r.device, "ok" if r.ok else ("no answer" if r.doc is None else "failed"),
                               _model(r), "-" if r.seconds is None else f"{r.seconds:.2f}", _detail(name, r)]
                              for r in results])
    failed = [r for r in results if not r.ok]
    for r in failed:
        note(f"edgecv: {r.device} {name} failed: {r.error}")
    return 1 if failed else 0


def _save_snapshots(results: list[CommandResult], out: Path | None) -> None:
    """Write each snapshot's JPEG: to `out` (one device), into folder `out` (several), else <device>-snapshot.jpg."""
    several = len(results) > 1
    for r in results:
        if not r.ok or r.doc is None or not r.doc.get("jpeg"):
            continue
        jpeg = base64.b64decode(r.doc.pop("jpeg"))
        name = f"{r.device}-snapshot.jpg"
        path = (out / name if several else out) if out is not None else Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg)
        r.extra.update(saved=str(path), jpeg_bytes=len(jpeg))


def _model(r: CommandResult) -> str:
    model = (r.doc or {}).get("model")
    if not isinstance(model, dict) or not model.get("name"):
        return "-"
    return f"{model.get('name')} {model.get('version')}"


def _detail(name: str, r: CommandResult) -> str:
    if not r.ok:
        return r.error or ""
    doc = r.doc or {}
    if name == "ping":
        up = doc.get("uptime_s")
        return f"agent {doc.get('agent_version')}, up {_duration(up) if isinstance(up, int | float) else '?'}"
    if name == "snapshot":
        top = (doc.get("top") or [{}])[0] or {}
        best = f"; top {top.get('label')} {top.get('score', 0):.3f}" if top.get("label") else ""
        return (f"saved {r.extra.get('saved')} ({doc.get('width')}x{doc.get('height')}, "
                f"{r.extra.get('jpeg_bytes')} bytes){best}")
    if name == "samples":
        listed = doc.get("samples")
        count = len(listed) if isinstance(listed, list) else 0
        return f"{count}{'+' if doc.get('more') else ''} sample(s) stored"
    sha = ((doc.get("model") or {}).get("sha256") or "")[:12]
    return f"sha {sha}" if sha else ""


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
