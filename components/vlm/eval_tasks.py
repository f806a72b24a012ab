"""Evaluation tasks of the VLM: turns held-out samples into single-turn evaluation items, parses free-form
model answers (boxes, points, counts, time spans) and scores and aggregates greedy predictions.

Every (question, answer) turn of a held-out sample becomes its own item, asked alone with the sample's
image or video, so one wrong early answer never leaks into a later question. Parsing and scoring are
those of `components.vlm.verifiers`, the one implementation that SFT rejection sampling and RL rewards
use too, so evaluation and rewards never disagree: parsers never raise on junk model output, they return
None, and an unparsed answer scores 0. Coordinates live in the [0, 999] space of
`components.common.coords`; times are seconds. Chance levels (majority answers) are computed from the
references themselves, so a reader can tell learning from guessing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from components.vlm.verifiers import (
    COLOURS,
    answer_of,
    caption_attribute_recalls,
    exact_match,
    format_ok,
    is_box_answer,
    is_point_answer,
    normalise_text,
    ocr_similarity,
    parse_box,
    parse_final_count,
    parse_point,
    parse_time_span,
    split_background,
    verify_counting,
    verify_grounding,
    verify_ocr,
    verify_pointing,
    verify_temporal,
    vocabulary_words,
    words,
)

EVAL_TASKS = ("caption", "counting", "grounding", "ocr", "video_grounding", "video_qa")

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
CAPTION_QUESTION = "Describe the image."
VIDEO_QA_MAX_WORDS = 12  # longer answers are captions, not short-answer QA

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant"})
SYSTEM_ROLES = frozenset({"system"})

_VIDEO_GROUNDING_ANSWER = re.compile(r"\s*from\s+\d+(?:\.\d+)?\s+to\s+\d+(?:\.\d+)?\s+seconds?\.?\s*",
                                     re.IGNORECASE)
_MEDIA_TOKENS = re.compile(r"\s*(?:<image>|<video>)\s*")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One single-turn evaluation question of a held-out sample and its expected answer."""

    key: str  # sample key: the evaluation loads the sample's image or video by it
    kind: str  # one of EVAL_TASKS
    question: str  # opens with exactly one "<image>\n" or "<video>\n"
    reference: str  # the expected answer text, as in the sample
    turn: int  # index of the (question, answer) pair in the sample's conversation
    scene_objects: int = 0  # objects in the picture when the sample's annotations list them; 0: unknown

    def __post_init__(self) -> None:
        if self.kind not in EVAL_TASKS:
            raise ValueError(f"unknown evaluation kind {self.kind!r}; expected one of {EVAL_TASKS}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> EvalItem:
        """Inverse of to_dict; extra columns of a Ray Data row (image bytes, ...) are ignored."""
        return cls(key=str(row["key"]), kind=str(row["kind"]), question=str(row["question"]),
                   reference=str(row["reference"]), turn=int(row["turn"]),
                   scene_objects=int(row.get("scene_objects", 0) or 0))


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
        items = [] if pairs is None else turn_items(key, str(task), pairs, scene_object_count(info))
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


def turn_items(key: str, task: str, pairs: list[tuple[str, str]], scene_objects: int = 0) -> list[EvalItem]:
    token = VIDEO_TOKEN if task == "video" else IMAGE_TOKEN
    items = []
    for turn, (question, answer) in enumerate(pairs):
        kind = classify_turn(task, question, answer)
        if kind is not None:
            items.append(EvalItem(key=key, kind=kind, question=with_media_token(question, token),
                                  reference=answer.strip(), turn=turn, scene_objects=scene_objects))
    return items


def scene_object_count(info: Mapping[str, Any]) -> int:
    """How many objects the sample's annotations list (the grounding and counting scenes keep every one);
    0 when they list none or are malformed."""
    annotations = info.get("annotations")
    if isinstance(annotations, str):
        try:
            annotations = json.loads(annotations)
        except ValueError:
            return 0
    objects = annotations.get("objects") if isinstance(annotations, Mapping) else None
    return len(objects) if isinstance(objects, list) else 0


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


# ---------------------------------------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------------------------------------- scoring


def score(item: EvalItem, prediction: str, thinking: bool = False) -> dict[str, float]:
    """Metrics of one prediction for its item (keys depend on the kind; every value is in [0, 1]), each
    computed by the verifiers of `components.vlm.verifiers`, so a metric and the reward of the same answer
    agree. With `thinking`, the prediction is the response of a thinking model: its answer
    (`answer_of(prediction, True)`) is scored, `format_ok` (0/1) is added, and a broken format scores 0 on
    every metric, as `verify` rewards it."""
    prediction = prediction if isinstance(prediction, str) else ""
    scorer = _SCORERS.get(item.kind)
    if scorer is None:
        raise ValueError(f"unknown evaluation kind {item.kind!r}")
    if not thinking:
        return few_object_copies(item, scorer(item.reference, prediction))
    ok = format_ok(prediction)
    metrics = scorer(item.reference, answer_of(prediction, True))
    if not ok:
        metrics = dict.fromkeys(metrics, 0.0)
    return few_object_copies(item, metrics) | {"format_ok": float(ok)}


FEW_OBJECTS = 3  # grounding, pointing and counting are also scored apart on scenes of 1 to this many objects
FEW_OBJECT_METRICS = ("grounding_iou", "grounding_iou50", "pointing_hit", "counting_accuracy")


def few_object_copies(item: EvalItem, metrics: dict[str, float]) -> dict[str, float]:
    """The grounding, pointing and counting scores again as `<metric>_1to3` when the item's scene holds 1 to 3
    objects: there a model that reads positions from the pixels has one target among few, and the shuffled
    control says what guessing the usual place of a lone object (or the usual count) scores."""
    if not 1 <= item.scene_objects <= FEW_OBJECTS:
        return metrics
    return metrics | {f"{name}_1to{FEW_OBJECTS}": metrics[name] for name in FEW_OBJECT_METRICS if name in metrics}


def score_caption(reference: str, prediction: str) -> dict[str, float]:
    """Unigram F1, and recall of the objects' colours, the shapes (`caption_attribute_recalls`) and the
    background colour the reference names (each only when the reference names any)."""
    result = {"caption_f1": caption_f1(prediction, reference)} | caption_attribute_recalls(prediction, reference)
    _, ref_background = split_background(reference)
    _, pred_background = split_background(prediction)
    if ref_background is not None and vocabulary_words(ref_background, COLOURS):
        named = vocabulary_words(pred_background or "", COLOURS)
        result["caption_background_recall"] = float(vocabulary_words(ref_background, COLOURS) <= named)
    return result


def score_counting(reference: str, prediction: str) -> dict[str, float]:
    """Accuracy of the answer's final count (`verify_counting`: the last whole number it gives)."""
    return {"counting_accuracy": verify_counting(prediction, reference),
            "counting_parsed": float(parse_final_count(prediction) is not None)}


def score_grounding(reference: str, prediction: str) -> dict[str, float]:
    """IoU of the first box (`verify_grounding`) and its rate of IoU >= 0.5; a point reference is pointing."""
    if is_point_answer(reference):
        return score_pointing(reference, prediction)
    iou = verify_grounding(prediction, reference)
    return {"grounding_iou50": float(iou >= 0.5), "grounding_iou": iou,
            "grounding_parsed": float(parse_box(prediction) is not None)}


def score_pointing(reference: str, prediction: str) -> dict[str, float]:
    return {"pointing_hit": verify_pointing(prediction, reference),
            "pointing_parsed": float(parse_point(prediction) is not None)}


def score_ocr(reference: str, prediction: str) -> dict[str, float]:
    """Normalised exact match (`verify_ocr`) and normalised edit-distance similarity (`ocr_similarity`)."""
    return {"ocr_exact": verify_ocr(prediction, reference), "ocr_similarity": ocr_similarity(prediction, reference)}


def score_video_grounding(reference: str, prediction: str) -> dict[str, float]:
    tiou = verify_temporal(prediction, reference)
    return {"video_tiou50": float(tiou >= 0.5), "video_tiou": tiou,
            "video_grounding_parsed": float(parse_time_span(prediction) is not None)}


def score_video_qa(reference: str, prediction: str) -> dict[str, float]:
    return {"video_qa_exact": exact_match(prediction, reference)}


_SCORERS = {"caption": score_caption, "counting": score_counting, "grounding": score_grounding, "ocr": score_ocr,
            "video_grounding": score_video_grounding, "video_qa": score_video_qa}


# ---------------------------------------------------------------------------------------------- aggregation


def aggregate(scored: Iterable[tuple[EvalItem, Mapping[str, float]]]) -> dict[str, float]:
    """Mean of every metric over the items that have it, `n_<kind>` item counts, and the chance levels
    `counting_majority` / `video_qa_majority` (accuracy of always giving the most common reference; also
    `counting_majority_1to3` over the counting items of scenes of 1 to 3 objects).
    Keys are sorted."""
    sums: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    references: dict[str, list[str]] = {"counting": [], "video_qa": []}
    few_object_counts: list[str] = []
    for item, metrics in scored:
        kinds[item.kind] += 1
        if item.kind in references:
            references[item.kind].append(normalise_text(item.reference))
        if item.kind == "counting" and 1 <= item.scene_objects <= FEW_OBJECTS:
            few_object_counts.append(normalise_text(item.reference))
        for name, value in metrics.items():
            sums[name] += float(value)
            counts[name] += 1
    result = {name: sums[name] / counts[name] for name in counts}
    result |= {f"n_{kind}": float(count) for kind, count in kinds.items()}
    for kind, answers in references.items():
        if answers:
            result[f"{kind}_majority"] = majority_accuracy(answers)
    if few_object_counts:
        result[f"counting_majority_1to{FEW_OBJECTS}"] = majority_accuracy(few_object_counts)
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
