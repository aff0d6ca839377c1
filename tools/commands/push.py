"""`edgecv push`: send a bundle to devices or a group (optionally staged), wait for each device's result."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edgecv.tools.fleet.broker_options import add_broker_arguments, client_options


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "push", help="push a bundle to devices or a group over MQTT",
        description="Send a bundle (.edgecv archive, or a bundle directory which is packed first) in chunks over "
                    "MQTT. Devices verify it (sha256, signature), run its self-test and swap it in without a "
                    "restart. Resumes after disconnects. Exit status 0 only when every device activated it.")
    parser.add_argument("bundle", type=Path, help="bundle .edgecv archive or directory")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", action="append", default=[], metavar="ID", help="target device (repeatable)")
    target.add_argument("--group", help="target every online device whose status lists this group")
    parser.add_argument("--canary", type=int, default=0, metavar="N",
                        help="with --group: push to N devices first and stop if they fail")
    parser.add_argument("--batch-size", type=int, default=0, metavar="M",
                        help="with --group: after the canary, push M devices at a time (0 = all at once)")
    parser.add_argument("--max-failures", type=int, default=0, metavar="K",
                        help="stop a staged rollout once more than K devices failed (default 0)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds to wait for the devices (per stage; default 120)")
    parser.add_argument("--chunk-size", type=int, default=64 * 1024, metavar="BYTES",
                        help="chunk size, 4096 to 1048576 (default 65536; keep below the broker's "
                             "message_size_limit)")
    parser.add_argument("--allow-downgrade", action="store_true",
                        help="ask devices to install the bundle even if it is older than their active model (or the "
                             "same version with other content); devices with update.allow_downgrade = \"never\" "
                             "still refuse. Going back to an installed version is 'edgecv rollback'")
    parser.add_argument("--transfer-id", help="reuse a transfer id to resume an interrupted push")
    parser.add_argument("--wait-probation", action="store_true",
                        help="after activation, wait out each device's probation and report whether the model "
                             "survived it (rolled back = failure); a staged rollout then judges each stage by it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_broker_arguments(parser)
    parser.set_defaults(handler=push_cmd)


def push_cmd(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgecv.tools.errors import FleetError
    from edgecv.tools.fleet.devices import discover, format_table, group_members
    from edgecv.tools.fleet.push import Pusher, read_archive
    from edgecv.tools.fleet.rollout import RolloutPlan, rollout

    options = client_options(args)
    archive, name, version = read_archive(args.bundle)
    staged = bool(args.canary or args.batch_size)
    if args.group:
        devices = group_members(discover(options, prefix=args.prefix, wait=1.0), args.group)
        if not devices:
            raise FleetError(f"No online device lists group {args.group!r} in its status; check 'edgecv devices'")
    else:
        devices = list(dict.fromkeys(args.device))
    copies = 1 if (args.group and not staged) else len(devices)
    print(f"Pushing {name} {version} ({len(archive)} bytes) to {len(devices)} device(s)"
          f"{f' in group {args.group}' if args.group else ''}", file=sys.stderr)
    bar = tqdm(total=len(archive) * copies, unit="B", unit_scale=True, desc="push", file=sys.stderr,
               disable=args.no_progress or None, leave=False)
    try:
        if staged:
            plan = RolloutPlan(canary=args.canary, batch_size=args.batch_size, max_failures=args.max_failures)
            results = rollout(options, archive, name, version, devices, plan, prefix=args.prefix,
                              chunk_size=args.chunk_size, timeout=args.timeout, progress=bar.update,
                              on_stage=lambda n, s: print(f"stage {n + 1}: {', '.join(s)}", file=sys.stderr),
                              allow_downgrade=args.allow_downgrade, wait_probation=args.wait_probation)
        else:
            pusher = Pusher(options, archive, name, version, prefix=args.prefix, chunk_size=args.chunk_size,
                            timeout=args.timeout, transfer_id=args.transfer_id, progress=bar.update,
                            allow_downgrade=args.allow_downgrade, wait_probation=args.wait_probation)
            results = pusher.push(devices, group=args.group if args.group else None)
    finally:
        bar.close()
    rows = [[r.device, r.state, r.version or "-", f"{r.seconds:.1f}",
             r.error or (f"probation {r.probation}" if r.probation else "")] for r in results]
    print(format_table(["DEVICE", "RESULT", "VERSION", "SECONDS", "DETAIL"], rows))
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} device(s) did not activate {name} {version}", file=sys.stderr)
        return 1
    return 0
