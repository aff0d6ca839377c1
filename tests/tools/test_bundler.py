"""Building, signing, packing and verifying bundles, through the library and the `edgecv` command line."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecv.agent.contract.bundle import InputSpec, load_bundle, open_bundle, verify_bundle
from edgecv.agent.contract.signing import Keyring, generate_private_key, load_public_key, write_keypair
from edgecv.agent.errors import BundleError, SignatureError
from edgecv.tools.bundler import build_bundle, choose_selftest_frames, dataset_to_frames, pack, read_selftest
from edgecv.tools.cli import main

GRAY = InputSpec(width=8, height=8, channels=1, color="GRAY")
RGB = InputSpec(width=8, height=8, channels=3, color="RGB")
LABELS = ["zero", "one", "two"]


@pytest.fixture
def artifacts(tmp_path: Path) -> list[tuple[Path, str, str]]:
    (tmp_path / "src").mkdir()
    onnx, tfl = tmp_path / "src" / "m.onnx", tmp_path / "src" / "whatever.tflite"
    onnx.write_bytes(b"\x08onnx" * 300)
    tfl.write_bytes(b"TFL3" * 200)
    return [(onnx, "onnx", "int8"), (tfl, "tflite", "int8")]


def frames(n: int = 3, channels: int = 1) -> np.ndarray:
    return np.arange(n * 8 * 8 * channels, dtype=np.uint8).reshape(n, 8, 8, channels)


def build(out: Path, artifacts: list[tuple[Path, str, str]], key: object = None) -> object:
    return build_bundle(out, name="demo", version="1.2.3", labels=LABELS, spec=GRAY, artifacts=artifacts,
                        selftest_frames=frames(), selftest_expected=[0, 2, 1],
                        metrics={"accuracy": np.float64(0.9), "per_class": np.array([1, 2, 3])},
                        private_key=key, description="test bundle")


def test_round_trip_build_sign_pack_extract_verify(tmp_path: Path, artifacts: list) -> None:
    key = generate_private_key()
    write_keypair(key, tmp_path / "ring" / "ws.key")
    (tmp_path / "ring" / "ws.key").unlink()  # a device keyring holds only public keys
    bundle = build(tmp_path / "b", artifacts, key)
    m = bundle.manifest  # type: ignore[attr-defined]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "manifest.json", "manifest.sig", "model.int8.onnx", "model.int8.tflite", "selftest.npz"]
    assert [(a.path, a.format, a.precision) for a in m.artifacts] == [
        ("model.int8.onnx", "onnx", "int8"), ("model.int8.tflite", "tflite", "int8")]
    assert (tmp_path / "b" / "model.int8.onnx").read_bytes() == artifacts[0][0].read_bytes()
    assert m.metrics == {"accuracy": 0.9, "per_class": [1, 2, 3]} and m.description == "test bundle"
    got_frames, expected = read_selftest(tmp_path / "b" / "selftest.npz")
    assert np.array_equal(got_frames, frames()) and expected.tolist() == [0, 2, 1] == list(m.selftest.expected_top1)

    archive = pack(tmp_path / "b", tmp_path / "demo.edgecv")
    extracted = open_bundle(archive, tmp_path / "x")
    result = verify_bundle(extracted, Keyring.from_path(tmp_path / "ring"))
    assert result.signed_by == bundle.signature.key_id and result.checked_files == 3  # type: ignore[attr-defined]
    assert extracted.manifest_bytes == bundle.manifest_bytes  # type: ignore[attr-defined]


def test_selftest_file_is_reproducible_and_rebuild_replaces_the_bundle(tmp_path: Path, artifacts: list) -> None:
    first = build(tmp_path / "b", artifacts, generate_private_key())
    npz = (tmp_path / "b" / "selftest.npz").read_bytes()
    second = build(tmp_path / "b", artifacts[:1])  # unsigned rebuild in place
    assert (tmp_path / "b" / "selftest.npz").read_bytes() == npz
    assert not (tmp_path / "b" / "manifest.sig").exists() and not (tmp_path / "b" / "model.int8.tflite").exists()
    assert len(second.manifest.artifacts) == 1 and first.signature is not None  # type: ignore[attr-defined]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"selftest_frames": frames(channels=3)}, "channels"),
    ({"selftest_expected": [0, 1]}, "expected labels"),
    ({"selftest_expected": [0, 1, 5]}, "class indices"),
    ({"selftest_frames": frames().astype(np.float32)}, "uint8"),
    ({"artifacts": []}, "at least one artifact"),
])
def test_build_refuses_bad_input(tmp_path: Path, artifacts: list, kwargs: dict, message: str) -> None:
    args = {"name": "demo", "version": "1", "labels": LABELS, "spec": GRAY, "artifacts": artifacts,
            "selftest_frames": frames(), "selftest_expected": [0, 1, 2], **kwargs}
    with pytest.raises(BundleError, match=message):
        build_bundle(tmp_path / "b", **args)


def test_build_refuses_duplicates_missing_files_and_foreign_dirs(tmp_path: Path, artifacts: list) -> None:
    with pytest.raises(BundleError, match=r"both be model\.int8\.onnx"):
        build(tmp_path / "b1", [artifacts[0], artifacts[0]])
    with pytest.raises(BundleError, match="does not exist"):
        build(tmp_path / "b2", [(tmp_path / "nope.onnx", "onnx", "int8")])
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a bundle"):
        build(tmp_path / "home", artifacts)
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"


def test_choose_selftest_frames_keeps_only_clear_agreement_and_spreads_classes() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 8, 8, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(60)  # image id in the red channel of pixel (0, 0)
    truth = np.arange(60) % 3

    def preprocess(f: np.ndarray) -> np.ndarray:
        return f.astype(np.float32)

    def ids(x: np.ndarray) -> np.ndarray:
        return x[:, 0, 0, 2].astype(int)  # red is the last channel in the BGR frames

    def reference(x: np.ndarray) -> np.ndarray:
        return np.eye(3)[truth[ids(x)]] * 5.0

    def int8(x: np.ndarray) -> np.ndarray:
        out = reference(x)
        out[ids(x) < 20] = np.eye(3)[(truth[ids(x)] + 1) % 3][ids(x) < 20] * 5.0  # disagrees on ids < 20
        out[(ids(x) >= 20) & (ids(x) < 30)] = 1.0  # agrees only by a tie-broken argmax: no margin
        return out

    chosen, expected = choose_selftest_frames(images, preprocess, reference, {"int8": int8}, count=9)
    chosen_ids = ids(preprocess(chosen))
    assert all(i >= 30 for i in chosen_ids)
    assert expected == truth[chosen_ids].tolist() and sorted(expected) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert np.array_equal(chosen[0], images[chosen_ids[0]][..., ::-1])  # camera-like BGR
    with pytest.raises(BundleError, match="disagree"):
        choose_selftest_frames(images, preprocess, reference, {"int8": int8}, count=31)


def test_under_confident_models_fill_up_with_the_clearest_agreeing_images() -> None:
    images = np.zeros((12, 2, 2, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(12)
    truth = np.arange(12) % 2
    # margins grow with the image id; only ids 10 and 11 are "clear" (softmax margin >= 0.3)
    strength = np.array([0.01] * 4 + [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.5, 2.0])

    def logits(x: np.ndarray) -> np.ndarray:
        ids = x[:, 0, 0, 0].astype(int)
        return np.eye(2)[truth[ids]] * strength[ids][:, None]

    frames, expected = choose_selftest_frames(images, lambda f: f.astype(np.float32), logits, {"int8": logits},
                                              count=4)
    ids = frames[:, 0, 0, 0].tolist()
    assert ids[:2] == [10, 11] and sorted(ids[2:]) == [8, 9] and expected == truth[ids].tolist()
    with pytest.raises(BundleError, match="margin of at least"):
        choose_selftest_frames(images, lambda f: f.astype(np.float32), logits, {"int8": logits}, count=9)



def test_probability_outputs_are_judged_as_probabilities_not_softmaxed_again(caplog: pytest.LogCaptureFixture) -> None:
    """A model that outputs probabilities (issue 12 item 2): margins are taken on its outputs as they are. A clear
    0.85/0.05/0.05/0.05 answer has margin 0.8; softmaxed again it becomes 0.43/0.19/0.19/0.19 (margin 0.24 < 0.3),
    so every image would count as unconfident, with the "not very confident" warning for a confident model."""
    images = np.zeros((8, 2, 2, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(8)
    truth = np.arange(8) % 4

    def probs(x: np.ndarray) -> np.ndarray:
        ids = x[:, 0, 0, 0].astype(int)
        return np.where(np.eye(4)[truth[ids]] > 0, 0.85, 0.05)

    caplog.set_level("WARNING", logger="edgecv.tools.bundler")
    frames, expected = choose_selftest_frames(images, lambda f: f.astype(np.float32), probs, {"int8": probs},
                                              count=4, output="probabilities")
    assert expected == truth[frames[:, 0, 0, 0].astype(int)].tolist()
    assert "not very confident" not in caplog.text  # 0.8 >= 0.3: all clear
    choose_selftest_frames(images, lambda f: f.astype(np.float32), probs, {"int8": probs}, count=4)  # as logits
    assert "not very confident" in caplog.text  # read as logits, the same outputs look unsure

def test_dataset_to_frames_keeps_gray_single_channel() -> None:
    gray = np.zeros((2, 4, 4, 1), np.uint8)
    assert dataset_to_frames(gray).shape == (2, 4, 4, 1)
    rgb = np.zeros((1, 2, 2, 3), np.uint8)
    rgb[..., 0] = 255
    assert dataset_to_frames(rgb)[0, 0, 0].tolist() == [0, 0, 255]


# --- command line --------------------------------------------------------------------------------------


def test_keys_generate_writes_private_0600_and_refuses_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key = tmp_path / "cfg" / "signing.key"
    assert main(["keys", "generate", "--out", str(key)]) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    kid = out.split("key id:")[1].split()[0]
    assert Keyring([load_public_key(key.with_suffix(".pub"))]).key_ids() == [kid]
    before = key.read_bytes()
    assert main(["keys", "generate", "--out", str(key)]) == 1
    assert "already exists" in capsys.readouterr().err and key.read_bytes() == before
    assert main(["keys", "generate", "--out", str(key), "--force"]) == 0
    assert key.read_bytes() != before and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert main(["keys", "id", str(key)]) == 0
    assert main(["keys", "id", str(key.with_suffix(".pub"))]) == 0
    ids = capsys.readouterr().out.split()
    assert ids[-1] == ids[-2] != kid


@pytest.fixture
def signed(tmp_path: Path, artifacts: list) -> dict[str, Path]:
    key = tmp_path / "keys" / "ws.key"
    other = tmp_path / "other" / "other.key"
    write_keypair(generate_private_key(), key)
    write_keypair(generate_private_key(), other)
    build(tmp_path / "b", artifacts, key)
    pack(tmp_path / "b", tmp_path / "demo.edgecv")
    return {"key": key, "pub": key.with_suffix(".pub"), "ring": key.parent, "other": other.with_suffix(".pub"),
            "other_key": other, "dir": tmp_path / "b", "archive": tmp_path / "demo.edgecv"}


def test_verify_accepts_a_good_bundle_dir_and_archive(signed: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["bundle", "verify", str(signed["archive"]), "--keyring", str(signed["ring"])]) == 0
    assert main(["bundle", "verify", str(signed["dir"]), "--keyring", str(signed["pub"])]) == 0
    out = capsys.readouterr().out
    assert out.count("OK demo 1.2.3: 3 files match the manifest, signed by") == 2


def _verify_fails(argv: list[str], capsys: pytest.CaptureFixture, message: str) -> None:
    assert main(["bundle", "verify", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgecv: error:") and message in err and "\n" not in err


def test_verify_rejects_tampered_wrong_key_and_unsigned(signed: dict, tmp_path: Path, artifacts: list,
                                                        capsys: pytest.CaptureFixture) -> None:
    _verify_fails([str(signed["dir"]), "--keyring", str(signed["other"])], capsys, "not in the device keyring")
    _verify_fails([str(signed["dir"])], capsys, "--keyring")
    build(tmp_path / "unsigned", artifacts)
    _verify_fails([str(tmp_path / "unsigned"), "--keyring", str(signed["ring"])], capsys, "unsigned")
    assert main(["bundle", "verify", str(tmp_path / "unsigned"), "--keyring", str(signed["ring"]),
                 "--allow-unsigned"]) == 0
    assert "UNSIGNED" in capsys.readouterr().out
    model = signed["dir"] / "model.int8.tflite"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    _verify_fails([str(signed["dir"]), "--keyring", str(signed["ring"])], capsys, "model.int8.tflite has sha256")
    # A bad signature is refused even with --allow-unsigned.
    _verify_fails([str(signed["archive"]), "--keyring", str(signed["other"]), "--allow-unsigned"], capsys, "keyring")


def test_sign_archive_repacks_and_then_verifies(signed: dict, capsys: pytest.CaptureFixture) -> None:
    archive = signed["archive"]
    assert main(["bundle", "sign", str(archive), "--key", str(signed["other_key"])]) == 0
    assert main(["bundle", "verify", str(archive), "--keyring", str(signed["other"])]) == 0
    _verify_fails([str(archive), "--keyring", str(signed["pub"])], capsys, "not in the device keyring")
    assert main(["bundle", "sign", str(signed["dir"]), "--key", str(signed["other_key"])]) == 0
    assert load_bundle(signed["dir"]).signature.key_id in capsys.readouterr().out  # type: ignore[union-attr]


def test_inspect_json_and_table(signed: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["bundle", "inspect", str(signed["archive"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "demo" and info["labels"] == LABELS and info["input"]["width"] == 8
    assert [a["path"] for a in info["artifacts"]] == ["model.int8.onnx", "model.int8.tflite"]
    assert info["artifacts"][0]["bytes"] == 1500 and info["metrics"]["accuracy"] == 0.9
    assert info["signature_key_id"] and info["archive_bytes"] == signed["archive"].stat().st_size
    assert main(["bundle", "inspect", str(signed["dir"])]) == 0
    table = capsys.readouterr().out
    assert "demo 1.2.3" in table and "model.int8.tflite" in table and "800 B" in table and "8×8×1 GRAY" in table


def test_entry_point_exit_code_on_tampering(signed: dict) -> None:
    (signed["dir"] / "selftest.npz").write_bytes(b"evil")
    proc = subprocess.run([sys.executable, "-m", "edgecv.tools.cli", "bundle", "verify", str(signed["dir"]),
                           "--keyring", str(signed["ring"])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("edgecv: error: Bundle file selftest.npz")


def test_verify_bad_signature_message_is_signature_error(signed: dict) -> None:
    bundle = load_bundle(signed["dir"])
    with pytest.raises(SignatureError):
        verify_bundle(bundle, Keyring([load_public_key(signed["other"])]))


# --- the shipped default model -------------------------------------------------------------------------

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_shipped_bundle_verifies_with_the_demo_key_and_passes_its_selftest(runtime: str, tmp_path: Path) -> None:
    from edgecv.agent.vision.classifier import Classifier, run_selftest

    ring = Keyring.from_path(MODELS / "demo-signing.pub")
    directory = load_bundle(MODELS / "fashion-mnist")
    archive = open_bundle(MODELS / "fashion-mnist.edgecv", tmp_path / "x")
    assert verify_bundle(directory, ring).signed_by == verify_bundle(archive, ring).signed_by == "f1bc82279dd44057"
    assert archive.manifest_bytes == directory.manifest_bytes
    m = directory.manifest
    assert {a.path for a in m.artifacts} == {"model.int8.onnx", "model.int8.tflite"}  # no fp32: kept small
    assert m.metrics["accuracy_int8_onnx"] >= 0.92 and m.metrics["accuracy_int8_tflite"] >= 0.92
    assert m.metrics["test_images"] == 10000
    report = run_selftest(Classifier.load(directory, runtime=runtime))
    assert report.passed and report.agreement == 1.0, report.detail


@pytest.mark.parametrize(("key", "value", "path"), [("bytes", "12", "artifacts[0].bytes"),
                                                    ("width", "28", "input.width")])
def test_inspect_and_verify_name_the_key_of_a_signed_wrong_typed_manifest(signed: dict, tmp_path: Path, key: str,
                                                                          value: str, path: str,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from edgecv.agent.contract.signing import load_private_key, sign

    root = signed["dir"]
    doc = json.loads((root / "manifest.json").read_text())
    (doc["artifacts"][0] if key == "bytes" else doc["input"])[key] = value
    (root / "manifest.json").write_text(json.dumps(doc))
    (root / "manifest.sig").write_bytes(sign((root / "manifest.json").read_bytes(),
                                             load_private_key(signed["key"])).to_bytes())
    for argv in (["bundle", "inspect", str(root)], ["bundle", "verify", str(root), "--keyring", str(signed["ring"])]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("edgecv: error:") and f"'{path}' must be an integer" in err and "\n" not in err
