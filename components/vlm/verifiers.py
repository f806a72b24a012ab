"""Verifiers of the VLM's answers: one implementation of answer parsing and scoring shared by evaluation
(`eval_tasks.score`), rejection sampling of SFT data and the rewards of RL.

A verifier takes the ANSWER text (the response with any thinking block removed: callers use `answer_of`)
and the reference answer, and returns a score in [0, 1]. Everything here is a pure function of strings,
with no torch. Model output is never trusted: any text, and anything that is not a str (treated as ""),
scores without raising, and an answer that cannot be parsed scores 0. A reference the verifier cannot
read (a grounding reference with no box, a count that is no whole number) is a caller bug and raises
ValueError, whatever the answer.

Rules for free-form answers:

* Numbers: decimal digits of any script ("٣", fullwidth "３") count as the ASCII digit they stand for
  (`unicodedata.decimal`); other look-alikes (superscripts, circled digits, fullwidth brackets) do not.
* Counting takes the LAST whole number of the answer (in digits, or a word from zero to twenty): a
  model that reasons in its answer ends with its conclusion, "3 red circles and 2 blue, so 5" counts 5.
  A plain answer ("3", "three", "I count 3 objects.") is read as before.
* Boxes and points: the FIRST one of the answer is scored, so listing several boxes never earns more
  than the first. Coordinates live in [0, 999] (`components.common.coords`): out-of-range and negative
  coordinates are clamped, swapped corners (x1 > x2) put back in order.
* Time spans: the first span of the answer, in seconds; start and end put in order.
* Thinking (`split_thinking`, `format_ok`, `answer_of`): see `split_thinking`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

COORD_MAX = 999.0
POINT_HIT_RADIUS = 50.0
NUMERIC_REL_TOL = 1e-6

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "gray", "grey", "beige",
           "pink", "brown")
SHAPES = ("circle", "square", "triangle", "diamond", "star")
WORD_ALIASES = {"grey": "gray"}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty")

_NUM = r"(?<![\d.])(\d+(?:\.\d+)?)"  # starts only where a number starts: linear time on long digit runs
_COORD = r"([-+]?\d+(?:\.\d+)?)"  # signed: a negative coordinate clamps to 0
_SEP = r"(?:\s*,\s*|\s+)"
_BOX_BRACKETS = re.compile(r"\[\s*" + _SEP.join([_COORD] * 4) + r"\s*\]")
_BOX_CORNERS = re.compile(r"\(\s*" + _COORD + _SEP + _COORD + r"\s*\)\s*(?:,\s*)?\(\s*" + _COORD + _SEP + _COORD
                          + r"\s*\)")
_POINT = re.compile(r"\[\s*" + _COORD + _SEP + _COORD + r"\s*\]|\(\s*" + _COORD + _SEP + _COORD + r"\s*\)")
_INTEGER = re.compile(r"(?<![\w.])(\d{1,9})(?!\.\d)(?!\w)")
_NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_NUMBER_WORD_VALUES = {word: value for value, word in enumerate(NUMBER_WORDS)}
# a real number: optional sign, digits with optional "," thousands groups and decimals (or ".5"), optionally
# "/ denominator"; it must not touch a word or continue into more digits ("1,0000", "1.2.3", "1/2/3")
_NUMBER = re.compile(r"(?<![\w.,/])([-+\u2212]?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
                     r"(?:\s*/\s*(\d+))?(?!\w|[.,/]\d)")
_UNIT = r"(?:\s*(?:s|sec|secs|second|seconds)\b)?"
_TIME_SPAN = re.compile(_NUM + _UNIT + r"\s*(?:to|and|until|till|-|–|—|~)\s*" + _NUM)
_WORD = re.compile(r"\w+(?:[.'-]\w+)*")
_NON_ASCII_DIGIT = re.compile(r"(?![0-9])\d")
_BACKGROUND = re.compile(r"\b(?:on|against)\s+(?:a|an|the)?\s*(\w+)\s+background\b", re.IGNORECASE)


def as_text(value: Any) -> str:
    """`value` itself when it is a str, else "" (model output of the wrong type scores as an empty answer)."""
    return value if isinstance(value, str) else ""


# ---------------------------------------------------------------------------------------------- thinking


def split_thinking(response: str) -> tuple[str | None, str]:
    """(thinking text or None, answer), both stripped. The answer is what follows the FIRST "</think>";
    the thinking is what lies between the first "<think>" before it (or the start of the response, when a
    chat template already opened the block in the prompt) and that "</think>". Edge cases:

    * no tag at all: (None, the whole response);
    * "<think>" but no "</think>" (unclosed, e.g. cut at the token limit): (the rest, "") - no answer;
    * nested "<think><think>a</think></think>b" or two blocks "<think>a</think>x<think>b</think>y": the
      split still happens at the first "</think>" ("<think>a" / "</think>b"; "a" / "x<think>b</think>y"),
      and `format_ok` rejects both, so in thinking mode they have no answer at all.
    """
    text = as_text(response)
    close, open_ = text.find(THINK_CLOSE), text.find(THINK_OPEN)
    if close < 0:
        if open_ < 0:
            return None, text.strip()
        return text[open_ + len(THINK_OPEN):].strip(), ""
    start = open_ + len(THINK_OPEN) if 0 <= open_ < close else 0
    return text[start:close].strip(), text[close + len(THINK_CLOSE):].strip()


def format_ok(response: str) -> bool:
    """The thinking-mode format: the response starts (after whitespace) with exactly one
    <think>...</think> block (no second "<think>" or "</think>" anywhere, so no nesting), then a
    non-empty answer. The thinking itself may be empty ("<think></think>3")."""
    text = as_text(response).lstrip()
    if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return False
    return bool(split_thinking(text)[1])


def answer_of(response: str, thinking: bool) -> str:
    """The answer a verifier scores. thinking False: the response stripped (tags, if any, are kept);
    thinking True: the text after "</think>" stripped, or "" when the format is broken (`format_ok`)."""
    if not thinking:
        return as_text(response).strip()
    return split_thinking(response)[1] if format_ok(response) else ""


# ---------------------------------------------------------------------------------------------- parsers


def ascii_digits(text: str) -> str:
    """`text` with every decimal digit of another script ("٣", "３", "३") replaced by its ASCII digit
    (same length, so positions are kept)."""
    text = as_text(text)
    if text.isascii():
        return text
    return _NON_ASCII_DIGIT.sub(lambda m: str(unicodedata.decimal(m.group(), 0)), text)


def clamp_coord(value: float) -> float:
    return min(max(value, 0.0), COORD_MAX)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first box of `text` as (x1, y1, x2, y2) with x1 <= x2, y1 <= y2, clamped to [0, 999]:
    "[x1, y1, x2, y2]" (inside or outside <box> tags) or "(x1, y1), (x2, y2)"; None when there is none."""
    if not isinstance(text, str):
        return None
    text = ascii_digits(text)
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
    match = _POINT.search(ascii_digits(text))
    if match is None:
        return None
    x, y = (clamp_coord(float(v)) for v in match.groups() if v is not None)
    return x, y


def is_box_answer(answer: str) -> bool:
    return answer.startswith("<box>") and answer.endswith("</box>") and parse_box(answer) is not None


def is_point_answer(answer: str) -> bool:
    return answer.startswith("<point>") and answer.endswith("</point>") and parse_point(answer) is not None


def parse_counts(text: str) -> list[int]:
    """Every whole number of `text` in order: digits (at most 9, not part of a decimal or a word) or a
    number word from zero to twenty, any case."""
    if not isinstance(text, str):
        return []
    text = ascii_digits(text)
    found = [(m.start(), int(m.group(1))) for m in _INTEGER.finditer(text)] + number_words(text)
    return [value for _, value in sorted(found)]


def number_words(text: str) -> list[tuple[int, int]]:
    """(position, value) of every number word from zero to twenty in `text`, any case."""
    found = ((m.start(), _NUMBER_WORD_VALUES.get(m.group(1).casefold())) for m in _NUMBER_WORD.finditer(text))
    return [(start, value) for start, value in found if value is not None]


def parse_count(text: str) -> int | None:
    """The first whole number of `text`, in digits or as a word from zero to twenty; None when there is none."""
    counts = parse_counts(text)
    return counts[0] if counts else None


def parse_final_count(text: str) -> int | None:
    """The last whole number of `text` (the count an answer concludes with); None when there is none."""
    counts = parse_counts(text)
    return counts[-1] if counts else None


def parse_numbers(text: str) -> list[float]:
    """Every real number of `text` in order: "4", "-4.0", ".5", "1,000" (a comma followed by exactly three
    digits groups thousands; "3,4" and "1.2.3" are no number), "1/2" (a fraction; "/0" is no number), or a number
    word from zero to twenty. Numbers too large for a float are dropped."""
    if not isinstance(text, str):
        return []
    text = ascii_digits(text)
    found: list[tuple[int, float]] = []
    for match in _NUMBER.finditer(text):
        sign, digits, denominator = match.groups()
        value = float(digits.replace(",", ""))
        if denominator is not None:
            if float(denominator) == 0:
                continue
            value /= float(denominator)
        if math.isfinite(value):
            found.append((match.start(), -value if sign in ("-", "\u2212") else value))
    found += [(start, float(value)) for start, value in number_words(text)]
    return [value for _, value in sorted(found)]


def parse_final_number(text: str) -> float | None:
    """The last real number of `text` (see `parse_numbers`); None when there is none."""
    numbers = parse_numbers(text)
    return numbers[-1] if numbers else None


def parse_time_span(text: str) -> tuple[float, float] | None:
    """The first time span of `text` as (start, end) seconds with start <= end: "From 4.0 to 4.2 seconds",
    "4.0-4.2", "between 4 and 5 s", "4 s to 5 s"; None when there is none."""
    if not isinstance(text, str):
        return None
    match = _TIME_SPAN.search(ascii_digits(text))
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


def background_span(caption: str) -> tuple[int, int] | None:
    """Where the caption's "on a <colour> background" phrase is (start, end), or None."""
    match = _BACKGROUND.search(caption)
    return None if match is None else (match.start(), match.end())


def split_background(caption: str) -> tuple[str, str | None]:
    """(the caption without its "on a <colour> background" phrase, that colour word or None): a scene's
    background is one flat colour that fills most of every visual token, so naming it proves little
    about reading the objects; the two are scored apart."""
    match = _BACKGROUND.search(caption)
    if match is None:
        return caption, None
    return caption[:match.start()] + caption[match.end():], match.group(1)


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


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each 1) between two strings, by Hyyrö's
    bit-parallel algorithm: O(len(a) * len(b) / 64) word operations, so a runaway answer of 50,000
    characters against a long reference still takes well under a second."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}
    for i, char in enumerate(b):
        peq[char] = peq.get(char, 0) | (1 << i)
    mask, last = (1 << m) - 1, 1 << (m - 1)
    pv, mv, distance = mask, 0, m
    for char in a:
        eq = peq.get(char, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        if ph & last:
            distance += 1
        elif mh & last:
            distance -= 1
        ph = (ph << 1) | 1
        mh <<= 1
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv & mask
    return distance


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


def caption_attribute_recalls(answer: str, reference: str) -> dict[str, float]:
    """Recall of the objects' colours ("caption_object_colour_recall") and of the shapes
    ("caption_shape_recall") that the reference names, each only when it names any; the "on a <colour>
    background" phrase is left out of both texts (`split_background`)."""
    ref_objects, _ = split_background(as_text(reference))
    answer_objects, _ = split_background(as_text(answer))
    result = {}
    for name, vocabulary in (("caption_object_colour_recall", COLOURS), ("caption_shape_recall", SHAPES)):
        recall = attribute_recall(answer_objects, ref_objects, vocabulary)
        if recall is not None:
            result[name] = recall
    return result


# ---------------------------------------------------------------------------------------------- verifiers


def reference_count(reference: str) -> int:
    """The whole number a counting reference holds ("3", " 3 "); ValueError otherwise."""
    text = ascii_digits(as_text(reference)).strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"counting reference is no whole number: {reference!r}")
    return int(text)


def verify_counting(answer: str, reference: str) -> float:
    """1 when the last whole number of the answer (`parse_final_count`) is the reference count, else 0."""
    return float(parse_final_count(answer) == reference_count(reference))


def verify_grounding(answer: str, reference: str) -> float:
    """IoU of the answer's first box with the reference box (continuous, in [0, 1]); 0 without a box."""
    expected = parse_box(reference)
    if expected is None:
        raise ValueError(f"grounding reference holds no box: {reference!r}")
    predicted = parse_box(answer)
    return box_iou(predicted, expected) if predicted is not None else 0.0


def verify_pointing(answer: str, reference: str) -> float:
    """1 when the answer's first point lies within POINT_HIT_RADIUS (50 units of [0, 999]) of the
    reference point, else 0."""
    expected = parse_point(reference)
    if expected is None:
        raise ValueError(f"pointing reference holds no point: {reference!r}")
    predicted = parse_point(answer)
    return float(predicted is not None and math.dist(predicted, expected) <= POINT_HIT_RADIUS)


def exact_match(answer: str, reference: str) -> float:
    """1 when the two texts are equal after `normalise_text` (case, whitespace, trailing periods), else 0."""
    return float(normalise_text(answer) == normalise_text(reference))


def verify_ocr(answer: str, reference: str) -> float:
    """Exact match of the read text after `normalise_text`: 1 or 0."""
    return exact_match(answer, reference)


def ocr_similarity(answer: str, reference: str) -> float:
    """1 - edit distance / length of the longer text, both normalised (`normalise_text`): partial credit
    for a reading with a few wrong characters; 1 when both are empty."""
    a, b = normalise_text(answer), normalise_text(reference)
    longest = max(len(a), len(b))
    return 1.0 - edit_distance(a, b) / longest if longest else 1.0


def verify_caption_attributes(answer: str, reference: str) -> float | None:
    """Mean of the colour recall and the shape recall of `caption_attribute_recalls` (those the reference
    has); None when the reference names no object colour and no shape."""
    recalls = caption_attribute_recalls(answer, reference)
    return sum(recalls.values()) / len(recalls) if recalls else None


def verify_temporal(answer: str, reference: str) -> float:
    """Temporal IoU of the answer's first time span with the reference span; 0 without a span."""
    expected = parse_time_span(reference)
    if expected is None:
        raise ValueError(f"temporal reference holds no time span: {reference!r}")
    predicted = parse_time_span(answer)
    return temporal_iou(predicted, expected) if predicted is not None else 0.0


def verify_numeric(answer: str, reference: str) -> float:
    """1 when the last number of the answer equals the last number of the reference (`parse_numbers`:
    "4" = "4.0" = "four", "1/2" = "0.5", "1,000" = "1000") within a relative tolerance of 1e-6, else 0."""
    expected = parse_final_number(reference)
    if expected is None:
        raise ValueError(f"numeric reference holds no number: {reference!r}")
    predicted = parse_final_number(answer)
    return float(predicted is not None and math.isclose(predicted, expected, rel_tol=NUMERIC_REL_TOL))


def verify_format(response: str) -> float:
    """1 when the whole response has the thinking-mode format (`format_ok`), else 0."""
    return float(format_ok(response))


VERIFIERS: dict[str, Callable[[str, str], float | None]] = {
    "counting": verify_counting, "grounding": verify_grounding, "pointing": verify_pointing, "ocr": verify_ocr,
    "caption_attributes": verify_caption_attributes, "video_grounding": verify_temporal,
    "numeric": verify_numeric,
}


def verify(task: str, response: str, reference: str, thinking: bool = False) -> float:
    """The reward of one response, in [0, 1]: the task's verifier on `answer_of(response, thinking)`. A
    "grounding" reference that is a <point>...</point> is scored by `verify_pointing`. With thinking on, a
    response whose format is broken (`format_ok`) scores 0. An unknown task, or a reference the verifier
    cannot read (also a caption reference naming no colour or shape), raises ValueError: those are caller
    bugs, checked whatever the response; the response itself never makes this raise."""
    verifier = VERIFIERS.get(task)
    if verifier is None:
        raise ValueError(f"unknown verifier task {task!r}; expected one of {sorted(VERIFIERS)}")
    if task == "grounding" and is_point_answer(as_text(reference).strip()):
        verifier = verify_pointing
    value = verifier(answer_of(response, thinking), reference)
    if value is None:
        raise ValueError(f"{task} reference gives nothing to score: {reference!r}")
    if thinking and not format_ok(response):
        return 0.0
    return min(max(float(value), 0.0), 1.0) if math.isfinite(value) else 0.0
