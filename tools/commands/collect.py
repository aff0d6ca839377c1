"""`edgecv collect --device ID --out DATASET`: fetch the samples devices kept for labelling into a dataset folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecv.agent.contract.samples import MAX_CHUNK, REASONS
from edgecv.tools.commands.output import EXIT_CODES, add_json_option, add_progress_option
from edgecv.tools.fleet.broker_options import add_broker_arguments, add_target_arguments, client_options, target_names

HEADERS = ["DEVICE", "LISTED", "FETCHED", "ALREADY HAD", "FAILED", "BYTES", "DELETED"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "collect", help="fetch the samples devices kept for labelling into a dataset folder",
        description="Fetch the samples devices stored for labelling ([samples] in the agent config: low-confidence "
                    "results, state changes, pending changes, periodic samples) over MQTT, in checksummed chunks, "
                    "into DATASET/_unlabelled/<id>.jpg with a <id>.json sidecar holding the device's prediction, "
                    "score, camera, region and time (docs/DATASETS.md): ready for 'edgecv label DATASET'. Samples "
                    "already in the dataset (unlabelled, labelled or junked) are not fetched again; an interrupted "
                    "download resumes from DATASET/_unlabelled/.<id>.jpg.part. --delete-after removes from the "
                    "device the samples whose copy in the dataset was verified. Prints one row per device (DEVICE, "
                    "LISTED, FETCHED, ALREADY HAD, FAILED, BYTES, DELETED), or a JSON array with --json. "
                    + EXIT_CODES)
    add_target_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="DATASET",
                        help="the dataset folder (created if missing)")
    parser.add_argument("--reason", action="append", choices=REASONS, default=[], metavar="REASON",
                        help=f"only samples kept for this reason (repeatable; {', '.join(REASONS)})")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N samples per device")
    parser.add_argument("--delete-after", action="store_true",
                        help="delete the collected samples on the device once their copies are verified")
    parser.add_argument("--chunk-size", type=int, default=MAX_CHUNK, metavar="BYTES",
                        help=f"bytes per chunk, 1024 to {MAX_CHUNK} (default {MAX_CHUNK}, the device's cap)")
    parser.add_argument("--timeout", type=float, default=15.0, metavar="S",
                        help="seconds to wait for each answer before asking again (default 15)")
    add_progress_option(parser)
    add_json_option(parser, "one result per device")
    add_broker_arguments(parser)
    parser.set_defaults(handler=collect_cmd)


def collect_cmd(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgecv.tools.commands.output import note, print_json, print_table, progress_enabled
    from edgecv.tools.errors import FleetError, UsageError
    from edgecv.tools.fleet.collect import DeviceCollection, collect_device
    from edgecv.tools.fleet.targets import resolve_targets

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if not 1024 <= args.chunk_size <= MAX_CHUNK:
        raise UsageError(f"--chunk-size must be from 1024 to {MAX_CHUNK}, got {args.chunk_size}")
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout:g}")
    options = client_options(args)
    targets = resolve_targets(options, args.prefix, target_names(args), args.group,
                              wait_for_device=args.wait_for_device)
    results: list[DeviceCollection] = []
    bar = tqdm(unit="B", unit_scale=True, desc="collect", leave=False, disable=not progress_enabled(args))
    try:
        for device in targets.devices:
            try:
                results.append(collect_device(options, args.prefix, device, args.out, reasons=args.reason,
                                              limit=args.limit, chunk_size=args.chunk_size, timeout=args.timeout,
                                              delete_after=args.delete_after, progress=bar.update))
            except FleetError as exc:
                failed = DeviceCollection(device)
                failed.failed["-"] = str(exc)
                results.append(failed)
    finally:
        bar.close()
    if args.json:
        print_json([r.to_dict() for r in results])
    else:
        print_table(HEADERS, [[r.device, r.listed, len(r.fetched), len(r.already), len(r.failed), r.bytes,
                               r.deleted if args.delete_after else "-"] for r in results])
    failures = [(r.device, sample, why) for r in results for sample, why in r.failed.items()]
    for device, sample, why in failures[:20]:
        note(f"edgecv: {device}: {why}" if sample == "-" else f"edgecv: {device}: sample {sample}: {why}")
    if len(failures) > 20:
        note(f"edgecv: ... and {len(failures) - 20} more failure(s)")
    if failures:
        note(f"edgecv: {len(failures)} failure(s); what was complete is kept in {args.out}; run the same command "
             "again to resume")
        return 1
    return 0
