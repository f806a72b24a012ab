"""VLM evaluation tasks: held-out samples become single-turn items of the right kind, parsers survive junk
model output, metrics behave on hand-checked cases, and aggregation reports means and chance levels."""

from __future__ import annotations

import dataclasses
import json
import random
import string
from typing import Any

import pytest

from components.vlm.eval_tasks import (
    EVAL_TASKS,
    EvalItem,
    aggregate,
    caption_f1,
    items_from_sample,
    results_table,
    score,
)
from components.vlm.verifiers import (
    COLOURS,
    SHAPES,
    attribute_recall,
    box_iou,
    normalise_text,
    parse_box,
    parse_count,
    parse_point,
    parse_time_span,
    temporal_iou,
)

CAPTION = {"task": "caption", "key": "crawl-00000-000000002",
           "caption": "a red circle and a red triangle on a white background", "conversations": []}

GROUNDING = {
    "task": "grounding", "key": "synthground-000000-ground",
    "conversations": [
        {"from": "human", "value": "<image>\nGive the bounding box of the purple shape."},
        {"from": "gpt", "value": "<box>[733, 79, 793, 156]</box>"},
        {"from": "human", "value": "Point to the black shape."},
        {"from": "gpt", "value": "<point>[750, 752]</point>"},
    ],
    "annotations": {"objects": [{"box": [733, 79, 793, 156], "colour": "purple", "point": [763, 117],
                                 "shape": "diamond"}],
                    "referring": [{"box": [733, 79, 793, 156], "expression": "the purple shape",
                                   "point": [763, 117], "target": 0}]},
}

COUNTING = {
    "task": "counting", "key": "synthground-000001-count",
    "conversations": [
        {"from": "human", "value": "<image>\nHow many black diamonds are there?"}, {"from": "gpt", "value": "1"},
        {"from": "human", "value": "How many diamonds are there?"}, {"from": "gpt", "value": "2"},
    ],
    "annotations": {"counting": [{"answer": 1, "question": "How many black diamonds are there?"}]},
}

OCR = {
    "task": "ocr", "key": "synthocr-000000",
    "conversations": [
        {"from": "human", "value": "<image>\nRead all the text in the image."},
        {"from": "gpt", "value": "WGR-58310 $133.24 Bridge\n782 $542.32 MK-92227"},
        {"from": "human", "value": "What does the text say?"},
        {"from": "gpt", "value": "WGR-58310 $133.24 Bridge 782 $542.32 MK-92227"},
        {"from": "human", "value": "How many lines of text are there?"}, {"from": "gpt", "value": "2"},
        {"from": "human", "value": "What is the Price of Peach?"}, {"from": "gpt", "value": "$301.65"},
    ],
}

VIDEO_GROUNDING = {
    "task": "video", "key": "synthvideo-000000-grounding",
    "conversations": [
        {"from": "human", "value": "<video>\nWhen does this happen: the purple triangle appears on the left? "
                                   "Answer with the start and end second."},
        {"from": "gpt", "value": "From 4.0 to 4.2 seconds."},
        {"from": "human", "value": "When does this happen: the purple triangle turns white? "
                                   "Answer with the start and end second."},
        {"from": "gpt", "value": "From 11.4 to 11.6 seconds."},
    ],
    "annotations": {"events": [{"start_s": 4.0, "end_s": 4.2}], "timestamps": [0.4, 1.4]},
}

VIDEO_CAPTION = {
    "task": "video", "key": "synthvideo-000000-caption",
    "conversations": [
        {"from": "human", "value": "<video>\nDescribe what happens in the video, with times."},
        {"from": "gpt", "value": "The background is gray. At 4.0 s a purple triangle appears on the left. "
                                 "At 11.4 s the purple triangle turns white."},
    ],
}

VIDEO_QA = {
    "task": "video", "key": "synthvideo-000000-qa",
    "conversations": [
        {"role": "user", "content": "<video>\nWhat colour is the background?"},
        {"role": "assistant", "content": "gray"},
        {"role": "user", "content": "How many objects appear?"}, {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Does the triangle disappear?"}, {"role": "assistant", "content": "no"},
    ],
}


def kinds(items: list[EvalItem]) -> list[str]:
    return [item.kind for item in items]


def random_junk(rng: random.Random) -> str:
    alphabet = string.printable + "[](),<>-–." + "0123456789" * 3 + "é漢"
    pieces = [rng.choice(["<box>", "</box>", "<point>", "[", "]", "(", ")", ", ", " to ", "-", "From ", "seconds",
                          "nan", "inf", "1e999", "9" * rng.randint(1, 500), "twenty", "one"])
              for _ in range(rng.randint(0, 6))]
    pieces += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))]
    rng.shuffle(pieces)
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------- items


def test_caption_sample_gives_one_caption_item() -> None:
    (item,) = items_from_sample(CAPTION)
    assert item == EvalItem(key="crawl-00000-000000002", kind="caption", question="<image>\nDescribe the image.",
                            reference=CAPTION["caption"], turn=0)


def test_grounding_sample_gives_box_and_point_items() -> None:
    items = items_from_sample(GROUNDING)
    assert kinds(items) == ["grounding", "grounding"]
    assert items[0].question == "<image>\nGive the bounding box of the purple shape."
    assert items[0].reference == "<box>[733, 79, 793, 156]</box>"
    assert items[1].question == "<image>\nPoint to the black shape."
    assert items[1].reference == "<point>[750, 752]</point>"
    assert [item.turn for item in items] == [0, 1]
    assert all(item.key == "synthground-000000-ground" for item in items)


def test_grounding_sample_skips_answers_without_box_or_point() -> None:
    sample = json.loads(json.dumps(GROUNDING))
    sample["conversations"][1]["value"] = "the purple one"
    assert [(item.turn, item.reference) for item in items_from_sample(sample)] == [(1, "<point>[750, 752]</point>")]


def test_counting_sample_gives_integer_items() -> None:
    items = items_from_sample(COUNTING)
    assert kinds(items) == ["counting", "counting"]
    assert [item.reference for item in items] == ["1", "2"]
    assert items[1].question == "<image>\nHow many diamonds are there?"


def test_ocr_sample_keeps_every_turn() -> None:
    items = items_from_sample(OCR)
    assert kinds(items) == ["ocr"] * 4
    assert items[0].reference == "WGR-58310 $133.24 Bridge\n782 $542.32 MK-92227"
    assert items[3].question == "<image>\nWhat is the Price of Peach?"
    assert items[3].reference == "$301.65"


def test_video_samples_give_grounding_and_qa_and_skip_captions() -> None:
    grounding = items_from_sample(VIDEO_GROUNDING)
    assert kinds(grounding) == ["video_grounding", "video_grounding"]
    assert grounding[1].question.startswith("<video>\nWhen does this happen: the purple triangle turns white?")
    assert grounding[1].reference == "From 11.4 to 11.6 seconds."
    assert items_from_sample(VIDEO_CAPTION) == []
    qa = items_from_sample(VIDEO_QA)
    assert kinds(qa) == ["video_qa"] * 3
    assert [item.reference for item in qa] == ["gray", "1", "no"]
    assert qa[2].question == "<video>\nDoes the triangle disappear?"


@pytest.mark.parametrize("sample", [CAPTION, GROUNDING, COUNTING, OCR, VIDEO_GROUNDING, VIDEO_QA])
def test_every_question_has_exactly_one_placeholder_at_its_start(sample: dict[str, Any]) -> None:
    for item in items_from_sample(sample, max_per_sample=10):
        token = "<video>" if sample["task"] == "video" else "<image>"
        assert item.question.startswith(token + "\n")
        assert item.question.count("<image>") + item.question.count("<video>") == 1
        assert item.kind in EVAL_TASKS


def test_max_per_sample_keeps_first_turns() -> None:
    assert [item.turn for item in items_from_sample(OCR, max_per_sample=2)] == [0, 1]
    assert len(items_from_sample(OCR)) == 4
    with pytest.raises(ValueError):
        items_from_sample(OCR, max_per_sample=0)


def test_conversation_may_be_a_json_string() -> None:
    sample = dict(COUNTING, conversations=json.dumps(COUNTING["conversations"]))
    assert kinds(items_from_sample(sample)) == ["counting", "counting"]


@pytest.mark.parametrize("sample", [
    {"task": "segmentation", "conversations": COUNTING["conversations"]},
    {"task": "counting", "conversations": "not json"},
    {"task": "counting", "conversations": None},
    {"task": "counting", "conversations": [{"from": "human", "value": "<image>\nHow many?"}]},
    {"task": "counting", "conversations": [{"from": "gpt", "value": "1"}, {"from": "human", "value": "x"}]},
    {"task": "counting", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "1"}]},
    {"task": "counting", "conversations": ["hello", "world"]},
    {"task": "counting", "conversations": [{"from": "robot", "value": "a"}, {"from": "gpt", "value": "1"}]},
    {"task": "caption", "caption": ""},
    {"task": "caption"},
    {},
])
def test_unknown_or_malformed_samples_give_no_items(sample: dict[str, Any]) -> None:
    assert items_from_sample(sample) == []


def test_items_round_trip_through_plain_dicts() -> None:
    for item in items_from_sample(GROUNDING) + items_from_sample(VIDEO_QA):
        row = item.to_dict()
        assert all(isinstance(value, (str, int)) for value in row.values())
        assert EvalItem.from_dict(row | {"image": b"..."}) == item
    with pytest.raises(ValueError):
        EvalItem(key="k", kind="poetry", question="<image>\nq", reference="r", turn=0)


# ---------------------------------------------------------------------------------------------- parsers


def test_parse_box_formats() -> None:
    assert parse_box("<box>[733, 79, 793, 156]</box>") == (733, 79, 793, 156)
    assert parse_box("the box is [733,79,793,156].") == (733, 79, 793, 156)
    assert parse_box("<box>[ 10 20 30 40 ]</box>") == (10, 20, 30, 40)
    assert parse_box("(10,20),(30,40)") == (10, 20, 30, 40)
    assert parse_box("(10, 20) (30, 40)") == (10, 20, 30, 40)
    assert parse_box("[30, 40, 10, 20]") == (10, 20, 30, 40)
    assert parse_box("[-5, 20, 1500, 40.5]") == (0, 20, 999, 40.5)
    assert parse_box("first [1, 2, 3, 4] then [5, 6, 7, 8]") == (1, 2, 3, 4)
    assert parse_box("[1, 2, 3]") is None
    assert parse_box("<point>[750, 752]</point>") is None
    assert parse_box("") is None


def test_parse_point_formats() -> None:
    assert parse_point("<point>[750, 752]</point>") == (750, 752)
    assert parse_point("(750,752)") == (750, 752)
    assert parse_point("[2000, 3]") == (999, 3)
    assert parse_point("[1, 2, 3, 4]") is None
    assert parse_point("no point") is None


def test_parse_count_formats() -> None:
    assert parse_count("2") == 2
    assert parse_count("There are 12 circles.") == 12
    assert parse_count("three") == 3
    assert parse_count("Twenty shapes, 4 of them red") == 20
    assert parse_count("I see 4, maybe five") == 4
    assert parse_count("zero") == 0
    assert parse_count("2.5") is None
    assert parse_count("someone") is None
    assert parse_count("1" * 50) is None
    assert parse_count("") is None


def test_parse_time_span_formats() -> None:
    assert parse_time_span("From 4.0 to 4.2 seconds.") == (4.0, 4.2)
    assert parse_time_span("4.0-4.2") == (4.0, 4.2)
    assert parse_time_span("between 4 and 5 s") == (4.0, 5.0)
    assert parse_time_span("4 s to 5 s") == (4.0, 5.0)
    assert parse_time_span("from 9 to 3 seconds") == (3.0, 9.0)
    assert parse_time_span("at 4.0 s") is None
    assert parse_time_span("") is None


def test_normalise_text() -> None:
    assert normalise_text("  Hello\n  World. ") == "hello world"
    assert normalise_text("WGR-58310 $133.24 Bridge\n782") == normalise_text("wgr-58310 $133.24 bridge 782.")
    assert normalise_text("") == ""


def test_parsers_never_raise_on_junk() -> None:
    rng = random.Random(0)
    for _ in range(400):
        text = random_junk(rng)
        box, point, count, span = parse_box(text), parse_point(text), parse_count(text), parse_time_span(text)
        assert box is None or (0 <= box[0] <= box[2] <= 999 and 0 <= box[1] <= box[3] <= 999)
        assert point is None or all(0 <= v <= 999 for v in point)
        assert count is None or count >= 0
        assert span is None or span[0] <= span[1]
        normalise_text(text)
        for kind, reference in (("grounding", "<box>[1, 2, 3, 4]</box>"), ("grounding", "<point>[5, 6]</point>"),
                                ("counting", "3"), ("video_grounding", "From 1.0 to 2.0 seconds."),
                                ("caption", "a red circle"), ("ocr", "x"), ("video_qa", "no")):
            metrics = score(EvalItem(key="k", kind=kind, question="<image>\nq", reference=reference, turn=0), text)
            assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_parsers_stay_fast_on_long_runaway_output() -> None:
    """A model that loops emits long digit or whitespace runs; quadratic regexes would hang here."""
    for text in ("1" * 50_000, "(1, 2)" + " " * 50_000, "[" + "1" * 50_000, "1 s" * 20_000, "1." * 25_000):
        assert parse_box(text) is None
        assert parse_time_span(text) is None
        parse_point(text), parse_count(text), caption_f1(text, text)


# ---------------------------------------------------------------------------------------------- metrics


def test_box_iou() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)  # half of each box overlaps
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 5)) == pytest.approx(0.5)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_temporal_iou() -> None:
    assert temporal_iou((4.0, 4.2), (4.0, 4.2)) == 1.0
    assert temporal_iou((0, 1), (2, 3)) == 0.0
    assert temporal_iou((0, 2), (1, 3)) == pytest.approx(1 / 3)
    assert temporal_iou((0, 4), (0, 2)) == pytest.approx(0.5)
    assert temporal_iou((1, 1), (1, 1)) == 1.0
    assert temporal_iou((1, 1), (2, 2)) == 0.0


def test_caption_f1() -> None:
    reference = "a red circle and a red triangle on a white background"
    assert caption_f1(reference, reference) == 1.0
    assert caption_f1(reference.upper() + ".", reference) == 1.0
    assert caption_f1("blue star", reference) == 0.0
    assert caption_f1("", reference) == 0.0
    assert caption_f1("", "") == 1.0
    half = "a red circle"
    assert caption_f1(half, reference) == caption_f1(reference, half)
    # multiset: "red red red" shares two "red" with the reference (precision 2/3, recall 2/11)
    assert caption_f1("red red red", reference) == pytest.approx(2 * (2 / 3) * (2 / 11) / (2 / 3 + 2 / 11))


def test_attribute_recall() -> None:
    reference = "a red circle and a grey triangle on a white background"
    assert attribute_recall("a red shape", reference, COLOURS) == pytest.approx(1 / 3)
    assert attribute_recall("gray and white and red", reference, COLOURS) == 1.0
    assert attribute_recall("two circles and triangles", reference, SHAPES) == 1.0
    assert attribute_recall("", reference, SHAPES) == 0.0
    assert attribute_recall("red circle", "an empty photo", COLOURS) is None


# ---------------------------------------------------------------------------------------------- scoring


ALL_SAMPLES = (CAPTION, GROUNDING, COUNTING, OCR, VIDEO_GROUNDING, VIDEO_QA)


def all_items() -> list[EvalItem]:
    return [item for sample in ALL_SAMPLES for item in items_from_sample(sample, max_per_sample=10)]


def test_perfect_predictions_score_one_everywhere() -> None:
    items = all_items()
    assert {item.kind for item in items} == set(EVAL_TASKS)
    for item in items:
        metrics = score(item, item.reference)
        assert metrics and all(value == 1.0 for value in metrics.values()), (item, metrics)


def test_empty_predictions_score_zero_and_unparsed() -> None:
    for item in all_items():
        metrics = score(item, "")
        assert all(value == 0.0 for value in metrics.values()), (item, metrics)
    box, point = items_from_sample(GROUNDING)
    assert score(box, "") == {"grounding_iou50": 0.0, "grounding_iou": 0.0, "grounding_parsed": 0.0,
                              "grounding_iou_1to3": 0.0, "grounding_iou50_1to3": 0.0}
    assert score(point, "") == {"pointing_hit": 0.0, "pointing_parsed": 0.0, "pointing_hit_1to3": 0.0}


def test_caption_scores_objects_apart_from_the_background() -> None:
    (caption,) = items_from_sample(CAPTION)  # a red circle and a red triangle on a white background
    only_background = score(caption, "a white circle on a white background")
    assert only_background["caption_object_colour_recall"] == 0.0  # white names the background, not an object
    assert only_background["caption_background_recall"] == 1.0
    assert only_background["caption_shape_recall"] == 0.5
    objects = score(caption, "two red shapes: a circle and a triangle, against the gray background")
    assert objects["caption_object_colour_recall"] == 1.0 and objects["caption_shape_recall"] == 1.0
    assert objects["caption_background_recall"] == 0.0
    assert score(caption, "a red circle")["caption_background_recall"] == 0.0  # no background named
    plain = EvalItem(key="k", kind="caption", question="<image>\nDescribe the image.",
                     reference="a red kite on the beach", turn=0)
    assert set(score(plain, "a kite")) == {"caption_f1", "caption_object_colour_recall"}


def test_score_keys_per_kind() -> None:
    (caption,) = items_from_sample(CAPTION)
    assert set(score(caption, "a blue square")) == {"caption_f1", "caption_object_colour_recall",
                                                    "caption_shape_recall", "caption_background_recall"}
    plain = EvalItem(key="k", kind="caption", question="<image>\nDescribe the image.", reference="a photo", turn=0)
    assert set(score(plain, "a photo")) == {"caption_f1"}
    box, point = items_from_sample(GROUNDING)
    near_box = score(box, "<box>[735, 80, 795, 150]</box>")
    assert near_box["grounding_iou50"] == 1.0 and 0.5 < near_box["grounding_iou"] < 1.0
    assert score(point, "[790, 752]")["pointing_hit"] == 1.0
    assert score(point, "[810, 752]")["pointing_hit"] == 0.0
    first, _ = items_from_sample(COUNTING)
    assert score(first, "one")["counting_accuracy"] == 1.0
    assert score(first, "2") == {"counting_accuracy": 0.0, "counting_parsed": 1.0}
    span, _ = items_from_sample(VIDEO_GROUNDING)
    assert score(span, "4.0-4.3")["video_tiou50"] == 1.0
    assert score(span, "From 4.1 to 5.0 seconds.")["video_tiou50"] == 0.0
    ocr = items_from_sample(OCR)[0]
    assert score(ocr, "wgr-58310 $133.24 bridge 782 $542.32 mk-92227.") == {"ocr_exact": 1.0,
                                                                            "ocr_similarity": 1.0}
    background = items_from_sample(VIDEO_QA)[0]
    assert score(background, "Gray.") == {"video_qa_exact": 1.0}


# ---------------------------------------------------------------------------------------------- aggregation


def counting_item(reference: str) -> EvalItem:
    return EvalItem(key="k", kind="counting", question="<image>\nHow many?", reference=reference, turn=0)


def test_aggregate_means_counts_and_majority() -> None:
    counting = [counting_item(r) for r in ("1", "1", "2", "3")]
    qa = [EvalItem(key="v", kind="video_qa", question="<video>\nq", reference=r, turn=0) for r in ("no", "No.", "yes")]
    scored = [(item, score(item, prediction)) for item, prediction in zip(counting, ("1", "2", "2", "x"))]
    scored += [(item, score(item, "no")) for item in qa]
    result = aggregate(scored)
    assert list(result) == sorted(result)
    assert result["counting_accuracy"] == pytest.approx(0.5)
    assert result["counting_parsed"] == pytest.approx(0.75)
    assert result["counting_majority"] == pytest.approx(0.5)
    assert result["video_qa_exact"] == pytest.approx(2 / 3)
    assert result["video_qa_majority"] == pytest.approx(2 / 3)
    assert result["n_counting"] == 4 and result["n_video_qa"] == 3
    assert "n_caption" not in result and "video_tiou" not in result


def test_aggregate_averages_each_metric_over_items_that_have_it() -> None:
    box, point = items_from_sample(GROUNDING)
    result = aggregate([(box, score(box, box.reference)), (point, score(point, ""))])
    assert result["grounding_iou50"] == 1.0 and result["pointing_hit"] == 0.0
    assert result["n_grounding"] == 2
    assert aggregate([]) == {}


def test_results_table() -> None:
    rows = {"untrained": {"counting_accuracy": 0.25, "n_counting": 4.0},
            "stage2": {"counting_accuracy": 0.8123, "grounding_iou50": 1.0, "n_counting": 4.0}}
    table = results_table(rows, ["counting_accuracy", "grounding_iou50", "n_counting"])
    assert table.splitlines() == [
        "| checkpoint | counting_accuracy | grounding_iou50 | n_counting |",
        "|---|---:|---:|---:|",
        "| untrained | 0.250 | - | 4 |",
        "| stage2 | 0.812 | 1.000 | 4 |",
    ]


# ---------------------------------------------------------------------------------------------- few-object scenes


def test_items_carry_the_scene_object_count_of_their_annotations() -> None:
    assert {item.scene_objects for item in items_from_sample(GROUNDING)} == {1}
    assert {item.scene_objects for item in items_from_sample(COUNTING)} == {0}  # its annotations list no objects
    assert items_from_sample(CAPTION)[0].scene_objects == 0
    crowded = json.loads(json.dumps(GROUNDING))
    crowded["annotations"]["objects"] *= 5
    assert {item.scene_objects for item in items_from_sample(crowded)} == {5}
    as_text = json.loads(json.dumps(GROUNDING))
    as_text["annotations"] = json.dumps(as_text["annotations"])
    assert {item.scene_objects for item in items_from_sample(as_text)} == {1}
    broken = json.loads(json.dumps(GROUNDING))
    broken["annotations"] = "{not json"
    assert {item.scene_objects for item in items_from_sample(broken)} == {0}
    (item,) = items_from_sample(GROUNDING)[:1]
    assert EvalItem.from_dict(item.to_dict()) == item
    assert EvalItem.from_dict({k: v for k, v in item.to_dict().items() if k != "scene_objects"}).scene_objects == 0


def test_grounding_on_scenes_of_one_to_three_objects_is_scored_apart() -> None:
    box, point = items_from_sample(GROUNDING)
    right, wrong = "<box>[733, 79, 793, 156]</box>", "<box>[0, 0, 10, 10]</box>"
    assert score(box, right) == {"grounding_iou50": 1.0, "grounding_iou": 1.0, "grounding_parsed": 1.0,
                                 "grounding_iou_1to3": 1.0, "grounding_iou50_1to3": 1.0}
    assert score(box, wrong)["grounding_iou_1to3"] == 0.0
    assert score(point, "<point>[752, 750]</point>")["pointing_hit_1to3"] == 1.0
    assert "pointing_parsed_1to3" not in score(point, "<point>[752, 750]</point>")
    assert score(box, f"<think>It is at the top right.</think>{right}", thinking=True)["grounding_iou_1to3"] == 1.0
    assert score(box, f"<think>unclosed {right}", thinking=True)["grounding_iou_1to3"] == 0.0
    crowded = dataclasses.replace(box, scene_objects=4)
    assert not [k for k in score(crowded, right) if k.endswith("_1to3")]
    unknown = dataclasses.replace(box, scene_objects=0)
    assert not [k for k in score(unknown, right) if k.endswith("_1to3")]
    summary = aggregate([(box, score(box, right)), (crowded, score(crowded, wrong))])
    assert summary["grounding_iou"] == 0.5 and summary["grounding_iou_1to3"] == 1.0


def test_counting_on_scenes_of_one_to_three_objects_is_scored_apart_with_its_own_majority() -> None:
    counting = items_from_sample(COUNTING)[0]
    few = [dataclasses.replace(counting, scene_objects=2, reference=r) for r in ("0", "2", "2")]
    many = [dataclasses.replace(counting, scene_objects=9, reference=r) for r in ("1", "1", "1", "1")]
    assert score(few[0], "0") == {"counting_accuracy": 1.0, "counting_parsed": 1.0, "counting_accuracy_1to3": 1.0}
    assert "counting_accuracy_1to3" not in score(many[0], "1")
    summary = aggregate([(item, score(item, "1")) for item in few + many])
    assert summary["counting_accuracy"] == 4 / 7 and summary["counting_accuracy_1to3"] == 0.0
    assert summary["counting_majority"] == 4 / 7 and summary["counting_majority_1to3"] == 2 / 3
