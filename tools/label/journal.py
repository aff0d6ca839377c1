"""The labelling journal, `<root>/_labels.log`: one JSON object per line for every move, new class, undo and
repair, appended and fsynced after the change it records. Replaying it gives the undo history, so undo is
multi-level and survives page reloads and restarts; the same lines are the audit trail.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MOVE = "move"
ADD_CLASS = "add_class"
UNDO = "undo"
REPAIR = "repair"
UNDOABLE = (MOVE, ADD_CLASS)


@dataclass(frozen=True)
class Entry:
    """One journal line. `src`/`dst` are folder names under the root (`_unlabelled`, a class, `_junk`);
    `files` the file names moved, image first; `made_folder` says the move created `dst`."""

    seq: int
    op: str
    ts: float
    sample: str | None = None
    src: str | None = None
    dst: str | None = None
    files: tuple[str, ...] = ()
    made_folder: bool = False
    predicted: str | None = None
    name: str | None = None
    undoes: int | None = None
    dropped: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": self.seq, "op": self.op, "ts": round(self.ts, 3)}
        if self.op in (MOVE, REPAIR):
            out.update({"sample": self.sample, "from": self.src, "to": self.dst, "files": list(self.files)})
        if self.op == MOVE:
            out.update({"made_folder": self.made_folder, "predicted": self.predicted})
        if self.op == ADD_CLASS:
            out["name"] = self.name
        if self.op == UNDO:
            out["undoes"] = self.undoes
            if self.dropped:
                out["dropped"] = self.dropped
        return out

    @classmethod
    def from_json(cls, data: object) -> Entry:
        """Parse one line; raises ValueError when it is not a journal entry this version understands."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        seq, op, ts = data.get("seq"), data.get("op"), data.get("ts")
        if not isinstance(seq, int) or isinstance(seq, bool) or op not in (MOVE, ADD_CLASS, UNDO, REPAIR):
            raise ValueError("no seq or unknown op")
        files = data.get("files", [])
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("files is not a list of names")
        entry = cls(seq=seq, op=op, ts=float(ts) if isinstance(ts, int | float) else 0.0,
                    sample=_opt_str(data, "sample"), src=_opt_str(data, "from"), dst=_opt_str(data, "to"),
                    files=tuple(files), made_folder=data.get("made_folder") is True,
                    predicted=_opt_str(data, "predicted"), name=_opt_str(data, "name"),
                    undoes=data.get("undoes") if isinstance(data.get("undoes"), int) else None,
                    dropped=_opt_str(data, "dropped"))
        if op == MOVE and not (entry.src and entry.dst and entry.files):
            raise ValueError("move without from/to/files")
        if op == ADD_CLASS and not entry.name:
            raise ValueError("add_class without name")
        if op == UNDO and entry.undoes is None:
            raise ValueError("undo without undoes")
        return entry

    def describe(self) -> str:
        """A short human line: 'cat/x.jpg' style for moves, 'new class bird' for classes."""
        if self.op == MOVE:
            return f"{self.files[0] if self.files else self.sample} → {self.dst}"
        if self.op == ADD_CLASS:
            return f"new class {self.name}"
        return self.op


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


class Journal:
    """Append-only JSON-lines log with an in-memory undo stack rebuilt from it on open."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stack: list[Entry] = []
        self._next_seq = 1
        self.skipped_lines = 0
        self._needs_newline = False
        self._replay()

    def _replay(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        self._needs_newline = bool(raw) and not raw.endswith(b"\n")  # a line cut short by a crash
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = Entry.from_json(json.loads(line))
            except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
                self.skipped_lines += 1
                log.warning("%s line %d is not a journal entry (%s); ignored", self.path, number, exc)
                continue
            self._next_seq = max(self._next_seq, entry.seq + 1)
            if entry.op in UNDOABLE:
                self._stack.append(entry)
            elif entry.op == UNDO:
                self._stack = [e for e in self._stack if e.seq != entry.undoes]

    @property
    def depth(self) -> int:
        """How many steps undo can take back."""
        return len(self._stack)

    def peek(self) -> Entry | None:
        """The step the next undo takes back, if any."""
        return self._stack[-1] if self._stack else None

    def append(self, op: str, **fields: Any) -> Entry:
        """Write one entry (fsynced) and update the undo stack; OSError leaves both unchanged."""
        entry = Entry(seq=self._next_seq, op=op, ts=time.time(), **fields)
        line = json.dumps(entry.to_json(), ensure_ascii=False, sort_keys=True) + "\n"
        if self._needs_newline:
            line = "\n" + line
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._needs_newline = False
        self._next_seq += 1
        if op in UNDOABLE:
            self._stack.append(entry)
        elif op == UNDO:
            self._stack = [e for e in self._stack if e.seq != entry.undoes]
        return entry
