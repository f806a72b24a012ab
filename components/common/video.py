"""Video decoding with decord and the paper's dynamic frame-resolution sampling (frames, sizes, timestamps).

Sampling rule (Seed1.5-VL): sample at `fps` (1 by default, at most 5), at least `min_frames` frames but
never more than the video has; try per-frame token budgets in order (640, 512, ..., 128) and keep the
first with frames x budget <= `max_tokens`; if even the smallest is too many, resample uniformly down
to `max_tokens // smallest` frames. Frame i of n is the frame at the centre of the i-th of n equal
slices of the frame range: `floor((i + 0.5) * num_frames / n)`, uniform in time at a constant frame
rate and strictly increasing because n <= num_frames. One token is a 28x28 pixel area (14 px patches,
2x2 merge), and each frame is shown to the model after a timestamp prefix such as `[12.0 second]`.

Dynamic frame rate per task: `sample_video_rates` samples one video at several rates in one open
(e.g. 1 fps for captions, 2-5 fps for temporal grounding), each rate with its own plan under the same
`max_tokens`, so a faster rate gets more frames at fewer tokens each, never more tokens in all. The
frames the plans share are decoded once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

MAX_FPS = 5.0
DEFAULT_BUDGETS: tuple[int, ...] = (640, 512, 384, 256, 160, 128)
DEFAULT_MAX_TOKENS = 81_920
PATCH = 28  # pixels per side of one visual token after the 2x2 merge of 14 px patches

T = TypeVar("T")


class VideoDecodeError(Exception):
    """A video that cannot be used; `reason` is the drop reason counted in the stage stats."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class SamplingPlan:
    frame_indices: tuple[int, ...]
    timestamps: tuple[float, ...]  # seconds, index / native_fps rounded to 0.1
    tokens_per_frame: int

    @property
    def total_tokens(self) -> int:
        return len(self.frame_indices) * self.tokens_per_frame


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    native_fps: float
    duration_s: float
    width: int
    height: int


@dataclass(frozen=True)
class SampledVideo:
    frames: list[np.ndarray]  # each (height, width, 3) uint8
    timestamps: tuple[float, ...]
    frame_indices: tuple[int, ...]
    tokens_per_frame: int
    size: tuple[int, int]  # (width, height), multiples of 28


def _check_plan_args(duration_s: float, native_fps: float, num_frames: int, fps: float, min_frames: int,
                     budgets: tuple[int, ...], max_tokens: int) -> None:
    if not 0 < fps <= MAX_FPS:
        raise ValueError(f"fps must be in (0, {MAX_FPS:g}] (the paper samples 1 fps, up to 5 for motion); got {fps}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1; got {num_frames}")
    if not (native_fps > 0 and math.isfinite(native_fps)):
        raise ValueError(f"native_fps must be a positive finite number; got {native_fps}")
    if not (duration_s >= 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration_s must be a non-negative finite number; got {duration_s}")
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1; got {min_frames}")
    if not budgets or min(budgets) < 1:
        raise ValueError(f"budgets must be a non-empty tuple of positive token counts; got {budgets}")
    if max_tokens < min(budgets):
        raise ValueError(f"max_tokens ({max_tokens}) must be at least the smallest budget ({min(budgets)})")


def uniform_indices(num_frames: int, count: int) -> tuple[int, ...]:
    """Centre frame of each of `count` equal slices of [0, num_frames); needs 1 <= count <= num_frames."""
    return tuple(int((i + 0.5) * num_frames / count) for i in range(count))


def plan_sampling(duration_s: float, native_fps: float, num_frames: int, fps: float = 1.0, min_frames: int = 16,
                  budgets: tuple[int, ...] = DEFAULT_BUDGETS, max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingPlan:
    """Frames to decode and tokens per frame for one video (see the module docstring for the rule)."""
    _check_plan_args(duration_s, native_fps, num_frames, fps, min_frames, budgets, max_tokens)
    count = math.floor(duration_s * fps + 1e-6)  # one frame per full 1/fps seconds
    count = min(max(count, min_frames), num_frames)
    tokens = next((b for b in budgets if count * b <= max_tokens), None)
    if tokens is None:
        tokens = min(budgets)
        count = max_tokens // tokens
    indices = uniform_indices(num_frames, count)
    timestamps = tuple(round(i / native_fps, 1) for i in indices)
    return SamplingPlan(frame_indices=indices, timestamps=timestamps, tokens_per_frame=tokens)


def frame_size_for_budget(width: int, height: int, tokens: int, patch: int = PATCH) -> tuple[int, int]:
    """(width, height) in multiples of `patch`, aspect kept, at most `tokens` cells, never above native size."""
    if width < 1 or height < 1 or tokens < 1 or patch < 1:
        raise ValueError(f"width, height, tokens and patch must be >= 1; got {width}, {height}, {tokens}, {patch}")
    short_px, long_px = sorted((width, height))
    short0 = max(1, round(short_px / patch))  # native size in cells, rounded (28 px minimum)
    long0 = max(1, round(long_px / patch))
    if short0 * long0 <= tokens:
        best = (short0, long0)
    else:
        ratio = long_px / short_px
        best = (0, 0)
        for s in range(1, min(short0, tokens) + 1):
            for long in {math.floor(s * ratio), math.ceil(s * ratio)}:
                long = min(max(long, s), long0)
                if s * long <= tokens and s * long > best[0] * best[1]:
                    best = (s, long)
        if best == (0, 0):  # aspect ratio too extreme for the budget even one cell wide: cut the long side
            best = (1, min(long0, tokens))
    short_cells, long_cells = best
    if width <= height:
        return short_cells * patch, long_cells * patch
    return long_cells * patch, short_cells * patch


def timestamp_prefix(seconds: float) -> str:
    return f"[{seconds:.1f} second]"


def _guarded(fn: Callable[[], T], timeout_s: float) -> T:
    """Runs `fn` in a daemon thread so a stuck decode surfaces as VideoDecodeError instead of a hang."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name="video-decode", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise VideoDecodeError("video_decode_timeout", f"no result after {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _open_reader(path: str | Path) -> Any:
    if not Path(path).is_file():
        raise VideoDecodeError("video_missing", str(path))
    import decord

    decord.bridge.set_bridge("native")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception as exc:  # decord raises RuntimeError / DECORDError for unreadable containers
        raise VideoDecodeError("video_unreadable", f"{path}: {str(exc).splitlines()[0]}") from exc


def _info_of(reader: Any, path: str | Path) -> VideoInfo:
    num_frames = len(reader)
    if num_frames < 1:
        raise VideoDecodeError("video_empty", str(path))
    native_fps = float(reader.get_avg_fps())
    if not (native_fps > 0 and math.isfinite(native_fps)):
        raise VideoDecodeError("video_bad_fps", f"{path}: {native_fps}")
    try:
        height, width = reader[0].shape[:2]
    except Exception as exc:
        raise VideoDecodeError("video_unreadable", f"{path}: first frame: {str(exc).splitlines()[0]}") from exc
    return VideoInfo(num_frames, native_fps, num_frames / native_fps, int(width), int(height))


def _decode(reader: Any, path: str | Path, indices: tuple[int, ...], width: int, height: int) -> list[np.ndarray]:
    return [_resize(frame, width, height) for frame in _native_frames(reader, path, indices)]


def _native_frames(reader: Any, path: str | Path, indices: tuple[int, ...] | list[int]) -> np.ndarray:
    try:
        return reader.get_batch(list(indices)).asnumpy()  # (frames, H, W, 3) uint8
    except Exception as exc:
        raise VideoDecodeError("video_decode_failed", f"{path}: {str(exc).splitlines()[0]}") from exc


def _resize(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    if frame.shape[1] == width and frame.shape[0] == height:
        return np.ascontiguousarray(frame, dtype=np.uint8)
    resized = Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def probe_video(path: str | Path, timeout_s: float = 60.0) -> VideoInfo:
    """Frame count, native fps, duration and size; raises VideoDecodeError with a reason."""
    return _guarded(lambda: _info_of(_open_reader(path), path), timeout_s)


def read_frames(path: str | Path, plan: SamplingPlan, width: int, height: int,
                timeout_s: float = 120.0) -> list[np.ndarray]:
    """The plan's frames as (height, width, 3) uint8 arrays, bilinear-resized; raises VideoDecodeError."""
    return _guarded(lambda: _decode(_open_reader(path), path, plan.frame_indices, width, height), timeout_s)


def sample_video(path: str | Path, fps: float = 1.0, min_frames: int = 16, budgets: tuple[int, ...] = DEFAULT_BUDGETS,
                 max_tokens: int = DEFAULT_MAX_TOKENS, timeout_s: float = 120.0) -> SampledVideo:
    """Probe, plan, decode and resize one video in a single open; raises VideoDecodeError with a reason."""
    return sample_video_rates(path, (fps,), min_frames, budgets, max_tokens, timeout_s)[fps]


def sample_video_rates(path: str | Path, rates: tuple[float, ...] | list[float], min_frames: int = 16,
                       budgets: tuple[int, ...] = DEFAULT_BUDGETS, max_tokens: int = DEFAULT_MAX_TOKENS,
                       timeout_s: float = 120.0) -> dict[float, SampledVideo]:
    """`sample_video` at each of several frame rates, in one open: {rate: SampledVideo}. Each rate has its
    own plan within `max_tokens`; the union of their frames is decoded once, then resized per plan."""
    rates = tuple(dict.fromkeys(rates))
    if not rates:
        raise ValueError("rates must name at least one frame rate")

    def run() -> dict[float, SampledVideo]:
        reader = _open_reader(path)
        info = _info_of(reader, path)
        plans = {fps: plan_sampling(info.duration_s, info.native_fps, info.num_frames, fps, min_frames, budgets,
                                    max_tokens) for fps in rates}
        union = sorted({i for plan in plans.values() for i in plan.frame_indices})
        native = dict(zip(union, _native_frames(reader, path, union)))
        out = {}
        for fps, plan in plans.items():
            width, height = frame_size_for_budget(info.width, info.height, plan.tokens_per_frame)
            frames = [_resize(native[i], width, height) for i in plan.frame_indices]
            out[fps] = SampledVideo(frames, plan.timestamps, plan.frame_indices, plan.tokens_per_frame, (width, height))
        return out

    return _guarded(run, timeout_s)
