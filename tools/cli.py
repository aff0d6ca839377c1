"""`edgecv`: the workstation command line. Parses arguments, configures logging and hands over."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from edgecv.agent import __version__
from edgecv.agent.errors import EdgecvError

# Subcommand modules under tools/commands, in the order `--help` lists them.
COMMANDS = ("train", "prune", "quantize", "optimize", "keys", "bundle", "push", "devices", "watch", "cmd",
            "rollback", "label")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecv",
        description="Workstation side of edgecv: train, prune and int8-quantize small CNNs, build signed model "
                    "bundles, and push them to devices over MQTT.")
    parser.add_argument("--version", action="version", version=f"edgecv {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"edgecv.tools.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"edgecv.tools.commands.{name}":
                raise
            continue  # command not built yet
        module.register(sub)
    return parser


# Top-level modules of the `tools` extra: a device-only install lacks them.
WORKSTATION_MODULES = frozenset({"torch", "onnx", "onnxscript", "litert_torch", "torchao", "matplotlib", "tqdm",
                                 "onnxruntime", "ai_edge_litert"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.handler(args) or 0)
    except EdgecvError as exc:
        if args.debug:
            raise
        print(f"edgecv: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if args.debug or missing not in WORKSTATION_MODULES:
            raise
        print(f"edgecv: error: 'edgecv {args.command}' needs the workstation extra, which is not installed here "
              f"(no module {missing!r}); install it with: pip install -c constraints.txt 'edgecv[tools]' "
              "(see README, Install)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgecv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
