"""ModelStore: install/activate/rollback, atomic pointers, keep-N, and recovery from every crash point."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from edgecv.agent.contract import bundle as bundle_mod
from edgecv.agent.contract.signing import Keyring, generate_private_key
from edgecv.agent.delivery.store import CURRENT, PREVIOUS, ModelStore, dir_name
from edgecv.agent.errors import BundleError, IntegrityError, SignatureError, StoreError
from tests.bundle_factory import make_archive, make_bundle


@pytest.fixture(scope="module")
def key():  # type: ignore[no-untyped-def]
    return generate_private_key()


@pytest.fixture(scope="module")
def keyring(key) -> Keyring:  # type: ignore[no-untyped-def]
    return Keyring([key.public_key()])


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory, key) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("bundles")
    return {v: make_archive(work, v, top1=i, key=key) for i, v in enumerate(("1.0", "1.1", "1.2", "1.3", "1.4"))}


def test_install_does_not_activate_and_activate_switches_pointers(tmp_path: Path, archives, keyring) -> None:
    store = ModelStore(tmp_path / "store", keep=3)
    first = store.install(archives["1.0"], keyring)
    assert first.root.parent == (tmp_path / "store" / "versions").resolve()
    assert first.root.name == dir_name(first) and first.root.name.startswith("1.0-")
    assert store.current() is None
    store.activate(first)
    assert store.current() is not None and store.current().manifest.version == "1.0"  # type: ignore[union-attr]
    assert store.previous() is None
    second = store.activate(store.install(archives["1.1"], keyring))
    assert os.path.islink(tmp_path / "store" / CURRENT) and os.path.islink(tmp_path / "store" / PREVIOUS)
    assert not os.path.isabs(os.readlink(tmp_path / "store" / CURRENT))  # relative: store can be moved
    assert store.current().root == second.root  # type: ignore[union-attr]
    assert store.previous().manifest.version == "1.0"  # type: ignore[union-attr]
    assert [v.version for v in store.history()] == ["1.1", "1.0"]
    assert store.history()[0].current and store.history()[1].previous
    assert not any((tmp_path / "store" / "staging").iterdir())


def test_install_from_directory_copies_only_bundle_files(tmp_path: Path, key, keyring) -> None:
    src = make_bundle(tmp_path / "src", "2.0", key=key)
    (src / "notes.txt").write_text("not part of the bundle")
    store = ModelStore(tmp_path / "store")
    b = store.install(src, keyring)
    assert sorted(p.name for p in b.root.iterdir()) == ["manifest.json", "manifest.sig", "model.fp32.onnx",
                                                         "selftest.npz"]


def test_rollback_swaps_current_and_previous_and_to_version(tmp_path: Path, archives, keyring) -> None:
    store = ModelStore(tmp_path / "s", keep=5)
    for v in ("1.0", "1.1", "1.2"):
        store.activate(store.install(archives[v], keyring))
    assert store.rollback().manifest.version == "1.1"
    assert store.previous().manifest.version == "1.2"  # type: ignore[union-attr]
    assert store.rollback().manifest.version == "1.2"
    assert store.rollback(to="1.0").manifest.version == "1.0"
    with pytest.raises(StoreError, match="No installed model matches"):
        store.rollback(to="9.9")


def test_rollback_without_previous_is_a_clear_error(tmp_path: Path, archives, keyring) -> None:
    store = ModelStore(tmp_path / "s")
    store.activate(store.install(archives["1.0"], keyring))
    with pytest.raises(StoreError, match="no previous model"):
        store.rollback()


def test_keep_n_never_deletes_current_or_previous(tmp_path: Path, archives, keyring) -> None:
    store = ModelStore(tmp_path / "s", keep=2)
    store.activate(store.install(archives["1.0"], keyring))
    store.activate(store.install(archives["1.1"], keyring))
    # install newer versions without activating them: 1.1 (current) and 1.0 (previous) must survive
    for v in ("1.2", "1.3", "1.4"):
        store.install(archives[v], keyring)
    store.prune()
    versions = sorted(v.version for v in store.history())
    assert versions == ["1.0", "1.1", "1.3", "1.4"]
    store.activate(store.install(archives["1.2"], keyring))  # reinstall 1.2 then activate → prune
    # newest two installs (1.2, 1.4) plus previous (1.1) remain
    assert sorted(v.version for v in store.history()) == ["1.1", "1.2", "1.4"]


def test_bad_bundles_are_refused_and_leave_the_store_unchanged(tmp_path: Path, archives, key, keyring) -> None:
    store = ModelStore(tmp_path / "s")
    store.activate(store.install(archives["1.0"], keyring))
    before = sorted(p.name for p in store.versions.iterdir())
    unsigned = make_archive(tmp_path / "u", "3.0")
    with pytest.raises(SignatureError):
        store.install(unsigned, keyring)
    other = make_archive(tmp_path / "o", "3.1", key=generate_private_key())
    with pytest.raises(SignatureError, match="not in the device keyring"):
        store.install(other, keyring)
    tampered_dir = make_bundle(tmp_path / "t", "3.2", key=key)
    data = bytearray((tampered_dir / "model.fp32.onnx").read_bytes())
    data[-5] ^= 0xFF
    (tampered_dir / "model.fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.install(tampered_dir, keyring)
    truncated = tmp_path / "trunc.edgecv"
    truncated.write_bytes(archives["1.1"].read_bytes()[:2000])
    with pytest.raises(BundleError):
        store.install(truncated, keyring)
    with pytest.raises(BundleError, match="exceeds"):
        store.install(archives["1.1"], keyring, max_bytes=1000)
    assert sorted(p.name for p in store.versions.iterdir()) == before
    assert not any(store.staging_dir().iterdir())
    assert store.current().manifest.version == "1.0"  # type: ignore[union-attr]
    # unsigned is accepted only with the explicit switch
    assert store.install(unsigned, keyring, allow_unsigned=True).manifest.version == "3.0"


def test_full_disk_is_a_store_error(tmp_path: Path, archives, keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path / "s")
    store.activate(store.install(archives["1.0"], keyring))

    def full(*_a, **_k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("edgecv.agent.delivery.store.extract_archive", full)
    with pytest.raises(StoreError, match=r"disk holding the model store .* is full"):
        store.install(archives["1.1"], keyring)
    monkeypatch.setattr("edgecv.agent.delivery.store.os.symlink", full)
    with pytest.raises(StoreError, match="is full"):
        store.activate(store.current())  # type: ignore[arg-type]
    monkeypatch.undo()
    assert store.ensure_model(None, keyring).manifest.version == "1.0"


# --------------------------------------------------------------------------- crash recovery
def _store_with(tmp_path: Path, archives, keyring, versions: tuple[str, ...]) -> ModelStore:  # type: ignore[no-untyped-def]
    store = ModelStore(tmp_path / "s", keep=5)
    for v in versions:
        store.activate(store.install(archives[v], keyring))
    return store


def test_ensure_model_seeds_an_empty_store(tmp_path: Path, archives, keyring) -> None:
    store = ModelStore(tmp_path / "s")
    assert store.ensure_model(archives["1.0"], keyring).manifest.version == "1.0"
    assert store.current().manifest.version == "1.0"  # type: ignore[union-attr]
    # second start: uses current, does not reinstall the seed
    assert ModelStore(tmp_path / "s").ensure_model(archives["1.1"], keyring).manifest.version == "1.0"


def test_ensure_model_without_anything_valid_raises(tmp_path: Path, keyring) -> None:
    with pytest.raises(StoreError, match="no valid model and no seed"):
        ModelStore(tmp_path / "s").ensure_model(None, keyring)
    bad = tmp_path / "bad.edgecv"
    bad.write_bytes(b"not a tar")
    with pytest.raises(StoreError, match=r"Seed bundle .* cannot be used"):
        ModelStore(tmp_path / "s").ensure_model(bad, keyring)


def test_crash_during_extraction_leaves_only_staging_garbage(tmp_path: Path, archives, keyring) -> None:
    store = _store_with(tmp_path, archives, keyring, ("1.0",))
    half = store.staging_dir() / "install-deadbeef"
    half.mkdir()
    (half / "manifest.json").write_text("{")  # a half-written extraction
    (store.root / f".{CURRENT}.tmp-123-abc").symlink_to("versions/nowhere")
    fresh = ModelStore(store.root)
    assert fresh.ensure_model(None, keyring).manifest.version == "1.0"
    assert not any(fresh.staging_dir().iterdir())
    assert not list(store.root.glob(".current.tmp-*"))


def test_crash_between_pointer_writes(tmp_path: Path, archives, keyring) -> None:
    # activate() writes previous, then current: a crash in between leaves previous == current == old
    store = _store_with(tmp_path, archives, keyring, ("1.0", "1.1"))
    store._point(PREVIOUS, store.current().root)  # type: ignore[union-attr]
    new = store.install(archives["1.2"], keyring)
    fresh = ModelStore(store.root)
    assert fresh.ensure_model(None, keyring).manifest.version == "1.1"
    fresh.activate(new)
    assert fresh.current().manifest.version == "1.2"  # type: ignore[union-attr]


def test_current_dangling_falls_back_to_previous(tmp_path: Path, archives, keyring) -> None:
    store = _store_with(tmp_path, archives, keyring, ("1.0", "1.1"))
    shutil.rmtree(store.current().root)  # type: ignore[union-attr]
    fresh = ModelStore(store.root)
    assert fresh.ensure_model(None, keyring).manifest.version == "1.0"
    assert fresh.current().manifest.version == "1.0"  # type: ignore[union-attr]


def test_current_corrupted_falls_back_to_previous(tmp_path: Path, archives, keyring) -> None:
    store = _store_with(tmp_path, archives, keyring, ("1.0", "1.1"))
    model = store.current().root / "model.fp32.onnx"  # type: ignore[union-attr]
    model.write_bytes(model.read_bytes()[:100])
    assert ModelStore(store.root).ensure_model(None, keyring).manifest.version == "1.0"


def test_no_pointers_falls_back_to_newest_valid_version(tmp_path: Path, archives, keyring) -> None:
    store = _store_with(tmp_path, archives, keyring, ("1.0", "1.1", "1.2"))
    (store.root / CURRENT).unlink()
    (store.root / PREVIOUS).unlink()
    newest = store.history()[0]
    (newest.path / "manifest.sig").unlink()  # newest no longer verifies → next one
    assert ModelStore(store.root).ensure_model(None, keyring).manifest.version == "1.1"


def test_everything_invalid_falls_back_to_seed(tmp_path: Path, archives, keyring) -> None:
    store = _store_with(tmp_path, archives, keyring, ("1.0",))
    (store.current().root / "manifest.json").write_text("garbage")  # type: ignore[union-attr]
    assert ModelStore(store.root).ensure_model(archives["1.3"], keyring).manifest.version == "1.3"


def test_pointer_switch_is_a_rename_never_a_missing_link(tmp_path: Path, archives, keyring,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # at the instant of os.replace, the old pointer is still in place (readers never see no `current`)
    store = _store_with(tmp_path, archives, keyring, ("1.0",))
    new = store.install(archives["1.1"], keyring)
    seen = []
    real_replace = os.replace

    def spy(src, dst):  # type: ignore[no-untyped-def]
        seen.append(os.path.islink(store.root / CURRENT))
        return real_replace(src, dst)

    monkeypatch.setattr("edgecv.agent.delivery.store.os.replace", spy)
    store.activate(new)
    assert seen and all(seen)


def test_bundle_contract_extract_is_used(tmp_path: Path) -> None:
    # path traversal archives are refused by the contract's extractor the store relies on
    import io
    import tarfile

    evil = tmp_path / "evil.edgecv"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(bundle_mod.UnsafeArchiveError):
        ModelStore(tmp_path / "s").install(evil, None, allow_unsigned=True)
    assert not (tmp_path / "s" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()


def test_remove_refused_version_but_never_current(tmp_path: Path, archives, keyring) -> None:
    store = _store_with(tmp_path, archives, keyring, ("1.0",))
    refused = store.install(archives["1.1"], keyring)
    assert store.remove(refused) and not refused.root.exists()
    assert not store.remove(store.current())  # type: ignore[arg-type]
    assert [v.version for v in store.history()] == ["1.0"]


def test_rollback_of_signed_bundles_needs_the_keyring_and_says_so(tmp_path: Path, archives, keyring) -> None:
    """Issue 13: OPERATIONS.md's on-device one-liner opened the store without a keyring, and rolling back a signed
    bundle then failed with "no longer verifies", as if the bundle were corrupt. A store opened without the keyring
    now names the missing keyring; one opened with the device's trust settings rolls back."""
    setup = ModelStore(tmp_path / "store", keyring=keyring)
    for version in ("1.0", "1.1"):
        setup.activate(setup.install(archives[version], keyring))
    bare = ModelStore(tmp_path / "store")
    with pytest.raises(StoreError, match=r"is signed \(key .*\), but this model store was opened without a keyring"):
        bare.rollback()
    assert bare.current().manifest.version == "1.1"  # type: ignore[union-attr]  # nothing changed
    trusted = ModelStore(tmp_path / "store", keyring=keyring)
    assert trusted.rollback().manifest.version == "1.0"
    with pytest.raises(StoreError, match=r"No installed model matches '9.9'; installed: 1.1 \(1.1-"):
        trusted.rollback("9.9")
    other = ModelStore(tmp_path / "store", keyring=Keyring([generate_private_key().public_key()]))
    with pytest.raises(StoreError, match=r"no longer verifies .*key"):
        other.rollback("1.1")  # a keyring without the signer's key: a real verification failure
