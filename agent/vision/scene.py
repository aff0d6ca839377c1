"""`synthetic:scene`: a camera-like scene whose state is known, for region and stable-state tests and benchmarks.

A fixed camera (640x480 by default) looks at a textured wall with a roll-up garage door. The door opens and closes
at random times (each state holds `hold` frames on average; a change rolls the door over `transition` frames and
the true state flips halfway). On top: lighting that drifts slowly (a compressed day plus passing clouds, with a
slight colour shift), a little camera shake, people, cars and a moth on the lens passing now and then (sometimes in
front of the door), sensor noise and JPEG compression. Each frame carries `truth`: the door's state as an index
into SCENE_LABELS ("closed" = 0, "open" = 1, the order a model trained on folders named after the states has).

Frame i is a pure function of (seed, i): the state timeline, the events and every frame's noise come from
generators seeded with the seed (and the frame number), so a run is reproducible and `truth_at(i)` answers without
rendering. Query keys (all optional):

    seed=0          the scene (background, timeline, events)
    width, height   frame size (default 640x480); the door sits at DOOR (fractions of the frame)
    start=0         first frame number: start=1000000 is "another day" of the same scene
    frames=0        0: endless; N: a clip of N frames (it ends there with loop = false, else starts again)
    hold=150        mean frames a state holds (uniform between half and 1.5x); static=1: the door never moves
    state=closed    the state at frame 0 (closed | open)
    transition=6    frames the door takes to roll up or down
    noise=3         sensor noise, standard deviation in grey levels (0 = none)
    jpeg=75         JPEG quality the frame passes through (0 = none)
    shake=1         camera shake amplitude in pixels (0 = none)
    drift=30        lighting drift amplitude, percent of the mean brightness (0 = none)
    objects=200     mean frames between passing objects (0 = none)
    ir=0            1: night vision, the camera in its infrared mode: grey, low contrast and dark, brighter in the
                    middle where the camera's illuminator reaches (after lighting and passers-by, before noise
                    and JPEG); a condition a model trained on day frames has not seen
    live=0|1        as for every synthetic source
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import cv2
import numpy as np

SCENE_LABELS = ("closed", "open")
DOOR = (0.625, 0.3125, 0.25, 0.5)  # x, y, w, h of the door in fractions of the frame
DOOR_CROP = (0.6, 0.275, 0.3, 0.6)  # a region crop that holds the door with a margin for the camera shake
SCENE_KEYS = frozenset({"seed", "width", "height", "start", "frames", "hold", "static", "state", "transition",
                        "noise", "jpeg", "shake", "drift", "objects", "ir"})
_NOISE_FIELDS = 4
_NOISE_PAD = 16
_DAY = 2400  # frames per lighting "day" (4 minutes at 10 fps)
_OBJECT_KINDS = ("person", "car", "moth")
# Infrared mode: grey levels g become IR_LEVEL + IR_CONTRAST * (g - 128), times a gain that falls from IR_HOTSPOT
# in the middle of the frame to IR_HOTSPOT - IR_FALLOFF in its corners (the illuminator's cone).
IR_CONTRAST, IR_LEVEL, IR_HOTSPOT, IR_FALLOFF = 0.35, 60.0, 1.3, 0.5


class SceneSpec:
    """The scene's parameters, from a query dict (strings) with defaults; raises ValueError with the key."""

    def __init__(self, params: dict[str, str], width: int = 0, height: int = 0) -> None:
        def num(key: str, default: float, lo: float, hi: float = math.inf, integer: bool = True) -> Any:
            if key not in params:
                return default
            try:
                value = int(params[key]) if integer else float(params[key])
            except ValueError:
                raise ValueError(f"{key} must be {'an integer' if integer else 'a number'}, got {params[key]!r}") \
                    from None
            if not lo <= value <= hi:
                raise ValueError(f"{key} must be between {lo:g} and {hi:g}, got {value}")
            return value

        self.seed = num("seed", 0, 0)
        self.width = num("width", width or 640, 64, 4096)
        self.height = num("height", height or 480, 48, 4096)
        self.start = num("start", 0, 0)
        self.frames = num("frames", 0, 0)
        self.hold = num("hold", 150, 1)
        self.static = bool(num("static", 0, 0, 1))
        state = params.get("state", "closed")
        if state not in SCENE_LABELS:
            raise ValueError(f"state must be one of {', '.join(SCENE_LABELS)}, got {state!r}")
        self.initial = SCENE_LABELS.index(state)
        self.transition = num("transition", 6, 1, 1000)
        self.noise = num("noise", 3.0, 0, 64, integer=False)
        self.jpeg = num("jpeg", 75, 0, 100)
        self.shake = num("shake", 1.0, 0, 32, integer=False)
        self.drift = num("drift", 30.0, 0, 90, integer=False)
        self.objects = num("objects", 200, 0)
        self.ir = bool(num("ir", 0, 0, 1))


class Scene:
    """Renders frame i of a scene (`render(i) -> (BGR uint8 image, truth)`), in any order."""

    def __init__(self, spec: SceneSpec) -> None:
        self.spec = spec
        w, h = spec.width, spec.height
        self.margin = math.ceil(spec.shake) + 1
        rng = np.random.default_rng([spec.seed, 0])
        self.door = _box(DOOR, w, h)
        self._closed, self._open, self._panel = _canvases(rng, w, h, self.margin, self.door)
        # the timeline: frames at which a change starts, and the state before the first one
        self._changes: list[int] = []
        self._timeline_rng = np.random.default_rng([spec.seed, 1])
        self._events: list[tuple[int, int, str, np.ndarray]] = []  # (start, duration, kind, params)
        self._event_starts: list[int] = []
        self._event_rng = np.random.default_rng([spec.seed, 2])
        self._event_next = 0
        noise_rng = np.random.default_rng([spec.seed, 3])
        self._noise: list[tuple[np.ndarray, np.ndarray]] = []
        if spec.noise > 0:
            for _ in range(_NOISE_FIELDS):
                n = np.rint(noise_rng.normal(0.0, spec.noise, (h + _NOISE_PAD, w + _NOISE_PAD, 3)))
                self._noise.append((np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8)))
        phases = np.random.default_rng([spec.seed, 4]).uniform(0, 2 * math.pi, 6)
        self._phases = phases
        self._ir_gain = _ir_gain(w, h) if spec.ir else None

    # -- the truth ------------------------------------------------------------------------------------------
    def _frame(self, i: int) -> int:
        """The scene frame number of source frame i (`start` and `frames` applied)."""
        spec = self.spec
        return spec.start + (i % spec.frames if spec.frames else i)

    def _extend_timeline(self, n: int) -> None:
        spec = self.spec
        lo = max(2 * spec.transition, spec.hold // 2)
        hi = max(lo + 1, spec.hold + spec.hold // 2)
        while not self._changes or self._changes[-1] <= n:
            last = self._changes[-1] if self._changes else 0
            self._changes.append(last + int(self._timeline_rng.integers(lo, hi + 1)))

    def door_at(self, n: int) -> tuple[int, float]:
        """(truth, open fraction 0..1) at scene frame n."""
        spec = self.spec
        if spec.static:
            return spec.initial, float(spec.initial)
        self._extend_timeline(n)
        k = bisect.bisect_right(self._changes, n)  # changes started at or before n
        before = (spec.initial + k) % 2  # the state after k changes
        if k == 0:
            return before, float(before)
        into = n - self._changes[k - 1]
        if into >= spec.transition:
            return before, float(before)
        previous = 1 - before
        progress = (into + 1) / spec.transition
        fraction = progress if before == 1 else 1.0 - progress
        truth = before if into >= spec.transition // 2 else previous
        return truth, fraction

    def truth_at(self, i: int) -> int:
        """The door's true state (index into SCENE_LABELS) in source frame i."""
        return self.door_at(self._frame(i))[0]

    def rolling(self, i: int) -> bool:
        """Whether the door is between open and closed in source frame i (its truth flips halfway)."""
        return 0.0 < self.door_at(self._frame(i))[1] < 1.0

    def changes(self, first: int, last: int) -> list[int]:
        """Source frames in [first, last) whose truth differs from the frame before."""
        return [i for i in range(max(1, first), last) if self.truth_at(i) != self.truth_at(i - 1)]

    # -- rendering ------------------------------------------------------------------------------------------
    def render(self, i: int) -> tuple[np.ndarray, int]:
        spec = self.spec
        n = self._frame(i)
        w, h, m = spec.width, spec.height, self.margin
        truth, fraction = self.door_at(n)
        rng = np.random.default_rng([spec.seed, 5, n])
        dx, dy = self._shake(n, rng)
        canvas = self._open if fraction >= 1.0 else self._closed
        view = canvas[m + dy:m + dy + h, m + dx:m + dx + w]
        light = self._light(n)
        frame = cv2.LUT(view, light)  # a new array: the canvases stay untouched
        if 0.0 < fraction < 1.0:  # rolling: the panel's bottom edge rises with `fraction`, the garage shows below
            x, y, bw, bh = self.door  # in scene pixels; in this frame at (x - dx, y - dy)
            fx, fy = x - dx, y - dy
            frame[fy:fy + bh, fx:fx + bw] = cv2.LUT(self._open[m + y:m + y + bh, m + x:m + x + bw], light)
            visible = round(bh * (1.0 - fraction))
            if visible > 0:
                frame[fy:fy + visible, fx:fx + bw] = cv2.LUT(self._panel[bh - visible:], light)
        self._draw_objects(frame, n)
        if self._ir_gain is not None:
            frame = self._infrared(frame, self._ir_gain)
        if self._noise:
            pos, neg = self._noise[int(rng.integers(len(self._noise)))]
            ox, oy = (int(v) for v in rng.integers(0, _NOISE_PAD, 2))
            cv2.add(frame, pos[oy:oy + h, ox:ox + w], dst=frame)
            cv2.subtract(frame, neg[oy:oy + h, ox:ox + w], dst=frame)
        if spec.jpeg:
            ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, int(spec.jpeg)])
            decoded = cv2.imdecode(data, cv2.IMREAD_COLOR) if ok else None
            if decoded is not None:
                frame = decoded
        return frame, truth

    @staticmethod
    def _infrared(frame: np.ndarray, gain: np.ndarray) -> np.ndarray:
        """The frame as an infrared camera sees it (see IR_CONTRAST): grey, flat, dark, lit in the middle."""
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.float32)
        lit = (IR_LEVEL + IR_CONTRAST * (grey - 128.0)) * gain
        return cv2.cvtColor(np.clip(lit, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)

    def _shake(self, n: int, rng: np.random.Generator) -> tuple[int, int]:
        a = self.spec.shake
        if a <= 0:
            return 0, 0
        p = self._phases
        sx = 0.6 * math.sin(n * 0.9 + p[0]) + 0.4 * math.sin(n * 2.3 + p[1])
        sy = 0.6 * math.sin(n * 0.7 + p[2]) + 0.4 * math.sin(n * 1.9 + p[3])
        jx, jy = rng.uniform(-0.5, 0.5, 2)
        m = self.margin - 1
        return max(-m, min(m, round(a * (sx + jx)))), max(-m, min(m, round(a * (sy + jy))))

    def _light(self, n: int) -> np.ndarray:
        """A per-channel look-up table: brightness drifting over a compressed day and clouds, a slight colour cast."""
        d = self.spec.drift / 100.0
        p = self._phases
        day = math.sin(2 * math.pi * n / _DAY + p[4])
        clouds = 0.5 * math.sin(2 * math.pi * n / 517 + p[5]) * math.sin(2 * math.pi * n / 131)
        gain = max(0.25, 1.0 + d * (day + 0.35 * clouds))
        warm = 0.15 * d * day  # warmer (more red) in the "afternoon"
        gains = np.array([gain * (1 - warm), gain, gain * (1 + warm)], np.float32)  # B, G, R
        ramp = np.arange(256, dtype=np.float32)[:, None] * gains[None, :]
        return np.clip(ramp, 0, 255).astype(np.uint8).reshape(256, 1, 3)

    def _extend_events(self, n: int) -> None:
        spec = self.spec
        if not spec.objects:
            return
        rng = self._event_rng
        while self._event_next <= n + 200:
            self._event_next += int(rng.exponential(spec.objects)) + 1
            kind = _OBJECT_KINDS[int(rng.choice(3, p=[0.55, 0.3, 0.15]))]
            duration = int(rng.integers(8, 20)) if kind == "moth" else int(rng.integers(25, 70))
            params = rng.uniform(0, 1, 8)
            self._events.append((self._event_next, duration, kind, params))
            self._event_starts.append(self._event_next)

    def _draw_objects(self, frame: np.ndarray, n: int) -> None:
        if not self.spec.objects:
            return
        self._extend_events(n)
        lo = bisect.bisect_left(self._event_starts, n - 80)
        hi = bisect.bisect_right(self._event_starts, n)
        h, w = frame.shape[:2]
        for start, duration, kind, p in self._events[lo:hi]:
            t = (n - start) / duration
            if not 0.0 <= t < 1.0:
                continue
            forward = p[0] < 0.5
            x = int((t if forward else 1 - t) * (w + 200)) - 100
            colour = tuple(int(40 + 180 * v) for v in p[1:4])
            if kind == "person":
                ph = int(h * (0.35 + 0.2 * p[4]))
                base = int(h * (0.85 + 0.1 * p[5]))
                cv2.ellipse(frame, (x, base - ph // 2), (ph // 7, ph // 2 - ph // 8), 0, 0, 360, colour, -1)
                cv2.circle(frame, (x, base - ph + ph // 10), ph // 10, (60, 80, 110), -1)
            elif kind == "car":
                cw, ch = int(w * (0.25 + 0.1 * p[4])), int(h * (0.12 + 0.05 * p[5]))
                base = int(h * 0.97)
                cv2.rectangle(frame, (x - cw // 2, base - ch), (x + cw // 2, base), colour, -1)
                cv2.rectangle(frame, (x - cw // 3, base - ch - ch // 2), (x + cw // 4, base - ch), colour, -1)
                for wx in (x - cw // 3, x + cw // 3):
                    cv2.circle(frame, (wx, base), ch // 3, (20, 20, 20), -1)
            else:  # a moth on the lens: large, dark, blurred, fluttering
                cx = int(w * (0.2 + 0.6 * p[4]) + 0.15 * w * math.sin(9 * t + 6 * p[5]))
                cy = int(h * (0.2 + 0.6 * p[6]) + 0.15 * h * math.sin(7 * t + 6 * p[7]))
                r = int(min(w, h) * (0.12 + 0.1 * p[5]))
                x0, y0, x1, y1 = max(0, cx - 2 * r), max(0, cy - 2 * r), min(w, cx + 2 * r), min(h, cy + 2 * r)
                if x1 <= x0 or y1 <= y0:
                    continue
                mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
                cv2.ellipse(mask, (cx - x0, cy - y0), (r, r // 2), int(360 * p[6] + 200 * t), 0, 360, 255, -1)
                mask = cv2.GaussianBlur(mask, (0, 0), r / 3)
                roi = frame[y0:y1, x0:x1]
                alpha = (mask.astype(np.float32) * (0.85 / 255.0))[:, :, None]
                roi[:] = (roi * (1.0 - alpha) + 25.0 * alpha).astype(np.uint8)


def _ir_gain(w: int, h: int) -> np.ndarray:
    """The illuminator's cone: IR_HOTSPOT in the middle of the frame, IR_HOTSPOT - IR_FALLOFF in the corners."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2  # 0 in the middle, ~2 in a corner
    return (IR_HOTSPOT - IR_FALLOFF * r2 / 2).astype(np.float32)


def _box(frac: tuple[float, float, float, float], w: int, h: int) -> tuple[int, int, int, int]:
    x, y, bw, bh = frac
    return round(x * w), round(y * h), round(bw * w), round(bh * h)


def _canvases(rng: np.random.Generator, w: int, h: int, m: int,
              door: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scene with the door closed, with the door open, the door panel alone): canvases m pixels larger on each
    side than the frame, so the camera shake is a slice."""
    cw, ch = w + 2 * m, h + 2 * m
    # a rendered wall: low-frequency blotches, fine grain, brick courses; a darker floor band
    blotch = cv2.resize(rng.uniform(0, 1, (max(2, ch // 40), max(2, cw // 40))).astype(np.float32), (cw, ch),
                        interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 1, (ch, cw)).astype(np.float32)
    base = np.array(rng.uniform([110, 120, 140], [150, 160, 185]), np.float32)  # B, G, R: a warm render
    wall = base[None, None, :] * (0.85 + 0.25 * blotch[:, :, None]) + 6.0 * grain[:, :, None]
    brick_h = max(6, ch // 32)
    for row, y in enumerate(range(0, ch, brick_h)):
        wall[y:y + 1] *= 0.8
        offset = (row % 2) * brick_h
        for x in range(offset, cw, 2 * brick_h):
            wall[y:y + brick_h, x:x + 1] *= 0.85
    floor = int(ch * 0.82)
    wall[floor:] = wall[floor:] * 0.55 + np.array([20, 20, 20], np.float32)
    # a window on the left and a bin: static clutter
    wx, wy, ww, wh = int(cw * 0.08), int(ch * 0.2), int(cw * 0.2), int(ch * 0.25)
    wall[wy:wy + wh, wx:wx + ww] = np.array([170, 150, 120], np.float32) + 10 * grain[wy:wy + wh, wx:wx + ww, None]
    cv2.rectangle(wall, (wx, wy), (wx + ww, wy + wh), (60, 60, 60), 3)
    cv2.line(wall, (wx + ww // 2, wy), (wx + ww // 2, wy + wh), (60, 60, 60), 2)
    bx = int(cw * 0.4)
    cv2.rectangle(wall, (bx, floor - int(ch * 0.12)), (bx + int(cw * 0.06), floor + 4), (40, 90, 40), -1)
    closed = np.clip(wall, 0, 255).astype(np.uint8)
    open_ = closed.copy()
    x, y, bw, bh = door
    x, y = x + m, y + m
    # the door's frame (trim), on both
    for img in (closed, open_):
        cv2.rectangle(img, (x - 6, y - 6), (x + bw + 5, y + bh), (70, 75, 80), -1)
    # open: a dark garage with a car's rear and a shelf
    yy = np.linspace(0.0, 1.0, bh, dtype=np.float32)[:, None, None]
    inside = (18 + 30 * yy + 4 * rng.normal(0, 1, (bh, bw, 1)).astype(np.float32)) * np.ones((1, 1, 3), np.float32)
    inside = np.clip(inside, 0, 255).astype(np.uint8)
    cv2.rectangle(inside, (bw // 5, int(bh * 0.55)), (bw - bw // 5, int(bh * 0.9)), (90, 40, 30), -1)
    for lx in (bw // 5 + 6, bw - bw // 5 - 14):
        cv2.rectangle(inside, (lx, int(bh * 0.6)), (lx + 8, int(bh * 0.66)), (30, 30, 200), -1)
    cv2.rectangle(inside, (4, int(bh * 0.25)), (bw // 3, int(bh * 0.28)), (80, 90, 100), -1)
    open_[y:y + bh, x:x + bw] = inside
    # closed: the panel, horizontal slats, a handle
    slat = max(4, bh // 12)
    ramp = np.linspace(1.05, 0.9, bh, dtype=np.float32)[:, None, None]
    panel = np.array([180, 190, 200], np.float32)[None, None, :] * ramp * np.ones((1, bw, 1), np.float32)
    panel += 3 * rng.normal(0, 1, (bh, bw, 1)).astype(np.float32)
    for sy in range(slat, bh, slat):
        panel[sy - 1:sy + 1] *= 0.7
    panel = np.clip(panel, 0, 255).astype(np.uint8)
    cv2.rectangle(panel, (bw // 2 - bw // 10, bh - slat * 2), (bw // 2 + bw // 10, bh - slat * 2 + 4), (60, 60, 60), -1)
    closed[y:y + bh, x:x + bw] = panel
    return closed, open_, panel
