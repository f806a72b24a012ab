"""Verifiers of VLM answers: the thinking-block rules, each verifier on tricky hand-checked strings, the
routing of `verify`, agreement with `eval_tasks.score`, and no crash (and a score in [0, 1]) on junk."""

from __future__ import annotations

import random
import string

import pytest

from components.vlm.eval_tasks import EvalItem, score
from components.vlm.verifiers import (
    POINT_HIT_RADIUS,
    VERIFIERS,
    answer_of,
    edit_distance,
    format_ok,
    ocr_similarity,
    parse_final_count,
    parse_numbers,
    split_thinking,
    verify,
    verify_caption_attributes,
    verify_counting,
    verify_format,
    verify_grounding,
    verify_numeric,
    verify_ocr,
    verify_pointing,
    verify_temporal,
)

BOX = "<box>[100, 100, 200, 200]</box>"
POINT = "<point>[750, 752]</point>"
SPAN = "From 4.0 to 5.0 seconds."
CAPTION = "a red circle and a red triangle on a white background"


# ---------------------------------------------------------------------------------------------- thinking


@pytest.mark.parametrize(("response", "expected"), [
    ("3", (None, "3")),
    ("  I count 3.  ", (None, "I count 3.")),
    ("<think>two here, one there</think> 3", ("two here, one there", "3")),
    ("<think>counting</think>", ("counting", "")),  # empty answer
    ("<think>never closed 3", ("never closed 3", "")),  # unclosed: no answer
    ("opened by the template</think>3", ("opened by the template", "3")),  # "<think>" was in the prompt
    ("<think><think>a</think></think>b", ("<think>a", "</think>b")),  # nested: split at the first "</think>"
    ("<think>a</think>x<think>b</think>y", ("a", "x<think>b</think>y")),  # two blocks
    ("", (None, "")),
    (None, (None, "")),
    (42, (None, "")),
])
def test_split_thinking(response: object, expected: tuple[str | None, str]) -> None:
    assert split_thinking(response) == expected


@pytest.mark.parametrize(("response", "ok"), [
    ("<think>a</think>3", True),
    ("\n  <think>\nlet me count\n</think>\n\nThree.", True),
    ("<think></think>3", True),  # empty thinking is allowed, an empty answer is not
    ("<think>a</think>", False),
    ("<think>a</think>   \n", False),
    ("<think>never closed 3", False),
    ("<think><think>a</think></think>b", False),
    ("<think>a</think>x<think>b</think>y", False),
    ("<think>a</think>3</think>", False),
    ("3<think>a</think>3", False),  # must start with the block
    ("reasoning</think>3", False),
    ("3", False),
    ("", False),
    (None, False),
])
def test_format_ok(response: object, ok: bool) -> None:
    assert format_ok(response) is ok
    assert verify_format(response) == float(ok)
    assert answer_of(response, True) == (split_thinking(response)[1] if ok else "")


def test_answer_of() -> None:
    assert answer_of("  <think>a</think> 3 ", False) == "<think>a</think> 3"  # thinking off: tags are text
    assert answer_of("  <think>a</think> 3 ", True) == "3"
    assert answer_of("<think>a</think>3<think>", True) == ""
    assert answer_of(None, False) == "" and answer_of(None, True) == ""


# ---------------------------------------------------------------------------------------------- counting


@pytest.mark.parametrize(("answer", "reference", "expected"), [
    ("3", "3", 1.0),
    (" 3\n", "3", 1.0),
    ("I count 3 objects.", "3", 1.0),
    ("three", "3", 1.0),
    ("Three.", "3", 1.0),
    ("There are 3 red circles and 2 blue, so 5", "5", 1.0),  # the last number is the answer
    ("There are 3 red circles and 2 blue, so 5", "3", 0.0),
    ("I see 4, maybe five", "5", 1.0),
    ("5 shapes, 4 of them red", "5", 0.0),  # ... a rule, not a reading of the sentence
    ("12", "1", 0.0),
    ("2.5", "2", 0.0),  # not a whole number
    ("3.0", "3", 0.0),
    ("3rd", "3", 0.0),
    ("٣", "3", 1.0),  # Arabic-Indic digit three
    ("３", "3", 1.0),  # fullwidth digit three
    ("١٢", "12", 1.0),
    ("３", "٣", 1.0),
    ("", "3", 0.0),
    ("   ", "0", 0.0),
    ("none", "0", 0.0),
    ("zero", "0", 1.0),
    ("1" * 50, "1", 0.0),
])
def test_verify_counting(answer: str, reference: str, expected: float) -> None:
    assert verify_counting(answer, reference) == expected


def test_counting_takes_the_last_whole_number() -> None:
    assert parse_final_count("first 1, then two, finally 3") == 3
    assert parse_final_count("3 then twenty") == 20
    assert parse_final_count("no number") is None
    assert verify_counting(None, "3") == 0.0
    with pytest.raises(ValueError):
        verify_counting("3", "three")  # references are digits: a bad one is a caller bug


# ---------------------------------------------------------------------------------------------- grounding


@pytest.mark.parametrize(("answer", "expected"), [
    (BOX, 1.0),
    ("The box is [100,100,200,200].", 1.0),
    ("(100, 100), (200, 200)", 1.0),
    ("[200, 200, 100, 100]", 1.0),  # corners swapped
    ("[150, 100, 250, 200]", 1 / 3),  # half of each box overlaps
    ("[100, 100, 200, 150]", 0.5),
    ("[100, 100, 200, 200] or maybe [0, 0, 999, 999]", 1.0),  # several boxes: the first
    ("[0, 0, 999, 999] or maybe [100, 100, 200, 200]", 100 * 100 / 999 ** 2),
    ("[１００, １００, ２００, ２００]", 1.0),  # fullwidth digits
    ("<point>[150, 150]</point>", 0.0),
    ("[100, 100, 200]", 0.0),
    ("", 0.0),
])
def test_verify_grounding(answer: str, expected: float) -> None:
    assert verify_grounding(answer, BOX) == pytest.approx(expected)


def test_grounding_clamps_to_the_coordinate_space() -> None:
    full = "[0, 0, 999, 999]"
    assert verify_grounding("[-50, -1, 1500, 99999]", full) == 1.0  # negative and too large: clamped
    assert verify_grounding("[-300, -300, -100, -100]", BOX) == 0.0  # clamps to an empty box at the origin
    assert verify_grounding("[1000, 1000, 2000, 2000]", full) == 0.0
    with pytest.raises(ValueError):
        verify_grounding(BOX, POINT)


def test_verify_pointing() -> None:
    assert verify_pointing(POINT, POINT) == 1.0
    assert verify_pointing("[790, 752]", POINT) == 1.0
    assert verify_pointing(f"({750 + POINT_HIT_RADIUS:.0f}, 752)", POINT) == 1.0  # on the radius
    assert verify_pointing("[801, 752]", POINT) == 0.0
    assert verify_pointing("[780, 782]", POINT) == 1.0  # 42.4 away
    assert verify_pointing("[790, 792]", POINT) == 0.0  # 56.6 away
    assert verify_pointing("[2000, 752]", "<point>[999, 752]</point>") == 1.0
    assert verify_pointing("[750, 752, 760, 760]", POINT) == 0.0  # a box is no point
    assert verify_pointing("", POINT) == 0.0


# ---------------------------------------------------------------------------------------------- ocr


def levenshtein_table(a: str, b: str) -> int:
    """The textbook dynamic programme, to check the bit-parallel one against."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def test_edit_distance() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("", "") == 0
    assert edit_distance("flaw", "lawn") == 2
    rng = random.Random(1)
    for _ in range(150):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 90)))
        assert edit_distance(a, b) == levenshtein_table(a, b), (a, b)


def test_ocr_scores() -> None:
    assert ocr_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert ocr_similarity("Kitten.", "  SITTING ") == pytest.approx(1 - 3 / 7)  # normalised first
    assert ocr_similarity("MK-92227", "mk-92227.") == 1.0
    assert ocr_similarity("", "abc") == 0.0
    assert ocr_similarity(None, "abc") == 0.0
    assert ocr_similarity("", "") == 1.0
    assert verify_ocr("WGR-58310  $133.24\nBridge.", "wgr-58310 $133.24 bridge") == 1.0
    assert verify_ocr("WGR-58311 $133.24 Bridge", "WGR-58310 $133.24 Bridge") == 0.0
    assert verify_ocr("", "x") == 0.0


def test_ocr_similarity_stays_fast_on_runaway_output() -> None:
    assert ocr_similarity("a" * 50_000, "a" * 20) == pytest.approx(20 / 50_000)
    assert ocr_similarity("ab" * 3_000, "ba" * 3_000) == pytest.approx(1 - 2 / 6_000)


# ---------------------------------------------------------------------------------------------- captions, time


def test_verify_caption_attributes() -> None:
    assert verify_caption_attributes(CAPTION, CAPTION) == 1.0
    assert verify_caption_attributes("a red circle", CAPTION) == pytest.approx((1 + 1 / 2) / 2)
    # the background phrase counts neither way: "white" names no object of the reference
    assert verify_caption_attributes("a white circle on a white background", CAPTION) == pytest.approx((0 + 1 / 2) / 2)
    assert verify_caption_attributes("two red shapes", "a red kite") == 1.0  # colours only
    assert verify_caption_attributes("stars", "two stars on a blue background") == 1.0  # shapes only
    assert verify_caption_attributes("a red circle", "an empty photo on a white background") is None
    assert verify_caption_attributes("", CAPTION) == 0.0


def test_verify_temporal() -> None:
    assert verify_temporal(SPAN, SPAN) == 1.0
    assert verify_temporal("From 4.5 to 5.5 seconds.", SPAN) == pytest.approx(0.5 / 1.5)
    assert verify_temporal("between 2 and 6 s", SPAN) == pytest.approx(1 / 4)
    assert verify_temporal("5.0-4.0", SPAN) == 1.0  # start and end swapped
    assert verify_temporal("6 s to 8 s", SPAN) == 0.0
    assert verify_temporal("at 4.0 s", SPAN) == 0.0
    assert verify_temporal("", SPAN) == 0.0
    with pytest.raises(ValueError):
        verify_temporal(SPAN, "at 4 s")


# ---------------------------------------------------------------------------------------------- numeric


@pytest.mark.parametrize(("answer", "reference"), [
    ("4", "4"), ("4.0", "4"), ("four", "4"), ("Four.", "4.00"), ("1/2", "0.5"), ("0.5", "1 / 2"), (".5", "1/2"),
    ("1,000", "1000"), ("1,000,000.5", "1000000.5"), ("-3", "-3.0"), ("\u22123", "-3"), ("The answer is 7.", "7"),
    ("3 apples and 4 pears, 7 in all", "7"), ("0.3333333", "1/3"), ("٤", "4"), ("1000000", "1000000.5"),
])
def test_numeric_equivalent(answer: str, reference: str) -> None:
    assert verify_numeric(answer, reference) == 1.0


@pytest.mark.parametrize(("answer", "reference"), [
    ("5", "4"), ("0.33", "1/3"), ("7, or 3", "7"), ("-4", "4"), ("1/0", "0"), ("3,4", "4"), ("", "0"),
    ("nothing", "0"), ("1" * 400, "1"), ("4th", "4"), ("1.2.3", "3"),
])
def test_numeric_not_equivalent(answer: str, reference: str) -> None:
    assert verify_numeric(answer, reference) == 0.0


def test_parse_numbers() -> None:
    assert parse_numbers("1,000 and 3,4 and 1/4 then twenty") == [1000.0, 0.25, 20.0]  # "3,4" is ambiguous
    assert parse_numbers("MK-92227 costs $1.50") == [92227.0, 1.5]
    with pytest.raises(ValueError):
        verify_numeric("4", "no number")


# ---------------------------------------------------------------------------------------------- verify


def test_verify_routes_by_task() -> None:
    assert set(VERIFIERS) == {"counting", "grounding", "pointing", "ocr", "caption_attributes", "video_grounding",
                              "numeric"}
    assert verify("counting", "I count 3 objects.", "3") == 1.0
    assert verify("grounding", "[150, 100, 250, 200]", BOX) == pytest.approx(1 / 3)
    assert verify("grounding", "[790, 752]", POINT) == 1.0  # a point reference is scored as pointing
    assert verify("grounding", "[850, 752]", POINT) == 0.0
    assert verify("pointing", "(760, 760)", POINT) == 1.0
    assert verify("ocr", "Bridge.", "bridge") == 1.0
    assert verify("caption_attributes", "a red circle", CAPTION) == pytest.approx(0.75)
    assert verify("video_grounding", "4-5", SPAN) == 1.0
    assert verify("numeric", "1/2", "0.5") == 1.0
    with pytest.raises(ValueError):
        verify("poetry", "3", "3")
    with pytest.raises(ValueError):
        verify("caption_attributes", "a red circle", "an empty photo")  # nothing to score: a caller bug


@pytest.mark.parametrize("response", [
    "<think>it is 3</think>",  # empty answer
    "<think>it is 3",  # unclosed
    "<think>a</think>3<think>b</think>3",  # two blocks
    "<think><think>a</think></think>3",  # nested
    "3",  # no thinking at all
    "3 <think>a</think> 3",  # does not start with the block
])
def test_verify_broken_thinking_format_scores_zero(response: str) -> None:
    assert verify("counting", response, "3", thinking=True) == 0.0


def test_verify_with_thinking_scores_the_answer_only() -> None:
    response = "<think>I see 2 circles, no, 4; and [0, 0, 10, 10]</think>\nThere are 3."
    assert verify("counting", response, "3", thinking=True) == 1.0
    assert verify("counting", response, "3") == 1.0  # thinking off: the whole text, last number still 3
    assert verify("grounding", f"<think>maybe [0, 0, 10, 10]</think>{BOX}", BOX, thinking=True) == 1.0
    assert verify("grounding", f"<think>maybe [0, 0, 10, 10]</think>{BOX}", BOX) == 0.0  # first box is the guess


@pytest.mark.parametrize("response", [None, 3, 2.5, b"3", ["3"], {"a": 1}])
def test_verify_never_raises_on_non_str_responses(response: object) -> None:
    for task, reference in (("counting", "3"), ("grounding", BOX), ("grounding", POINT), ("ocr", "3"),
                            ("caption_attributes", CAPTION), ("video_grounding", SPAN), ("numeric", "3")):
        assert verify(task, response, reference) == 0.0
        assert verify(task, response, reference, thinking=True) == 0.0


# ---------------------------------------------------------------------------------------------- agreement


def item(kind: str, reference: str) -> EvalItem:
    return EvalItem(key="k", kind=kind, question="<image>\nq", reference=reference, turn=0)


AGREEMENT = [  # (eval kind, reference, eval metric, verifier task)
    ("counting", "3", "counting_accuracy", "counting"),
    ("grounding", BOX, "grounding_iou", "grounding"),
    ("grounding", POINT, "pointing_hit", "grounding"),
    ("ocr", "WGR-58310 Bridge", "ocr_exact", "ocr"),
    ("video_grounding", SPAN, "video_tiou", "video_grounding"),
    ("caption", CAPTION, "caption_shape_recall", None),
]
PREDICTIONS = ["3", "There are 2 and 1, so 3", "three", "[150, 100, 250, 200]", "[790, 752]", "wgr-58310 bridge.",
               "From 4.5 to 5.5 seconds.", "a red circle", "", "<think>x</think>3", "<think>3",
               "<think>a</think>[100, 100, 200, 200]"]


@pytest.mark.parametrize("thinking", [False, True])
def test_eval_scores_agree_with_the_verifiers(thinking: bool) -> None:
    for kind, reference, metric, task in AGREEMENT:
        for prediction in PREDICTIONS:
            metrics = score(item(kind, reference), prediction, thinking=thinking)
            if task is not None:
                assert metrics[metric] == verify(task, prediction, reference, thinking=thinking), (kind, prediction)
            assert ("format_ok" in metrics) is thinking
            if thinking:
                assert metrics["format_ok"] == verify_format(prediction)
                if not format_ok(prediction):
                    assert all(value == 0.0 for name, value in metrics.items() if name != "format_ok")
    ocr = score(item("ocr", "kitten"), "<think>reading</think>sitting", thinking=True)
    assert ocr == {"ocr_exact": 0.0, "ocr_similarity": pytest.approx(1 - 3 / 7), "format_ok": 1.0}
    assert score(item("ocr", "kitten"), "sitting") == {"ocr_exact": 0.0, "ocr_similarity": pytest.approx(1 - 3 / 7)}


# ---------------------------------------------------------------------------------------------- junk


def random_junk(rng: random.Random) -> str:
    alphabet = string.printable + "[](),<>/-–.\u2212" + "0123456789" * 3 + "é漢٣３"
    pieces = [rng.choice(["<think>", "</think>", "<box>", "</box>", "<point>", "</point>", "[", "]", "(", ")", ", ",
                          " to ", "-", "/", "From ", "seconds", "nan", "inf", "1e999", "9" * rng.randint(1, 400),
                          "twenty", "one", "1,000", "red circle", "on a white background", "\n"])
              for _ in range(rng.randint(0, 8))]
    pieces += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))]
    rng.shuffle(pieces)
    return "".join(pieces)


REFERENCES = {"counting": "3", "grounding": BOX, "pointing": POINT, "ocr": "WGR-58310 Bridge",
              "caption_attributes": CAPTION, "video_grounding": SPAN, "numeric": "1/2"}


def test_verifiers_never_raise_and_stay_in_range_on_junk() -> None:
    rng = random.Random(0)
    for _ in range(200):
        junk = random_junk(rng)
        for task, verifier in VERIFIERS.items():
            value = verifier(junk, REFERENCES[task])
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (task, junk, value)
            for thinking in (False, True):
                value = verify(task, junk, REFERENCES[task], thinking=thinking)
                assert isinstance(value, float) and 0.0 <= value <= 1.0, (task, junk, value)
        assert verify_caption_attributes(junk, "an empty photo") is None
        assert 0.0 <= ocr_similarity(junk, junk[::-1]) <= 1.0
        assert verify("grounding", junk, POINT) in (0.0, 1.0)
        thought, answer = split_thinking(junk)
        assert (thought is None or isinstance(thought, str)) and isinstance(answer, str)
        assert format_ok(junk) in (True, False) and isinstance(answer_of(junk, True), str)
