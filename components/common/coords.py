"""The [0, 999] coordinate convention: how pixel points and boxes become the integers that training
targets and model answers carry, how those integers go back to pixels, and their text form.

Seed1.5-VL writes every point and box as integers in [0, 999] whatever the image size. This module
owns the one exact rule the project uses, *floor binning*:

* An axis of `size` pixels is the continuous interval [0, size], cut into 1000 equal bins of width
  `size / 1000`. A pixel coordinate `x` (continuous: pixel `p` spans [p, p + 1) and its centre is
  `p + 0.5`) goes to the bin that contains it::

      n = min(999, floor(x * 1000 / size))          # x == size (the far edge) joins the last bin

* Going back, a point is the centre of its bin: `x' = (n + 0.5) * size / 1000`. The round trip
  error `|x' - x|` is at most half a bin (`size / 2000`, so <= 0.5 px for sizes <= 1000) for
  `0 <= x < size`, and exactly half a bin for `x == size`. For sizes <= 1000 the centres of
  distinct pixels get distinct bins and the bin of pixel p's centre has its own centre inside
  pixel p (so `floor(x')` gives p back); for sizes >= 1000 every bin holds some pixel centre.

* A pixel box `(x0, y0, x1, y1)` with exclusive `x1`/`y1` (the pixels x0 <= x < x1) becomes the
  *inclusive range of bins its area touches*::

      (floor(x0 * 1000 / W), floor(y0 * 1000 / H), ceil(x1 * 1000 / W) - 1, ceil(y1 * 1000 / H) - 1)

  so a normalised box `[a, b, c, d]` has `a <= c` and `b <= d` and names bins a..c and b..d.
  `box_to_pixels` returns the pixel area of those bins, `(a * W / 1000, b * H / 1000,
  (c + 1) * W / 1000, (d + 1) * H / 1000)`: it always covers the original box, overshooting
  each side by less than one bin, and boxes whose edges sit on bin edges come back exactly.

The text form is `<box>[x0, y0, x1, y1]</box>` and `<point>[x, y]</point>`; `parse_boxes` and
`parse_points` read every well-formed one out of a model answer and skip the rest. Integer inputs
are converted with exact integer arithmetic; float inputs with exact rational arithmetic.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from fractions import Fraction

BINS = 1000
MAX_COORD = BINS - 1

_NUM = r"\s*(\d{1,9})\s*"
_BOX_RE = re.compile(r"<box>\s*\[" + ",".join([_NUM] * 4) + r"\]\s*</box>")
_POINT_RE = re.compile(r"<point>\s*\[" + ",".join([_NUM] * 2) + r"\]\s*</point>")


# --- validation ----------------------------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"image {name} must be an integer >= 1, got {value!r}")


def _exact(value: float, name: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return Fraction(int(value))
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return Fraction(float(value))


def _pixel(value: float, size: int, name: str) -> Fraction:
    exact = _exact(value, name)
    if exact < 0 or exact > size:
        raise ValueError(f"{name}={value!r} lies outside the image axis [0, {size}]")
    return exact


def _normalised(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"normalised {name} must be an integer in [0, {MAX_COORD}], got {value!r}")
    if not 0 <= value <= MAX_COORD:
        raise ValueError(f"normalised {name}={value!r} lies outside [0, {MAX_COORD}]")
    return int(value)


def _unpack(values: Sequence[float], count: int, what: str) -> tuple:
    items = tuple(values)
    if len(items) != count:
        raise ValueError(f"a {what} has {count} coordinates, got {len(items)}: {values!r}")
    return items


# --- points --------------------------------------------------------------------------------------


def _bin(x: Fraction, size: int) -> int:
    return min(MAX_COORD, math.floor(x * BINS / size))


def normalise_point(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """The bins of pixel coordinates (x, y), each in [0, width] / [0, height]: `min(999, floor(x*1000/W))`."""
    _check_size(width, height)
    return _bin(_pixel(x, width, "x"), width), _bin(_pixel(y, height, "y"), height)


def point_to_pixels(point: Sequence[int], width: int, height: int) -> tuple[float, float]:
    """The pixel coordinates of the centre of a normalised point's bins: `(n + 0.5) * size / 1000`."""
    _check_size(width, height)
    nx, ny = _unpack(point, 2, "point")
    nx, ny = _normalised(nx, "x"), _normalised(ny, "y")
    return (nx + 0.5) * width / BINS, (ny + 0.5) * height / BINS


# --- boxes ---------------------------------------------------------------------------------------


def normalise_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The inclusive bin range a pixel box (x0, y0, x1, y1; x1/y1 exclusive, x0 < x1, y0 < y1) touches."""
    _check_size(width, height)
    x0, y0, x1, y1 = _unpack(box, 4, "box")
    x0, x1 = _pixel(x0, width, "x0"), _pixel(x1, width, "x1")
    y0, y1 = _pixel(y0, height, "y0"), _pixel(y1, height, "y1")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"a pixel box needs x0 < x1 and y0 < y1, got {tuple(box)!r}")
    return (
        _bin(x0, width),
        _bin(y0, height),
        math.ceil(x1 * BINS / width) - 1,
        math.ceil(y1 * BINS / height) - 1,
    )


def _check_normalised_box(box: Sequence[int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = _unpack(box, 4, "box")
    x0, y0 = _normalised(x0, "x0"), _normalised(y0, "y0")
    x1, y1 = _normalised(x1, "x1"), _normalised(y1, "y1")
    if x0 > x1 or y0 > y1:
        raise ValueError(f"a normalised box needs x0 <= x1 and y0 <= y1, got {tuple(box)!r}")
    return x0, y0, x1, y1


def box_to_pixels(box: Sequence[int], width: int, height: int) -> tuple[float, float, float, float]:
    """The pixel area (x1/y1 exclusive) of a normalised box's bins; it covers the box it came from."""
    _check_size(width, height)
    x0, y0, x1, y1 = _check_normalised_box(box)
    return x0 * width / BINS, y0 * height / BINS, (x1 + 1) * width / BINS, (y1 + 1) * height / BINS


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two corner boxes (x0, y0, x1, y1) in one frame, x1/y1 exclusive.

    Use it on pixel boxes; for two normalised (inclusive-bin) boxes use `normalised_box_iou`.
    An empty union gives 0.0.
    """
    ax0, ay0, ax1, ay1 = (float(v) for v in _unpack(a, 4, "box"))
    bx0, by0, bx1, by1 = (float(v) for v in _unpack(b, 4, "box"))
    for x0, y0, x1, y1 in ((ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1)):
        if x1 < x0 or y1 < y0:
            raise ValueError(f"a box needs x0 <= x1 and y0 <= y1, got {(x0, y0, x1, y1)!r}")
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def normalised_box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two normalised boxes as the bin areas they name (the same for every image size)."""
    return box_iou(box_to_pixels(a, BINS, BINS), box_to_pixels(b, BINS, BINS))


# --- text form -----------------------------------------------------------------------------------


def format_box(box: Sequence[int]) -> str:
    """`<box>[x0, y0, x1, y1]</box>` for a valid normalised box."""
    x0, y0, x1, y1 = _check_normalised_box(box)
    return f"<box>[{x0}, {y0}, {x1}, {y1}]</box>"


def format_point(point: Sequence[int]) -> str:
    """`<point>[x, y]</point>` for a valid normalised point."""
    x, y = _unpack(point, 2, "point")
    return f"<point>[{_normalised(x, 'x')}, {_normalised(y, 'y')}]</point>"


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every well-formed `<box>[x0, y0, x1, y1]</box>` in `text`, in order.

    Malformed ones (wrong count, non-integers, negatives, values > 999, x0 > x1 or y0 > y1) are skipped.
    """
    boxes: list[tuple[int, int, int, int]] = []
    for match in _BOX_RE.finditer(text):
        x0, y0, x1, y1 = (int(g) for g in match.groups())
        if max(x0, y0, x1, y1) <= MAX_COORD and x0 <= x1 and y0 <= y1:
            boxes.append((x0, y0, x1, y1))
    return boxes


def parse_points(text: str) -> list[tuple[int, int]]:
    """Every well-formed `<point>[x, y]</point>` in `text`, in order; malformed ones are skipped."""
    points: list[tuple[int, int]] = []
    for match in _POINT_RE.finditer(text):
        x, y = (int(g) for g in match.groups())
        if max(x, y) <= MAX_COORD:
            points.append((x, y))
    return points


def answer_in_pixels(text: str, width: int, height: int) -> dict[str, list[tuple[float, ...]]]:
    """The boxes and points of a model answer mapped to pixels of a `width` x `height` image (the one
    the question was asked about): `{"boxes": [(x0, y0, x1, y1), ...], "points": [(x, y), ...]}`, boxes
    with exclusive x1/y1 covering their bins, points at their bin centres."""
    _check_size(width, height)
    return {"boxes": [box_to_pixels(box, width, height) for box in parse_boxes(text)],
            "points": [point_to_pixels(point, width, height) for point in parse_points(text)]}
