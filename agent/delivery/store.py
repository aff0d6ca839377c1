"""The on-device model store: verified bundles under versions/, atomic `current`/`previous` pointers, recovery.

Layout under the store root::

    versions/<version>-<sha12>/   extracted bundles that verified when installed (never half-written: a bundle
                                  is extracted and fsynced in staging/ and then renamed into versions/)
    current -> versions/...       symlink to the active bundle, switched with symlink(tmp) + rename + fsync(dir)
    previous -> versions/...      symlink to the bundle that was active before
    staging/                      extraction scratch space; anything in it at startup is a crash leftover
    transfers/                    partial pushed archives kept for resuming (owned by the updater)

Every step is either atomic (rename) or happens in scratch space, so after a crash or power cut at any instant
`ensure_model` finds a valid model: `current`, else `previous`, else the newest version that verifies, else it
installs the seed bundle.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgecv.agent.contract.bundle import (
    DEFAULT_MAX_BUNDLE_BYTES,
    Bundle,
    check_signature,
    extract_archive,
    load_bundle,
    verify_bundle,
)
from edgecv.agent.contract.names import check_name, inside
from edgecv.agent.contract.signing import Keyring
from edgecv.agent.errors import BundleError, NoModelError, StoreError, UnsafeArchiveError, UnsafeNameError

log = logging.getLogger(__name__)

VERSIONS = "versions"
CURRENT = "current"
PREVIOUS = "previous"
STAGING = "staging"
TRANSFERS = "transfers"


@dataclass(frozen=True)
class StoredVersion:
    """One installed bundle, as listed by `ModelStore.history()` (newest install first)."""

    name: str
    version: str
    sha256: str
    path: Path
    installed: float
    current: bool
    previous: bool

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "dir": self.path.name,
                "installed": self.installed, "current": self.current, "previous": self.previous}


class ModelStore:
    """Verified model bundles on disk with an atomically switched active pointer. Thread-safe."""

    def __init__(self, root: Path | str, keep: int = 3, *, keyring: Keyring | None = None,
                 allow_unsigned: bool = False) -> None:
        self.root = Path(root)
        self.keep = max(1, int(keep))
        self.versions = self.root / VERSIONS
        self._lock = threading.RLock()
        # The device's trust settings (security.keyring, security.allow_unsigned): rollback and recovery re-verify
        # installed bundles with them. ensure_model/install replace them with the ones they are given.
        self._keyring: Keyring | None = keyring
        self._allow_unsigned = allow_unsigned

    # ------------------------------------------------------------------ queries
    def staging_dir(self) -> Path:
        """Scratch directory on the same file system as versions/ (so a rename moves a bundle in atomically)."""
        path = self.root / STAGING
        self._mkdirs(path)
        return path

    def transfers_dir(self) -> Path:
        """Where the updater keeps partial pushed archives; survives restarts so a push can resume."""
        path = self.root / TRANSFERS
        self._mkdirs(path)
        return path

    def current(self) -> Bundle | None:
        """The active bundle (parsed, not re-verified), or None when there is none."""
        return self._pointer(CURRENT)

    def previous(self) -> Bundle | None:
        return self._pointer(PREVIOUS)

    def history(self) -> list[StoredVersion]:
        """Installed versions, newest install first, flagged current/previous."""
        with self._lock:
            cur, prev = self._target(CURRENT), self._target(PREVIOUS)
            out = []
            for path, bundle in self._readable_versions():
                out.append(StoredVersion(name=bundle.manifest.name, version=bundle.manifest.version,
                                         sha256=bundle.manifest_sha256, path=path,
                                         installed=path.stat().st_mtime, current=path == cur,
                                         previous=path == prev))
            return out

    def version_names(self) -> list[str]:
        """Directory names under versions/ (installed bundles, valid or not)."""
        try:
            return [p.name for p in self.versions.iterdir()]
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------ changes
    def install(self, source: Path | str, keyring: Keyring | None = None, allow_unsigned: bool = False,
                max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> Bundle:
        """Verify a bundle (archive or directory) into versions/ without activating it; return the stored bundle.

        Raises BundleError subclasses when the bundle is bad (the store is unchanged) and StoreError when the
        store itself cannot take it (disk full, permissions).
        """
        source = Path(source)
        with self._lock:
            self._keyring, self._allow_unsigned = keyring, allow_unsigned
            stage = self.staging_dir() / f"install-{uuid.uuid4().hex[:12]}"
            try:
                if source.is_dir():
                    bundle = self._copy_dir(source, stage, max_bytes)
                else:
                    extract_archive(source, stage, max_bytes=max_bytes)
                    check_signature(stage, keyring, allow_unsigned=allow_unsigned)  # before the manifest is parsed
                    bundle = load_bundle(stage)
                verify_bundle(bundle, keyring, allow_unsigned=allow_unsigned)
                target = self._version_path(dir_name(bundle))
                if target.is_dir():
                    existing = self._valid(target)
                    if existing is not None:
                        os.utime(target)  # reinstalling counts as the newest install
                        log.info("Bundle %s is already installed", target.name)
                        return existing
                    self._discard(target)  # a damaged copy: replace it
                _fsync_tree(stage)
                self._mkdirs(self.versions)
                os.rename(stage, target)
                os.utime(target)
                _fsync_dir(self.versions)
                log.info("Installed bundle %s", target.name)
                return load_bundle(target)
            except OSError as exc:
                raise _store_error("install the bundle", self.root, exc) from exc
            finally:
                if stage.exists():
                    shutil.rmtree(stage, ignore_errors=True)

    def activate(self, bundle: Bundle) -> Bundle:
        """Make an installed bundle current (the old current becomes previous) and prune old versions."""
        with self._lock:
            target = self._in_versions(bundle.root)
            try:
                cur = self._target(CURRENT)
                if cur is not None and cur != target and cur.is_dir():
                    self._point(PREVIOUS, cur)
                self._point(CURRENT, target)
                self.prune()
            except OSError as exc:
                raise _store_error("activate the bundle", self.root, exc) from exc
            log.info("Activated bundle %s", target.name)
            return load_bundle(target)

    def rollback(self, to: str | None = None) -> Bundle:
        """Re-activate `previous` (or the installed version named `to`: a version, a directory name or a sha256
        prefix). The bundle is re-verified first; raises StoreError when there is nothing valid to go back to."""
        with self._lock:
            if to is None:
                path = self._target(PREVIOUS)
                if path is None or not path.is_dir():
                    raise StoreError("There is no previous model to roll back to; push a bundle instead")
            else:
                path = self._find(to)
            return self.activate(self._verified(path))

    def _verified(self, path: Path) -> Bundle:
        """The installed bundle at `path`, re-verified; StoreError saying why not (a missing keyring is named as
        such: the bundle is fine, the store was opened without the device's trust settings)."""
        try:
            bundle = load_bundle(path)
        except (BundleError, OSError) as exc:
            raise StoreError(f"Installed bundle {path.name} cannot be read ({exc}); push it again") from exc
        no_keyring = self._keyring is None or len(self._keyring) == 0
        if bundle.signature is not None and no_keyring and not self._allow_unsigned:
            raise StoreError(f"Installed bundle {path.name} is signed (key {bundle.signature.key_id}), but this model "
                             f"store was opened without a keyring to check it; use the device's keyring "
                             f"(security.keyring), e.g. 'edgecv-agent rollback --config /etc/edgecv/agent.toml'")
        try:
            verify_bundle(bundle, self._keyring, allow_unsigned=self._allow_unsigned)
        except (BundleError, OSError) as exc:
            raise StoreError(f"Installed bundle {path.name} no longer verifies ({exc}); push it again") from exc
        return bundle

    def ensure_model(self, seed: Path | str | None, keyring: Keyring | None = None,
                     allow_unsigned: bool = False) -> Bundle:
        """At startup: return a valid active bundle, repairing the store after a crash if needed.

        Order: `current`, `previous`, the newest version that verifies, then the seed bundle (installed and
        activated). Raises StoreError when none of these gives a valid model.
        """
        with self._lock:
            self._keyring, self._allow_unsigned = keyring, allow_unsigned
            try:
                self._mkdirs(self.versions)
                self._clean_leftovers()
            except OSError as exc:
                raise _store_error("prepare the model store", self.root, exc) from exc
            tried: list[Path] = []
            for name in (CURRENT, PREVIOUS):
                path = self._target(name)
                if path is not None and path not in tried:
                    tried.append(path)
                    bundle = self._valid(path)
                    if bundle is not None:
                        if name != CURRENT:
                            log.warning("Current model is missing or invalid; falling back to %s", path.name)
                        return self._ensure_current(bundle)
            for path in self._version_dirs():
                if path not in tried:
                    bundle = self._valid(path)
                    if bundle is not None:
                        log.warning("Falling back to the newest valid installed model %s", path.name)
                        return self._ensure_current(bundle)
            if seed:
                log.info("Model store %s has no valid model; installing the seed bundle %s", self.root, seed)
                try:
                    bundle = self.install(Path(seed), keyring, allow_unsigned)
                except BundleError as exc:
                    raise StoreError(f"Seed bundle {seed} cannot be used: {exc}") from exc
                return self.activate(bundle)
            raise NoModelError(f"Model store {self.root} holds no valid model and no seed bundle is configured; set "
                             "model.bundle to a bundle file or push one with 'edgecv push'")

    def remove(self, bundle: Bundle) -> bool:
        """Delete an installed version that was refused after install (failed self-test, incompatible), so
        recovery never falls back to it. The current and previous versions are never removed."""
        with self._lock:
            path = self._in_versions(bundle.root)
            if path in (self._target(CURRENT), self._target(PREVIOUS)):
                return False
            try:
                self._discard(path)
            except OSError as exc:
                raise _store_error("remove the refused bundle", self.root, exc) from exc
            log.info("Removed refused model version %s", path.name)
            return True

    def prune(self) -> list[Path]:
        """Delete all but the newest `keep` versions; current and previous are never deleted."""
        with self._lock:
            protected = {self._target(CURRENT), self._target(PREVIOUS)}
            removed = []
            for i, path in enumerate(self._version_dirs()):
                if i >= self.keep and path not in protected:
                    self._discard(path)
                    removed.append(path)
                    log.info("Removed old model version %s", path.name)
            return removed

    # ------------------------------------------------------------------ internals
    def _ensure_current(self, bundle: Bundle) -> Bundle:
        if self._target(CURRENT) == bundle.root:
            return bundle
        return self.activate(bundle)

    def _valid(self, path: Path) -> Bundle | None:
        """The bundle at `path` if it parses and verifies with the remembered trust settings."""
        try:
            bundle = load_bundle(path)
            verify_bundle(bundle, self._keyring, allow_unsigned=self._allow_unsigned)
            return bundle
        except (BundleError, OSError) as exc:
            log.warning("Stored model %s is not usable: %s", path.name, exc)
            return None

    def _pointer(self, name: str) -> Bundle | None:
        path = self._target(name)
        if path is None:
            return None
        try:
            return load_bundle(path)
        except (BundleError, OSError):
            return None

    def _target(self, name: str) -> Path | None:
        link = self.root / name
        try:
            rel = os.readlink(link)
        except OSError:
            return None
        return (self.root / rel).resolve() if not os.path.isabs(rel) else Path(rel).resolve()

    def _point(self, name: str, target: Path) -> None:
        tmp = self.root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        os.symlink(os.path.relpath(target, self.root), tmp)
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)

    def _in_versions(self, path: Path) -> Path:
        path = Path(path).resolve()
        if path.parent != self.versions.resolve() or not path.is_dir():
            raise StoreError(f"Bundle {path} is not installed in the store {self.root}; install it first")
        return path

    def _find(self, to: str) -> Path:
        matches = []
        for path, bundle in self._readable_versions():
            if to in (path.name, bundle.manifest.version) or (len(to) >= 6 and bundle.manifest_sha256.startswith(to)):
                matches.append(path)
        if not matches:
            installed = ", ".join(f"{b.manifest.version} ({p.name})" for p, b in self._readable_versions()) or "none"
            raise StoreError(f"No installed model matches {to!r}; installed: {installed}")
        return matches[0]  # newest install of that version

    def _readable_versions(self) -> Iterator[tuple[Path, Bundle]]:
        """Installed version directories whose manifest parses (not verified), newest first."""
        for path in self._version_dirs():
            try:
                yield path, load_bundle(path)
            except BundleError:
                continue

    def _version_dirs(self) -> list[Path]:
        try:
            dirs = [p.resolve() for p in self.versions.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except FileNotFoundError:
            return []
        return sorted(dirs, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)

    def _version_path(self, name: str) -> Path:
        """versions/<name> for a validated name, checked to stay inside versions/."""
        try:
            return inside(self.versions, self.versions / check_name(name, "Bundle directory name", max_len=80))
        except UnsafeNameError as exc:
            raise UnsafeArchiveError(str(exc)) from None

    def _discard(self, path: Path) -> None:
        """Move a version out of versions/ first, so a crash never leaves a half-deleted version dir there.
        Only a directory strictly inside versions/ or staging/ is ever moved or deleted."""
        real = Path(os.path.realpath(path))
        if real.parent not in (Path(os.path.realpath(self.versions)), Path(os.path.realpath(self.root / STAGING))):
            raise StoreError(f"Refusing to delete {path}: it is not a model version inside the store {self.root}")
        trash = self.staging_dir() / f"trash-{uuid.uuid4().hex[:12]}"
        os.rename(path, trash)
        _fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        staging = self.root / STAGING
        if staging.is_dir():
            for entry in staging.iterdir():
                log.info("Removing leftover staging entry %s", entry.name)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        for entry in self.root.iterdir():
            if entry.name.startswith((f".{CURRENT}.tmp-", f".{PREVIOUS}.tmp-")):
                entry.unlink(missing_ok=True)

    def _copy_dir(self, source: Path, stage: Path, max_bytes: int) -> Bundle:
        """Copy only the files the manifest names (a bundle directory may hold other things)."""
        src = load_bundle(source)
        names = ["manifest.json"] + (["manifest.sig"] if (source / "manifest.sig").is_file() else [])
        names += [a.path for a in src.manifest.artifacts]
        if src.manifest.selftest is not None:
            names.append(src.manifest.selftest.path)
        total = 0
        for rel in names:
            s = source / rel
            if s.is_symlink() or not s.is_file():
                continue  # verify_bundle reports it missing
            total += s.stat().st_size
            if total > max_bytes:
                raise UnsafeArchiveError(f"Bundle content exceeds the limit of {max_bytes} bytes")
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s, stage / rel)
        return load_bundle(stage)

    def _mkdirs(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _store_error(f"create {path}", self.root, exc) from exc


def dir_name(bundle: Bundle) -> str:
    """versions/ directory name of a bundle: `<version>-<first 12 hex digits of the manifest sha256>`."""
    return f"{bundle.manifest.version}-{bundle.manifest_sha256[:12]}"


def _store_error(action: str, root: Path, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"Could not {action}: the disk holding the model store {root} is full; free space "
                          "or lower update.keep_versions")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"Could not {action}: no write access to the model store {root} ({exc.strerror}); "
                          "check model.store and its permissions")
    return StoreError(f"Could not {action} in the model store {root}: {exc}")


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

