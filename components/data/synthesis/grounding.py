"""Synthetic grounding and counting samples with exact labels: coloured shapes drawn at known places,
their visible boxes and points in [0, 999] coordinates, referring expressions that each denote
exactly one object, and counting questions with exact answers.

A sample is one of three layouts (`LAYOUTS`):

* `sparse`: 1-4 objects, small or large, kept apart (a gap of background between any two);
* `crowded`: 8-20 small objects on a jittered grid, one per cell; neighbours may touch;
* `occluded`: 2-8 objects (3-8 attempted; a placement that keeps failing is dropped) in clusters:
  most objects after the first are drawn over part of an earlier one (at least one is), the
  others stand apart and start a new cluster.
  Every object keeps at least `min_visible_fraction` of its drawn pixels visible and its visible
  pixels stay one 4-connected piece, so each object is still seen, and counted, as one object.

Rules shared by all layouts, so that the labels are exact and the image agrees with them:

* Shapes and colours are the crawl's vocabulary (`synthetic_crawl.SHAPES`, `COLOURS`); an object
  never has the background's colour name, and two objects of one colour never touch or overlap
  (at least `SAME_COLOUR_GAP` background pixels between their drawn squares), so same-coloured
  objects never merge into one blob.
* Each object is drawn without anti-aliasing into a square `drawn_box` (x1/y1 exclusive) as a
  per-object mask (`shape_mask`); the image is the background with the masks painted in drawing
  order, so later objects cover earlier ones and `visible_masks` recomputes every visible pixel.
* `size` is "large" when the drawn side is >= `LARGE_SIDE_RATIO` (0.2) x the image's shorter side,
  else "small". Sides are drawn from two separated ranges (small <= 0.15, large >= 0.24 of the
  shorter side; `MIN_OBJECT_SIDE` px at least), so the word is never borderline.
* `box_px` is the tight pixel box of the visible pixels; `box = coords.normalise_box(box_px)`.
  `point` is a visible pixel as deep inside the visible region as possible (up to 16 4-neighbour
  erosions) and nearest its centroid, chosen so that `coords.point_to_pixels(point)` falls on a visible pixel
  of the same object at every image size.

Referring expressions use the fewest attributes (size, colour, shape) that single the target out
("the blue square", "the small red circle"). When even all three leave it ambiguous, a spatial
phrase is added: a superlative over the matching objects ("the leftmost green triangle") or a
relation to another object that attributes alone describe ("the red circle left of the blue
square"). Generation demands a clear margin (the target's visible box lies wholly beyond the
other matching objects' / the anchor's, and no other matching object has even its centre on the
anchor's side), while `resolve_expression` reads the words back with the lenient centre-based
meaning, so a unique answer there is unique to a viewer too; targets without such an expression
are skipped. Counting questions ask about colour+shape
groups, shapes, colours and all shapes, sometimes about an absent group (answer 0); the answer is
the number of objects that match, with their boxes and points.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from components.common.coords import normalise_box, normalise_point, point_to_pixels
from components.data.synthetic_crawl import BACKGROUNDS, COLOURS, SHAPES

LAYOUTS = ("sparse", "crowded", "occluded")
SIZES = ("small", "large")
ATTRIBUTES = ("size", "colour", "shape")
SUPERLATIVES = ("leftmost", "rightmost", "topmost", "bottommost")
RELATIONS = ("left of", "right of", "above", "below")

MIN_IMAGE_SIDE = 48  # the shorter side; below it 20 crowded objects of MIN_OBJECT_SIDE px do not fit
MIN_OBJECT_SIDE = 8  # px: smaller shapes stop being recognisable
LARGE_SIDE_RATIO = 0.2  # size is "large" iff drawn side >= this x the image's shorter side
SMALL_SIDE_RANGE = (0.07, 0.15)  # of the shorter side, sampled for "small" objects
LARGE_SIDE_RANGE = (0.24, 0.34)  # of the shorter side, sampled for "large" objects
SAME_COLOUR_GAP = 3  # px of background at least between two objects of one colour
SPARSE_GAP_RATIO = 0.04  # of the shorter side: background between any two sparse objects
MAX_OCCLUDED_VISIBLE_FRACTION = 0.9  # some pixels must be hidden for a layout to be 'occluded'
FREE_OBJECT_RATE = 0.3  # occluded layout: chance that an object stands apart, starting a new cluster
MAX_LAYOUT_ATTEMPTS = 200
MAX_CACHED_SIDE = 256  # masks up to this side are cached (<= 64 KiB each, 1024 of them at most)
MAX_PLACEMENT_ATTEMPTS = 80

Box = tuple[int, int, int, int]


@dataclass
class PlacedObject:
    """One drawn object and its exact labels; pixel boxes have x1/y1 exclusive."""

    shape: str
    colour: str
    size: str  # "small" | "large": see `size_class`
    box_px: Box  # tight pixel box of the VISIBLE pixels
    box: Box  # normalise_box(box_px), in [0, 999]
    point: tuple[int, int]  # normalised point whose pixel is a visible pixel of this object
    visible_fraction: float  # visible pixels / drawn pixels
    drawn_box: Box  # the square the shape was drawn into (re-rendering needs only this and `shape`)
    drawn_pixels: int
    visible_pixels: int


@dataclass
class GroundingSample:
    """A rendered scene, its objects in drawing order (later on top), and the questions about it."""

    image: Image.Image
    background: str
    layout: str
    objects: list[PlacedObject]
    referring: list[dict[str, Any]]  # {"expression", "target", "box", "point", "kind"}
    counting: list[dict[str, Any]]  # {"question", "answer", "boxes", "points", "colour", "shape"}
    min_visible_fraction: float


@dataclass
class _Draft:
    shape: str
    colour: str
    side: int
    x: int
    y: int

    @property
    def box(self) -> Box:
        return self.x, self.y, self.x + self.side, self.y + self.side


# --- geometry ------------------------------------------------------------------------------------


def size_class(side: int, width: int, height: int) -> str:
    """The size word of a drawn side: "large" iff side >= LARGE_SIDE_RATIO x the shorter image side."""
    return "large" if side >= LARGE_SIDE_RATIO * min(width, height) else "small"


def shape_mask(shape: str, side: int) -> np.ndarray:
    """The read-only bool (side, side) mask of a shape drawn into a side x side square at the origin."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if side < 1:
        raise ValueError(f"a shape needs a side >= 1 px, got {side!r}")
    return _cached_mask(shape, side) if side <= MAX_CACHED_SIDE else _draw_mask(shape, side)


@functools.lru_cache(maxsize=1024)
def _cached_mask(shape: str, side: int) -> np.ndarray:
    return _draw_mask(shape, side)


def _draw_mask(shape: str, side: int) -> np.ndarray:
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    e, m = side - 1, (side - 1) // 2
    if shape == "circle":
        draw.ellipse((0, 0, e, e), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, e, e), fill=255)
    elif shape == "triangle":
        draw.polygon([(m, 0), (e, e), (0, e)], fill=255)
    else:
        draw.polygon([(m, 0), (e, m), (m, e), (0, m)], fill=255)
    mask = np.asarray(canvas) > 0
    mask.setflags(write=False)
    return mask


def box_gap(a: Box, b: Box) -> int:
    """Background pixels between two exclusive boxes along their separating axis (< 0: they overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _overlap(a: Box, b: Box) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices of the shared area in a's and in b's local frames, or None when they do not overlap."""
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    if x0 >= x1 or y0 >= y1:
        return None
    in_a = (slice(y0 - a[1], y1 - a[1]), slice(x0 - a[0], x1 - a[0]))
    in_b = (slice(y0 - b[1], y1 - b[1]), slice(x0 - b[0], x1 - b[0]))
    return in_a, in_b


def _visible_local(shapes: Sequence[str], boxes: Sequence[Box], index: int) -> np.ndarray:
    """Object `index`'s visible pixels in its drawn box: its mask less every later object's mask."""
    box = boxes[index]
    visible = shape_mask(shapes[index], box[2] - box[0]).copy()
    for later in range(index + 1, len(boxes)):
        shared = _overlap(box, boxes[later])
        if shared is not None:
            mine, theirs = shared
            visible[mine] &= ~shape_mask(shapes[later], boxes[later][2] - boxes[later][0])[theirs]
    return visible


def component_count(mask: np.ndarray) -> int:
    """Number of 4-connected pieces of a bool mask (row runs joined by union-find)."""
    padded = np.pad(mask, ((0, 0), (1, 1)))
    rows, cols = np.nonzero(padded[:, 1:] != padded[:, :-1])
    parent: list[int] = []

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[tuple[int, int, int]] = []
    current: list[tuple[int, int, int]] = []
    current_row = -1
    for k in range(0, len(rows), 2):
        row, start, end = int(rows[k]), int(cols[k]), int(cols[k + 1])
        if row != current_row:
            previous = current if row == current_row + 1 else []
            current, current_row = [], row
        label = len(parent)
        parent.append(label)
        for p_start, p_end, p_label in previous:
            if p_start < end and start < p_end:
                parent[root(p_label)] = root(label)
        current.append((start, end, label))
    return sum(1 for i in range(len(parent)) if root(i) == i)


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def _inner_levels(mask: np.ndarray, max_depth: int = 16) -> list[np.ndarray]:
    """The mask and its successive 4-neighbour erosions while non-empty, deepest last."""
    levels = [mask]
    while len(levels) <= max_depth:
        eroded = _erode(levels[-1])
        if not eroded.any():
            break
        levels.append(eroded)
    return levels


def choose_point(visible: np.ndarray, box: Box, width: int, height: int) -> tuple[int, int] | None:
    """A normalised point that maps back onto a visible pixel: deepest level first, nearest the centroid."""
    ys, xs = np.nonzero(visible)
    cy, cx = ys.mean(), xs.mean()
    for level in reversed(_inner_levels(visible)):
        ly, lx = np.nonzero(level)
        distance = (ly - cy) ** 2 + (lx - cx) ** 2
        nearest = int(np.argmin(distance))  # nearly always lands back on itself; else try the rest in order
        for k in itertools.chain([nearest], np.argsort(distance, kind="stable")):
            point = normalise_point(box[0] + int(lx[k]) + 0.5, box[1] + int(ly[k]) + 0.5, width, height)
            if _lands_on(point, visible, box, width, height):
                return point
    return None


def _lands_on(point: tuple[int, int], visible: np.ndarray, box: Box, width: int, height: int) -> bool:
    """Whether the pixel under `point_to_pixels(point)` is one of `visible` (local to `box`)."""
    px, py = point_to_pixels(point, width, height)
    bx, by = int(px) - box[0], int(py) - box[1]
    return 0 <= by < visible.shape[0] and 0 <= bx < visible.shape[1] and bool(visible[by, bx])


# --- placement -----------------------------------------------------------------------------------


def _sample_side(rng: random.Random, size: str, short: int) -> int:
    """A drawn side for a size class; small stays < and large >= LARGE_SIDE_RATIO x `short`."""
    low, high = SMALL_SIDE_RANGE if size == "small" else LARGE_SIDE_RANGE
    return rng.randint(max(MIN_OBJECT_SIDE, math.ceil(low * short)), max(MIN_OBJECT_SIDE, math.floor(high * short)))


def _colour_for(rng: random.Random, box: Box, drafts: Sequence[_Draft], palette: Sequence[str]) -> str | None:
    """A random colour that no object within SAME_COLOUR_GAP of `box` already has."""
    taken = {d.colour for d in drafts if box_gap(box, d.box) < SAME_COLOUR_GAP}
    free = [c for c in palette if c not in taken]
    return rng.choice(free) if free else None


def _apart(rng: random.Random, drafts: Sequence[_Draft], width: int, height: int, palette: Sequence[str]) -> _Draft | None:
    """A candidate object of either size at a random place, or None if it comes too close to another."""
    short = min(width, height)
    gap = max(SAME_COLOUR_GAP, round(SPARSE_GAP_RATIO * short))
    side = _sample_side(rng, rng.choice(SIZES), short)
    x, y = rng.randint(0, width - side), rng.randint(0, height - side)
    if any(box_gap((x, y, x + side, y + side), d.box) < gap for d in drafts):
        return None
    return _Draft(rng.choice(SHAPES), rng.choice(palette), side, x, y)


def _place_sparse(rng: random.Random, width: int, height: int, palette: Sequence[str]) -> list[_Draft]:
    drafts: list[_Draft] = []
    for _ in range(rng.randint(1, 4)):
        for _ in range(MAX_PLACEMENT_ATTEMPTS):
            draft = _apart(rng, drafts, width, height, palette)
            if draft is not None:
                drafts.append(draft)
                break
    return drafts


def _grid(count: int, width: int, height: int) -> tuple[int, int]:
    """Columns and rows with at least `count` cells whose smaller cell side is largest."""
    best = (1, count)
    for cols in range(1, count + 1):
        rows = -(-count // cols)
        if min(width // cols, height // rows) > min(width // best[0], height // best[1]):
            best = (cols, rows)
    return best


def _place_crowded(rng: random.Random, width: int, height: int, palette: Sequence[str]) -> list[_Draft]:
    count = rng.randint(8, 20)
    cols, rows = _grid(count, width, height)
    cell_w, cell_h = width // cols, height // rows
    limit = min(cell_w, cell_h)
    if limit < MIN_OBJECT_SIDE:
        raise RuntimeError(f"{count} objects do not fit a {width}x{height} image")
    origin_x, origin_y = rng.randint(0, width - cols * cell_w), rng.randint(0, height - rows * cell_h)
    drafts: list[_Draft] = []
    for cell in sorted(rng.sample(range(cols * rows), count)):
        row, col = divmod(cell, cols)
        side = min(limit, _sample_side(rng, "small", min(width, height)))
        x = origin_x + col * cell_w + rng.randint(0, cell_w - side)
        y = origin_y + row * cell_h + rng.randint(0, cell_h - side)
        colour = _colour_for(rng, (x, y, x + side, y + side), drafts, palette)
        if colour is None:
            return []
        drafts.append(_Draft(rng.choice(SHAPES), colour, side, x, y))
    return drafts


def _occlusion_ok(drafts: Sequence[_Draft], min_visible: float) -> bool:
    """Whether the newest draft covers part of an earlier one and leaves each enough, in one piece."""
    shapes, boxes = [d.shape for d in drafts], [d.box for d in drafts]
    covered = False
    for index in range(len(drafts) - 1):
        if _overlap(boxes[index], boxes[-1]) is None:
            continue
        visible = _visible_local(shapes, boxes, index)
        drawn = int(shape_mask(shapes[index], drafts[index].side).sum())
        shown = int(visible.sum())
        if shown < min_visible * drawn or component_count(visible) != 1:
            return False
        before = _visible_local(shapes[:-1], boxes[:-1], index)
        covered = covered or shown < int(before.sum())
    return covered


def _place_occluded(
    rng: random.Random, width: int, height: int, palette: Sequence[str], min_visible: float
) -> list[_Draft]:
    """3-8 objects; each after the first covers part of an earlier one (or, 30% of the time, stands
    apart, so scenes hold several clusters). Empty when no object ended up covering another."""
    drafts: list[_Draft] = []
    occluders = 0
    for _ in range(rng.randint(3, 8)):
        alone = not drafts or rng.random() < FREE_OBJECT_RATE
        for _ in range(MAX_PLACEMENT_ATTEMPTS):
            if alone:
                draft = _apart(rng, drafts, width, height, palette)
            else:
                draft = _occluder(rng, drafts, min(width, height), width, height, palette)
                draft = draft if draft is not None and _occlusion_ok([*drafts, draft], min_visible) else None
            if draft is not None:
                drafts.append(draft)
                occluders += not alone
                break
    return drafts if occluders else []


def _occluder(
    rng: random.Random, drafts: Sequence[_Draft], short: int, width: int, height: int, palette: Sequence[str]
) -> _Draft | None:
    """A candidate object centred near a random earlier one so that the two overlap."""
    anchor = rng.choice(drafts)
    side = _sample_side(rng, rng.choice(SIZES), short)
    reach = 0.75 * (side + anchor.side) / 2
    cx = anchor.x + anchor.side / 2 + rng.uniform(-reach, reach)
    cy = anchor.y + anchor.side / 2 + rng.uniform(-reach, reach)
    x = min(max(0, round(cx - side / 2)), width - side)
    y = min(max(0, round(cy - side / 2)), height - side)
    colour = _colour_for(rng, (x, y, x + side, y + side), drafts, palette)
    return None if colour is None else _Draft(rng.choice(SHAPES), colour, side, x, y)


# --- labels --------------------------------------------------------------------------------------


def _finalise(drafts: Sequence[_Draft], width: int, height: int, min_visible: float) -> list[PlacedObject] | None:
    """Exact labels for each draft, or None when an object is too hidden, split, or has no point."""
    shapes, boxes = [d.shape for d in drafts], [d.box for d in drafts]
    objects: list[PlacedObject] = []
    for index, draft in enumerate(drafts):
        visible = _visible_local(shapes, boxes, index)
        drawn, shown = int(shape_mask(draft.shape, draft.side).sum()), int(visible.sum())
        if shown == 0 or shown < min_visible * drawn or component_count(visible) != 1:
            return None
        point = choose_point(visible, draft.box, width, height)
        if point is None:
            return None
        ys, xs = np.nonzero(visible)
        box_px = (draft.x + int(xs.min()), draft.y + int(ys.min()), draft.x + int(xs.max()) + 1,
                  draft.y + int(ys.max()) + 1)
        objects.append(PlacedObject(
            shape=draft.shape, colour=draft.colour, size=size_class(draft.side, width, height), box_px=box_px,
            box=normalise_box(box_px, width, height), point=point, visible_fraction=shown / drawn,
            drawn_box=draft.box, drawn_pixels=drawn, visible_pixels=shown,
        ))
    return objects


def _paint(width: int, height: int, background: str, drafts: Sequence[_Draft]) -> Image.Image:
    """The background with each draft's mask painted in its colour, in drawing order."""
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    for d in drafts:
        mask = Image.fromarray(shape_mask(d.shape, d.side).astype(np.uint8) * 255, "L")
        image.paste(COLOURS[d.colour], d.box, mask)
    return image


def visible_masks(sample: GroundingSample) -> list[np.ndarray]:
    """Bool (height, width) visible pixels of each object, re-rendered from shapes and drawn boxes."""
    width, height = sample.image.size
    shapes, boxes = [o.shape for o in sample.objects], [o.drawn_box for o in sample.objects]
    masks = []
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        full = np.zeros((height, width), dtype=bool)
        full[y0:y1, x0:x1] = _visible_local(shapes, boxes, index)
        masks.append(full)
    return masks


# --- referring expressions -----------------------------------------------------------------------


_NP = (r"(?:(?P<{p}size>small|large) )?(?:(?P<{p}colour>" + "|".join(COLOURS) + r") )?"
       r"(?P<{p}shape>" + "|".join(SHAPES) + r"|shape)")
_EXPRESSION_RE = re.compile(
    r"the (?:(?P<superlative>" + "|".join(SUPERLATIVES) + r") )?" + _NP.format(p="t")
    + r"(?: (?P<relation>" + "|".join(RELATIONS) + r") the " + _NP.format(p="a") + r")?"
)
_QUESTION_RE = re.compile(
    r"How many (?:(?P<colour>" + "|".join(COLOURS) + r") )?(?P<shape>" + "|".join(SHAPES)
    + r"|shape)s are there\?"
)


def noun_phrase(attributes: dict[str, str]) -> str:
    """Words for an attribute set in fixed order: size, colour, then the shape or 'shape'."""
    words = [attributes[a] for a in ("size", "colour") if a in attributes]
    return " ".join([*words, attributes.get("shape", "shape")])


def _attributes(obj: PlacedObject, names: Sequence[str]) -> dict[str, str]:
    return {name: getattr(obj, name) for name in names}


def _matching(attributes: dict[str, str], objects: Sequence[PlacedObject]) -> list[int]:
    return [i for i, o in enumerate(objects) if all(getattr(o, k) == v for k, v in attributes.items())]


def _centre2(obj: PlacedObject) -> tuple[int, int]:
    """Twice the centre of the visible box (integers, so comparisons are exact)."""
    x0, y0, x1, y1 = obj.box_px
    return x0 + x1, y0 + y1


def _loosely(obj: PlacedObject, anchor: PlacedObject, relation: str) -> bool:
    """The reading `resolve_expression` uses: the visible centre lies on that side of the anchor's."""
    (ox, oy), (ax, ay) = _centre2(obj), _centre2(anchor)
    return {"left of": ox < ax, "right of": ox > ax, "above": oy < ay, "below": oy > ay}[relation]


def _strictly(obj: PlacedObject, anchor: PlacedObject, relation: str) -> bool:
    """The margin generation demands: the visible box lies wholly on that side of the other's."""
    o, a = obj.box_px, anchor.box_px
    return {"left of": o[2] <= a[0], "right of": o[0] >= a[2], "above": o[3] <= a[1], "below": o[1] >= a[3]}[relation]


_SUPERLATIVE_RELATION = {"leftmost": "left of", "rightmost": "right of", "topmost": "above", "bottommost": "below"}


def _extreme(indices: Sequence[int], objects: Sequence[PlacedObject], superlative: str) -> list[int]:
    axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}[superlative]
    keys = {i: sign * _centre2(objects[i])[axis] for i in indices}
    best = min(keys.values(), default=None)
    return [i for i in indices if keys[i] == best]


def resolve_expression(expression: str, objects: Sequence[PlacedObject]) -> list[int]:
    """Indices of the objects an expression from this module denotes, read back from its words.

    Attributes filter the objects; a relation keeps those whose visible-box centre lies on that
    side of the anchor's (the anchor phrase must denote exactly one object, else nothing matches);
    a superlative keeps the most extreme visible-box centre (ties all kept).
    Raises ValueError for text outside the grammar.
    """
    match = _EXPRESSION_RE.fullmatch(expression.strip())
    if match is None:
        raise ValueError(f"not a referring expression of this grammar: {expression!r}")
    groups = match.groupdict()
    found = _matching(_phrase_attributes(groups, "t"), objects)
    if groups["relation"]:
        anchors = _matching(_phrase_attributes(groups, "a"), objects)
        if len(anchors) != 1:
            return []
        anchor = objects[anchors[0]]
        found = [i for i in found if i != anchors[0] and _loosely(objects[i], anchor, groups["relation"])]
    if groups["superlative"]:
        found = _extreme(found, objects, groups["superlative"])
    return found


def _phrase_attributes(groups: dict[str, str | None], prefix: str) -> dict[str, str]:
    attributes = {name: groups[prefix + name] for name in ATTRIBUTES if groups[prefix + name]}
    if attributes.get("shape") == "shape":
        del attributes["shape"]
    return attributes


def _subsets(rng: random.Random) -> list[tuple[str, ...]]:
    """Non-empty attribute subsets, fewest first, shuffled within each length."""
    ordered: list[tuple[str, ...]] = []
    for k in range(1, len(ATTRIBUTES) + 1):
        same_length = list(itertools.combinations(ATTRIBUTES, k))
        rng.shuffle(same_length)
        ordered += same_length
    return ordered


def _attribute_phrase(target: int, objects: Sequence[PlacedObject], subsets: Sequence[tuple[str, ...]]) -> str | None:
    for names in subsets:
        attributes = _attributes(objects[target], names)
        if _matching(attributes, objects) == [target]:
            return noun_phrase(attributes)
    return None


def _spatial_options(
    target: int, group: Sequence[int], phrase: str, objects: Sequence[PlacedObject], anchors: dict[int, str]
) -> list[str]:
    """Superlatives and relations over `group` that single out `target` with a clear margin."""
    others = [objects[i] for i in group if i != target]
    obj = objects[target]
    options = [f"the {s} {phrase}" for s, rel in _SUPERLATIVE_RELATION.items()
               if all(_strictly(obj, other, rel) for other in others)]
    for anchor_index, anchor_phrase in anchors.items():
        if anchor_index in group:
            continue
        anchor = objects[anchor_index]
        options += [f"the {phrase} {rel} the {anchor_phrase}" for rel in RELATIONS
                    if _strictly(obj, anchor, rel) and not any(_loosely(o, anchor, rel) for o in others)]
    return options


def describe(target: int, objects: Sequence[PlacedObject], rng: random.Random) -> tuple[str, str] | None:
    """(expression, kind) denoting only `target`, kind "attributes" | "spatial"; None if none is clear."""
    subsets = _subsets(rng)
    phrases = [_attribute_phrase(i, objects, subsets) for i in range(len(objects))]
    return _describe(target, objects, rng, subsets, phrases)


def _describe(
    target: int, objects: Sequence[PlacedObject], rng: random.Random, subsets: Sequence[tuple[str, ...]],
    phrases: Sequence[str | None],
) -> tuple[str, str] | None:
    if phrases[target] is not None:
        return f"the {phrases[target]}", "attributes"
    anchors = {i: p for i, p in enumerate(phrases) if p is not None}
    for length in range(1, len(ATTRIBUTES) + 1):
        options: list[str] = []
        for names in (s for s in subsets if len(s) == length):
            attributes = _attributes(objects[target], names)
            group = _matching(attributes, objects)
            options += _spatial_options(target, group, noun_phrase(attributes), objects, anchors)
        if options:
            return rng.choice(options), "spatial"
    return None


def referring_expressions(objects: Sequence[PlacedObject], rng: random.Random) -> list[dict[str, Any]]:
    """One expression for every object that can be singled out, with its box and point."""
    subsets = _subsets(rng)  # one attribute preference order per sample
    phrases = [_attribute_phrase(i, objects, subsets) for i in range(len(objects))]
    entries = []
    for target, obj in enumerate(objects):
        described = _describe(target, objects, rng, subsets, phrases)
        if described is not None:
            expression, kind = described
            entries.append({"expression": expression, "target": target, "box": list(obj.box),
                            "point": list(obj.point), "kind": kind})
    return entries


# --- counting ------------------------------------------------------------------------------------


def count_question(colour: str | None, shape: str | None) -> str:
    """'How many red circles are there?', 'How many red shapes ...', 'How many shapes ...'."""
    words = [w for w in (colour, shape or "shape") if w]
    return f"How many {' '.join(words)}s are there?"


def resolve_count_question(question: str, objects: Sequence[PlacedObject]) -> list[int]:
    """Indices of the objects a counting question from `count_question` asks about."""
    match = _QUESTION_RE.fullmatch(question.strip())
    if match is None:
        raise ValueError(f"not a counting question of this grammar: {question!r}")
    attributes = {k: v for k, v in match.groupdict().items() if v and v != "shape"}
    return _matching(attributes, objects)


def _count_entry(colour: str | None, shape: str | None, objects: Sequence[PlacedObject]) -> dict[str, Any]:
    question = count_question(colour, shape)
    members = resolve_count_question(question, objects)
    return {"question": question, "answer": len(members), "boxes": [list(objects[i].box) for i in members],
            "points": [list(objects[i].point) for i in members], "colour": colour, "shape": shape}


def counting_questions(
    objects: Sequence[PlacedObject], rng: random.Random, palette: Sequence[str]
) -> list[dict[str, Any]]:
    """One question of each kind, in random order: all shapes, one shape, one colour, one colour+shape group
    of the scene, and one group or colour the scene lacks (answer 0). The step keeps the first
    `max_questions`, so the order decides what is asked: a fixed order (the groups first) made three answers
    in four "1", a count a model gives without looking (issue 14)."""
    pairs = sorted({(o.colour, o.shape) for o in objects})
    colours = sorted({o.colour for o in objects})
    asked: list[tuple[str | None, str | None]] = [
        (None, None), (None, rng.choice(sorted({o.shape for o in objects}))), (rng.choice(colours), None),
        rng.choice(pairs)]
    absent_pairs = [(c, s) for c in palette for s in SHAPES if (c, s) not in pairs]
    absent_colours = [(c, None) for c in palette if c not in colours]
    absent = absent_colours if absent_colours and rng.random() < 0.5 else absent_pairs
    if absent:
        asked.append(rng.choice(absent))
    rng.shuffle(asked)
    unique = list(dict.fromkeys(asked))
    return [_count_entry(colour, shape, objects) for colour, shape in unique]


# --- samples -------------------------------------------------------------------------------------


def _check_arguments(width: int, height: int, layout: str, min_visible_fraction: float) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not (isinstance(width, int) and isinstance(height, int)) or min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"image {width}x{height} too small: both sides must be integers >= {MIN_IMAGE_SIDE}")
    if not 0 < min_visible_fraction <= 1:
        raise ValueError(f"min_visible_fraction must lie in (0, 1], got {min_visible_fraction!r}")
    if layout == "occluded" and min_visible_fraction > MAX_OCCLUDED_VISIBLE_FRACTION:
        raise ValueError(f"the occluded layout hides part of objects: min_visible_fraction must be <= "
                         f"{MAX_OCCLUDED_VISIBLE_FRACTION}, got {min_visible_fraction!r}")


def _place(
    rng: random.Random, width: int, height: int, layout: str, palette: Sequence[str], min_visible: float
) -> list[_Draft]:
    if layout == "sparse":
        return _place_sparse(rng, width, height, palette)
    if layout == "crowded":
        return _place_crowded(rng, width, height, palette)
    return _place_occluded(rng, width, height, palette, min_visible)


def render_grounding_sample(
    rng: random.Random, width: int, height: int, layout: str, min_visible_fraction: float = 0.4
) -> GroundingSample:
    """One scene in `layout` with exact labels; the same rng state always gives the same sample."""
    _check_arguments(width, height, layout, min_visible_fraction)
    background = rng.choice(list(BACKGROUNDS))
    palette = [c for c in COLOURS if c != background]
    for _ in range(MAX_LAYOUT_ATTEMPTS):
        drafts = _place(rng, width, height, layout, palette, min_visible_fraction)
        objects = _finalise(drafts, width, height, min_visible_fraction) if drafts else None
        if objects:
            return GroundingSample(
                image=_paint(width, height, background, drafts), background=background, layout=layout,
                objects=objects, referring=referring_expressions(objects, rng),
                counting=counting_questions(objects, rng, palette), min_visible_fraction=min_visible_fraction,
            )
    raise RuntimeError(f"no valid {layout} layout for a {width}x{height} image in {MAX_LAYOUT_ATTEMPTS} attempts")
