"""Synthetic video clips whose events and timings are known exactly, with captions, QA pairs and temporal grounding.

The tiny profile trains video understanding on these: coloured shapes (the vocabulary of
`synthetic_crawl`) appear, move, change colour and disappear on a plain background, and every label
is derived from the same event list the frames are drawn from, so captions, answers and grounding
intervals are exact.

Design choices:
- Time is the frame grid: frame i is shown at i / fps, the clip has n = round(duration_s * fps)
  frames and lasts exactly n / fps seconds. Every event starts on a frame.
- Instant events (appears, disappears, changes_colour) happen at the first frame f that shows the new
  state; their interval is that frame's display interval [f / fps, (f + 1) / fps). A move runs from
  frame s (still at the start position) to frame e (first frame at the destination): [s / fps, e / fps].
  `VideoEvent.end_frame` is f + 1 or e respectively, and end_s = end_frame / fps in both cases.
- The clip is cut into as many equal segments as there are events and each event lies inside its own
  segment, so events are spread over the clip, never overlap, and have distinct start times. When a
  segment has frames at whole tenths of a second, the event is put on one of them, so most captions
  read like the model's `[12.0 second]` timestamps.
- Each object has its own horizontal lane and a distinct shape, so objects never overlap and "the
  circle" names one object; it moves only between three named positions (left, centre, right) of its
  lane. Colours too close to the background are never used.
- Frames with the same content share one JPEG, so long static stretches cost nothing to encode.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from components.data.synthesis.avi_writer import jpeg_bytes, mjpeg_avi_from_jpegs
from components.data.synthetic_crawl import BACKGROUNDS, COLOURS, SHAPES, DrawnObject, Scene, render

EVENT_KINDS = ("appears", "disappears", "changes_colour", "moves")
EXTRA_KINDS = ("changes_colour", "moves", "disappears")  # what can follow an object's appearance
POSITIONS = {"left": 1 / 6, "centre": 1 / 2, "right": 5 / 6}  # x centre as a fraction of the width
MIN_SEGMENT_S = 2.0  # every event gets a segment of at least this long ...
MIN_SEGMENT_FRAMES = 3  # ... and at least this many frames (a move needs a start, a middle and an end frame)
MIN_WIDTH, MIN_HEIGHT = 64, 48
MIN_LANE_PX = 16
MIN_BACKGROUND_DISTANCE = 80.0  # RGB distance; drops white on white or beige, black on black
MAX_EVENTS_PER_OBJECT = 4
JPEG_QUALITY = 90


@dataclass
class VideoEvent:
    """One event. `subject` names the object as it looks when the event starts ("red circle").

    Times: instants (appears, disappears, changes_colour) span the first frame showing the new state,
    [f / fps, (f + 1) / fps); moves span [s / fps, e / fps] from the last frame at the start position
    to the first at the destination. end_s == end_frame / fps in both cases.
    """

    kind: str
    subject: str
    start_s: float
    end_s: float
    detail: str  # "appears on the left", "turns blue", "moves from left to right", "disappears"
    start_frame: int = 0
    end_frame: int = 0
    object_id: int = 0

    @property
    def phrase(self) -> str:
        """The event as a noun phrase: "the red circle turns blue"."""
        return f"the {self.subject} {self.detail}"


@dataclass
class SyntheticClip:
    video: bytes  # Motion-JPEG AVI
    fps: float
    num_frames: int
    width: int
    height: int
    duration_s: float  # num_frames / fps
    background: str
    events: list[VideoEvent]  # sorted by start
    caption: str
    qa: list[dict[str, str]]
    temporal_grounding: list[dict[str, Any]]  # query, start_s, end_s, start_frame, end_frame, kind
    visible: list[dict[str, Any]]  # per object: shape, size, frames on screen, colours and track over time


@dataclass
class _Object:
    """An object's whole life, filled in as its events are placed."""

    id: int
    shape: str
    size: int
    y: int  # lane centre
    position: str  # current named position while placing events
    colour: str  # current colour while placing events
    first_frame: int = -1
    end_frame: int = -1  # exclusive
    colours: list[tuple[int, str]] = field(default_factory=list)  # (from frame, colour)
    track: list[tuple[int, int]] = field(default_factory=list)  # (frame, x centre) keyframes

    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def _check_args(duration_s: float, fps: float, width: int, height: int, max_objects: int) -> int:
    """Validates the arguments and returns the number of frames."""
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive finite number; got {fps}")
    if not math.isfinite(duration_s):
        raise ValueError(f"duration_s must be finite; got {duration_s}")
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"frame size {width}x{height} is too small; need at least {MIN_WIDTH}x{MIN_HEIGHT}")
    if not 1 <= max_objects <= len(SHAPES):
        raise ValueError(f"max_objects must be in 1..{len(SHAPES)} (one shape per object); got {max_objects}")
    if height // max_objects < MIN_LANE_PX:
        raise ValueError(f"height {height} gives {max_objects} objects lanes under {MIN_LANE_PX} px; "
                         f"use at least {MIN_LANE_PX * max_objects} px or fewer objects")
    num_frames = round(duration_s * fps)
    if _event_slots(num_frames, fps) < 1:
        raise ValueError(f"a {duration_s} s clip at {fps} fps ({num_frames} frames) is too short for one event; "
                         f"need at least {MIN_SEGMENT_S:g} s and {MIN_SEGMENT_FRAMES} frames")
    return num_frames


def _event_slots(num_frames: int, fps: float) -> int:
    """How many events fit: one segment of at least MIN_SEGMENT_S and MIN_SEGMENT_FRAMES each."""
    return min(num_frames // MIN_SEGMENT_FRAMES, math.floor(num_frames / fps / MIN_SEGMENT_S + 1e-9))


def _colour_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def usable_colours(background: str) -> list[str]:
    """Object colours that stand out from `background`."""
    bg = BACKGROUNDS[background]
    return [c for c, rgb in COLOURS.items() if _colour_distance(rgb, bg) >= MIN_BACKGROUND_DISTANCE]


def _make_objects(rng: random.Random, count: int, width: int, height: int, background: str) -> list[_Object]:
    lane = height // count
    size = max(4, min(int(lane * 0.7), int(width / len(POSITIONS) * 0.8)))
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(usable_colours(background), count)
    lanes = rng.sample(range(count), count)
    return [_Object(i, shapes[i], size, lanes[i] * lane + lane // 2, rng.choice(list(POSITIONS)), colours[i])
            for i in range(count)]


def _plan_kinds(rng: random.Random, count: int, slots: int) -> list[list[str]]:
    """Per object its event kinds in order: 'appears' first, 'disappears' (if any) last."""
    plans = [["appears"] for _ in range(count)]
    cap = min(slots, MAX_EVENTS_PER_OBJECT * count)
    target = rng.randint(max(count, min(cap, 2 * count)), cap)
    for _ in range(target - count):
        open_ids = [i for i, p in enumerate(plans) if p[-1] != "disappears" and len(p) < MAX_EVENTS_PER_OBJECT]
        if not open_ids:
            break
        plans[rng.choice(open_ids)].append(rng.choice(EXTRA_KINDS))
    return plans


def _interleave(rng: random.Random, plans: list[list[str]]) -> list[tuple[int, str]]:
    """A uniformly random interleaving of the per-object sequences, each kept in order."""
    turns = [i for i, plan in enumerate(plans) for _ in plan]
    rng.shuffle(turns)
    cursor = [0] * len(plans)
    order = []
    for i in turns:
        order.append((i, plans[i][cursor[i]]))
        cursor[i] += 1
    return order


def _on_tenth(frame: int, fps: float) -> bool:
    tenths = frame * 10 / fps
    return abs(tenths - round(tenths)) < 1e-9


def _pick_frame(rng: random.Random, lo: int, hi: int, fps: float) -> int:
    """A frame in [lo, hi], preferring ones shown at a whole tenth of a second."""
    frames = range(lo, hi + 1)
    nice = [f for f in frames if _on_tenth(f, fps)]
    return rng.choice(nice or list(frames))


def _pick_span(rng: random.Random, lo: int, hi: int, fps: float) -> tuple[int, int]:
    """Start and end frames of a move in [lo, hi], at least a third of the range (and 2 frames) apart,
    on whole tenths of a second when the range has two such frames far enough apart."""
    least = max(2, (hi - lo) // 3)
    frames = [f for f in range(lo, hi + 1) if _on_tenth(f, fps)]
    if len(frames) < 2 or frames[-1] - frames[0] < least:
        frames = list(range(lo, hi + 1))
    start = rng.choice([f for f in frames if f <= frames[-1] - least])
    return start, rng.choice([f for f in frames if f >= start + least])


def _x_of(position: str, width: int) -> int:
    return int(POSITIONS[position] * width)


def _place(rng: random.Random, obj: _Object, kind: str, lo: int, hi: int, fps: float, width: int,
           background: str) -> VideoEvent:
    """Puts one event of `obj` inside frames [lo, hi] and updates the object's life to match."""
    subject = obj.name()
    if kind == "appears":
        start = _pick_frame(rng, max(lo, 1), hi, fps)
        end, detail = start + 1, f"appears {'in the' if obj.position == 'centre' else 'on the'} {obj.position}"
        obj.first_frame = start
        obj.colours.append((start, obj.colour))
        obj.track.append((start, _x_of(obj.position, width)))
    elif kind == "disappears":
        start = _pick_frame(rng, lo, hi, fps)
        end, detail = start + 1, "disappears"
        obj.end_frame = start
    elif kind == "changes_colour":
        start = _pick_frame(rng, lo, hi, fps)
        end = start + 1
        obj.colour = rng.choice([c for c in usable_colours(background) if c != obj.colour])
        obj.colours.append((start, obj.colour))
        detail = f"turns {obj.colour}"
    else:  # moves
        start, end = _pick_span(rng, lo, hi, fps)
        target = rng.choice([p for p in POSITIONS if p != obj.position])
        detail = f"moves from {obj.position} to {target}"
        obj.track += [(start, _x_of(obj.position, width)), (end, _x_of(target, width))]
        obj.position = target
    return VideoEvent(kind, subject, start / fps, end / fps, detail, start, end, obj.id)


def _schedule(rng: random.Random, objects: list[_Object], order: list[tuple[int, str]], num_frames: int,
              fps: float, width: int, background: str) -> list[VideoEvent]:
    bounds = [round(k * num_frames / len(order)) for k in range(len(order) + 1)]
    events = [_place(rng, objects[i], kind, bounds[k], bounds[k + 1] - 1, fps, width, background)
              for k, (i, kind) in enumerate(order)]
    for obj in objects:
        if obj.end_frame < 0:
            obj.end_frame = num_frames
    return events


def _visible_entry(obj: _Object) -> dict[str, Any]:
    return {
        "id": obj.id,
        "shape": obj.shape,
        "size": obj.size,
        "first_frame": obj.first_frame,
        "end_frame": obj.end_frame,
        "colours": [{"from_frame": f, "colour": c} for f, c in obj.colours],
        "track": [{"frame": f, "x": x, "y": obj.y} for f, x in obj.track],
    }


def object_centre(entry: dict[str, Any], frame: int) -> tuple[int, int]:
    """Where a `visible` entry's object is (or would be, if off screen) at `frame`: linear between keyframes."""
    track = entry["track"]
    x = track[0]["x"]
    for a, b in zip(track, track[1:]):
        if frame >= b["frame"]:
            x = b["x"]
        elif frame > a["frame"]:
            x = a["x"] + (b["x"] - a["x"]) * (frame - a["frame"]) / (b["frame"] - a["frame"])
            break
    return math.floor(x + 0.5), track[0]["y"]


def object_box(entry: dict[str, Any], frame: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel box of a `visible` entry's object at `frame`, as drawn."""
    (cx, cy), size = object_centre(entry, frame), entry["size"]
    x0, y0 = cx - size // 2, cy - size // 2
    return x0, y0, x0 + size, y0 + size


def object_colour(entry: dict[str, Any], frame: int) -> str:
    """A `visible` entry's colour at `frame` (its first colour before it appears)."""
    colour = entry["colours"][0]["colour"]
    for change in entry["colours"]:
        if frame >= change["from_frame"]:
            colour = change["colour"]
    return colour


def on_screen(entry: dict[str, Any], frame: int) -> bool:
    return entry["first_frame"] <= frame < entry["end_frame"]


def frame_at(clip: SyntheticClip, t: float) -> int:
    """The frame shown at time `t` (frame i covers [i / fps, (i + 1) / fps)); t must lie in [0, duration]."""
    if not 0 <= t <= clip.duration_s + 1e-9:
        raise ValueError(f"t = {t} s is outside the clip [0, {clip.duration_s}] s")
    return min(math.floor(t * clip.fps + 1e-6), clip.num_frames - 1)


def _states(visible: list[dict[str, Any]], frame: int) -> list[dict[str, Any]]:
    states = []
    for entry in visible:
        if on_screen(entry, frame):
            colour = object_colour(entry, frame)
            states.append({"id": entry["id"], "shape": entry["shape"], "colour": colour, "rgb": COLOURS[colour],
                           "box": object_box(entry, frame), "centre": object_centre(entry, frame)})
    return states


def object_state_at(clip: SyntheticClip, t: float) -> list[dict[str, Any]]:
    """The objects on screen at time `t`: id, shape, colour, rgb, pixel box (x0, y0, x1, y1) and centre."""
    return _states(clip.visible, frame_at(clip, t))


def drawn_frames(visible: list[dict[str, Any]], num_frames: int, width: int, height: int,
                 background: str) -> tuple[list[Image.Image], list[int]]:
    """The clip's distinct pictures, and per frame the index of the picture it shows (frames with the
    same content share one picture)."""
    seen: dict[tuple[Any, ...], int] = {}
    pictures: list[Image.Image] = []
    shown = []
    for frame in range(num_frames):
        drawn = tuple((s["shape"], s["colour"], s["box"]) for s in _states(visible, frame))
        if drawn not in seen:
            seen[drawn] = len(pictures)
            pictures.append(render(Scene(width, height, background, [DrawnObject(*d) for d in drawn])))
        shown.append(seen[drawn])
    return pictures, shown


def _render_video(visible: list[dict[str, Any]], num_frames: int, fps: float, width: int, height: int,
                  background: str) -> bytes:
    pictures, shown = drawn_frames(visible, num_frames, width, height, background)
    jpegs = [jpeg_bytes(picture, JPEG_QUALITY) for picture in pictures]  # each distinct picture encoded once
    return mjpeg_avi_from_jpegs([jpegs[i] for i in shown], fps, width, height)


def format_seconds(t: float) -> str:
    """Seconds for text: at most two decimals, at least one ("2.0", "2.5", "1.73")."""
    text = f"{t:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _caption(background: str, events: list[VideoEvent]) -> str:
    sentences = [f"The background is {background}."]
    for e in events:
        if e.kind == "appears":
            sentences.append(f"At {format_seconds(e.start_s)} s {_article(e.subject)} {e.detail}.")
        elif e.kind == "moves":
            sentences.append(f"From {format_seconds(e.start_s)} s to {format_seconds(e.end_s)} s {e.phrase}.")
        else:
            sentences.append(f"At {format_seconds(e.start_s)} s {e.phrase}.")
    return " ".join(sentences)


def _unique_events(events: list[VideoEvent]) -> list[VideoEvent]:
    """Events whose phrase names them alone (an object may, say, move left to right twice)."""
    counts = Counter(e.phrase for e in events)
    return [e for e in events if counts[e.phrase] == 1]


def _object_questions(objects: list[_Object], events: list[VideoEvent]) -> list[dict[str, str]]:
    qa = []
    for obj in objects:
        own = [e for e in events if e.object_id == obj.id]
        qa.append({"question": f"What colour is the {obj.shape} when it appears?", "answer": obj.colours[0][1]})
        changes = [e for e in own if e.kind == "changes_colour"]
        for e in changes:
            when = f" at {format_seconds(e.start_s)} s" if len(changes) > 1 else ""
            qa.append({"question": f"What colour does the {obj.shape} turn{when}?", "answer": e.detail[len("turns "):]})
        moves = [e for e in own if e.kind == "moves"]
        for e in moves:
            when = f" between {format_seconds(e.start_s)} s and {format_seconds(e.end_s)} s" if len(moves) > 1 else ""
            qa.append({"question": f"Where does the {obj.shape} move{when}?", "answer": e.detail[len("moves "):]})
        gone = [e for e in own if e.kind == "disappears"]
        qa.append({"question": f"Does the {obj.shape} disappear?", "answer": "yes" if gone else "no"})
        if gone:
            qa.append({"question": f"When does the {obj.shape} disappear?",
                       "answer": f"at {format_seconds(gone[0].start_s)} s"})
    return qa


def _order_questions(rng: random.Random, events: list[VideoEvent], pairs: int = 2) -> list[dict[str, str]]:
    candidates = list(itertools.combinations(_unique_events(events), 2))
    qa = []
    for a, b in rng.sample(candidates, min(pairs, len(candidates))):
        first = a  # events are sorted by start, and combinations keep that order
        if rng.random() < 0.5:
            a, b = b, a
        qa.append({"question": f"What happens first, {a.phrase} or {b.phrase}?", "answer": first.phrase})
    return qa


def _qa(rng: random.Random, background: str, objects: list[_Object], events: list[VideoEvent]) -> list[dict[str, str]]:
    qa = [{"question": "How many objects appear?", "answer": str(len(objects))},
          {"question": "What colour is the background?", "answer": background}]
    if len(objects) > 1:
        first = next(e for e in events if e.kind == "appears")
        qa.append({"question": "Which object appears first?", "answer": f"the {first.subject}"})
    return qa + _object_questions(objects, events) + _order_questions(rng, events)


def _grounding(events: list[VideoEvent]) -> list[dict[str, Any]]:
    return [{"query": e.phrase, "kind": e.kind, "start_s": e.start_s, "end_s": e.end_s,
             "start_frame": e.start_frame, "end_frame": e.end_frame} for e in _unique_events(events)]


def render_clip(rng: random.Random, duration_s: float, fps: float, width: int, height: int,
                max_objects: int = 3) -> SyntheticClip:
    """One clip of 1..max_objects shapes with known events, its MJPEG AVI bytes and exact labels.

    The clip has round(duration_s * fps) frames; `duration_s` of the result is that count / fps.
    Raises ValueError for fps <= 0, frames under 64x48, lanes under 16 px, or a clip too short for one
    event (under 2 s or 3 frames).
    """
    num_frames = _check_args(duration_s, fps, width, height, max_objects)
    slots = _event_slots(num_frames, fps)
    background = rng.choice(list(BACKGROUNDS))
    objects = _make_objects(rng, rng.randint(1, min(max_objects, slots)), width, height, background)
    order = _interleave(rng, _plan_kinds(rng, len(objects), slots))
    events = _schedule(rng, objects, order, num_frames, fps, width, background)
    visible = [_visible_entry(obj) for obj in objects]
    return SyntheticClip(
        video=_render_video(visible, num_frames, fps, width, height, background),
        fps=fps, num_frames=num_frames, width=width, height=height, duration_s=num_frames / fps,
        background=background, events=events, caption=_caption(background, events),
        qa=_qa(rng, background, objects, events), temporal_grounding=_grounding(events), visible=visible,
    )
