"""The chat endpoint's media layer: data URLs, image checks and conversion, remote fetch rules, video sampling."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from components.data.synthesis.avi_writer import encode_mjpeg_avi
from components.common.video import sample_video, uniform_indices
from components.serve.config import MediaConfig
from components.serve.media import MediaError, decode_image_url, decode_video_url, to_rgb

PARAM = "messages[1].content[2].image_url"


# ---------------------------------------------------------------- helpers


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def refused(url: str, cfg: MediaConfig, code: str, video: bool = False) -> MediaError:
    decode = decode_video_url if video else decode_image_url
    with pytest.raises(MediaError) as err:
        decode(url, cfg, PARAM)
    assert err.value.code == code, err.value.message
    assert err.value.param == PARAM
    return err.value


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but whose IDAT holds one row: decoding it would be the bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * 16))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.fixture
def cfg() -> MediaConfig:
    return MediaConfig()


# ---------------------------------------------------------------- images: round trips and conversion


def test_png_round_trip_is_exact(cfg: MediaConfig) -> None:
    source = noise(37, 23)
    image = decode_image_url(data_url(encode(source, "PNG")), cfg)
    assert image.mode == "RGB" and image.size == (37, 23)
    assert np.array_equal(np.asarray(image), np.asarray(source))


def test_jpeg_round_trip_keeps_size_and_colour(cfg: MediaConfig) -> None:
    source = Image.new("RGB", (64, 48), (200, 40, 90))
    image = decode_image_url(data_url(encode(source, "JPEG", quality=95), "image/jpeg"), cfg)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert np.abs(np.asarray(image, dtype=int) - (200, 40, 90)).max() <= 4


@pytest.mark.parametrize("kwargs", [{"progressive": True}, {"exif": Image.Exif()}])
def test_jpeg_variants_decode(cfg: MediaConfig, kwargs: dict[str, object]) -> None:
    image = decode_image_url(data_url(encode(noise(80, 60), "JPEG", **kwargs), "image/jpeg"), cfg)
    assert image.size == (80, 60) and image.mode == "RGB"


def test_webp_and_phone_mpo_jpeg_are_accepted(cfg: MediaConfig) -> None:
    webp = decode_image_url(data_url(encode(noise(30, 20), "WEBP", lossless=True), "image/webp"), cfg)
    assert webp.size == (30, 20) and np.array_equal(np.asarray(webp), np.asarray(noise(30, 20)))
    mpo = encode(noise(30, 20), "MPO", save_all=True, append_images=[noise(30, 20, seed=1)])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert decode_image_url(data_url(mpo, "image/jpeg"), cfg).size == (30, 20)


def test_rgba_is_composited_on_white(cfg: MediaConfig) -> None:
    source = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    source.putpixel((3, 1), (0, 0, 255, 0))  # fully transparent
    source.putpixel((0, 1), (0, 0, 0, 128))  # half transparent black
    image = decode_image_url(data_url(encode(source, "PNG")), cfg)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((3, 1)) == (255, 255, 255)
    assert all(120 <= c <= 135 for c in image.getpixel((0, 1)))


def test_la_is_composited_on_white(cfg: MediaConfig) -> None:
    source = Image.new("LA", (2, 1), (10, 255))
    source.putpixel((1, 0), (10, 0))
    image = decode_image_url(data_url(encode(source, "PNG")), cfg)
    assert image.getpixel((0, 0)) == (10, 10, 10) and image.getpixel((1, 0)) == (255, 255, 255)


def test_palette_with_transparent_index_is_composited_on_white(cfg: MediaConfig) -> None:
    source = Image.new("P", (3, 1), 0)
    source.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    source.putpixel((1, 0), 1)
    image = decode_image_url(data_url(encode(source, "PNG", transparency=1)), cfg)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((1, 0)) == (255, 255, 255)


def test_palette_without_transparency(cfg: MediaConfig) -> None:
    source = noise(20, 10).convert("P")
    image = decode_image_url(data_url(encode(source, "PNG")), cfg)
    assert np.array_equal(np.asarray(image), np.asarray(source.convert("RGB")))


def test_grey_is_replicated_to_three_channels(cfg: MediaConfig) -> None:
    source = Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10))
    image = decode_image_url(data_url(encode(source, "PNG")), cfg)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (6, 10, 3)
    assert all(np.array_equal(pixels[..., c], np.asarray(source)) for c in range(3))


def test_sixteen_bit_grey_is_scaled_not_clipped(cfg: MediaConfig) -> None:
    source = Image.fromarray(np.array([[0, 256 * 100, 65535]], dtype=np.uint16))
    assert source.mode == "I;16"
    image = decode_image_url(data_url(encode(source, "PNG")), cfg)
    assert image.mode == "RGB" and [image.getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (100,) * 3, (255,) * 3]
    wide = to_rgb(source.convert("I"))  # 32-bit grey (older Pillow opens 16-bit PNGs so): the same scale
    assert [wide.getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (100,) * 3, (255,) * 3]


def test_cmyk_jpeg_becomes_rgb(cfg: MediaConfig) -> None:
    source = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red in CMYK
    image = decode_image_url(data_url(encode(source, "JPEG", quality=95), "image/jpeg"), cfg)
    assert image.mode == "RGB" and image.size == (16, 8)
    r, g, b = image.getpixel((8, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied(cfg: MediaConfig) -> None:
    source = Image.new("RGB", (40, 20), (255, 0, 0))
    source.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to display
    image = decode_image_url(data_url(encode(source, "PNG", exif=exif)), cfg)
    assert image.size == (20, 40)
    assert image.getpixel((10, 5)) == (255, 0, 0) and image.getpixel((10, 35)) == (0, 0, 255)


def test_animated_image_gives_its_first_frame() -> None:
    cfg = MediaConfig(image_formats=["PNG", "GIF"])
    first, second = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    for fmt in ("PNG", "GIF"):
        image = decode_image_url(data_url(encode(first, fmt, save_all=True, append_images=[second])), cfg)
        assert image.size == (8, 8) and image.getpixel((4, 4)) == (255, 0, 0)


# ---------------------------------------------------------------- images: refusals


@pytest.mark.parametrize("payload", ["@@@@not-base64", "aGVsbG8=aGVsbG8", "Zm9v!YmFy", "a"])
def test_bad_base64_is_refused(cfg: MediaConfig, payload: str) -> None:
    refused(f"data:image/png;base64,{payload}", cfg, "invalid_base64")


def test_base64_with_newlines_and_missing_padding_is_accepted(cfg: MediaConfig) -> None:
    encoded = base64.b64encode(encode(noise(5, 3), "PNG")).decode().rstrip("=")
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    assert decode_image_url(f"data:image/png;base64,{wrapped}", cfg).size == (5, 3)


@pytest.mark.parametrize("url", ["data:image/png,%89PNG", "data:image/png;utf8,abc", "data:image/png;base64",
                                 "data:image/png;base64,"])
def test_malformed_or_non_base64_data_url_is_refused(cfg: MediaConfig, url: str) -> None:
    refused(url, cfg, "invalid_data_url")


@pytest.mark.parametrize("mime", ["text/plain", "video/mp4", "application/octet-stream", ""])
def test_non_image_media_type_is_refused(cfg: MediaConfig, mime: str) -> None:
    refused(data_url(encode(noise(4, 4), "PNG"), mime), cfg, "unsupported_media_type")


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_format_outside_the_list_is_refused(cfg: MediaConfig, fmt: str) -> None:
    err = refused(data_url(encode(noise(4, 4), fmt), "image/png"), cfg, "unsupported_image_format")
    assert fmt in err.message and "PNG" in err.message


def test_format_list_is_configurable() -> None:
    cfg = MediaConfig(image_formats=["png"])
    assert decode_image_url(data_url(encode(noise(4, 4), "PNG")), cfg).size == (4, 4)
    refused(data_url(encode(noise(4, 4), "JPEG"), "image/jpeg"), cfg, "unsupported_image_format")


def test_bytes_that_are_not_an_image_are_refused(cfg: MediaConfig) -> None:
    err = refused(data_url(b"definitely not an image" * 10), cfg, "invalid_image")
    assert err.message == "cannot decode the image: not a recognised image format"


@pytest.mark.parametrize("load_truncated", [False, True])
@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.98])
def test_truncated_image_is_refused_whatever_pillow_is_told(cfg: MediaConfig, monkeypatch: pytest.MonkeyPatch,
                                                            load_truncated: bool, fmt: str, mime: str,
                                                            keep: float) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    whole = encode(noise(160, 120), fmt)
    refused(data_url(whole[:int(len(whole) * keep)], mime), cfg, "invalid_image")


def test_truncated_jpeg_would_be_padded_by_pillow_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the test above matters: with the flag on, plain Pillow half-decodes a cut JPEG without complaint."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    whole = encode(noise(160, 120), "JPEG")
    with Image.open(io.BytesIO(whole[: len(whole) // 2])) as image:
        image.load()
        assert image.size == (160, 120)


def test_png_with_a_broken_crc_is_refused(cfg: MediaConfig) -> None:
    whole = bytearray(encode(noise(40, 30), "PNG"))
    whole[len(whole) // 2] ^= 0xFF  # inside IDAT
    refused(data_url(bytes(whole)), cfg, "invalid_image")


@pytest.mark.parametrize("size", [(100_000, 100_000), (8_000, 8_000)])
def test_huge_header_is_refused_before_decoding(cfg: MediaConfig, monkeypatch: pytest.MonkeyPatch,
                                                size: tuple[int, int]) -> None:
    def no_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    refused(data_url(png_with_header(*size)), cfg, "image_too_large")  # 1e10 px: Pillow's bomb limit; 64e6: ours


def test_pixel_limit_is_configurable() -> None:
    cfg = MediaConfig(max_image_pixels=100)
    assert decode_image_url(data_url(encode(noise(10, 10), "PNG")), cfg).size == (10, 10)
    err = refused(data_url(encode(noise(11, 10), "PNG")), cfg, "image_too_large")
    assert "11x10" in err.message and "max_image_pixels" in err.message


# ---------------------------------------------------------------- URLs


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "etc/passwd", "", "   ", "ftp://host/a.png",
                                 "C:\\images\\a.png", "gopher://host/", "javascript:alert(1)"])
def test_non_data_non_http_urls_are_refused_without_reading(url: str) -> None:
    cfg = MediaConfig(remote_fetch=True, allowed_hosts=["127.0.0.1", "localhost", "host"])
    refused(url, cfg, "unsupported_url")


def test_remote_fetch_is_off_by_default(cfg: MediaConfig) -> None:
    err = refused("https://images.example.org/cat.png", cfg, "remote_fetch_disabled")
    assert "base64 data URL" in err.message and "allowed_hosts" in err.message


def test_malformed_http_url_is_refused() -> None:
    cfg = MediaConfig(remote_fetch=True, allowed_hosts=["images.example.org"])
    for url in ("http://[::1/cat.png", "https:///cat.png", "http://"):
        refused(url, cfg, "unsupported_url")


@pytest.mark.parametrize("url", ["https://evil.example.org/cat.png", "http://images.example.org.evil.net/cat.png",
                                 "http://images.example.org@evil.net/cat.png", "https://example.org/cat.png"])
def test_host_outside_the_allow_list_is_refused(url: str) -> None:
    cfg = MediaConfig(remote_fetch=True, allowed_hosts=["images.example.org"])
    refused(url, cfg, "host_not_allowed")


class MediaServer(http.server.ThreadingHTTPServer):
    """A local HTTP server that records the paths it was asked for."""

    def __init__(self, png: bytes) -> None:
        super().__init__(("127.0.0.1", 0), MediaHandler)
        self.png = png
        self.paths: list[str] = []


class MediaHandler(http.server.BaseHTTPRequestHandler):
    server: MediaServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.paths.append(self.path)
        port = self.server.server_address[1]
        routes = {
            "/cat.png": (200, self.server.png, True),
            "/big.bin": (200, b"x" * 5000, True),
            "/big-no-length.bin": (200, b"x" * 5000, False),
        }
        if self.path in ("/to-localhost", "/to-self"):
            host = "localhost" if self.path == "/to-localhost" else "127.0.0.1"
            self.send_response(302)
            self.send_header("Location", f"http://{host}:{port}/cat.png")
            self.end_headers()
            return
        if self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
            return
        status, body, with_length = routes.get(self.path, (404, b"missing", True))
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        if with_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[MediaServer]:
    httpd = MediaServer(encode(noise(12, 9), "PNG"))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def local(server: MediaServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


@pytest.fixture
def remote_cfg() -> MediaConfig:
    return MediaConfig(remote_fetch=True, allowed_hosts=["127.0.0.1"], fetch_timeout_s=5.0, max_fetch_bytes=4000)


def test_fetch_from_an_allowed_host(server: MediaServer, remote_cfg: MediaConfig) -> None:
    image = decode_image_url(local(server, "/cat.png"), remote_cfg)
    assert image.size == (12, 9) and np.array_equal(np.asarray(image), np.asarray(noise(12, 9)))


def test_redirect_within_the_allow_list_is_followed(server: MediaServer, remote_cfg: MediaConfig) -> None:
    assert decode_image_url(local(server, "/to-self"), remote_cfg).size == (12, 9)


def test_redirect_to_a_disallowed_host_is_refused(server: MediaServer, remote_cfg: MediaConfig) -> None:
    server.paths.clear()
    err = refused(local(server, "/to-localhost"), remote_cfg, "host_not_allowed")
    assert "localhost" in err.message
    assert server.paths == ["/to-localhost"]  # the redirect target was never requested


def test_redirect_to_a_file_url_is_refused(server: MediaServer, remote_cfg: MediaConfig) -> None:
    with pytest.raises(MediaError) as err:  # urllib refuses the scheme before our allow-list check runs
        decode_image_url(local(server, "/to-file"), remote_cfg, PARAM)
    assert err.value.code in ("fetch_failed", "unsupported_url") and "file:" in err.value.message


@pytest.mark.parametrize("path", ["/big.bin", "/big-no-length.bin"])
def test_fetch_over_the_byte_limit_is_413(server: MediaServer, remote_cfg: MediaConfig, path: str) -> None:
    assert refused(local(server, path), remote_cfg, "media_too_large").status == 413


def test_http_error_and_unreachable_host_are_fetch_failures(server: MediaServer, remote_cfg: MediaConfig) -> None:
    assert "404" in refused(local(server, "/missing.png"), remote_cfg, "fetch_failed").message
    refused(f"http://127.0.0.1:{unused_port()}/cat.png", remote_cfg, "fetch_failed")


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- videos


def clip(frames: int = 30, fps: float = 10.0, size: tuple[int, int] = (64, 48)) -> bytes:
    """An MJPEG AVI whose frame i is a flat grey of level 8 * i (so frames are told apart)."""
    return encode_mjpeg_avi([Image.new("RGB", size, (8 * i,) * 3) for i in range(frames)], fps, quality=90)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp folder of this test's own, so leftover video files can be seen."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_video_frames_follow_the_sampling_rule(cfg: MediaConfig, private_tmp: Path) -> None:
    data = clip()
    frames, timestamps = decode_video_url(data_url(data, "video/x-msvideo"), cfg)
    assert list(private_tmp.iterdir()) == []  # the temporary file is gone
    reference = private_tmp / "ref.avi"
    reference.write_bytes(data)
    expected = sample_video(reference, fps=cfg.video_fps, min_frames=cfg.video_min_frames,
                            budgets=tuple(cfg.video_budgets), max_tokens=cfg.video_max_tokens)
    assert len(frames) == len(expected.frames) == 16  # 3 s at 1 fps, raised to the 16-frame minimum
    assert timestamps == list(expected.timestamps)
    assert all(a < b for a, b in zip(timestamps, timestamps[1:])) and timestamps[-1] < 3.0
    for frame, array in zip(frames, expected.frames):
        assert frame.mode == "RGB" and frame.size == expected.size
        assert np.array_equal(np.asarray(frame), array)


def test_video_frames_are_capped_evenly(private_tmp: Path) -> None:
    cfg = MediaConfig(max_video_frames=5)
    data = clip()
    frames, timestamps = decode_video_url(data_url(data, "application/octet-stream"), cfg)
    reference = private_tmp / "ref.avi"
    reference.write_bytes(data)
    full = sample_video(reference, fps=cfg.video_fps, min_frames=cfg.video_min_frames)
    keep = uniform_indices(len(full.frames), 5)  # centre of each of 5 equal slices
    assert len(frames) == 5 and timestamps == [full.timestamps[i] for i in keep]
    assert all(np.array_equal(np.asarray(f), full.frames[i]) for f, i in zip(frames, keep))


def test_video_fps_and_minimum_come_from_config() -> None:
    cfg = MediaConfig(video_fps=2.0, video_min_frames=1)
    frames, timestamps = decode_video_url(data_url(clip(), "video/x-msvideo"), cfg)
    assert len(frames) == 6  # 3 s at 2 fps
    assert timestamps == [round(i / 10.0, 1) for i in uniform_indices(30, 6)]


def test_garbage_video_is_refused_and_cleaned_up(cfg: MediaConfig, private_tmp: Path) -> None:
    err = refused(data_url(b"not a video at all" * 100, "video/mp4"), cfg, "invalid_video", video=True)
    assert "video_unreadable" in err.message and str(private_tmp) not in err.message
    assert list(private_tmp.iterdir()) == []


def test_video_media_type_and_size_are_checked(cfg: MediaConfig) -> None:
    refused(data_url(clip(), "image/png"), cfg, "unsupported_media_type", video=True)
    small = MediaConfig(max_fetch_bytes=1000)
    assert refused(data_url(clip(), "video/x-msvideo"), small, "media_too_large", video=True).status == 413
    refused("file:///tmp/clip.avi", cfg, "unsupported_url", video=True)


# ---------------------------------------------------------------- real files


def test_real_jpegs_decode_at_their_named_size(cfg: MediaConfig, real_data: Path) -> None:
    for path in sorted((real_data / "odd_aspect_jpegs").glob("*.jpg")):
        width, height = map(int, path.stem.split("_"))
        image = decode_image_url(data_url(path.read_bytes(), "image/jpeg"), cfg)
        assert image.mode == "RGB" and image.size == (width, height)


def test_real_video_decodes(cfg: MediaConfig, real_data: Path) -> None:
    frames, timestamps = decode_video_url(data_url((real_data / "pancake.mkv").read_bytes(), "video/x-matroska"), cfg)
    assert len(frames) == 16 and frames[0].size == (420, 252)
    assert all(a < b for a, b in zip(timestamps, timestamps[1:])) and timestamps[-1] < 310 / 30
