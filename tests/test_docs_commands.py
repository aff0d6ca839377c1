"""The command examples of README.md and docs/*.md run against the real argument parsers, so they cannot drift from
the code again (issue 13 item 9).

- Every command line in a fenced code block that runs `edgecv` or `edgecv-agent` (also as `sudo -u USER
  /path/to/edgecv-agent ...`, and joined across `\\` continuations) must parse with `build_parser()`, with
  placeholders filled in: `[--opt V]` is taken as written, `a|b|c` as `a`, `...` as a value. A deprecated spelling
  fails the check, and so does a `cmd` name that is not a command.
- Every inline mention (`edgecv push --group`) must name a subcommand that exists and only options it has.
- `bash scripts/X.sh` and `scripts/X.sh` examples must exist and pass `bash -n`, with every option they show in the
  script's own option list; `systemd/install.sh` examples run with `--dry-run --root TMP --skip-pip`, which changes
  nothing outside TMP.

Fast: nothing is trained, no broker is needed, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecv.agent.cli import build_parser as agent_parser
from edgecv.tools.cli import build_parser as tools_parser
from edgecv.tools.fleet.remote import COMMANDS

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PARSERS = {"edgecv": tools_parser, "edgecv-agent": agent_parser}


def fenced_lines() -> Iterator[tuple[str, str]]:
    """(where, line) for every line of every fenced code block, continuations joined."""
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
            body = re.sub(r"\\\n\s*", " ", match.group(1))
            first = text.count("\n", 0, match.start()) + 2
            for n, line in enumerate(body.splitlines()):
                yield f"{doc.relative_to(REPO)}:{first + n}", line.strip()


def command_of(line: str) -> tuple[str, list[str]] | None:
    """('edgecv' or 'edgecv-agent', argv) when `line` runs one of them, else None."""
    if any(ch in line for ch in "─▶◀"):  # a diagram, not a command
        return None
    line = re.sub(r"\[([^\[\]]*)\]", r"\1", line)  # optional parts: taken as written
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    if tokens[:1] == ["sudo"]:
        tokens = tokens[1:]
        while tokens and tokens[0].startswith("-"):
            tokens = tokens[2:] if tokens[0] == "-u" else tokens[1:]
    if not tokens or Path(tokens[0]).name not in PARSERS:
        return None
    args = ["X" if t == "..." else t.split("|")[0] if re.fullmatch(r"[^|\s]+(\|[^|\s]+)+", t) else t
            for t in tokens[1:]]
    return Path(tokens[0]).name, args


def examples() -> list[tuple[str, str, list[str]]]:
    found = []
    for where, line in fenced_lines():
        parsed = command_of(line)
        if parsed is not None:
            found.append((where, parsed[0], parsed[1]))
    return found


EXAMPLES = examples()


def test_the_docs_have_command_examples_to_check() -> None:
    progs = {prog for _, prog, _ in EXAMPLES}
    assert progs == {"edgecv", "edgecv-agent"} and len(EXAMPLES) > 40, EXAMPLES


@pytest.mark.parametrize(("where", "prog", "argv"), EXAMPLES, ids=[f"{w}" for w, _, _ in EXAMPLES])
def test_every_command_example_parses(where: str, prog: str, argv: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = strict(PARSERS[prog]()).parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: '{prog} {shlex.join(argv)}' does not parse: {err.getvalue().strip()}")
    assert "deprecated" not in err.getvalue(), f"{where}: uses a deprecated spelling: {err.getvalue()}"
    if prog == "edgecv" and args.command == "cmd":
        assert args.name in COMMANDS and args.legacy is None, f"{where}: write 'edgecv cmd NAME --device ID'"


def strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """No abbreviated options: a doc must spell an option as the parser does."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                strict(child)
    return parser


def subcommand_parser(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (nested) subcommand parser `words` name, and the words it consumed."""
    used: list[str] = []
    while True:
        subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subs is None or not words or words[0] not in subs.choices:
            return parser, used
        parser, used, words = subs.choices[words[0]], [*used, words[0]], words[1:]


def inline_mentions() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)
        for match in re.finditer(r"`((edgecv|edgecv-agent) [^`]+)`", text):
            mention = " ".join(match.group(1).split())
            words = re.sub(r"\[([^\[\]]*)\]", r"\1", mention).split()
            found.append((f"{doc.relative_to(REPO)}: `{mention}`", words[0], words[1:]))
    return found


MENTIONS = inline_mentions()


@pytest.mark.parametrize(("where", "prog", "words"), MENTIONS, ids=[w for w, _, _ in MENTIONS])
def test_every_inline_mention_names_real_subcommands_and_options(where: str, prog: str, words: list[str]) -> None:
    top = PARSERS[prog]()
    parser, used = subcommand_parser(top, words)
    if words and re.fullmatch(r"[a-z][a-z0-9-]*", words[0]) and not used:  # (COMMAND, DEVICE: placeholders)
        pytest.fail(f"{where}: '{prog} {words[0]}' is not a subcommand")
    known = {s for a in parser._actions for s in a.option_strings} | {s for a in top._actions for s in a.option_strings}
    options = [w.split("=")[0] for w in words if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", w)]
    unknown = [o for o in options if o not in known]
    assert not unknown, f"{where}: {prog} {' '.join(used)} has no option {', '.join(unknown)}"


def script_examples() -> list[tuple[str, list[str]]]:
    found = []
    for where, line in fenced_lines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        tokens = tokens[1:] if tokens[:1] in (["sudo"], ["bash"]) else tokens
        if tokens and re.fullmatch(r"(scripts|systemd)/[\w.-]+\.sh", tokens[0]):
            found.append((where, tokens))
    return found


SCRIPTS = script_examples()


def test_the_docs_have_script_examples_to_check() -> None:
    assert {t[0] for _, t in SCRIPTS} >= {"scripts/demo.sh", "scripts/test.sh", "systemd/install.sh",
                                          "scripts/arm64-check.sh"}


@pytest.mark.parametrize(("where", "tokens"), SCRIPTS, ids=[w for w, _ in SCRIPTS])
def test_every_script_example_exists_and_takes_its_options(where: str, tokens: list[str], tmp_path: Path) -> None:
    script = REPO / tokens[0]
    assert script.is_file(), f"{where}: {tokens[0]} does not exist"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert syntax.returncode == 0, f"{where}: {syntax.stderr}"
    if tokens[0] == "systemd/install.sh":  # safe to run: --dry-run under a scratch root changes nothing
        run = subprocess.run(["bash", str(script), *tokens[1:], "--dry-run", "--root", str(tmp_path), "--skip-pip"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"{where}: {run.stderr[-2000:]}"
        assert not any(tmp_path.iterdir()), f"{where}: --dry-run wrote {list(tmp_path.iterdir())}"
        return
    accepted = set(re.findall(r"^\s*(--[a-z][a-z0-9-]*)\)", script.read_text(), flags=re.M))
    unknown = [t for t in tokens[1:] if t.startswith("--") and t not in accepted]
    assert not unknown, f"{where}: {tokens[0]} does not take {', '.join(unknown)}"
