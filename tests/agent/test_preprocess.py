"""Preprocessing math for every resize mode, colour conversion and layout, against numpy references."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgecv.agent.contract.bundle import InputSpec
from edgecv.agent.vision.preprocess import Preprocessor

RNG = np.random.default_rng(7)


def _blocks(img: np.ndarray, f: int) -> np.ndarray:
    """Reference downscale by an integer factor: the mean of each f×f block (what INTER_AREA computes)."""
    h, w, c = img.shape
    return img.reshape(h // f, f, w // f, f, c).astype(np.float64).mean(axis=(1, 3))


def _norm(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    mean = np.broadcast_to(np.asarray(spec.mean, np.float64), (spec.channels,))
    std = np.broadcast_to(np.asarray(spec.std, np.float64), (spec.channels,))
    return (pixels * spec.scale - mean) / std


def _nchw(x: np.ndarray) -> np.ndarray:
    return x.transpose(2, 0, 1)[None]


def _tolerance(spec: InputSpec) -> float:
    return 1.01 * spec.scale / min(spec.std)  # one pixel level: cv2 rounds resized pixels to uint8


def test_stretch_rgb_nchw_matches_reference() -> None:
    spec = InputSpec(width=16, height=8, channels=3, color="RGB", layout="NCHW", scale=1 / 255,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    frame = RNG.integers(0, 256, (32, 64, 3), dtype=np.uint8)  # BGR, 4× larger each way
    out = Preprocessor(spec)(frame)
    assert out.shape == spec.shape(1) == (1, 3, 8, 16) and out.dtype == np.float32 and out.flags.c_contiguous
    ref = _nchw(_norm(_blocks(frame, 4)[:, :, ::-1], spec))  # BGR → RGB
    np.testing.assert_allclose(out, ref, atol=_tolerance(spec))


def test_exact_size_frames_are_only_normalised() -> None:
    spec = InputSpec(width=5, height=4, channels=3, color="BGR", layout="NHWC", scale=2.0, mean=(1.0, 2.0, 3.0),
                     std=(2.0, 4.0, 8.0))
    frame = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    out = Preprocessor(spec)(frame)
    assert out.shape == (1, 4, 5, 3)
    np.testing.assert_allclose(out, _norm(frame.astype(np.float64), spec)[None], rtol=1e-6, atol=1e-5)


def test_letterbox_keeps_aspect_and_pads_with_black() -> None:
    spec = InputSpec(width=28, height=28, channels=1, color="GRAY", layout="NCHW", scale=1 / 255, mean=(0.5,),
                     std=(0.5,), resize="letterbox")
    gray = RNG.integers(0, 256, (56, 112, 1), dtype=np.uint8)  # 2:1 wide → 28×14 band, 7 rows pad each side
    out = Preprocessor(spec)(gray)
    pad = _norm(np.zeros((1,)), spec)[0]
    assert out.shape == (1, 1, 28, 28)
    np.testing.assert_allclose(out[0, 0, :7], pad, atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 21:], pad, atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 7:21], _norm(_blocks(gray, 4), spec)[:, :, 0], atol=_tolerance(spec))


def test_letterbox_tall_frame_pads_columns() -> None:
    spec = InputSpec(width=8, height=8, channels=3, color="RGB", layout="NHWC", resize="letterbox")
    frame = np.full((16, 8, 3), 200, np.uint8)  # 1:2 tall → 4×8 band in the middle columns
    out = Preprocessor(spec)(frame)[0]
    assert np.all(out[:, :2] == 0) and np.all(out[:, 6:] == 0)
    np.testing.assert_allclose(out[:, 2:6], 200 / 255, atol=1e-6)


def test_center_crop_takes_the_middle() -> None:
    spec = InputSpec(width=8, height=8, channels=3, color="BGR", layout="NHWC", scale=1.0, resize="center-crop")
    frame = RNG.integers(0, 256, (8, 20, 3), dtype=np.uint8)  # wide: crop columns 6..14
    out = Preprocessor(spec)(frame)
    np.testing.assert_array_equal(out[0], frame[:, 6:14].astype(np.float32))
    tall = RNG.integers(0, 256, (32, 16, 3), dtype=np.uint8)  # tall: crop rows 8..24, then 2× down
    out = Preprocessor(spec)(tall)
    np.testing.assert_allclose(out[0], _blocks(tall[8:24], 2), atol=1.01)


def test_bgr_to_gray_uses_luma_weights() -> None:
    spec = InputSpec(width=4, height=4, channels=1, color="GRAY", layout="NHWC", scale=1.0)
    frame = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = Preprocessor(spec)(frame)
    b, g, r = (frame[:, :, i].astype(np.float64) for i in range(3))
    np.testing.assert_allclose(out[0, :, :, 0], 0.299 * r + 0.587 * g + 0.114 * b, atol=1.0)


def test_gray_frame_to_three_channel_model() -> None:
    spec = InputSpec(width=6, height=6, channels=3, color="RGB", layout="NCHW", scale=1.0,
                     mean=(0.0, 10.0, 20.0))
    gray = RNG.integers(0, 256, (6, 6, 1), dtype=np.uint8)
    out = Preprocessor(spec)(gray)
    for c, mean in enumerate((0.0, 10.0, 20.0)):
        np.testing.assert_allclose(out[0, c], gray[:, :, 0] - mean)
    np.testing.assert_allclose(Preprocessor(spec)(gray[:, :, 0]), out)  # a 2-D frame is gray too


def test_batch_stacks_frames() -> None:
    spec = InputSpec(width=4, height=4, channels=1, color="GRAY")
    frames = RNG.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    pre = Preprocessor(spec)
    out = pre.batch(frames)
    assert out.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(out[1:2], pre(frames[1]))


def test_bad_frame_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="Expected an HxWx3"):
        Preprocessor(InputSpec(width=4, height=4, channels=1, color="GRAY"))(np.zeros((2, 4, 4, 3), np.uint8))


def test_vga_to_224_is_fast() -> None:
    spec = InputSpec(width=224, height=224, channels=3, color="RGB", layout="NCHW", mean=(0.5, 0.4, 0.3),
                     std=(0.2, 0.3, 0.4), resize="letterbox")
    pre = Preprocessor(spec)
    frame = RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        pre(frame)
        times.append(time.perf_counter() - t0)
    assert float(np.median(times)) < 0.010  # typically ~0.5 ms; a per-pixel Python loop would take seconds


@pytest.mark.parametrize("color,layout,mean,std", [
    ("GRAY", "NCHW", (0.2859,), (0.3522,)),
    ("RGB", "NCHW", (0.5,), (0.25,)),
    ("RGB", "NCHW", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("BGR", "NHWC", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_code_table_gives_the_same_codes_as_normalise_then_quantise(color: str, layout: str,
                                                                   mean: tuple[float, ...],
                                                                   std: tuple[float, ...]) -> None:
    from edgecv.agent.vision.runtimes.litert import InputQuantizer

    channels = 1 if color == "GRAY" else 3
    spec = InputSpec(width=20, height=12, channels=channels, color=color, layout=layout, mean=mean, std=std)
    pre = Preprocessor(spec)
    quantizer = InputQuantizer(np.int8, np.asarray([0.011085], np.float32), np.asarray([-55]), 0, ndim=4)
    frame = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frame[:24, :32] = 0  # solid blocks survive area resizing: black saturates the int8 range
    frame[24:, 32:] = 255
    expected = quantizer(pre(frame))
    codes = pre.codes(frame, pre.code_table(quantizer))
    assert codes.dtype == np.int8 and codes.shape == spec.shape(1)
    np.testing.assert_array_equal(codes, expected)
    assert codes.min() == -128 or codes.max() == 127  # the table covers saturation, not just the mid-range


def test_shorter_side_scales_the_short_side_then_takes_the_centre_crop() -> None:
    import cv2

    spec = InputSpec(width=224, height=224, channels=3, color="BGR", resize="shorter-side", shorter_side=256)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    got = Preprocessor(spec).resize(frame)
    # reference: shorter side 300 → 256 keeps the aspect (400 → 341), then the middle 224×224
    ref = cv2.resize(frame, (341, 256), interpolation=cv2.INTER_LINEAR)[16:240, 58:282]
    assert got.shape == (224, 224, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 2.0
    tall = Preprocessor(spec).resize(rng.integers(0, 256, (500, 256, 3), dtype=np.uint8))
    assert tall.shape == (224, 224, 3)
    with pytest.raises(Exception, match="shorter_side"):
        InputSpec(width=224, height=224, channels=3, resize="shorter-side", shorter_side=100)
    with pytest.raises(Exception, match="shorter_side"):
        InputSpec(width=224, height=224, channels=3, resize="stretch", shorter_side=256)
