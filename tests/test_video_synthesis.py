"""Motion-JPEG AVI writing read back by decord, and synthetic clips whose frames, captions, QA and grounding agree."""

from __future__ import annotations

import random
import re
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import decord
import numpy as np
import pytest
from PIL import Image

from components.data.synthesis.avi_writer import encode_mjpeg_avi, frame_rate_fraction, write_mjpeg_avi
from components.data.synthetic_crawl import BACKGROUNDS, COLOURS
from components.common.video import PATCH, plan_sampling, probe_video, sample_video
from components.data.synthesis.video import (
    EVENT_KINDS,
    SyntheticClip,
    format_seconds,
    object_centre,
    object_colour,
    object_state_at,
    on_screen,
    render_clip,
)

TOLERANCE = 40  # per channel, JPEG at flat-colour centres after an optional bilinear resize
CLIP_CASES = [  # seed, duration_s, fps, width, height
    (0, 12.0, 7.5, 160, 120),
    (1, 20.0, 3.0, 200, 150),
    (2, 9.0, 10.0, 240, 180),
    (3, 30.0, 1.0, 160, 120),
]


def solid_frames(colours: list[tuple[int, int, int]], size: tuple[int, int] = (96, 64)) -> list[Image.Image]:
    """Frames with a left half in the given colour and a right half in its complement."""
    frames = []
    for colour in colours:
        image = Image.new("RGB", size, colour)
        image.paste(tuple(255 - c for c in colour), (size[0] // 2, 0, size[0], size[1]))
        frames.append(image)
    return frames


def read_all(path: Path) -> tuple[Any, np.ndarray]:
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    return reader, reader.get_batch(list(range(len(reader)))).asnumpy()


def pixel(frame: np.ndarray, x: float, y: float) -> np.ndarray:
    """Median colour of the 3x3 patch around (x, y)."""
    xi, yi = int(round(x)), int(round(y))
    patch = frame[max(0, yi - 1): yi + 2, max(0, xi - 1): xi + 2].reshape(-1, 3)
    return np.median(patch, axis=0)


def close(found: np.ndarray, expected: tuple[int, int, int]) -> bool:
    return bool(np.abs(found - np.array(expected)).max() <= TOLERANCE)


def riff_chunks(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(tag, payload offset, payload size) of the chunks in data[start:end], following even padding."""
    chunks = []
    while start < end:
        tag, size = data[start:start + 4], struct.unpack("<I", data[start + 4:start + 8])[0]
        chunks.append((tag, start + 8, size))
        start += 8 + size + size % 2
    assert start == end
    return chunks


def write_clip(clip: SyntheticClip, folder: Path) -> Path:
    path = folder / "clip.avi"
    path.write_bytes(clip.video)
    return path


# ---- the AVI writer ----


@pytest.mark.parametrize("fps", [1.0, 7.5, 29.97])
def test_avi_reads_back_in_decord_with_count_fps_size_and_colours(tmp_path: Path, fps: float) -> None:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (230, 220, 40), (20, 20, 20), (240, 240, 240),
               (120, 60, 180)]
    path = tmp_path / "out.avi"
    write_mjpeg_avi(path, solid_frames(colours), fps)
    assert [p.name for p in tmp_path.iterdir()] == ["out.avi"]  # no temporary file left behind
    reader, frames = read_all(path)
    assert len(reader) == len(colours)
    assert abs(reader.get_avg_fps() - fps) < 1e-3
    assert frames.shape == (len(colours), 64, 96, 3)
    for frame, colour in zip(frames, colours):
        assert close(pixel(frame, 20, 32), colour)
        assert close(pixel(frame, 76, 32), tuple(255 - c for c in colour))
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height) == (len(colours), 96, 64)
    assert abs(info.native_fps - fps) < 1e-3 and abs(info.duration_s - len(colours) / fps) < 1e-3


def test_avi_structure_has_exact_rate_index_and_padding() -> None:
    frames = solid_frames([(10 * i, 100, 200) for i in range(5)], size=(33, 17))  # odd sizes give odd JPEG lengths
    data = encode_mjpeg_avi(frames, 29.97)
    assert data[:4] == b"RIFF" and data[8:12] == b"AVI " and struct.unpack("<I", data[4:8])[0] == len(data) - 8
    hdrl, movi, idx1 = riff_chunks(data, 12, len(data))
    assert data[hdrl[1]:hdrl[1] + 4] == b"hdrl" and data[movi[1]:movi[1] + 4] == b"movi" and idx1[0] == b"idx1"
    strl = riff_chunks(data, hdrl[1] + 4, hdrl[1] + hdrl[2])[1]
    strh = riff_chunks(data, strl[1] + 4, strl[1] + strl[2])[0]
    kind, handler, *_ = struct.unpack("<4s4sIHHI", data[strh[1]:strh[1] + 20])
    scale, rate, _, length = struct.unpack("<IIII", data[strh[1] + 20:strh[1] + 36])
    assert (kind, handler, Fraction(rate, scale), length) == (b"vids", b"MJPG", Fraction(2997, 100), 5)
    frames_in_movi = riff_chunks(data, movi[1] + 4, movi[1] + movi[2])
    assert [tag for tag, _, _ in frames_in_movi] == [b"00dc"] * 5
    assert any(size % 2 for _, _, size in frames_in_movi)  # padding was exercised
    entries = [struct.unpack("<4sIII", data[idx1[1] + 16 * i: idx1[1] + 16 * (i + 1)]) for i in range(idx1[2] // 16)]
    assert len(entries) == 5
    for (tag, flags, offset, size), (_, payload, payload_size) in zip(entries, frames_in_movi):
        assert tag == b"00dc" and flags & 0x10 and size == payload_size
        assert movi[1] + offset + 8 == payload  # offsets count from the 'movi' tag
        assert data[payload:payload + 2] == b"\xff\xd8"  # a JPEG starts here


def test_frame_rate_fraction() -> None:
    assert frame_rate_fraction(7.5) == Fraction(15, 2)
    assert frame_rate_fraction(29.97) == Fraction(2997, 100)
    assert frame_rate_fraction(Fraction(30000, 1001)) == Fraction(30000, 1001)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            frame_rate_fraction(bad)


def test_writer_rejects_bad_input_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        encode_mjpeg_avi([], 5.0)
    with pytest.raises(ValueError, match="frame 1"):
        encode_mjpeg_avi([Image.new("RGB", (32, 32)), Image.new("RGB", (32, 30))], 5.0)
    with pytest.raises(ValueError):
        encode_mjpeg_avi(solid_frames([(1, 2, 3)]), 0.0)

    def failing() -> Any:
        yield Image.new("RGB", (32, 32))
        raise RuntimeError("camera unplugged")

    with pytest.raises(RuntimeError):
        write_mjpeg_avi(tmp_path / "x.avi", failing(), 5.0)
    assert list(tmp_path.iterdir()) == []


# ---- synthetic clips: frames ----


@pytest.mark.parametrize(("seed", "duration", "fps", "width", "height"), CLIP_CASES)
def test_sampled_frames_show_exactly_the_labelled_objects(tmp_path: Path, seed: int, duration: float, fps: float,
                                                          width: int, height: int) -> None:
    clip = render_clip(random.Random(seed), duration, fps, width, height)
    sampled = sample_video(write_clip(clip, tmp_path), fps=1.0, min_frames=16)
    sx, sy = sampled.size[0] / clip.width, sampled.size[1] / clip.height
    background = BACKGROUNDS[clip.background]
    present_checks = absent_checks = 0
    for frame, index in zip(sampled.frames, sampled.frame_indices):
        states = object_state_at(clip, index / clip.fps)
        for state in states:
            cx, cy = state["centre"]
            assert close(pixel(frame, cx * sx, cy * sy), state["rgb"]), (index, state)
            present_checks += 1
        shown = {s["id"] for s in states}
        for entry in clip.visible:
            if entry["id"] not in shown:
                cx, cy = object_centre(entry, index)
                assert close(pixel(frame, cx * sx, cy * sy), background), (index, entry["shape"])
                absent_checks += 1
    assert present_checks > 0 and absent_checks > 0  # every case sees objects both on and off screen


def test_every_event_changes_the_picture_on_its_exact_frame(tmp_path: Path) -> None:
    for seed in (5, 6, 7):
        clip = render_clip(random.Random(seed), 15.0, 5.0, 160, 120)
        _, frames = read_all(write_clip(clip, tmp_path))
        assert len(frames) == clip.num_frames == 75
        background = BACKGROUNDS[clip.background]
        for event in clip.events:
            entry = clip.visible[event.object_id]
            before, after = event.start_frame - 1, event.start_frame
            if event.kind == "moves":
                before, after = event.start_frame, event.end_frame
            old_xy, new_xy = object_centre(entry, before), object_centre(entry, after)
            old_rgb = COLOURS[object_colour(entry, before)] if on_screen(entry, before) else background
            new_rgb = COLOURS[object_colour(entry, after)] if on_screen(entry, after) else background
            assert close(pixel(frames[before], *old_xy), old_rgb) and close(pixel(frames[after], *new_xy), new_rgb)
            assert old_rgb != new_rgb or old_xy != new_xy, event  # the frame before differs from the frame at the event
            if event.kind == "moves":  # left the start position, and not there before the move began
                assert close(pixel(frames[after], *old_xy), background)
                assert close(pixel(frames[before], *new_xy), background)


def test_ten_second_clip_samples_sixteen_frames_of_640_tokens(tmp_path: Path) -> None:
    """The paper's worked example: a 10 s clip is raised to 16 frames and each frame gets 640 tokens."""
    width, height = 32 * PATCH, 20 * PATCH  # 896 x 560: exactly 640 token cells, so no resize
    clip = render_clip(random.Random(11), 10.0, 2.0, width, height)
    path = write_clip(clip, tmp_path)
    sampled = sample_video(path)
    assert len(sampled.frames) == 16 and sampled.tokens_per_frame == 640
    assert sampled.size == (width, height) and (width // PATCH) * (height // PATCH) == 640
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height) == (20, width, height) and abs(info.duration_s - 10.0) < 1e-6
    plan = plan_sampling(info.duration_s, info.native_fps, info.num_frames)
    assert plan.frame_indices == sampled.frame_indices and plan.total_tokens == 16 * 640


# ---- synthetic clips: labels ----


def many_clips() -> list[SyntheticClip]:
    """Small clips across the tiny profile's range (8-30 s, 1-10 fps), rendered once for the label tests."""
    rng = random.Random(99)
    clips = []
    for seed in range(24):
        duration, fps = rng.choice([8.0, 10.0, 17.5, 30.0]), rng.choice([1.0, 2.5, 3.0, 7.5, 10.0, 29.97 / 3])
        clips.append(render_clip(random.Random(seed), duration, fps, 160, 120, max_objects=rng.randint(1, 4)))
    return clips


@pytest.fixture(scope="module")
def clips() -> list[SyntheticClip]:
    return many_clips()


def on_grid(seconds: float, fps: float) -> bool:
    return abs(seconds * fps - round(seconds * fps)) < 1e-6


def test_events_are_on_the_frame_grid_sorted_and_spread(clips: list[SyntheticClip]) -> None:
    for clip in clips:
        assert clip.num_frames == round(clip.duration_s * clip.fps)
        events = clip.events
        assert events and {e.kind for e in events} <= set(EVENT_KINDS)
        assert [e.start_frame for e in events] == sorted({e.start_frame for e in events})  # sorted, distinct
        for k, e in enumerate(events):  # event k lies in the k-th of len(events) equal segments
            lo, hi = k * clip.num_frames / len(events), (k + 1) * clip.num_frames / len(events)
            assert lo - 0.5 <= e.start_frame < e.end_frame <= hi + 0.5, (k, e)
            assert e.start_s == e.start_frame / clip.fps and e.end_s == e.end_frame / clip.fps
            assert e.end_frame == e.start_frame + 1 if e.kind != "moves" else e.end_frame >= e.start_frame + 2
        for entry in clip.visible:
            own = [e for e in events if e.object_id == entry["id"]]
            assert own[0].kind == "appears" and own[0].start_frame == entry["first_frame"] > 0
            gone = [e.start_frame for e in own if e.kind == "disappears"]
            assert entry["end_frame"] == (gone[0] if gone else clip.num_frames)
            assert [c["from_frame"] for c in entry["colours"][1:]] == [
                e.start_frame for e in own if e.kind == "changes_colour"]


def test_temporal_grounding_is_exact_and_agrees_with_events(clips: list[SyntheticClip]) -> None:
    for clip in clips:
        assert clip.temporal_grounding
        by_phrase = {e.phrase: e for e in clip.events}
        for g in clip.temporal_grounding:
            assert 0 <= g["start_s"] < g["end_s"] <= clip.duration_s + 1e-9
            assert on_grid(g["start_s"], clip.fps) and on_grid(g["end_s"], clip.fps)
            event = by_phrase[g["query"]]
            assert (g["start_s"], g["end_s"], g["kind"]) == (event.start_s, event.end_s, event.kind)
        queries = [g["query"] for g in clip.temporal_grounding]
        assert len(queries) == len(set(queries))


def test_caption_tells_each_event_in_order(clips: list[SyntheticClip]) -> None:
    for clip in clips:
        sentences = clip.caption.split(". ")
        assert clip.background in sentences[0]
        assert len(sentences) == len(clip.events) + 1
        for event, sentence in zip(clip.events, sentences[1:]):
            assert event.subject in sentence and event.detail in sentence
            assert f"{format_seconds(event.start_s)} s" in sentence
            if event.kind == "moves":
                assert f"to {format_seconds(event.end_s)} s" in sentence


def answers(clip: SyntheticClip) -> dict[str, str]:
    return {item["question"]: item["answer"] for item in clip.qa}


def test_answers_follow_from_the_events(clips: list[SyntheticClip]) -> None:
    order_questions = 0
    for clip in clips:
        qa = answers(clip)
        assert len(qa) == len(clip.qa)
        appears = [e for e in clip.events if e.kind == "appears"]
        assert qa["How many objects appear?"] == str(len(appears)) == str(len(clip.visible))
        assert qa["What colour is the background?"] == clip.background
        for entry in clip.visible:
            shape, own = entry["shape"], [e for e in clip.events if e.object_id == entry["id"]]
            assert qa[f"What colour is the {shape} when it appears?"] == entry["colours"][0]["colour"]
            turns = [e for e in own if e.kind == "changes_colour"]
            if len(turns) == 1:
                assert qa[f"What colour does the {shape} turn?"] == entry["colours"][1]["colour"]
            gone = [e for e in own if e.kind == "disappears"]
            assert qa[f"Does the {shape} disappear?"] == ("yes" if gone else "no")
        for question, answer in qa.items():
            match = re.fullmatch(r"What happens first, (.+) or (.+)\?", question)
            if match:
                a, b = (next(e for e in clip.events if e.phrase == p) for p in match.groups())
                assert answer == min(a, b, key=lambda e: e.start_s).phrase
                order_questions += 1
    assert order_questions > 0


def test_rendering_is_deterministic_per_seed() -> None:
    first, again = (render_clip(random.Random(42), 8.0, 4.0, 160, 120) for _ in range(2))
    assert first == again
    other = render_clip(random.Random(43), 8.0, 4.0, 160, 120)
    assert (other.video, other.caption) != (first.video, first.caption)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1.5, 5.0, 160, 120, 3), "too short for one event"),
        ((10.0, 0.2, 160, 120, 3), "too short for one event"),  # 2 frames only
        ((10.0, 0.0, 160, 120, 3), "fps"),
        ((10.0, -1.0, 160, 120, 3), "fps"),
        ((10.0, 5.0, 32, 120, 3), "too small"),
        ((10.0, 5.0, 160, 40, 3), "too small"),
        ((10.0, 5.0, 160, 60, 4), "lanes"),
        ((10.0, 5.0, 160, 120, 0), "max_objects"),
        ((10.0, 5.0, 160, 120, 5), "max_objects"),
    ],
)
def test_render_clip_rejects_bad_arguments(args: tuple[float, float, int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_clip(random.Random(0), *args)
