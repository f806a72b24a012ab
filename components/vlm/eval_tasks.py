"""Evaluation tasks of the VLM: turns held-out samples into single-turn evaluation items, parses free-form
model answers (boxes, points, counts, time spans) and scores and aggregates greedy predictions.

Every (question, answer) turn of a held-out sample becomes its own item, asked alone with the sample's
image or video, so one wrong early answer never leaks into a later question. Parsers never raise on junk
model output: they return None, and an unparsed answer scores 0. Coordinates live in the [0, 999] space
of `components.common.coords`; times are seconds. Chance levels (majority answers) are computed from the
references themselves, so a reader can tell learning from guessing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

EVAL_TASKS = ("caption", "counting", "grounding", "ocr", "video_grounding", "video_qa")

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
CAPTION_QUESTION = "Describe the image."
COORD_MAX = 999.0
POINT_HIT_RADIUS = 50.0
VIDEO_QA_MAX_WORDS = 12  # longer answers are captions, not short-answer QA

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "gray", "grey", "beige",
           "pink", "brown")
SHAPES = ("circle", "square", "triangle", "diamond", "star")
WORD_ALIASES = {"grey": "gray"}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty")

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant"})
SYSTEM_ROLES = frozenset({"system"})

_NUM = r"(?<![\d.])(\d+(?:\.\d+)?)"  # starts only where a number starts: linear time on long digit runs
_COORD = r"([-+]?\d+(?:\.\d+)?)"  # signed: a negative coordinate clamps to 0
_SEP = r"(?:\s*,\s*|\s+)"
_BOX_BRACKETS = re.compile(r"\[\s*" + _SEP.join([_COORD] * 4) + r"\s*\]")
_BOX_CORNERS = re.compile(r"\(\s*" + _COORD + _SEP + _COORD + r"\s*\)\s*(?:,\s*)?\(\s*" + _COORD + _SEP + _COORD
                          + r"\s*\)")
_POINT = re.compile(r"\[\s*" + _COORD + _SEP + _COORD + r"\s*\]|\(\s*" + _COORD + _SEP + _COORD + r"\s*\)")
_INTEGER = re.compile(r"(?<![\w.])(\d{1,9})(?!\.\d)(?!\w)")
_NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b")
_UNIT = r"(?:\s*(?:s|sec|secs|second|seconds)\b)?"
_TIME_SPAN = re.compile(_NUM + _UNIT + r"\s*(?:to|and|until|till|-|–|—|~)\s*" + _NUM)
_VIDEO_GROUNDING_ANSWER = re.compile(r"\s*from\s+\d+(?:\.\d+)?\s+to\s+\d+(?:\.\d+)?\s+seconds?\.?\s*",
                                     re.IGNORECASE)
_MEDIA_TOKENS = re.compile(r"\s*(?:<image>|<video>)\s*")
_WORD = re.compile(r"\w+(?:[.'-]\w+)*")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One single-turn evaluation question of a held-out sample and its expected answer."""

    key: str  # sample key: the evaluation loads the sample's image or video by it
    kind: str  # one of EVAL_TASKS
    question: str  # opens with exactly one "<image>\n" or "<video>\n"
    reference: str  # the expected answer text, as in the sample
    turn: int  # index of the (question, answer) pair in the sample's conversation

    def __post_init__(self) -> None:
        if self.kind not in EVAL_TASKS:
            raise ValueError(f"unknown evaluation kind {self.kind!r}; expected one of {EVAL_TASKS}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> EvalItem:
        """Inverse of to_dict; extra columns of a Ray Data row (image bytes, ...) are ignored."""
        return cls(key=str(row["key"]), kind=str(row["kind"]), question=str(row["question"]),
                   reference=str(row["reference"]), turn=int(row["turn"]))


# ---------------------------------------------------------------------------------------------- samples


def items_from_sample(info: Mapping[str, Any], max_per_sample: int = 4) -> list[EvalItem]:
    """The evaluation items of one held-out sample (its `<key>.json` dict), first turns first, at most
    `max_per_sample`. Unknown tasks, malformed conversations and unusable turns give [] (never raise)."""
    if max_per_sample < 1:
        raise ValueError(f"max_per_sample must be >= 1, got {max_per_sample}")
    if not isinstance(info, Mapping):
        return []
    task, key = info.get("task"), sample_key(info)
    if task == "caption":
        items = caption_items(key, info.get("caption"))
    elif task in ("grounding", "counting", "ocr", "video"):
        pairs = conversation_pairs(info.get("conversations"))
        items = [] if pairs is None else turn_items(key, str(task), pairs)
    else:
        items = []
    return items[:max_per_sample]


def sample_key(info: Mapping[str, Any]) -> str:
    key = info.get("key", info.get("__key__", ""))
    return key if isinstance(key, str) else str(key)


def caption_items(key: str, caption: Any) -> list[EvalItem]:
    if not isinstance(caption, str) or not caption.strip():
        return []
    return [EvalItem(key=key, kind="caption", question=with_media_token(CAPTION_QUESTION, IMAGE_TOKEN),
                     reference=caption.strip(), turn=0)]


def turn_items(key: str, task: str, pairs: list[tuple[str, str]]) -> list[EvalItem]:
    token = VIDEO_TOKEN if task == "video" else IMAGE_TOKEN
    items = []
    for turn, (question, answer) in enumerate(pairs):
        kind = classify_turn(task, question, answer)
        if kind is not None:
            items.append(EvalItem(key=key, kind=kind, question=with_media_token(question, token),
                                  reference=answer.strip(), turn=turn))
    return items


def classify_turn(task: str, question: str, answer: str) -> str | None:
    """The evaluation kind of one turn of a sample of `task`, or None when the turn is not evaluated."""
    answer = answer.strip()
    if not answer:
        return None
    if task == "grounding":
        return "grounding" if is_box_answer(answer) or is_point_answer(answer) else None
    if task == "counting":
        return "counting" if answer.isascii() and answer.isdigit() else None
    if task == "ocr":
        return "ocr"
    if task == "video":
        return classify_video_turn(question, answer)
    return None


def classify_video_turn(question: str, answer: str) -> str | None:
    if _VIDEO_GROUNDING_ANSWER.fullmatch(answer):
        return "video_grounding"
    if strip_media_tokens(question).casefold().startswith("describe"):
        return None  # the clip caption: long free text, left to the caption metrics of image samples
    return "video_qa" if len(answer.split()) <= VIDEO_QA_MAX_WORDS else None


def is_box_answer(answer: str) -> bool:
    return answer.startswith("<box>") and answer.endswith("</box>") and parse_box(answer) is not None


def is_point_answer(answer: str) -> bool:
    return answer.startswith("<point>") and answer.endswith("</point>") and parse_point(answer) is not None


def conversation_pairs(conversations: Any) -> list[tuple[str, str]] | None:
    """(question, answer) pairs of a conversation that alternates user and assistant messages (leading
    system messages skipped), or None when it is malformed. A JSON string is decoded first."""
    if isinstance(conversations, str):
        try:
            conversations = json.loads(conversations)
        except ValueError:
            return None
    if not isinstance(conversations, list):
        return None
    messages = [message_role_and_text(m) for m in conversations]
    if any(m is None for m in messages):
        return None
    turns = [m for m in messages if m is not None and m[0] not in SYSTEM_ROLES]
    if not turns or len(turns) % 2:
        return None
    pairs = []
    for (asker, question), (answerer, answer) in zip(turns[::2], turns[1::2]):
        if asker not in USER_ROLES or answerer not in ASSISTANT_ROLES:
            return None
        pairs.append((question, answer))
    return pairs


def message_role_and_text(message: Any) -> tuple[str, str] | None:
    """(role, text) of a {"from", "value"} or {"role", "content"} message, or None when malformed."""
    if not isinstance(message, Mapping):
        return None
    role = message.get("from", message.get("role"))
    text = message.get("value", message.get("content"))
    if not isinstance(role, str) or not isinstance(text, str):
        return None
    role = role.casefold()
    return (role, text) if role in USER_ROLES | ASSISTANT_ROLES | SYSTEM_ROLES else None


def strip_media_tokens(question: str) -> str:
    return _MEDIA_TOKENS.sub(" ", question).strip()


def with_media_token(question: str, token: str) -> str:
    """The question with exactly one media placeholder, at its start on a line of its own."""
    return f"{token}\n{strip_media_tokens(question)}"


# ---------------------------------------------------------------------------------------------- parsers


def clamp_coord(value: float) -> float:
    return min(max(value, 0.0), COORD_MAX)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first box of `text` as (x1, y1, x2, y2) with x1 <= x2, y1 <= y2, clamped to [0, 999]:
    "[x1, y1, x2, y2]" (inside or outside <box> tags) or "(x1, y1), (x2, y2)"; None when there is none."""
    if not isinstance(text, str):
        return None
    found = [m for m in (_BOX_BRACKETS.search(text), _BOX_CORNERS.search(text)) if m is not None]
    if not found:
        return None
    match = min(found, key=lambda m: m.start())
    x1, y1, x2, y2 = (clamp_coord(float(v)) for v in match.groups())
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def parse_point(text: str) -> tuple[float, float] | None:
    """The first point of `text` as (x, y) clamped to [0, 999]: "[x, y]" (inside or outside <point> tags)
    or "(x, y)"; None when there is none."""
    if not isinstance(text, str):
        return None
    match = _POINT.search(text)
    if match is None:
        return None
    x, y = (clamp_coord(float(v)) for v in match.groups() if v is not None)
    return x, y


def parse_count(text: str) -> int | None:
    """The first whole number of `text`, in digits or as a word from zero to twenty; None when there is none."""
    if not isinstance(text, str):
        return None
    found = [m for m in (_INTEGER.search(text), _NUMBER_WORD.search(text.casefold())) if m is not None]
    if not found:
        return None
    match = min(found, key=lambda m: m.start())
    value = match.group(1)
    return int(value) if value.isdigit() else NUMBER_WORDS.index(value)


def parse_time_span(text: str) -> tuple[float, float] | None:
    """The first time span of `text` as (start, end) seconds with start <= end: "From 4.0 to 4.2 seconds",
    "4.0-4.2", "between 4 and 5 s", "4 s to 5 s"; None when there is none."""
    if not isinstance(text, str):
        return None
    match = _TIME_SPAN.search(text)
    if match is None:
        return None
    start, end = float(match.group(1)), float(match.group(2))
    if not (math.isfinite(start) and math.isfinite(end)):
        return None
    return min(start, end), max(start, end)


def normalise_text(text: str) -> str:
    """Casefolded, whitespace collapsed to single spaces, trailing periods stripped."""
    if not isinstance(text, str):
        return ""
    return " ".join(text.casefold().split()).rstrip(".").rstrip()


def words(text: str) -> list[str]:
    """The words of the normalised text (punctuation dropped; "4.0", "mk-92227" and "don't" stay whole)."""
    return _WORD.findall(normalise_text(text))


# ---------------------------------------------------------------------------------------------- metrics


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when the union is empty."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def box_area(box: Sequence[float]) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def temporal_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (start, end) spans. A zero-length union (two identical instants)
    scores 1, two different instants 0."""
    inter = max(min(a[1], b[1]) - max(a[0], b[0]), 0.0)
    union = max(a[1], b[1]) - min(a[0], b[0])
    if union <= 0:
        return 1.0 if tuple(a) == tuple(b) else 0.0
    return inter / union


def caption_f1(prediction: str, reference: str) -> float:
    """Unigram F1 over normalised words (multiset intersection); 1 when both are empty."""
    predicted, expected = Counter(words(prediction)), Counter(words(reference))
    if not predicted and not expected:
        return 1.0
    common = sum((predicted & expected).values())
    if common == 0:
        return 0.0
    precision = common / sum(predicted.values())
    recall = common / sum(expected.values())
    return 2 * precision * recall / (precision + recall)


def vocabulary_words(text: str, vocabulary: Iterable[str]) -> set[str]:
    """Words of `text` in `vocabulary`, plurals singularised ("circles") and aliases merged ("grey")."""
    vocab = {WORD_ALIASES.get(w, w) for w in vocabulary}
    found = set()
    for word in words(text):
        word = WORD_ALIASES.get(word, word)
        if word not in vocab and word.endswith("s"):
            word = WORD_ALIASES.get(word[:-1], word[:-1])
        if word in vocab:
            found.add(word)
    return found


def attribute_recall(prediction: str, reference: str, vocabulary: Iterable[str]) -> float | None:
    """Share of the vocabulary words (colours, shapes) of the reference that the prediction names too;
    None when the reference names none."""
    vocab = tuple(vocabulary)
    expected = vocabulary_words(reference, vocab)
    if not expected:
        return None
    return len(expected & vocabulary_words(prediction, vocab)) / len(expected)


# ---------------------------------------------------------------------------------------------- scoring


def score(item: EvalItem, prediction: str) -> dict[str, float]:
    """Metrics of one prediction for its item (keys depend on the kind; every value is in [0, 1])."""
    prediction = prediction if isinstance(prediction, str) else ""
    scorer = _SCORERS.get(item.kind)
    if scorer is None:
        raise ValueError(f"unknown evaluation kind {item.kind!r}")
    return scorer(item.reference, prediction)


_BACKGROUND = re.compile(r"\b(?:on|against)\s+(?:a|an|the)?\s*(\w+)\s+background\b", re.IGNORECASE)


def split_background(caption: str) -> tuple[str, str | None]:
    """(the caption without its "on a <colour> background" phrase, that colour word or None): a scene's
    background is one flat colour that fills most of every visual token, so naming it proves little
    about reading the objects; the two are scored apart."""
    match = _BACKGROUND.search(caption)
    if match is None:
        return caption, None
    return caption[:match.start()] + caption[match.end():], match.group(1)


def score_caption(reference: str, prediction: str) -> dict[str, float]:
    """Unigram F1, and recall of the objects' colours, the shapes and the background colour the reference
    names (each only when the reference names any)."""
    result = {"caption_f1": caption_f1(prediction, reference)}
    ref_objects, ref_background = split_background(reference)
    pred_objects, pred_background = split_background(prediction)
    for name, vocabulary in (("caption_object_colour_recall", COLOURS), ("caption_shape_recall", SHAPES)):
        recall = attribute_recall(pred_objects, ref_objects, vocabulary)
        if recall is not None:
            result[name] = recall
    if ref_background is not None and vocabulary_words(ref_background, COLOURS):
        named = vocabulary_words(pred_background or "", COLOURS)
        result["caption_background_recall"] = float(vocabulary_words(ref_background, COLOURS) <= named)
    return result


def score_counting(reference: str, prediction: str) -> dict[str, float]:
    predicted = parse_count(prediction)
    return {"counting_accuracy": float(predicted == int(reference)), "counting_parsed": float(predicted is not None)}


def score_grounding(reference: str, prediction: str) -> dict[str, float]:
    if is_point_answer(reference):
        return score_pointing(reference, prediction)
    expected = parse_box(reference)
    if expected is None:
        raise ValueError(f"grounding reference holds neither a box nor a point: {reference!r}")
    predicted = parse_box(prediction)
    iou = box_iou(predicted, expected) if predicted is not None else 0.0
    return {"grounding_iou50": float(iou >= 0.5), "grounding_iou": iou,
            "grounding_parsed": float(predicted is not None)}


def score_pointing(reference: str, prediction: str) -> dict[str, float]:
    expected, predicted = parse_point(reference), parse_point(prediction)
    if expected is None:
        raise ValueError(f"pointing reference holds no point: {reference!r}")
    hit = predicted is not None and math.dist(predicted, expected) <= POINT_HIT_RADIUS
    return {"pointing_hit": float(hit), "pointing_parsed": float(predicted is not None)}


def score_ocr(reference: str, prediction: str) -> dict[str, float]:
    return {"ocr_exact": float(normalise_text(prediction) == normalise_text(reference))}


def score_video_grounding(reference: str, prediction: str) -> dict[str, float]:
    expected, predicted = parse_time_span(reference), parse_time_span(prediction)
    if expected is None:
        raise ValueError(f"video grounding reference holds no time span: {reference!r}")
    tiou = temporal_iou(predicted, expected) if predicted is not None else 0.0
    return {"video_tiou50": float(tiou >= 0.5), "video_tiou": tiou,
            "video_grounding_parsed": float(predicted is not None)}


def score_video_qa(reference: str, prediction: str) -> dict[str, float]:
    return {"video_qa_exact": float(normalise_text(prediction) == normalise_text(reference))}


_SCORERS = {"caption": score_caption, "counting": score_counting, "grounding": score_grounding, "ocr": score_ocr,
            "video_grounding": score_video_grounding, "video_qa": score_video_qa}


# ---------------------------------------------------------------------------------------------- aggregation


def aggregate(scored: Iterable[tuple[EvalItem, Mapping[str, float]]]) -> dict[str, float]:
    """Mean of every metric over the items that have it, `n_<kind>` item counts, and the chance levels
    `counting_majority` / `video_qa_majority` (accuracy of always giving the most common reference).
    Keys are sorted."""
    sums: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    references: dict[str, list[str]] = {"counting": [], "video_qa": []}
    for item, metrics in scored:
        kinds[item.kind] += 1
        if item.kind in references:
            references[item.kind].append(normalise_text(item.reference))
        for name, value in metrics.items():
            sums[name] += float(value)
            counts[name] += 1
    result = {name: sums[name] / counts[name] for name in counts}
    result |= {f"n_{kind}": float(count) for kind, count in kinds.items()}
    for kind, answers in references.items():
        if answers:
            result[f"{kind}_majority"] = majority_accuracy(answers)
    return dict(sorted(result.items()))


def majority_accuracy(answers: Sequence[str]) -> float:
    """Accuracy of always giving the most common answer."""
    return Counter(answers).most_common(1)[0][1] / len(answers)


def results_table(rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> str:
    """A Markdown table: one row per checkpoint (in the given order), one column per metric; values to 3
    decimals (`n_*` counts as integers), "-" where a checkpoint lacks the metric."""
    lines = ["| checkpoint | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, values in rows.items():
        cells = [format_cell(metric, values.get(metric)) for metric in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_cell(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric.startswith("n_") and float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}"
