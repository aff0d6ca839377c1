"""Labelling operations on a collected dataset (docs/DATASETS.md): list the samples waiting in `_unlabelled`,
the classes with their counts, move a sample (image, then sidecar) into a class folder or `_junk`, add a
class, undo. Each file moves with one os.replace inside the root and each change is then journalled; one
lock serialises the changes, so the page's concurrent requests and a second tab cannot interleave them.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecv.tools.dataset_layout import (
    JUNK,
    LABELS_LOG,
    SIDECAR_SUFFIX,
    UNLABELLED,
    Sidecar,
    SidecarError,
    check_class_name,
    folder_for_label,
    is_image_name,
    read_sidecar,
    sidecar_name,
)
from edgecv.tools.datasets import IMAGE_SUFFIXES, NOT_CLASS_PREFIXES
from edgecv.tools.errors import DatasetError, LabelError, UnknownSampleError
from edgecv.tools.label.journal import ADD_CLASS, MOVE, REPAIR, UNDO, Entry, Journal

log = logging.getLogger(__name__)

_SUFFIX_CASES = sorted({c for suf in IMAGE_SUFFIXES for c in (suf, suf.upper())})


@dataclass(frozen=True)
class Sample:
    """An image waiting in `_unlabelled`. `name` is its file name (what the page sends back); `problem`
    says why its sidecar could not be used (then `sidecar` is None)."""

    name: str
    version: int  # the image file's inode number: a replaced file gets a new one (and the page a new URL)
    sidecar: Sidecar | None
    problem: str | None = None
    folder: str | None = None  # the class folder the prediction points at (what the page preselects)

    @property
    def id(self) -> str:
        return os.path.splitext(self.name)[0]

    def to_json(self) -> dict[str, Any]:
        sc = self.sidecar
        return {"name": self.name, "id": self.id, "v": str(self.version), "problem": self.problem,
                "predicted": sc.predicted if sc else None, "folder": self.folder,
                "score": sc.score if sc else None, "camera": sc.camera if sc else None,
                "region": sc.region if sc else None, "ts": sc.ts if sc else None,
                "reason": sc.reason if sc else None, "device": sc.device if sc else None,
                "model": ({"name": sc.model.name, "version": sc.model.version}
                          if sc and sc.model else None)}


@dataclass(frozen=True)
class ClassInfo:
    """A class the page offers: a class folder, or a label of the model that has no folder yet."""

    name: str
    count: int
    has_folder: bool
    from_model: bool


@dataclass(frozen=True)
class Summary:
    """Counts after a change: per class, junk, samples left and the run's total, what undo would do."""

    classes: tuple[ClassInfo, ...]
    junk: int
    left: int
    total: int
    undo_depth: int
    undo_next: str | None

    def to_json(self) -> dict[str, Any]:
        return {"classes": [{"name": c.name, "count": c.count, "folder": c.has_folder, "model": c.from_model}
                            for c in self.classes],
                "junk": self.junk, "left": self.left, "total": self.total,
                "undo": {"depth": self.undo_depth, "next": self.undo_next}}


@dataclass(frozen=True)
class Outcome:
    """The result of one change: a line for the user, the journal entry, and for an undone move the
    sample that is back in `_unlabelled`."""

    message: str
    entry: Entry
    summary: Summary
    restored: Sample | None = None


def _plain_name(name: object) -> bool:
    """True for a single path component that cannot leave its folder."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and os.sep not in name)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _count_images(folder: Path) -> int:
    """Image files in `folder` and below (what the training loader reads), not following links."""
    return sum(1 for _, _, files in os.walk(folder) for f in files if is_image_name(f))


class LabelStore:
    """The labelling state of one dataset root; every public method is thread-safe."""

    def __init__(self, root: Path | str) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"Dataset folder {root} does not exist or is not a folder: pass the folder that "
                               "'edgecv collect --out' wrote")
        if root.name == UNLABELLED:
            raise DatasetError(f"{root} is the {UNLABELLED} folder itself: pass its parent, the dataset root")
        if not (root / UNLABELLED).is_dir():
            raise DatasetError(f"{root} has no {UNLABELLED}/ folder, so there is nothing to label: pass the "
                               f"dataset root that 'edgecv collect --out' wrote, or put images (with optional "
                               f"<id>.json sidecars) into {root / UNLABELLED}/")
        if (root / UNLABELLED).is_symlink():
            raise DatasetError(f"{root / UNLABELLED} is a symbolic link: labelling moves files only within the "
                               "dataset root, so make it a real folder")
        self.root = root.resolve()
        self.unlabelled = self.root / UNLABELLED
        self._lock = threading.RLock()
        self._sidecars: dict[str, tuple[int, Sidecar | None, str | None]] = {}
        self._order: list[str] = []
        self._model_classes: set[str] = set()
        self._run_moves: set[int] = set()  # journal seqs of this run's moves not undone: the progress total
        try:
            self.journal = Journal(self.root / LABELS_LOG)
        except OSError as exc:
            raise DatasetError(f"Cannot read the labelling log {self.root / LABELS_LOG}: {exc}") from exc
        with self._lock:
            self.repaired = self._repair()
            self._classes(self._samples())

    # ---------------------------------------------------------------- reading

    def samples(self) -> list[Sample]:
        """The samples waiting in `_unlabelled`, oldest first (sidecar time, then name)."""
        with self._lock:
            return self._samples()

    def summary(self) -> Summary:
        with self._lock:
            return self._summary(self._samples())

    def state(self) -> tuple[list[Sample], Summary]:
        """Samples and summary from one scan."""
        with self._lock:
            samples = self._samples()
            return samples, self._summary(samples)

    def image_path(self, name: str) -> Path:
        """The path of an image waiting in `_unlabelled`; UnknownSampleError for anything else."""
        return self._find(name)

    # ---------------------------------------------------------------- changes

    def label(self, name: str, class_name: str) -> Outcome:
        """Move sample `name` (image and sidecar) into the folder of class `class_name`; the folder is
        created when the class is one of the model's labels without a folder yet."""
        with self._lock:
            path = self._find(name)
            # The classes the page can offer: folders, and model labels seen by a scan of this run.
            if not isinstance(class_name, str) or (class_name not in self._model_classes
                                                   and class_name not in self._folders()):
                check_class_name(class_name)  # a malformed name is a NameNotAllowedError, not "unknown"
                raise LabelError(f"Class {class_name!r} does not exist: add it first (key n)")
            entry = self._move(path.name, class_name, self._predicted(path.name))
            return Outcome(f"{entry.sample} → {class_name}", entry, self._summary(self._samples()))

    def junk(self, name: str) -> Outcome:
        """Move sample `name` into `_junk`."""
        with self._lock:
            path = self._find(name)
            entry = self._move(path.name, JUNK, self._predicted(path.name))
            return Outcome(f"{entry.sample} → junk", entry, self._summary(self._samples()))

    def add_class(self, name: str) -> Outcome:
        """Create the folder of a new class (or of a model label that has none yet)."""
        norm = check_class_name(name)
        with self._lock:
            folders = self._folders()
            if norm in folders:
                raise LabelError(f"Class {norm!r} already exists")
            clash = next((f for f in folders if f.casefold() == norm.casefold()), None)
            if clash is not None:
                raise LabelError(f"Class {norm!r} would clash with the existing {clash!r}: names that differ only "
                                 "in case are the same folder on some file systems; use the existing class")
            folder = self.root / norm
            try:
                folder.mkdir()
            except OSError as exc:
                raise LabelError(f"Cannot create class folder {folder}: {exc.strerror or exc}") from exc
            try:
                entry = self.journal.append(ADD_CLASS, name=norm)
            except OSError as exc:
                folder.rmdir()
                raise LabelError(f"Cannot write {self.journal.path}: {exc.strerror or exc}; nothing changed") from exc
            if norm not in self._order:
                self._order.append(norm)
            log.info("new class %s", norm)
            return Outcome(f"new class {norm}", entry, self._summary(self._samples()))

    def undo(self) -> Outcome:
        """Take back the latest move or new class still in the journal's undo history."""
        with self._lock:
            entry = self.journal.peek()
            if entry is None:
                raise LabelError("Nothing to undo")
            if entry.op == MOVE:
                restored = self._undo_move(entry)
            else:
                self._undo_add_class(entry)
                restored = None
            self.journal.append(UNDO, undoes=entry.seq)
            self._run_moves.discard(entry.seq)
            return Outcome(f"undone: {entry.describe()}", entry, self._summary(self._samples()), restored)

    # ---------------------------------------------------------------- internals

    def _find(self, name: object) -> Path:
        if not _plain_name(name) or not is_image_name(str(name)):
            raise UnknownSampleError(f"{name!r} is not an image waiting in {UNLABELLED}/")
        path = self.unlabelled / str(name)
        if not _is_regular(path):
            raise UnknownSampleError(f"{name} is not (or no longer) waiting in {UNLABELLED}/: another page or "
                                     "program moved or deleted it")
        return path

    def _predicted(self, image: str) -> str | None:
        """The predicted label of a waiting sample (for the journal), from the sidecar cache or the file."""
        cached = self._sidecars.get(sidecar_name(image))
        if cached is not None:
            return cached[1].predicted if cached[1] else None
        try:
            return read_sidecar(self.unlabelled / sidecar_name(image)).predicted
        except SidecarError:
            return None

    def _samples(self) -> list[Sample]:
        # No stat() per file: names, types and inode numbers all come from the directory listing, which keeps
        # a refresh of 10,000 waiting samples cheap.
        try:
            with os.scandir(self.unlabelled) as it:
                regular = {e.name: e.inode() for e in it if e.is_file(follow_symlinks=False)}
        except OSError as exc:
            raise DatasetError(f"Cannot list {self.unlabelled}: {exc.strerror or exc}") from exc
        samples = []
        live = set()
        by_case = self._folders_by_case()
        for name, inode in regular.items():
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in IMAGE_SUFFIXES:
                continue
            sc = stem + SIDECAR_SUFFIX
            live.add(sc)
            sidecar, problem = self._sidecar(sc, regular.get(sc))
            samples.append(Sample(name, inode, sidecar, problem, self._folder_for(sidecar, by_case)))
        for stale in [k for k in self._sidecars if k not in live]:
            del self._sidecars[stale]
        samples.sort(key=lambda s: (s.sidecar is None or s.sidecar.ts is None,
                                    s.sidecar.ts if s.sidecar and s.sidecar.ts is not None else 0.0, s.name))
        return samples

    def _sample(self, name: str) -> Sample | None:
        """One waiting sample, without listing the folder."""
        try:
            st = os.lstat(self.unlabelled / name)
        except OSError:
            return None
        sc = sidecar_name(name)
        try:
            sc_st = os.lstat(self.unlabelled / sc)
            sc_inode = sc_st.st_ino if stat.S_ISREG(sc_st.st_mode) else None
        except OSError:
            sc_inode = None
        sidecar, problem = self._sidecar(sc, sc_inode)
        return Sample(name, st.st_ino, sidecar, problem, self._folder_for(sidecar, self._folders_by_case()))

    def _folders_by_case(self) -> dict[str, str]:
        return {f.casefold(): f for f in self._folders()}

    @staticmethod
    def _folder_for(sidecar: Sidecar | None, by_case: dict[str, str]) -> str | None:
        """The folder of the predicted label; an existing folder in another letter case wins."""
        if sidecar is None or sidecar.predicted is None:
            return None
        folder = folder_for_label(sidecar.predicted)
        return None if folder is None else by_case.get(folder.casefold(), folder)

    def _sidecar(self, name: str, inode: int | None) -> tuple[Sidecar | None, str | None]:
        """The parsed sidecar `name` (None, None when there is none), cached by inode number: sidecars are
        written to a temporary file and renamed into place, so a new version is a new inode."""
        if inode is None:
            return None, None
        cached = self._sidecars.get(name)
        if cached is not None and cached[0] == inode:
            return cached[1], cached[2]
        try:
            sidecar, problem = read_sidecar(self.unlabelled / name), None
        except SidecarError as exc:
            sidecar, problem = None, str(exc)
            log.warning("%s", exc)
        self._sidecars[name] = (inode, sidecar, problem)
        return sidecar, problem

    def _folders(self) -> dict[str, Path]:
        """Class folders: real (not linked) sub-folders whose names do not start with `_` or `.`."""
        out = {}
        for entry in os.scandir(self.root):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(NOT_CLASS_PREFIXES):
                out[entry.name] = Path(entry.path)
        return out

    def _classes(self, samples: list[Sample]) -> list[ClassInfo]:
        folders = self._folders()
        by_case = {f.casefold(): f for f in folders}
        # Model labels stay classes for the whole run, also once no waiting sample predicts them any more:
        # otherwise the page's keys would shift under the user's fingers.
        model = self._model_classes
        for s in samples:
            labels = [s.sidecar.predicted] if s.sidecar and s.sidecar.predicted else []
            if s.sidecar and s.sidecar.model and s.sidecar.model.labels:
                labels += s.sidecar.model.labels
            for label in labels:
                folder = folder_for_label(label)
                if folder is not None:
                    model.add(by_case.get(folder.casefold(), folder))
        names = set(folders) | model
        # Keys on the page follow this order: keep it stable while the server runs, new names go last.
        self._order = [n for n in self._order if n in names]
        self._order += sorted(names - set(self._order), key=lambda n: (n.casefold(), n))
        return [ClassInfo(n, _count_images(folders[n]) if n in folders else 0, n in folders, n in model)
                for n in self._order]

    def _summary(self, samples: list[Sample]) -> Summary:
        junk = self.root / JUNK
        nxt = self.journal.peek()
        return Summary(classes=tuple(self._classes(samples)), junk=_count_images(junk) if junk.is_dir() else 0,
                       left=len(samples), total=len(samples) + len(self._run_moves),
                       undo_depth=self.journal.depth, undo_next=nxt.describe() if nxt else None)

    def _move(self, image: str, dst_name: str, predicted: str | None) -> Entry:
        dst = self.root / dst_name
        files = [image]
        if _is_regular(self.unlabelled / sidecar_name(image)):
            files.append(sidecar_name(image))
        in_way = [f for f in files if os.path.lexists(dst / f)]
        if in_way:
            raise LabelError(f"{dst_name}/{in_way[0]} already exists: sample ids must be unique; rename or remove "
                             "one of the two files")
        made_folder = False
        if not dst.is_dir():
            try:
                dst.mkdir()
            except OSError as exc:
                raise LabelError(f"Cannot create folder {dst}: {exc.strerror or exc}") from exc
            made_folder = dst_name != JUNK
        self._replace_all(files, self.unlabelled, dst)
        try:
            entry = self.journal.append(MOVE, sample=Path(image).stem, src=UNLABELLED, dst=dst_name,
                                        files=tuple(files), made_folder=made_folder, predicted=predicted)
        except OSError as exc:
            self._replace_all(list(reversed(files)), dst, self.unlabelled)
            if made_folder:
                dst.rmdir()
            raise LabelError(f"Cannot write {self.journal.path}: {exc.strerror or exc}; the move was taken "
                             "back") from exc
        self._run_moves.add(entry.seq)
        log.info("%s", entry.describe())
        return entry

    def _replace_all(self, files: list[str], src: Path, dst: Path) -> None:
        """os.replace each file from src to dst; on a failure put back what moved and raise LabelError."""
        done: list[str] = []
        try:
            for f in files:
                os.replace(src / f, dst / f)
                done.append(f)
        except OSError as exc:
            for f in reversed(done):
                try:
                    os.replace(dst / f, src / f)
                except OSError:
                    log.error("Could not move %s back from %s to %s", f, dst, src)
            raise LabelError(f"Cannot move {src / files[len(done)]} to {dst}/: {exc.strerror or exc}") from exc

    def _drop(self, entry: Entry, reason: str) -> LabelError:
        """Record that `entry` cannot be undone (so undo moves on to the step before) and say so."""
        self.journal.append(UNDO, undoes=entry.seq, dropped=reason)
        self._run_moves.discard(entry.seq)
        return LabelError(f"Cannot undo {entry.describe()}: {reason}. That step is dropped from the undo "
                          "history; undo again to take back the one before")

    def _undo_move(self, entry: Entry) -> Sample | None:
        names = (entry.src, entry.dst, *entry.files)
        if not all(_plain_name(n) for n in names) or entry.src != UNLABELLED:
            raise self._drop(entry, "its journal line names files outside the dataset")
        src, dst = self.root / str(entry.src), self.root / str(entry.dst)
        missing = [f for f in entry.files if not _is_regular(dst / f)]
        if missing:
            raise self._drop(entry, f"{entry.dst}/{missing[0]} is no longer there")
        in_way = [f for f in entry.files if os.path.lexists(src / f)]
        if in_way:
            raise self._drop(entry, f"{entry.src}/{in_way[0]} exists again")
        # Sidecar first, image last: the image appears in _unlabelled with its prediction already beside it.
        self._replace_all(list(reversed(entry.files)), dst, src)
        if entry.made_folder:
            try:
                dst.rmdir()  # only if empty; a class that got other images keeps its folder
            except OSError:
                pass
        return self._sample(entry.files[0])

    def _undo_add_class(self, entry: Entry) -> None:
        if not _plain_name(entry.name):
            raise self._drop(entry, "its journal line names a folder outside the dataset")
        folder = self.root / str(entry.name)
        if not folder.is_dir() or folder.is_symlink():
            raise self._drop(entry, f"the folder {entry.name}/ is no longer there")
        try:
            folder.rmdir()
        except OSError:
            raise self._drop(entry, f"the folder {entry.name}/ is not empty") from None

    def _repair(self) -> int:
        """Put back sidecars a crash left behind: a sidecar in `_unlabelled` whose image was already moved
        into exactly one class folder or `_junk` (a move moves the image first) follows its image."""
        names = {e.name for e in os.scandir(self.unlabelled) if e.is_file(follow_symlinks=False)}
        stems = {Path(n).stem for n in names if is_image_name(n)}
        orphans = sorted(n for n in names if n.endswith(SIDECAR_SUFFIX) and Path(n).stem not in stems)
        if not orphans:
            return 0
        folders = [JUNK, *self._folders()]
        repaired = 0
        for sc in orphans:
            stem = Path(sc).stem
            homes = [(f, stem + suf) for f in folders for suf in _SUFFIX_CASES
                     if _is_regular(self.root / f / (stem + suf))]
            if len(homes) != 1 or os.path.lexists(self.root / homes[0][0] / sc):
                continue
            folder = homes[0][0]
            os.replace(self.unlabelled / sc, self.root / folder / sc)
            self.journal.append(REPAIR, sample=stem, src=UNLABELLED, dst=folder, files=(sc,))
            log.warning("Moved the sidecar %s to %s/, where its image is (an earlier run stopped between the two "
                        "moves)", sc, folder)
            repaired += 1
        return repaired
