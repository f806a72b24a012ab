"""Linear probes: which per-image facts a frozen encoder's visual tokens still hold.

The facts come from what the synthesis steps know about each picture: the grounding and counting scenes
keep every object's colour, shape and pixel box (`annotations.objects`), and the crawl's clean captions
say the objects' colours, shapes and counts and the background ("a red circle and two blue squares on a
white background"). For every image the encoder gives its visual tokens (one per 28x28-pixel cell after
the 2x2 merge); a logistic regression on frozen features, fitted on 80 % of the images and scored on the
other 20 % (split by key hash), says how much of a fact is linearly readable:

- from the image's tokens mean-pooled and max-pooled (background colour, "colour X is among the
  objects" and "shape X is among the objects" as balanced accuracy averaged over the values, the number
  of objects as accuracy beside its majority rate);
- from single tokens (`cell_*`): whether a box-annotated object covers most of the token's cell, and
  that object's colour, beside the majority rate; and where the token sits (`cell_position`: which of
  the image's 3x3 regions holds the cell's centre, balanced accuracy, chance 1/9), on the cells of
  pictures with boxes. Grounding answers are coordinates relative to the image, so a token that does not
  say where it is leaves the LLM to infer the grid from the token order alone.

A raw-pixel baseline (RGB histograms of the same images, `pixels` features) tells what is in the pictures
at all. A fact the ViT holds but the VLM never says points at the adapter, the LLM or the data; a fact
the ViT does not hold points at the ViT, its resolution or its pretraining. Probes are fitted on the
shards' images, training images included: the encoder is frozen, and the probe's own split is held out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OBJECT_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white")
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
           "eight": 8, "nine": 9, "ten": 10}
CELL = 28  # pixels of one visual token after the 2x2 merge of 14-pixel patches
MIN_COVER = 0.6  # a cell is an object's when its box covers this share of the cell
MAX_COUNT_CLASS = 9  # counts above are one class ("9 or more")
OBJECT_PHRASE = re.compile(r"\b(a|an|one|two|three|four|five|six|seven|eight|nine|ten)\s+(\w+)\s+(circle|square|triangle|"
                     r"diamond)s?\b")  # one object phrase of a scene caption: "a red circle", "two blue squares"
_BACKGROUND = re.compile(r"\bon an?\s+(\w+)\s+background\b")


@dataclass
class ImageFacts:
    """What is known about one picture; None where unknown."""

    key: str
    background: str | None = None
    colours: frozenset[str] = frozenset()
    shapes: frozenset[str] = frozenset()
    count: int | None = None
    boxes: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)  # (colour, pixel box)
    width: int = 0
    height: int = 0


def facts_from_info(key: str, task: str, info: dict[str, Any], width: int, height: int) -> ImageFacts | None:
    """The facts of a caption, grounding or counting sample's picture, or None when it carries none.
    Grounding scenes keep boxes in [0, 999]; the synthetic crawl keeps its scene's pixel boxes in
    `meta.synthetic.objects` (a crawl sample with noise, or a real photo, has none: its caption alone
    counts, when it is a scene caption)."""
    if task in ("grounding", "counting"):
        objects = (info.get("annotations") or {}).get("objects")
        if not isinstance(objects, list) or not objects:
            return None
        background = _BACKGROUND.search(str(info.get("caption", "")))
        boxes = [(str(o["colour"]), tuple(float(v) * s / 1000.0 for v, s in zip(o["box"], (width, height) * 2)))
                 for o in objects if isinstance(o, dict) and "colour" in o and len(o.get("box", ())) == 4]
        return ImageFacts(key=key, background=background.group(1) if background else None,
                          colours=frozenset(str(o.get("colour")) for o in objects if isinstance(o, dict)),
                          shapes=frozenset(str(o.get("shape")) for o in objects if isinstance(o, dict)),
                          count=len(objects), boxes=boxes, width=width, height=height)  # type: ignore[arg-type]
    if task == "caption":
        caption = str(info.get("caption", "")).lower()
        background = _BACKGROUND.search(caption)
        phrases = OBJECT_PHRASE.findall(caption)
        if background is None or not phrases or any(c not in OBJECT_COLOURS for _, c, _ in phrases):
            return None  # not a scene caption (a real photo's, or a noisy one)
        synthetic = (info.get("meta") or {}).get("synthetic") or {}
        boxes = []
        if synthetic.get("noise") is None and synthetic.get("true_caption") == info.get("caption"):
            size = (info.get("meta") or {}).get("width"), (info.get("meta") or {}).get("height")
            scale = (width / size[0], height / size[1]) if all(size) else (1.0, 1.0)
            boxes = [(str(o["colour"]), tuple(float(v) * scale[i % 2] for i, v in enumerate(o["box"])))
                     for o in synthetic.get("objects") or [] if isinstance(o, dict) and len(o.get("box", ())) == 4]
        return ImageFacts(key=key, background=background.group(1), colours=frozenset(c for _, c, _ in phrases),
                          shapes=frozenset(s for _, _, s in phrases), count=sum(NUMBERS[n] for n, _, _ in phrases),
                          boxes=boxes, width=width, height=height)  # type: ignore[arg-type]
    return None


def cell_labels(facts: ImageFacts, grid_h: int, grid_w: int) -> list[str | None]:
    """Per token (row-major cells of the resized image): the colour of the box-annotated object covering
    at least MIN_COVER of the cell (the topmost, drawn last), "background" where no box touches it, None
    in between (a cell partly covered is left out)."""
    if not facts.boxes or not facts.width or not facts.height:
        return [None] * (grid_h * grid_w)
    sx, sy = grid_w / facts.width, grid_h / facts.height  # original pixels -> cell units
    labels: list[str | None] = []
    for row in range(grid_h):
        for col in range(grid_w):
            label: str | None = "background"
            for colour, (x0, y0, x1, y1) in facts.boxes:
                ox = max(0.0, min(col + 1, x1 * sx) - max(col, x0 * sx))
                oy = max(0.0, min(row + 1, y1 * sy) - max(row, y0 * sy))
                if ox * oy >= MIN_COVER:
                    label = colour
                elif ox * oy > 0 and label == "background":
                    label = None
            labels.append(label)
    return labels


def region_of(index: int, grid_h: int, grid_w: int) -> int:
    """Which of the image's 3x3 regions (row-major, 0-8) holds the centre of row-major cell `index`."""
    row, col = divmod(index, grid_w)
    return int(3 * (row + 0.5) / grid_h) * 3 + int(3 * (col + 0.5) / grid_w)


def split_of(key: str) -> bool:
    """True for the probe's test fifth (by key hash, so every encoder sees the same split)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 5 == 0


def fit_score(features: np.ndarray, labels: Sequence[Any], test: np.ndarray, balanced: bool) -> float | None:
    """Logistic regression on the train rows, scored on the test rows (accuracy, or balanced accuracy);
    None when a side lacks two classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    train = ~test
    if len(set(y[train].tolist())) < 2 or len(set(y[test].tolist())) < 2:
        return None
    scaler = StandardScaler().fit(features[train])
    model = LogisticRegression(max_iter=300, C=0.5)
    model.fit(scaler.transform(features[train]), y[train])
    predicted = model.predict(scaler.transform(features[test]))
    if balanced:
        return float(balanced_accuracy_score(y[test], predicted))
    return float(np.mean(predicted == y[test]))


def majority(labels: Sequence[Any], test: np.ndarray) -> float:
    """Accuracy on the test rows of always giving the train rows' most common label."""
    y = np.asarray(labels)
    values, counts = np.unique(y[~test], return_counts=True)
    return float(np.mean(y[test] == values[np.argmax(counts)]))


def run_probes(facts: Sequence[ImageFacts], tokens: Sequence[np.ndarray],
               grids: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Probe scores for images with their facts, visual tokens (T_i, D) and token grids (rows, cols)."""
    test = np.array([split_of(f.key) for f in facts])
    pools = {"mean": np.stack([t.mean(0) for t in tokens]), "max": np.stack([t.max(0) for t in tokens])}
    results: dict[str, float] = {}

    def put(name: str, value: float | None) -> None:
        if value is not None:
            results[name] = value

    for pool, features in pools.items():
        known = np.array([f.background is not None for f in facts])
        if known.sum() >= 10:
            put(f"background_{pool}", fit_score(features[known], [f.background for f in np.array(facts)[known]],
                                                test[known], balanced=True))
        for fact, values in (("colour_present", OBJECT_COLOURS), ("shape_present", SHAPES)):
            scores = [fit_score(features, [v in getattr(f, "colours" if fact == "colour_present" else "shapes")
                                           for f in facts], test, balanced=True) for v in values]
            scores = [s for s in scores if s is not None]
            if scores:
                results[f"{fact}_{pool}"] = float(np.mean(scores))
        counted = np.array([f.count is not None for f in facts])
        if counted.sum() >= 10:
            counts = [min(f.count, MAX_COUNT_CLASS) for f in np.array(facts)[counted]]
            put(f"count_{pool}", fit_score(features[counted], counts, test[counted], balanced=False))
            results["count_majority"] = majority(counts, test[counted])
    cell_features, cell_colour, cell_test = [], [], []
    position_features, position_labels, position_test = [], [], []
    for f, t, (gh, gw), held in zip(facts, tokens, grids, test):
        if not f.boxes or len(t) != gh * gw:
            continue
        for index, (feature, label) in enumerate(zip(t, cell_labels(f, gh, gw))):
            position_features.append(feature)
            position_labels.append(region_of(index, gh, gw))
            position_test.append(held)
            if label is not None:
                cell_features.append(feature)
                cell_colour.append(label)
                cell_test.append(held)
    if len(position_features) >= 20:
        put("cell_position", fit_score(np.stack(position_features), position_labels, np.array(position_test),
                                       balanced=True))
    if len(cell_features) >= 20:
        x, split = np.stack(cell_features), np.array(cell_test)
        put("cell_object", fit_score(x, [c != "background" for c in cell_colour], split, balanced=True))
        on_object = np.array([c != "background" for c in cell_colour])
        if on_object.sum() >= 20:
            colours = [c for c in cell_colour if c != "background"]
            put("cell_colour", fit_score(x[on_object], colours, split[on_object], balanced=False))
            results["cell_colour_majority"] = majority(colours, split[on_object])
    results["images"] = float(len(facts))
    return dict(sorted(results.items()))


def pixel_tokens(image: Any, grid_h: int, grid_w: int) -> np.ndarray:
    """The raw-pixel baseline's tokens: per cell of the resized image, its 4x4x4 RGB histogram and its mean
    colour (which tells near colours apart that share a histogram bin, as beige and white)."""
    pixels = np.asarray(image.convert("RGB").resize((grid_w * CELL, grid_h * CELL)), dtype=np.int64)
    codes = (pixels[..., 0] // 64) * 16 + (pixels[..., 1] // 64) * 4 + pixels[..., 2] // 64
    cells = codes.reshape(grid_h, CELL, grid_w, CELL).transpose(0, 2, 1, 3).reshape(grid_h * grid_w, -1)
    means = pixels.reshape(grid_h, CELL, grid_w, CELL, 3).mean(axis=(1, 3)).reshape(-1, 3) / 255.0
    histograms = np.stack([np.bincount(c, minlength=64) / c.size for c in cells])
    return np.concatenate([histograms, means], axis=1).astype(np.float32)


@dataclass
class ProbeSet:
    """The probe images: their facts and decoded pictures."""

    facts: list[ImageFacts]
    images: list[Any]

    def score(self, encode: Callable[[list[Any]], tuple[list[np.ndarray], list[tuple[int, int]]]],
              batch_size: int = 32) -> dict[str, float]:
        """Probe scores of an encoder: `encode(images)` -> (tokens per image, token grid per image)."""
        tokens: list[np.ndarray] = []
        grids: list[tuple[int, int]] = []
        for start in range(0, len(self.images), batch_size):
            batch_tokens, batch_grids = encode(self.images[start:start + batch_size])
            tokens += batch_tokens
            grids += batch_grids
        return run_probes(self.facts, tokens, grids)


def probe_set(samples: Iterable[tuple[str, str, dict[str, Any], Any]], max_images: int) -> ProbeSet:
    """Up to `max_images` pictures with facts from (key, task, info, image) tuples, the tasks interleaved
    as they come."""
    facts, images = [], []
    for key, task, info, image in samples:
        known = facts_from_info(key, task, info, image.width, image.height)
        if known is not None:
            facts.append(known)
            images.append(image)
            if len(images) >= max_images:
                break
    return ProbeSet(facts, images)


PROBE_TASKS = ("caption", "grounding", "counting")


def shard_probe_samples(shards_dir: Any, tasks: Sequence[str] = PROBE_TASKS) -> Iterable[tuple[str, str, dict, Any]]:
    """(key, task, info, picture) of the shards' caption, grounding and counting samples, the tasks taken in
    turn; rebalancing copies and undecodable samples are skipped (a grounding scene's counting sample shares
    its picture and is skipped too)."""
    from pathlib import Path

    from components.training.shards import DropCounter, decode_media, read_shard, task_shards

    def one_task(task: str) -> Iterable[tuple[str, str, dict, Any]]:
        counter = DropCounter()
        for shard in task_shards(Path(shards_dir), (task,)):
            for raw in read_shard(shard, counter):
                try:
                    info = raw.info()
                except (ValueError, UnicodeDecodeError):
                    continue
                if info.get("repeat_of"):
                    continue
                images = decode_media(raw, counter)
                if images and len(images) == 1:
                    yield raw.key, task, info, images[0]

    streams = [iter(one_task(t)) for t in tasks]
    seen_scenes: set[str] = set()
    while streams:
        for stream in list(streams):
            try:
                key, task, info, image = next(stream)
            except StopIteration:
                streams.remove(stream)
                continue
            scene = key.rsplit("-", 1)[0] if task in ("grounding", "counting") else key
            if scene not in seen_scenes:
                seen_scenes.add(scene)
                yield key, task, info, image
