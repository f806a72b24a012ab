"""The [0, 999] coordinate rule: round trips within a bin at every image size, extremes, boxes that
cover what they came from, the text form read back, malformed answers skipped, and IoU."""

from __future__ import annotations

import math
import random

import pytest

from components.common.coords import (
    box_iou,
    box_to_pixels,
    format_box,
    format_point,
    normalise_box,
    normalise_point,
    normalised_box_iou,
    parse_boxes,
    parse_points,
    point_to_pixels,
)

SIZES = (1, 28, 640, 999, 1000, 1001, 4000)
EPS = 1e-9


def sample_coordinates(size: int, rng: random.Random) -> list[float]:
    """Pixel edges, pixel centres, random reals, and both ends of the axis."""
    edges = list(range(0, size + 1, max(1, size // 400)))
    centres = [p + 0.5 for p in range(0, size, max(1, size // 400))]
    return [0, size, *edges, *centres, *(rng.uniform(0, size) for _ in range(200))]


# --- points --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_point_round_trip_within_half_a_bin(size: int) -> None:
    rng = random.Random(size)
    for x in sample_coordinates(size, rng):
        nx, ny = normalise_point(x, size / 2, size, size)
        assert 0 <= nx <= 999 and 0 <= ny <= 999
        back, _ = point_to_pixels((nx, ny), size, size)
        assert abs(back - x) <= size / 2000 + EPS  # half a bin
        assert abs(back - x) <= size / 1000 + EPS  # the promise: at most one bin
        if size <= 1000:
            assert abs(back - x) <= 1.0


@pytest.mark.parametrize("size", SIZES)
def test_extremes_map_to_0_and_999(size: int) -> None:
    assert normalise_point(0, 0, size, size) == (0, 0)
    assert normalise_point(size, size, size, size) == (999, 999)
    assert normalise_box((0, 0, size, size), size, size) == (0, 0, 999, 999)
    assert box_to_pixels((0, 0, 999, 999), size, size) == (0.0, 0.0, float(size), float(size))
    assert point_to_pixels((0, 999), size, size) == pytest.approx((size / 2000, size - size / 2000))


@pytest.mark.parametrize("size", [s for s in SIZES if s <= 1000])
def test_small_images_give_each_pixel_its_own_bin_and_back(size: int) -> None:
    bins = [normalise_point(p + 0.5, 0, size, 1)[0] for p in range(size)]
    assert len(set(bins)) == size
    for p, n in enumerate(bins):
        back, _ = point_to_pixels((n, 0), size, 1)
        assert math.floor(back) == p


@pytest.mark.parametrize("size", [s for s in SIZES if s >= 1000])
def test_large_images_use_every_bin(size: int) -> None:
    assert {normalise_point(p + 0.5, 0, size, 1)[0] for p in range(size)} == set(range(1000))


def test_width_and_height_are_independent() -> None:
    assert normalise_point(320, 10, 640, 20) == (500, 500)
    assert point_to_pixels((500, 500), 640, 20) == pytest.approx((320.32, 10.01))


def test_integer_and_float_inputs_agree_exactly() -> None:
    # 0.3 * 1000 / 1 is 300.00000000000006 in floats but 0.3 is below 3/10 exactly: floor gives 299.
    assert normalise_point(3, 3, 10, 10) == (300, 300)
    assert normalise_point(0.3, 0.3, 1, 1) == (299, 299)
    assert normalise_box((3, 3, 7, 7), 10, 10) == (300, 300, 699, 699)


# --- boxes ---------------------------------------------------------------------------------------


def random_box(rng: random.Random, width: int, height: int) -> tuple[float, float, float, float]:
    if rng.random() < 0.5 and width > 1 and height > 1:
        x0, x1 = sorted(rng.sample(range(width + 1), 2))
        y0, y1 = sorted(rng.sample(range(height + 1), 2))
        return x0, y0, x1, y1
    x0, x1 = sorted((rng.uniform(0, width), rng.uniform(0, width)))
    y0, y1 = sorted((rng.uniform(0, height), rng.uniform(0, height)))
    return x0, y0, max(x1, x0 + 1e-6), max(y1, y0 + 1e-6)


@pytest.mark.parametrize("width", SIZES)
@pytest.mark.parametrize("height", (1, 333, 1001))
def test_box_back_to_pixels_covers_the_original_within_one_bin(width: int, height: int) -> None:
    rng = random.Random(width * 7 + height)
    for _ in range(300):
        box = random_box(rng, width, height)
        if box[2] > width or box[3] > height:
            continue
        norm = normalise_box(box, width, height)
        assert all(0 <= v <= 999 for v in norm) and norm[0] <= norm[2] and norm[1] <= norm[3]
        px = box_to_pixels(norm, width, height)
        bin_w, bin_h = width / 1000, height / 1000
        assert px[0] <= box[0] + EPS and px[1] <= box[1] + EPS  # covers
        assert px[2] >= box[2] - EPS and px[3] >= box[3] - EPS
        assert box[0] - px[0] < bin_w + EPS and box[1] - px[1] < bin_h + EPS  # by under one bin
        assert px[2] - box[2] < bin_w + EPS and px[3] - box[3] < bin_h + EPS
        assert 0 <= px[0] and px[2] <= width + EPS and 0 <= px[1] and px[3] <= height + EPS


def test_bin_aligned_boxes_come_back_exactly() -> None:
    assert box_to_pixels(normalise_box((120, 45, 380, 610), 1000, 1000), 1000, 1000) == (120, 45, 380, 610)
    assert normalise_box((120, 45, 380, 610), 1000, 1000) == (120, 45, 379, 609)
    assert box_to_pixels(normalise_box((10, 20, 30, 40), 500, 500), 500, 500) == (10, 20, 30, 40)
    assert normalise_box((0, 0, 1, 1), 1, 1) == (0, 0, 999, 999)


def test_one_pixel_box_in_a_large_image_keeps_a_bin() -> None:
    norm = normalise_box((2001, 5, 2002, 6), 4000, 4000)
    assert norm == (500, 1, 500, 1)
    assert box_to_pixels(norm, 4000, 4000) == (2000.0, 4.0, 2004.0, 8.0)


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: normalise_point(0, 0, 0, 10),
        lambda: normalise_point(0, 0, 10, -1),
        lambda: normalise_point(0, 0, 10.0, 10),
        lambda: normalise_point(-0.1, 0, 10, 10),
        lambda: normalise_point(0, 10.5, 10, 10),
        lambda: normalise_point(float("nan"), 0, 10, 10),
        lambda: point_to_pixels((1000, 0), 10, 10),
        lambda: point_to_pixels((-1, 0), 10, 10),
        lambda: point_to_pixels((1.5, 0), 10, 10),
        lambda: point_to_pixels((1, 2, 3), 10, 10),
        lambda: point_to_pixels((1, 2), 0, 10),
        lambda: normalise_box((5, 5, 5, 8), 10, 10),
        lambda: normalise_box((6, 5, 5, 8), 10, 10),
        lambda: normalise_box((0, 0, 11, 8), 10, 10),
        lambda: normalise_box((0, 0, 1), 10, 10),
        lambda: box_to_pixels((0, 0, 1000, 5), 10, 10),
        lambda: box_to_pixels((5, 0, 4, 5), 10, 10),
        lambda: box_to_pixels((0, 0, 5, 5), 10, 0),
        lambda: format_box((0, 0, 1000, 5)),
        lambda: format_point((0, -1)),
        lambda: box_iou((0, 0, 1), (0, 0, 1, 1)),
        lambda: box_iou((2, 0, 1, 1), (0, 0, 1, 1)),
    ],
)
def test_bad_inputs_raise_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_error_messages_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        normalise_point(0, 0, 0, 5)
    with pytest.raises(ValueError, match=r"outside \[0, 999\]"):
        point_to_pixels((0, 1000), 5, 5)
    with pytest.raises(ValueError, match=r"outside the image axis \[0, 5\]"):
        normalise_point(6, 0, 5, 5)


# --- text form -----------------------------------------------------------------------------------


def test_format_then_parse_gives_the_boxes_and_points_back() -> None:
    rng = random.Random(0)
    boxes = []
    for _ in range(50):
        x0, x1 = sorted((rng.randint(0, 999), rng.randint(0, 999)))
        y0, y1 = sorted((rng.randint(0, 999), rng.randint(0, 999)))
        boxes.append((x0, y0, x1, y1))
    points = [(rng.randint(0, 999), rng.randint(0, 999)) for _ in range(50)]
    assert format_box((120, 45, 380, 610)) == "<box>[120, 45, 380, 610]</box>"
    assert format_point((7, 999)) == "<point>[7, 999]</point>"
    text = "There are: " + ", ".join(format_box(b) for b in boxes) + " and " + " ".join(format_point(p) for p in points)
    assert parse_boxes(text) == boxes
    assert parse_points(text) == points


def test_parse_tolerates_whitespace() -> None:
    assert parse_boxes("<box> [ 1 ,2,\n3 , 4 ] </box>") == [(1, 2, 3, 4)]
    assert parse_points("<point>[ 0,999 ]</point>") == [(0, 999)]


@pytest.mark.parametrize(
    "text",
    [
        "<box>[1, 2, 3]</box>",
        "<box>[1, 2, 3, 4, 5]</box>",
        "<box>[1, 2, 3, 1000]</box>",
        "<box>[-1, 2, 3, 4]</box>",
        "<box>[1.5, 2, 3, 4]</box>",
        "<box>[5, 2, 3, 4]</box>",
        "<box>[1, 6, 3, 4]</box>",
        "<box>1, 2, 3, 4</box>",
        "<box>[1, 2, 3, 4]",
        "[1, 2, 3, 4]",
        "<box>[a, 2, 3, 4]</box>",
        "<point>[1, 2]</point>",
    ],
)
def test_malformed_boxes_are_skipped(text: str) -> None:
    assert parse_boxes(text) == []
    assert parse_boxes(f"{text} then <box>[10, 20, 30, 40]</box>") == [(10, 20, 30, 40)]


@pytest.mark.parametrize(
    "text", ["<point>[1]</point>", "<point>[1, 2, 3]</point>", "<point>[1000, 2]</point>", "<point>[-3, 2]</point>",
             "<point>[1.0, 2]</point>", "<box>[1, 2, 3, 4]</box>", "<point>[1, 2]"],
)
def test_malformed_points_are_skipped(text: str) -> None:
    assert parse_points(text) == []
    assert parse_points(f"{text}<point>[5, 6]</point>") == [(5, 6)]


# --- IoU -----------------------------------------------------------------------------------------


def test_iou_basics() -> None:
    a = (0, 0, 10, 10)
    assert box_iou(a, a) == 1.0
    assert box_iou(a, (20, 20, 30, 30)) == 0.0
    assert box_iou(a, (10, 0, 20, 10)) == 0.0  # sharing an edge is no overlap
    assert box_iou(a, (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou(a, (2, 2, 7, 7)) == pytest.approx(25 / 100)
    assert box_iou((5, 0, 15, 10), a) == box_iou(a, (5, 0, 15, 10))
    assert box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0  # empty union
    assert box_iou((0.5, 0.5, 1.5, 1.5), (1.0, 1.0, 2.0, 2.0)) == pytest.approx(0.25 / 1.75)


def test_normalised_iou_uses_bin_areas() -> None:
    assert normalised_box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 1.0
    assert normalised_box_iou((0, 0, 0, 0), (0, 0, 1, 1)) == pytest.approx(1 / 4)
    assert normalised_box_iou((0, 0, 9, 9), (10, 0, 19, 9)) == 0.0


def test_iou_of_round_tripped_boxes_is_high_on_small_images() -> None:
    rng = random.Random(3)
    for _ in range(200):
        box = random_box(rng, 640, 480)
        if (box[2] - box[0]) < 20 or (box[3] - box[1]) < 20:
            continue
        back = box_to_pixels(normalise_box(box, 640, 480), 640, 480)
        assert box_iou(box, back) > 0.9


def test_answer_in_pixels_maps_every_box_and_point_of_an_answer() -> None:
    from components.common.coords import answer_in_pixels

    answer = "the cat <box>[0, 0, 499, 999]</box> and its eye <point>[250, 500]</point>, junk <box>[5, 5]</box>"
    found = answer_in_pixels(answer, 640, 480)
    assert found["boxes"] == [(0.0, 0.0, 320.0, 480.0)]
    assert found["points"] == [pytest.approx((160.32, 240.24))]
    assert answer_in_pixels("no boxes here", 10, 10) == {"boxes": [], "points": []}
    with pytest.raises(ValueError):
        answer_in_pixels(answer, 0, 10)
