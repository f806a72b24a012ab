"""Tests for OCR synthesis: determinism, exact ground truth, boxes that cover the ink, QA, contrast, rotation."""

from __future__ import annotations

import json
import math
import random
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.synthesis import ocr as ocr_synthesis
from components.data.synthesis.ocr import (
    MIN_HEIGHT,
    MIN_LUMA_CONTRAST,
    MIN_WIDTH,
    OCR_KINDS,
    OcrLayers,
    OcrSample,
    available_fonts,
    luma,
    render_ocr_layers,
    render_ocr_sample,
)

_SYSTEM_FONTS = available_fonts(["/usr/share/fonts"])
_DEJAVU = [f for f in _SYSTEM_FONTS if Path(f).name == "DejaVuSans.ttf"]
REAL_FONT = (_DEJAVU or _SYSTEM_FONTS or [None])[0]
# The default font is always tested; a real font file only where the machine has one (no skips).
FONT_SETS = ["default"] + (["real"] if REAL_FONT else [])
# (width, height, seeds): the minimum size, ~200x100, a middle size and 1024x768
SIZES = [(MIN_WIDTH, MIN_HEIGHT, (1,)), (200, 100, (2,)), (320, 240, (1, 2)), (1024, 768, (3,))]
INK = 40  # a channel differing by more than this from the text-free image is text ink


def _fonts(font_set: str) -> list[str]:
    return [REAL_FONT] if font_set == "real" else []


@lru_cache(maxsize=None)
def _layers(kind: str, seed: int, width: int, height: int, font_set: str, max_rot: float = 15.0) -> OcrLayers:
    return render_ocr_layers(random.Random(seed), kind, width, height, _fonts(font_set), max_rot)


def _cases() -> list[tuple[str, int, int, int, str]]:
    cases = []
    for kind in OCR_KINDS:
        for font_set in FONT_SETS:
            for width, height, seeds in SIZES:
                for seed in seeds:
                    cases.append((kind, seed, width, height, font_set))
    return cases


CASES = _cases()
CASE_IDS = [f"{k}-s{s}-{w}x{h}-{f}" for k, s, w, h, f in CASES]


def _ink_diff(layers: OcrLayers) -> np.ndarray:
    """Per pixel, the largest channel difference between the final image and the text-free one."""
    final = np.asarray(layers.sample.image, dtype=np.int16)
    base = np.asarray(layers.base, dtype=np.int16)
    return np.abs(final - base).max(axis=2)


@lru_cache(maxsize=None)
def _case_diff(case: tuple[str, int, int, int, str]) -> np.ndarray:
    return _ink_diff(_layers(*case))


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", OCR_KINDS)
def test_same_seed_same_sample_and_different_seeds_differ(kind: str) -> None:
    def render(seed: int) -> OcrSample:
        return render_ocr_sample(random.Random(seed), kind, 320, 240, _fonts(FONT_SETS[-1]))

    a, b, c = render(11), render(11), render(12)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.text, a.lines, a.qa, a.fields, a.font) == (b.text, b.lines, b.qa, b.fields, b.font)
    assert a.image.tobytes() != c.image.tobytes()
    assert a.text != c.text


def test_sample_and_layers_agree() -> None:
    sample = render_ocr_sample(random.Random(5), "table", 320, 240, [])
    layers = render_ocr_layers(random.Random(5), "table", 320, 240, [])
    assert sample.image.tobytes() == layers.sample.image.tobytes()
    assert sample.text == layers.sample.text


# --------------------------------------------------------------------------- structure and boxes


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sample_structure(case: tuple[str, int, int, int, str]) -> None:
    kind, _, width, height, font_set = case
    sample = _layers(*case).sample
    assert sample.kind == kind
    assert sample.image.mode == "RGB" and sample.image.size == (width, height)
    assert sample.lines, "nothing was drawn"
    assert sample.text == "\n".join(line.text for line in sample.lines)
    assert all(line.text and line.text == line.text.strip() and "\n" not in line.text for line in sample.lines)
    assert sample.font == (REAL_FONT if font_set == "real" else "default")
    assert sample.qa and all(set(pair) == {"question", "answer"} and pair["answer"] for pair in sample.qa)
    json.dumps(sample.fields)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_boxes_inside_tight_and_hold_ink(case: tuple[str, int, int, int, str]) -> None:
    _, _, width, height, _ = case
    layers = _layers(*case)
    diff = _case_diff(case)
    for line in layers.sample.lines:
        x0, y0, x1, y1 = line.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, line
        ys, xs = np.nonzero(diff[y0:y1, x0:x1] > INK)
        assert len(xs), f"no ink in the box of {line}"
        # tight: strong ink reaches within 3 px of every side of the box
        assert max(xs.min(), ys.min(), x1 - x0 - 1 - xs.max(), y1 - y0 - 1 - ys.max()) <= 3, line


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_boxes_cover_all_drawn_text(case: tuple[str, int, int, int, str]) -> None:
    layers = _layers(*case)
    strong = _case_diff(case) > INK
    covered = np.zeros_like(strong)
    for line in layers.sample.lines:
        x0, y0, x1, y1 = line.box
        covered[y0:y1, x0:x1] = True
    assert strong.sum() > 0
    assert strong[covered].sum() >= 0.99 * strong.sum()
    # the text-free layer really holds no text: the final image differs from it only under the text mask
    mask = np.asarray(layers.text_mask) > 0
    assert not strong[~mask].any()


UPRIGHT = [(c, i) for c, i in zip(CASES, CASE_IDS) if c[0] != "scene_text"]


@pytest.mark.parametrize("case", [c for c, _ in UPRIGHT], ids=[i for _, i in UPRIGHT])
def test_upright_boxes_do_not_overlap(case: tuple[str, int, int, int, str]) -> None:
    boxes = [line.box for line in _layers(*case).sample.lines]
    for i, a in enumerate(boxes):
        for b in boxes[:i]:
            assert not _overlaps(a, b), (a, b)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_contrast_minimum_and_ink_colour(case: tuple[str, int, int, int, str]) -> None:
    layers = _layers(*case)
    base_rgb = np.asarray(layers.base, dtype=np.float64)
    final_rgb = np.asarray(layers.sample.image, dtype=np.float64)
    base_luma = base_rgb @ np.array([0.299, 0.587, 0.114])
    diff = _case_diff(case)
    assert len(layers.colors) == len(layers.sample.lines)
    for line, color in zip(layers.sample.lines, layers.colors):
        x0, y0, x1, y1 = line.box
        assert np.abs(base_luma[y0:y1, x0:x1] - luma(color)).min() >= MIN_LUMA_CONTRAST, line
        # ink pixels are the background blended towards the stated text colour
        strong = diff[y0:y1, x0:x1] > INK
        base_ink = base_rgb[y0:y1, x0:x1][strong]
        d = final_rgb[y0:y1, x0:x1][strong] - base_ink
        e = np.array(color, dtype=np.float64) - base_ink
        alpha = (d * e).sum(axis=1) / (e * e).sum(axis=1)
        assert alpha.min() > 0 and alpha.max() <= 1.02, line
        assert np.abs(d - alpha[:, None] * e).max() <= 3, line


# --------------------------------------------------------------------------- ground truth per kind


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("font_set", FONT_SETS)
def test_table_truth_and_qa(seed: int, font_set: str) -> None:
    sample = _layers("table", seed, 320, 240, font_set).sample
    header, rows = sample.fields["header"], sample.fields["rows"]
    assert [line.text for line in sample.lines] == header + [cell for row in rows for cell in row]
    assert all(len(row) == len(header) for row in rows)
    names = [row[0] for row in rows]
    assert len(set(names)) == len(names), "item names must be unique for the lookups"
    lookups = 0
    for pair in sample.qa:
        question, answer = pair["question"], pair["answer"]
        if question == "How many rows does the table have?":
            assert answer == str(len(rows))
        elif question == "How many columns does the table have?":
            assert answer == str(len(header))
        else:
            match = re.fullmatch(r"What is the (.+) of (.+)\?", question)
            assert match, question
            column, item = match.groups()
            assert answer == rows[names.index(item)][header.index(column)]
            lookups += 1
    assert lookups >= 1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("font_set", FONT_SETS)
def test_chart_truth_and_qa(seed: int, font_set: str) -> None:
    sample = _layers("chart", seed, 320, 240, font_set).sample
    fields = sample.fields
    labels, values, printed = fields["labels"], fields["values"], fields["value_labels"]
    assert len(labels) == len(values) == len(printed) >= 2
    assert len(set(values)) == len(values), "values must be distinct"
    assert [float(p.rstrip("%")) for p in printed] == values
    expected_lines = [fields["title"]] + [t for pair in zip(labels, printed) for t in pair]
    assert [line.text for line in sample.lines] == expected_lines
    answers = {pair["question"]: pair["answer"] for pair in sample.qa}
    assert answers["Which category has the highest value?"] == labels[int(np.argmax(values))]
    assert answers["Which category has the lowest value?"] == labels[int(np.argmin(values))]
    assert answers["What is the title of the chart?"] == fields["title"]
    value_questions = [q for q in answers if q.startswith("What is the value for ")]
    assert value_questions
    for question in value_questions:
        label = question[len("What is the value for "):-1]
        assert answers[question] == printed[labels.index(label)]


@pytest.mark.parametrize("size", [(200, 100), (1024, 768)])
@pytest.mark.parametrize("font_set", FONT_SETS)
def test_document_truth_and_qa(size: tuple[int, int], font_set: str) -> None:
    sample = _layers("document", 4, size[0], size[1], font_set).sample
    title, paragraphs = sample.fields["title"], sample.fields["paragraphs"]
    texts = [line.text for line in sample.lines]
    assert texts[0] == title and len(texts) >= 2 and paragraphs
    assert " ".join(texts[1:]) == " ".join(paragraphs)
    answers = {pair["question"]: pair["answer"] for pair in sample.qa}
    assert answers["What is the title of the document?"] == title
    assert answers["How many paragraphs does the document have?"] == str(len(paragraphs))
    # wrapped lines are spread down the page, not stacked on each other
    tops = [line.box[1] for line in sample.lines]
    assert tops == sorted(tops)


@pytest.mark.parametrize("seed", range(4))
def test_scene_text_truth_and_qa(seed: int) -> None:
    sample = _layers("scene_text", seed, 320, 240, FONT_SETS[-1]).sample
    assert sample.fields["lines"] == [line.text for line in sample.lines]
    assert 1 <= len(sample.lines) <= 2
    answers = {pair["question"]: pair["answer"] for pair in sample.qa}
    assert answers["What does the text say?"] == sample.text.replace("\n", " ")


def _two_line_scene(max_rot: float) -> OcrSample:
    for seed in range(100):
        sample = render_ocr_sample(random.Random(seed), "scene_text", 320, 240, [], max_rot)
        if len(sample.lines) == 2:
            return sample
    raise AssertionError("no two-line scene text in 100 seeds")


@pytest.mark.parametrize("max_rot", [0.0, 30.0])
def test_scene_text_line_boxes_follow_the_lines(max_rot: float) -> None:
    """Each line has its own box; the second line lies below the first in the text's own frame."""
    sample = _two_line_scene(max_rot)
    (a, b), theta = [line.box for line in sample.lines], math.radians(sample.fields["rotation_deg"])
    if max_rot == 0.0:
        assert a[3] <= b[1], (a, b)
    centre = [((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) for box in (a, b)]
    dx, dy = centre[1][0] - centre[0][0], centre[1][1] - centre[0][1]
    down = dx * math.sin(theta) + dy * math.cos(theta)  # the text's "down" in image coordinates
    assert down >= 0.5 * sample.fields["font_size"], (a, b, theta, down)


# --------------------------------------------------------------------------- variety and rotation


@pytest.mark.parametrize("max_rot", [0.0, 5.0, 30.0])
def test_rotation_within_bound(max_rot: float) -> None:
    angles = [
        render_ocr_sample(random.Random(seed), "scene_text", 200, 100, [], max_rot).fields["rotation_deg"]
        for seed in range(12)
    ]
    assert all(abs(a) <= max_rot for a in angles)
    if max_rot == 0.0:
        assert set(angles) == {0.0}
    else:
        assert len(set(angles)) > 6 and min(angles) < 0 < max(angles)


def test_rotation_is_applied_to_the_ink() -> None:
    """The principal axis of a long single line follows rotation_deg (counter-clockwise positive)."""
    checked = 0
    for seed in range(40):
        layers = render_ocr_layers(random.Random(seed), "scene_text", 320, 240, [], 30.0)
        sample = layers.sample
        if len(sample.lines) != 1 or len(sample.text) < 8:
            continue
        ys, xs = np.nonzero(np.asarray(layers.text_mask) > 128)
        _, vectors = np.linalg.eigh(np.cov(np.vstack([xs, ys]).astype(np.float64)))
        vx, vy = vectors[:, 1]
        measured = math.degrees(math.atan2(-vy, vx))
        measured = (measured + 90.0) % 180.0 - 90.0
        assert abs(measured - sample.fields["rotation_deg"]) < 3.0, (seed, measured, sample.fields)
        checked += 1
        if checked == 4:
            break
    assert checked == 4


def test_scene_text_varies() -> None:
    samples = [render_ocr_sample(random.Random(seed), "scene_text", 200, 100, []) for seed in range(16)]
    assert len({s.fields["font_size"] for s in samples}) > 3
    assert len({s.fields["background"] for s in samples}) >= 3
    assert {s.fields["light_background"] for s in samples} == {True, False}
    assert len({tuple(s.fields["text_color"]) for s in samples}) > 8


@pytest.mark.parametrize("kind", ["scene_text", "document"])
def test_every_background_pixel_contrasts_with_the_text(kind: str) -> None:
    """Without graphics, the whole text-free image (gradients, noise, speckle) keeps the minimum contrast."""
    styles = set()
    for seed in range(40):
        layers = render_ocr_layers(random.Random(seed), kind, MIN_WIDTH, MIN_HEIGHT, [])
        base_luma = np.asarray(layers.base, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
        text_luma = {luma(color) for color in layers.colors}
        assert len(text_luma) == 1
        assert np.abs(base_luma - text_luma.pop()).min() >= MIN_LUMA_CONTRAST, seed
        styles.add(layers.sample.fields.get("background"))
    if kind == "scene_text":
        assert styles == {"solid", "gradient", "noise", "speckle"}


def test_backgrounds_are_not_all_flat() -> None:
    flat = 0
    for seed in range(8):
        base = np.asarray(_layers("document", seed, 200, 100, "default").base)
        flat += int(bool((base == base[0, 0]).all()))
    assert 0 < flat < 8


# --------------------------------------------------------------------------- fonts


def test_available_fonts(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    fonts = ["a/deep/z.ttf", "a/b.OTF", "c.ttc", "q.otf", "m.ttf", "a/k.ttf", "a/deep/d.ttf", "e.TTF"]
    for name in fonts + ["notes.txt", "a/x.pcf", "ttf"]:
        (tmp_path / name).write_bytes(b"")
    found = available_fonts([str(tmp_path), str(tmp_path / "missing"), str(tmp_path / "a")])
    assert found == sorted(str(tmp_path / n) for n in fonts)
    assert available_fonts([str(tmp_path / "missing")]) == []


def test_unloadable_font_falls_back_to_default(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ttf"
    broken.write_bytes(b"not a font")
    sample = render_ocr_sample(random.Random(0), "document", 200, 100, [str(broken)])
    assert sample.font == "default"
    assert sample.text == "\n".join(line.text for line in sample.lines)


def test_font_without_our_glyphs_falls_back_to_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fonts = [REAL_FONT] if REAL_FONT else []
    assert render_ocr_sample(random.Random(0), "table", 200, 100, fonts).font == (REAL_FONT or "default")
    monkeypatch.setattr(ocr_synthesis, "_usable_font", lambda path: False)
    assert render_ocr_sample(random.Random(0), "table", 200, 100, fonts).font == "default"


def test_font_choice_follows_rng() -> None:
    fonts = [f for f in _SYSTEM_FONTS if Path(f).name.startswith("DejaVuSans")][:4]
    chosen = {render_ocr_sample(random.Random(s), "chart", 200, 100, fonts).font for s in range(8)}
    assert chosen <= (set(fonts) if fonts else {"default"})
    if len(fonts) >= 2:
        assert len(chosen) >= 2


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kind, width, height, max_rot, message",
    [
        ("receipt", 320, 240, 15.0, "unknown OCR kind"),
        ("table", MIN_WIDTH - 1, 240, 15.0, "below the minimum"),
        ("chart", 320, MIN_HEIGHT - 1, 15.0, "below the minimum"),
        ("scene_text", 10, 10, 15.0, "below the minimum"),
        ("scene_text", 320, 240, -1.0, "max_rotation_deg"),
        ("scene_text", 320, 240, float("nan"), "max_rotation_deg"),
    ],
)
def test_invalid_arguments_raise(kind: str, width: int, height: int, max_rot: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_ocr_sample(random.Random(0), kind, width, height, [], max_rot)


def test_minimum_size_renders_every_kind_with_extreme_aspect() -> None:
    for kind in OCR_KINDS:
        for width, height in ((MIN_WIDTH, 600), (900, MIN_HEIGHT)):
            sample = render_ocr_sample(random.Random(9), kind, width, height, [], 45.0)
            assert isinstance(sample.image, Image.Image) and sample.image.size == (width, height)
            for line in sample.lines:
                x0, y0, x1, y1 = line.box
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
