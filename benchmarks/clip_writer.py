"""Writing the synthetic video clips: our Motion-JPEG AVI writer against PyAV (FFmpeg), on the same frames.

    .venv/bin/python benchmarks/clip_writer.py [--clips 8] [--seed 0] [--rounds 5] [--mjpeg-q 2]
                                               [--crf 18] [--mpeg4-q 2]

Inputs: `--clips` clips as `video_samples.clip_rows` draws them (`render_clip` with `data.video`'s
defaults: 8-30 s, 2/5/10 fps, 320x240, up to 3 objects, seeded per index), and their pictures as the
synthesis draws them (`drawn_frames`: each distinct picture once, and which one each frame shows),
all in memory before any timing.

Writers, each from those pictures to a file written atomically (`write_bytes_atomic`):
  ours (AVI writer)   the pipeline's path: every distinct picture to JPEG (Pillow, q90) once, our RIFF
                      writer (`mjpeg_avi_from_jpegs`); asserted byte-identical to `render_clip`'s video.
                      The baseline of every ratio.
  PyAV mux, MJPEG AVI the same JPEGs as packets into FFmpeg's AVI muxer (the container only)
  PyAV MJPEG AVI      FFmpeg's MJPEG encoder on every frame (yuvj420p, fixed quantiser `--mjpeg-q`)
  PyAV H.264 MP4      libx264 (yuv420p, `--crf`, preset medium, FFmpeg's defaults otherwise)
  PyAV MPEG-4 MP4     FFmpeg's MPEG-4 part 2 encoder (yuv420p, fixed quantiser `--mpeg4-q`)
After an untimed warm-up of each writer and its decode on one clip, each writer runs `--rounds` times
over all clips, interleaved with the others; the best round counts.

Measured per writer: write and decode time per clip as CPU ms of this process (all threads; a busy
shared machine disturbs it far less than wall time); kB per clip; the decode is the project's
(`sample_video_rates` at the pipeline's task rates, 1 and 2 fps, in this process: the child process
the step adds costs every format the same). Whether the decoded frames are what was drawn: mean and
99.9th-percentile absolute error (every frame decoded by decord against the drawn RGB); the test
suite's check (3x3 median at every on-screen object's centre and every off-screen one's place within
40 per channel of the drawn colour, tests/test_video_synthesis.py) on every frame; whether the frames
the pipeline samples, read by seeking as `sample_video_rates` reads them, are bit-identical to the
same frames of an in-order decode (inter-coded formats decode them from the previous keyframe); and
whether the probe (frame count, fps, size), the sampled frame indices and the `[t second]` timestamps
are identical to ours. For scale, the step's other per-clip work (wall time): `render_clip` (with the
pictures drawn again here) and `video_samples.sample` (the decode in a forkserver child) on our files,
and the kB of the samples' JPEG frames (`frame_fields`, once per rate as the step encodes them).
Needs PyAV (`pip install av==18.1.0`; not a project dependency). Prints a table and records it in
benchmarks/results/clip_writer.json.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's `components`, not an installed one

from results_file import record

try:
    import av
except ImportError:
    raise SystemExit("benchmarks/clip_writer.py compares against PyAV: pip install av==18.1.0 -c constraints.txt")
import decord
import numpy as np
import PIL
from PIL import Image

from components.common.video import probe_video, sample_video_rates
from components.data.config import VIDEO_TASKS, VideoConfig
from components.data.synthesis.avi_writer import frame_rate_fraction, jpeg_bytes, mjpeg_avi_from_jpegs, \
    write_bytes_atomic
from components.data.synthesis.video import JPEG_QUALITY, SyntheticClip, drawn_frames, object_centre, \
    object_state_at, render_clip
from components.data.synthetic_crawl import BACKGROUNDS
from components.data.video_samples import frame_fields, sample

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "clip_writer.json"
TOLERANCE = 40  # per channel, as tests/test_video_synthesis.py checks decoded clips
BASELINE = "ours (AVI writer)"


@dataclass
class Clip:
    clip: SyntheticClip
    pictures: list[Image.Image]  # distinct pictures, as drawn
    shown: list[int]  # per frame, the picture it shows
    arrays: list[np.ndarray]  # the pictures as (height, width, 3) uint8


def make_clips(count: int, seed: int, cfg: VideoConfig) -> list[Clip]:
    clips = []
    for index in range(count):
        rng = random.Random(f"{seed}-video-{index}")  # as video_samples.clip_rows
        clip = render_clip(rng, rng.uniform(cfg.min_duration_s, cfg.max_duration_s), rng.choice(cfg.clip_fps),
                           cfg.clip_width, cfg.clip_height, cfg.max_objects)
        pictures, shown = drawn_frames(clip.visible, clip.num_frames, clip.width, clip.height, clip.background)
        clips.append(Clip(clip, pictures, shown, [np.asarray(p.convert("RGB")) for p in pictures]))
    return clips


def ours(c: Clip) -> tuple[bytes, str]:
    jpegs = [jpeg_bytes(p, JPEG_QUALITY) for p in c.pictures]
    return mjpeg_avi_from_jpegs([jpegs[i] for i in c.shown], c.clip.fps, c.clip.width, c.clip.height), ".avi"


def pyav_mux(c: Clip) -> tuple[bytes, str]:
    jpegs = [jpeg_bytes(p, JPEG_QUALITY) for p in c.pictures]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=frame_rate_fraction(c.clip.fps))
        stream.width, stream.height, stream.pix_fmt = c.clip.width, c.clip.height, "yuvj420p"
        stream.time_base = 1 / frame_rate_fraction(c.clip.fps)
        for number, picture in enumerate(c.shown):
            packet = av.Packet(jpegs[picture])
            packet.stream, packet.pts, packet.dts, packet.is_keyframe = stream, number, number, True
            packet.time_base = stream.time_base
            container.mux(packet)
    return buffer.getvalue(), ".avi"


def pyav_encode(codec: str, fmt: str, pix_fmt: str, options: dict[str, str]) -> Callable[[Clip], tuple[bytes, str]]:
    def write(c: Clip) -> tuple[bytes, str]:
        buffer = io.BytesIO()
        with av.open(buffer, "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=frame_rate_fraction(c.clip.fps), options=options)
            stream.width, stream.height, stream.pix_fmt = c.clip.width, c.clip.height, pix_fmt
            frames = [av.VideoFrame.from_ndarray(a, format="rgb24") for a in c.arrays]
            for frame_number, picture in enumerate(c.shown):
                frame = frames[picture]
                frame.pts = frame_number
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return buffer.getvalue(), "." + fmt

    return write


def fixed_q(q: int) -> dict[str, str]:
    """A fixed quantiser (FFmpeg's -q:v) as codec options; PyAV's `CodecContext.qscale` alone has no effect."""
    return {"qmin": str(q), "qmax": str(q)}


def fidelity(path: Path, c: Clip, sampled_indices: list[int]) -> dict[str, Any]:
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    decoded = reader.get_batch(list(range(len(reader)))).asnumpy()  # (frames, H, W, 3), in order
    if decoded.shape[0] != len(c.shown):
        return {"frames_decoded": int(decoded.shape[0]), "mean_abs_error": None, "p999_abs_error": None,
                "centre_checks_failed": None}
    # the pipeline's access: a fresh reader seeks to the sampled frames only (inter-coded files decode from a keyframe)
    seeked = decord.VideoReader(str(path), ctx=decord.cpu(0)).get_batch(sampled_indices).asnumpy()
    errors = np.concatenate([np.abs(decoded[f].astype(np.int16) - c.arrays[p]).ravel()
                             for f, p in enumerate(c.shown)])
    background = BACKGROUNDS[c.clip.background]
    failed = checks = 0
    for index, frame in enumerate(decoded):
        states = {s["id"]: s for s in object_state_at(c.clip, index / c.clip.fps)}
        for entry in c.clip.visible:
            state = states.get(entry["id"])
            x, y = state["centre"] if state else object_centre(entry, index)
            expected = state["rgb"] if state else background
            patch = frame[max(0, y - 1): y + 2, max(0, x - 1): x + 2].reshape(-1, 3)
            checks += 1
            failed += int(np.abs(np.median(patch, axis=0) - np.array(expected)).max() > TOLERANCE)
    return {"frames_decoded": int(decoded.shape[0]),
            "seeked_equal_sequential": bool(np.array_equal(seeked, decoded[sampled_indices])),
            "mean_abs_error": float(errors.mean()),
            "p999_abs_error": float(np.percentile(errors, 99.9)), "centre_checks_failed": failed,
            "centre_checks": checks}


def sampled(path: Path, cfg: VideoConfig, rates: tuple[float, ...]) -> tuple[Any, ...]:
    """What the pipeline takes from a file: the probe and, per rate, frame indices, timestamps, tokens, size."""
    info = probe_video(path)
    by_rate = sample_video_rates(path, rates, cfg.min_frames, tuple(cfg.budgets), cfg.max_tokens)
    return ((info.num_frames, round(info.native_fps, 6), info.width, info.height),
            tuple((r, s.frame_indices, s.timestamps, s.tokens_per_frame, s.size) for r, s in by_rate.items()))


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n| writer | write CPU ms/clip | x ours | kB/clip | x ours | decode CPU ms/clip | x ours | mean abs err | "
          f"p99.9 err | centre checks failed | seeked = in order | same probe, indices, timestamps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        err = f"{r['mean_abs_error']:.2f} | {r['p999_abs_error']:.0f}" if r["frames_decoded_ok"] else "- | -"
        failed = f"{r['centre_checks_failed']} / {r['centre_checks']}" if r["frames_decoded_ok"] else "frames lost"
        print(f"| {r['writer']} | {r['write_ms_per_clip']:.1f} | {r['write_ms_ratio']:.2f} | {r['kb_per_clip']:.1f} | "
              f"{r['kb_ratio']:.2f} | {r['decode_ms_per_clip']:.1f} | {r['decode_ms_ratio']:.2f} | {err} | {failed} | "
              f"{'yes' if r['seeked_equal_sequential'] else 'no'} | "
              f"{'yes' if r['same_probe_indices_timestamps'] else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mjpeg-q", type=int, default=2, help="FFmpeg MJPEG qscale (1 best .. 31)")
    parser.add_argument("--crf", type=int, default=18, help="libx264 constant rate factor")
    parser.add_argument("--mpeg4-q", type=int, default=2, help="FFmpeg MPEG-4 qscale (1 best .. 31)")
    args = parser.parse_args()
    cfg = VideoConfig()
    rates = tuple(dict.fromkeys(cfg.fps_for(task) for task in VIDEO_TASKS))
    writers: dict[str, Callable[[Clip], tuple[bytes, str]]] = {
        BASELINE: ours,
        "PyAV mux, MJPEG AVI": pyav_mux,
        "PyAV MJPEG AVI": pyav_encode("mjpeg", "avi", "yuvj420p", fixed_q(args.mjpeg_q)),
        "PyAV H.264 MP4": pyav_encode("libx264", "mp4", "yuv420p", {"crf": str(args.crf), "preset": "medium"}),
        "PyAV MPEG-4 MP4": pyav_encode("mpeg4", "mp4", "yuv420p", fixed_q(args.mpeg4_q)),
    }
    started = time.perf_counter()
    clips = make_clips(args.clips, args.seed, cfg)
    render_ms = (time.perf_counter() - started) / len(clips) * 1e3  # render_clip (draw + our writer), drawn again
    for c in clips:
        assert ours(c)[0] == c.clip.video, "the benchmark's frames are not the synthesis's"
    frames = sum(len(c.shown) for c in clips)
    print(f"{len(clips)} clips, {frames} frames ({frames / len(clips):.0f} a clip), "
          f"{sum(len(c.pictures) for c in clips) / frames:.1%} of them distinct pictures; "
          f"{cfg.clip_width}x{cfg.clip_height}, decoded at {rates} fps")
    write_s = {name: float("inf") for name in writers}
    decode_s = {name: float("inf") for name in writers}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths: dict[str, list[Path]] = {}
        for number, write in enumerate(writers.values()):  # warm-up, not timed: first opens load codecs
            data, suffix = write(clips[0])
            write_bytes_atomic(folder / f"warm{number}{suffix}", data)
            sample_video_rates(folder / f"warm{number}{suffix}", rates, cfg.min_frames, tuple(cfg.budgets),
                               cfg.max_tokens)
        for _ in range(args.rounds):
            for number, (name, write) in enumerate(writers.items()):
                paths[name] = []
                started = time.process_time()
                for index, c in enumerate(clips):
                    data, suffix = write(c)
                    path = folder / f"w{number}-{index}{suffix}"
                    write_bytes_atomic(path, data)
                    paths[name].append(path)
                write_s[name] = min(write_s[name], time.process_time() - started)
            for name in writers:
                started = time.process_time()
                for path in paths[name]:
                    sample_video_rates(path, rates, cfg.min_frames, tuple(cfg.budgets), cfg.max_tokens)
                decode_s[name] = min(decode_s[name], time.process_time() - started)
        started = time.perf_counter()
        by_task = [sample(path, cfg) for path in paths[BASELINE]]  # the step's decode: a forkserver child per clip
        step_decode_ms = (time.perf_counter() - started) / len(clips) * 1e3
        frames_kb = sum(len(image) for videos in by_task for video in {id(v): v for v in videos.values()}.values()
                        for image in frame_fields(video, cfg)["images"]) / len(clips) / 1e3
        expected = [sampled(p, cfg, rates) for p in paths[BASELINE]]
        union = [sorted({i for _, indices, *_ in plans for i in indices}) for _, plans in expected]
        rows = []
        for name in writers:
            checks = [fidelity(p, c, u) for p, c, u in zip(paths[name], clips, union)]
            complete = all(f["mean_abs_error"] is not None for f in checks)
            row = {"writer": name, "write_ms_per_clip": round(write_s[name] / len(clips) * 1e3, 1),
                   "kb_per_clip": round(sum(p.stat().st_size for p in paths[name]) / len(clips) / 1e3, 1),
                   "decode_ms_per_clip": round(decode_s[name] / len(clips) * 1e3, 1),
                   "frames_decoded_ok": complete,
                   "mean_abs_error": round(float(np.mean([f["mean_abs_error"] for f in checks])), 3)
                   if complete else None,
                   "p999_abs_error": max(f["p999_abs_error"] for f in checks) if complete else None,
                   "centre_checks_failed": sum(f["centre_checks_failed"] for f in checks) if complete else None,
                   "centre_checks": sum(f.get("centre_checks", 0) for f in checks),
                   "seeked_equal_sequential": complete and all(f["seeked_equal_sequential"] for f in checks),
                   "same_probe_indices_timestamps": [sampled(p, cfg, rates) for p in paths[name]] == expected}
            rows.append(row)
    base = rows[0]
    for row in rows:
        for key in ("write_ms_per_clip", "kb_per_clip", "decode_ms_per_clip"):
            row[key.replace("_per_clip", "_ratio")] = round(row[key] / base[key], 2)
    print_table(rows)
    print(f"\nfor scale, wall time per clip in the step: render_clip + drawing again {render_ms:.0f} ms, "
          f"video_samples.sample (child process, ours) {step_decode_ms:.0f} ms; "
          f"the samples' JPEG frames (once per rate) {frames_kb:.0f} kB per clip")
    record(RESULTS, {"render_and_draw_ms_per_clip": round(render_ms, 1),
                     "step_sample_ms_per_clip": round(step_decode_ms, 1),
                     "sample_frames_kb_per_clip": round(frames_kb, 1), "clips": args.clips, "seed": args.seed,
                     "rounds": args.rounds, "frames": frames,
                     "size": f"{cfg.clip_width}x{cfg.clip_height}", "decode_rates": list(rates),
                     "jpeg_quality": JPEG_QUALITY, "mjpeg_qscale": args.mjpeg_q, "x264_crf": args.crf,
                     "mpeg4_qscale": args.mpeg4_q, "av": av.__version__, "decord": decord.__version__,
                     "pillow": PIL.__version__, "libavcodec": ".".join(map(str, av.library_versions["libavcodec"]))},
           rows)


if __name__ == "__main__":
    main()
