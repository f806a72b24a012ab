"""The evaluation's gallery (components/vlm/eval_gallery.py): held-out items drawn with the reference's
and the answer's boxes and points at the right pixels, the texts under them, a few per kind."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from components.vlm.eval_gallery import ANSWER, CARD_WIDTH, REFERENCE, card, draw_galleries, pick


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def close(pixel: tuple, colour: tuple) -> bool:
    return all(abs(a - b) <= 40 for a, b in zip(pixel, colour))


def test_boxes_and_points_land_on_their_pixels() -> None:
    example = {"key": "s1", "kind": "grounding", "question": "<image>\nWhere?",
               "reference": "<box>[100, 200, 499, 799]</box>", "prediction": "<point>[750, 500]</point>",
               "grounding_iou": 0.0}
    drawn = card(example, [png(200, 100)])
    scale = CARD_WIDTH / 200  # the 200 x 100 image drawn 420 wide
    # the reference box covers pixels x 20..100, y 20..80: its left edge is green, its inside untouched
    assert close(drawn.getpixel((round(20 * scale) + 1, round(50 * scale))), REFERENCE)
    assert drawn.getpixel((round(60 * scale), round(50 * scale))) == (255, 255, 255)
    # the answer's point is at the centre of bin (750, 500): x 150.1, y 50.05; its circle has radius 6
    x, y = 150.1 * scale, 50.05 * scale
    assert close(drawn.getpixel((round(x + 5), round(y))), ANSWER)
    assert drawn.getpixel((round(x), round(y))) == (255, 255, 255)
    assert drawn.width == CARD_WIDTH and drawn.height > 100 * scale + 4 * 16  # the picture, then the text lines


def test_a_few_per_kind_with_shuffled_answers_and_files(tmp_path: Path) -> None:
    examples = [{"key": f"k{i}", "kind": kind, "question": f"<image>\nq{i}", "reference": "1", "prediction": "2",
                 "prediction_shuffled": "3"} for i, kind in enumerate(["counting"] * 3 + ["caption"])]
    assert [e["key"] for e in pick(examples, 2)] == ["k0", "k1", "k3"]
    with pytest.raises(ValueError, match="per_kind"):
        pick(examples, 0)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "stage1.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    rows = [{"key": e["key"], "question": e["question"], "images": [png(64, 48)]} for e in examples[:2]]
    drawn = draw_galleries(eval_dir, ["untrained", "stage1"], rows)  # no untrained.jsonl: nothing for it
    assert drawn == ["eval/gallery/stage1.png", "eval/gallery/stage1-counting-1.png",
                     "eval/gallery/stage1-counting-2.png", "eval/gallery/stage1-caption-1.png"]
    with Image.open(tmp_path / drawn[0]) as sheet:
        assert sheet.width >= 3 * CARD_WIDTH
    with Image.open(tmp_path / drawn[3]) as no_row:  # k3 has no held-out row: drawn without a picture
        assert no_row.height < 48 * CARD_WIDTH / 64
    with Image.open(tmp_path / drawn[1]) as counting:
        colours = {counting.getpixel((x, y))
                   for x in range(counting.width) for y in range(counting.height - 80, counting.height)}
        assert any(close(c, (150, 90, 200)) for c in colours)  # the shuffled-image answer is written in its colour


def test_a_box_of_one_bin_and_an_unreadable_image_never_fail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    example = {"key": "s1", "kind": "grounding", "question": "<image>\nWhere?",
               "reference": "<box>[0, 0, 999, 999]</box>", "prediction": "<box>[22, 111, 111, 111]</box>"}  # one bin tall: under a pixel on a 420-wide card
    drawn = card(example, [png(640, 640)])
    scale = CARD_WIDTH / 640
    assert close(drawn.getpixel((round(60 * scale), round(111 * 0.64 * scale))), ANSWER)  # a line on its row
    broken = dict(example, key="s2")
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "stage1.jsonl").write_text(json.dumps(broken) + "\n" + json.dumps(example) + "\n")
    rows = [{"key": "s2", "question": example["question"], "images": [b"not a png"]},
            {"key": "s1", "question": example["question"], "images": [png(640, 640)]}]
    assert draw_galleries(eval_dir, ["stage1"], rows, per_kind=2) == ["eval/gallery/stage1.png",
                                                                       "eval/gallery/stage1-grounding-1.png"]
    assert "gallery: skipping s2 (grounding)" in caplog.text
