"""`edgecv`: the workstation command line. Parses arguments, configures logging and hands over."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from edgecv.agent import __version__, logs
from edgecv.agent.errors import EdgecvError

# Subcommand modules under tools/commands, in the order `--help` lists them.
COMMANDS = ("train", "prune", "quantize", "optimize", "keys", "bundle", "push", "devices", "watch", "cmd",
            "rollback", "collect", "label")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Workstation side of edgecv: train, prune and int8-quantize small CNNs, build signed model\n"
                    "bundles, and push them to devices over MQTT.\n\n"
                    "Results go to stdout (tables, or JSON with --json); progress and notes go to stderr.\n"
                    "Fleet commands name devices with --device ID (a device id, repeatable) or --group G;\n"
                    "the training commands' --device auto|cpu|cuda is the compute device instead.\n"
                    "Exit status: 0 on success, 1 when it ran but failed, 2 on a usage error, 130 when interrupted.")
    parser.add_argument("--version", action="version", version=f"edgecv {__version__}")
    _add_verbosity(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"edgecv.tools.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"edgecv.tools.commands.{name}":
                raise
            continue  # command not built yet
        module.register(sub)
    for sub_parser in _subparsers(parser):
        _add_verbosity(sub_parser, argparse.SUPPRESS)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default: str | None) -> None:
    """--debug, --verbose and --quiet, accepted before the subcommand and after it (`edgecv optimize ... -v`)."""
    group = parser.add_argument_group("output")
    kwargs: dict[str, Any] = {} if default is None else {"default": default}
    group.add_argument("--debug", action="store_true", help="debug logs, and tracebacks on errors", **kwargs)
    group.add_argument("-v", "--verbose", action="store_true",
                       help="also show third-party libraries' logs and banners (hidden by default)", **kwargs)
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr", **kwargs)


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones too (`bundle inspect`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield child
                yield from _subparsers(child)


# Top-level modules of the `tools` extra: a device-only install lacks them.
WORKSTATION_MODULES = frozenset({"torch", "onnx", "onnxscript", "litert_torch", "torchao", "matplotlib", "tqdm",
                                 "onnxruntime", "ai_edge_litert"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(level=logging.WARNING if args.quiet else logging.INFO, verbose=args.verbose, debug=args.debug)
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
