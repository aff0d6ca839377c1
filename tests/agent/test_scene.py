"""`synthetic:scene`: a deterministic, camera-like scene whose door state is known in every frame."""

from __future__ import annotations

import numpy as np
import pytest

from edgecv.agent.config import CameraConfig
from edgecv.agent.vision.camera import open_source
from edgecv.agent.vision.scene import DOOR, SCENE_LABELS, Scene, SceneSpec
from edgecv.agent.vision.synthetic import SourceSpecError, SyntheticSource


def scene(**params: object) -> Scene:
    return Scene(SceneSpec({k: str(v) for k, v in params.items()}))


def door_mean(image: np.ndarray) -> float:
    h, w = image.shape[:2]
    x, y, bw, bh = (round(v * s) for v, s in zip(DOOR, (w, h, w, h), strict=True))
    return float(image[y + 10:y + bh - 10, x + 10:x + bw - 10].mean())


def test_frames_are_a_function_of_seed_and_number_in_any_order() -> None:
    a, b = scene(seed=3), scene(seed=3)
    forward = [a.render(i)[0] for i in (0, 1, 500)]
    backward = [b.render(i)[0] for i in (500, 1, 0)][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(forward, backward, strict=True))
    assert not np.array_equal(forward[0], forward[1])  # noise, shake, drift: no two frames alike
    other = scene(seed=4).render(0)[0]
    assert float(np.abs(other.astype(int) - forward[0].astype(int)).mean()) > 5  # another scene
    assert forward[0].shape == (480, 640, 3) and forward[0].dtype == np.uint8


def test_the_truth_follows_the_door_and_changes_at_random_times() -> None:
    s = scene(seed=1, hold=60, objects=0)
    changes = s.changes(0, 3000)
    assert len(changes) > 20
    gaps = np.diff(changes)
    assert gaps.min() >= 30 and gaps.max() <= 91  # each state holds hold/2 .. 1.5 hold frames (plus the roll)
    truths = [s.truth_at(i) for i in range(3000)]
    assert truths[0] == SCENE_LABELS.index("closed")
    assert all(truths[c] != truths[c - 1] for c in changes)
    # the open door is dark, the closed one bright, whatever the lighting does
    for i in range(0, 3000, 97):
        image, truth = s.render(i)
        assert truth == truths[i]
        fraction = s.door_at(i)[1]
        if fraction in (0.0, 1.0):
            assert (door_mean(image) < 90) == (truth == 1), (i, truth, door_mean(image))


def test_a_static_scene_never_changes_and_the_parameters_shape_it() -> None:
    s = scene(static=1, state="open", width=320, height=240)
    assert s.changes(0, 5000) == [] and s.truth_at(4999) == 1
    assert s.render(7)[0].shape == (240, 320, 3)
    clean = scene(noise=0, jpeg=0, shake=0, drift=0, objects=0, static=1)
    assert np.array_equal(clean.render(0)[0], clean.render(1234)[0])  # nothing but the scene itself
    noisy = scene(static=1, objects=0)
    assert not np.array_equal(noisy.render(0)[0], noisy.render(1)[0])
    day = scene(seed=2, start=1_000_000)
    assert day.truth_at(0) == scene(seed=2).truth_at(1_000_000)  # another "day" of the same scene


def test_infrared_mode_is_grey_flat_and_lit_in_the_middle_with_the_same_truth() -> None:
    clean = {"static": 1, "noise": 0, "jpeg": 0, "shake": 0, "drift": 0, "objects": 0}
    day_closed, day_open = scene(**clean).render(0)[0], scene(**clean, state="open").render(0)[0]
    ir_closed, truth = scene(**clean, ir=1).render(0)
    ir_open = scene(**clean, ir=1, state="open").render(0)[0]
    assert truth == SCENE_LABELS.index("closed")
    assert np.array_equal(ir_closed[:, :, 0], ir_closed[:, :, 1]) and np.array_equal(ir_closed[:, :, 1],
                                                                                        ir_closed[:, :, 2])
    assert not np.array_equal(day_closed[:, :, 0], day_closed[:, :, 2])  # the day frame has colour
    # darker and flatter: the closed door stands out from the open one by far less than by day, but still does
    assert ir_closed.mean() < 0.7 * day_closed.mean()
    assert 10 < door_mean(ir_closed) - door_mean(ir_open) < 0.5 * (door_mean(day_closed) - door_mean(day_open))
    # the illuminator: the same wall is brighter in the middle of the frame than near a corner
    wall = scene(**clean).render(0)[0]
    ratio_ir = ir_closed[230:250, 300:340].mean() / ir_closed[20:40, 20:60].mean()
    assert ratio_ir > 1.2 * wall[230:250, 300:340].mean() / wall[20:40, 20:60].mean()
    # the rest of the timeline is the day's
    night, day = scene(seed=2, ir=1), scene(seed=2)
    assert [night.truth_at(i) for i in range(0, 3000, 7)] == [day.truth_at(i) for i in range(0, 3000, 7)]


def test_passing_objects_occlude_the_door_now_and_then() -> None:
    s = scene(seed=5, objects=20, static=1, noise=0, jpeg=0, shake=0, drift=0)
    clean = scene(seed=5, objects=0, static=1, noise=0, jpeg=0, shake=0, drift=0).render(0)[0]
    changed = [i for i in range(0, 600, 3) if not np.array_equal(s.render(i)[0], clean)]
    assert 0.1 < len(changed) / 200 < 0.9  # objects pass, and leave again


def test_as_a_camera_source() -> None:
    src = open_source(CameraConfig(source="synthetic:scene?seed=1&frames=3", loop=False))
    assert isinstance(src, SyntheticSource)
    got = []
    while src.grab():
        got.append(src.retrieve())
    assert [t for _, t in got] == [Scene(SceneSpec({"seed": "1"})).truth_at(i) for i in range(3)]
    assert src.ended and "3-frame scene" in (src.error or "")
    sized = open_source(CameraConfig(source="synthetic:scene", width=320, height=240))
    assert sized.grab() and sized.retrieve()[0].shape == (240, 320, 3)  # the camera's size hints apply


@pytest.mark.parametrize(("query", "message"), [
    ("hold=x", "hold must be an integer"),
    ("state=ajar", "state must be one of closed, open"),
    ("noise=-1", "noise must be between 0 and 64"),
    ("ir=2", "ir must be between 0 and 1"),
    ("door=1", "unknown parameter(s) door"),
])
def test_bad_parameters_are_refused_for_good(query: str, message: str) -> None:
    with pytest.raises(SourceSpecError) as info:
        SyntheticSource(f"synthetic:scene?{query}")
    assert message in str(info.value)
