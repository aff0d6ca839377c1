"""`edgecv label`: serve the labelling page for a collected dataset on 127.0.0.1 until Ctrl+C."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8765

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "label", help="sort collected images into class folders in a local web page",
        description="Serve a page on 127.0.0.1 that shows the images waiting in DATASET/_unlabelled with their "
                    "predicted labels and moves each into DATASET/<class>/ (or DATASET/_junk/) at a key press; "
                    "every move is logged in DATASET/_labels.log and can be undone. Layout: docs/DATASETS.md. "
                    "Prints how many images wait and the page's URL, runs until Ctrl+C, then prints how many are "
                    "left. Exit status 0 after Ctrl+C, 1 when the dataset or port cannot be used, 2 on a usage "
                    "error.")
    parser.add_argument("dataset", type=Path, help="dataset root, as written by 'edgecv collect --out'")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port on 127.0.0.1 (default {DEFAULT_PORT}, or any free port when that one is "
                             "taken; 0 = any free port)")
    parser.add_argument("--open", action="store_true", help="open the page in the default web browser")
    parser.set_defaults(handler=label_cmd)


def label_cmd(args: argparse.Namespace) -> int:
    from edgecv.tools.errors import ToolsError
    from edgecv.tools.label.server import LabelServer
    from edgecv.tools.label.store import LabelStore

    store = LabelStore(args.dataset)
    try:
        server = LabelServer(store, port=DEFAULT_PORT if args.port is None else args.port)
    except ToolsError:
        if args.port is not None:
            raise
        log.info("Port %d is taken; using a free one", DEFAULT_PORT)
        server = LabelServer(store, port=0)
    samples, summary = store.state()
    print(f"{len(samples)} image(s) to label in {store.root}, {len(summary.classes)} class(es)")
    print(f"Labelling page: {server.url}  (Ctrl+C to stop)", flush=True)
    if store.repaired:
        print(f"Put back {store.repaired} sidecar(s) that an interrupted run left in _unlabelled")

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server.start()
    try:
        if args.open:
            import webbrowser

            if not webbrowser.open(server.url):
                print("Could not start a web browser: open the URL above yourself")
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
    samples, summary = store.state()
    print(f"Stopped. {len(samples)} image(s) left in _unlabelled; log: {store.journal.path}")
    return 0
