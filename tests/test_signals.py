"""Dedup's signals on ingest's one decode (`lib/signals.py`): the reduced JPEG decode, its validation,
and the OpenCV pHash and thumbnail on real pixels."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from components.data.lib.dedup_core import hamming
from components.data.lib.signals import SIGNAL_SIDE, decode_signals, phash_pixels, signal_pixels, thumbnail_pixels
from components.data.synthetic_crawl import random_scene, render


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def scenes() -> list[Image.Image]:
    rng = random.Random(7)
    return [render(random_scene(rng, 384, 288)) for _ in range(120)]


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return signal_pixels(data, image)


def test_jpeg_decode_is_reduced_by_a_power_of_two_and_png_box_reduced() -> None:
    image = Image.new("RGB", (1000, 300), (200, 40, 10))
    rgb = pixels(encode(image))
    assert rgb.shape == (-(-300 // 8), -(-1000 // 8), 3)  # 1/8: the short side 38 >= SIGNAL_SIDE 32
    assert SIGNAL_SIDE == 32 and np.abs(rgb.astype(int) - (200, 40, 10)).max() <= 3
    small = pixels(encode(Image.new("RGB", (40, 90), (0, 0, 0))))
    assert small.shape == (90, 40, 3)  # never reduced below SIGNAL_SIDE
    png = pixels(encode(Image.new("RGBA", (500, 260), (9, 8, 7, 0)), "PNG"))
    assert png.shape == (-(-260 // 8), -(-500 // 8), 3) and (png == (9, 8, 7)).all()  # alpha dropped, 8x box


def test_a_corrupt_jpeg_fails_the_reduced_decode_as_a_full_decode_does(scenes: list[Image.Image]) -> None:
    data = encode(scenes[0])
    with pytest.raises(OSError):
        pixels(data[: len(data) // 2])  # truncated: simplejpeg refuses, Pillow's full decode raises
    cmyk = encode(scenes[0].convert("CMYK"))  # simplejpeg cannot give RGB: Pillow decodes it
    assert pixels(cmyk).shape[2] == 3


def test_reencoded_and_resized_copies_stay_within_10(scenes: list[Image.Image]) -> None:
    for image in scenes:
        original = decode_signals(encode(image))["phash"]
        assert hamming(original, decode_signals(encode(image, quality=50))["phash"]) <= 10
        resized = image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.BILINEAR)
        assert hamming(original, decode_signals(encode(resized))["phash"]) <= 10


def test_distinct_scenes_rarely_within_10(scenes: list[Image.Image]) -> None:
    hashes = np.array([decode_signals(encode(image))["phash"] for image in scenes], dtype=np.uint64)
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    assert (distance[np.triu_indices(len(scenes), k=1)] <= 10).mean() <= 0.01


def test_phash_bits_and_thumbnail_cells() -> None:
    left_dark = np.zeros((64, 64, 3), dtype=np.uint8)
    left_dark[:, 32:] = 255
    value = phash_pixels(left_dark)
    assert 0 <= value < 2**64 and value != phash_pixels(left_dark[:, ::-1].copy())
    thumb = np.frombuffer(thumbnail_pixels(left_dark), dtype=np.uint8).reshape(8, 8, 3)
    assert (thumb[:, :4] == 0).all() and (thumb[:, 4:] == 255).all()  # area means of 8x8 cells
