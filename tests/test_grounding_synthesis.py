"""Grounding and counting synthesis: labels are exact against the re-rendered visible pixels, the
image agrees with them, every referring expression denotes exactly its target, counting answers are
the true counts, layouts keep their rules, and bad arguments fail clearly."""

from __future__ import annotations

import functools
import random
import re
from itertools import combinations

import numpy as np
import pytest

from components.common.coords import normalise_box, point_to_pixels
from components.data.synthesis.grounding import (
    LAYOUTS,
    MIN_IMAGE_SIDE,
    SAME_COLOUR_GAP,
    GroundingSample,
    PlacedObject,
    box_gap,
    choose_point,
    component_count,
    describe,
    referring_expressions,
    render_grounding_sample,
    resolve_count_question,
    resolve_expression,
    shape_mask,
    visible_masks,
)
from components.data.synthetic_crawl import BACKGROUNDS, COLOURS, SHAPES

SMALL_SIZES = ((48, 48), (64, 48), (333, 777), (640, 480))
LARGE_SIZES = ((1001, 999), (1600, 900))
CASES = [(layout, w, h, seed) for layout in LAYOUTS for (w, h) in SMALL_SIZES for seed in range(4)] + [
    (layout, w, h, seed) for layout in LAYOUTS for (w, h) in LARGE_SIZES for seed in range(2)
]
QUESTION = re.compile(r"How many (?:(\w+) )?(\w+?)s are there\?")


@functools.lru_cache(maxsize=None)
def sample(layout: str, width: int, height: int, seed: int, min_visible: float = 0.4) -> GroundingSample:
    return render_grounding_sample(random.Random(f"{layout}-{seed}"), width, height, layout, min_visible)


@functools.lru_cache(maxsize=None)
def masks(layout: str, width: int, height: int, seed: int) -> tuple[np.ndarray, ...]:
    return tuple(visible_masks(sample(layout, width, height, seed)))


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


case_ids = [f"{layout}-{w}x{h}-s{seed}" for layout, w, h, seed in CASES]


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_seed_same_sample_other_seed_other_sample(layout: str) -> None:
    a = render_grounding_sample(random.Random(11), 320, 240, layout)
    b = render_grounding_sample(random.Random(11), 320, 240, layout)
    c = render_grounding_sample(random.Random(12), 320, 240, layout)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.objects, a.referring, a.counting, a.background) == (b.objects, b.referring, b.counting, b.background)
    assert a.image.tobytes() != c.image.tobytes()


# --- exact geometry labels -----------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "width", "height", "seed"), CASES, ids=case_ids)
def test_boxes_points_and_visibility_match_the_visible_pixels(layout: str, width: int, height: int, seed: int) -> None:
    s = sample(layout, width, height, seed)
    assert s.image.size == (width, height) and s.layout == layout and s.objects
    for obj, mask in zip(s.objects, masks(layout, width, height, seed), strict=True):
        assert mask.shape == (height, width) and mask.any()
        assert all(0 <= v <= 999 for v in (*obj.box, *obj.point))
        assert obj.box_px == tight_box(mask)  # the visible object touches each edge of its box
        assert obj.box == normalise_box(obj.box_px, width, height)
        x, y = point_to_pixels(obj.point, width, height)
        assert mask[int(y), int(x)], "the point must fall on a visible pixel of its object"
        assert obj.box[0] <= obj.point[0] <= obj.box[2] and obj.box[1] <= obj.point[1] <= obj.box[3]
        x0, y0, x1, y1 = obj.drawn_box
        assert x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height
        assert not mask[:y0].any() and not mask[y1:].any() and not mask[:, :x0].any() and not mask[:, x1:].any()
        assert obj.drawn_pixels == int(shape_mask(obj.shape, x1 - x0).sum())
        assert obj.visible_pixels == int(mask.sum())
        assert obj.visible_fraction == pytest.approx(obj.visible_pixels / obj.drawn_pixels)
        assert obj.visible_fraction >= s.min_visible_fraction
        assert component_count(mask[y0:y1, x0:x1]) == 1, "a visible object stays one piece"


@pytest.mark.parametrize(("layout", "width", "height", "seed"), CASES, ids=case_ids)
def test_image_pixels_are_exactly_the_masks_in_their_colours(layout: str, width: int, height: int, seed: int) -> None:
    s = sample(layout, width, height, seed)
    pixels = np.asarray(s.image)
    covered = np.zeros((height, width), dtype=bool)
    for obj, mask in zip(s.objects, masks(layout, width, height, seed)):
        x0, y0, x1, y1 = obj.drawn_box  # the mask is empty outside (checked above): look only inside
        local = mask[y0:y1, x0:x1]
        assert not (covered[y0:y1, x0:x1] & local).any(), "visible masks are disjoint"
        assert (pixels[y0:y1, x0:x1][local] == COLOURS[obj.colour]).all()
        covered[y0:y1, x0:x1] |= local
    assert (pixels[~covered] == BACKGROUNDS[s.background]).all()


@pytest.mark.parametrize(("layout", "width", "height", "seed"), CASES, ids=case_ids)
def test_layout_rules(layout: str, width: int, height: int, seed: int) -> None:
    s = sample(layout, width, height, seed)
    objects = s.objects
    for obj in objects:
        side = obj.drawn_box[2] - obj.drawn_box[0]
        assert side == obj.drawn_box[3] - obj.drawn_box[1] and obj.shape in SHAPES
        assert obj.size == ("large" if side >= 0.2 * min(width, height) else "small")
        assert obj.colour != s.background
    for a, b in combinations(objects, 2):
        if a.colour == b.colour:
            assert box_gap(a.drawn_box, b.drawn_box) >= SAME_COLOUR_GAP, "same-coloured objects never merge"
    if layout == "sparse":
        assert 1 <= len(objects) <= 4
        assert all(box_gap(a.drawn_box, b.drawn_box) >= SAME_COLOUR_GAP for a, b in combinations(objects, 2))
    elif layout == "crowded":
        assert 8 <= len(objects) <= 20
        assert all(o.size == "small" and o.visible_fraction == 1.0 for o in objects)
        assert all(box_gap(a.drawn_box, b.drawn_box) >= 0 for a, b in combinations(objects, 2))
    else:
        assert 2 <= len(objects) <= 8
        assert any(o.visible_fraction < 1.0 for o in objects), "something is occluded"


@pytest.mark.parametrize("min_visible", [0.25, 0.7])
def test_occlusion_respects_the_requested_visible_fraction(min_visible: float) -> None:
    seen = []
    for seed in range(6):
        s = sample("occluded", 400, 300, seed, min_visible)
        assert s.min_visible_fraction == min_visible
        seen += [o.visible_fraction for o in s.objects]
        for obj, mask in zip(s.objects, visible_masks(s)):
            assert mask.sum() >= min_visible * obj.drawn_pixels
    assert min(seen) < 1.0


# --- referring expressions -----------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "width", "height", "seed"), CASES, ids=case_ids)
def test_every_expression_denotes_exactly_its_target(layout: str, width: int, height: int, seed: int) -> None:
    s = sample(layout, width, height, seed)
    targets = [r["target"] for r in s.referring]
    assert len(targets) == len(set(targets))
    for entry in s.referring:
        assert resolve_expression(entry["expression"], s.objects) == [entry["target"]], entry
        target = s.objects[entry["target"]]
        assert entry["box"] == list(target.box) and entry["point"] == list(target.point)


def attribute_words(expression: str) -> list[str]:
    return [w for w in expression.split()[1:] if w != "shape"]


@pytest.mark.parametrize(("layout", "width", "height", "seed"), CASES, ids=case_ids)
def test_attribute_expressions_are_minimal(layout: str, width: int, height: int, seed: int) -> None:
    s = sample(layout, width, height, seed)
    for entry in (r for r in s.referring if r["kind"] == "attributes"):
        words = attribute_words(entry["expression"])
        assert 1 <= len(words) <= 3
        if len(s.objects) == 1:
            assert len(words) == 1
            continue
        for dropped in words:
            rest = [w for w in words if w != dropped]
            noun = rest[-1] if rest and rest[-1] in SHAPES else "shape"
            shorter = " ".join(["the", *[w for w in rest if w not in SHAPES], noun])
            assert len(resolve_expression(shorter, s.objects)) > 1, (entry, shorter)


def test_crowded_scenes_need_and_get_spatial_expressions() -> None:
    crowded = [sample("crowded", w, h, seed) for (w, h) in SMALL_SIZES for seed in range(4)]
    expressions = [r["expression"] for s in crowded for r in s.referring if r["kind"] == "spatial"]
    assert any(re.search(r"\b(left of|right of|above|below)\b", e) for e in expressions)
    assert any(re.search(r"\b(leftmost|rightmost|topmost|bottommost)\b", e) for e in expressions)
    described = sum(len(s.referring) for s in crowded)
    assert described >= 0.8 * sum(len(s.objects) for s in crowded)


def placed(shape: str, colour: str, box_px: tuple[int, int, int, int], size: str = "small") -> PlacedObject:
    return PlacedObject(shape=shape, colour=colour, size=size, box_px=box_px, box=normalise_box(box_px, 100, 100),
                        point=(0, 0), visible_fraction=1.0, drawn_box=box_px, drawn_pixels=1, visible_pixels=1)


def test_resolver_reads_attributes_relations_and_superlatives() -> None:
    objects = [
        placed("circle", "red", (0, 0, 10, 10)),
        placed("circle", "red", (50, 0, 60, 10)),
        placed("square", "blue", (20, 0, 30, 10), size="large"),
        placed("circle", "green", (80, 80, 90, 90)),
    ]
    assert resolve_expression("the red circle", objects) == [0, 1]
    assert resolve_expression("the blue shape", objects) == [2]
    assert resolve_expression("the large shape", objects) == [2]
    assert resolve_expression("the circle", objects) == [0, 1, 3]
    assert resolve_expression("the red circle left of the blue square", objects) == [0]
    assert resolve_expression("the red circle right of the blue square", objects) == [1]
    assert resolve_expression("the circle below the blue shape", objects) == [3]
    assert resolve_expression("the leftmost red circle", objects) == [0]
    assert resolve_expression("the bottommost circle", objects) == [3]
    assert resolve_expression("the red circle left of the circle", objects) == []  # ambiguous anchor
    assert resolve_expression("the purple triangle", objects) == []
    for bad in ("red circle", "the red big circle", "the circle near the square", "the circles", ""):
        with pytest.raises(ValueError):
            resolve_expression(bad, objects)


def test_objects_without_a_clear_expression_are_skipped() -> None:
    # three identical circles, each overlapping the others' extents on one axis: no clear superlative,
    # and no other object to anchor a relation on
    objects = [
        placed("circle", "red", (0, 0, 10, 10)),
        placed("circle", "red", (12, 5, 22, 15)),
        placed("circle", "red", (6, 12, 16, 22)),
    ]
    rng = random.Random(0)
    assert all(describe(i, objects, rng) is None for i in range(3))
    assert referring_expressions(objects, rng) == []
    objects.append(placed("square", "blue", (40, 0, 50, 10)))
    entries = referring_expressions(objects, rng)
    assert [e["target"] for e in entries] == [3]  # none of the circles lies wholly beside the square


def test_a_relation_needs_a_clear_margin() -> None:
    objects = [
        placed("circle", "red", (0, 0, 10, 10)),
        placed("circle", "red", (0, 30, 10, 40)),
        placed("square", "blue", (20, 0, 30, 10)),
    ]
    rng = random.Random(1)
    for target in (0, 1):
        expression, kind = describe(target, objects, rng)
        assert kind == "spatial" and resolve_expression(expression, objects) == [target]
        assert "left of" not in expression  # both circles lie left of the square


# --- counting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "width", "height", "seed"), CASES, ids=case_ids)
def test_counting_answers_are_exact(layout: str, width: int, height: int, seed: int) -> None:
    s = sample(layout, width, height, seed)
    assert s.counting
    for entry in s.counting:
        colour, noun = QUESTION.fullmatch(entry["question"]).groups()
        shape = None if noun == "shape" else noun
        assert colour is None or colour in COLOURS
        assert shape is None or shape in SHAPES
        members = [o for o in s.objects if colour in (None, o.colour) and shape in (None, o.shape)]
        assert entry["answer"] == len(members) == len(entry["boxes"]) == len(entry["points"])
        assert entry["boxes"] == [list(o.box) for o in members]
        assert len(resolve_count_question(entry["question"], s.objects)) == entry["answer"]
        assert all(o.visible_fraction >= s.min_visible_fraction for o in members)


def test_some_questions_have_zero_answers_and_crowded_counts_are_large() -> None:
    entries = [e for layout in LAYOUTS for (w, h) in SMALL_SIZES for seed in range(4)
               for e in sample(layout, w, h, seed).counting]
    assert any(e["answer"] == 0 and e["boxes"] == [] for e in entries)
    crowded = [e["answer"] for (w, h) in SMALL_SIZES for seed in range(4) for e in sample("crowded", w, h, seed).counting]
    assert max(crowded) >= 8


def test_the_first_questions_mix_every_kind_so_one_answer_does_not_dominate() -> None:
    """The step keeps the first `max_questions` (4): each kind must be there in random order, not the
    colour+shape groups first (which made three answers in four "1")."""
    first_four = [e for layout in LAYOUTS for (w, h) in SMALL_SIZES for seed in range(4)
                  for e in sample(layout, w, h, seed).counting[:4]]
    kinds = {(e["colour"] is not None, e["shape"] is not None) for e in first_four}
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}
    answers = [e["answer"] for e in first_four]
    assert max(answers.count(a) for a in set(answers)) < 0.5 * len(answers)
    assert answers.count(0) >= 0.1 * len(answers)
    first = {(e["colour"] is not None, e["shape"] is not None) for layout in LAYOUTS for seed in range(4)
             for e in sample(layout, 333, 777, seed).counting[:1]}
    assert len(first) >= 3


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "layout", "min_visible"),
    [
        (320, 240, "scattered", 0.4),
        (MIN_IMAGE_SIDE - 1, 240, "sparse", 0.4),
        (320, 10, "crowded", 0.4),
        (0, 0, "sparse", 0.4),
        (320, 240, "occluded", 0.0),
        (320, 240, "sparse", 1.5),
        (320, 240, "occluded", 1.0),
    ],
)
def test_bad_arguments_raise_value_error(width: int, height: int, layout: str, min_visible: float) -> None:
    with pytest.raises(ValueError):
        render_grounding_sample(random.Random(0), width, height, layout, min_visible)


def test_component_count() -> None:
    assert component_count(np.zeros((3, 3), dtype=bool)) == 0
    assert component_count(np.ones((3, 3), dtype=bool)) == 1
    assert component_count(np.eye(3, dtype=bool)) == 3  # diagonal neighbours are not 4-connected
    ring = np.ones((5, 5), dtype=bool)
    ring[1:4, 1:4] = False
    assert component_count(ring) == 1
    u = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)
    assert component_count(u) == 1
    split = np.array([[1, 1, 0, 1], [0, 0, 0, 1]], dtype=bool)
    assert component_count(split) == 2


def test_points_land_on_visible_pixels_even_when_bins_span_several_pixels() -> None:
    # in a 4000 px image a bin is 4 px wide: pixel column 2001 sits in bin 500, whose centre is 2002.0
    box = (2000, 2000, 2004, 2040)
    line = np.zeros((40, 4), dtype=bool)
    line[:, 1] = True
    assert choose_point(line, box, 4000, 4000) is None  # no point maps back onto a 1 px line there
    line[:, 2] = True
    point = choose_point(line, box, 4000, 4000)
    x, y = point_to_pixels(point, 4000, 4000)
    assert line[int(y) - box[1], int(x) - box[0]]


@pytest.mark.parametrize("side", [8, 9, 31, 300])
def test_shape_masks_fill_their_square_and_differ(side: int) -> None:
    drawn = {shape: shape_mask(shape, side) for shape in SHAPES}
    for mask in drawn.values():
        assert mask.shape == (side, side) and not mask.flags.writeable
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert component_count(mask) == 1
    assert len({mask.tobytes() for mask in drawn.values()}) == len(SHAPES)
    assert drawn["square"].all() and not drawn["circle"].all()
