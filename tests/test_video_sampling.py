"""Dynamic frame-resolution sampling (paper's worked examples), frame sizes per budget, and decord on real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from components.common.video import (
    SamplingPlan,
    VideoDecodeError,
    frame_size_for_budget,
    plan_sampling,
    probe_video,
    read_frames,
    sample_video,
    sample_video_rates,
    timestamp_prefix,
)

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real test data not found at {REAL}")


def plan_for(seconds: float, native_fps: float = 30.0, fps: float = 1.0) -> SamplingPlan:
    return plan_sampling(seconds, native_fps, round(seconds * native_fps), fps=fps)


def check_indices(plan: SamplingPlan, num_frames: int, native_fps: float) -> None:
    idx = plan.frame_indices
    assert all(isinstance(i, int) for i in idx)
    assert all(a < b for a, b in zip(idx, idx[1:]))
    assert 0 <= idx[0] and idx[-1] < num_frames
    assert plan.timestamps == tuple(round(i / native_fps, 1) for i in idx)


@pytest.mark.parametrize(
    ("seconds", "frames", "tokens"),
    [
        (10, 16, 640),  # short clip: raised to the 16-frame minimum
        (100, 100, 640),  # 100 x 640 = 64,000 fits
        (150, 150, 512),  # 150 x 640 = 96,000 too many; 150 x 512 = 76,800 fits
        (600, 600, 128),  # 10 min: 600 x 160 = 96,000 too many; 600 x 128 = 76,800
        (1200, 640, 128),  # 20 min: even 128 is too many, resampled to 81,920 / 128 = 640 frames
        (3 * 3600, 640, 128),  # 3 h: capped the same way
    ],
)
def test_paper_worked_examples(seconds: float, frames: int, tokens: int) -> None:
    plan = plan_for(seconds)
    assert len(plan.frame_indices) == frames
    assert plan.tokens_per_frame == tokens
    assert plan.total_tokens == frames * tokens <= 81_920
    check_indices(plan, round(seconds * 30), 30.0)


def test_ten_minute_clip_is_sampled_at_one_fps() -> None:
    plan = plan_for(600)
    gaps = np.diff(plan.timestamps)
    assert np.allclose(gaps, 1.0, atol=0.05)
    assert plan.timestamps[0] == 0.5  # centre of the first one-second slice


def test_twenty_minute_clip_spreads_640_frames_over_the_whole_clip() -> None:
    plan = plan_for(1200)
    assert plan.timestamps[0] < 1.0 and plan.timestamps[-1] > 1198.0
    assert np.allclose(np.diff(plan.timestamps), 1200 / 640, atol=0.1)


def test_clip_with_fewer_frames_than_the_minimum_uses_every_frame() -> None:
    plan = plan_sampling(0.4, 25.0, 10)
    assert plan.frame_indices == tuple(range(10))
    assert plan.tokens_per_frame == 640
    check_indices(plan, 10, 25.0)


def test_single_frame_video() -> None:
    plan = plan_sampling(0.04, 25.0, 1)
    assert plan.frame_indices == (0,) and plan.timestamps == (0.0,)


def test_two_fps_for_motion_doubles_the_frames() -> None:
    plan = plan_for(100, fps=2.0)
    assert len(plan.frame_indices) == 200
    assert plan.tokens_per_frame == 384  # 200 x 512 = 102,400 too many; 200 x 384 = 76,800
    assert np.allclose(np.diff(plan.timestamps), 0.5, atol=0.05)
    check_indices(plan, 3000, 30.0)


def test_five_fps_is_the_ceiling() -> None:
    assert len(plan_for(10, fps=5.0).frame_indices) == 50


@pytest.mark.parametrize("fps", [0.0, -1.0, 5.01, 30.0])
def test_fps_outside_range_is_rejected_by_name(fps: float) -> None:
    with pytest.raises(ValueError, match="fps"):
        plan_for(10, fps=fps)


def test_empty_video_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_frames"):
        plan_sampling(1.0, 30.0, 0)


def test_custom_budgets_and_limit() -> None:
    plan = plan_sampling(100, 30.0, 3000, budgets=(256, 64), max_tokens=4096)
    assert plan.tokens_per_frame == 64 and len(plan.frame_indices) == 64


@pytest.mark.parametrize("tokens", [640, 512, 384, 256, 160, 128])
@pytest.mark.parametrize(
    ("width", "height"), [(426, 240), (1920, 1080), (1080, 1920), (1280, 720), (333, 777), (4000, 3000), (29, 57)]
)
def test_frame_size_multiples_of_28_within_budget(width: int, height: int, tokens: int) -> None:
    w, h = frame_size_for_budget(width, height, tokens)
    assert w % 28 == 0 and h % 28 == 0 and w >= 28 and h >= 28
    assert (w // 28) * (h // 28) <= tokens
    assert w <= max(28, round(width / 28) * 28) and h <= max(28, round(height / 28) * 28)  # never upscaled
    assert abs(np.log((w / h) / (width / height))) < 0.25  # aspect approximately kept


def test_frame_size_small_clip_keeps_native_size_rounded() -> None:
    assert frame_size_for_budget(426, 240, 640) == (420, 252)  # 15 x 9 = 135 cells, under budget


def test_frame_size_large_frame_fills_the_budget() -> None:
    w, h = frame_size_for_budget(1920, 1080, 640)
    cells = (w // 28) * (h // 28)
    assert 600 <= cells <= 640
    assert abs(w / h - 16 / 9) < 0.1


def test_frame_size_is_as_large_as_possible() -> None:
    # 6 x 10 = 60 cells fits 64 even though 6 x 10.65 rounds to 11; the smaller 5 x 9 would waste budget
    assert frame_size_for_budget(426 * 4, 240 * 4, 64) == (280, 168)


@pytest.mark.parametrize(("width", "height"), [(1, 1000), (1000, 1), (1, 100_000), (3, 5), (1, 1)])
def test_frame_size_extreme_shapes(width: int, height: int) -> None:
    for tokens in (640, 128, 1):
        w, h = frame_size_for_budget(width, height, tokens)
        assert w % 28 == 0 and h % 28 == 0 and w >= 28 and h >= 28
        assert (w // 28) * (h // 28) <= tokens
    assert frame_size_for_budget(1, 1000, 640) == (28, 1008)
    assert frame_size_for_budget(1000, 1, 640) == (1008, 28)


def test_timestamp_prefix() -> None:
    assert timestamp_prefix(12.0) == "[12.0 second]"
    assert timestamp_prefix(0.5) == "[0.5 second]"
    assert timestamp_prefix(3) == "[3.0 second]"


@needs_real
def test_probe_pancake_matches_decord() -> None:
    import decord

    reader = decord.VideoReader(str(REAL / "pancake.mkv"))
    info = probe_video(REAL / "pancake.mkv")
    assert info.num_frames == len(reader) == 310
    assert info.native_fps == pytest.approx(reader.get_avg_fps()) == pytest.approx(30.0)
    assert info.duration_s == pytest.approx(310 / 30.0)
    assert (info.width, info.height) == (426, 240)


@needs_real
def test_sample_pancake() -> None:
    video = sample_video(REAL / "pancake.mkv")
    assert len(video.frames) == 16 and video.tokens_per_frame == 640
    assert video.size == frame_size_for_budget(426, 240, 640) == (420, 252)
    for frame in video.frames:
        assert frame.shape == (252, 420, 3) and frame.dtype == np.uint8
    assert all(a < b for a, b in zip(video.frame_indices, video.frame_indices[1:]))
    assert video.frame_indices[-1] < 310
    assert video.timestamps == tuple(round(i / 30.0, 1) for i in video.frame_indices)
    assert len({f.tobytes() for f in video.frames}) == 16  # real, distinct frames
    assert np.mean([f.std() for f in video.frames]) > 10.0


@needs_real
def test_several_rates_in_one_open_match_one_rate_each() -> None:
    both = sample_video_rates(REAL / "pancake.mkv", (1.0, 2.0, 1.0), max_tokens=4096)
    assert list(both) == [1.0, 2.0]
    for fps, video in both.items():
        alone = sample_video(REAL / "pancake.mkv", fps=fps, max_tokens=4096)
        assert video.frame_indices == alone.frame_indices and video.size == alone.size
        assert all(np.array_equal(a, b) for a, b in zip(video.frames, alone.frames))
        assert len(video.frames) * video.tokens_per_frame <= 4096
    assert len(both[2.0].frames) == 20 > len(both[1.0].frames) == 16  # 10.3 s: 2 fps gives 20 frames
    assert both[2.0].tokens_per_frame < both[1.0].tokens_per_frame  # more frames, fewer tokens each


@needs_real
def test_read_frames_matches_sample_video() -> None:
    info = probe_video(REAL / "pancake.mkv")
    plan = plan_sampling(info.duration_s, info.native_fps, info.num_frames, fps=2.0)
    frames = read_frames(REAL / "pancake.mkv", plan, 140, 84)
    assert len(frames) == 20 and all(f.shape == (84, 140, 3) for f in frames)


@needs_real
def test_corrupted_video_raises_with_reason() -> None:
    with pytest.raises(VideoDecodeError) as err:
        sample_video(REAL / "corrupted.mp4")
    assert err.value.reason == "video_decode_failed"


def test_missing_and_non_video_files_raise_with_reason(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError) as err:
        probe_video(tmp_path / "absent.mp4")
    assert err.value.reason == "video_missing"
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoDecodeError) as err:
        sample_video(junk)
    assert err.value.reason == "video_unreadable"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError) as err:
        sample_video(empty)
    assert err.value.reason == "video_unreadable"


@needs_real
def test_truncated_real_video_never_crashes(tmp_path: Path) -> None:
    cut = tmp_path / "cut.mkv"
    shutil.copyfile(REAL / "pancake.mkv", cut)
    cut.write_bytes(cut.read_bytes()[: 60_000])
    try:
        video = sample_video(cut)
    except VideoDecodeError as exc:
        assert exc.reason.startswith("video_")
    else:
        assert video.frames and all(f.shape == (*video.size[::-1], 3) for f in video.frames)
