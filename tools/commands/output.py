"""How `edgecv` commands print, so they all look and behave alike.

- Results go to stdout: an aligned table (or `key  value` rows) for people, or, with `--json`, one JSON document for
  machines (an object, or an array with one object per device for fleet commands; `watch --json` streams JSON lines).
- Progress, stage notes and warnings go to stderr; `--no-progress` hides progress bars (they are also hidden when
  stderr is not a terminal).
- Exit status: 0 success, 1 the command ran but failed (a device refused, a check did not pass), 2 a usage or
  configuration error, 130 interrupted. `EXIT_CODES` is the sentence every description ends with.

A subcommand calls `add_json_option(parser)` and/or `add_progress_option(parser)` in its `register()`, prints with
`print_table`/`print_rows`/`print_json`, and reports on stderr with `note`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

EXIT_CODES = "Exit status: 0 on success, 1 when it ran but failed, 2 on a usage error, 130 when interrupted."


def add_json_option(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout (for scripts)")


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (progress goes to stderr, and only to a terminal)")


def progress_enabled(args: argparse.Namespace, stream: TextIO | None = None) -> bool:
    """Whether to draw a progress bar: not with --no-progress or --quiet, and only when stderr is a terminal."""
    stream = stream or sys.stderr
    if getattr(args, "no_progress", False) or getattr(args, "quiet", False):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, two spaces apart, trailing blanks trimmed."""
    body = [[_cell(v) for v in row] for row in rows]
    head = [str(h) for h in headers]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)).rstrip() for r in [head, *body])


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], file: TextIO | None = None) -> None:
    print(table(headers, rows), file=file or sys.stdout)


def print_rows(rows: Sequence[tuple[str, Any]], file: TextIO | None = None) -> None:
    """`key  value` lines with the keys aligned: one record (a bundle, a config summary)."""
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"{key:<{width}}  {_cell(value)}".rstrip(), file=file or sys.stdout)


def print_json(doc: Any, file: TextIO | None = None) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=_jsonable), file=file or sys.stdout)


def results_printer(args: argparse.Namespace) -> Callable[[str], None]:
    """Where a command's human-readable result lines go: stdout, or stderr when --json keeps stdout for JSON."""
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    return lambda line: print(line, file=stream, flush=True)


def note(message: str) -> None:
    """A line for the person at the terminal, not part of the result: stderr."""
    print(message, file=sys.stderr, flush=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return str(value)
