"""Predictions you can look at: a few held-out evaluation items per task drawn as PNG cards (the image,
or a strip of a clip's frames, with the question, the reference and the model's answer under it; boxes
and points of the reference in green and of the answer in red, mapped from [0, 999] to the image's
pixels by `components.common.coords`), and one contact sheet per evaluated checkpoint.

Inputs are what an evaluation already has: its per-item examples (`<name>.jsonl`: key, kind, question,
reference, prediction, and `prediction_shuffled` when the shuffled-image control ran) and the held-out
rows with their PNG bytes (`evaluate.held_out_rows`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import textwrap
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from components.common.coords import answer_in_pixels

log = logging.getLogger(__name__)
REFERENCE, ANSWER, SHUFFLED = (40, 160, 60), (210, 40, 40), (150, 90, 200)
CARD_WIDTH = 420
FRAMES_SHOWN = 4
TEXT_CHARS = 400  # an answer longer than this is cut (the full one is in the predictions file)


def pick(examples: Sequence[Mapping[str, Any]], per_kind: int) -> list[Mapping[str, Any]]:
    """The first `per_kind` examples of each kind, in file order (the held-out order: deterministic)."""
    if per_kind < 1:
        raise ValueError(f"per_kind must be >= 1, got {per_kind}")
    taken: dict[str, int] = {}
    chosen = []
    for example in examples:
        kind = str(example["kind"])
        if taken.get(kind, 0) < per_kind:
            taken[kind] = taken.get(kind, 0) + 1
            chosen.append(example)
    return chosen


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def picture(images: Sequence[bytes], width: int) -> tuple[Image.Image, float, Image.Image | None]:
    """The panel drawn above the text: one image scaled to `width` (returned with its scale and the
    original, on which boxes are mapped), or up to FRAMES_SHOWN frames side by side (no scale: a video
    answer holds times, not boxes)."""
    frames = [Image.open(io.BytesIO(bytes(data))).convert("RGB") for data in images]
    if not frames:
        return Image.new("RGB", (width, 40), "white"), 1.0, None
    if len(frames) == 1:
        original = frames[0]
        scale = width / original.width
        size = (width, max(1, round(original.height * scale)))
        return original.resize(size, Image.Resampling.NEAREST), scale, original
    step = max(1, len(frames) // FRAMES_SHOWN)
    shown = frames[::step][:FRAMES_SHOWN]
    tile = width // len(shown)
    tiles = [f.resize((tile, max(1, round(f.height * tile / f.width)))) for f in shown]
    strip = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
    for index, frame in enumerate(tiles):
        strip.paste(frame, (index * tile, 0))
    return strip, 1.0, None


def draw_marks(draw: ImageDraw.ImageDraw, text: str, original: Image.Image, scale: float, colour: tuple[int, int, int],
               label: str) -> int:
    """The boxes and points of `text` (normalised [0, 999]) drawn on the scaled picture; returns how many."""
    marks = answer_in_pixels(text, original.width, original.height)
    for x0, y0, x1, y1 in marks["boxes"]:  # x1, y1 exclusive; a box of one bin may be under a pixel wide
        left, top = x0 * scale, y0 * scale
        draw.rectangle([left, top, max(left, x1 * scale - 1), max(top, y1 * scale - 1)], outline=colour, width=3)
        draw.text((x0 * scale + 3, y0 * scale + 2), label, fill=colour, font=font(12))
    for x, y in marks["points"]:
        radius = 6
        cx, cy = x * scale, y * scale
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=3)
        draw.text((x * scale + radius + 2, y * scale - radius), label, fill=colour, font=font(12))
    return len(marks["boxes"]) + len(marks["points"])


def card(example: Mapping[str, Any], images: Sequence[bytes]) -> Image.Image:
    """One item: its picture with the reference's and answer's boxes and points, then the texts and scores."""
    panel, scale, original = picture(images, CARD_WIDTH)
    panel = panel.copy()
    if original is not None:
        draw = ImageDraw.Draw(panel)
        draw_marks(draw, str(example["reference"]), original, scale, REFERENCE, "ref")
        draw_marks(draw, str(example["prediction"]), original, scale, ANSWER, "answer")
    scores = ", ".join(f"{k} {float(v):.2f}" for k, v in example.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "turn")
    lines: list[tuple[str, tuple[int, int, int]]] = [(f"{example['kind']}  {example['key']}", (90, 90, 90))]
    texts = [("Q", str(example["question"]).replace("<image>\n", "").replace("<video>\n", ""), (0, 0, 0)),
             ("reference", str(example["reference"]), REFERENCE), ("answer", str(example["prediction"]), ANSWER)]
    if "prediction_shuffled" in example:
        texts.append(("answer, shuffled images", str(example["prediction_shuffled"]), SHUFFLED))
    for label, text, colour in texts:
        text = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + " ..."
        wrapped = textwrap.wrap(f"{label}: {text}", width=58, replace_whitespace=False) or [f"{label}:"]
        lines += [(part, colour) for chunk in wrapped for part in chunk.split("\n")]
    if scores:
        lines += [(part, (90, 90, 90)) for part in textwrap.wrap(scores, width=58)]
    line_height = 16
    result = Image.new("RGB", (CARD_WIDTH, panel.height + 8 + line_height * len(lines) + 6), "white")
    result.paste(panel, (0, 0))
    draw = ImageDraw.Draw(result)
    for index, (text, colour) in enumerate(lines):
        draw.text((6, panel.height + 6 + index * line_height), text, fill=colour, font=font(13))
    return result


def contact_sheet(cards: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """The cards in rows of `columns`, each row as tall as its tallest card."""
    rows = [cards[i:i + columns] for i in range(0, len(cards), columns)]
    heights = [max(c.height for c in row) for row in rows]
    sheet = Image.new("RGB", (columns * (CARD_WIDTH + 6), sum(heights) + 6 * len(rows)), (235, 235, 235))
    top = 0
    for row, height in zip(rows, heights):
        for index, item in enumerate(row):
            sheet.paste(item, (index * (CARD_WIDTH + 6), top))
        top += height + 6
    return sheet


def save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def draw_gallery(examples: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], out_dir: Path,
                 name: str, per_kind: int = 2) -> list[Path]:
    """Cards `<name>-<kind>-<n>.png` for `per_kind` examples of each kind and the sheet `<name>.png`,
    in `out_dir`; returns their paths (sheet first). An example whose row is missing is drawn without a
    picture, one that cannot be drawn (an unreadable image) is skipped with a warning; no examples, no
    files."""
    images = {(str(row["key"]), str(row["question"])): list(row.get("images") or []) for row in rows}
    chosen = pick(examples, per_kind)
    if not chosen:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    cards, paths, counts = [], [], {}
    for example in chosen:
        try:
            item = card(example, images.get((str(example["key"]), str(example["question"])), []))
        except (OSError, ValueError) as error:  # the gallery is for looking at: it never fails the evaluation
            log.warning("gallery: skipping %s (%s): %s", example["key"], example["kind"], error)
            continue
        kind = str(example["kind"])
        counts[kind] = counts.get(kind, 0) + 1
        path = out_dir / f"{name}-{kind}-{counts[kind]}.png"
        save_png(item, path)
        cards.append(item)
        paths.append(path)
    if not cards:
        return []
    sheet = out_dir / f"{name}.png"
    save_png(contact_sheet(cards), sheet)
    return [sheet, *paths]


def draw_galleries(eval_dir: Path, names: Sequence[str], rows: Sequence[Mapping[str, Any]],
                   per_kind: int = 2) -> list[str]:
    """The gallery of every evaluated checkpoint whose examples file `eval_dir/<name>.jsonl` exists, in
    `eval_dir/gallery/`; returns the files relative to the step's entry (`eval/gallery/...`), to log."""
    drawn: list[str] = []
    for name in names:
        path = eval_dir / f"{name}.jsonl"
        if not path.is_file():
            continue
        examples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for file in draw_gallery(examples, rows, eval_dir / "gallery", name, per_kind):
            drawn.append(f"{eval_dir.name}/gallery/{file.name}")
    return drawn
