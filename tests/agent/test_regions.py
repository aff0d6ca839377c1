"""Camera regions: their configuration, crop maths against the frame size, and triggers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecv.agent.config import ConfigError, RegionConfig, load_config, parse_config
from edgecv.agent.errors import CropError
from edgecv.agent.vision.regions import Box, Region, Trigger, resolve_crop

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "agent.example.toml"


def regions(*entries: dict[str, Any]) -> tuple[RegionConfig, ...]:
    cfg = parse_config({"device_id": "pi", "camera": [{"name": "garage", "region": list(entries)}]})
    return cfg.cameras[0].regions


def config_error(*entries: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        regions(*entries)
    return str(info.value)


# ---- configuration ----------------------------------------------------------------------------------------------

def test_integers_are_pixels_and_any_decimal_point_makes_fractions() -> None:
    px, frac, mixed = regions({"name": "a", "crop": [400, 150, 160, 240]},
                              {"name": "b", "crop": [0.625, 0.3, 0.25, 0.5]},
                              {"name": "c", "crop": [0.5, 0, 0.5, 1]})
    assert not px.fractional and px.crop == (400, 150, 160, 240)
    assert frac.fractional and mixed.fractional and mixed.crop == (0.5, 0.0, 0.5, 1.0)
    # defaults: Frigate-like
    assert (px.trigger, px.interval_s, px.consecutive, px.min_score, px.model, px.motion_threshold) == (
        "motion+interval", 5.0, 3, 0.5, "", 0.05)


@pytest.mark.parametrize(("crop", "message"), [
    ([1, 2, 3], "four integers"),
    ("0,0,1,1", "four integers"),
    ([0, 0, True, 1], "four integers"),
    ([2.0, 0, 1, 1], "between 0 and 1"),  # a float makes it fractional: 2.0 is out of range
    ([0.5, 0.0, 0.6, 0.5], "x + w, y + h <= 1"),
    ([0.0, 0.0, 0.0, 0.5], "w, h > 0"),
    ([-1, 0, 10, 10], "x, y >= 0 and w, h >= 1"),
    ([0, 0, 0, 10], "x, y >= 0 and w, h >= 1"),
])
def test_bad_crops_name_the_key_and_the_rule(crop: Any, message: str) -> None:
    error = config_error({"name": "door", "crop": crop})
    assert error.startswith("camera[0].region[0].crop: expected") and message in error, error


def test_region_keys_are_checked_like_every_other_key() -> None:
    assert "camera[0].region[0].crop: required key is missing" in config_error({"name": "door"})
    assert "camera[0].region[0].name: required key is missing" in config_error({"crop": [0, 0, 8, 8]})
    assert "camera[0].region[1].name: expected a region name unique within camera 'garage'" in config_error(
        {"name": "door", "crop": [0, 0, 8, 8]}, {"name": "door", "crop": [8, 0, 8, 8]})
    assert "camera[0].region[0].trigger: expected one of" in config_error(
        {"name": "door", "crop": [0, 0, 8, 8], "trigger": "sometimes"})
    assert "camera[0].region[0].name: expected an MQTT topic level" in config_error(
        {"name": "a/b", "crop": [0, 0, 8, 8]})
    assert "camera[0].region[0].consecutive" in config_error({"name": "d", "crop": [0, 0, 8, 8], "consecutive": 0})
    assert "camera[0].region[0].interval_s" in config_error({"name": "d", "crop": [0, 0, 8, 8], "interval_s": 0})
    assert "camera[0].region[0].colour: unknown key" in config_error({"name": "d", "crop": [0, 0, 8, 8], "colour": 1})


def test_agent_level_keys_of_regions_and_files() -> None:
    cfg = parse_config({"device_id": "pi", "on_cameras_ended": "idle", "homeassistant": {"max_rate_hz": 0.5}})
    assert cfg.on_cameras_ended == "idle" and cfg.homeassistant.max_rate_hz == 0.5
    defaults = parse_config({"device_id": "pi"})
    assert defaults.on_cameras_ended == "exit" and defaults.homeassistant.max_rate_hz == 1.0
    assert not defaults.cameras[0].regions
    with pytest.raises(ConfigError, match="on_cameras_ended: expected one of 'exit' or 'idle'"):
        parse_config({"device_id": "pi", "on_cameras_ended": "quit"})


def test_region_model_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi"\n[[camera]]\nname = "g"\n[[camera.region]]\nname = "door"\n'
                    'crop = [0, 0, 8, 8]\nmodel = "models/door"\n')
    cfg = load_config(path)
    assert cfg.cameras[0].regions[0].model == str(tmp_path / "models" / "door")
    assert cfg.to_dict()["camera"][0]["region"][0]["crop"] == [0, 0, 8, 8]  # round-trips as integers (pixels)


def test_the_example_config_shows_a_camera_with_a_region() -> None:
    import tomllib

    from tests.agent.test_config import with_optional_blocks

    cfg = parse_config(tomllib.loads(with_optional_blocks(EXAMPLE.read_text())))
    garage = [cam for cam in cfg.cameras if cam.regions]
    assert garage, "systemd/agent.example.toml should show a [[camera.region]]"
    assert all(len(r.crop) == 4 for cam in garage for r in cam.regions)


# ---- crop maths -------------------------------------------------------------------------------------------------

def test_fractions_scale_with_the_frame_and_pixels_must_fit() -> None:
    frac, = regions({"name": "d", "crop": [0.625, 0.3125, 0.25, 0.5]})
    assert resolve_crop(frac, 640, 480) == Box(400, 150, 160, 240)
    assert resolve_crop(frac, 320, 240) == Box(200, 75, 80, 120)
    px, = regions({"name": "d", "crop": [400, 150, 160, 240]})
    assert resolve_crop(px, 640, 480) == Box(400, 150, 160, 240)
    assert resolve_crop(px, 560, 390) == Box(400, 150, 160, 240)  # exactly fits
    with pytest.raises(CropError) as info:
        resolve_crop(px, 320, 240, "camera[0].region[0].crop")
    text = str(info.value)
    assert text.startswith("camera[0].region[0].crop: [400, 150, 160, 240] (pixels") and "320x240 frame" in text
    assert "fractions" in text  # says what to do
    tiny, = regions({"name": "d", "crop": [0.0, 0.0, 0.001, 0.5]})
    with pytest.raises(CropError, match="make it larger"):
        resolve_crop(tiny, 640, 480)


def test_a_region_crops_a_view_and_follows_a_change_of_frame_size() -> None:
    cfg, = regions({"name": "d", "crop": [40, 20, 60, 30]})
    region = Region("garage", cfg, where="camera[0].region[0].crop")
    big = np.arange(120 * 160 * 3, dtype=np.uint32).astype(np.uint8).reshape(120, 160, 3)
    view = region.crop(big)
    assert view.shape == (30, 60, 3) and np.shares_memory(view, big)  # no copy
    assert np.array_equal(view, big[20:50, 40:100])
    assert region.status()["box"] == [40, 20, 60, 30] and region.status()["error"] is None
    small = np.zeros((40, 80, 3), np.uint8)
    for _ in range(2):  # reported the same way on every frame of that size
        with pytest.raises(CropError, match="does not fit the 80x40 frame"):
            region.crop(small)
    assert region.status()["box"] is None and "80x40" in region.status()["error"]
    assert region.crop(big).shape == (30, 60, 3) and region.status()["error"] is None  # the camera came back


# ---- triggers ---------------------------------------------------------------------------------------------------

def still(value: int = 100) -> np.ndarray:
    return np.full((48, 64, 3), value, np.uint8)


def test_every_fires_on_every_frame() -> None:
    trigger = Trigger(regions({"name": "d", "crop": [0, 0, 8, 8], "trigger": "every"})[0])
    assert all(trigger.fires(still(), t, pending=False) for t in range(10))


def test_interval_fires_when_the_interval_passed_since_the_last_classification() -> None:
    trigger = Trigger(regions({"name": "d", "crop": [0, 0, 8, 8], "trigger": "interval", "interval_s": 2})[0])
    fired = []
    for t in np.arange(0.0, 7.0, 0.5):
        if trigger.fires(still(int(t * 10)), float(t), pending=True):  # motion and pending play no part
            trigger.classified(float(t))
            fired.append(float(t))
    assert fired == [0.0, 2.0, 4.0, 6.0]


def test_motion_fires_on_change_inside_the_crop_and_while_a_change_is_pending() -> None:
    trigger = Trigger(regions({"name": "d", "crop": [0, 0, 8, 8], "trigger": "motion",
                               "motion_threshold": 0.05})[0])
    assert trigger.fires(still(100), 0.0, pending=False)  # the first frame has no reference: it counts as motion
    assert not trigger.fires(still(100), 1.0, pending=False)
    assert not trigger.fires(still(115), 2.0, pending=False)  # every pixel changed, by less than 20 grey levels
    rng = np.random.default_rng(0)
    noisy = np.clip(still(100) + rng.normal(0, 8, (48, 64, 3)), 0, 255).astype(np.uint8)
    assert not trigger.fires(noisy, 2.5, pending=False)  # sensor noise: blurred away
    assert trigger.last_motion is not None and trigger.last_motion < 0.05
    moved = still(100)
    moved[10:40, 10:40] = 250
    assert trigger.fires(moved, 3.0, pending=False)
    assert trigger.last_motion is not None and trigger.last_motion > 0.2
    assert not trigger.fires(moved, 4.0, pending=False)  # the reference moved along
    assert trigger.fires(moved, 5.0, pending=True)  # a state change awaits confirmation
    assert trigger.interval_s == math.inf


def test_motion_and_interval_fires_on_either() -> None:
    trigger = Trigger(regions({"name": "d", "crop": [0, 0, 8, 8], "interval_s": 10})[0])
    assert trigger.fires(still(), 0.0, pending=False)
    trigger.classified(0.0)
    assert not trigger.fires(still(), 5.0, pending=False)
    assert trigger.fires(still(), 10.0, pending=False)  # the interval
    trigger.classified(10.0)
    assert trigger.fires(still(200), 11.0, pending=False)  # motion


def test_camera_shake_noise_and_jpeg_are_not_motion_but_the_door_and_passers_by_are() -> None:
    from edgecv.agent.vision.scene import DOOR_CROP, Scene, SceneSpec

    def fired(**params: str) -> tuple[list[int], Scene]:
        scene = Scene(SceneSpec({"seed": "0", "start": "5000000", **params}))
        region = Region("garage", regions({"name": "door", "crop": list(DOOR_CROP), "trigger": "motion"})[0])
        out = []
        for i in range(300):
            if region.trigger.fires(region.crop(scene.render(i)[0]), i / 10, pending=False):
                out.append(i)
        return out, scene

    still_door, _ = fired(static="1", objects="0")
    assert len(still_door) <= 6, still_door  # the first frame, and lighting drift once it adds up
    moving, scene = fired(objects="0", hold="60")
    for change in scene.changes(0, 300):  # every roll of the door is seen
        assert any(change - 6 <= i <= change + 3 for i in moving), (change, moving)
