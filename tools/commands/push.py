"""`edgecv push`: send a bundle to devices or a group (optionally staged), wait for each device's result."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecv.tools.commands.keys import DEFAULT_KEY
from edgecv.tools.commands.output import add_json_option, add_progress_option
from edgecv.tools.errors import UsageError
from edgecv.tools.fleet.broker_options import add_broker_arguments, add_target_arguments, client_options, target_names

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "push", help="push a bundle to devices or a group over MQTT",
        description="Send a bundle (.edgecv archive, or a bundle directory which is packed first) in chunks over "
                    "MQTT to --device ID (repeatable) or every online member of --group G. Devices verify it "
                    "(sha256, signature), run its self-test and swap it in without a restart; the transfer resumes "
                    "after disconnects. A device id the broker has never seen fails at once (see "
                    "--wait-for-device). Prints one row per device (DEVICE, RESULT, VERSION, SECONDS, DETAIL), or "
                    "a JSON array with --json; progress goes to stderr. Exit status 0 only when every device "
                    "activated the bundle, 1 when any did not (rejected, rolled back, failed, timed out), 2 on a "
                    "usage error.")
    parser.add_argument("bundle", type=Path, help="bundle .edgecv archive or directory")
    add_target_arguments(parser)
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
                             "still refuse, and devices that require signed bundles only accept the request "
                             "signed (--key). Going back to an installed version is 'edgecv rollback'")
    parser.add_argument("--key", type=Path, metavar="PRIVATE_KEY",
                        help="with --allow-downgrade: sign the request for each device (or the group) with this "
                             f"key from the device keyring, valid for an hour (default {DEFAULT_KEY} when it exists)")
    parser.add_argument("--transfer-id", help="reuse a transfer id to resume an interrupted push")
    parser.add_argument("--wait-probation", action="store_true",
                        help="after activation, wait out each device's probation and report whether the model "
                             "survived it (rolled back = failure); a staged rollout then judges each stage by it")
    add_progress_option(parser)
    add_json_option(parser, "one result per device")
    add_broker_arguments(parser)
    parser.set_defaults(handler=push_cmd)


def push_cmd(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgecv.tools.commands.output import note, print_json, print_table, progress_enabled
    from edgecv.tools.fleet.devices import describe_offline
    from edgecv.tools.fleet.push import Pusher, read_archive
    from edgecv.tools.fleet.rollout import RolloutPlan, rollout
    from edgecv.tools.fleet.targets import resolve_targets

    grant_key = downgrade_key(args)
    options = client_options(args)
    archive, name, version = read_archive(args.bundle)
    staged = bool(args.canary or args.batch_size)
    targets = resolve_targets(options, args.prefix, target_names(args), args.group,
                              wait_for_device=args.wait_for_device)
    devices = list(targets.devices)
    for device in targets.offline():
        note(f"{describe_offline(targets.infos[device])}; it gets the bundle when it reconnects within --timeout "
             f"{args.timeout:g} s")
    copies = 1 if (args.group and not staged) else len(devices)
    note(f"Pushing {name} {version} ({len(archive)} bytes) to {len(devices)} device(s)"
         f"{f' in group {args.group}' if args.group else ''}")
    bar = tqdm(total=len(archive) * copies, unit="B", unit_scale=True, desc="push", leave=False,
               disable=not progress_enabled(args))
    try:
        if staged:
            plan = RolloutPlan(canary=args.canary, batch_size=args.batch_size, max_failures=args.max_failures)
            results = rollout(options, archive, name, version, devices, plan, prefix=args.prefix,
                              chunk_size=args.chunk_size, timeout=args.timeout, progress=bar.update,
                              on_stage=lambda n, s: note(f"stage {n + 1}: {', '.join(s)}"),
                              allow_downgrade=args.allow_downgrade, grant_key=grant_key,
                              wait_probation=args.wait_probation)
        else:
            pusher = Pusher(options, archive, name, version, prefix=args.prefix, chunk_size=args.chunk_size,
                            timeout=args.timeout, transfer_id=args.transfer_id, progress=bar.update,
                            allow_downgrade=args.allow_downgrade, grant_key=grant_key,
                            wait_probation=args.wait_probation)
            results = pusher.push(devices, group=args.group if args.group else None)
    finally:
        bar.close()
    if args.json:
        print_json([{**asdict(r), "ok": r.ok} for r in results])
    else:
        print_table(["DEVICE", "RESULT", "VERSION", "SECONDS", "DETAIL"],
                    [[r.device, r.state, r.version or "-", f"{r.seconds:.1f}",
                      r.error or (f"probation {r.probation}" if r.probation else "")] for r in results])
    failed = [r for r in results if not r.ok]
    if failed:
        note(f"{len(failed)} of {len(results)} device(s) did not activate {name} {version}")
        return 1
    return 0


def downgrade_key(args: argparse.Namespace) -> Ed25519PrivateKey | None:
    """The key that signs the downgrade request: --key, else the default signing key when it exists; None (and a
    note) when there is none, because devices that accept unsigned bundles take an unsigned request."""
    from edgecv.agent.contract.signing import load_private_key
    from edgecv.tools.commands.output import note

    if args.key is not None and not args.allow_downgrade:
        raise UsageError("--key signs a downgrade request: use it with --allow-downgrade (bundles are signed by "
                         "'edgecv optimize --key' or 'edgecv bundle sign')")
    if not args.allow_downgrade:
        return None
    path = args.key if args.key is not None else DEFAULT_KEY.expanduser()
    if args.key is None and not path.exists():
        note(f"The downgrade request is not signed (no --key, no {DEFAULT_KEY}): devices that require signed bundles "
             "refuse it")
        return None
    return load_private_key(path.expanduser())
