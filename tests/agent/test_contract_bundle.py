"""The bundle v1 contract: strict parsing, sha256 binding, signatures and keyrings, safe archive extraction."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from edgecv.agent.contract import bundle as B
from edgecv.agent.contract.signing import Keyring, generate_private_key, sign
from edgecv.agent.errors import BundleFormatError, IntegrityError, SignatureError, UnsafeArchiveError

SPEC = B.InputSpec(width=28, height=28, channels=1, color="GRAY")


def make_bundle(root: Path, *, payload: bytes = b"onnx-bytes" * 100) -> B.Bundle:
    root.mkdir(parents=True)
    (root / "model.int8.onnx").write_bytes(payload)
    (root / "selftest.npz").write_bytes(b"frames")
    manifest = B.Manifest(
        name="fm", version="1.0.0", created="2026-01-01T00:00:00Z", labels=("a", "b", "c"), input=SPEC,
        artifacts=(B.artifact_for(root, "model.int8.onnx", "onnx", "int8"),),
        selftest=B.SelfTest(path="selftest.npz", sha256=B.file_sha256(root / "selftest.npz"),
                            expected_top1=(0, 2)),
        metrics={"accuracy": 0.91})
    B.write_manifest(root, manifest)
    return B.load_bundle(root)


def manifest_doc(root: Path) -> dict:
    return json.loads((root / B.MANIFEST_NAME).read_bytes())


def write_doc(root: Path, doc: dict) -> None:
    (root / B.MANIFEST_NAME).write_text(json.dumps(doc))


# --- parsing -------------------------------------------------------------------------------------------


def test_manifest_round_trips_through_canonical_bytes(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    again = B.Manifest.from_bytes(bundle.manifest_bytes)
    assert again == bundle.manifest
    assert again.to_bytes() == bundle.manifest_bytes
    assert again.input.shape(4) == (4, 1, 28, 28)
    assert again.artifact("onnx", "int8") is not None and again.artifact("tflite") is None


@pytest.mark.parametrize(("where", "key"), [("", "colour"), ("input", "gamma"), ("artifacts", "url"),
                                            ("selftest", "extra")])
def test_unknown_keys_are_refused_with_their_path(tmp_path: Path, where: str, key: str) -> None:
    make_bundle(tmp_path / "b")
    doc = manifest_doc(tmp_path / "b")
    target = doc if not where else doc[where][0] if where == "artifacts" else doc[where]
    target[key] = 1
    write_doc(tmp_path / "b", doc)
    prefix = "artifacts[0]." if where == "artifacts" else f"{where}." if where else ""
    with pytest.raises(BundleFormatError, match=r"unknown key\(s\) " + re.escape(prefix + key)):
        B.load_bundle(tmp_path / "b")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(schema="edgecv.bundle/2"), "schema"),
    (lambda d: d["input"].update(channels=3), "input.color"),
    (lambda d: d["input"].update(layout="CHWN"), "input.layout"),
    (lambda d: d["artifacts"][0].update(path="../evil.onnx"), "artifacts"),
    (lambda d: d["artifacts"][0].update(sha256="XYZ"), "sha256"),
    (lambda d: d.update(labels=["only-one"]), "labels"),
    (lambda d: d["selftest"].update(expected_top1=[7]), "expected_top1"),
    (lambda d: d.pop("artifacts"), "artifacts"),
    (lambda d: d.update(name=5), "name"),
])
def test_invalid_manifests_name_the_key(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    make_bundle(tmp_path / "b")
    doc = manifest_doc(tmp_path / "b")
    mutate(doc)
    write_doc(tmp_path / "b", doc)
    with pytest.raises(BundleFormatError, match=message):
        B.load_bundle(tmp_path / "b")


def test_not_json_and_missing_manifest_are_format_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleFormatError, match=r"no manifest\.json"):
        B.load_bundle(tmp_path / "empty")
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / B.MANIFEST_NAME).write_bytes(b"{not json")
    with pytest.raises(BundleFormatError, match="not valid JSON"):
        B.load_bundle(tmp_path / "b")


# --- integrity -----------------------------------------------------------------------------------------


def test_tampered_artifact_is_refused_even_with_the_same_size(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    assert B.verify_bundle(bundle, None).checked_files == 2
    data = bytearray((tmp_path / "b" / "model.int8.onnx").read_bytes())
    data[10] ^= 0xFF
    (tmp_path / "b" / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        B.verify_bundle(bundle, None)


def test_missing_or_resized_files_are_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.int8.onnx").write_bytes(b"short")
    with pytest.raises(IntegrityError, match="bytes"):
        B.verify_bundle(bundle, None)
    (tmp_path / "b" / "model.int8.onnx").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        B.verify_bundle(bundle, None)


def test_tampered_selftest_is_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (tmp_path / "b" / "selftest.npz").write_bytes(b"frameZ")
    with pytest.raises(IntegrityError, match=r"selftest\.npz"):
        B.verify_bundle(bundle, None)


# --- signatures ----------------------------------------------------------------------------------------


def test_signed_bundle_verifies_with_the_signers_key_only(tmp_path: Path) -> None:
    key, other = generate_private_key(), generate_private_key()
    make_bundle(tmp_path / "b")
    sig = B.sign_bundle(tmp_path / "b", key)
    bundle = B.load_bundle(tmp_path / "b")
    assert bundle.signature is not None and bundle.signature.key_id == sig.key_id
    assert B.verify_bundle(bundle, Keyring([key.public_key()])).signed_by == sig.key_id
    assert B.verify_bundle(bundle, Keyring([other.public_key(), key.public_key()])).signed_by == sig.key_id
    with pytest.raises(SignatureError, match="not in the device keyring"):
        B.verify_bundle(bundle, Keyring([other.public_key()]))
    with pytest.raises(SignatureError, match="no keyring"):
        B.verify_bundle(bundle, None)


def test_signature_by_another_key_claiming_the_trusted_id_is_refused(tmp_path: Path) -> None:
    key, forger = generate_private_key(), generate_private_key()
    make_bundle(tmp_path / "b")
    B.sign_bundle(tmp_path / "b", forger)
    forged = B.load_bundle(tmp_path / "b").signature
    assert forged is not None
    trusted_id = sign(b"x", key).key_id
    (tmp_path / "b" / B.SIGNATURE_NAME).write_bytes(
        type(forged)(key_id=trusted_id, signature=forged.signature).to_bytes())
    with pytest.raises(SignatureError, match="does not match"):
        B.verify_bundle(B.load_bundle(tmp_path / "b"), Keyring([key.public_key()]))


def test_altered_manifest_breaks_the_signature(tmp_path: Path) -> None:
    key = generate_private_key()
    make_bundle(tmp_path / "b")
    B.sign_bundle(tmp_path / "b", key)
    doc = manifest_doc(tmp_path / "b")
    doc["metrics"]["accuracy"] = 0.99
    (tmp_path / "b" / B.MANIFEST_NAME).write_bytes((json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    with pytest.raises(SignatureError, match="does not match"):
        B.verify_bundle(B.load_bundle(tmp_path / "b"), Keyring([key.public_key()]))


def test_unsigned_rules(tmp_path: Path) -> None:
    key = generate_private_key()
    bundle = make_bundle(tmp_path / "b")
    ring = Keyring([key.public_key()])
    with pytest.raises(SignatureError, match="unsigned"):
        B.verify_bundle(bundle, ring)
    assert B.verify_bundle(bundle, ring, allow_unsigned=True).signed_by is None
    # A bad signature is refused even when unsigned bundles are allowed.
    B.sign_bundle(tmp_path / "b", generate_private_key())
    with pytest.raises(SignatureError):
        B.verify_bundle(B.load_bundle(tmp_path / "b"), ring, allow_unsigned=True)


def test_rewriting_the_manifest_drops_the_stale_signature(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    B.sign_bundle(tmp_path / "b", generate_private_key())
    assert (tmp_path / "b" / B.SIGNATURE_NAME).exists()
    B.write_manifest(tmp_path / "b", bundle.manifest)
    assert not (tmp_path / "b" / B.SIGNATURE_NAME).exists()


def test_garbage_signature_file_is_a_signature_error(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / B.SIGNATURE_NAME).write_text('{"alg": "rsa", "key_id": "x", "sig": ""}')
    with pytest.raises(SignatureError, match="algorithm"):
        B.load_bundle(tmp_path / "b")


def test_keyring_from_directory_and_file(tmp_path: Path) -> None:
    from edgecv.agent.contract.signing import write_keypair

    keys = [generate_private_key() for _ in range(2)]
    pubs = [write_keypair(k, tmp_path / "ring" / f"k{i}.key") for i, k in enumerate(keys)]
    assert len(Keyring.from_path(tmp_path / "ring")) == 2
    assert len(Keyring.from_path(pubs[0])) == 1
    with pytest.raises(Exception, match="does not exist"):
        Keyring.from_path(tmp_path / "nowhere")


# --- archives ------------------------------------------------------------------------------------------


def test_pack_is_reproducible_and_extracts_to_a_verifiable_bundle(tmp_path: Path) -> None:
    key = generate_private_key()
    make_bundle(tmp_path / "b")
    B.sign_bundle(tmp_path / "b", key)
    first = B.pack_bundle(tmp_path / "b", tmp_path / "one.edgecv").read_bytes()
    second = B.pack_bundle(tmp_path / "b", tmp_path / "two.edgecv").read_bytes()
    assert first == second
    bundle = B.open_bundle(tmp_path / "one.edgecv", tmp_path / "x")
    assert B.verify_bundle(bundle, Keyring([key.public_key()])).signed_by is not None


def _tar(path: Path, entries: list[tarfile.TarInfo], data: bytes = b"hello") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in entries:
            if info.isfile():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize("entry", [
    _info("/etc/evil"),
    _info("../evil"),
    _info("a/../../evil"),
    _info("link", tarfile.SYMTYPE, "/etc/passwd"),
    _info("hard", tarfile.LNKTYPE, "manifest.json"),
    _info("dev", tarfile.CHRTYPE),
    _info("fifo", tarfile.FIFOTYPE),
])
def test_hostile_archive_entries_are_refused_before_writing(tmp_path: Path, entry: tarfile.TarInfo) -> None:
    archive = _tar(tmp_path / "evil.edgecv", [_info("manifest.json"), entry])
    with pytest.raises(UnsafeArchiveError):
        B.extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil").exists()


def test_oversize_archive_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "big.edgecv", [_info("a"), _info("b")], data=b"x" * 600)
    with pytest.raises(UnsafeArchiveError, match="exceeds"):
        B.extract_archive(archive, tmp_path / "out", max_bytes=1000)
    many = _tar(tmp_path / "many.edgecv", [_info(f"f{i}") for i in range(5)])
    with pytest.raises(UnsafeArchiveError, match="more than"):
        B.extract_archive(many, tmp_path / "out2", max_members=4)


def test_truncated_and_garbage_archives_are_format_errors(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b", payload=bytes(range(256)) * 400)
    whole = B.pack_bundle(tmp_path / "b", tmp_path / "b.edgecv").read_bytes()
    (tmp_path / "cut.edgecv").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BundleFormatError, match="truncated or corrupt"):
        B.extract_archive(tmp_path / "cut.edgecv", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "junk.edgecv").write_bytes(b"definitely not a tar" * 10)
    with pytest.raises(BundleFormatError):
        B.extract_archive(tmp_path / "junk.edgecv", tmp_path / "out2")
    # A gzip stream whose tar body stops mid-file.
    (tmp_path / "short.edgecv").write_bytes(gzip.compress(gzip.decompress(whole)[:3000]))
    with pytest.raises(BundleFormatError):
        B.extract_archive(tmp_path / "short.edgecv", tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


def test_open_bundle_on_missing_path(tmp_path: Path) -> None:
    with pytest.raises(BundleFormatError, match="does not exist"):
        B.open_bundle(tmp_path / "nope.edgecv", tmp_path / "w")


def test_output_kind_and_shorter_side_are_absent_unless_set_so_old_manifests_keep_their_bytes(
        tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    assert b'"output"' not in bundle.manifest_bytes and b"shorter_side" not in bundle.manifest_bytes
    assert bundle.manifest.output == "logits"  # absent means logits
    assert B.Manifest.from_bytes(bundle.manifest_bytes).to_bytes() == bundle.manifest_bytes
    from dataclasses import replace

    probs = replace(bundle.manifest, output="probabilities",
                    input=replace(bundle.manifest.input, resize="shorter-side", shorter_side=256))
    data = probs.to_bytes()
    assert b'"output": "probabilities"' in data and b'"shorter_side": 256' in data
    again = B.Manifest.from_bytes(data)
    assert again.output == "probabilities" and again.input.shorter_side == 256 and again.to_bytes() == data
    doc = json.loads(data)
    doc["output"] = "softmax"
    with pytest.raises(BundleFormatError, match="output"):
        B.Manifest.from_dict(doc)
