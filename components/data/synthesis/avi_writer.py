"""A dependency-free Motion-JPEG AVI writer (Pillow JPEG frames in a RIFF 'AVI ' container), readable by decord.

Layout (AVI 1.0, one video stream):

    RIFF 'AVI '
      LIST 'hdrl'
        'avih'  main header: frame period, frame count, size, AVIF_HASINDEX
        LIST 'strl'
          'strh'  'vids' / 'MJPG', frame rate as dwRate / dwScale (exact for fractional rates such as 29.97)
          'strf'  BITMAPINFOHEADER, compression 'MJPG'
      LIST 'movi'
        '00dc'  one JPEG per frame, padded to an even length
      'idx1'  one entry per frame: '00dc', AVIIF_KEYFRAME, offset from the 'movi' tag, unpadded size

Every frame is a keyframe. The whole file is built in memory, so it suits short clips: an AVI 1.0
RIFF chunk is limited to 4 GiB, and we refuse anything larger rather than write an OpenDML index.
"""

from __future__ import annotations

import io
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

from PIL import Image

AVIF_HASINDEX = 0x10
AVIIF_KEYFRAME = 0x10
MAX_RATE_DENOMINATOR = 1_000_000
MAX_SIDE = 32_767  # rcFrame holds 16-bit signed coordinates
MAX_RIFF_BYTES = 0xFFFF_FFFF


def frame_rate_fraction(fps: float | Fraction) -> Fraction:
    """`fps` as dwRate / dwScale: the closest fraction with a denominator of at most 1,000,000."""
    if isinstance(fps, bool) or not (float(fps) > 0 and math.isfinite(float(fps))):
        raise ValueError(f"fps must be a positive finite number; got {fps!r}")
    rate = Fraction(fps).limit_denominator(MAX_RATE_DENOMINATOR)
    if rate <= 0 or rate.numerator > 0xFFFF_FFFF:
        raise ValueError(f"fps {fps!r} cannot be written as dwRate / dwScale in 32 bits")
    return rate


def jpeg_bytes(image: Image.Image, quality: int = 85) -> bytes:
    """One frame as baseline JPEG (RGB, 4:2:0), the payload of an '00dc' chunk."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return tag + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) % 2 else b"")


def _list(kind: bytes, payload: bytes) -> bytes:
    return _chunk(b"LIST", kind + payload)


def _avih(rate: Fraction, frames: int, width: int, height: int, buffer_size: int) -> bytes:
    micro_per_frame = round(1_000_000 / rate)
    max_bytes_per_sec = math.ceil(buffer_size * rate)
    return struct.pack("<14I", micro_per_frame, min(max_bytes_per_sec, 0xFFFF_FFFF), 0, AVIF_HASINDEX, frames,
                       0, 1, buffer_size, width, height, 0, 0, 0, 0)


def _strh(rate: Fraction, frames: int, width: int, height: int, buffer_size: int) -> bytes:
    return struct.pack("<4s4sIHHIIIIIIIIhhhh", b"vids", b"MJPG", 0, 0, 0, 0, rate.denominator, rate.numerator,
                       0, frames, buffer_size, 0xFFFF_FFFF, 0, 0, 0, width, height)


def _strf(width: int, height: int) -> bytes:
    return struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)


def _check_size(width: int, height: int) -> None:
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(f"frame size must be within 1..{MAX_SIDE} px per side; got {width}x{height}")


def mjpeg_avi_from_jpegs(jpegs: Sequence[bytes], fps: float | Fraction, width: int, height: int) -> bytes:
    """An AVI file from already-encoded JPEG frames, all `width` x `height` (not re-checked per frame)."""
    if not jpegs:
        raise ValueError("an AVI needs at least one frame")
    _check_size(width, height)
    rate = frame_rate_fraction(fps)
    movi_parts: list[bytes] = []
    index: list[bytes] = []
    offset = 4  # idx1 offsets count from the 'movi' tag; the first chunk follows it
    for jpeg in jpegs:
        chunk = _chunk(b"00dc", jpeg)
        index.append(struct.pack("<4sIII", b"00dc", AVIIF_KEYFRAME, offset, len(jpeg)))
        movi_parts.append(chunk)
        offset += len(chunk)
    buffer_size = max(len(j) for j in jpegs) + 8
    strl = _list(b"strl", _chunk(b"strh", _strh(rate, len(jpegs), width, height, buffer_size))
                 + _chunk(b"strf", _strf(width, height)))
    hdrl = _list(b"hdrl", _chunk(b"avih", _avih(rate, len(jpegs), width, height, buffer_size)) + strl)
    body = b"AVI " + hdrl + _list(b"movi", b"".join(movi_parts)) + _chunk(b"idx1", b"".join(index))
    if len(body) > MAX_RIFF_BYTES:
        raise ValueError(f"AVI of {len(body)} bytes exceeds the 4 GiB RIFF limit of AVI 1.0")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def encode_mjpeg_avi(frames: Iterable[Image.Image], fps: float | Fraction, quality: int = 85) -> bytes:
    """Frames (all the same size, any mode Pillow can turn into RGB) as Motion-JPEG AVI bytes."""
    if not 1 <= quality <= 95:
        raise ValueError(f"quality must be in 1..95 (Pillow's JPEG scale); got {quality}")
    frame_rate_fraction(fps)  # fail before encoding anything
    jpegs: list[bytes] = []
    size: tuple[int, int] | None = None
    for number, frame in enumerate(frames):
        if size is None:
            size = frame.size
            _check_size(*size)
        elif frame.size != size:
            raise ValueError(f"frame {number} is {frame.size[0]}x{frame.size[1]}; frame 0 was {size[0]}x{size[1]}")
        jpegs.append(jpeg_bytes(frame, quality))
    if size is None:
        raise ValueError("an AVI needs at least one frame")
    return mjpeg_avi_from_jpegs(jpegs, fps, *size)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (no partial file is seen)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_mjpeg_avi(path: Path, frames: Iterable[Image.Image], fps: float | Fraction, quality: int = 85) -> None:
    """`encode_mjpeg_avi` written atomically to `path` (temporary file in the same folder, then rename)."""
    write_bytes_atomic(path, encode_mjpeg_avi(frames, fps, quality))
