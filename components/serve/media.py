"""The chat endpoint's media layer: turns the `image_url` / `video_url` of a message part (a base64 data URL,
or an http(s) URL from an allow-listed host) into RGB PIL images or sampled video frames, or a MediaError.

Safety rules, in the order they apply:
- Only `data:` URLs and, when `remote_fetch` is on, http(s) URLs whose host is in `allowed_hosts` are read;
  redirects are re-checked against the allow-list, and no other scheme (file:, ftp:, bare paths) is ever opened.
- Fetches stop after `max_fetch_bytes` (413) and `fetch_timeout_s`; data URLs are bounded by the request-body
  limit, and a decoded video payload by `max_fetch_bytes`.
- Images: the format must be in `image_formats` (MPO, the multi-picture JPEG of phone cameras, counts as
  JPEG) and width x height from the header within `max_image_pixels` before any pixel is decoded (Pillow's
  own decompression-bomb limit, `PIL.Image.MAX_IMAGE_PIXELS`, is a further ceiling). Truncated files are
  refused whatever `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` says: the bytes are read through a buffer that
  raises on any read past their end, and PNGs are CRC-checked to their IEND chunk first.
- Videos: written to a temporary file (always deleted) and sampled with the data pipeline's dynamic
  frame-resolution rule (`components.common.video.plan_sampling`); a plan of more than `max_video_frames`
  frames is cut to that many before decoding, the centre frame of each of that many equal slices (the same
  rule the sampler uses).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from components.common.video import (
    SamplingPlan,
    VideoDecodeError,
    frame_size_for_budget,
    plan_sampling,
    probe_video,
    read_frames,
    uniform_indices,
)
from components.serve.config import MediaConfig

REMOTE_SCHEMES = ("http", "https")
FORMAT_ALIASES = {"MPO": "JPEG"}  # detected format -> the configured name that admits it
VIDEO_MIME_TYPES = ("application/octet-stream",)  # accepted for video besides video/*
VIDEO_SUFFIXES = {
    "video/mp4": ".mp4", "video/x-msvideo": ".avi", "video/avi": ".avi", "video/msvideo": ".avi",
    "video/webm": ".webm", "video/x-matroska": ".mkv", "video/matroska": ".mkv", "video/quicktime": ".mov",
}
DEFAULT_VIDEO_SUFFIX = ".mp4"
FETCH_CHUNK = 1 << 16
USER_AGENT = "openseedvl-serve"
WHITE = (255, 255, 255)


class MediaError(Exception):
    """A media part the server refuses; becomes an OpenAI-shaped error."""

    def __init__(self, message: str, code: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param


# ---------------------------------------------------------------- public API


def decode_image_url(url: str, cfg: MediaConfig, param: str | None = None) -> Image.Image:
    """The image of an `image_url` part as an RGB PIL image (EXIF orientation applied, first frame if animated)."""
    data, _ = read_url(url, cfg, "image/", (), param)
    return decode_image_bytes(data, cfg, param)


def decode_video_url(url: str, cfg: MediaConfig,
                     param: str | None = None) -> tuple[list[Image.Image], list[float]]:
    """The sampled frames (RGB) of a `video_url` part and their timestamps in seconds."""
    data, mime = read_url(url, cfg, "video/", VIDEO_MIME_TYPES, param)
    if len(data) > cfg.max_fetch_bytes:
        raise too_large(len(data), cfg, param)
    return sample_video_bytes(data, VIDEO_SUFFIXES.get(mime, DEFAULT_VIDEO_SUFFIX), cfg, param)


# ---------------------------------------------------------------- URLs


def read_url(url: str, cfg: MediaConfig, mime_prefix: str, extra_mimes: tuple[str, ...],
             param: str | None) -> tuple[bytes, str]:
    """The payload bytes and media type of a data URL or an allowed http(s) URL; any other URL is refused."""
    if not isinstance(url, str) or not url.strip():
        raise MediaError("the media URL is empty", "unsupported_url", param=param)
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        mime, data = parse_data_url(url, param)
        if not (mime.startswith(mime_prefix) or mime in extra_mimes):
            accepted = " or ".join([f"{mime_prefix}*", *extra_mimes])
            raise MediaError(f"the data URL's media type is {mime or 'missing'!r}; this part needs {accepted}",
                             "unsupported_media_type", param=param)
        return data, mime
    if scheme in REMOTE_SCHEMES:
        return fetch_remote(url, cfg, param)
    raise MediaError("only base64 data URLs (data:<type>;base64,...) and, when enabled, http(s) URLs are "
                     f"accepted; got a URL with scheme {scheme or 'none'!r}", "unsupported_url", param=param)


def parse_data_url(url: str, param: str | None) -> tuple[str, bytes]:
    """`data:<mime>[;params];base64,<payload>` as (lowercased mime, decoded bytes)."""
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise MediaError("malformed data URL: no ',' before the payload (expected data:<type>;base64,<data>)",
                         "invalid_data_url", param=param)
    mime, *params = [p.strip().lower() for p in header.split(";")]
    if "base64" not in params:
        raise MediaError("data URLs must be base64-encoded (data:<type>;base64,<data>)", "invalid_data_url",
                         param=param)
    data = decode_base64(payload, param)
    if not data:
        raise MediaError("the data URL's payload is empty", "invalid_data_url", param=param)
    return mime, data


def decode_base64(payload: str, param: str | None) -> bytes:
    """Strict standard base64 (whitespace ignored, missing padding restored)."""
    text = "".join(payload.split())
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"the data URL's payload is not valid base64: {exc}", "invalid_base64",
                         param=param) from exc


def check_remote(url: str, cfg: MediaConfig, param: str | None) -> None:
    """Refuses a URL unless remote fetching is on and its scheme is http(s) and its host is allow-listed."""
    if not cfg.remote_fetch:
        raise MediaError("fetching remote URLs is off; send the image as a base64 data URL "
                         "(data:image/png;base64,...), or ask the operator to set serve.media.remote_fetch "
                         "and serve.media.allowed_hosts", "remote_fetch_disabled", param=param)
    try:
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError as exc:
        raise MediaError(f"malformed URL: {exc}", "unsupported_url", param=param) from exc
    if parts.scheme.lower() not in REMOTE_SCHEMES or not host:
        raise MediaError(f"only http(s) URLs with a host can be fetched; got {url[:200]!r}", "unsupported_url",
                         param=param)
    if host not in {h.lower() for h in cfg.allowed_hosts}:
        raise MediaError(f"host {host!r} is not in serve.media.allowed_hosts", "host_not_allowed", param=param)


class AllowListRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL that passes the same checks as the original one."""

    def __init__(self, cfg: MediaConfig, param: str | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.param = param

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        check_remote(newurl, self.cfg, self.param)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_remote(url: str, cfg: MediaConfig, param: str | None) -> tuple[bytes, str]:
    """At most `max_fetch_bytes` from an allowed http(s) URL, within about `fetch_timeout_s`; (bytes, mime)."""
    check_remote(url, cfg, param)
    opener = urllib.request.build_opener(AllowListRedirects(cfg, param))
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with opener.open(request, timeout=cfg.fetch_timeout_s) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > cfg.max_fetch_bytes:
                raise too_large(int(length), cfg, param)
            data = read_capped(response, cfg, param)
            mime = response.headers.get_content_type().lower()
    except MediaError:
        raise
    except urllib.error.HTTPError as exc:
        exc.close()
        raise MediaError(f"fetching the URL failed: HTTP {exc.code} {exc.reason}", "fetch_failed",
                         param=param) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise MediaError(f"fetching the URL failed: {reason}", "fetch_failed", param=param) from exc
    if not data:
        raise MediaError("the fetched URL returned no data", "fetch_failed", param=param)
    return data, mime


def read_capped(response: IO[bytes], cfg: MediaConfig, param: str | None) -> bytes:
    """The body, refused (413) past `max_fetch_bytes` and (fetch_failed) past `fetch_timeout_s` in total."""
    deadline = time.monotonic() + cfg.fetch_timeout_s
    chunks: list[bytes] = []
    size = 0
    while size <= cfg.max_fetch_bytes:
        chunk = response.read(min(FETCH_CHUNK, cfg.max_fetch_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if time.monotonic() > deadline:
            raise MediaError(f"fetching the URL took longer than {cfg.fetch_timeout_s:g} s", "fetch_failed",
                             param=param)
    raise too_large(None, cfg, param)


def too_large(size: int | None, cfg: MediaConfig, param: str | None) -> MediaError:
    """413 for media over `max_fetch_bytes`; `size` None when the body was cut off at the limit."""
    over = f"{size} bytes" if size is not None else f"more than {cfg.max_fetch_bytes} bytes"
    return MediaError(f"the media is {over}; the limit is {cfg.max_fetch_bytes} bytes (serve.media.max_fetch_bytes)",
                      "media_too_large", 413, param)


# ---------------------------------------------------------------- images


class StrictBytesIO(io.BytesIO):
    """Image bytes that, once `strict` (after the header is parsed), raise on a read past their end, so
    Pillow cannot pad a truncated file with grey even when `ImageFile.LOAD_TRUNCATED_IMAGES` is set."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.strict = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.strict and not data and size is not None and size > 0:
            raise OSError("image file is truncated")
        return data


def decode_image_bytes(data: bytes, cfg: MediaConfig, param: str | None = None) -> Image.Image:
    """Checked, fully decoded, EXIF-rotated RGB image from encoded bytes (see the module docstring)."""
    try:
        with warnings.catch_warnings():  # as in components/data/ingest.py: Pillow's bomb warning is an error
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            buffer = StrictBytesIO(data)
            with Image.open(buffer) as image:
                buffer.strict = True
                check_image_header(image, cfg, param)
                if image.format == "PNG":
                    verify_png(data)
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except MediaError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise MediaError("cannot decode the image: not a recognised image format", "invalid_image",
                         param=param) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"the image is too large to decode safely: {exc}", "image_too_large", param=param) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise MediaError(f"cannot decode the image: {exc}", "invalid_image", param=param) from exc


def check_image_header(image: Image.Image, cfg: MediaConfig, param: str | None) -> None:
    """Refuses a format outside `image_formats` or a size above `max_image_pixels`, before pixels are read."""
    allowed = {f.upper() for f in cfg.image_formats}
    fmt = (image.format or "").upper()
    if FORMAT_ALIASES.get(fmt, fmt) not in allowed:
        raise MediaError(f"image format {fmt or 'unknown'} is not accepted; send one of "
                         f"{', '.join(sorted(allowed))}", "unsupported_image_format", param=param)
    width, height = image.size
    if width * height > cfg.max_image_pixels:
        raise MediaError(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                         f"{cfg.max_image_pixels} (serve.media.max_image_pixels)", "image_too_large", param=param)


def verify_png(data: bytes) -> None:
    """Walks every chunk to IEND checking CRCs (no decompression); raises OSError/SyntaxError if cut or broken."""
    buffer = StrictBytesIO(data)
    with Image.open(buffer, formats=["PNG"]) as image:
        buffer.strict = True
        image.verify()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB: transparency composited on white, 16/32-bit grey scaled to 8 bits, CMYK and others converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I: treat as 16-bit grey
        grey = np.clip(np.asarray(image), 0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------- videos


def sample_video_bytes(data: bytes, suffix: str, cfg: MediaConfig,
                       param: str | None) -> tuple[list[Image.Image], list[float]]:
    """Frames and timestamps of an encoded video, planned by the dynamic frame-resolution rule and cut to
    `max_video_frames` before any frame is decoded (so the cap also bounds the memory)."""
    with tempfile.NamedTemporaryFile(prefix="seedvl-video-", suffix=suffix) as handle:
        handle.write(data)
        handle.flush()
        try:
            info = probe_video(handle.name, timeout_s=cfg.video_timeout_s)
            plan = plan_sampling(info.duration_s, info.native_fps, info.num_frames, cfg.video_fps, cfg.video_min_frames,
                                 tuple(cfg.video_budgets), cfg.video_max_tokens)
            plan = cap_plan(plan, cfg.max_video_frames)
            width, height = frame_size_for_budget(info.width, info.height, plan.tokens_per_frame)
            decoded = read_frames(handle.name, plan, width, height, timeout_s=cfg.video_timeout_s)
        except (VideoDecodeError, ValueError) as exc:  # ValueError: a video the sampling rule cannot plan
            detail = str(exc).replace(handle.name, "<video>")
            raise MediaError(f"cannot decode the video: {detail}", "invalid_video", param=param) from exc
    frames = [Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)).convert("RGB") for frame in decoded]
    return frames, [float(t) for t in plan.timestamps]


def cap_plan(plan: SamplingPlan, max_frames: int) -> SamplingPlan:
    """At most `max_frames` of the plan's frames: the centre one of each of `max_frames` equal slices."""
    if len(plan.frame_indices) <= max_frames:
        return plan
    keep = uniform_indices(len(plan.frame_indices), max_frames)
    return SamplingPlan(tuple(plan.frame_indices[i] for i in keep), tuple(plan.timestamps[i] for i in keep),
                        plan.tokens_per_frame)
